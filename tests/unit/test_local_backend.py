"""hpc_bridge.backends.local: real processes under a temporary state directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from hpc_bridge.backends.local import KEEP_FINISHED_S, LocalBackend
from hpc_bridge.model import JobIdentity, JobRequest, JobState, ObservedJob, Role

TIMEOUT = 10.0


def request(tmp_path: Path, script: str, index: int = 0) -> JobRequest:
    identity = JobIdentity("default", "c1", "uid-1", Role.WORKER, "default", index)
    return JobRequest(identity, script + "\n", str(tmp_path / "logs"))


async def wait_for(backend: LocalBackend, job_id: str,
                   predicate: Callable[[ObservedJob], bool]) -> ObservedJob:
    """Poll until the job satisfies predicate (deadline loop, no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    last = None
    while loop.time() < deadline:
        last = {j.job_id: j for j in await backend.poll()}.get(job_id)
        if last is not None and predicate(last):
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never got there; last seen {last}")


def _kill_leftovers(jobs_dir: Path) -> None:
    """Kill the process groups of jobs these tests started (by their recorded pid)."""
    for pid_file in jobs_dir.glob("*/pid"):
        with contextlib.suppress(ValueError, IndexError, OSError):
            os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    backend = LocalBackend(tmp_path / "state")
    try:
        yield backend
    finally:
        _kill_leftovers(backend.jobs_dir)
        for child in backend._children.values():
            with contextlib.suppress(Exception):
                child.wait(timeout=5)
        # let the cancel grace tasks notice their processes are gone
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        if pending:
            await asyncio.wait(pending, timeout=5)


async def test_running_then_cancelled(backend: LocalBackend, tmp_path: Path) -> None:
    job_id = await backend.submit(request(tmp_path, "sleep 30"))
    job = await wait_for(backend, job_id, lambda j: True)
    assert job.state is JobState.RUNNING
    assert job.identity.job_name == "dask.default.c1.default.0"
    await backend.cancel([job_id])
    job = await wait_for(backend, job_id, lambda j: j.state is not JobState.ENDING)
    assert job.state is JobState.CANCELLED
    assert backend.calls["submit"] == 1
    assert backend.calls["cancel"] == 1


async def test_exit_code_is_failed(backend: LocalBackend, tmp_path: Path) -> None:
    job_id = await backend.submit(request(tmp_path, "exit 3"))
    job = await wait_for(backend, job_id, lambda j: j.state.terminal)
    assert job.state is JobState.FAILED
    assert job.exit_code == 3
    assert job.reason == "exit 3"


async def test_success_is_completed(backend: LocalBackend, tmp_path: Path) -> None:
    job_id = await backend.submit(request(tmp_path, "true"))
    job = await wait_for(backend, job_id, lambda j: j.state.terminal)
    assert job.state is JobState.COMPLETED
    assert job.exit_code == 0


async def test_output_goes_to_log_dir(backend: LocalBackend, tmp_path: Path) -> None:
    job_id = await backend.submit(request(tmp_path, 'echo "id=$DASK_HPC_JOB_ID"; echo oops >&2'))
    await wait_for(backend, job_id, lambda j: j.state.terminal)
    logs = tmp_path / "logs"
    assert (logs / f"dask.default.c1.default.0-{job_id}.out").read_text() == f"id={job_id}\n"
    assert (logs / f"dask.default.c1.default.0-{job_id}.err").read_text() == "oops\n"


async def test_job_ids_are_distinct(backend: LocalBackend, tmp_path: Path) -> None:
    ids = [await backend.submit(request(tmp_path, "true", index=i)) for i in range(3)]
    assert ids == ["1", "2", "3"]
    for job_id in ids:
        await wait_for(backend, job_id, lambda j: j.state.terminal)


async def test_restart_adopts_running_job(backend: LocalBackend, tmp_path: Path) -> None:
    job_id = await backend.submit(request(tmp_path, "sleep 30"))
    await wait_for(backend, job_id, lambda j: j.state is JobState.RUNNING)
    # A new backend on the same state directory: what an operator restart sees.
    restarted = LocalBackend(tmp_path / "state")
    jobs = await restarted.poll()
    assert [(j.job_id, j.state) for j in jobs] == [(job_id, JobState.RUNNING)]
    assert jobs[0].identity == request(tmp_path, "").identity
    await restarted.cancel([job_id])
    await wait_for(restarted, job_id, lambda j: not j.state.live)
    # The wrapper is a child of this test process (of the first backend), so only that one
    # can reap it; after a real restart the old operator is gone and init reaps it.
    job = await wait_for(backend, job_id, lambda j: j.state is not JobState.ENDING)
    assert job.state is JobState.CANCELLED


async def test_cancel_unknown_or_finished_is_harmless(backend: LocalBackend,
                                                      tmp_path: Path) -> None:
    job_id = await backend.submit(request(tmp_path, "true"))
    await wait_for(backend, job_id, lambda j: j.state.terminal)
    await backend.cancel([job_id, "999", "../etc"])
    (job,) = await backend.poll()
    assert job.state is JobState.COMPLETED


async def test_foreign_and_half_created_dirs_are_ignored(backend: LocalBackend) -> None:
    (backend.jobs_dir / "50").mkdir()  # no identity yet
    (backend.jobs_dir / "51").mkdir()
    (backend.jobs_dir / "51" / "identity").write_text("(null)")
    assert await backend.poll() == []


async def test_finished_jobs_expire(backend: LocalBackend, tmp_path: Path) -> None:
    job_id = await backend.submit(request(tmp_path, "true"))
    await wait_for(backend, job_id, lambda j: j.state.terminal)
    old = time.time() - KEEP_FINISHED_S - 10
    os.utime(backend.jobs_dir / job_id / "exit", (old, old))
    assert await backend.poll() == []


SUBREAPER_SCRIPT = """
import asyncio, ctypes, os, shlex, sys, time
from hpc_bridge.backends.local import LocalBackend
from hpc_bridge.model import JobIdentity, JobRequest, Role

# Like an operator that is PID 1 of its container (no init): orphans are re-parented to
# this process, which does not reap them.
assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
ident = JobIdentity("default", "c1", "uid-1", Role.WORKER, "default", 0)
marker = os.path.join(sys.argv[1], "started")
script = f"sleep 30 &\\necho ok > {shlex.quote(marker)}\\nwait\\n"

async def main():
    backend = LocalBackend(sys.argv[1])
    job_id = await backend.submit(JobRequest(ident, script, sys.argv[1]))
    deadline = time.monotonic() + 5
    while not os.path.exists(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await backend.cancel([job_id])
    deadline = time.monotonic() + 2
    state = "ENDING"
    while state == "ENDING" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        state = (await backend.poll())[0].state.value
    print(state)

asyncio.run(main())
"""


def test_cancelled_job_settles_without_an_init_reaper(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", SUBREAPER_SCRIPT, str(tmp_path)],
                            capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "CANCELLED"
