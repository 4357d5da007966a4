"""What a cluster's jobs used: core-hours, GPU-hours, queue waits, run time (pure).

The figures come from the batch system's own records where it keeps them (hpc_bridge's
JobAccounting: sacct, `sacct -c`, `qstat -x`), and from what we asked for where it does not:
SLURM's job completion log (no slurmdbd) records no GPUs, the local backend runs exactly what
was requested. Every figure says where it came from (`source`, `gpu_source`) so that a
"requested" number is never mistaken for an accounted one.

Definitions, the same in status.usage, `dask-hpc history` and the metrics:
- run time: the batch system's elapsed time of a finished job (else end - start); for a
  running job, the time since its start, as of the latest accounting query.
- core-hours: cores x run time / 3600 (GPU-hours alike). Allocated, not busy, hours: what
  the centre charges.
- queue wait: start - eligible, the time a job waited for resources (as XDMoD counts it):
  a hold, a dependency or a begin time the job itself asked for is not queueing. Where the
  record has no eligible time, start - submit. A job deleted before it started waited until
  its end; a job still queued has waited until the latest query. (SLURM 22.05's `sacct -c`
  prints the eligible time as Submit too, so the completion log could not tell them apart.)
Jobs are grouped by worker group; the scheduler's job is the group `scheduler`, an MPI
allocation's the group `allocation`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hpc_bridge.allocation import task_count
from hpc_bridge.model import JobAccounting, JobIdentity, JobState, ObservedJob, Role

from .model import ClusterModel

REQUESTED = "requested"  # the source of a figure taken from our own job request
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Requested:
    """What one job of a group asked the batch system for."""

    cores: int
    gpus: int = 0


@dataclass(frozen=True)
class JobUsage:
    job_id: str
    namespace: str
    cluster: str
    group: str  # the worker group; `scheduler` / `allocation` for those jobs
    role: str
    state: str  # the batch system's word where it has a record, else the poll's state
    submitted_at: float | None
    started_at: float | None
    ended_at: float | None
    cores: int
    gpus: int
    run_seconds: float
    queue_wait_seconds: float | None  # None: neither eligible nor submit time is known
    source: str  # sacct | sacct-completion | qstat | local | requested (times and cores)
    gpu_source: str  # the batch system's name where it counted GPUs, else `requested`
    final: bool  # the job ended and its figures will not change
    identity: str = ""  # the job's identity comment: finds it again after a restart
    raw_job_id: str = ""  # SLURM: the own id of an array task (the completion log's key)
    eligible_at: float | None = None  # when it could have started (queue wait counts from)

    @property
    def core_hours(self) -> float:
        return self.cores * self.run_seconds / 3600.0

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.run_seconds / 3600.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobUsage:
        """A row written by to_json (unknown keys, from a newer operator, are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def group_of(identity: JobIdentity) -> str:
    """The group a job's usage is summed under."""
    return identity.group if identity.role is Role.WORKER else identity.role.value


def requested_of(model: ClusterModel) -> dict[str, Requested]:
    """What each of a cluster's groups asks per job: the scheduler's job, the worker
    groups (DaskWorkerGroups add theirs through the ledger), or the one MPI allocation
    (one task for the scheduler and one per worker, each with a worker's cores and GPUs)."""
    out = {Role.SCHEDULER.value: Requested(model.scheduler.cores, model.scheduler.gpus)}
    for g in model.groups:
        out[g.name] = Requested(g.template.cores, g.template.gpus)
    if model.mode == "allocation":
        default = model.groups[0].template
        tasks = task_count(model.groups[0].replicas, None)
        out[Role.ALLOCATION.value] = Requested(tasks * default.cores, tasks * default.gpus)
    return out


def job_usage(job: ObservedJob | None, record: JobAccounting | None, requested: Requested,
              as_of: float, previous: JobUsage | None = None) -> JobUsage | None:
    """One job's usage from what is known of it: its accounting record, else what the poll
    saw (times) and the request (cores, GPUs); `previous` keeps what an earlier look knew
    (a job gone from the poll, with no record, keeps its last figures). `as_of`: the time
    figures of unfinished jobs are counted up to. None when nothing is known at all."""
    if job is None and previous is None:
        return None
    if record is None and job is None:
        return previous  # nothing new
    identity = job.identity if job is not None else None

    def pick(*values: float | None) -> float | None:
        return next((v for v in values if v is not None), None)

    prev = previous
    submitted = pick(record.submitted_at if record else None, prev.submitted_at if prev else None)
    eligible = pick(record.eligible_at if record else None, prev.eligible_at if prev else None)
    queued = pick(eligible, submitted)
    started = pick(record.started_at if record else None, job.started_at if job else None,
                   prev.started_at if prev else None)
    ended = pick(record.ended_at if record else None, job.ended_at if job else None,
                 prev.ended_at if prev else None)
    # Final only on the batch system's word: what the poll saw of an ended job may still be
    # corrected by its record (sacct's run time, cores), so such a row is asked for again.
    final = record is not None and record.final
    if record is not None:
        state = record.state
    else:
        state = job.state.value if job is not None else (prev.state if prev else "")
    if started is None:
        run = 0.0
    elif ended is not None:
        run = record.elapsed if record is not None and record.elapsed is not None \
            else ended - started
    else:
        run = as_of - started
    if queued is None:
        wait = None
    else:
        wait = (started if started is not None else ended if ended is not None
                else as_of) - queued
    cores = record.cores if record is not None and record.cores else requested.cores
    counted_gpus = record.gpus if record is not None else None
    return JobUsage(
        job_id=(job.job_id if job is not None else prev.job_id if prev else ""),
        namespace=identity.namespace if identity else (prev.namespace if prev else ""),
        cluster=identity.cluster if identity else (prev.cluster if prev else ""),
        group=group_of(identity) if identity else (prev.group if prev else ""),
        role=identity.role.value if identity else (prev.role if prev else ""),
        state=state, submitted_at=submitted, started_at=started, ended_at=ended,
        cores=cores,
        gpus=requested.gpus if counted_gpus is None else counted_gpus,
        run_seconds=max(0.0, run), queue_wait_seconds=None if wait is None else max(0.0, wait),
        source=record.source if record is not None else REQUESTED,
        gpu_source=REQUESTED if record is None or counted_gpus is None else record.source,
        final=final,
        identity=identity.comment() if identity else (prev.identity if prev else ""),
        raw_job_id=(job.extra.get("raw_job_id", "") if job is not None else "")
        or (prev.raw_job_id if prev else ""), eligible_at=eligible)


def observed_of(row: JobUsage) -> ObservedJob | None:
    """A job known only from a usage row (an operator restart, or gone from the poll), in
    the form the accounting collector asks for; None when its identity was not kept."""
    identity = JobIdentity.parse(row.identity)
    if identity is None:
        return None
    extra = {"raw_job_id": row.raw_job_id} if row.raw_job_id else {}
    return ObservedJob(row.job_id, identity, JobState.GONE if row.final else JobState.RUNNING,
                       extra=extra, started_at=row.started_at, ended_at=row.ended_at)


@dataclass(frozen=True)
class UsageTotals:
    jobs: int = 0
    core_hours: float = 0.0
    gpu_hours: float = 0.0
    run_seconds: float = 0.0
    queue_wait_seconds: float = 0.0  # the sum over jobs with a known submit time
    waited_jobs: int = 0  # how many jobs that sum is over

    @property
    def mean_queue_wait_seconds(self) -> float | None:
        return self.queue_wait_seconds / self.waited_jobs if self.waited_jobs else None

    def add(self, u: JobUsage) -> UsageTotals:
        known = u.queue_wait_seconds is not None
        return UsageTotals(self.jobs + 1, self.core_hours + u.core_hours,
                           self.gpu_hours + u.gpu_hours, self.run_seconds + u.run_seconds,
                           self.queue_wait_seconds + (u.queue_wait_seconds or 0.0),
                           self.waited_jobs + known)

    def plus(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(self.jobs + other.jobs, self.core_hours + other.core_hours,
                           self.gpu_hours + other.gpu_hours,
                           self.run_seconds + other.run_seconds,
                           self.queue_wait_seconds + other.queue_wait_seconds,
                           self.waited_jobs + other.waited_jobs)


@dataclass(frozen=True)
class UsageSummary:
    total: UsageTotals = field(default_factory=UsageTotals)
    by_group: dict[str, UsageTotals] = field(default_factory=dict)
    sources: tuple[str, ...] = ()  # where the times and cores came from, sorted
    gpu_sources: tuple[str, ...] = ()
    final: bool = True  # every job's figures are final

    @property
    def source(self) -> str:
        return "+".join(self.sources) or "none"

    @property
    def gpu_source(self) -> str:
        return "+".join(self.gpu_sources) or "none"


def summarize(rows: Iterable[JobUsage],
              group_of_job: Callable[[JobUsage], str] = lambda u: u.group) -> UsageSummary:
    """Totals of `rows`, overall and per `group_of_job` (by default the worker group; pass
    `lambda u: u.namespace` for namespaces). The groups add up to the total."""
    total = UsageTotals()
    groups: dict[str, UsageTotals] = {}
    sources: set[str] = set()
    gpu_sources: set[str] = set()
    final = True
    for u in rows:
        total = total.add(u)
        key = group_of_job(u)
        groups[key] = groups.get(key, UsageTotals()).add(u)
        sources.add(u.source)
        if u.gpus:
            gpu_sources.add(u.gpu_source)
        final = final and u.final
    return UsageSummary(total, dict(sorted(groups.items())), tuple(sorted(sources)),
                        tuple(sorted(gpu_sources)), final)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(microsecond=0).isoformat() \
        .replace("+00:00", "Z")


def _totals_status(t: UsageTotals) -> dict[str, Any]:
    out: dict[str, Any] = {
        "jobs": t.jobs, "coreHours": round(t.core_hours, 4), "gpuHours": round(t.gpu_hours, 4),
        "runSeconds": round(t.run_seconds, 1),
        "queueWaitSeconds": round(t.queue_wait_seconds, 1)}
    if t.mean_queue_wait_seconds is not None:  # no null in a status: a merge patch drops it
        out["meanQueueWaitSeconds"] = round(t.mean_queue_wait_seconds, 1)
    return out


def status_of(summary: UsageSummary, as_of: float) -> dict[str, Any]:
    """status.usage of a DaskCluster. queueWaitSeconds is the SUM of the jobs' waits;
    meanQueueWaitSeconds the mean over jobs whose submit time is known. Figures are rounded
    (0.36 core-seconds) so that a status changes only when the accounting moves."""
    out = {**_totals_status(summary.total),
           "byGroup": {g: _totals_status(t) for g, t in summary.by_group.items()},
           "source": summary.source, "gpuSource": summary.gpu_source,
           "final": summary.final}
    if as_of:
        out["updatedAt"] = _iso(as_of)
    return out


def document(namespace: str, name: str, uid: str, rows: Iterable[JobUsage],
             as_of: float) -> dict[str, Any]:
    """The usage file's content (<staging>/usage.json, kept with the history)."""
    return {"version": FORMAT_VERSION, "namespace": namespace, "name": name, "uid": uid,
            "asOf": as_of, "jobs": [r.to_json() for r in sorted(rows, key=_job_order)]}


def rows_of(doc: Mapping[str, Any]) -> list[JobUsage]:
    """The rows of a usage file; rows that are not rows (a hand-edited file) are skipped."""
    out = []
    for item in doc.get("jobs") or []:
        try:
            out.append(JobUsage.from_json(item))
        except TypeError:
            continue
    return out


def _job_order(u: JobUsage) -> tuple[float, str]:
    return (u.submitted_at or u.started_at or 0.0, u.job_id)
