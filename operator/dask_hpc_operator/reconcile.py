"""The one reconcile per kind: observe, plan (pure), act, report.

Called from kopf's create/update/resume handlers and its timer, and from `dask-hpc up`'s
loop; it never keeps state between calls except the shared poller snapshot, so an operator
restart simply observes the jobs that exist (adopting them) and carries on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpc_bridge.allocation import render_allocation
from hpc_bridge.backends.base import Backend, BatchSystemError, CommandRunner
from hpc_bridge.backends.local import LocalBackend
from hpc_bridge.backends.pbs import PbsBackend
from hpc_bridge.backends.slurm import SlurmBackend
from hpc_bridge.model import JobIdentity, JobRequest, JobState, ObservedJob, Role
from hpc_bridge.poller import BatchedPoller, BatchSystemUnavailable
from hpc_bridge.preloads import history as history_preload
from hpc_bridge.preloads import scaling as scaling_preload
from hpc_bridge.scripts import LISTENERS_PRELOAD, RenderContext, render, render_worker

from . import dask_rpc, history, job_logs
from .autoscaling import idle_expired
from .model import ClusterModel, GroupModel
from .planning import (
    SCHEDULER_ROLES,
    DaskView,
    FailurePolicy,
    Plan,
    cluster_status,
    group_status,
    plan_cluster,
    plan_group,
    rejected_status,
)
from .site_config import SiteConfig
from .status_events import emit, status_events
from .validation import ManifestError, validate

log = logging.getLogger(__name__)
SUBMIT_CONCURRENCY = 8
# Scheduler preloads, file name -> source: copied next to the scheduler file and preloaded
# by path, so the compute nodes need only dask and distributed. The per-group scaling
# handler, and the computation history (`dask-hpc history`).
SCALING_PRELOAD = Path(scaling_preload.__file__).read_text()
SCALING_PRELOAD_NAME = "dask_hpc_scaling.py"
SCHEDULER_PRELOADS = {SCALING_PRELOAD_NAME: SCALING_PRELOAD,
                      "dask_hpc_history.py": Path(history_preload.__file__).read_text()}

EventSink = Callable[[str, str, str], None]  # (type: Normal|Warning, reason, message)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")


def unavailable_status(exc: Exception, old_conditions: list[Any]) -> dict[str, Any]:
    """The batch system cannot be asked: say so, change nothing else (phase is kept)."""
    return {"message": f"batch system unavailable, retrying: {exc}",
            "conditions": old_conditions}


def _no_events(_type: str, _reason: str, _message: str) -> None:
    pass


def _spec_changed(manifest: dict[str, Any], old_status: dict[str, Any]) -> bool:
    """The spec moved since the last reconcile: a group stopped after repeated failures
    gets one more try (the edit may be the fix)."""
    generation = manifest.get("metadata", {}).get("generation")
    return bool(generation != old_status.get("observedGeneration"))


def error_tails(backend: str, ctx: RenderContext, plan: Plan) -> dict[str, str]:
    """The end of the error output of each failing group's newest failed job (file reads,
    so here and not in the pure planner)."""
    return {f.newest.job_id: job_logs.error_tail(backend, ctx.log_dir, f.newest)
            for f in plan.failures}


@dataclass
class Runtime:
    """Process-wide state shared by all reconciles: backends and their pollers."""

    site: SiteConfig
    backends: dict[str, Backend] = field(default_factory=dict)
    pollers: dict[str, BatchedPoller] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def backend(self, kind: str) -> Backend:
        if kind not in self.backends:
            if kind == "slurm":
                runner = CommandRunner(self.site.submit_prefix, self.site.command_timeout)
                self.backends[kind] = SlurmBackend(runner, all_users=self.site.squeue_all_users)
            elif kind == "pbs":
                runner = CommandRunner(self.site.submit_prefix, self.site.command_timeout)
                self.backends[kind] = PbsBackend(
                    runner, name_limit=self.site.pbs_job_name_limit, arrays=self.site.pbs_arrays,
                    max_array_size=self.site.pbs_max_array_size)
            elif kind == "local":
                self.backends[kind] = LocalBackend(Path(self.site.staging_dir) / "local-jobs")
            else:
                raise ManifestError("spec.backend", f"backend {kind!r} is not available in "
                                    "this operator", "use slurm, pbs or local")
        return self.backends[kind]

    def poller(self, kind: str) -> BatchedPoller:
        if kind not in self.pollers:
            self.pollers[kind] = BatchedPoller(self.backend(kind), self.site.min_poll_interval)
        return self.pollers[kind]

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())

    async def end_jobs(self, uid: str, kinds: list[str],
                       mine: Callable[[ObservedJob], bool]) -> list[str]:
        """Deletion's one mechanism: cancel every live job `mine` selects on these backends,
        under the owner's lock, and return the ids not yet finished (empty when done).
        ENDING counts as unfinished: a job is gone only once its processes are.

        Snapshots come from the shared poller within its minimum interval, not a fresh
        query per deletion: deleting 50 clusters at once costs one squeue per period, not
        100 (jobs submitted since the snapshot are in it already, recorded at submission)."""
        remaining: list[str] = []
        async with self.lock(uid):
            for kind in dict.fromkeys(kinds):
                poller = self.poller(kind)
                snapshot = await poller.get()
                live = [j.job_id for j in snapshot.jobs.values() if mine(j) and j.state.live]
                if live:
                    await poller.backend.cancel(live)
                    poller.record_cancelled(live)
                    snapshot = await poller.get()
                remaining += [j.job_id for j in snapshot.jobs.values()
                              if mine(j) and not j.state.terminal]
        return remaining

    def staging_dir(self, namespace: str, name: str, uid: str, kind: str = "clusters") -> Path:
        # The uid keeps a re-created cluster of the same name away from its predecessor's
        # scheduler file and logs.
        return Path(self.site.staging_dir) / kind / namespace / f"{name}-{uid[:8]}"


class ClusterReconciler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _context(self, model: ClusterModel) -> RenderContext:
        staging = self.runtime.staging_dir(model.namespace, model.name, model.uid)
        return RenderContext(
            backend=model.backend,
            python=self.runtime.site.python,
            scheduler_file=str(staging / "scheduler.json"),
            log_dir=str(staging / "logs"),
            protocols=model.protocols,
            site_prologue=self.runtime.site.prologue,
            death_timeout=self.runtime.site.worker_death_timeout,
            scheduler_preloads=tuple(str(staging / name) for name in SCHEDULER_PRELOADS),
        )

    def render_all(self, manifest: dict[str, Any]) -> list[JobRequest]:
        """The scripts a fresh cluster would submit (for `dask-hpc render`)."""
        model = ClusterModel.from_manifest(validate(manifest), self.runtime.site)
        plan = plan_cluster(model, [], None, now=time.time())
        ctx = self._context(model)
        sched = [self._render_scheduler(model, ctx, i) for i in plan.submit
                 if i.role in SCHEDULER_ROLES]
        workers = [i for i in plan.submit if i.role is Role.WORKER]
        return sched + self._worker_requests(model, ctx, workers, self.runtime.backend(
            model.backend))

    async def reconcile(self, manifest: dict[str, Any], old_status: dict[str, Any],
                        events: EventSink = _no_events) -> dict[str, Any]:
        old_conditions = old_status.get("conditions") or []
        try:
            valid = validate(manifest)
            model = ClusterModel.from_manifest(valid, self.runtime.site)
            poller = self.runtime.poller(model.backend)
        except ManifestError as exc:
            # Refuse, and touch nothing: jobs of an earlier valid spec keep running.
            if old_status.get("message") != str(exc):
                events("Warning", "InvalidSpec", str(exc))
            return rejected_status(str(exc), old_conditions, now_iso())
        async with self.runtime.lock(model.uid):
            try:
                snapshot = await poller.get()
            except BatchSystemUnavailable as exc:
                return unavailable_status(exc, old_conditions)
            jobs = snapshot.owned_by(model.uid)
            ctx = self._context(model)
            live_sched = any(j.identity.role in SCHEDULER_ROLES and j.state is JobState.RUNNING
                             for j in jobs)
            dask = await dask_rpc.observe(ctx.scheduler_file, self._groups_query(model, jobs)) \
                if live_sched else None
            plan = plan_cluster(model, jobs, dask, old_status.get("schedulerJobId"),
                                now=time.time(), spec_changed=_spec_changed(manifest, old_status),
                                policy=FailurePolicy.of(self.runtime.site))
            notes = await self._act(model, ctx, plan, dask, poller, events)
            plan.notes += notes
            if not plan.empty:
                jobs = poller.snapshot.owned_by(model.uid)
            status = cluster_status(model, jobs, dask, plan, old_conditions, now_iso(),
                                    error_tails(model.backend, ctx, plan))
        if dask is not None and idle_expired(model.idle_timeout, dask.idle_since,
                                             dask.clock or 0.0):
            # The caller deletes the object (API or `up`); its finalizer ends the jobs.
            status["idleExpired"] = True
            status["message"] = (f"no task for {model.idle_timeout} s (spec.idleTimeout): "
                                 "deleting the cluster")
            events("Normal", "IdleTimeout", status["message"])
        status["stagingDirectory"] = str(Path(ctx.scheduler_file).parent)
        status["observedGeneration"] = manifest.get("metadata", {}).get("generation")
        if not status.get("schedulerJobId"):
            status["schedulerJobId"] = old_status.get("schedulerJobId")
        emit(events, status_events(old_status, status))
        return status

    async def _act(self, model: ClusterModel, ctx: RenderContext, plan: Plan,
                   dask: DaskView | None, poller: BatchedPoller,
                   events: EventSink) -> list[str]:
        notes: list[str] = []
        backend = poller.backend
        to_cancel = list(plan.cancel)
        if plan.retire and dask is not None:
            names = [n for r in plan.retire for n in r.worker_names]
            try:
                retired = await dask_rpc.retire(dask.address, names)
            except (OSError, asyncio.TimeoutError) as exc:
                retired = set()
                notes.append(f"retiring workers failed ({exc}); they are kept")
            for r in plan.retire:
                if set(r.worker_names) <= retired:
                    to_cancel.append(r.job_id)
                else:
                    notes.append(f"job {r.job_id} kept: its workers hold data that could not "
                                 "move elsewhere")
        if to_cancel:
            try:
                await backend.cancel(to_cancel)
                poller.record_cancelled(to_cancel)
                events("Normal", "Cancelled", f"cancelled jobs {', '.join(to_cancel)}")
            except BatchSystemError as exc:
                notes.append(f"cancel failed: {exc}")
        if plan.submit:
            notes += await self._submit(model, ctx, plan.submit, poller, events)
        return notes

    async def _submit(self, model: ClusterModel, ctx: RenderContext,
                      identities: list[JobIdentity], poller: BatchedPoller,
                      events: EventSink) -> list[str]:
        gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)
        errors: list[str] = []
        submitted: list[str] = []

        async def one(request: JobRequest) -> None:
            async with gate:
                try:
                    job_id = await poller.backend.submit(request)
                except BatchSystemError as exc:
                    errors.append(str(exc))
                    return
            if request.array:
                for task in request.task_identities():
                    task_id = poller.backend.task_job_id(job_id, task.index)
                    poller.record_submitted(ObservedJob(task_id, task, JobState.PENDING,
                                                        "submitted"))
            else:
                poller.record_submitted(ObservedJob(job_id, request.identity,
                                                    JobState.PENDING, "submitted"))
            submitted.append(job_id)

        Path(ctx.log_dir).mkdir(parents=True, exist_ok=True)
        # Scheduler first: its file appears sooner, and workers wait for it anyway.
        for identity in [i for i in identities if i.role in SCHEDULER_ROLES]:
            dask_rpc.remove_stale_scheduler_files(ctx)
            if len(ctx.protocols) > 1:
                Path(ctx.preload_path).write_text(LISTENERS_PRELOAD)
            for preload in ctx.scheduler_preloads:
                Path(preload).write_text(SCHEDULER_PRELOADS[Path(preload).name])
            await one(self._render_scheduler(model, ctx, identity))
        workers = [i for i in identities if i.role is Role.WORKER]
        await asyncio.gather(*(one(r) for r in self._worker_requests(model, ctx, workers,
                                                                    poller.backend)))
        if submitted:
            events("Normal", "Submitted", f"submitted jobs {', '.join(sorted(submitted))}")
        if errors:
            events("Warning", "SubmitFailed", errors[0])
            return [f"submission failed: {errors[0]}"]
        return []

    @staticmethod
    def _groups_query(model: ClusterModel, jobs: list[ObservedJob],
                      groups: tuple[GroupModel, ...] | None = None) -> list[dict[str, Any]] | None:
        """The groups to ask the scheduler's advice for, or None when it is not needed this
        time: only an idle timeout or a scale-down (to choose whom to close) use it."""
        def surplus(g: GroupModel) -> bool:
            live = [j for j in jobs if j.identity.role is Role.WORKER and j.state.live
                    and j.identity.group == g.name and j.identity.owner_uid == g.owner_uid]
            return len(live) > g.replicas
        if not (model.idle_timeout > 0 or any(map(surplus, model.groups))):
            return None
        return [dask_rpc.group_query(model.namespace, model.name, g.name, g.template.resources)
                for g in (groups or model.groups)]

    def _render_scheduler(self, model: ClusterModel, ctx: RenderContext,
                          identity: JobIdentity) -> JobRequest:
        """The scheduler's own job, or (mode allocation) the one MPI job holding the
        scheduler and the default group's workers."""
        if identity.role is Role.ALLOCATION:
            default = model.groups[0]
            return render_allocation(ctx, identity, default.template, default.replicas, None,
                                     self.runtime.site.mpi_launcher)
        return render(ctx, identity, model.scheduler)

    @staticmethod
    def _worker_requests(model: ClusterModel, ctx: RenderContext,
                         identities: list[JobIdentity], backend: Backend) -> list[JobRequest]:
        """Packing: a group's new workers go in job arrays where the batch system has
        arrays (unless the group asks for single jobs): one array on SLURM, one per run of
        consecutive indices on PBS (backend.array_batches); otherwise one job each."""
        requests = []
        for group in model.groups:
            mine = {i.index: i for i in identities if i.group == group.name
                    and i.owner_uid == group.owner_uid}
            if not mine:
                continue
            pack = group.packing == "array" or (group.packing == "auto" and len(mine) > 1)
            arrays, singles = (backend.array_batches(sorted(mine)) if pack
                               and backend.supports_arrays else ([], sorted(mine)))
            requests += [render_worker(ctx, mine[batch[0]], group.template, batch)
                         for batch in arrays]
            requests += [render_worker(ctx, mine[index], group.template) for index in singles]
        return requests

    async def teardown(self, manifest: dict[str, Any], whole_cluster: bool = False) -> list[str]:
        """Cancel every job the resource owns (with `whole_cluster`, also its worker groups'
        jobs); returns the ids still not finished (empty when done)."""
        meta = manifest["metadata"]
        uid = meta["uid"]
        namespace = meta.get("namespace") or "default"
        spec = manifest.get("spec") or {}

        def mine(job: ObservedJob) -> bool:
            # By name: its DaskWorkerGroups' workers (a DaskJob's runner or allocation may
            # share the cluster's name, not its lifetime).
            return job.identity.owner_uid == uid or (
                whole_cluster and job.identity.namespace == namespace
                and job.identity.cluster == meta["name"] and job.identity.role is Role.WORKER)

        remaining = await self.runtime.end_jobs(
            uid, [spec.get("backend") or self.runtime.site.backend, *self.runtime.pollers], mine)
        if not remaining and whole_cluster:
            staging = self.runtime.staging_dir(namespace, meta["name"], uid)
            # What the cluster computed outlives it (`dask-hpc history`): keep it first.
            history.archive(staging / history.FILE_NAME, history.archive_path(
                self.runtime.site.staging_dir, namespace, meta["name"], uid))
            shutil.rmtree(staging, ignore_errors=True)
        return remaining


