"""A DaskJob's lifecycle, decided without I/O.

One pure function of (the job, its last status, the batch jobs it owns, its child
DaskCluster, the exit status its command left on the shared filesystem) says what to do and
what to report. There is no phase state machine: every reconcile recomputes the phase from
what is observed, so a job cannot stay Running after its runner has ended (a known failure
of dask-kubernetes), and a job deleted and re-created under the same name starts afresh
(its uid, and so its jobs and staging directory, are new).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hpc_bridge.model import JobIdentity, JobState, JobTemplate, ObservedJob, Role

from .model import scheduler_template, worker_template
from .site_config import SiteConfig

TERMINAL_PHASES = ("Succeeded", "Failed")
RUNNER_GROUP = "runner"
ALLOCATION_GROUP = "allocation"


@dataclass(frozen=True)
class JobModel:
    """A validated DaskJob in the bridge's terms."""

    namespace: str
    name: str
    uid: str
    mode: str  # cluster | allocation
    backend: str
    runner: JobTemplate  # the runner job's own resources (mode cluster)
    command: tuple[str, ...]  # empty when the job gives a script
    script: str | None
    working_dir: str | None
    cluster_spec: dict[str, Any]  # the child DaskCluster's spec (defaulted)
    workers: int  # cluster.worker.replicas: worker tasks of an allocation
    worker: JobTemplate  # per-task resources of an allocation

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], site: SiteConfig) -> JobModel:
        """`manifest` has passed validation.validate (defaults applied)."""
        meta = manifest["metadata"]
        spec = manifest["spec"]
        job = spec["job"]
        runner = scheduler_template(job)
        cluster_spec = spec["cluster"]
        return cls(
            namespace=meta.get("namespace") or "default",
            name=meta["name"],
            uid=meta["uid"],
            mode=spec["mode"],
            backend=cluster_spec.get("backend") or site.backend,
            runner=runner,
            command=tuple(job.get("command") or ()),
            script=job.get("script"),
            working_dir=job.get("workingDir"),
            cluster_spec=cluster_spec,
            workers=cluster_spec["worker"]["replicas"],
            worker=worker_template(cluster_spec["worker"]),
        )

    @property
    def role(self) -> Role:
        return Role.ALLOCATION if self.mode == "allocation" else Role.RUNNER

    def identity(self, index: int) -> JobIdentity:
        group = ALLOCATION_GROUP if self.mode == "allocation" else RUNNER_GROUP
        return JobIdentity(self.namespace, self.name, self.uid, self.role, group, index)


@dataclass(frozen=True)
class ChildView:
    """The DaskCluster a DaskJob (mode cluster) runs against, as read from the API."""

    owned: bool  # its ownerReferences name this job's uid
    deleting: bool
    phase: str = ""
    message: str = ""
    scheduler_address: str | None = None

    @classmethod
    def of(cls, manifest: dict[str, Any], job_uid: str) -> ChildView:
        meta = manifest.get("metadata") or {}
        status = manifest.get("status") or {}
        refs = meta.get("ownerReferences") or []
        return cls(owned=any(r.get("uid") == job_uid for r in refs),
                   deleting=bool(meta.get("deletionTimestamp")),
                   phase=str(status.get("phase") or ""),
                   message=str(status.get("message") or ""),
                   scheduler_address=status.get("schedulerAddress") or None)


@dataclass
class JobPlan:
    create_child: bool = False
    delete_child: bool = False
    submit: JobIdentity | None = None
    cancel: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # fields to set on status


def _kind_word(model: JobModel) -> str:
    return "allocation" if model.mode == "allocation" else "runner job"


def _finish(model: JobModel, plan: JobPlan, old: dict[str, Any], child: ChildView | None,
            live: Sequence[ObservedJob], code: int | None, message: str,
            now: str) -> JobPlan:
    plan.cancel = [j.job_id for j in live]
    plan.delete_child = child is not None and child.owned and not child.deleting
    plan.status.update({
        "phase": "Succeeded" if code == 0 else "Failed",
        "message": message,
        "exitCode": code,
        "startTime": old.get("startTime") or now,
        "endTime": now,
    })
    return plan


