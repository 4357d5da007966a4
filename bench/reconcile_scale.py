"""Section 3, reconcile at scale: CPU time and memory of one reconcile cycle over many
clusters, with the batch system and the Dask schedulers simulated in memory.

Why simulated: 1,000 clusters of 50 workers (50,000 workers) cannot run on a 2-core
machine, and what is measured here is the operator's own cost per cycle, which does not
depend on real jobs. Two figures:

* the full reconcile: `ClusterReconciler.reconcile` (what the kopf timer and `dask-hpc up`
  call) for every cluster, one cycle = one batched poll (`BatchedPoller.refresh`, ONE
  `Backend.poll` for all clusters, as in production) then one reconcile per cluster. It
  includes validating each manifest, building its model, picking its jobs out of the
  shared snapshot, planning, and building its status. The backend is `SimulatedBackend`
  (the hpc_bridge `Backend` protocol: submit, task_job_id, poll, cancel, in memory; jobs
  run the moment they are submitted). The Dask side is `SimulatedSchedulers`: it replaces
  `dask_hpc_operator.dask_rpc.observe` in this process only, answering each cluster's
  `identity()` with its 50 connected workers and turning that answer into the operator's
  DaskView with dask_rpc's own parsing (`_worker_view`, `dashboard_url`); the RPC's network
  time is not counted, its parsing is.
* the pure core: `planning.plan_cluster` + `planning.cluster_status` for every cluster on
  prepared inputs (model, its observed jobs, its DaskView): the decision and the status
  without validation, snapshot filtering or I/O.

The first cycle submits everything (it renders 2 job scripts per cluster through
dask-jobqueue) and is reported on its own; the measured cycles are steady state (every
cluster Running with all its workers, nothing to do), `time.process_time` of the whole
cycle, median of `--cycles` (every steady cycle is the same work: nothing changes between
them). Memory: this process's peak resident set (VmHWM; the runner starts it as a fresh
subprocess) after the imports and at the end of the CPU cycles, with
`resource.getrusage().ru_maxrss` beside it (on Linux a forked child inherits its parent's
ru_maxrss, so that one is never below the runner's own RSS), and
`tracemalloc`'s peak during one extra steady cycle (transient allocations of a cycle; it
is started after the CPU cycles so that its overhead is not in them). The poll and the
first 100 reconciles of one more cycle under cProfile give the functions where the time
goes (by own time; each reconcile still sees the whole snapshot, so the per-reconcile
costs are a full cycle's).

Run alone: `.venv/bin/python -m bench.reconcile_scale --clusters 1000 --workers 50`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dask_hpc_operator import dask_rpc
from dask_hpc_operator.model import ClusterModel
from dask_hpc_operator.planning import DaskView, Plan, cluster_status, plan_cluster
from dask_hpc_operator.reconcile import ClusterReconciler, Runtime, now_iso
from dask_hpc_operator.validation import validate
from hpc_bridge.model import JobRequest, JobState, ObservedJob, Role

from .common import cluster_manifest, site_config

TARGET_CYCLE_CPU_S = 1.0
# Profiled: the poll and this many reconciles of a cycle (each one still sees the whole
# snapshot, so the per-reconcile costs are those of a full cycle, at a tenth of the time).
PROFILED_RECONCILES = 100
NAMESPACE = "sim"


class SimulatedBackend:
    """The hpc_bridge Backend protocol in memory, shaped like SLURM (arrays of any index
    list): a batch system that starts every job the moment it is submitted."""

    kind = "slurm"
    supports_arrays = True

    def __init__(self) -> None:
        self.jobs: dict[str, ObservedJob] = {}
        self.next_id = 1000
        self.calls = {"submit": 0, "poll": 0, "cancel": 0}

    async def submit(self, request: JobRequest) -> str:
        self.calls["submit"] += 1
        job_id = str(self.next_id)
        self.next_id += 1
        now = time.time()
        for identity in request.task_identities():
            task_id = self.task_job_id(job_id, identity.index) if request.array else job_id
            self.jobs[task_id] = ObservedJob(task_id, identity, JobState.RUNNING,
                                             started_at=now)
        return job_id

    def task_job_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        """As SLURM: one array of any index list."""
        return ([tuple(sorted(set(indices)))] if indices else []), []

    async def poll(self) -> list[ObservedJob]:
        self.calls["poll"] += 1
        return list(self.jobs.values())

    async def cancel(self, job_ids: Sequence[str]) -> None:
        self.calls["cancel"] += 1
        for job_id in job_ids:
            self.jobs.pop(job_id, None)


class SimulatedSchedulers:
    """Each cluster's Dask scheduler as the operator sees it: an `identity()` answer per
    scheduler file, made from the jobs the simulated batch system runs."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}

    def load(self, runtime: Runtime, backend: SimulatedBackend) -> None:
        workers: dict[str, dict[str, Any]] = {}
        for job in backend.jobs.values():
            i = job.identity
            if i.role is Role.WORKER:
                address = f"tcp://10.{i.index // 250}.{i.index % 250}.1:{40000 + i.index}"
                workers.setdefault(i.owner_uid, {})[address] = {
                    "name": i.job_name, "status": "running", "nthreads": 1,
                    "metrics": {"managed_bytes": 0}}
        for job in backend.jobs.values():
            i = job.identity
            if i.role is Role.SCHEDULER:
                path = str(runtime.staging_dir(i.namespace, i.cluster, i.owner_uid)
                           / "scheduler.json")
                self.answers[path] = {"address": f"tcp://10.9.9.9:{30000 + i.index}",
                                      "services": {"dashboard": 8787},
                                      "workers": workers.get(i.owner_uid, {})}

    async def observe(self, scheduler_file: str,
                      groups: list[dict[str, Any]] | None = None,
                      security: object = None) -> DaskView | None:
        answer = self.answers.get(scheduler_file)
        if answer is None:
            return None
        workers = tuple(dask_rpc._worker_view(w, addr)
                        for addr, w in (answer.get("workers") or {}).items())
        return DaskView(address=answer["address"], dashboard_url=dask_rpc.dashboard_url(answer),
                        workers=workers)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = dask_rpc.observe
        dask_rpc.observe = self.observe  # type: ignore[assignment]
        try:
            yield
        finally:
            dask_rpc.observe = original  # type: ignore[assignment]


