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
from collections.abc import Callable, Sequence
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
from hpc_bridge.preloads import performance as performance_preload
from hpc_bridge.preloads import scaling as scaling_preload
from hpc_bridge.scripts import LISTENERS_PRELOAD, RenderContext, render, render_worker

from . import dask_rpc, history, job_logs, staging_files, tls
from .autoscaling import idle_expired
from .model import ClusterModel, GroupModel
from .planning import (
    SCHEDULER_ROLES,
    DaskView,
    FailurePolicy,
    Plan,
    SchedulerRecovery,
    cluster_status,
    group_status,
    group_workers_of,
    plan_cluster,
    plan_group,
    rejected_status,
)
from .policy import (
    POLICY_VIOLATION,
    PolicyError,
    admit,
    counts_siblings,
    make_staging,
    policy_for,
    submit_prefix,
)
from .site_config import SiteConfig
from .status_events import emit, status_events
from .usage import Requested, requested_of
from .usage import status_of as usage_status
from .usage_ledger import UsageLedger
from .validation import ManifestError, validate

log = logging.getLogger(__name__)
SUBMIT_CONCURRENCY = 8
# Scheduler preloads, file name -> source: copied next to the scheduler file and preloaded
# by path, so the compute nodes need only dask and distributed. The per-group scaling
# handler, and the computation history (`dask-hpc history`).
SCALING_PRELOAD = Path(scaling_preload.__file__).read_text()
SCALING_PRELOAD_NAME = "dask_hpc_scaling.py"
PERFORMANCE_PRELOAD_NAME = "dask_hpc_performance.py"  # only with performanceReport
SCHEDULER_PRELOADS = {SCALING_PRELOAD_NAME: SCALING_PRELOAD,
                      "dask_hpc_history.py": Path(history_preload.__file__).read_text(),
                      PERFORMANCE_PRELOAD_NAME: Path(performance_preload.__file__).read_text()}

EventSink = Callable[[str, str, str], None]  # (type: Normal|Warning, reason, message)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")


def unavailable_status(exc: Exception, old_conditions: list[Any]) -> dict[str, Any]:
    """The batch system cannot be asked: say so, change nothing else (phase is kept)."""
    return {"message": f"batch system unavailable, retrying: {exc}",
            "conditions": old_conditions}


BATCH_CONDITION = "BatchSystemReachable"


def outage_status(exc: Exception, old_conditions: list[Any],
                  events: EventSink) -> dict[str, Any]:
    """unavailable_status plus a `BatchSystemReachable: False` condition beside the others
    (its lastTransitionTime says since when), and one Warning event when the outage is
    first seen. Nothing is planned on a view that may be stale: the phase, the counts and
    the jobs stay as they were until the batch system answers again (the poller backs off
    meanwhile), and the next full status drops the condition."""
    status = unavailable_status(exc, old_conditions)
    before = next((c for c in old_conditions if c.get("type") == BATCH_CONDITION), None)
    if before is None or before.get("status") != "False":
        events("Warning", "BatchSystemUnavailable", status["message"])
    condition = {"type": BATCH_CONDITION, "status": "False", "reason": "Unreachable",
                 "message": status["message"],
                 "lastTransitionTime": (before or {}).get("lastTransitionTime") or now_iso()}
    status["conditions"] = [c for c in old_conditions if c.get("type") != BATCH_CONDITION] \
        + [condition]
    return status


def _recovered(old_conditions: list[Any], events: EventSink) -> None:
    if any(c.get("type") == BATCH_CONDITION for c in old_conditions):
        events("Normal", BATCH_CONDITION, "the batch system answers again")


def _recorded_restarts(old_status: dict[str, Any]) -> int:
    value = old_status.get("schedulerRestarts")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _no_events(_type: str, _reason: str, _message: str) -> None:
    pass


def refused(exc: ManifestError, old_status: dict[str, Any], events: EventSink) -> dict[str, Any]:
    """The one refusal path, for a manifest that is invalid (InvalidSpec) or that its
    namespace's policy does not allow (PolicyViolation): a Warning event when the reason is
    new and a status that says why. The caller submits and cancels nothing, so jobs of an
    earlier accepted spec keep running."""
    reason = POLICY_VIOLATION if isinstance(exc, PolicyError) else "InvalidSpec"
    if old_status.get("message") != str(exc):
        events("Warning", reason, str(exc))
    return rejected_status(str(exc), old_status.get("conditions") or [], now_iso(), reason)


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


