"""Section 2, control-plane calls: how many sbatch, squeue, scancel (and sacct) a system
runs for a scale-up 0 -> N, for a teardown, and per poll period while M clusters idle.

Counted by the wrappers of bench.counting (the same count for the operator and for
dask-jobqueue). The operator runs as `dask-hpc up` does (bench.systems.embedded: one
Session, one step every 0.5 s) with the product's default periods: minPollInterval 2 s
(the poll period: the shortest time between two batch-system queries, shared by every
cluster of the operator) and pollInterval 5 s.

The design, and why: 50 live clusters would mean 50 Dask schedulers (and their workers)
on a 2-core machine shared with other work, which would measure the machine rather than
the control plane. What the control plane does depends only on what squeue reports, not
on whether the processes run, so every job of this section is submitted HELD (the sbatch
wrapper adds `--hold` here, and only here): SLURM accepts and queues it, squeue reports it
PENDING (reason JobHeldUser), and nothing starts. For the operator that is the state of a
cluster whose scheduler job waits in the queue, a real and common state (it is then
"Pending: scheduler job N is queued (JobHeldUser)"); it skips only what it would do with a
running scheduler, which is talk to it over Dask RPC, not to the batch system.

* scale-up 0 -> N: a cluster with replicas 0 (its scheduler job queued), then replicas
  set to N (what `kubectl scale` does). Counted from the change until the operator's
  status counts N pending workers, i.e. it has submitted them. dask-jobqueue: scale(N)
  on a SLURMCluster, counted until squeue lists its N jobs.
* teardown: the same cluster deleted, counted until the operator has dropped it (it
  confirms with squeue that no job is left); dask-jobqueue: close(), counted until it
  returned and squeue lists none of its jobs.
* idle: M = 1, 10, 50 clusters of replicas 0 in one operator, all settled (each one's
  scheduler job queued and seen by the operator), then an observation window of
  K + 1/2 poll periods that starts right after one of the operator's squeue calls: with
  one squeue per period the window holds exactly K of them. Reported per period. Then
  the M clusters are deleted at once and the teardown's calls counted. dask-jobqueue is
  not measured here: it never queries the batch system (it cannot tell a queued worker
  from a lost one), so it makes 0 calls per period whatever M.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dask_hpc_operator.embedded import Resource, Session
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig

from .common import (
    STATUS_POLL_S,
    RunTag,
    cluster_manifest,
    format_calls,
    live_jobs,
    operator_owner,
    squeue_rows_async,
    wait_for,
    wait_jobs_gone,
)
from .counting import CallCounter
from .systems import EMBEDDED, JOBQUEUE
from .systems.embedded import Driver
from .systems.jobqueue import CLOSE_TIMEOUT_S, scale, start_cluster

SETTLE_TIMEOUT_S = 120.0


@dataclass
class ScaleCalls:
    system: str
    n: int
    scale_up: dict[str, int]
    scale_up_s: float
    teardown: dict[str, int]
    teardown_s: float
    notes: list[str] = field(default_factory=list)


@dataclass
class IdleCalls:
    m: int
    poll_period_s: float
    periods: int
    window_s: float
    calls: dict[str, int]  # in the window
    squeue_per_period: float
    steps: int  # Session steps in the window
    # this process's CPU per step in the window: the operator's loop, plus the bench's
    # own reading of the statuses and the counter file (small)
    cpu_ms_per_step: float
    teardown: dict[str, int]
    teardown_s: float
    notes: list[str] = field(default_factory=list)


def _queued(resource: Resource) -> bool:
    """The operator has seen its scheduler job in squeue (not just submitted it)."""
    return resource.status.get("phase") == "Pending" and "is queued" in str(
        resource.status.get("message", ""))


async def _settled(resources: list[Resource], what: str) -> None:
    async def all_queued() -> bool:
        return all(_queued(r) for r in resources)
    await wait_for(all_queued, SETTLE_TIMEOUT_S, what, STATUS_POLL_S)


async def _dropped(session: Session, resources: list[Resource], what: str) -> float:
    async def gone() -> float | None:
        left = [r for r in resources if r in session.resources]
        return None if left else time.monotonic()
    return await wait_for(gone, SETTLE_TIMEOUT_S, what, STATUS_POLL_S)


async def _stop(driver: Driver, session: Session, resources: list[Resource]) -> list[str]:
    """After an error: delete what is still there (the loop tears it down), then stop."""
    notes: list[str] = []
    if any(r in session.resources for r in resources) and driver.task is not None:
        for r in resources:
            r.deleting = True
        try:
            await _dropped(session, resources, "the teardown after an error")
        except Exception as exc:
            notes.append(f"{type(exc).__name__}: {exc}")
    return notes + await driver.stop() + driver.errors


def _owner_of(resources: list[Resource]) -> Callable[[str, str], bool]:
    owners = [operator_owner(r.manifest["metadata"]["namespace"], r.manifest["metadata"]["name"])
              for r in resources]
    return lambda name, comment: any(o(name, comment) for o in owners)


async def operator_scale(tag: RunTag, site: SiteConfig, counter: CallCounter,
                         n: int) -> ScaleCalls:
    resource = Resource(cluster_manifest(tag.namespace, f"calls-scale-n{n}", 0))
    resources = [resource]
    session = Session(Runtime(site), [resource])
    driver = Driver(session)
    owner = _owner_of(resources)
    notes: list[str] = []
    try:
        with counter.hold():
            driver.start()
            await _settled([resource], "the scheduler job queued and seen")
            before, started = counter.read(), time.monotonic()
            resource.manifest["spec"]["worker"]["replicas"] = n  # as EmbeddedStore.scale
            resource.manifest["metadata"]["generation"] += 1

            async def submitted() -> float | None:
                pending = (resource.status.get("workers") or {}).get("pending")
                return time.monotonic() if pending == n else None
            up_at = await wait_for(submitted, SETTLE_TIMEOUT_S, f"{n} workers submitted",
                                   STATUS_POLL_S)
            up = counter.since(before)
            before, deleted = counter.read(), time.monotonic()
            resource.deleting = True
            down_at = await _dropped(session, [resource], "the operator to drop the cluster")
            down = counter.since(before)
    finally:
        notes += await _stop(driver, session, resources)
        left = await live_jobs(owner)
        if left:
            notes.append(f"jobs left: {left}")
    return ScaleCalls(EMBEDDED, n, up, round(up_at - started, 3), down,
                      round(down_at - deleted, 3), notes)


async def jobqueue_scale(tag: RunTag, workdir: Path, counter: CallCounter,
                         n: int) -> ScaleCalls:
    job_name = f"{tag.namespace}-jq-calls-n{n}"
    notes: list[str] = []
    cluster: Any = None
    closed = False

    async def all_listed() -> float | None:
        rows = [r for r in await squeue_rows_async() if r.live and r.name == job_name]
        return time.monotonic() if len(rows) == n else None

    try:
        with counter.hold():
            cluster = await start_cluster(job_name, workdir / "jobqueue-logs")
            before, started = counter.read(), time.monotonic()
            await scale(cluster, n)
            up_at = await wait_for(all_listed, SETTLE_TIMEOUT_S,
                                   f"{n} jobqueue jobs in squeue", STATUS_POLL_S)
            up = counter.since(before)
            before, deleted = counter.read(), time.monotonic()
            await asyncio.wait_for(cluster.close(), CLOSE_TIMEOUT_S)
            closed = True
            down_at = await wait_jobs_gone(lambda name, _c: name == job_name,
                                           SETTLE_TIMEOUT_S, "jobqueue jobs gone")
            down = counter.since(before)
    finally:
        if cluster is not None and not closed:
            try:
                await asyncio.wait_for(cluster.close(), CLOSE_TIMEOUT_S)
            except Exception as exc:
                notes.append(f"close(): {type(exc).__name__}: {exc}")
    return ScaleCalls(JOBQUEUE, n, up, round(up_at - started, 3), down,
                      round(down_at - deleted, 3), notes)


async def operator_idle(tag: RunTag, site: SiteConfig, counter: CallCounter, m: int,
                        periods: int) -> IdleCalls:
    resources = [Resource(cluster_manifest(tag.namespace, f"calls-idle{m}-{i}", 0))
                 for i in range(m)]
    session = Session(Runtime(site), list(resources))
    driver = Driver(session)
    owner = _owner_of(resources)
    period = site.min_poll_interval
    notes: list[str] = []
    try:
        with counter.hold():
            driver.start()
            await _settled(resources, f"{m} scheduler jobs queued and seen")
            # Align: the window starts just after one of the operator's squeue calls.
            seen = counter.read()["squeue"]

            async def next_poll() -> bool:
                return counter.read()["squeue"] > seen
            await wait_for(next_poll, 3 * period + 5, "the operator's next squeue", 0.02)
            before, cpu, steps = counter.read(), time.process_time(), driver.steps
            window = (periods + 0.5) * period
            await asyncio.sleep(window)  # the observation window itself, not a wait
            calls = counter.since(before)
            cpu_used, steps_done = time.process_time() - cpu, driver.steps - steps
            before, deleted = counter.read(), time.monotonic()
            for r in resources:
                r.deleting = True
            down_at = await _dropped(session, resources, f"the operator to drop {m} clusters")
            down = counter.since(before)
    finally:
        notes += await _stop(driver, session, resources)
        left = await live_jobs(owner)
        if left:
            notes.append(f"jobs left: {left}")
    return IdleCalls(m, period, periods, round(window, 2), calls,
                     round(calls["squeue"] / periods, 3), steps_done,
                     round(1000 * cpu_used / max(steps_done, 1), 2), down,
                     round(down_at - deleted, 3), notes)


async def run_section(tag: RunTag, workdir: Path, counter: CallCounter, scale_n: int,
                      idle_m: list[int], periods: int, say: Callable[[str], None]
                      ) -> tuple[list[ScaleCalls], list[IdleCalls], list[str]]:
    site = SiteConfig(backend="slurm", staging_dir=str(workdir / "staging-calls"))
    site.check()
    scales: list[ScaleCalls] = []
    idles: list[IdleCalls] = []
    failures: list[str] = []
    for what, run in ((EMBEDDED, lambda: operator_scale(tag, site, counter, scale_n)),
                      (JOBQUEUE, lambda: jobqueue_scale(tag, workdir, counter, scale_n))):
        try:
            result = await run()
            scales.append(result)
            say(f"  scale-up 0->{scale_n} {what:9} {format_calls(result.scale_up)}; "
                f"teardown {format_calls(result.teardown)}")
        except Exception as exc:
            failures.append(f"scale-up calls, {what}: {type(exc).__name__}: {exc}")
            say(f"  scale-up 0->{scale_n} {what:9} FAILED: {exc}")
    for m in idle_m:
        try:
            idle = await operator_idle(tag, site, counter, m, periods)
            idles.append(idle)
            say(f"  idle M={m:<3} {idle.squeue_per_period:.2f} squeue per {idle.poll_period_s:g} s"
                f" period ({format_calls(idle.calls)} in {idle.window_s:g} s, {idle.steps} steps, "
                f"{idle.cpu_ms_per_step:.1f} ms CPU/step); teardown of {m}: "
                f"{format_calls(idle.teardown)} in {idle.teardown_s:.1f} s")
        except Exception as exc:
            failures.append(f"idle calls, M={m}: {type(exc).__name__}: {exc}")
            say(f"  idle M={m} FAILED: {exc}")
    return scales, idles, failures
