"""What every section shares: the workload, the run's identity on SLURM, waiting, statistics.

Why one module: the four sections must measure the same thing (a worker of 1 core and
1 GiB for 10 minutes on partition `debug`, a scheduler of 1 core and 1 GiB), tell their own
SLURM jobs from anybody else's (the machine and its SLURM are shared), and clean up the same
way. The bench's own squeue calls go to the real binary by absolute path, resolved before
bench.counting puts its counting wrappers first on PATH, so they are never counted as the
measured systems' calls.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dask_hpc_operator.constants import API_VERSION
from dask_hpc_operator.site_config import SiteConfig

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

PARTITION = "debug"
WALLTIME = "00:10:00"
WORKER_CORES = 1
WORKER_MEMORY = "1GiB"
SCHEDULER_SPEC: dict[str, Any] = {"cores": 1, "memory": "1GiB", "walltime": WALLTIME,
                                  "queue": PARTITION}

# The operator's periods in the ready/teardown runs (as bench/autoscale.py and the
# integration tests use); the production defaults are minPollInterval 2 s, pollInterval 5 s.
FAST_MIN_POLL_S = 0.5
FAST_POLL_S = 1.0

READY_TIMEOUT_S = 180.0
TEARDOWN_TIMEOUT_S = 120.0
STATUS_POLL_S = 0.1  # how often the bench reads an operator's status (wait_for_workers: 0.1 s)
SQUEUE_POLL_S = 0.1  # how often the bench asks squeue whether a cluster's jobs are gone

# squeue states of a job that has ended; anything else (PENDING, RUNNING, COMPLETING,
# CONFIGURING, SUSPENDED, REQUEUED...) is a job still there.
ENDED_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY",
                          "SPECIAL_EXIT", "REVOKED"})

SLURM_COMMANDS = ("sbatch", "squeue", "scancel", "sacct")


def _resolve() -> dict[str, str]:
    found = {}
    for name in SLURM_COMMANDS:
        path = shutil.which(name)
        if path is not None:
            found[name] = os.path.realpath(path)
    return found


# Resolved at import, before any wrapper directory is put on PATH.
REAL_BINARIES: dict[str, str] = _resolve()


@dataclass(frozen=True)
class RunTag:
    """This run's mark on SLURM: every operator job's comment holds the namespace
    `bench-<id>`, every dask-jobqueue job's name starts with `bench-<id>-`."""

    run_id: str

    @classmethod
    def new(cls) -> RunTag:
        return cls(uuid.uuid4().hex[:8])

    @property
    def namespace(self) -> str:
        return f"bench-{self.run_id}"

    def owns(self, name: str, comment: str) -> bool:
        return self.namespace in name or f":{self.namespace}:" in comment


@dataclass(frozen=True)
class SqueueRow:
    job_id: str
    state: str
    name: str
    comment: str

    @property
    def live(self) -> bool:
        return self.state not in ENDED_STATES


Owner = Callable[[str, str], bool]  # (job name, comment) -> is it one of ours


def operator_owner(namespace: str, cluster: str) -> Owner:
    """The jobs of one operator cluster, by the identity in their comment."""
    mark = f"dask-hpc:v1:{namespace}:{cluster}:"
    return lambda _name, comment: comment.startswith(mark)


def _squeue_argv() -> list[str]:
    return [REAL_BINARIES.get("squeue", "squeue"), "--noheader", "--states=all",
            "--format=%i|%T|%j|%k"]


def _parse_rows(out: str) -> list[SqueueRow]:
    rows = []
    for line in out.splitlines():
        parts = line.split("|", 3)
        if len(parts) == 4:
            rows.append(SqueueRow(parts[0].strip(), parts[1].strip(), parts[2].strip(),
                                  parts[3].strip()))
    return rows


