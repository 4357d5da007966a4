"""Autoscaling latency: this operator's DaskAutoscaler against dask-jobqueue's `adapt()`.

Both systems run the same workload on the same SLURM, interleaved in the same run:

* a burst of 40 tasks of 1 s each (a lambda, so that it travels by value) arrives at a
  cluster with 0 workers; bounds 0..4 workers of 1 core and 1 GiB each on partition `debug`
  (walltime 00:10:00); the scheduler's adaptive target with target duration 5 s decides how
  many workers are wanted; a scale-down needs 5 s of surplus in both systems
  (DaskAutoscaler `scaleDownDelay: 5`; `adapt(interval="1s", wait_count=5)`).
* operator: a DaskCluster with `replicas: 0` plus a DaskAutoscaler, held in the memory of
  `dask_hpc_operator.embedded.Session` (what `dask-hpc up` runs), one `Session.step()`
  every 0.5 s as `up` does, with a site config of minPollInterval 0.5 s and pollInterval
  1 s. Its scheduler is itself a SLURM job.
* dask-jobqueue: `SLURMCluster(...).adapt(minimum=0, maximum=4, interval="1s",
  wait_count=5, target_duration="5s")`; its scheduler and its Adaptive run in this process.

What is measured, from the client side for both (the scheduler's `identity` is asked every
0.1 s, so both are seen through the same window):

* burst -> ready: from just before the 40 tasks are submitted until the scheduler counts 4
  connected workers (burst -> first: until it counts 1);
* idle -> minimum: from the moment the last result has been gathered and the futures are
  released until the scheduler counts 0 workers (retired; the jobs' cancellation may end a
  moment later and is not waited for).

Each round creates a fresh cluster for each system, so that every round starts from the
same state: no worker, no job, and a scheduler that has not yet learnt the tasks' duration
(a reused scheduler would estimate the second burst from the first one's 1 s durations
rather than from the default guess). Scheduler start-up (a SLURM job for the operator, an
in-process one for jobqueue) is not part of the measured times. Within a round the order
of the two systems alternates (operator first in odd rounds, jobqueue first in even ones)
so that a drift of the machine's load does not always favour the same one, and each burst
starts 1-2 s (at random) after the cluster is ready, at a random phase of the scalers'
periodic loops (dask's Adaptive ticks every `interval` from the moment adapt() is called:
a burst sent right after it would always wait a whole tick).

How to read the output: per system, the median (and min..max) seconds over the rounds, and
the ratio operator / jobqueue of the medians (< 1: the operator is faster). Batch-system
calls are those made between the burst and the return to the minimum (the operator's
CommandRunner counters: squeue every reconcile that is due, one sbatch per scale-up — a job
array — and scancel; jobqueue's own sbatch / scancel calls; it never polls the queue).
The same numbers, the raw values per round, each round's scale decisions (seconds from the
burst: the DaskAutoscaler's status messages, the Adaptive's log) and the host's load at
the start of each round go to bench/results/autoscale.json.

The two scalers are not the same machine, and the numbers show where they differ:

* scale-up: both read the same `adaptive_target` (4 at once for this burst). adapt() calls
  sbatch from its tick (4 sbatch, one per worker); the autoscaler edits the DaskCluster's
  replicas, which its reconcile acts on at the next step (<= 0.5 s later), as one sbatch of
  a 4-task job array. After that, SLURM's start-up and the workers' own start dominate.
* scale-down: adapt() counts, per worker, consecutive ticks on which the scheduler would
  close it, and closes it at the `wait_count`-th: 5 ticks span 4 intervals, so 4-5 s after
  the last task. The autoscaler waits until the target has stayed below the replicas for
  a full `scaleDownDelay`, then shrinks to the highest target seen in that window; a window
  opened in the burst's tail (target 2-3 while the last tasks run) gives 4 -> 2 first and a
  second full delay for the rest (the ~11 s rounds; ~6 s otherwise). The retirement itself
  (through the scheduler, then scancel) adds ~0.5 s, a step, for the operator.

Run from the repository root: `.venv/bin/python bench/autoscale.py --rounds 3`. Every job
the run submits is cancelled at the end, also after an error, Ctrl-C or SIGTERM; a call
that hangs in a teardown is cut after a timeout and its stack goes to stderr and to the
round's `notes`; SIGUSR1 prints where every task waits. An interrupted run does not
overwrite the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import logging
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

from dask_jobqueue.slurm import SLURMCluster, SLURMJob
from distributed import Client

from dask_hpc_operator.embedded import LOOP_PERIOD_S, Resource, Session
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from hpc_bridge.backends.base import CommandRunner
from hpc_bridge.backends.slurm import SlurmBackend

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "bench" / "results" / "autoscale.json"

TASKS = 40
MINIMUM, MAXIMUM = 0, 4
TARGET_DURATION = "5s"
SCALE_DOWN_DELAY_S = 5
ADAPT_INTERVAL = "1s"
ADAPT_WAIT_COUNT = 5  # 5 consecutive 1 s ticks (4-5 s): the nearest to scaleDownDelay 5
PARTITION, WALLTIME, WORKER_MEMORY = "debug", "00:10:00", "1GiB"
CLIENT_POLL_S = 0.1
PHASE_TIMEOUT_S = 240.0
STEP_TIMEOUT_S = 30.0  # a reconcile pass, or stopping the loop, that takes longer is hung
TEARDOWN_TIMEOUT_S = 120.0

OPERATOR, JOBQUEUE = "operator", "jobqueue"
METRICS = ("burst_to_ready_s", "idle_to_minimum_s", "burst_to_first_s")
LIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
               "RESIZING", "SIGNALING", "STAGE_OUT")

# A lambda, so that it is pickled by value: the scheduler and the workers (SLURM jobs)
# cannot import this script, and dask pickles module-level functions by reference.
slow = lambda i: time.sleep(1.0) or i  # type: ignore[func-returns-value]  # noqa: E731

log = logging.getLogger("bench.autoscale")


@dataclass
class Owned:
    """What this run submitted, for the last-resort cleanup: operator cluster uids (in
    each job's comment) and jobqueue job names."""

    uids: set[str] = field(default_factory=set)
    job_names: set[str] = field(default_factory=set)


@dataclass
class RoundResult:
    system: str
    round: int
    burst_to_first_s: float
    burst_to_ready_s: float
    idle_to_minimum_s: float
    batch_calls: dict[str, int]  # between the burst and the return to the minimum
    batch_calls_round: dict[str, int]  # the whole round, start-up and teardown included
    tasks_done_at_s: float  # from the burst: the moment idle -> minimum starts
    scale_events: list[tuple[float, str]]  # (seconds from the burst, what the scaler did)
    load_avg_1m: float
    other_slurm_jobs: int  # live jobs on the machine, not ours, at the start of the round
    notes: list[str] = field(default_factory=list)


@dataclass
class Timing:
    """Moments of one burst (time.monotonic), plus the burst's wall-clock time to place
    the scalers' own logs."""

    started_wall: float
    started: float
    first: float
    ready: float
    idle: float
    minimum: float

    def events(self, wall_events: list[tuple[float, str]]) -> list[tuple[float, str]]:
        return [(round(t - self.started_wall, 2), what) for t, what in wall_events
                if t >= self.started_wall - 1.0]


# --- SLURM helpers -----------------------------------------------------------------------

def squeue_rows() -> list[tuple[str, str, str, str]]:
    """(job id, state, name, comment) of every job squeue shows."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%j|%k"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split("|", 3)
        if len(parts) == 4:
            rows.append((parts[0].strip(), parts[1].strip(), parts[2].strip(), parts[3]))
    return rows


def live_jobs(owned: Owned) -> list[str]:
    """Ids of our jobs that are not finished."""
    return [job_id for job_id, state, name, comment in squeue_rows()
            if state in LIVE_STATES
            and (name in owned.job_names or any(uid in comment for uid in owned.uids))]


def other_live_jobs(owned: Owned) -> int:
    return sum(1 for job_id, state, name, comment in squeue_rows()
               if state in LIVE_STATES and name not in owned.job_names
               and not any(uid in comment for uid in owned.uids))


def cancel_leftovers(owned: Owned) -> list[str]:
    """Cancel whatever of ours is still queued or running; returns what was cancelled."""
    try:
        ids = live_jobs(owned)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"could not list SLURM jobs to clean up: {exc}", file=sys.stderr)
        return []
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    return ids


def slurm_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return "the SLURM clients (sbatch, squeue) are not on PATH"
    out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True,
                         text=True, timeout=30)
    states = [s.rstrip("*~#") for s in out.stdout.split()]
    if out.returncode != 0 or not any(s in ("idle", "mixed", "allocated") for s in states):
        return f"no usable node in partition {PARTITION} (sinfo: {out.stdout or out.stderr})"
    return None


# --- measurement, the same for both systems ----------------------------------------------

async def connected_workers(client: Client) -> int:
    assert client.scheduler is not None
    info = await asyncio.wait_for(client.scheduler.identity(n_workers=0), 10)
    return int(info["n_workers"])


async def poll_workers(client: Client, done: Callable[[int], bool], what: str,
                       on_count: Callable[[int, float], None] | None = None) -> float:
    """Ask the scheduler every CLIENT_POLL_S until `done(workers)`; returns that moment."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while True:
        n = await connected_workers(client)
        now = time.monotonic()
        if on_count is not None:
            on_count(n, now)
        if done(n):
            return now
        if now > deadline:
            raise TimeoutError(f"{what}: still {n} workers after {PHASE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(CLIENT_POLL_S)


async def burst_then_idle(client: Client) -> Timing:
    """The burst, then idleness, as seen from the client."""
    if await connected_workers(client) != MINIMUM:
        await poll_workers(client, lambda n: n == MINIMUM, "settle at the minimum")
    # Both scalers act on a period (0.5 s steps, 1 s adapt ticks): start the burst at a
    # random phase of it, as a user would, rather than just after adapt() began ticking.
    await asyncio.sleep(random.uniform(1.0, 2.0))
    first: list[float] = []

    def see(n: int, now: float) -> None:
        if n >= 1 and not first:
            first.append(now)

    started_wall, started = time.time(), time.monotonic()
    futures = client.map(slow, range(TASKS), pure=False)
    ready = await poll_workers(client, lambda n: n >= MAXIMUM, f"{MAXIMUM} workers", see)
    results = await asyncio.wait_for(client.gather(futures), PHASE_TIMEOUT_S)
    del futures  # released: the scheduler forgets the tasks, the workers are idle
    idle = time.monotonic()
    if sorted(results) != list(range(TASKS)):
        raise RuntimeError(f"wrong results: {results!r}")
    minimum = await poll_workers(client, lambda n: n == MINIMUM, "back to the minimum")
    return Timing(started_wall, started, first[0], ready, idle, minimum)


def calls_since(now: collections.Counter[str], before: collections.Counter[str]
                ) -> dict[str, int]:
    return dict(sorted((now - before).items()))


def host_state(owned: Owned) -> tuple[float, int]:
    try:
        others = other_live_jobs(owned)
    except (OSError, subprocess.SubprocessError):
        others = -1
    return os.getloadavg()[0], others


def make_result(system: str, index: int, timing: Timing, measured: dict[str, int],
           whole: dict[str, int], events: list[tuple[float, str]], load: float, others: int,
           notes: list[str]) -> RoundResult:
    return RoundResult(system, index, round(timing.first - timing.started, 3),
                       round(timing.ready - timing.started, 3),
                       round(timing.minimum - timing.idle, 3), measured,
                       whole, round(timing.idle - timing.started, 2), events, load, others,
                       notes)


# --- the operator ------------------------------------------------------------------------

def cluster_manifest(name: str) -> dict[str, Any]:
    worker = {"replicas": 0, "cores": 1, "memory": WORKER_MEMORY, "processes": 1,
              "walltime": WALLTIME, "queue": PARTITION}
    return {
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
        "metadata": {"name": name, "namespace": "bench", "uid": str(uuid.uuid4()),
                     "generation": 1},
        "spec": {"backend": "slurm",
                 "scheduler": {"cores": 1, "memory": "1GiB", "walltime": WALLTIME,
                               "queue": PARTITION},
                 "worker": worker},
    }


def autoscaler_manifest(name: str, cluster: str) -> dict[str, Any]:
    return {
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskAutoscaler",
        "metadata": {"name": name, "namespace": "bench", "uid": str(uuid.uuid4()),
                     "generation": 1},
        "spec": {"cluster": cluster, "workerGroup": "default", "minimum": MINIMUM,
                 "maximum": MAXIMUM, "scaleDownDelay": SCALE_DOWN_DELAY_S},
    }


async def drive(session: Session, stop: asyncio.Event, errors: list[str],
                scaled: list[tuple[float, str]]) -> None:
    """What `dask-hpc up` does: one pass, then LOOP_PERIOD_S, until `stop`. Every scale
    decision of the autoscaler goes to `scaled` as (time.time(), its message). Stopped by
    the event rather than cancelled, so that no reconcile is cut in the middle."""
    last_scale: dict[str, Any] = {}
    while not stop.is_set():
        try:
            await session.step()
        except Exception as exc:  # a reconcile error must not stop the loop (kopf retries)
            errors.append(f"{type(exc).__name__}: {exc}")
            log.warning("reconcile failed: %s", exc)
        for r in session.resources:
            when = r.status.get("lastScaleTime")
            if r.kind == "DaskAutoscaler" and when and last_scale.get(r.key) != when:
                last_scale[r.key] = when
                scaled.append((time.time(), str(r.status.get("message"))))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), LOOP_PERIOD_S)


