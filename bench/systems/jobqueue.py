"""(c) The baseline: dask-jobqueue's SLURMCluster on the same SLURM, same worker shape.

"Requested" is the construction of the SLURMCluster (its scheduler starts in this
process, not as a SLURM job) followed at once by `scale(N)`: N worker jobs, one sbatch
each. Deletion is `close()`: the scheduler tells the workers to close, and each job is
scancel'ed (one scancel per job).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

from dask_jobqueue.slurm import SLURMCluster

from ..common import PARTITION, WALLTIME, WORKER_CORES, WORKER_MEMORY
from . import JOBQUEUE

CLOSE_TIMEOUT_S = 120.0


async def start_cluster(job_name: str, log_dir: Path) -> Any:
    """A SLURMCluster of the benchmark's worker shape (1 core, 1 GiB, 10 min, debug)."""
    return await SLURMCluster(
        queue=PARTITION, cores=WORKER_CORES, processes=1, memory=WORKER_MEMORY,
        walltime=WALLTIME, job_name=job_name, python=sys.executable,
        log_directory=str(log_dir), scheduler_options={"dashboard_address": ":0"},
        asynchronous=True, silence_logs=logging.getLogger("distributed").getEffectiveLevel())


async def scale(cluster: Any, n: int) -> None:
    scaled = cluster.scale(n)
    if inspect.isawaitable(scaled):
        await scaled


class JobqueueLaunch:
    system = JOBQUEUE

    def __init__(self, n: int, job_name: str, log_dir: Path) -> None:
        self.n = n
        self.job_name = job_name
        self.log_dir = log_dir
        self.cluster: Any = None
        self.closing: asyncio.Future[Any] | None = None

    async def request(self) -> None:
        self.cluster = await start_cluster(self.job_name, self.log_dir)
        await scale(self.cluster, self.n)

    async def address(self, timeout: float) -> str:
        return str(self.cluster.scheduler_address)

    async def reported_ready(self, timeout: float) -> bool:
        return False

    async def delete(self) -> None:
        self.closing = asyncio.ensure_future(self.cluster.close())

    async def released(self, timeout: float) -> None:
        assert self.closing is not None
        await asyncio.wait_for(asyncio.shield(self.closing), timeout)

    def owns(self, name: str, comment: str) -> bool:
        return name == self.job_name

    async def close(self) -> list[str]:
        if self.cluster is None:
            return []
        try:
            if self.closing is None:
                await self.delete()
            await self.released(CLOSE_TIMEOUT_S)
        except Exception as exc:
            return [f"SLURMCluster.close(): {type(exc).__name__}: {exc}"]
        return []
