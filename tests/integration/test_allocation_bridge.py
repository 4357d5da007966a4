"""A whole Dask cluster in one batch job: render_allocation + hpc_bridge.mpi_entry, for real.

Submitted through the bridge's backends (real sbatch on the one-node SLURM, bash processes
for the local backend) with the mpich wheel's mpiexec beside this interpreter; each test
waits on conditions with deadlines and, on SLURM, ends by checking squeue holds no live job
of its owner. The SLURM tests carry the SLURM marks one by one, so that the local backend's
and the launcher-less tests run where no SLURM is.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from distributed import Client

from helpers import live_slurm_jobs, wait_until
from hpc_bridge.allocation import render_allocation
from hpc_bridge.backends.local import LocalBackend
from hpc_bridge.backends.slurm import SlurmBackend
from hpc_bridge.model import (
    JobIdentity,
    JobRequest,
    JobState,
    JobTemplate,
    ObservedJob,
    Role,
    RunnerCommand,
)
from hpc_bridge.scripts import RenderContext

F = TypeVar("F", bound=Callable[..., Any])
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TEMPLATE = JobTemplate(cores=1, memory="1GiB", walltime="00:05:00")

CLIENT_SCRIPT = """\
import sys
from distributed import Client

with Client() as client:  # DASK_SCHEDULER_ADDRESS
    client.wait_for_workers(2, timeout=20)
    names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
    print("workers", names)
    print("result", client.submit(sum, range(10)).result())
