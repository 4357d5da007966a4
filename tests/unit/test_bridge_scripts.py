"""hpc_bridge.scripts: job scripts rendered through dask-jobqueue."""

from __future__ import annotations

import shlex

import pytest

from hpc_bridge.model import JobIdentity, JobTemplate, Role
from hpc_bridge.scripts import (
    RenderContext,
    render,
    render_scheduler,
    render_worker,
    scheduler_command,
    worker_command_args,
)

UID = "uid-1"
WORKER = JobIdentity("default", "c1", UID, Role.WORKER, "default", 0)
SCHEDULER = JobIdentity("default", "c1", UID, Role.SCHEDULER, "default", 0)
PYTHON = "/opt/conda/bin/python"


def ctx(backend: str = "slurm", scheduler_file: str = "/shared/dask/c1/scheduler.json",
        **kw: object) -> RenderContext:
    return RenderContext(backend=backend, python=PYTHON, scheduler_file=scheduler_file,
                         log_dir="/shared/dask/c1/logs", **kw)  # type: ignore[arg-type]


FULL = JobTemplate(
    cores=8, memory="16GiB", processes=2, walltime="02:30:00", queue="debug",
    account="proj-42", gpus=1,
    env=(("OMP_NUM_THREADS", "1"), ("GREETING", "hello world, it's me")),
    prologue=("module load cuda/12.2",),
    extra_directives=("--constraint=haswell", "--exclusive=user"),
    worker_args=("--no-dashboard",),
    resources=(("GPU", 1.0), ("HIGHMEM", 2.0)),
)


def lines(script: str) -> list[str]:
    return script.splitlines()


def sbatch_lines(script: str) -> list[str]:
    return [line for line in lines(script) if line.startswith("#SBATCH")]


def last_line(script: str) -> str:
    return [line for line in lines(script) if line.strip()][-1]


def test_slurm_worker_directives() -> None:
    script = render_worker(ctx(), WORKER, FULL).script
    directives = sbatch_lines(script)
    for expected in [
        "#SBATCH -J dask.default.c1.default.0",
        "#SBATCH -p debug",
        "#SBATCH -A proj-42",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=16G",
        "#SBATCH -t 02:30:00",
        "#SBATCH --comment=dask-hpc:v1:default:c1:uid-1:worker:default:0",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --constraint=haswell",
        "#SBATCH --exclusive=user",
    ]:
        assert expected in directives, (expected, directives)
    # logs go to the log directory
    assert "#SBATCH -o /shared/dask/c1/logs/dask.default.c1.default.0-%J.out" in directives
    assert "#SBATCH -e /shared/dask/c1/logs/dask.default.c1.default.0-%J.err" in directives
    # the comment appears exactly once and extra directives come after ours
    assert sum(d.startswith("#SBATCH --comment=") for d in directives) == 1
    assert directives.index("#SBATCH --constraint=haswell") > \
        directives.index("#SBATCH --comment=dask-hpc:v1:default:c1:uid-1:worker:default:0")
    # every directive precedes the first command
    first_command = next(i for i, line in enumerate(lines(script))
                         if line.strip() and not line.startswith("#"))
    assert all(lines(script).index(d) < first_command for d in directives)
    assert lines(script)[0] == "#!/usr/bin/env bash"


def test_slurm_worker_env_is_shell_quoted() -> None:
    script = render_worker(ctx(), WORKER, FULL).script
    value = "hello world, it's me"
    assert f"export GREETING={shlex.quote(value)}" in lines(script)
    assert "export GREETING='hello world, it'\"'\"'s me'" in lines(script)
    assert "export OMP_NUM_THREADS=1" in lines(script)
    assert "export DASK_HPC_IDENTITY=dask-hpc:v1:default:c1:uid-1:worker:default:0" \
        in lines(script)
    assert "module load cuda/12.2" in lines(script)
    # the quoted value really evaluates to the original in a shell
    assert shlex.split(f"GREETING={shlex.quote(value)}") == [f"GREETING={value}"]


def test_slurm_worker_command() -> None:
    script = render_worker(ctx(), WORKER, FULL).script
    command = last_line(script)
    argv = shlex.split(command)
    assert argv[:3] == [PYTHON, "-m", "distributed.cli.dask_worker"]
    assert argv[argv.index("--scheduler-file") + 1] == "/shared/dask/c1/scheduler.json"
    assert argv[argv.index("--name") + 1] == "dask.default.c1.default.0"
    assert argv[argv.index("--nworkers") + 1] == "2"
    assert argv[argv.index("--nthreads") + 1] == "4"  # cores / processes
    assert argv[argv.index("--resources") + 1] == "GPU=1,HIGHMEM=2"
    assert argv[argv.index("--death-timeout") + 1] == "900"
    assert "--no-dashboard" in argv
    assert "--resources GPU=1,HIGHMEM=2" in command


