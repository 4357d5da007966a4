"""hpc_bridge.allocation: one batch job of N MPI tasks, rendered through dask-jobqueue.

The scripts are checked line by line for what the batch system reads (task count and
per-task resources, the identity) and the launcher line is run through a real shell to show
that hostile argv elements arrive as single, inert words.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest

from hpc_bridge.allocation import render_allocation, task_count
from hpc_bridge.model import JobIdentity, JobTemplate, Role, RunnerCommand
from hpc_bridge.mpi_entry import parse_args, required_ranks
from hpc_bridge.scripts import RenderContext

PYTHON = "/opt/conda/envs/dask/bin/python"
IDENTITY = JobIdentity("ns", "c1", "uid-1", Role.ALLOCATION, "allocation", 0)
TEMPLATE = JobTemplate(
    cores=2, memory="3GB", walltime="1-02:00:00", queue="debug", account="proj-42", gpus=1,
    env=(("OMP_NUM_THREADS", "1"), ("GREETING", "hello world, it's me")),
    prologue=("module load mpich",),
    extra_directives=("--constraint=haswell",),
    resources=(("GPU", 1.0), ("foo", 2.0)),
)
HOSTILE = ("python", "$(touch /tmp/pwn)", "a b", "'", "; rm -rf /", "--")
CLIENT = RunnerCommand(argv=HOSTILE, output_file="/shared/job dir/output.txt",
                       exit_code_file="/shared/job dir/exit-code", working_dir="/home/me/my work")


def ctx(backend: str = "slurm", python: str = PYTHON) -> RenderContext:
    return RenderContext(backend=backend, python=python,
                         scheduler_file="/shared/c1/scheduler.json", log_dir="/shared/c1/logs")


def directives(script: str, prefix: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(prefix)]


def command_words(script: str) -> list[str]:
    return shlex.split([line for line in script.splitlines() if line.strip()][-1])


def test_task_count() -> None:
    assert task_count(2, CLIENT) == 4
    assert task_count(2, None) == 3


def test_slurm_tasks_and_per_task_resources() -> None:
    script = render_allocation(ctx(), IDENTITY, TEMPLATE, 2, CLIENT).script
    lines = directives(script, "#SBATCH")
    for expected in [
        "#SBATCH -J dask.ns.c1.allocation.0",
        "#SBATCH -e /shared/c1/logs/dask.ns.c1.allocation.0-%J.err",
        "#SBATCH -o /shared/c1/logs/dask.ns.c1.allocation.0-%J.out",
        "#SBATCH -p debug",
        "#SBATCH -A proj-42",
        "#SBATCH -t 1-02:00:00",
        "#SBATCH --ntasks=4",  # 2 workers + scheduler + client
        "#SBATCH --cpus-per-task=2",
        # 3 GB over 2 CPUs = 1430.5 MiB, rounded up: a task never gets less than asked.
        "#SBATCH --mem-per-cpu=1431M",
        "#SBATCH --gpus-per-task=1",
        f"#SBATCH --comment={IDENTITY.comment()}",
        "#SBATCH --constraint=haswell",
    ]:
        assert expected in lines, (expected, lines)
    # dask-jobqueue's one-task lines are gone; GPUs are per task, not per node.
    assert not [line for line in lines if line.startswith(("#SBATCH -n ", "#SBATCH --mem="))]
    assert not [line for line in lines if "--gres" in line]
    assert "export DASK_HPC_IDENTITY=" + IDENTITY.comment() in script
    assert "export GREETING='hello world, it'\"'\"'s me'" in script
    assert "module load mpich" in script


def test_slurm_without_client_has_one_task_fewer() -> None:
    script = render_allocation(ctx(), IDENTITY, TEMPLATE, 2, None).script
    assert "#SBATCH --ntasks=3" in directives(script, "#SBATCH")
    words = command_words(script)
    assert words[:3] == ["/opt/conda/envs/dask/bin/mpiexec", "-n", "3"]
    assert "--" not in words and "--output-file" not in words


def test_site_skip_list_applies_but_never_to_the_task_count() -> None:
    with dask.config.set({"jobqueue.slurm.job-directives-skip": ["--mem", "-p "]}):
        lines = directives(render_allocation(ctx(), IDENTITY, TEMPLATE, 2, CLIENT).script,
                           "#SBATCH")
    assert not [line for line in lines if "--mem" in line or line.startswith("#SBATCH -p ")]
    assert "#SBATCH --ntasks=4" in lines
    assert f"#SBATCH --comment={IDENTITY.comment()}" in lines


def test_site_job_cpu_does_not_change_the_task_size() -> None:
    with dask.config.set({"jobqueue.slurm.job-cpu": 16}):
        lines = directives(render_allocation(ctx(), IDENTITY, TEMPLATE, 2, CLIENT).script,
                           "#SBATCH")
    assert "#SBATCH --cpus-per-task=2" in lines


def test_pbs_select_chunks_and_identity() -> None:
    script = render_allocation(ctx("pbs"), IDENTITY, TEMPLATE, 3, CLIENT).script
    lines = directives(script, "#PBS")
    # 3 GB = 2861.02 MiB: PBS's mb, rounded up.
    assert "#PBS -l select=5:ncpus=2:ngpus=1:mpiprocs=1:mem=2862mb" in lines
    assert "#PBS -l walltime=26:00:00" in lines
    assert "#PBS -q debug" in lines
    assert "#PBS -P proj-42" in lines
    assert f"#PBS -v DASK_HPC_IDENTITY={IDENTITY.comment()}" in lines
    assert "#PBS --constraint=haswell" in lines
    assert not [line for line in lines if line.startswith("#PBS -A")]
    assert len([line for line in lines if line.startswith("#PBS -l select")]) == 1
    assert command_words(script)[:5] == ["/opt/conda/envs/dask/bin/mpiexec", "-f",
                                         "$PBS_NODEFILE", "-n", "5"]


def test_pbs_launcher_reads_the_node_file_inside_the_job(tmp_path: Path) -> None:
    """The launcher line through real bash, as PBS runs it: `$PBS_NODEFILE` (the hosts
    PBS gave the job) reaches mpiexec expanded, every other word verbatim."""
    bindir = tmp_path / "my env" / "bin"
    bindir.mkdir(parents=True)
    mpiexec = bindir / "mpiexec"
    mpiexec.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    mpiexec.chmod(0o755)
    script = render_allocation(ctx("pbs", python=str(bindir / "python")), IDENTITY, TEMPLATE,
                               3, CLIENT).script
    line = [line for line in script.splitlines() if line.strip()][-1]
    nodefile = tmp_path / "aggr.nodefile"
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True,
                         env={"PBS_NODEFILE": str(nodefile), "PATH": "/usr/bin:/bin"})
    received = json.loads(out.stdout)
    assert received[:5] == ["-f", str(nodefile), "-n", "5", str(bindir / "python")]
    assert received[received.index("--") + 1:] == list(HOSTILE)


def test_local_forks_and_has_no_header() -> None:
    script = render_allocation(ctx("local"), IDENTITY, TEMPLATE, 2, CLIENT).script
    assert not directives(script, "#SBATCH") and not directives(script, "#PBS")
    assert "export DASK_HPC_IDENTITY=" + IDENTITY.comment() in script
    assert command_words(script)[:5] == ["/opt/conda/envs/dask/bin/mpiexec", "-launcher",
                                         "fork", "-n", "4"]


def test_entry_arguments() -> None:
    words = command_words(render_allocation(ctx(), IDENTITY, TEMPLATE, 2, CLIENT).script)
    entry = words.index("hpc_bridge.mpi_entry")
    assert words[entry - 2:entry] == [PYTHON, "-m"]
    args = parse_args(words[entry + 1:])
    assert args.scheduler_file == "/shared/c1/scheduler.json"
    assert args.name == IDENTITY.job_name  # workers are <job name>-<rank>
    assert args.nthreads == 2
    assert args.memory_limit == 3_000_000_000
    assert args.resources == {"GPU": 1.0, "foo": 2.0}
    assert args.death_timeout == 60  # the scheduler is up before the workers start
    assert args.output_file == CLIENT.output_file
    assert args.exit_code_file == CLIENT.exit_code_file
    assert args.working_dir == CLIENT.working_dir
    assert tuple(args.command) == HOSTILE  # even its own "--" survives


def test_protocol_other_than_tcp_is_passed() -> None:
    ucx = RenderContext(backend="slurm", python=PYTHON, scheduler_file="/s/scheduler.json",
                        log_dir="/s/logs", protocols=("ucx",))
    words = command_words(render_allocation(ucx, IDENTITY, TEMPLATE, 1, None).script)
    assert words[words.index("--protocol") + 1] == "ucx"
    tcp = command_words(render_allocation(ctx(), IDENTITY, TEMPLATE, 1, None).script)
    assert "--protocol" not in tcp


def test_launcher_override_is_used_as_given() -> None:
    script = render_allocation(ctx(), IDENTITY, TEMPLATE, 2, CLIENT,
                               ("srun", "--mpi=pmi2")).script
    words = command_words(script)
    assert words[:5] == ["srun", "--mpi=pmi2", PYTHON, "-m", "hpc_bridge.mpi_entry"]
    assert "mpiexec" not in script
    assert "#SBATCH --ntasks=4" in directives(script, "#SBATCH")  # srun reads it from here


def test_hostile_paths_and_argv_reach_the_program_verbatim(tmp_path: Path) -> None:
    """Run the rendered command line through bash with a launcher that prints its argv:
    every element arrives as one word and nothing in it is executed."""
    canary = tmp_path / "pwned"
    argv = ("python", f"$(touch {canary})", f"`touch {canary}`", "a b", "'", '"', "$HOME",
            "; touch " + str(canary), "*")
    client = RunnerCommand(argv=argv, output_file=str(tmp_path / "out $(x)"),
                           exit_code_file=str(tmp_path / "exit'code"),
                           working_dir=str(tmp_path / "a b"))
    hostile_ctx = RenderContext(backend="local", python="/opt/my env/bin/python",
                                scheduler_file=str(tmp_path / "sch;ed.json"),
                                log_dir=str(tmp_path / "logs"))
    printer = (sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))")
    script = render_allocation(hostile_ctx, IDENTITY, TEMPLATE, 2, client, printer).script
    line = [line for line in script.splitlines() if line.strip()][-1]
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    received = json.loads(out.stdout)
    assert received[0] == "/opt/my env/bin/python"
    assert received[received.index("--") + 1:] == list(argv)
    assert received[received.index("--scheduler-file") + 1] == str(tmp_path / "sch;ed.json")
    assert received[received.index("--output-file") + 1] == client.output_file
    assert received[received.index("--exit-code-file") + 1] == client.exit_code_file
    assert received[received.index("--working-dir") + 1] == client.working_dir
    assert not canary.exists()


def test_default_launcher_is_the_mpiexec_beside_python() -> None:
    words = command_words(render_allocation(ctx(python="/venv/bin/python3"), IDENTITY,
                                            TEMPLATE, 5, CLIENT).script)
    assert words[:4] == ["/venv/bin/mpiexec", "-n", "7", "/venv/bin/python3"]


def test_an_allocation_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        render_allocation(ctx(), IDENTITY, TEMPLATE, 0, CLIENT)


# --- hpc_bridge.mpi_entry's command line -----------------------------------------------------

def test_entry_parses_sizes_and_resources() -> None:
    args = parse_args(["--scheduler-file", "s.json", "--name", "n", "--memory-limit", "2GiB",
                       "--resources", "GPU=1,foo=2.5"])
    assert args.memory_limit == 2 * 2**30
    assert args.resources == {"GPU": 1.0, "foo": 2.5}
    assert args.command == []
    assert parse_args(["--scheduler-file", "s", "--name", "n"]).memory_limit == "auto"


@pytest.mark.parametrize("argv", [
    ["--resources", "GPU"],
    ["--resources", "=1"],
    ["--memory-limit", "lots"],
    ["--", "python", "client.py"],  # a client needs its output and exit-code files
])
def test_entry_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--scheduler-file", "s", "--name", "n", *argv])


def test_required_ranks() -> None:
    assert required_ranks(with_client=True) == 3
    assert required_ranks(with_client=False) == 2