Prefix = tuple[str, ...]  # a submitting identity: the command prefix of batch commands


@dataclass
class Runtime:
    """Process-wide state shared by all reconciles: backends and their pollers.

    There is one backend and one poller per (backend kind, submitting identity), so a
    namespace whose policy submits under its own identity (policy `submitAs`, e.g. `sudo -u
    alice`) has its jobs submitted, listed and cancelled as that user (an `squeue --me` as
    alice lists alice's jobs), and the poll stays shared: one squeue per identity per period,
    whatever the number of clusters. The site's own identity (its submitPrefix) is keyed by
    kind alone in `backends`/`pollers`; other identities by (kind, prefix) in
    `identity_backends`/`identity_pollers`. The local backend runs processes itself: it has
    no identity."""

    site: SiteConfig
    backends: dict[str, Backend] = field(default_factory=dict)
    pollers: dict[str, BatchedPoller] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    usage_ledger: UsageLedger | None = None  # see usage()
    identity_backends: dict[tuple[str, Prefix], Backend] = field(default_factory=dict)
    identity_pollers: dict[tuple[str, Prefix], BatchedPoller] = field(default_factory=dict)

    def _own(self, kind: str, prefix: Prefix | None) -> bool:
        return prefix is None or kind == "local" or prefix == self.site.submit_prefix

    def prefix(self, namespace: str | None) -> Prefix:
        """The identity of a namespace's jobs (no namespace: the site's submitPrefix)."""
        return submit_prefix(self.site, namespace)

    def _new_backend(self, kind: str, prefix: Prefix) -> Backend:
        if kind == "slurm":
            runner = CommandRunner(prefix, self.site.command_timeout)
            return SlurmBackend(runner, all_users=self.site.squeue_all_users)
        if kind == "pbs":
            runner = CommandRunner(prefix, self.site.command_timeout)
            return PbsBackend(runner, name_limit=self.site.pbs_job_name_limit,
                              arrays=self.site.pbs_arrays,
                              max_array_size=self.site.pbs_max_array_size)
        if kind == "local":
            return LocalBackend(Path(self.site.staging_dir) / "local-jobs")
        raise ManifestError("spec.backend", f"backend {kind!r} is not available in "
                            "this operator", "use slurm, pbs or local")

    def backend(self, kind: str, namespace: str | None = None) -> Backend:
        """The backend a namespace's jobs go through (no namespace: the site's identity)."""
        return self.backend_as(kind, self.prefix(namespace) if namespace is not None else None)

    def backend_as(self, kind: str, prefix: Prefix | None) -> Backend:
        if self._own(kind, prefix):
            if kind not in self.backends:
                self.backends[kind] = self._new_backend(kind, self.site.submit_prefix)
            return self.backends[kind]
        assert prefix is not None
        key = (kind, prefix)
        if key not in self.identity_backends:
            self.identity_backends[key] = self._new_backend(kind, prefix)
        return self.identity_backends[key]

    def poller(self, kind: str, namespace: str | None = None) -> BatchedPoller:
        """The shared poller of a namespace's identity (no namespace: the site's)."""
        return self.poller_as(kind, self.prefix(namespace) if namespace is not None else None)

    def poller_as(self, kind: str, prefix: Prefix | None) -> BatchedPoller:
        if self._own(kind, prefix):
            if kind not in self.pollers:
                self.pollers[kind] = BatchedPoller(self.backend_as(kind, None),
                                                   self.site.min_poll_interval)
            return self.pollers[kind]
        assert prefix is not None
        key = (kind, prefix)
        if key not in self.identity_pollers:
            self.identity_pollers[key] = BatchedPoller(self.backend_as(kind, prefix),
                                                       self.site.min_poll_interval)
        return self.identity_pollers[key]

    def pollers_in_use(self) -> list[tuple[str, BatchedPoller]]:
        """(kind, poller) of every identity that has one."""
        return [*self.pollers.items(),
                *((kind, p) for (kind, _), p in self.identity_pollers.items())]

    def sweep_pollers(self) -> list[tuple[str, BatchedPoller]]:
        """What the orphan sweep polls: every poller in use, and the site backend's under
        every identity the policy names (after a restart, jobs of an identity no reconcile
        has used yet may be orphans too)."""
        prefixes = [None, *(p.submit_as for p in self.site.namespaces.values()
                            if p.submit_as is not None)]
        for prefix in prefixes:
            self.poller_as(self.site.backend, prefix)
        return self.pollers_in_use()

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())

    def usage(self) -> UsageLedger:
        """Every cluster's usage accounting, and the accounting collectors (one per
        backend, asking at most every usageInterval)."""
        if self.usage_ledger is None:
            self.usage_ledger = UsageLedger(self.site.usage_interval)
        return self.usage_ledger

    async def end_jobs(self, uid: str, kinds: list[str], mine: Callable[[ObservedJob], bool],
                       namespace: str | None = None) -> list[str]:
        """Deletion's one mechanism: cancel every live job `mine` selects on these backends,
        as the namespace's identity, under the owner's lock, and return the ids not yet
        finished (empty when done). ENDING counts as unfinished: a job is gone only once
        its processes are."""
        return await self.end_jobs_on(uid, [self.poller(kind, namespace)
                                            for kind in dict.fromkeys(kinds)], mine)

    async def end_jobs_on(self, uid: str, pollers: list[BatchedPoller],
                          mine: Callable[[ObservedJob], bool]) -> list[str]:
        """end_jobs on these pollers (each job is cancelled once, by the first poller that
        lists it: with squeueAllUsers, two identities may see the same job).

        Snapshots come from the shared poller within its minimum interval, not a fresh
        query per deletion: deleting 50 clusters at once costs one squeue per period, not
        100 (jobs submitted since the snapshot are in it already, recorded at submission).

        One identity that cannot list or cancel (its sudo rule missing, say) does not stop
        the others: its error is logged, the other pollers do their part, and then the
        first error is raised, since jobs only that identity sees may still run."""
        remaining: list[str] = []
        cancelled: set[str] = set()
        failed: Exception | None = None
        async with self.lock(uid):
            for poller in dict.fromkeys(pollers):
                try:
                    snapshot = await poller.get()
                    live = [j.job_id for j in snapshot.jobs.values()
                            if mine(j) and j.state.live and j.job_id not in cancelled]
                    if live:
                        await poller.backend.cancel(live)
                        poller.record_cancelled(live)
                        cancelled.update(live)
                        snapshot = await poller.get()
                except (BatchSystemUnavailable, BatchSystemError) as exc:
                    log.warning("ending the jobs of %s: %s", uid, exc)
                    failed = failed or exc
                    continue
                remaining += [j.job_id for j in snapshot.jobs.values()
                              if mine(j) and not j.state.terminal and j.job_id not in remaining]
        if failed is not None:
            raise failed
        return remaining

    def make_staging(self, namespace: str, *paths: Path) -> None:
        """Create a resource's staging directories, shared with the namespace's identity
        where its policy names a stagingGroup (policy.make_staging)."""
        make_staging(list(paths), policy_for(self.site, namespace))

    def staging_dir(self, namespace: str, name: str, uid: str, kind: str = "clusters") -> Path:
        # The uid keeps a re-created cluster of the same name away from its predecessor's
        # scheduler file and logs.
        return Path(self.site.staging_dir) / kind / namespace / f"{name}-{uid[:8]}"


