"""(d) The floor: N `dask worker` processes started directly against a scheduler, no batch
system at all. What is left is the Dask start-up itself on this machine.

"Requested" is the start of an in-process scheduler (as dask-jobqueue's), then N worker
processes with the same command line dask-jobqueue's job scripts run (`python -m
distributed.cli.dask_worker ADDRESS --nthreads 1 --memory-limit 1.00GiB --nanny
--death-timeout 60`), all spawned at once. Deletion terminates them (no jobs to measure).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from distributed import Scheduler

from . import FLOOR

STOP_TIMEOUT_S = 20.0


class FloorLaunch:
    system = FLOOR

    def __init__(self, n: int, log_dir: Path) -> None:
        self.n = n
        self.log_dir = log_dir
        self.scheduler: Any = None
        self.procs: list[asyncio.subprocess.Process] = []

    async def request(self) -> None:
        self.scheduler = await Scheduler(port=0, dashboard_address=":0")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            with open(self.log_dir / f"floor-{i}.log", "ab") as log:
                self.procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "distributed.cli.dask_worker",
                    self.scheduler.address, "--name", f"floor-{i}", "--nthreads", "1",
                    "--memory-limit", "1.00GiB", "--nanny", "--death-timeout", "60",
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log))

    async def address(self, timeout: float) -> str:
        return str(self.scheduler.address)

    async def reported_ready(self, timeout: float) -> bool:
        return False

    async def delete(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()

    async def released(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.procs)), timeout)

    def owns(self, name: str, comment: str) -> bool:
        return False

    async def close(self) -> list[str]:
        notes: list[str] = []
        await self.delete()
        try:
            await self.released(STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            notes.append("floor workers did not stop on SIGTERM; killed")
            for proc in self.procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in self.procs))
        if self.scheduler is not None:
            with contextlib.suppress(Exception):
                await self.scheduler.close()
            self.scheduler = None
        return notes