def _ended_message(model: JobModel, job: ObservedJob) -> str:
    why = f", {job.reason}" if job.reason and job.reason != job.state.value else ""
    return (f"{_kind_word(model)} {job.job_id} ended {job.state.value.lower()}{why} before "
            "the command reported an exit status; see its batch log")


def plan_job(model: JobModel, old: dict[str, Any], jobs: Sequence[ObservedJob],
             child: ChildView | None, exit_code: int | None, now: str) -> JobPlan:
    """`jobs`: the batch jobs this DaskJob owns; `exit_code`: what its command wrote to
    the exit-status file, None while it has not ended (or never started)."""
    plan = JobPlan()
    ours = sorted((j for j in jobs if j.identity.role is model.role),
                  key=lambda j: j.identity.index)
    live = [j for j in ours if j.state.live]
    if old.get("phase") in TERMINAL_PHASES:
        # Settled: only make sure nothing of it is left behind.
        plan.cancel = [j.job_id for j in live]
        plan.delete_child = child is not None and child.owned and not child.deleting
        return plan
    if exit_code is not None:
        if ours:
            plan.status["jobId"] = ours[-1].job_id
        return _finish(model, plan, old, child, live, exit_code,
                       f"the command exited with {exit_code}", now)
    current = live[-1] if live else (ours[-1] if ours else None)
    if current is not None:
        plan.status["jobId"] = current.job_id
        if current.state is JobState.RUNNING:
            if model.mode == "cluster" and child is not None and child.phase == "Failed":
                return _finish(model, plan, old, child, live, None,
                               f"DaskCluster {model.name} failed: {child.message}", now)
            plan.status.update(phase="Running", startTime=old.get("startTime") or now,
                               message=f"{_kind_word(model)} {current.job_id} is running")
        elif current.state is JobState.PENDING:
            why = f" ({current.reason})" if current.reason else ""
            plan.status.update(phase="Pending",
                               message=f"{_kind_word(model)} {current.job_id} is queued{why}")
        elif current.state is JobState.ENDING:
            plan.status["message"] = f"{_kind_word(model)} {current.job_id} is ending"
        else:
            # Ended without writing its exit status: killed, out of walltime, failed prologue.
            code = current.exit_code
            if code is None and current.state is JobState.COMPLETED:
                code = 0
            return _finish(model, plan, old, child, live, code,
                           _ended_message(model, current), now)
        return plan
    if old.get("jobId"):
        return _finish(model, plan, old, child, live, None,
                       f"{_kind_word(model)} {old['jobId']} is no longer known to the batch "
                       "system and left no exit status; its outcome is unknown", now)
    return _plan_start(model, plan, old, child, now)


def _plan_start(model: JobModel, plan: JobPlan, old: dict[str, Any], child: ChildView | None,
                now: str) -> JobPlan:
    """Nothing submitted yet: an allocation goes at once; a runner waits for its cluster."""
    if model.mode == "allocation":
        plan.submit = model.identity(0)
        plan.status.update(phase="Pending", message="submitting the allocation")
        return plan
    plan.status["phase"] = "Pending"
    if child is None:
        plan.create_child = True
        plan.status["message"] = f"creating DaskCluster {model.name}"
    elif not child.owned:
        plan.status["message"] = (
            f"waiting: a DaskCluster named {model.name} exists that this DaskJob does not own "
            "(an earlier DaskJob's, still being deleted, or one made by hand: delete it, or "
            "rename this job)")
    elif child.deleting:
        plan.status["message"] = f"waiting for DaskCluster {model.name} to finish deleting"
    elif child.phase == "Failed":
        return _finish(model, plan, old, child, [], None,
                       f"DaskCluster {model.name} failed: {child.message}", now)
    elif child.scheduler_address:
        plan.submit = model.identity(0)
        plan.status["message"] = (f"scheduler of DaskCluster {model.name} is up: submitting "
                                  "the runner job")
    else:
        plan.status["message"] = f"waiting for DaskCluster {model.name}: {child.message}"
    return plan
