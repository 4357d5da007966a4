"""Prometheus metrics of the operator, read from its own state when scraped.

Why a collector instead of counters sprinkled through the reconcilers: the numbers already
exist. Each `CommandRunner` counts every batch command it runs (calls, cumulative seconds,
errors), each `BatchedPoller` holds the latest snapshot of jobs and its poll counts, and the
local backend counts its submits and cancels. Reading them at scrape time keeps metrics code
out of the reconcilers, and a scrape costs nothing between scrapes. What no object keeps —
the phase of every resource and the exceptions that escape a handler — is recorded by
`OperatorMetrics.instrument`, the one call handlers.py makes per kind.

Scrapes run in prometheus_client's HTTP thread while the operator's event loop changes that
state. The collector only copies built-in dicts (a `list(d.items())` of a dict with str keys
is atomic under the GIL in CPython) and reads values the loop replaces rather than mutates;
the state this module owns is guarded by a lock.

Every metric name starts with `dask_hpc_`. Families whose label values are known in advance
(phases of a kind, job states) are reported with zeros too, so dashboards and alerts see a
series drop to 0 instead of vanishing.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import kopf
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from hpc_bridge.backends.base import CommandRunner
from hpc_bridge.backends.local import LocalBackend
from hpc_bridge.model import JobState, Role

from .constants import KIND_AUTOSCALER, KIND_CLUSTER, KIND_JOB, KIND_WORKER_GROUP, NAMES
from .reconcile import Runtime

log = logging.getLogger(__name__)

PREFIX = "dask_hpc_"
# Reported for a resource whose deletion has begun (its finalizer still cancels jobs), and
# for one no reconcile has given a phase yet.
TERMINATING = "Terminating"
UNKNOWN = "Unknown"
# The phases each kind's reconcile writes (planning.py, job_planning.py,
# autoscaler_reconcile.py), reported with zeros so that a series never vanishes.
PHASES: dict[str, tuple[str, ...]] = {
    KIND_CLUSTER: ("Pending", "Running", "Scaling", "Failed", TERMINATING),
    KIND_WORKER_GROUP: ("Pending", "Running", "Scaling", "Failed", TERMINATING),
    KIND_JOB: ("Pending", "Running", "Succeeded", "Failed", TERMINATING),
    KIND_AUTOSCALER: ("Pending", "Active", "Failed"),
}
WORKER_COUNTS = ("desired", "pending", "running", "ready")  # status.workers of a cluster/group
# A backend's runner counts commands by name; these are its submissions and cancellations
# (one command per job or per array, and one per cancel request however many ids it names).
SUBMIT_COMMANDS = ("sbatch", "qsub")
CANCEL_COMMANDS = ("scancel", "qdel")

Handler = Callable[..., Awaitable[Any]]
LABELS = ["namespace", "cluster", "group"]  # of the per-cluster usage families
_KIND_OF_PLURAL = {names[0]: kind for kind, names in NAMES.items()}


@dataclass(frozen=True)
class _Observed:
    """What one watch event said about a resource: enough for the phase and worker gauges."""

    phase: str
    workers: tuple[tuple[str, int], ...]


class OperatorMetrics(Collector):
    """The operator's metrics: a prometheus_client collector over a `Runtime`, plus what
    handlers report (resource phases, handler errors) through `instrument`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str, str], _Observed] = {}  # (kind, ns, name)
        self._reconciles: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        self._counted: dict[tuple[str, ...], float] = {}  # usage counters' last values

    # -- what the handlers report ---------------------------------------------------------

    def observe(self, kind: str, body: dict[str, Any] | kopf.Body, deleted: bool = False) -> None:
        """Remember a resource's phase as the API server last showed it (or forget it).

        Fed from a watch-event handler rather than from the reconcile's return value, so the
        gauge shows what `kubectl get` shows, covers resources whose status another process
        wrote, and loses a resource when it is deleted even where no handler of ours runs
        then (a DaskAutoscaler has no finalizer)."""
        meta = body.get("metadata") or {}
        key = (kind, str(meta.get("namespace") or "default"), str(meta.get("name")))
        if deleted:
            with self._lock:
                self._resources.pop(key, None)
            return
        status = body.get("status") or {}
        phase = TERMINATING if meta.get("deletionTimestamp") else str(status.get("phase")
                                                                         or UNKNOWN)
        workers = status.get("workers")
        counts = tuple((k, int(workers.get(k) or 0)) for k in WORKER_COUNTS
                       if k in workers) if isinstance(workers, dict) else ()
        with self._lock:
            self._resources[key] = _Observed(phase, counts)

    def instrument(self, registry: kopf.OperatorRegistry, resource: tuple[str, str, str],
                   reconcile: Handler, delete: Handler) -> tuple[Handler, Handler]:
        """Watch `resource`'s phase (an event handler in `registry`) and return its
        reconcile and delete handlers wrapped to count runs and errors.

        An error is an exception that escapes the handler (kopf logs it and retries).
        `kopf.TemporaryError` is how a handler here says "not yet" (a deletion waiting for
        its jobs to end), so it is not counted."""
        kind = _KIND_OF_PLURAL[resource[2]]

        async def watch_phase(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
            self.observe(kind, body, deleted=event.get("type") == "DELETED")

        kopf.on.event(*resource, registry=registry, id="metrics-phase")(watch_phase)

        def counted(handler: Handler, is_reconcile: bool) -> Handler:
            async def run(**kwargs: Any) -> Any:
                if is_reconcile:
                    with self._lock:
                        self._reconciles[kind] += 1
                try:
                    return await handler(**kwargs)
                except kopf.TemporaryError:
                    raise
                except Exception:
                    with self._lock:
                        self._errors[kind] += 1
                    raise
            return run

        return counted(reconcile, True), counted(delete, False)

    # -- what a scrape reads ----------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield from self._resource_metrics()
        yield from self._batch_metrics()
        yield from self._usage_metrics()

    def _resource_metrics(self) -> Iterator[Metric]:
        with self._lock:
            resources = list(self._resources.items())
            reconciles, errors = dict(self._reconciles), dict(self._errors)
        phases = GaugeMetricFamily(
            PREFIX + "resources", "Resources this operator watches, by kind and status.phase "
            "(Terminating: deletion begun, jobs still being cancelled)", labels=["kind", "phase"])
        by_phase = collections.Counter((kind, seen.phase) for (kind, _, _), seen in resources)
        for kind, known in PHASES.items():
            for phase in known:
                phases.add_metric([kind, phase], by_phase.pop((kind, phase), 0))
        for (kind, phase), count in sorted(by_phase.items()):  # phases not listed above
            phases.add_metric([kind, phase], count)
        yield phases

        workers = GaugeMetricFamily(
            PREFIX + "workers", "Dask workers of all DaskClusters and DaskWorkerGroups, summed "
            "from their status.workers (desired, pending, running, ready)",
            labels=["kind", "state"])
        sums: collections.Counter[tuple[str, str]] = collections.Counter()
        for (kind, _, _), seen in resources:
            for state, count in seen.workers:
                sums[(kind, state)] += count
        for kind in (KIND_CLUSTER, KIND_WORKER_GROUP):
            for state in WORKER_COUNTS:
                workers.add_metric([kind, state], sums[(kind, state)])
        yield workers

        runs = CounterMetricFamily(PREFIX + "reconciles", "Reconciles run (create, update, "
                                   "resume and timer), by kind", labels=["kind"])
        failed = CounterMetricFamily(PREFIX + "reconcile_errors", "Reconcile and deletion "
                                     "handlers that raised (kopf retries them), by kind",
                                     labels=["kind"])
        for kind in PHASES:
            runs.add_metric([kind], reconciles.get(kind, 0))
            failed.add_metric([kind], errors.get(kind, 0))
        yield runs
        yield failed

    def _batch_metrics(self) -> Iterator[Metric]:
        backends = list(self.runtime.backends.items())
        pollers = list(self.runtime.pollers.items())
        submissions = CounterMetricFamily(
            PREFIX + "batch_submissions", "Submit commands run (one per job or job array; "
            "failed ones too, see dask_hpc_batch_command_errors_total), by backend",
            labels=["backend"])
        cancellations = CounterMetricFamily(
            PREFIX + "batch_cancellations", "Cancel commands run (one may name many jobs), "
            "by backend", labels=["backend"])
        durations = SummaryMetricFamily(
            PREFIX + "batch_command_duration_seconds", "Batch-system commands run and the "
            "seconds they took, by backend and command", labels=["backend", "command"])
        errors = CounterMetricFamily(
            PREFIX + "batch_command_errors", "Batch-system commands that failed, timed out or "
            "could not be started, by backend and command", labels=["backend", "command"])
        for kind, backend in backends:
            runner = getattr(backend, "runner", None)
            if isinstance(runner, CommandRunner):
                calls, latency = list(runner.calls.items()), dict(runner.latency)
                failed = dict(runner.errors)
                counts = dict(calls)
                submissions.add_metric([kind], sum(counts.get(c, 0) for c in SUBMIT_COMMANDS))
                cancellations.add_metric([kind],
                                         sum(counts.get(c, 0) for c in CANCEL_COMMANDS))
                for command, count in sorted(calls):
                    durations.add_metric([kind, command], count, latency.get(command, 0.0))
                    errors.add_metric([kind, command], failed.get(command, 0))
            elif isinstance(backend, LocalBackend):  # processes, not commands: no latency
                submissions.add_metric([kind], backend.calls.get("submit", 0))
                cancellations.add_metric([kind], backend.calls.get("cancel", 0))
        yield from (submissions, cancellations, durations, errors)

        jobs = GaugeMetricFamily(
            PREFIX + "batch_jobs", "Jobs carrying a dask-hpc identity in the latest poll of "
            "each backend (finished ones while the batch system still lists them), by state "
            "and role", labels=["backend", "state", "role"])
        polls = CounterMetricFamily(PREFIX + "batch_polls", "Batched polls of the batch "
                                    "system (one squeue/qstat for all clusters)",
                                    labels=["backend"])
        failing = GaugeMetricFamily(PREFIX + "batch_poll_failures", "Polls failed in a row "
                                    "(0 when the last one worked)", labels=["backend"])
        age = GaugeMetricFamily(PREFIX + "batch_snapshot_age_seconds", "Seconds since the "
                                "latest successful poll began", labels=["backend"])
        now = time.monotonic()
        for kind, poller in pollers:
            snapshot = poller.snapshot  # replaced, never mutated in place, by each poll
            counted = collections.Counter((j.state, j.identity.role)
                                          for j in list(snapshot.jobs.values()))
            for state in JobState:
                for role in Role:
                    jobs.add_metric([kind, state.value, role.value], counted[(state, role)])
            polls.add_metric([kind], poller.polls)
            failing.add_metric([kind], poller.failures)
            if snapshot.taken_at > 0:
                age.add_metric([kind], max(0.0, now - snapshot.taken_at))
        yield from (jobs, polls, failing, age)

    def _monotonic(self, key: tuple[str, ...], value: float) -> float:
        """A counter never goes down: a running job is counted up to the latest accounting
        query, and its final record may end it a little earlier than that."""
        with self._lock:
            value = max(value, self._counted.get(key, 0.0))
            self._counted[key] = value
        return value

    def _usage_metrics(self) -> Iterator[Metric]:
        """What clusters used, from the usage ledger (usage.py): per live cluster and group.

        No per-namespace counter: one that counted deleted clusters would forget them when
        the operator restarts, and Prometheus would read that drop as a counter reset and
        count their hours twice in increase(). A namespace's sum over a period is
        `sum by (namespace) (increase(...cluster_core_hours_total[...]))` (a cluster's
        series ends with it, its samples stay), and all-time totals, deleted clusters
        included, are `dask-hpc history`'s (from the kept usage files)."""
        ledger = self.runtime.usage_ledger
        core = CounterMetricFamily(
            PREFIX + "cluster_core_hours", "Core-hours of a cluster's batch jobs (cores x run "
            "time, from sacct/qstat; see status.usage), by group", labels=LABELS)
        gpu = CounterMetricFamily(
            PREFIX + "cluster_gpu_hours", "GPU-hours of a cluster's batch jobs (the batch "
            "system's GPU count, else the request), by group", labels=LABELS)
        wait = SummaryMetricFamily(
            PREFIX + "cluster_queue_wait_seconds", "Queue wait (start - submit) of a "
            "cluster's batch jobs: count of jobs and seconds waited in all, by group",
            labels=LABELS)
        if ledger is not None:
            for entry in list(ledger.clusters.values()):
                summary = entry.summary()
                for group, t in summary.by_group.items():
                    labels = [entry.namespace, entry.name, group]
                    key = (entry.uid, group)
                    core.add_metric(labels, self._monotonic(("core", *key), t.core_hours))
                    gpu.add_metric(labels, self._monotonic(("gpu", *key), t.gpu_hours))
                    wait.add_metric(labels, t.waited_jobs, t.queue_wait_seconds)
        yield from (core, gpu, wait)

    def registry(self) -> CollectorRegistry:
        """A registry of its own (not prometheus_client's global one, so that tests and
        several operators in one process never collide), with the process and Python
        collectors the global one would have had."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        return registry


@dataclass
class MetricsServer:
    """The `/metrics` HTTP endpoint, served from a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(metrics: OperatorMetrics, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve `metrics` at http://addr:port/metrics (any path answers). Port 0 binds a free
    port (tests read it from `.port`); the CLI treats 0 as "no endpoint" before calling this.
    Raises OSError when the port is taken."""
    server, thread = start_http_server(port, addr, registry=metrics.registry())
    log.info("metrics at http://%s:%d/metrics", addr, server.server_port)
    return MetricsServer(server, thread)