class GroupReconciler(ClusterReconciler):
    """A DaskWorkerGroup: its own replicas and jobs, the scheduler of the cluster it names."""

    async def reconcile_group(self, manifest: dict[str, Any], old_status: dict[str, Any],
                              cluster: dict[str, Any] | None,
                              events: EventSink = _no_events) -> dict[str, Any]:
        old_conditions = old_status.get("conditions") or []
        try:
            valid = validate(manifest)
        except ManifestError as exc:
            return rejected_status(str(exc), old_conditions, now_iso())
        meta = valid["metadata"]
        group = GroupModel.from_worker(meta["name"], meta["uid"], valid["spec"]["worker"])
        cluster_name = valid["spec"]["cluster"]
        namespace = meta.get("namespace") or "default"
        problem, cmodel = self._cluster_problem(group, cluster_name, namespace, cluster)
        if cmodel is None:
            # No cluster to serve the group: end any jobs it still has (they are orphans).
            await self.teardown(manifest)
            return group_status(group, [], None, Plan(), problem, old_conditions, now_iso())
        model = replace(cmodel, groups=(group,))
        poller = self.runtime.poller(model.backend)
        async with self.runtime.lock(group.owner_uid):
            try:
                snapshot = await poller.get()
            except BatchSystemUnavailable as exc:
                return unavailable_status(exc, old_conditions)
            jobs = snapshot.owned_by(group.owner_uid)
            ctx = self._context(model)
            dask = await dask_rpc.observe(ctx.scheduler_file, self._groups_query(
                model, jobs, (cmodel.groups[0], group)))
            plan = Plan()
            if not problem:
                plan_group(namespace, cluster_name, group, jobs, dask, plan, now=time.time(),
                           spec_changed=_spec_changed(manifest, old_status),
                           policy=FailurePolicy.of(self.runtime.site))
                plan.notes += await self._act(model, ctx, plan, dask, poller, events)
                if not plan.empty:
                    jobs = poller.snapshot.owned_by(group.owner_uid)
        status = group_status(group, jobs, dask, plan, problem, old_conditions, now_iso(),
                              error_tails(model.backend, ctx, plan))
        status["observedGeneration"] = meta.get("generation")
        emit(events, status_events(old_status, status))
        return status

    def render_group(self, manifest: dict[str, Any],
                     cluster: dict[str, Any]) -> list[JobRequest]:
        """The scripts a fresh group of `cluster` would submit (for `dask-hpc render`)."""
        valid = validate(manifest)
        meta = valid["metadata"]
        group = GroupModel.from_worker(meta["name"], meta["uid"], valid["spec"]["worker"])
        cmodel = ClusterModel.from_manifest(validate(cluster), self.runtime.site)
        model = replace(cmodel, groups=(group,))
        plan = plan_group(cmodel.namespace, cmodel.name, group, [], None, Plan(),
                          now=time.time())
        return self._worker_requests(model, self._context(model), plan.submit,
                                     self.runtime.backend(model.backend))

    def _cluster_problem(self, group: GroupModel, name: str, namespace: str,
                         cluster: dict[str, Any] | None) -> tuple[str, ClusterModel | None]:
        if cluster is None or cluster.get("metadata", {}).get("deletionTimestamp"):
            return (f"waiting for DaskCluster {namespace}/{name}, which does not exist", None)
        try:
            cmodel = ClusterModel.from_manifest(validate(cluster), self.runtime.site)
        except ManifestError as exc:
            return f"DaskCluster {name} is invalid: {exc}", None
        if (cluster.get("status") or {}).get("phase") == "Failed":
            return f"DaskCluster {name} has failed", cmodel
        protocol = group.template.protocol
        if protocol and protocol not in cmodel.protocols:
            return (f"the scheduler of DaskCluster {name} does not listen on {protocol}: add "
                    f"{protocol} to its spec.scheduler.extraProtocols", cmodel)
        return "", cmodel