def max_rss_mib() -> float:
    """getrusage's peak resident memory of this process so far (Linux reports KiB). A
    child started by fork+exec inherits its parent's figure, so it is never below the
    RSS of the process that started it."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_rss_mib() -> float | None:
    """This program's own peak resident memory: VmHWM of /proc/self/status (Linux), the
    high-water mark of this address space, which exec starts afresh."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


class Fleet:
    """N clusters of W workers, reconciled by one ClusterReconciler on simulated backends."""

    def __init__(self, clusters: int, workers: int, workdir: Path) -> None:
        # A poll interval longer than any cycle: each cycle polls exactly once (refresh).
        self.site = site_config(workdir, min_poll=3600.0, poll=3600.0)
        self.backend = SimulatedBackend()
        self.runtime = Runtime(self.site, backends={"slurm": self.backend})
        self.reconciler = ClusterReconciler(self.runtime)
        self.schedulers = SimulatedSchedulers()
        self.manifests = [cluster_manifest(NAMESPACE, f"c{i:05d}", workers)
                          for i in range(clusters)]
        self.statuses: list[dict[str, Any]] = [{} for _ in self.manifests]

    async def cycle(self, limit: int | None = None) -> None:
        """One poll, then one reconcile per cluster (the first `limit` only, if given)."""
        await self.runtime.poller("slurm").refresh()
        for manifest, status in list(zip(self.manifests, self.statuses, strict=True))[:limit]:
            status.update(await self.reconciler.reconcile(manifest, status))

    async def timed_cycle(self) -> tuple[float, float]:
        """(CPU seconds, wall seconds) of one cycle."""
        cpu, wall = time.process_time(), time.perf_counter()
        await self.cycle()
        return time.process_time() - cpu, time.perf_counter() - wall

    def phases(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for status in self.statuses:
            key = f"{status.get('phase')} {status.get('message', '')[:20]}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def core_inputs(self) -> list[tuple[ClusterModel, list[ObservedJob], DaskView | None]]:
        """What the pure planner gets for each cluster in steady state."""
        snapshot = self.runtime.poller("slurm").snapshot
        by_owner: dict[str, list[ObservedJob]] = {}
        for job in snapshot.jobs.values():
            by_owner.setdefault(job.identity.owner_uid, []).append(job)
        inputs = []
        for manifest in self.manifests:
            model = ClusterModel.from_manifest(validate(manifest), self.site)
            path = self.reconciler._context(model).scheduler_file
            view = await self.schedulers.observe(path)
            inputs.append((model, by_owner.get(model.uid, []), view))
        return inputs


def core_cycle(inputs: list[tuple[ClusterModel, list[ObservedJob], DaskView | None]],
               statuses: list[dict[str, Any]]) -> float:
    """CPU seconds of plan_cluster + cluster_status for every cluster."""
    started = time.process_time()
    now, stamp = time.time(), now_iso()
    for (model, jobs, view), old in zip(inputs, statuses, strict=True):
        plan: Plan = plan_cluster(model, jobs, view, old.get("schedulerJobId"), now=now)
        cluster_status(model, jobs, view, plan, old.get("conditions") or [], stamp)
    return time.process_time() - started


def top_functions(profile: cProfile.Profile, count: int = 8) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile)
    rows = []
    for (path, line, func), (_cc, calls, own, cumulative, _callers) in \
            stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(path).name}:{line}({func})", "calls": calls,
                     "own_s": round(own, 3), "cumulative_s": round(cumulative, 3)})
    return sorted(rows, key=lambda r: -float(r["own_s"]))[:count]


