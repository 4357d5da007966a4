"""Desired versus observed, decided without I/O.

`plan_cluster` says what to submit, cancel and retire; `cluster_status` says what to report.
Both are pure functions of (model, observed jobs, what the Dask scheduler reports, the time
passed in), which is what makes the reconcile idempotent: run it twice on the same
observation and the second run plans nothing that the first one's actions (already visible
in the poller) do not cover. The time decides two things: which running jobs are near their
walltime and replaced ahead of it (hpc_bridge.lifetime), and when a group whose jobs keep
failing may submit again (FailurePolicy).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hpc_bridge.lifetime import worker_lifetime
from hpc_bridge.model import JobIdentity, JobState, ObservedJob, Role

from .crd_schema import DEFAULT_MAX_RESTARTS, ON_FAILURE
from .model import ClusterModel, GroupModel
from .site_config import SiteConfig

# Failures worth a condition: one failed job is an incident, two in a row a pattern.
REPORT_STREAK = 2
# The error output a condition carries: the newest failed job's last lines, bounded.
TAIL_LINES = 20
TAIL_CHARS = 2048


@dataclass(frozen=True)
class FailurePolicy:
    """How a group whose worker jobs keep failing is retried (no submission storm on a
    broken prologue, a bad module or a full filesystem; no give-up on one bad node).

    With a streak of k failed jobs in a row, the next submission waits until the newest
    failure's end + base · 2^(k-1) s (at most `max_delay_s`); from `limit` failures on the
    group is not resubmitted until its spec changes or a worker job succeeds. A job that
    failed after running `long_run_s` or more proved it could start: it ends the streak.
    """

    base_s: float = 5.0
    max_delay_s: float = 300.0
    limit: int = 5
    long_run_s: float = 300.0

    @classmethod
    def of(cls, site: SiteConfig) -> FailurePolicy:
        return cls(site.failure_backoff_base, site.failure_backoff_max, site.failure_limit)

    def delay(self, streak: int) -> float:
        return min(self.max_delay_s, self.base_s * 2 ** (streak - 1)) if streak > 0 else 0.0


DEFAULT_FAILURE_POLICY = FailurePolicy()


@dataclass(frozen=True)
class SchedulerRecovery:
    """What a cluster does when its scheduler job ends (`spec.scheduler.onFailure`,
    `maxRestarts`). Either way the workers go: they were the dead scheduler's, and their
    data went with it. Fail (the default, as before the field existed) leaves the cluster
    Failed for the user to look at; Restart submits a new scheduler and new workers.

    Restarts are counted without memory of our own: scheduler jobs are numbered (their
    index, in every job's comment), the first is 0 and each restart takes the next, so the
    newest scheduler job tells how many restarts came before it — even after the batch
    system has forgotten its predecessors (SLURM's MinJobAge). When it has forgotten them
    all, `status.schedulerRestarts` (written from the same number) is the record.
    """

    restart: bool = False
    max_restarts: int = DEFAULT_MAX_RESTARTS

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> SchedulerRecovery:
        """From a validated (defaulted) DaskCluster spec."""
        scheduler = spec.get("scheduler") or {}
        return cls(scheduler.get("onFailure", ON_FAILURE[0]) == "Restart",
                   int(scheduler.get("maxRestarts", DEFAULT_MAX_RESTARTS)))


FAIL_ON_SCHEDULER_LOSS = SchedulerRecovery()


@dataclass(frozen=True)
class FailureStreak:
    """A group's worker jobs that failed in a row, newest first, and what the plan did."""

    group: str
    failed: tuple[ObservedJob, ...]
    retry_in: float | None = None  # seconds until the next submission; None: not waiting
    stopped: bool = False  # at the limit: not resubmitted until spec change or success

    @property
    def count(self) -> int:
        return len(self.failed)

    @property
    def newest(self) -> ObservedJob:
        return self.failed[0]

    def summary(self) -> str:
        text = f"group {self.group}: {self.count} worker jobs failed in a row"
        if self.stopped:
            return (f"{text}; stopped after {self.count} failures (until the spec changes "
                    "or a worker job succeeds)")
        if self.retry_in is not None:
            return f"{text}; retrying in {self.retry_in:.0f} s"
        return text


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
    # The scheduler's own choice (workers_to_close, per group): who can go, first first.
    close_order: tuple[str, ...] = ()
    idle_since: float | None = None  # the scheduler's clock; None while it has work
    clock: float | None = None  # the scheduler's clock when asked

    @functools.cached_property
    def _by_job_name(self) -> dict[str, list[WorkerView]]:
        """Workers under every job name they may belong to: their own name and each prefix
        before a `-` (a job of processes > 1 runs `<job name>-<i>`), the same rule as
        JobIdentity.owns_worker_name, built once instead of a scan per job."""
        index: dict[str, list[WorkerView]] = {}
        for worker in self.workers:
            keys = {worker.name} | {worker.name[:i] for i, c in enumerate(worker.name)
                                    if c == "-"}
            for key in keys:
                index.setdefault(key, []).append(worker)
        return index

    def workers_of(self, job: ObservedJob) -> list[WorkerView]:
        return list(self._by_job_name.get(job.identity.job_name, ()))


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
    # Running jobs near their walltime, already replaced: not counted in status.
    expiring: set[str] = field(default_factory=set)
    failures: list[FailureStreak] = field(default_factory=list)  # groups failing in a row
    # The scheduler's incarnation: 0 for the first scheduler job, k after k restarts
    # (status.schedulerRestarts).
    restarts: int = 0
    lost: str = ""  # the scheduler job that ended, when this plan restarts the scheduler
    max_restarts: int = 0  # the limit `lost` is counted against
    advice: str = ""  # with `failed`: what the user can do about it

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


def scheduler_incarnation(jobs: Sequence[ObservedJob], recorded: int = 0) -> int:
    """How many times the scheduler has been restarted (SchedulerRecovery): the index of
    the live scheduler job, or with none live the highest index seen or `recorded` (the
    last status.schedulerRestarts) — a count the batch system cannot make us forget."""
    sched = _scheduler_jobs(jobs)
    live = [j.identity.index for j in sched if j.state.live]
    if live:
        return min(live)  # the one kept (a second is a lost race, cancelled below)
    return max([j.identity.index for j in sched] + [recorded])


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


def group_workers_of(model: ClusterModel, jobs: Iterable[ObservedJob]) -> list[str]:
    """Live worker jobs of the cluster's DaskWorkerGroups (owned by the groups, named
    after the cluster). They are connected to the cluster's scheduler: when it is lost they
    are orphans too, and a restart must not leave them waiting on a dead address."""
    return [j.job_id for j in jobs if j.identity.role is Role.WORKER and j.state.live
            and j.identity.namespace == model.namespace and j.identity.cluster == model.name
            and j.identity.owner_uid != model.uid]


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
    # The scheduler chooses (workers_to_close: idle first, least data first); jobs it
    # would not close yet come last, holding the least data first.
    rank = {name: i for i, name in enumerate(dask.close_order)}

    def closing_order(job: ObservedJob) -> tuple[int, int, int]:
        names = [w.name for w in dask.workers_of(job)]
        chosen = max((rank.get(n, len(rank)) for n in names), default=len(rank))
        held = sum(w.managed_bytes for w in dask.workers_of(job))
        return chosen, held, -job.identity.index

    connected = sorted((j for j in running if dask.workers_of(j)), key=closing_order)
    for job in connected[:surplus]:
        plan.retire.append(Retirement(job.job_id, [w.name for w in dask.workers_of(job)]))


def _why_not_restart(model: ClusterModel, recovery: SchedulerRecovery,
                     restarts: int) -> str:
    """Empty when a lost scheduler is to be restarted; otherwise the advice that goes with
    the Failed phase."""
    if model.mode == "allocation":
        return ("an allocation (spec.mode: allocation) is not restarted, its workers ended "
                "with it: delete and re-create the cluster")
    if not recovery.restart:
        return ("spec.scheduler.onFailure is Fail: delete and re-create the cluster, or set "
                "onFailure: Restart to have a new scheduler started")
    if restarts >= recovery.max_restarts:
        return (f"the scheduler was restarted {restarts} time(s), spec.scheduler.maxRestarts "
                f"is {recovery.max_restarts}: see the scheduler jobs' logs for why it ends, "
                "then raise maxRestarts or delete and re-create the cluster")
    return ""


def plan_cluster(model: ClusterModel, jobs: Sequence[ObservedJob], dask: DaskView | None,
                 known_scheduler_job: str | None = None, *, now: float,
                 spec_changed: bool = False,
                 policy: FailurePolicy = DEFAULT_FAILURE_POLICY,
                 recovery: SchedulerRecovery = FAIL_ON_SCHEDULER_LOSS,
                 restarts: int = 0) -> Plan:
    """`now` (epoch seconds, the clock the backends' start and end times use) makes
    walltime expiry and failure back-off decidable without reading a clock here;
    `spec_changed` (the manifest's generation moved) lifts a failure stop once;
    `recovery` says what a lost scheduler leads to, `restarts` is the last
    status.schedulerRestarts (SchedulerRecovery)."""
    plan = Plan()
    sched = _scheduler_jobs(jobs)
    live_sched = [j for j in sched if j.state.live]
    plan.restarts = scheduler_incarnation(jobs, restarts)
    failure = scheduler_failure(jobs, known_scheduler_job)
    if failure:
        # Workers of a dead scheduler would idle until their death timeout: end them now.
        doomed = [j.job_id for j in jobs if j.identity.role is Role.WORKER and j.state.live]
        plan.cancel = list(doomed)
        advice = _why_not_restart(model, recovery, plan.restarts)
        if advice:
            # Where restarts were asked for, the message says why there is none; otherwise
            # the advice is in the SchedulerReady condition.
            plan.failed = f"{failure}; not restarted: {advice}" if recovery.restart \
                else failure
            plan.advice = advice
            return plan
        plan.lost, plan.max_restarts = failure, recovery.max_restarts
        plan.restarts += 1
        plan.submit.append(JobIdentity(model.namespace, model.name, model.uid, Role.SCHEDULER,
                                       "default", plan.restarts))
        # The new scheduler gets new workers: the cancelled ones no longer count.
        gone = set(doomed)
        after = [replace(j, state=JobState.ENDING, reason="cancel requested")
                 if j.job_id in gone else j for j in jobs]
        for group in model.groups:
            plan_group(model.namespace, model.name, group, after, None, plan, now=now,
                       spec_changed=spec_changed, policy=policy)
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
        plan_group(model.namespace, model.name, group, jobs, dask, plan, now=now,
                   spec_changed=spec_changed, policy=policy)
    return plan


def expiring_jobs(group: GroupModel, live: Sequence[ObservedJob], now: float
                  ) -> list[ObservedJob]:
    """Running jobs old enough to be replaced before their walltime (hpc_bridge.lifetime):
    their workers retire on their own soon, so they no longer count toward replicas."""
    life = worker_lifetime(group.template.walltime)
    if life is None:
        return []
    return [j for j in live if j.state is JobState.RUNNING and j.started_at is not None
            and now - j.started_at >= life.replace_after_s]


def failure_streak(group_jobs: Sequence[ObservedJob], dask: DaskView | None,
                   policy: FailurePolicy = DEFAULT_FAILURE_POLICY) -> list[ObservedJob]:
    """The group's worker jobs that failed in a row, newest (highest index) first.

    Counting stops at the first sign that jobs can work: a job that completed, one that was
    cancelled (by us, a user or a preemption: not its fault), one that failed only after
    running `long_run_s`, or a live job whose workers are connected. Queued or starting
    jobs, and ended jobs whose outcome is unknown (GONE, ENDING), are passed over.
    """
    streak: list[ObservedJob] = []
    for job in sorted(group_jobs, key=lambda j: -j.identity.index):
        if job.state.live:
            if dask is not None and dask.workers_of(job):
                break
            continue
        if job.state is JobState.FAILED:
            ran = (job.ended_at - job.started_at if job.ended_at is not None
                   and job.started_at is not None else 0.0)
            if ran >= policy.long_run_s:
                break
            streak.append(job)
        elif job.state in (JobState.COMPLETED, JobState.CANCELLED):
            break
    return streak


def _hold_back(streak: list[ObservedJob], now: float, spec_changed: bool,
               policy: FailurePolicy) -> tuple[float | None, bool]:
    """(seconds to wait before submitting, stopped) for a group with this failure streak."""
    if not streak or spec_changed:
        return None, False
    if len(streak) >= policy.limit:
        return None, True
    ended = streak[0].ended_at
    if ended is None:  # no end time known: the limit alone bounds the retries
        return None, False
    wait = ended + policy.delay(len(streak)) - now
    return (wait, False) if wait > 0 else (None, False)


def plan_group(namespace: str, cluster: str, group: GroupModel, jobs: Sequence[ObservedJob],
               dask: DaskView | None, plan: Plan, *, now: float, spec_changed: bool = False,
               policy: FailurePolicy = DEFAULT_FAILURE_POLICY) -> Plan:
    """One worker group's part of a plan (the default group, or a DaskWorkerGroup).

    Expiring jobs (near their walltime) do not count toward replicas, so their replacements
    are submitted while they still serve, and they are never chosen for scale-down (they
    leave on their own) except when the group scales to zero. Failed jobs are replaced
    with back-off and a limit (FailurePolicy).
    """
    group_jobs = _group_jobs(jobs, group)
    live = [j for j in group_jobs if j.state.live]
    expiring = {j.job_id for j in expiring_jobs(group, live, now)}
    fresh = [j for j in live if j.job_id not in expiring]
    plan.expiring |= expiring
    streak = failure_streak(group_jobs, dask, policy)
    missing = group.replicas - len(fresh)
    retry_in, stopped = _hold_back(streak, now, spec_changed, policy) if missing > 0 \
        else (None, False)
    if streak:
        plan.failures.append(FailureStreak(group.name, tuple(streak), retry_in, stopped))
    if expiring and missing > 0:
        plan.notes.append(f"group {group.name}: {len(expiring)} worker job(s) near the end "
                          "of their walltime are being replaced")
    if missing > 0:
        if stopped or retry_in is not None:
            plan.notes.append(plan.failures[-1].summary())
            return plan
        if streak:
            plan.notes.append(f"{plan.failures[-1].summary()}; retrying now")
        start = _next_index(group_jobs)
        plan.submit += [JobIdentity(namespace, cluster, group.owner_uid, Role.WORKER,
                                    group.name, start + i) for i in range(missing)]
        return plan
    # Scale-down picks among fresh jobs: expiring ones are leaving anyway. Scaled to zero,
    # nothing is to stay, so they go too (retired, their data moved, like the others).
    pool = fresh if group.replicas else live
    if len(pool) > group.replicas:
        _plan_scale_down(pool, len(pool) - group.replicas, dask, plan)
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


def group_counts(group: GroupModel, jobs: Sequence[ObservedJob], dask: DaskView | None,
                 expiring: Collection[str] = frozenset()) -> GroupCounts:
    """Pending and running count the jobs that hold the group's replicas: an expiring job
    (replaced before its walltime) is not one. Its connected workers still count as ready
    while its replacement is not, so a walltime rollover keeps a Running group Running."""
    live = [j for j in _group_jobs(jobs, group) if j.state.live]
    fresh = [j for j in live if j.job_id not in expiring]
    running = [j for j in fresh if j.state is JobState.RUNNING]
    connected = [j for j in live if j.state is JobState.RUNNING
                 and dask is not None and dask.workers_of(j)]
    ready = sum(1 for j in connected if j.job_id not in expiring)
    stand_ins = sum(1 for j in connected if j.job_id in expiring)
    ready += min(stand_ins, max(0, group.replicas - ready))
    return GroupCounts(group.replicas, len(fresh) - len(running), len(running), ready)


def failing_condition(failures: Sequence[FailureStreak],
                      error_tails: Mapping[str, str] | None) -> dict[str, str] | None:
    """`WorkersFailing`, present only while some group's worker jobs fail in a row: which
    group, how many, what the plan does about it, and the tail of the newest failed job's
    error output (read by the reconcile, passed in by job id) so the cause is on the object."""
    reported = [f for f in failures if f.count >= REPORT_STREAK]
    if not reported:
        return None
    parts = []
    for streak in reported:
        job = streak.newest
        how = job.reason or job.state.value.lower()
        if job.exit_code is not None:
            how += f", exit code {job.exit_code}"
        text = f"{streak.summary()}; newest: job {job.job_id} ({how})"
        tail = bounded_tail((error_tails or {}).get(job.job_id, ""))
        parts.append(f"{text}; its error output ends with:\n{tail}" if tail else text)
    return _condition("WorkersFailing", True, "RepeatedFailures", "\n".join(parts))


def bounded_tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last `lines` non-blank lines of `text`, and at most their last `chars` characters:
    a condition is read in `kubectl describe`, and objects have a size limit."""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    tail = "\n".join(kept)
    return tail[-chars:] if len(tail) > chars else tail


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


def submitted_restarts(plan: Plan, live_scheduler: ObservedJob | None) -> int:
    """status.schedulerRestarts after the plan ran: a planned restart counts only once its
    scheduler job exists (the jobs after acting show it live). A refused submission (a QOS
    limit, sbatch timing out) is retried by the next reconcile under the same index, and
    does not use up spec.scheduler.maxRestarts."""
    if plan.lost and live_scheduler is None:
        return plan.restarts - 1
    return plan.restarts


def cluster_status(model: ClusterModel, jobs: Sequence[ObservedJob], dask: DaskView | None,
                   plan: Plan, old_conditions: Sequence[dict[str, Any]] = (),
                   now: str = "", error_tails: Mapping[str, str] | None = None
                   ) -> dict[str, Any]:
    """`error_tails`: job id -> the end of its error output, for the plan's failing groups."""
    if model.mode == "allocation":
        counts = [allocation_counts(model, jobs, dask)]
    else:
        counts = [group_counts(g, jobs, dask, plan.expiring) for g in model.groups]
    desired = sum(c.desired for c in counts)
    pending = sum(c.pending for c in counts)
    running = sum(c.running for c in counts)
    ready = sum(c.ready for c in counts)
    sched = [j for j in _scheduler_jobs(jobs) if j.state.live]
    sched_job = sched[0] if sched else None
    worker_jobs = [j for j in jobs if j.identity.role is Role.WORKER]

    if plan.failed:
        phase, message = "Failed", plan.failed
    elif plan.lost:
        phase = "Pending"
        message = (f"scheduler lost: {plan.lost}; restart {plan.restarts} of "
                   f"{plan.max_restarts}: " + (f"scheduler job {sched_job.job_id} submitted"
                                               if sched_job else "submitting a scheduler job"))
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

    if dask is not None:
        sched_reason, sched_message = "Connected", f"scheduler at {dask.address}"
    elif plan.failed:
        sched_reason = "Failed"
        sched_message = message if plan.advice in message else f"{message}; {plan.advice}"
    else:
        sched_reason, sched_message = ("SchedulerLost" if plan.lost else "Waiting"), message
    conditions = [
        _condition("Accepted", True, "Valid", "the manifest is valid"),
        _condition("SchedulerReady", dask is not None, sched_reason, sched_message),
        _condition("WorkersReady", dask is not None and ready >= desired,
                   "AllReady" if ready >= desired else "Waiting",
                   f"{ready}/{desired} workers connected to the scheduler"),
    ]
    failing = failing_condition(plan.failures, error_tails)
    if failing is not None:
        conditions.append(failing)
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "replicas": pending + running,
        "workers": {"desired": desired, "pending": pending, "running": running,
                    "ready": ready},
        "backend": model.backend,
        "resources": sorted({r for g in model.groups for r in g.resource_names}),
        "schedulerJobId": sched_job.job_id if sched_job else None,
        "schedulerRestarts": submitted_restarts(plan, sched_job),
        "schedulerAddress": dask.address if dask else None,
        "dashboardURL": dask.dashboard_url if dask else None,
        "conditions": merge_conditions(old_conditions, conditions, now),
    }
    return status


def group_status(group: GroupModel, jobs: Sequence[ObservedJob], dask: DaskView | None,
                 plan: Plan, cluster_problem: str, old_conditions: Sequence[dict[str, Any]],
                 now: str, error_tails: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Status of a DaskWorkerGroup; `cluster_problem` says why its cluster cannot serve it."""
    counts = group_counts(group, jobs, dask, plan.expiring)
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
    failing = failing_condition(plan.failures, error_tails)
    if failing is not None:
        conditions.append(failing)
    return {
        "phase": phase,
        "message": message,
        "replicas": counts.pending + counts.running,
        "workers": counts.as_dict(),
        "resources": group.resource_names,
        "conditions": merge_conditions(old_conditions, conditions, now),
    }


def rejected_status(error: str, old_conditions: Sequence[dict[str, Any]],
                    now: str, reason: str = "InvalidSpec") -> dict[str, Any]:
    """A manifest the operator refuses: nothing is submitted, the reason is on the object
    (`reason`: InvalidSpec, or PolicyViolation for a valid manifest the site's policy
    does not allow)."""
    return {
        "phase": "Failed",
        "message": error,
        "conditions": merge_conditions(
            old_conditions, [_condition("Accepted", False, reason, error)], now),
    }
