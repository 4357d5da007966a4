"""Desired versus observed, decided without I/O.

`plan_cluster` says what to submit, cancel and retire; `cluster_status` says what to report.
Both are pure functions of (model, observed jobs, what the Dask scheduler reports), which is
what makes the reconcile idempotent: run it twice on the same observation and the second
run plans nothing that the first one's actions (already visible in the poller) do not cover.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hpc_bridge.model import JobIdentity, JobState, ObservedJob, Role

from .model import ClusterModel, GroupModel

# A group whose jobs keep failing stops resubmitting (no submission storms on a broken
# prologue); issue-specific back-off lives with the autoscaler work.
MAX_VISIBLE_FAILURES = 3


@dataclass(frozen=True)
class WorkerView:
    name: str
    address: str
    managed_bytes: int = 0


@dataclass(frozen=True)
class DaskView:
    """What the scheduler says; None in the plan's input when it cannot be reached."""

    address: str
    dashboard_url: str
    workers: tuple[WorkerView, ...] = ()

    def workers_of(self, job: ObservedJob) -> list[WorkerView]:
        return [w for w in self.workers if job.identity.owns_worker_name(w.name)]


@dataclass
class Retirement:
    job_id: str
    worker_names: list[str]


@dataclass
class Plan:
    submit: list[JobIdentity] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)  # jobs that hold no data: cancel at once
    retire: list[Retirement] = field(default_factory=list)  # retire through Dask, then cancel
    failed: str = ""  # why the cluster cannot run; non-empty means phase Failed
    notes: list[str] = field(default_factory=list)  # said in status.message

    @property
    def empty(self) -> bool:
        return not (self.submit or self.cancel or self.retire)


def _next_index(jobs: Sequence[ObservedJob]) -> int:
    return max((j.identity.index for j in jobs), default=-1) + 1


SCHEDULER_ROLES = (Role.SCHEDULER, Role.ALLOCATION)  # the job whose end ends the cluster


def _scheduler_jobs(jobs: Sequence[ObservedJob]) -> list[ObservedJob]:
    return [j for j in jobs if j.identity.role in SCHEDULER_ROLES]


def _group_jobs(jobs: Sequence[ObservedJob], group: GroupModel) -> list[ObservedJob]:
    return [j for j in jobs if j.identity.role is Role.WORKER
            and j.identity.group == group.name and j.identity.owner_uid == group.owner_uid]


def scheduler_failure(jobs: Sequence[ObservedJob], known_scheduler_job: str | None) -> str:
    """Non-empty when the scheduler this cluster had is gone (so workers are orphans)."""
    sched = _scheduler_jobs(jobs)
    if any(j.state.live for j in sched):
        return ""
    ended = [j for j in sched if not j.state.live]
    if ended:
        last = max(ended, key=lambda j: j.identity.index)
        return f"scheduler job {last.job_id} ended ({last.state.value.lower()}" + (
            f", {last.reason})" if last.reason else ")")
    if known_scheduler_job:
        return f"scheduler job {known_scheduler_job} is no longer known to the batch system"
    return ""


def _plan_scale_down(live: list[ObservedJob], surplus: int, dask: DaskView | None,
                     plan: Plan) -> None:
    """Cheapest first: queued jobs, then started-but-unconnected, then the connected workers
    holding the least data — those are retired through Dask before their jobs are cancelled."""
    pending = sorted((j for j in live if j.state is JobState.PENDING),
                     key=lambda j: -j.identity.index)
    for job in pending[:surplus]:
        plan.cancel.append(job.job_id)
    surplus -= min(surplus, len(pending))
    if not surplus:
        return
    running = [j for j in live if j.state is JobState.RUNNING]
    if dask is None:
        plan.notes.append(f"{surplus} running worker(s) kept until the scheduler can retire them")
        return
    unconnected = sorted((j for j in running if not dask.workers_of(j)),
                         key=lambda j: -j.identity.index)
    for job in unconnected[:surplus]:
        plan.cancel.append(job.job_id)
    surplus -= min(surplus, len(unconnected))
    connected = sorted((j for j in running if dask.workers_of(j)),
                       key=lambda j: (sum(w.managed_bytes for w in dask.workers_of(j)),
                                      -j.identity.index))
    for job in connected[:surplus]:
        plan.retire.append(Retirement(job.job_id, [w.name for w in dask.workers_of(job)]))