def test_slurm_minimal_template_has_no_optional_lines() -> None:
    script = render_worker(ctx(), WORKER, JobTemplate()).script
    directives = sbatch_lines(script)
    assert not any(d.startswith(("#SBATCH -p ", "#SBATCH -A ", "#SBATCH --gres"))
                   for d in directives)
    assert "#SBATCH --cpus-per-task=1" in directives
    assert "#SBATCH --mem=4G" in directives
    assert "#SBATCH -t 01:00:00" in directives
    command = last_line(script)
    assert "--nworkers" not in command
    assert "--resources" not in command
    assert "--protocol" not in command


def test_worker_protocol_and_death_timeout() -> None:
    script = render_worker(ctx(protocols=("ucx",), death_timeout=60), WORKER, JobTemplate()).script
    argv = shlex.split(last_line(script))
    assert argv[argv.index("--protocol") + 1] == "ucx"
    assert argv[argv.index("--death-timeout") + 1] == "60"


def test_site_prologue_comes_before_user_prologue() -> None:
    template = JobTemplate(prologue=("echo user",))
    script = render_worker(ctx(site_prologue=("module load site",)), WORKER, template).script
    body = lines(script)
    assert body.index("module load site") < body.index("echo user")


def test_worker_command_args() -> None:
    # The default walltime (1 h) gives every worker a lifetime (hpc_bridge.lifetime).
    lifetime = ["--lifetime", "3240s", "--lifetime-stagger", "120s"]
    assert worker_command_args(JobTemplate()) == lifetime
    assert worker_command_args(JobTemplate(worker_args=("--a", "b"),
                                           resources=(("GPU", 1.0), ("MEM", 0.5)))) == \
        ["--a", "b", *lifetime, "--resources", "GPU=1,MEM=0.5"]


def test_slurm_scheduler_script() -> None:
    template = JobTemplate(cores=2, memory="8GiB", walltime="04:00:00", queue="long",
                           account="acct")
    script = render_scheduler(ctx(), SCHEDULER, template).script
    directives = sbatch_lines(script)
    for expected in [
        "#SBATCH -J dask.default.c1.scheduler.0",
        "#SBATCH -p long",
        "#SBATCH -A acct",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=8G",
        "#SBATCH -t 04:00:00",
        "#SBATCH --comment=dask-hpc:v1:default:c1:uid-1:scheduler:default:0",
    ]:
        assert expected in directives, (expected, directives)
    assert last_line(script) == (f"{PYTHON} -m distributed.cli.dask_scheduler "
                                 "--scheduler-file /shared/dask/c1/scheduler.json "
                                 "--port 0 --dashboard-address :0")
    assert "dask_worker" not in script


def test_scheduler_file_with_space_is_quoted() -> None:
    path = "/shared/my dir/scheduler.json"
    sched = render_scheduler(ctx(scheduler_file=path), SCHEDULER, JobTemplate()).script
    assert "--scheduler-file '/shared/my dir/scheduler.json'" in last_line(sched)
    argv = shlex.split(last_line(sched))
    assert argv[argv.index("--scheduler-file") + 1] == path
    worker = render_worker(ctx(scheduler_file=path), WORKER, JobTemplate()).script
    argv = shlex.split(last_line(worker))
    assert argv[argv.index("--scheduler-file") + 1] == path


def test_scheduler_command_protocol() -> None:
    assert scheduler_command(ctx(protocols=("tls",))).endswith(" --protocol tls")
    assert "--protocol" not in scheduler_command(ctx())


def test_render_dispatches_on_role() -> None:
    assert "dask_scheduler" in render(ctx(), SCHEDULER, JobTemplate()).script
    request = render(ctx(), WORKER, JobTemplate())
    assert "dask_worker" in request.script
    assert request.identity == WORKER
    assert request.log_dir == "/shared/dask/c1/logs"


@pytest.mark.parametrize("identity", [WORKER, SCHEDULER])
def test_local_scripts_have_no_batch_directives(identity: JobIdentity) -> None:
    script = render(ctx("local"), identity, FULL).script
    assert "#SBATCH" not in script
    assert "#PBS" not in script
    assert "export DASK_HPC_IDENTITY=" + identity.comment() in lines(script)
    assert "export GREETING='hello world, it'\"'\"'s me'" in lines(script)
    assert last_line(script).startswith(f"{PYTHON} -m distributed.cli.dask_")


def test_pbs_worker_carries_identity_and_gpus() -> None:
    script = render_worker(ctx("pbs"), WORKER, JobTemplate(cores=4, gpus=2,
                                                           memory="16GiB")).script
    assert "#PBS -v DASK_HPC_IDENTITY=dask-hpc:v1:default:c1:uid-1:worker:default:0" \
        in lines(script)
    assert "#PBS -l select=1:ncpus=4:ngpus=2:mem=16gb" in lines(script)
    assert "#SBATCH" not in script
