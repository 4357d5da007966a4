"""The embedded default: the same job scripts, run as local processes.

Each job is a directory under the state directory holding its script, identity, pid and —
once it ends — its exit status. Jobs run in their own session (process group) so that they
outlive an operator restart exactly as batch jobs do, and are found again by `poll()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ..model import JobAccounting, JobIdentity, JobRequest, JobState, ObservedJob

# The wrapper is a constant: the script path and exit-file path arrive as positional
# arguments, never spliced into shell text.
_WRAPPER = 'bash "$1"; rc=$?; echo "$rc" > "$2.tmp" && mv "$2.tmp" "$2"; exit "$rc"'
KILL_GRACE_S = 5.0
KEEP_FINISHED_S = 300.0  # like SLURM's MinJobAge: finished jobs stay visible this long


def _proc_start_time(pid: int) -> str | None:
    """Start time of a live, non-zombie process (guards against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


class LocalBackend:
    kind = "local"
    supports_arrays = False  # every task is its own process anyway

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.jobs_dir = Path(state_dir) / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self.calls = {"submit": 0, "poll": 0, "cancel": 0}

    def _new_job_dir(self) -> tuple[str, Path]:
        existing = [int(p.name) for p in self.jobs_dir.iterdir() if p.name.isdigit()]
        n = max(existing, default=0) + 1
        while True:
            try:
                path = self.jobs_dir / str(n)
                path.mkdir()  # atomic: two submitters never share an id
                return str(n), path
            except FileExistsError:
                n += 1

    def task_job_id(self, job_id: str, index: int) -> str:
        raise NotImplementedError("the local backend has no arrays")

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        return [], sorted(set(indices))

    async def submit(self, request: JobRequest) -> str:
        self.calls["submit"] += 1
        job_id, job_dir = self._new_job_dir()
        os.makedirs(request.log_dir, exist_ok=True)
        script = job_dir / "script.sh"
        script.write_text(request.script)
        (job_dir / "identity").write_text(request.identity.comment())
        name = request.identity.job_name
        with open(Path(request.log_dir) / f"{name}-{job_id}.out", "ab") as out, \
                open(Path(request.log_dir) / f"{name}-{job_id}.err", "ab") as err:
            proc = subprocess.Popen(
                ["bash", "-c", _WRAPPER, "dask-hpc-local", str(script), str(job_dir / "exit")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=request.log_dir,
                start_new_session=True,
                env={**os.environ, "DASK_HPC_JOB_ID": job_id},
            )
        self._children[proc.pid] = proc
        (job_dir / "pid").write_text(f"{proc.pid} {_proc_start_time(proc.pid) or ''}")
        return job_id

    def _observe(self, job_dir: Path) -> ObservedJob | None:
        try:
            identity = JobIdentity.parse((job_dir / "identity").read_text())
        except OSError:
            return None  # being created right now
        if identity is None:
            return None
        job_id = job_dir.name
        exit_file = job_dir / "exit"
        # Local jobs never queue: the pid file is written as the process starts, and the
        # exit file (or the cancel marker) as it ends.
        started = _mtime(job_dir / "pid")
        if (job_dir / "cancelled").exists():
            if self._group_alive(job_dir):
                return ObservedJob(job_id, identity, JobState.ENDING, "cancelling",
                                   started_at=started)
            return ObservedJob(job_id, identity, JobState.CANCELLED, "cancelled",
                               started_at=started, ended_at=_mtime(job_dir / "cancelled"))
        if exit_file.exists():
            code = int(exit_file.read_text().strip() or -1)
            state = JobState.COMPLETED if code == 0 else JobState.FAILED
            return ObservedJob(job_id, identity, state, f"exit {code}", exit_code=code,
                               started_at=started, ended_at=_mtime(exit_file))
        if self._alive(job_dir):
            return ObservedJob(job_id, identity, JobState.RUNNING, started_at=started)
        return ObservedJob(job_id, identity, JobState.FAILED, "process vanished",
                           started_at=started)

    def _alive(self, job_dir: Path) -> bool:
        try:
            pid_text, _, started = (job_dir / "pid").read_text().partition(" ")
        except OSError:
            return True  # submit has not written the pid yet
        pid = int(pid_text)
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:  # reap our own children
            del self._children[pid]
            return False
        now = _proc_start_time(pid)
        return now is not None and (not started.strip() or now == started.strip())

    def _group_alive(self, job_dir: Path) -> bool:
        """Any live process left in the job's process group (a cancelled job is gone only
        then). Zombies do not count: where nothing reaps orphans (an operator that is PID 1
        of a container), they would keep a cancelled job ENDING forever."""
        self._alive(job_dir)  # reaps the wrapper if it is our child
        try:
            pgid = (job_dir / "pid").read_text().split()[0]
        except (OSError, IndexError):
            return False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            if fields[2] == pgid and fields[0] not in ("Z", "X"):
                return True
        return False

    async def poll(self) -> list[ObservedJob]:
        self.calls["poll"] += 1
        jobs = []
        for job_dir in self.jobs_dir.iterdir():
            job = self._observe(job_dir)
            if job is None:
                continue
            if job.state.terminal and self._expired(job_dir):
                continue
            jobs.append(job)
        return jobs

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        """What the job directories recorded: submitted when the script was written,
        started when the pid was, ended at the exit status or the cancel. Local jobs take
        what their request asked for, so cores and GPUs are left to the request."""
        found = {}
        for job in jobs:
            job_dir = self.jobs_dir / job.job_id
            observed = self._observe(job_dir) if job.job_id.isdigit() else None
            if observed is None:
                continue
            final = observed.state.terminal
            found[job.job_id] = JobAccounting(
                job.job_id, "local", observed.state.value, final=final,
                submitted_at=_mtime(job_dir / "script.sh"), started_at=observed.started_at,
                ended_at=observed.ended_at if final else None)
        return found

    @staticmethod
    def _expired(job_dir: Path) -> bool:
        marker = job_dir / "exit" if (job_dir / "exit").exists() else job_dir / "cancelled"
        try:
            return time.time() - marker.stat().st_mtime > KEEP_FINISHED_S
        except OSError:
            return False

    async def cancel(self, job_ids: Sequence[str]) -> None:
        self.calls["cancel"] += 1
        pids = []
        for job_id in job_ids:
            job_dir = self.jobs_dir / job_id
            if not job_dir.is_dir() or (job_dir / "exit").exists():
                continue
            (job_dir / "cancelled").touch()
            if self._alive(job_dir):
                pid = int((job_dir / "pid").read_text().split()[0])
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                pids.append(pid)
        if pids:
            asyncio.get_running_loop().create_task(self._kill_after_grace(pids))

    async def _kill_after_grace(self, pids: list[int]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KILL_GRACE_S
        while pids and loop.time() < deadline:
            pids = [p for p in pids if _proc_start_time(p) is not None
                    and (p not in self._children or self._children[p].poll() is None)]
            await asyncio.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    async def shutdown(self, timeout: float = KILL_GRACE_S + 2) -> None:
        """Wait for cancelled children to exit (used by `dask-hpc up` before it returns)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and any(c.poll() is None for c in self._children.values()):
            await asyncio.sleep(0.1)