def plan_cluster(model: ClusterModel, jobs: Sequence[ObservedJob], dask: DaskView | None,
                 known_scheduler_job: str | None = None) -> Plan:
    plan = Plan()
    sched = _scheduler_jobs(jobs)
    live_sched = [j for j in sched if j.state.live]
    failure = scheduler_failure(jobs, known_scheduler_job)
    if failure:
        plan.failed = failure
        # Workers of a dead scheduler would idle until their death timeout: end them now.
        plan.cancel = [j.job_id for j in jobs if j.identity.role is Role.WORKER and j.state.live]
        return plan
    allocation = model.mode == "allocation"
    if not live_sched:
        role, group_name = ((Role.ALLOCATION, "allocation") if allocation
                            else (Role.SCHEDULER, "default"))
        plan.submit.append(JobIdentity(model.namespace, model.name, model.uid, role,
                                       group_name, _next_index(sched)))
    for extra in sorted(live_sched, key=lambda j: j.identity.index)[1:]:
        plan.cancel.append(extra.job_id)  # two schedulers can only come from a lost race
    if allocation:
        return plan  # the default group's workers live inside the allocation
    for group in model.groups:
        plan_group(model.namespace, model.name, group, jobs, dask, plan)
    return plan


def plan_group(namespace: str, cluster: str, group: GroupModel, jobs: Sequence[ObservedJob],
               dask: DaskView | None, plan: Plan) -> Plan:
    """One worker group's part of a plan (the default group, or a DaskWorkerGroup)."""
    group_jobs = _group_jobs(jobs, group)
    live = [j for j in group_jobs if j.state.live]
    missing = group.replicas - len(live)
    if missing > 0:
        failures = [j for j in group_jobs if j.state is JobState.FAILED]
        connected = dask is not None and any(dask.workers_of(j) for j in live)
        if len(failures) >= MAX_VISIBLE_FAILURES and not connected:
            plan.notes.append(f"group {group.name}: {len(failures)} worker jobs failed "
                              "in a row; not resubmitting until one succeeds or the spec "
                              "changes")
            return plan
        start = _next_index(group_jobs)
        plan.submit += [JobIdentity(namespace, cluster, group.owner_uid, Role.WORKER,
                                    group.name, start + i) for i in range(missing)]
    elif missing < 0:
        _plan_scale_down(live, -missing, dask, plan)
    return plan


# --- status ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupCounts:
    desired: int
    pending: int
    running: int
    ready: int

    def as_dict(self) -> dict[str, int]:
        return {"desired": self.desired, "pending": self.pending, "running": self.running,
                "ready": self.ready}


def group_counts(group: GroupModel, jobs: Sequence[ObservedJob],
                 dask: DaskView | None) -> GroupCounts:
    live = [j for j in _group_jobs(jobs, group) if j.state.live]
    running = [j for j in live if j.state is JobState.RUNNING]
    ready = [j for j in running if dask is not None and dask.workers_of(j)]
    return GroupCounts(group.replicas, len(live) - len(running), len(running), len(ready))


def _condition(type_: str, ok: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason,
            "message": message}


def merge_conditions(old: Sequence[dict[str, Any]], new: Sequence[dict[str, str]],
                     now: str) -> list[dict[str, str]]:
    """Keep lastTransitionTime unless a condition's status flips."""
    previous = {c.get("type"): c for c in old or []}
    merged = []
    for cond in new:
        before = previous.get(cond["type"])
        since = (before.get("lastTransitionTime") if before and before.get("status")
                 == cond["status"] else None) or now
        merged.append({**cond, "lastTransitionTime": since})
    return merged


def _waiting_reason(jobs: Sequence[ObservedJob]) -> str:
    reasons = sorted({j.reason for j in jobs if j.state is JobState.PENDING and j.reason})
    return f" ({', '.join(reasons)})" if reasons else ""


def allocation_counts(model: ClusterModel, jobs: Sequence[ObservedJob],
                      dask: DaskView | None) -> GroupCounts:
    """An allocation's workers are its tasks: queued or running together."""
    replicas = model.groups[0].replicas
    live = [j for j in _scheduler_jobs(jobs) if j.state.live]
    if not live:
        return GroupCounts(replicas, 0, 0, 0)
    if live[0].state is JobState.PENDING:
        return GroupCounts(replicas, replicas, 0, 0)
    ready = len(dask.workers_of(live[0])) if dask is not None else 0
    return GroupCounts(replicas, 0, replicas, ready)


