"""Section 4, teardown: from "delete" until squeue shows no job of the cluster.

Measured on the clusters section 1 has just brought up (so every one of them has its
scheduler and N workers running; the table reports N = 16, the JSON every N), for the
systems that have batch jobs:

* operator (dask-hpc up): the clock starts when the DaskCluster is marked deleted in the
  running Session; its next step (<= 0.5 s) runs `Runtime.end_jobs`: squeue, ONE scancel
  of every live job (scheduler and the workers' array tasks), squeue again; the object is
  dropped once no job of it is unfinished.
* operator (kopf + API): the clock starts with the API's delete call; kopf's finalizer
  runs the same teardown (retrying every 2 s) and then releases the object.
* dask-jobqueue: the clock starts with `SLURMCluster.close()`: retire the workers through
  the in-process scheduler, one scancel per job, close the scheduler.

Stop: the bench's own squeue (the real binary, every SQUEUE_POLL_S) lists no job of the
cluster in any unfinished state (PENDING, RUNNING, COMPLETING...). A cancelled job stays
COMPLETING until SLURM has seen its processes end, so the clock includes the workers'
own shutdown. Also recorded: `released_s`, when the system itself says it is done (the
Session dropped the object, the API no longer has it, close() returned), and the batch
commands run from the delete until both moments.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from .common import TEARDOWN_TIMEOUT_S, wait_jobs_gone
from .counting import CallCounter
from .systems import Launch


@dataclass
class TeardownResult:
    system: str
    n: int
    rep: int
    gone_s: float  # delete -> squeue shows no unfinished job of the cluster
    released_s: float  # delete -> the system says the cluster is gone
    calls: dict[str, int]  # batch commands from the delete until both moments
    notes: list[str] = field(default_factory=list)


async def _stamp(done: Awaitable[None]) -> float:
    await done
    return time.monotonic()


async def time_teardown(launch: Launch, counter: CallCounter, rep: int) -> TeardownResult:
    before = counter.read()
    started = time.monotonic()
    await launch.delete()
    gone, released = await asyncio.gather(
        wait_jobs_gone(launch.owns, TEARDOWN_TIMEOUT_S, f"{launch.system}: jobs gone"),
        _stamp(launch.released(TEARDOWN_TIMEOUT_S)))
    return TeardownResult(launch.system, launch.n, rep, round(gone - started, 3),
                          round(released - started, 3), counter.since(before))
