"""The `dask-hpc` command as a user runs it: real processes, real Dask, local and SLURM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import live_slurm_jobs

REPO = Path(__file__).resolve().parents[2]
DASK_HPC = [sys.executable, "-m", "dask_hpc_operator.cli"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"stagingDir: {tmp_path / 'staging'}\nminPollInterval: 0.5\n")
    return path


def processes_under(path: Path) -> list[str]:
    """Command lines of live processes that mention `path` (our jobs' scripts and files)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line and "ps -eo" not in line]


def run(args: list[str], config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`dask-hpc SUBCOMMAND --config CONFIG ...`: the config goes right after the
    subcommand, never after a `--` where it would become the user command's argument."""
    return subprocess.run([*DASK_HPC, args[0], "--config", str(config), *args[1:]], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_up_runs_a_computation_and_leaves_nothing(config: Path, tmp_path: Path) -> None:
    """The README's quick start: local backend, a client command, then teardown."""
    result = run(["up", "-f", "examples/cluster-local.yaml", "--",
                  sys.executable, "examples/quickstart.py"], config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with 2 workers" in result.stdout
    assert "mean of x @ x.T" in result.stdout
    assert "is ready: scheduler tcp://" in result.stdout
    assert result.stdout.rstrip().endswith("no job left")
    assert processes_under(tmp_path / "staging") == []


AUTOSCALED_WORK = """
import time
from distributed import Client
with Client() as client:
    assert not client.scheduler_info()["workers"], "the cluster should start with none"
    futures = client.map(lambda i: time.sleep(0.5) or i, range(40))
    peak = 0
    while not all(f.done() for f in futures):
        peak = max(peak, len(client.scheduler_info()["workers"]))
        time.sleep(0.2)
    print("sum", sum(client.gather(futures)), "peak workers", peak)
"""


def test_the_autoscaler_example_grows_from_nothing(config: Path) -> None:
    """examples/autoscaler-local.yaml: zero workers until work arrives, then 1..4."""
    result = run(["up", "-f", "examples/autoscaler-local.yaml", "--",
                  sys.executable, "-c", AUTOSCALED_WORK], config, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    words = result.stdout.split("sum ", 1)[1].split()
    assert words[0] == str(sum(range(40)))
    assert 1 <= int(words[3]) <= 4, result.stdout
    assert result.stdout.rstrip().endswith("no job left")


def test_up_passes_the_command_exit_code(config: Path) -> None:
    result = run(["up", "-f", "examples/cluster-local.yaml", "--",
                  sys.executable, "-c", "raise SystemExit(7)"], config)
    assert result.returncode == 7
    assert "no job left" in result.stdout


def test_ctrl_c_tears_everything_down(config: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([*DASK_HPC, "up", "-f", "examples/cluster-local.yaml",
                             "--config", str(config)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = []
    for line in proc.stdout:  # blocks per line; the deadline guards a silent hang
        seen.append(line)
        if "press Ctrl-C" in line or time.monotonic() > deadline:
            break
    assert any("is ready" in line for line in seen), "".join(seen)
    assert processes_under(tmp_path / "staging"), "the cluster's processes should be running"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert "no job left" in rest
    assert proc.returncode == 0
    assert processes_under(tmp_path / "staging") == []


@pytest.mark.parametrize(("key", "value", "field"), [
    ("replicas", -1, "spec.worker.replicas"),
    ("memory", "1GiB; touch /tmp/pwned", "spec.worker.memory"),
    ("queue", "debug\n#SBATCH --uid=0", "spec.worker.queue"),
    ("replica", 3, "spec.worker.replica"),
])
def test_invalid_manifest_exits_2_and_submits_nothing(config: Path, tmp_path: Path, key: str,
                                                      value: object, field: str) -> None:
    manifest = yaml.safe_load((REPO / "examples/cluster-local.yaml").read_text())
    manifest["spec"]["worker"][key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    result = run(["up", "-f", str(bad)], config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert field in result.stderr
    assert not (tmp_path / "staging").exists(), "nothing may be submitted or staged"


def test_render_prints_scripts_and_refuses_bad_input(config: Path, tmp_path: Path) -> None:
    result = run(["render", "-f", "examples/cluster-slurm.yaml"], config)
    assert result.returncode == 0, result.stderr
    # Scheduler + ONE job array for the four workers (packing).
    assert result.stdout.count("#SBATCH --comment=dask-hpc:v1:default:analysis:") == 2
    assert "#SBATCH --array=0-3" in result.stdout
    assert "--name dask.default.analysis.default.${SLURM_ARRAY_TASK_ID}" in result.stdout
    assert "distributed.cli.dask_scheduler" in result.stdout
    assert "#SBATCH --cpus-per-task=4" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "examples/cluster-slurm.yaml").read_text()
                   .replace('walltime: "04:00:00"\n    queue: debug\n  worker',
                            'walltime: "4h"\n    queue: debug\n  worker'))
    result = run(["render", "-f", str(bad)], config)
    assert result.returncode == 2
    assert "spec.scheduler.walltime" in result.stderr and "HH:MM:SS" in result.stderr


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_up_on_slurm(config: Path, tmp_path: Path) -> None:
    result = run(["up", "-f", "examples/cluster-local.yaml", "--backend", "slurm", "--",
                  sys.executable, "examples/quickstart.py"], config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mean of x @ x.T" in result.stdout
    assert "no job left" in result.stdout
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%k"],
                         capture_output=True, text=True, check=True).stdout
    # This run's cluster only (its kept history file is named after the uid's first 8
    # characters): a quickstart cluster of another run may share the machine.
    mine = {p.stem.rsplit("-", 1)[1]
            for p in (tmp_path / "staging" / "history" / "default").glob("quickstart-*")}
    ours = [line for line in out.splitlines()
            if ":quickstart:" in line and line.split(":")[4][:8] in mine]
    assert ours, "the jobs ran through SLURM"
    uids = {line.split(":")[4] for line in ours}
    assert all(live_slurm_jobs(uid) == [] for uid in uids)
    assert os.environ.get("CI") != "true" or ours


def test_render_heterogeneous_cluster_with_groups(config: Path) -> None:
    result = run(["render", "-f", "examples/heterogeneous.yaml"], config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("# ---- array of") == 3  # default, highmem and gpu groups: one each
    assert "--protocol tcp,ucx" in out and "--preload" in out
    assert "#SBATCH -p highmem" in out and "--resources HIGHMEM=1" in out
    assert "#SBATCH --gres=gpu:4" in out and "-m dask cuda worker" in out
    assert "scheduler-ucx.json" in out


def test_up_runs_the_readme_daskjob_to_its_exit_code(config: Path, tmp_path: Path) -> None:
    """The README's main command: a DaskJob on the embedded default, output streamed."""
    result = run(["up", "-f", "examples/job-local.yaml"], config)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "connected to tcp://" in out and ": 2 workers" in out
    assert "pi is about 3.14" in out
    assert "daskjob default/estimate-pi Succeeded: the command exited with 0" in out
    assert "daskcluster default/estimate-pi deleted, no job of it left" in out
    output_files = list((tmp_path / "staging" / "jobs").glob("default/estimate-pi-*/output.log"))
    assert len(output_files) == 1 and "pi is about" in output_files[0].read_text()
    assert processes_under(tmp_path / "staging") == []


def test_up_exits_with_a_failing_daskjob_exit_code(config: Path, tmp_path: Path) -> None:
    job = yaml.safe_load((REPO / "examples/job-local.yaml").read_text())
    job["spec"]["job"]["script"] = "print('partial result')\nraise SystemExit(5)\n"
    job["spec"]["cluster"]["worker"]["replicas"] = 1
    path = tmp_path / "fails.yaml"
    path.write_text(yaml.safe_dump(job))
    result = run(["up", "-f", str(path)], config)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "partial result" in result.stdout
    assert "Failed: the command exited with 5" in result.stdout
    assert processes_under(tmp_path / "staging") == []


def test_render_shows_a_daskjob_cluster_and_runner(config: Path) -> None:
    result = run(["render", "-f", "examples/job-local.yaml", "--backend", "slurm"], config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "distributed.cli.dask_scheduler" in out
    assert "# ---- runner job dask.default.estimate-pi.runner.0" in out
    assert "DASK_SCHEDULER_ADDRESS=" in out and "script.py" in out
    assert "exit_code.tmp" in out