def cluster_status(model: ClusterModel, jobs: Sequence[ObservedJob], dask: DaskView | None,
                   plan: Plan, old_conditions: Sequence[dict[str, Any]] = (),
                   now: str = "") -> dict[str, Any]:
    if model.mode == "allocation":
        counts = [allocation_counts(model, jobs, dask)]
    else:
        counts = [group_counts(g, jobs, dask) for g in model.groups]
    desired = sum(c.desired for c in counts)
    pending = sum(c.pending for c in counts)
    running = sum(c.running for c in counts)
    ready = sum(c.ready for c in counts)
    sched = [j for j in _scheduler_jobs(jobs) if j.state.live]
    sched_job = sched[0] if sched else None
    worker_jobs = [j for j in jobs if j.identity.role is Role.WORKER]

    if plan.failed:
        phase, message = "Failed", plan.failed
    elif dask is None:
        phase = "Pending"
        what = "allocation" if model.mode == "allocation" else "scheduler job"
        if sched_job is None:
            message = f"submitting the {what}"
        elif sched_job.state is JobState.PENDING:
            message = f"{what} {sched_job.job_id} is queued{_waiting_reason([sched_job])}"
        else:
            message = f"{what} {sched_job.job_id} is starting"
    elif ready == desired and pending + running == desired:
        phase, message = "Running", f"{ready}/{desired} workers ready"
    else:
        phase = "Scaling"
        message = f"{ready}/{desired} workers ready"
        if pending:
            message += f", {pending} queued{_waiting_reason(worker_jobs)}"
    if plan.notes:
        message += "; " + "; ".join(plan.notes)

    conditions = [
        _condition("Accepted", True, "Valid", "the manifest is valid"),
        _condition("SchedulerReady", dask is not None,
                   "Connected" if dask is not None else ("Failed" if plan.failed else "Waiting"),
                   f"scheduler at {dask.address}" if dask is not None else message),
        _condition("WorkersReady", dask is not None and ready >= desired,
                   "AllReady" if ready >= desired else "Waiting",
                   f"{ready}/{desired} workers connected to the scheduler"),
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "replicas": pending + running,
        "workers": {"desired": desired, "pending": pending, "running": running,
                    "ready": ready},
        "backend": model.backend,
        "resources": sorted({r for g in model.groups for r in g.resource_names}),
        "schedulerJobId": sched_job.job_id if sched_job else None,
        "schedulerAddress": dask.address if dask else None,
        "dashboardURL": dask.dashboard_url if dask else None,
        "conditions": merge_conditions(old_conditions, conditions, now),
    }
    return status


def group_status(group: GroupModel, jobs: Sequence[ObservedJob], dask: DaskView | None,
                 plan: Plan, cluster_problem: str, old_conditions: Sequence[dict[str, Any]],
                 now: str) -> dict[str, Any]:
    """Status of a DaskWorkerGroup; `cluster_problem` says why its cluster cannot serve it."""
    counts = group_counts(group, jobs, dask)
    group_jobs = [j for j in jobs if j.identity.role is Role.WORKER]
    if cluster_problem:
        phase, message = "Pending", cluster_problem
    elif counts.ready == counts.desired and counts.pending + counts.running == counts.desired:
        phase, message = "Running", f"{counts.ready}/{counts.desired} workers ready"
    else:
        phase = "Scaling" if dask is not None else "Pending"
        message = f"{counts.ready}/{counts.desired} workers ready"
        if counts.pending:
            message += f", {counts.pending} queued{_waiting_reason(group_jobs)}"
    if plan.notes:
        message += "; " + "; ".join(plan.notes)
    conditions = [
        _condition("Accepted", True, "Valid", "the manifest is valid"),
        _condition("ClusterReady", not cluster_problem,
                   "Waiting" if cluster_problem else "Found",
                   cluster_problem or "the cluster's scheduler is known"),
        _condition("WorkersReady", dask is not None and counts.ready >= counts.desired,
                   "AllReady" if counts.ready >= counts.desired else "Waiting",
                   f"{counts.ready}/{counts.desired} workers connected to the scheduler"),
    ]
    return {
        "phase": phase,
        "message": message,
        "replicas": counts.pending + counts.running,
        "workers": counts.as_dict(),
        "resources": group.resource_names,
        "conditions": merge_conditions(old_conditions, conditions, now),
    }


def rejected_status(error: str, old_conditions: Sequence[dict[str, Any]],
                    now: str) -> dict[str, Any]:
    """A manifest the operator refuses: nothing is submitted, the reason is on the object."""
    return {
        "phase": "Failed",
        "message": error,
        "conditions": merge_conditions(
            old_conditions, [_condition("Accepted", False, "InvalidSpec", error)], now),
    }