def squeue_rows() -> list[SqueueRow]:
    """Every job squeue shows (blocking: for the start and the final cleanup)."""
    out = subprocess.run(_squeue_argv(), capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return _parse_rows(out)


async def squeue_rows_async() -> list[SqueueRow]:
    """Every job squeue shows, without blocking the event loop (the Dask clients, the
    Kubernetes emulator and the operator's own loop share it)."""
    proc = await asyncio.create_subprocess_exec(*_squeue_argv(),
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0:
        raise RuntimeError(f"squeue exited {proc.returncode}: {err.decode().strip()}")
    return _parse_rows(out.decode(errors="replace"))


async def live_jobs(owner: Owner) -> list[str]:
    return [r.job_id for r in await squeue_rows_async() if r.live and owner(r.name, r.comment)]


async def cancel_jobs(job_ids: list[str]) -> None:
    """scancel (the real binary, not counted) of these jobs."""
    if not job_ids:
        return
    proc = await asyncio.create_subprocess_exec(REAL_BINARIES.get("scancel", "scancel"),
                                                *job_ids, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    await asyncio.wait_for(proc.wait(), 60)


def live_jobs_of_run(tag: RunTag) -> list[str]:
    return [r.job_id for r in squeue_rows() if r.live and tag.owns(r.name, r.comment)]


def other_live_jobs(tag: RunTag) -> int:
    """Live jobs on the machine that are not this run's (other users of the shared SLURM)."""
    try:
        return sum(1 for r in squeue_rows() if r.live and not tag.owns(r.name, r.comment))
    except (OSError, subprocess.SubprocessError):
        return -1


def cancel_run_jobs(tag: RunTag) -> list[str]:
    """Last resort: cancel every live job of this run; returns what was cancelled."""
    try:
        ids = live_jobs_of_run(tag)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"could not list SLURM jobs to clean up: {exc}", file=sys.stderr)
        return []
    if ids:
        subprocess.run([REAL_BINARIES.get("scancel", "scancel"), *ids], capture_output=True,
                       text=True, timeout=60)
    return ids


def wait_run_jobs_gone(tag: RunTag, timeout: float) -> list[str]:
    """Blocking wait (for the final cleanup, after the event loop is gone) until no live
    job of the run is left; returns those still live at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = live_jobs_of_run(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def slurm_problem() -> str | None:
    missing = [c for c in ("sbatch", "squeue", "scancel") if c not in REAL_BINARIES]
    if missing:
        return f"the SLURM clients {', '.join(missing)} are not on PATH"
    out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True,
                         text=True, timeout=30)
    states = [s.rstrip("*~#") for s in out.stdout.split()]
    if out.returncode != 0 or not any(s in ("idle", "mixed", "allocated") for s in states):
        return f"no usable node in partition {PARTITION} (sinfo: {out.stdout or out.stderr})"
    return None


def slurm_version() -> str:
    try:
        return subprocess.run(["sinfo", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


async def wait_for(check: Callable[[], Awaitable[T | None]], timeout: float, what: str,
                   interval: float) -> T:
    """Ask `check` every `interval` until it returns something truthy; TimeoutError naming
    `what` (and the last answer) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {timeout:.0f} s (last: {last!r})")
        await asyncio.sleep(interval)


async def wait_jobs_gone(owner: Owner, timeout: float, what: str) -> float:
    """Until squeue shows no live job of `owner`; returns that moment (time.monotonic)."""
    async def gone() -> float | None:
        left = await live_jobs(owner)
        return None if left else time.monotonic()
    return await wait_for(gone, timeout, what, SQUEUE_POLL_S)


def site_config(workdir: Path, min_poll: float = FAST_MIN_POLL_S,
                poll: float = FAST_POLL_S) -> SiteConfig:
    site = SiteConfig(backend="slurm", staging_dir=str(workdir / "staging"),
                      python=sys.executable, min_poll_interval=min_poll, poll_interval=poll)
    site.check()
    return site


def cluster_manifest(namespace: str, name: str, replicas: int,
                     stamp: bool = True) -> dict[str, Any]:
    """A DaskCluster of the benchmark's workload. `stamp`: add the uid and generation an
    API server would (for the embedded Session; the emulator stamps its own)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if stamp:
        metadata.update(uid=str(uuid.uuid4()), generation=1)
    return {
        "apiVersion": API_VERSION, "kind": "DaskCluster", "metadata": metadata,
        "spec": {"backend": "slurm", "scheduler": dict(SCHEDULER_SPEC),
                 "worker": {"replicas": replicas, "cores": WORKER_CORES,
                            "memory": WORKER_MEMORY, "processes": 1, "walltime": WALLTIME,
                            "queue": PARTITION}},
    }


def spread(values: Iterable[float]) -> dict[str, float]:
    data = list(values)
    return {"median": round(statistics.median(data), 3), "min": round(min(data), 3),
            "max": round(max(data), 3), "n": len(data)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 3)


def format_calls(calls: dict[str, int]) -> str:
    """`sbatch=1 squeue=3` (commands with no call left out)."""
    return " ".join(f"{k}={v}" for k, v in calls.items() if v) or "none"
