"""Helpers shared by test modules (importable because tests/ is on pythonpath)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

def slurm_problem() -> str | None:
    """Why SLURM cannot be used here, or None when a node is up and idle."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM clients are not installed (run scripts/slurm-up.sh as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is slurmctld running? (scripts/slurm-up.sh)"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated")
                                      for s in states):
        return f"no usable SLURM node (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


async def wait_until(check: Callable[[], Awaitable[T | None]], timeout: float,
                     what: str, interval: float = 0.5) -> T:
    """Poll an async condition until it returns a truthy value; fail with `what`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def live_slurm_jobs(uid: str) -> list[str]:
    """Our jobs for this owner that squeue still shows as not finished."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%k"],
                         capture_output=True, text=True, check=True).stdout
    live = []
    for line in out.splitlines():
        job_id, state, comment = line.split("|", 2)
        if uid in comment and state in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            live.append(job_id)
    return live