class ClusterReconciler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _tls_allowed(self, model: ClusterModel) -> None:
        """A TLS cluster's keys belong to the operator's account (0700/0600): jobs run as
        another user (the namespace policy's submitAs) could not read them."""
        policy = policy_for(self.runtime.site, model.namespace)
        if tls.needs_tls(model.protocols) and policy is not None and policy.submit_as:
            raise PolicyError("spec.scheduler.protocol", "TLS is not available in namespace "
                              f"{model.namespace}, whose jobs run as another user: they "
                              "could not read the cluster's keys", "use protocol: tcp here",
                              "submitAs", model.namespace)

    @staticmethod
    def _ensure_tls(model: ClusterModel, ctx: RenderContext, cluster_jobs: list[ObservedJob]
                    ) -> str:
        """A TLS cluster's credentials exist before any job is rendered (its scripts name
        the files); idempotent (tls.ensure_cluster_credentials), never replaced under a
        running scheduler (`cluster_jobs`: the cluster's own jobs), and usable (not
        expired) before the operator's RPC uses them. The problem, if any."""
        if ctx.tls is None:
            return ""
        running = any(j.identity.role in SCHEDULER_ROLES and j.state is JobState.RUNNING
                      for j in cluster_jobs)
        try:
            tls.ensure_cluster_credentials(Path(ctx.scheduler_file).parent, model.namespace,
                                           model.name, model.uid, in_use=running)
            tls.check_files(ctx.tls)
        except tls.TLSError as exc:
            return f"the cluster's TLS credentials cannot be used: {exc}"
        except OSError as exc:
            return f"cannot read or write the cluster's TLS credentials, retrying: {exc}"
        return ""

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
            scheduler_preloads=tuple(str(staging / name) for name in SCHEDULER_PRELOADS
                                     if name != PERFORMANCE_PRELOAD_NAME
                                     or model.performance_report),
            tls=tls.tls_files(staging) if tls.needs_tls(model.protocols) else None,
        )

    def render_all(self, manifest: dict[str, Any],
                   groups: Sequence[dict[str, Any]] = ()) -> list[JobRequest]:
        """The scripts a fresh cluster would submit (for `dask-hpc render`); refused like
        the reconcile refuses (policy included)."""
        model = ClusterModel.from_manifest(admit(manifest, self.runtime.site, groups=groups),
                                           self.runtime.site)
        plan = plan_cluster(model, [], None, now=time.time())
        ctx = self._context(model)
        sched = [self._render_scheduler(model, ctx, i) for i in plan.submit
                 if i.role in SCHEDULER_ROLES]
        workers = [i for i in plan.submit if i.role is Role.WORKER]
        return sched + self._worker_requests(model, ctx, workers, self.runtime.backend(
            model.backend, model.namespace))

    async def reconcile(self, manifest: dict[str, Any], old_status: dict[str, Any],
                        events: EventSink = _no_events,
                        groups: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """`groups`: the cluster's DaskWorkerGroups, where the caller knows them, so that
        the policy's totals (maxWorkers, maxCores, maxGpus) count the whole cluster (not
        once this spec was accepted: policy.counts_siblings)."""
        old_conditions = old_status.get("conditions") or []
        try:
            valid = admit(manifest, self.runtime.site, groups=groups
                          if counts_siblings(manifest, old_status) else ())
            model = ClusterModel.from_manifest(valid, self.runtime.site)
            self._tls_allowed(model)
            poller = self.runtime.poller(model.backend, model.namespace)
        except ManifestError as exc:
            # Refuse, and touch nothing: jobs of an earlier valid spec keep running.
            return refused(exc, old_status, events)
        async with self.runtime.lock(model.uid):
            try:
                snapshot = await poller.get()
            except BatchSystemUnavailable as exc:
                return outage_status(exc, old_conditions, events)
            _recovered(old_conditions, events)
            jobs = snapshot.owned_by(model.uid)
            ctx = self._context(model)
            problem = self._ensure_tls(model, ctx, jobs)
            if problem:
                return {"message": problem, "conditions": old_conditions}
            live_sched = any(j.identity.role in SCHEDULER_ROLES and j.state is JobState.RUNNING
                             for j in jobs)
            dask = await dask_rpc.observe(ctx.scheduler_file, self._groups_query(model, jobs),
                                          tls.security_for(ctx.tls)) if live_sched else None
            plan = plan_cluster(model, jobs, dask, old_status.get("schedulerJobId"),
                                now=time.time(), spec_changed=_spec_changed(manifest, old_status),
                                policy=FailurePolicy.of(self.runtime.site),
                                recovery=SchedulerRecovery.of(valid["spec"]),
                                restarts=_recorded_restarts(old_status))
            if plan.lost or plan.failed:
                # The cluster's DaskWorkerGroups lost their scheduler too (a scan of every
                # job, only while the scheduler is gone).
                plan.cancel += group_workers_of(model, snapshot.jobs.values())
            if plan.lost:
                # Before anything else, so no worker submitted from now on (the groups'
                # included) finds the dead scheduler's address.
                dask_rpc.remove_stale_scheduler_files(ctx)
                # Once per loss: a restart whose submission is refused is tried again at
                # each reconcile (planning.submitted_restarts), each saying SubmitFailed.
                if not str(old_status.get("message") or "").startswith(
                        f"scheduler lost: {plan.lost};"):
                    events("Warning", "SchedulerLost", f"{plan.lost}; restarting the "
                           f"scheduler (restart {plan.restarts} of {plan.max_restarts})")
            notes = await self._act(model, ctx, plan, dask, poller, events)
            if plan.lost:
                new = [j.job_id for j in poller.snapshot.owned_by(model.uid)
                       if j.identity.role is Role.SCHEDULER and j.state.live]
                if new:
                    events("Normal", "SchedulerRestarted",
                           f"submitted scheduler job {new[0]} (restart {plan.restarts} of "
                           f"{plan.max_restarts}) and new workers")
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
        status["usage"] = await self._usage(model, poller, Path(ctx.scheduler_file).parent)
        if ctx.tls is not None:
            status["tls"] = tls.status_of(ctx.tls)
        status["observedGeneration"] = manifest.get("metadata", {}).get("generation")
        if not status.get("schedulerJobId"):
            status["schedulerJobId"] = old_status.get("schedulerJobId")
        emit(events, status_events(old_status, status))
        return status

    async def _usage(self, model: ClusterModel, poller: BatchedPoller,
                     staging: Path) -> dict[str, Any]:
        """status.usage: the cluster's jobs and its DaskWorkerGroups' (told by their
        reconciles), accounted at the collector's pace (usageInterval)."""
        ledger = self.runtime.usage()
        snapshot = poller.snapshot
        jobs = [*snapshot.owned_by(model.uid),
                *(j for g in ledger.group_uids(model.uid) for j in snapshot.owned_by(g))]
        entry = await ledger.update(model.namespace, model.name, model.uid,
                                    staging / history.USAGE_FILE, jobs, poller.backend,
                                    requested_of(model))
        return usage_status(entry.summary(), entry.as_of)

    async def _act(self, model: ClusterModel, ctx: RenderContext, plan: Plan,
                   dask: DaskView | None, poller: BatchedPoller,
                   events: EventSink) -> list[str]:
        notes: list[str] = []
        backend = poller.backend
        to_cancel = list(plan.cancel)
        if plan.retire and dask is not None:
            names = [n for r in plan.retire for n in r.worker_names]
            try:
                retired = await dask_rpc.retire(dask.address, names, tls.security_for(ctx.tls))
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

        self.runtime.make_staging(model.namespace, Path(ctx.scheduler_file).parent,
                                  Path(ctx.log_dir))
        # Scheduler first: its file appears sooner, and workers wait for it anyway.
        for identity in [i for i in identities if i.role in SCHEDULER_ROLES]:
            dask_rpc.remove_stale_scheduler_files(ctx)
            # Replaced, never written through: the jobs' user may write the directory.
            if len(ctx.protocols) > 1:
                staging_files.replace_file(Path(ctx.preload_path),
                                           LISTENERS_PRELOAD.encode())
            for preload in ctx.scheduler_preloads:
                staging_files.replace_file(
                    Path(preload), SCHEDULER_PRELOADS[Path(preload).name].encode())
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
            uid, [spec.get("backend") or self.runtime.site.backend, *self.runtime.pollers], mine,
            namespace)
        if not remaining and whole_cluster:
            staging = self.runtime.staging_dir(namespace, meta["name"], uid)
            # Keys are secrets: gone first, and never archived with the history.
            tls.remove_credentials(staging)
            # The final accounting records, now that every job has ended (one forced query;
            # a record not final yet keeps the figures the poll gave, marked provisional).
            # Its own jobs and its DaskWorkerGroups' (by uid: finished workers of an older
            # namesake may still be listed).
            owners = {uid, *self.runtime.usage().group_uids(uid)}
            await self.runtime.usage().finish(
                namespace, meta["name"], uid, staging / history.USAGE_FILE,
                [j for _, p in self.runtime.pollers_in_use() for j in p.snapshot.jobs.values()
                 if j.identity.owner_uid in owners],
                self.runtime.backend(spec.get("backend") or self.runtime.site.backend,
                                     namespace))
            # What the cluster computed outlives it (`dask-hpc history`): keep it first. In
            # threads: up to 50 performance reports of 1.7 MB each, on a shared filesystem,
            # must not hold up every other cluster's reconcile.
            await asyncio.to_thread(history.keep, staging, history.archive_path(
                self.runtime.site.staging_dir, namespace, meta["name"], uid))
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
        return remaining