raise SystemExit(int(sys.argv[1]))
"""


def slurm_test(test: F) -> F:
    """Marked like the SLURM tests of test_slurm_cluster.py (skipped where SLURM is not
    up, a failure in CI)."""
    return pytest.mark.slurm(pytest.mark.usefixtures("slurm")(test))  # type: ignore[no-any-return]


@pytest.fixture
def uid() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def slurm_leftovers(uid: str) -> AsyncIterator[None]:
    """A failing SLURM test must not leave its allocation running."""
    yield
    if live := live_slurm_jobs(uid):
        subprocess.run(["scancel", *live], check=False)


def identity(uid: str, name: str) -> JobIdentity:
    return JobIdentity("it", name, uid, Role.ALLOCATION, "allocation", 0)


def context(backend: str, staging: Path) -> RenderContext:
    return RenderContext(backend=backend, python=sys.executable,
                         scheduler_file=str(staging / "scheduler.json"),
                         log_dir=str(staging / "logs"))


def client_command(staging: Path, exit_code: int) -> RunnerCommand:
    script = staging / "client.py"
    script.write_text(CLIENT_SCRIPT)
    return RunnerCommand(argv=(sys.executable, str(script), str(exit_code)),
                         output_file=str(staging / "output.txt"),
                         exit_code_file=str(staging / "exit-code"),
                         working_dir=str(staging))


async def ended(backend: SlurmBackend | LocalBackend, job_id: str,
                timeout: float = 30) -> ObservedJob:
    async def check() -> ObservedJob | None:
        job = next((j for j in await backend.poll() if j.job_id == job_id), None)
        return job if job is not None and job.state.terminal else None
    job: ObservedJob = await wait_until(check, timeout, f"job {job_id} to end")
    return job


def logs(request: JobRequest) -> str:
    return "\n".join(p.read_text()[-3000:] for p in Path(request.log_dir).glob("*"))


# --- SLURM ------------------------------------------------------------------------------------

@slurm_test
@pytest.mark.usefixtures("slurm_leftovers")
async def test_client_computes_and_the_job_completes(staging: Path, uid: str) -> None:
    backend = SlurmBackend()
    client = client_command(staging, 0)
    request = render_allocation(context("slurm", staging), identity(uid, "mpi-ok"), TEMPLATE,
                                2, client)
    assert "#SBATCH --ntasks=4" in request.script
    job_id = await backend.submit(request)
    job = await ended(backend, job_id)
    assert job.state is JobState.COMPLETED, (job, logs(request))
    assert Path(client.exit_code_file).read_text().strip() == "0"
    output = Path(client.output_file).read_text()
    assert "result 45" in output
    name = identity(uid, "mpi-ok").job_name
    assert f"workers ['{name}-2', '{name}-3']" in output  # rank 0 scheduler, rank 1 client
    assert live_slurm_jobs(uid) == []


@slurm_test
@pytest.mark.usefixtures("slurm_leftovers")
async def test_client_exit_status_is_the_jobs(staging: Path, uid: str) -> None:
    backend = SlurmBackend()
    client = client_command(staging, 3)
    request = render_allocation(context("slurm", staging), identity(uid, "mpi-fail"),
                                TEMPLATE, 2, client)
    job_id = await backend.submit(request)
    job = await ended(backend, job_id)
    assert job.state is JobState.FAILED, (job, logs(request))
    assert Path(client.exit_code_file).read_text().strip() == "3"
    assert "result 45" in Path(client.output_file).read_text()
    assert live_slurm_jobs(uid) == []


@slurm_test
@pytest.mark.usefixtures("slurm_leftovers")
async def test_clientless_allocation_serves_until_cancelled(staging: Path, uid: str) -> None:
    backend = SlurmBackend()
    ctx = context("slurm", staging)
    request = render_allocation(ctx, identity(uid, "mpi-serve"), TEMPLATE, 2, None)
    assert "#SBATCH --ntasks=3" in request.script
    job_id = await backend.submit(request)

    async def scheduler_file() -> dict[str, Any] | None:
        try:  # written atomically: absent or whole, never half
            info: dict[str, Any] = json.loads(Path(ctx.scheduler_file).read_text())
        except FileNotFoundError:
            return None
        return info
    info = await wait_until(scheduler_file, 20, "the scheduler file")
    assert info["address"].startswith("tcp://")

    name = identity(uid, "mpi-serve").job_name
    async with Client(info["address"], asynchronous=True) as client:
        await asyncio.wait_for(client.wait_for_workers(2), 20)
        workers = (await client.scheduler.identity())["workers"].values()
        assert sorted(w["name"] for w in workers) == [f"{name}-1", f"{name}-2"]
        assert await client.submit(sum, range(10)) == 45
        # The dashboard listens on a random port, beside the scheduler's.
        assert info["services"]["dashboard"] > 0

    await backend.cancel([job_id])
    job = await ended(backend, job_id)
    assert job.state is JobState.CANCELLED, job
    assert live_slurm_jobs(uid) == []


# --- local backend: no batch system -----------------------------------------------------------

async def test_local_backend_runs_the_same_allocation(staging: Path, uid: str,
                                                      tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "state")
    client = client_command(staging, 3)
    request = render_allocation(context("local", staging), identity(uid, "mpi-local"),
                                TEMPLATE, 2, client)
    job_id = await backend.submit(request)
    job = await ended(backend, job_id)
    try:
        assert job.state is JobState.FAILED and job.exit_code == 3, (job, logs(request))
        assert Path(client.exit_code_file).read_text().strip() == "3"
        assert "result 45" in Path(client.output_file).read_text()
    finally:
        await backend.cancel([job_id])
        await backend.shutdown()


async def test_local_clientless_allocation_ends_on_cancel(staging: Path, uid: str,
                                                          tmp_path: Path) -> None:
    """Cancelling signals the job's process group: mpiexec, every rank and the nannies'
    worker processes all end, so the job settles as CANCELLED."""
    backend = LocalBackend(tmp_path / "state")
    ctx = context("local", staging)
    request = render_allocation(ctx, identity(uid, "mpi-local-serve"), TEMPLATE, 2, None)
    job_id = await backend.submit(request)
    try:
        async def scheduler_up() -> bool:
            return Path(ctx.scheduler_file).exists()
        await wait_until(scheduler_up, 20, "the scheduler file")
        info = json.loads(Path(ctx.scheduler_file).read_text())
        async with Client(info["address"], asynchronous=True) as client:
            await asyncio.wait_for(client.wait_for_workers(2), 20)
    finally:
        await backend.cancel([job_id])
    job = await ended(backend, job_id)
    assert job.state is JobState.CANCELLED, (job, logs(request))
    await backend.shutdown()


# --- hpc_bridge.mpi_entry on its own ----------------------------------------------------------

def entry(*args: str, ranks: int | None = None, timeout: float = 30,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    launcher = [MPIEXEC, "-launcher", "fork", "-n", str(ranks)] if ranks else []
    return subprocess.run([*launcher, sys.executable, "-m", "hpc_bridge.mpi_entry", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize(("client", "needed"), [(False, 2), (True, 3)])
def test_single_rank_says_it_needs_a_launcher(tmp_path: Path, client: bool,
                                              needed: int) -> None:
    args = ["--scheduler-file", str(tmp_path / "s.json"), "--name", "n"]
    if client:
        args += ["--output-file", str(tmp_path / "o"), "--exit-code-file",
                 str(tmp_path / "e"), "--", "true"]
    out = entry(*args)
    assert out.returncode == 2
    assert f"needs at least {needed} MPI ranks" in out.stderr
    assert "mpiexec" in out.stderr
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "e").exists()


def test_a_failing_rank_aborts_the_others(tmp_path: Path) -> None:
    """Workers that cannot start (an unknown worker class) take the whole world down at
    once rather than leaving the scheduler and client waiting."""
    out = entry("--scheduler-file", str(tmp_path / "s.json"), "--name", "n",
                "--worker-class", "no_such_module.Worker",
                "--output-file", str(tmp_path / "o"), "--exit-code-file", str(tmp_path / "e"),
                "--", sys.executable, "-c", "import time; time.sleep(60)",
                ranks=3, timeout=30, cwd=tmp_path)
    assert out.returncode != 0
    assert "no_such_module" in out.stderr and "MPI_Abort" in out.stderr
