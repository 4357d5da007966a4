"""Section 1, time to ready: from "cluster requested" to N workers connected, N = 1, 8, 16,
for four systems side by side in one process, interleaved (the order of the systems
rotates from one size and repetition to the next, so that a drift of the shared machine's
load does not always favour the same one). Each cluster is then torn down under the
clock of section 4 (bench.teardown).

The clock, for every system: `time.monotonic()` just before the request, and just after
`Client.wait_for_workers(N)` (the Dask scheduler counts N running workers; it asks every
0.1 s) returns on a client connected to the address the system gave. What lies between:

* operator (dask-hpc up), (a): the first Session.step() validates the manifest, polls
  squeue, submits the scheduler job (sbatch) and the N workers as ONE job array (sbatch);
  SLURM starts them; the scheduler's Python starts and writes its scheduler file, the
  workers' Pythons (nanny + worker each) wait for that file and connect; meanwhile the
  operator steps every 0.5 s and publishes status.schedulerAddress once squeue shows the
  scheduler job RUNNING (polled at most every minPollInterval = 0.5 s here) and the
  scheduler answers `identity`. The bench reads the status every 0.1 s. So the clock
  includes the scheduler being a SLURM job (queueing, start, Python start-up), and up to
  one step plus one poll of the operator's latency before the address is known.
* operator (kopf + API), (b): the same, except that the request is the API call that
  creates the DaskCluster, kopf reconciles on the watch event and then on a 1 s timer,
  and the bench reads the status through the API every 0.1 s. The kopf operator and the
  emulator run in this process (kopf in its own thread) and were started before the run.
* dask-jobqueue, (c): constructing SLURMCluster starts its scheduler in THIS process
  (no SLURM job, no file to wait for), then scale(N) submits N jobs (N sbatch).
* floor, (d): an in-process scheduler, then N worker processes spawned directly.

So (c) and (d) start their scheduler in-process while (a) and (b) start it as a SLURM job:
that difference is part of what the operator/jobqueue ratio measures, by design (it is
how each system works). All Python start-ups compete for the same 2 cores: with N = 16,
33 Python processes (16 nannies, 16 workers, a scheduler) start at once.

Also recorded: `address_s` (when the client could connect) and `reported_s` (when the
operator's own status says N workers ready, what `kubectl get` or `up` shows), and the
batch commands run between request and ready (bench.counting).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes
from distributed import Client

from dask_hpc_operator.site_config import SiteConfig

from .common import (
    READY_TIMEOUT_S,
    RunTag,
    cancel_jobs,
    format_calls,
    live_jobs,
    other_live_jobs,
    wait_jobs_gone,
)
from .counting import CallCounter
from .systems import EMBEDDED, FLOOR, JOBQUEUE, KOPF, Launch
from .systems.embedded import EmbeddedLaunch
from .systems.floor import FloorLaunch
from .systems.jobqueue import JobqueueLaunch
from .systems.kopf_api import KopfLaunch
from .teardown import TeardownResult, time_teardown


@dataclass
class ReadyResult:
    system: str
    n: int
    rep: int
    cluster: str
    ready_s: float  # requested -> N workers connected (wait_for_workers returned)
    address_s: float  # requested -> the scheduler's address known to the client
    reported_s: float | None  # requested -> the operator's status says N ready
    calls: dict[str, int]  # batch commands from request to ready
    load_avg_1m: float  # at the request
    other_jobs: int  # live SLURM jobs not of this run, at the request
    notes: list[str] = field(default_factory=list)


@dataclass
class ReadyContext:
    tag: RunTag
    workdir: Path
    counter: CallCounter
    site: SiteConfig
    kube_api: kubernetes.client.CustomObjectsApi | None
    say: Callable[[str], None]


async def time_to_ready(launch: Launch, counter: CallCounter, rep: int, cluster: str,
                        other_jobs: int) -> ReadyResult:
    load = os.getloadavg()[0]
    before = counter.read()
    started = time.monotonic()
    await launch.request()
    address = await launch.address(READY_TIMEOUT_S)
    addressed = time.monotonic()
    left = READY_TIMEOUT_S - (addressed - started)
    async with Client(address, asynchronous=True, timeout="30s") as client:
        await client.wait_for_workers(launch.n, timeout=max(left, 1.0))
        ready = time.monotonic()
    calls = counter.since(before)
    reported = None
    if await launch.reported_ready(max(READY_TIMEOUT_S - (ready - started), 1.0)):
        reported = round(time.monotonic() - started, 3)
    return ReadyResult(launch.system, launch.n, rep, cluster, round(ready - started, 3),
                       round(addressed - started, 3), reported, calls, round(load, 2),
                       other_jobs)


def make_launch(system: str, n: int, rep: int, ctx: ReadyContext) -> tuple[Launch, str]:
    """A fresh cluster of `system` with a name unique in this run."""
    name = f"r{rep}-n{n}-{system}"
    if system == EMBEDDED:
        return EmbeddedLaunch(n, ctx.tag.namespace, name, ctx.site), name
    if system == KOPF:
        assert ctx.kube_api is not None
        return KopfLaunch(n, ctx.tag.namespace, name, ctx.kube_api), name
    if system == JOBQUEUE:
        job_name = f"{ctx.tag.namespace}-jq-r{rep}-n{n}"
        return JobqueueLaunch(n, job_name, ctx.workdir / "jobqueue-logs"), job_name
    return FloorLaunch(n, ctx.workdir / "floor-logs" / name), name


def rotated(systems: list[str], k: int) -> list[str]:
    k %= len(systems)
    return systems[k:] + systems[:k]


async def finish(launch: Launch) -> list[str]:
    """Close `launch` and make sure no job of it is left before the next one starts."""
    notes = await launch.close()
    left = await live_jobs(launch.owns)
    if left:
        notes.append(f"jobs left after the teardown, cancelled by the bench: {left}")
        await cancel_jobs(left)
        try:
            await wait_jobs_gone(launch.owns, 60.0, "leftover jobs to end")
        except TimeoutError as exc:
            notes.append(str(exc))
    return notes


async def run_one(system: str, n: int, rep: int, ctx: ReadyContext,
                  ready: list[ReadyResult], teardowns: list[TeardownResult],
                  failures: list[str]) -> None:
    launch, name = make_launch(system, n, rep, ctx)
    others = other_live_jobs(ctx.tag)
    line = f"  rep {rep} N={n:<2} {system:9}"
    result: ReadyResult | None = None
    try:
        result = await time_to_ready(launch, ctx.counter, rep, name, others)
        ready.append(result)
        line += (f" ready {result.ready_s:6.2f} s (address {result.address_s:5.2f} s"
                 + (f", status {result.reported_s:5.2f} s" if result.reported_s else "")
                 + f") calls {format_calls(result.calls)}")
        if system != FLOOR:
            down = await time_teardown(launch, ctx.counter, rep)
            teardowns.append(down)
            line += f"; teardown {down.gone_s:5.2f} s calls {format_calls(down.calls)}"
    except Exception as exc:
        failures.append(f"{system} N={n} rep {rep}: {type(exc).__name__}: {exc}")
        line += f" FAILED: {type(exc).__name__}: {exc}"
    finally:
        notes = await finish(launch)
        if result is not None:
            result.notes += notes
        elif notes:
            failures += notes
    ctx.say(line)


async def run_section(ctx: ReadyContext, systems: list[str], sizes: list[int], reps: int
                      ) -> tuple[list[ReadyResult], list[TeardownResult], list[str]]:
    ready: list[ReadyResult] = []
    teardowns: list[TeardownResult] = []
    failures: list[str] = []
    for rep in range(1, reps + 1):
        for i, n in enumerate(sizes):
            for system in rotated(systems, rep - 1 + i):
                await run_one(system, n, rep, ctx, ready, teardowns, failures)
                sys.stdout.flush()
                await asyncio.sleep(0)
    return ready, teardowns, failures