class GroupReconciler(ClusterReconciler):
    """A DaskWorkerGroup: its own replicas and jobs, the scheduler of the cluster it names."""

    async def reconcile_group(self, manifest: dict[str, Any], old_status: dict[str, Any],
                              cluster: dict[str, Any] | None,
                              events: EventSink = _no_events,
                              groups: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """`groups`: the cluster's DaskWorkerGroups (this one may be among them), for the
        policy's totals."""
        old_conditions = old_status.get("conditions") or []
        try:
            valid = admit(manifest, self.runtime.site, cluster=cluster, groups=groups)
        except ManifestError as exc:
            return refused(exc, old_status, events)
        meta = valid["metadata"]
        group = GroupModel.from_worker(meta["name"], meta["uid"], valid["spec"]["worker"])
        cluster_name = valid["spec"]["cluster"]
        namespace = meta.get("namespace") or "default"
        problem, cmodel = self._cluster_problem(group, cluster_name, namespace, cluster)
        if cmodel is None:
            # No cluster to serve the group: end any jobs it still has (they are orphans).
            try:
                await self.teardown(manifest)
            except BatchSystemUnavailable as exc:
                return outage_status(exc, old_conditions, events)
            return group_status(group, [], None, Plan(), problem, old_conditions, now_iso())
        model = replace(cmodel, groups=(group,))
        self.runtime.usage().link_group(cmodel.uid, group.owner_uid, group.name, Requested(
            group.template.cores, group.template.gpus))
        poller = self.runtime.poller(model.backend, namespace)
        async with self.runtime.lock(group.owner_uid):
            try:
                snapshot = await poller.get()
            except BatchSystemUnavailable as exc:
                return outage_status(exc, old_conditions, events)
            _recovered(old_conditions, events)
            jobs = snapshot.owned_by(group.owner_uid)
            ctx = self._context(model)
            # Normally the cluster's reconcile made them already; a group reconciled first
            # must not submit workers whose scripts name files that do not exist yet.
            problem = problem or self._ensure_tls(model, ctx, snapshot.owned_by(cmodel.uid))
            dask = await dask_rpc.observe(ctx.scheduler_file, self._groups_query(
                model, jobs, (cmodel.groups[0], group)), tls.security_for(ctx.tls))
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

    def render_group(self, manifest: dict[str, Any], cluster: dict[str, Any],
                     groups: Sequence[dict[str, Any]] = ()) -> list[JobRequest]:
        """The scripts a fresh group of `cluster` would submit (for `dask-hpc render`)."""
        valid = admit(manifest, self.runtime.site, cluster=cluster, groups=groups)
        meta = valid["metadata"]
        group = GroupModel.from_worker(meta["name"], meta["uid"], valid["spec"]["worker"])
        cmodel = ClusterModel.from_manifest(validate(cluster), self.runtime.site)
        model = replace(cmodel, groups=(group,))
        plan = plan_group(cmodel.namespace, cmodel.name, group, [], None, Plan(),
                          now=time.time())
        return self._worker_requests(model, self._context(model), plan.submit,
                                     self.runtime.backend(model.backend, model.namespace))

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
        if protocol and protocol != tls.PROTOCOL and tls.needs_tls(cmodel.protocols):
            return (f"DaskCluster {name} uses TLS, which every worker must speak: remove "
                    "spec.worker.cuda.protocol (GPU workers then connect over tls)", cmodel)
        if protocol and protocol not in cmodel.protocols:
            return (f"the scheduler of DaskCluster {name} does not listen on {protocol}: add "
                    f"{protocol} to its spec.scheduler.extraProtocols", cmodel)
        return "", cmodel