async def measure(clusters: int, workers: int, cycles: int) -> dict[str, Any]:
    rss_start, hwm_start = max_rss_mib(), peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="dask-hpc-bench-sim-") as tmp:
        fleet = Fleet(clusters, workers, Path(tmp))
        with fleet.schedulers.installed():
            first_cpu, first_wall = await fleet.timed_cycle()
            submitted = dict(fleet.backend.calls)
            fleet.schedulers.load(fleet.runtime, fleet.backend)
            cpu, wall = [], []
            for _ in range(cycles):
                c, w = await fleet.timed_cycle()
                cpu.append(c)
                wall.append(w)
            phases = fleet.phases()
            polls_per_cycle = fleet.backend.calls["poll"] / (cycles + 1)
            inputs = await fleet.core_inputs()
            core = [core_cycle(inputs, fleet.statuses) for _ in range(cycles)]
            rss_end, hwm_end = max_rss_mib(), peak_rss_mib()

            tracemalloc.start()
            before, _ = tracemalloc.get_traced_memory()
            await fleet.timed_cycle()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()

            profile = cProfile.Profile()
            profile.enable()
            await fleet.cycle(limit=PROFILED_RECONCILES)
            profile.disable()
        simulated_jobs = len(fleet.backend.jobs)
    median_cpu = statistics.median(cpu)
    return {
        "clusters": clusters, "workers_per_cluster": workers,
        "simulated_workers": clusters * workers, "simulated_jobs": simulated_jobs,
        "cycles_measured": cycles,
        "cycle_cpu_s": {"median": round(median_cpu, 3), "min": round(min(cpu), 3),
                        "max": round(max(cpu), 3), "all": [round(c, 3) for c in cpu]},
        "cycle_wall_s_median": round(statistics.median(wall), 3),
        "cpu_per_cluster_ms": round(1000 * median_cpu / clusters, 3),
        "core_cycle_cpu_s": {"median": round(statistics.median(core), 3),
                             "all": [round(c, 3) for c in core]},
        "first_cycle": {"cpu_s": round(first_cpu, 3), "wall_s": round(first_wall, 3),
                        "backend_calls": submitted},
        "polls_per_cycle": round(polls_per_cycle, 2),
        "statuses": phases,
        "memory": {"peak_rss_after_imports_mib": hwm_start, "peak_rss_end_mib": hwm_end,
                   "getrusage_maxrss_after_imports_mib": rss_start,
                   "getrusage_maxrss_end_mib": rss_end,
                   "tracemalloc_cycle_peak_mib": round((peak - before) / 2**20, 2)},
        "top_own_time": top_functions(profile),
        "profiled": f"the poll and {min(PROFILED_RECONCILES, clusters)} reconciles of a cycle",
        "target_cycle_cpu_s": TARGET_CYCLE_CPU_S,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=3, help="steady cycles (median)")
    parser.add_argument("--json", type=Path, help="write the result here (else stdout)")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.clusters, args.workers, args.cycles))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