async def settle(task: asyncio.Future[Any], what: str, timeout: float,
                 notes: list[str]) -> bool:
    """Wait for `task` at most `timeout`; if it hangs, note where (its stack), cancel it and
    go on, so that a hung call cannot keep the cleanup from running."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done:
        if not task.cancelled() and task.exception() is not None:
            notes.append(f"{what} failed: {task.exception()!r}")
        return True
    stack = io.StringIO()
    if isinstance(task, asyncio.Task):
        task.print_stack(file=stack)
    note = f"{what} still running after {timeout:.0f} s, cancelled; it was at:\n" \
        + stack.getvalue()
    notes.append(note)
    print(f"WARNING: {note}", file=sys.stderr, flush=True)
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    return False


async def operator_teardown(session: Session, backend: SlurmBackend,
                            notes: list[str]) -> None:
    """Delete the objects as `up` does at exit: steps until no job of theirs is left."""
    for r in session.resources:
        r.deleting = True
    deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
    while session.resources and time.monotonic() < deadline:
        await settle(asyncio.ensure_future(session.step()), "a teardown step",
                     STEP_TIMEOUT_S, notes)
        if session.resources:
            await asyncio.sleep(1.0)
    if session.resources:
        notes.append(f"teardown not finished after {TEARDOWN_TIMEOUT_S:.0f} s: "
                     + ", ".join(r.key for r in session.resources))
    shutdown = getattr(backend, "shutdown", None)
    if shutdown is not None:
        await settle(asyncio.ensure_future(shutdown()), "backend shutdown", STEP_TIMEOUT_S,
                     notes)


async def operator_round(index: int, site: SiteConfig, owned: Owned) -> RoundResult:
    load, others = host_state(owned)
    runner = CommandRunner(timeout=site.command_timeout)
    backend = SlurmBackend(runner)
    runtime = Runtime(site, backends={"slurm": backend})
    name = f"bench-{index}"
    body = cluster_manifest(name)
    owned.uids.add(body["metadata"]["uid"])
    cluster = Resource(body)
    session = Session(runtime, [cluster, Resource(autoscaler_manifest(f"{name}-as", name))])
    errors: list[str] = []
    notes: list[str] = []
    scaled: list[tuple[float, str]] = []
    stop = asyncio.Event()
    stepper = asyncio.create_task(drive(session, stop, errors, scaled))
    try:
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while not cluster.status.get("schedulerAddress"):
            if cluster.status.get("phase") == "Failed" or time.monotonic() > deadline:
                raise RuntimeError(f"operator scheduler did not start: {cluster.status}")
            await asyncio.sleep(0.2)
        async with Client(cluster.status["schedulerAddress"], asynchronous=True) as client:
            before = collections.Counter(runner.calls)
            timing = await burst_then_idle(client)
            measured = calls_since(runner.calls, before)
    finally:
        stop.set()
        await settle(stepper, "the reconcile loop", STEP_TIMEOUT_S, notes)
        await operator_teardown(session, backend, notes)
    return make_result(OPERATOR, index, timing, measured,
                       calls_since(runner.calls, collections.Counter()), timing.events(scaled),
                       load, others, sorted(set(errors)) + notes)


# --- dask-jobqueue -----------------------------------------------------------------------

class CountingSLURMJob(SLURMJob):  # type: ignore[misc]
    """SLURMJob that counts its batch commands (sbatch, scancel) as CommandRunner does."""

    calls: collections.Counter[str] = collections.Counter()

    @staticmethod
    async def _call(cmd: list[str], *, shell: bool = False, **kwargs: Any) -> str:
        CountingSLURMJob.calls[os.path.basename(cmd[0])] += 1
        return str(await SLURMJob._call(cmd, shell=shell, **kwargs))


async def jobqueue_round(index: int, workdir: Path, job_name: str,
                         owned: Owned) -> RoundResult:
    load, others = host_state(owned)
    notes: list[str] = []
    owned.job_names.add(job_name)
    start = collections.Counter(CountingSLURMJob.calls)
    cluster = await SLURMCluster(
        job_cls=cast(Any, CountingSLURMJob), queue=PARTITION, cores=1, processes=1,
        memory=WORKER_MEMORY, walltime=WALLTIME, job_name=job_name, python=sys.executable,
        log_directory=str(workdir / "jobqueue-logs"),
        scheduler_options={"dashboard_address": ":0"}, asynchronous=True,
        silence_logs=logging.getLogger("distributed").getEffectiveLevel())
    try:
        adaptive = cluster.adapt(minimum=MINIMUM, maximum=MAXIMUM, interval=ADAPT_INTERVAL,
                                 wait_count=ADAPT_WAIT_COUNT, target_duration=TARGET_DURATION)
        async with Client(cluster, asynchronous=True) as client:
            before = collections.Counter(CountingSLURMJob.calls)
            timing = await burst_then_idle(client)
            measured = calls_since(CountingSLURMJob.calls, before)
        scaled = [(t, f"up to {rec['n']}" if rec.get("status") == "up"
                   else f"down: close {len(rec.get('workers', ()))} worker(s)")
                  for t, rec in adaptive.log]
    finally:
        closing = cluster.close()
        if closing is not None:
            await settle(asyncio.ensure_future(closing), "SLURMCluster.close()",
                         TEARDOWN_TIMEOUT_S, notes)
    return make_result(JOBQUEUE, index, timing, measured,
                       calls_since(CountingSLURMJob.calls, start), timing.events(scaled), load,
                       others, notes)


# --- the run -----------------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results: list[RoundResult]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for system in (OPERATOR, JOBQUEUE):
        mine = [r for r in results if r.system == system]
        if not mine:
            continue
        calls: dict[str, float] = {}
        for command in sorted({c for r in mine for c in r.batch_calls}):
            calls[command] = statistics.median(r.batch_calls.get(command, 0) for r in mine)
        summary[system] = {"rounds": len(mine),
                           **{m: spread([getattr(r, m) for r in mine]) for m in METRICS},
                           "batch_calls_median": calls}
    ratios = {}
    if OPERATOR in summary and JOBQUEUE in summary:
        for m in METRICS:
            jq = summary[JOBQUEUE][m]["median"]
            ratios[m] = round(summary[OPERATOR][m]["median"] / jq, 3) if jq > 0 \
                else float("nan")
    return {"summary": summary, "ratios_operator_over_jobqueue": ratios}


def table(report: dict[str, Any]) -> str:
    summary, ratios = report["summary"], report["ratios_operator_over_jobqueue"]
    labels = {"burst_to_ready_s": f"burst -> {MAXIMUM} ready",
              "idle_to_minimum_s": f"idle -> {MINIMUM} workers",
              "burst_to_first_s": "burst -> 1st worker"}

    def cell(system: str, metric: str) -> str:
        if system not in summary:
            return "-"
        s = summary[system][metric]
        return f"{s['median']:6.2f} s [{s['min']:.2f}..{s['max']:.2f}]"

    lines = [f"{'median [min..max]':22} {'operator':>24} {'dask-jobqueue adapt':>24} "
             f"{'op/jq':>7}"]
    for m in METRICS:
        ratio = f"{ratios[m]:7.2f}" if m in ratios else f"{'-':>7}"
        lines.append(f"{labels[m]:22} {cell(OPERATOR, m):>24} {cell(JOBQUEUE, m):>24} "
                     f"{ratio}")
    for system, title in ((OPERATOR, "operator"), (JOBQUEUE, "jobqueue")):
        if system in summary:
            calls = ", ".join(f"{c} {n:g}" for c, n in
                              summary[system]["batch_calls_median"].items()) or "none"
            lines.append(f"batch calls burst..minimum, median per round, {title}: {calls}")
    return "\n".join(lines)


def slurm_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["sinfo", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    return "?"


async def run(rounds: int, workdir: Path, owned: Owned, run_id: str,
              results: list[RoundResult]) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    site = SiteConfig(backend="slurm", staging_dir=str(workdir / "staging"),
                      python=sys.executable, min_poll_interval=0.5, poll_interval=1.0)
    site.check()
    for index in range(1, rounds + 1):
        order = (OPERATOR, JOBQUEUE) if index % 2 else (JOBQUEUE, OPERATOR)
        for system in order:
            print(f"round {index}/{rounds}: {system} ...", flush=True)
            if system == OPERATOR:
                result = await operator_round(index, site, owned)
            else:
                result = await jobqueue_round(index, workdir, f"bench-jq-{run_id}-{index}",
                                              owned)
            results.append(result)
            print(f"  burst -> first {result.burst_to_first_s:.2f} s, -> {MAXIMUM} ready "
                  f"{result.burst_to_ready_s:.2f} s; idle -> {MINIMUM} workers "
                  f"{result.idle_to_minimum_s:.2f} s; batch calls {result.batch_calls}"
                  + ("; notes: " + " | ".join(n.splitlines()[0] for n in result.notes)
                     if result.notes else ""), flush=True)
            print("  scaling (s from the burst; tasks done at "
                  f"{result.tasks_done_at_s:.2f}): "
                  + "; ".join(f"{t:.2f} {what}" for t, what in result.scale_events), flush=True)
            if live_jobs(owned):  # a job still ending must not load the next round
                await asyncio.sleep(2.0)
                cancelled = cancel_leftovers(owned)
                if cancelled:
                    note = f"jobs left after the teardown, cancelled by the bench: {cancelled}"
                    result.notes.append(note)
                    print(f"  WARNING: {note}", file=sys.stderr, flush=True)
                for _ in range(60):
                    if not live_jobs(owned):
                        break
                    await asyncio.sleep(1.0)


def dump_tasks() -> None:
    """SIGUSR1: where every task of the run waits (for a run that seems stuck)."""
    print(f"==== tasks at {datetime.now().strftime('%X')}", file=sys.stderr)
    for task in asyncio.all_tasks():
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per system (default 3)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"JSON results (default {DEFAULT_OUTPUT.relative_to(REPO)})")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' logs")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        for name in ("distributed", "dask_jobqueue", "dask_hpc_operator", "hpc_bridge",
                     "asyncio"):
            # Closing a cluster logs the cancelled comms of retired workers as errors.
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # dask_jobqueue (its runner module) makes SIGINT a bare sys.exit() at import, which
    # would skip the teardown below: give Ctrl-C back to asyncio, which cancels the run.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    problem = slurm_problem()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2

    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"dask-hpc-bench-{run_id}-"))
    owned = Owned()
    results: list[RoundResult] = []
    started = time.monotonic()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    code = 0
    try:
        asyncio.run(run(args.rounds, workdir, owned, run_id, results))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: cleaning up", file=sys.stderr)
        code = 130
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        cancelled = cancel_leftovers(owned)
        if cancelled:
            print(f"cancelled leftover jobs: {' '.join(cancelled)}", file=sys.stderr)
        deadline = time.monotonic() + 60
        while live_jobs(owned) and time.monotonic() < deadline:
            time.sleep(1.0)
        left = live_jobs(owned)
        if left:
            print(f"WARNING: SLURM jobs still live: {' '.join(left)}", file=sys.stderr)
            code = code or 1
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    if not results:
        return code or 1

    report = summarize(results)
    print()
    print(table(report))
    print(f"total {total:.0f} s for {args.rounds} round(s); no SLURM job of this run left: "
          f"{not left}")
    document = {
        "benchmark": "autoscale", "host": socket.gethostname(), "date": date,
        "rounds": args.rounds, "total_s": round(total, 1),
        "workload": {"tasks": TASKS, "task_s": 1.0, "minimum": MINIMUM, "maximum": MAXIMUM,
                     "worker": {"cores": 1, "memory": WORKER_MEMORY, "partition": PARTITION,
                                "walltime": WALLTIME},
                     "target_duration": TARGET_DURATION,
                     "scale_down_delay_s": SCALE_DOWN_DELAY_S,
                     "operator": {"step_period_s": LOOP_PERIOD_S, "min_poll_interval_s": 0.5,
                                  "poll_interval_s": 1.0},
                     "jobqueue": {"interval": ADAPT_INTERVAL, "wait_count": ADAPT_WAIT_COUNT},
                     "client_poll_s": CLIENT_POLL_S},
        "versions": {"python": platform.python_version(),
                     "distributed": version("distributed"),
                     "dask_jobqueue": version("dask-jobqueue"), "slurm": slurm_version()},
        **report,
        "raw": [asdict(r) for r in results],
    }
    if code != 0:  # an interrupted run must not replace a complete one's results
        print(f"incomplete run: {args.output} not written")
        return code
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {args.output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
