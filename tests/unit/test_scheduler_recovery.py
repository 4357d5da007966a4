"""A lost scheduler (spec.scheduler.onFailure / maxRestarts), decided by pure functions:
plan_cluster and cluster_status on observed jobs, the restart count read from the jobs'
indices and the last status, and the status of a batch-system outage."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dask_hpc_operator.model import ClusterModel, GroupModel
from dask_hpc_operator.planning import (
    FAIL_ON_SCHEDULER_LOSS,
    Plan,
    SchedulerRecovery,
    cluster_status,
    group_workers_of,
    plan_cluster,
    scheduler_incarnation,
)
from dask_hpc_operator.reconcile import BATCH_CONDITION, outage_status
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import ManifestError, validate
from hpc_bridge.model import JobIdentity, JobState, JobTemplate, ObservedJob, Role

NS, NAME, UID = "default", "c1", "uid-1"
NOW_S = 1_704_067_200.0
NOW = "2024-01-01T00:00:00Z"
RESTART = SchedulerRecovery(restart=True, max_restarts=3)


def model(replicas: int = 2, mode: str = "jobs") -> ClusterModel:
    return ClusterModel(namespace=NS, name=NAME, uid=UID, backend="slurm", protocols=("tcp",),
                        scheduler=JobTemplate(),
                        groups=(GroupModel("default", UID, replicas, JobTemplate()),),
                        mode=mode)


def sched(job_id: str, state: JobState, index: int = 0, reason: str = "",
          role: Role = Role.SCHEDULER) -> ObservedJob:
    group = "allocation" if role is Role.ALLOCATION else "default"
    return ObservedJob(job_id, JobIdentity(NS, NAME, UID, role, group, index), state, reason)


def worker(index: int, state: JobState = JobState.RUNNING, uid: str = UID,
           group: str = "default", cluster: str = NAME) -> ObservedJob:
    return ObservedJob(f"{group}-w{index}", JobIdentity(NS, cluster, uid, Role.WORKER, group,
                                                        index), state)


def act(jobs: list[ObservedJob], plan: Plan) -> list[ObservedJob]:
    """What the batch system shows after the plan ran: cancelled jobs ending, new ones queued."""
    after = [ObservedJob(j.job_id, j.identity, JobState.ENDING) if j.job_id in plan.cancel
             else j for j in jobs]
    return after + [ObservedJob(f"new-{i.role.value}-{i.index}", i, JobState.PENDING)
                    for i in plan.submit]


def conditions(status: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in status["conditions"]}


# --- the default: Fail, as before the field existed ---------------------------------------

def test_fail_is_the_default_and_says_what_to_do() -> None:
    jobs = [sched("s0", JobState.CANCELLED, reason="CANCELLED"), worker(0), worker(1)]
    plan = plan_cluster(model(), jobs, None, "s0", now=NOW_S)
    assert plan.failed == "scheduler job s0 ended (cancelled, CANCELLED)"
    assert plan.cancel == ["default-w0", "default-w1"] and plan.submit == []
    status = cluster_status(model(), jobs, None, plan, now=NOW)
    assert status["phase"] == "Failed"
    cond = conditions(status)["SchedulerReady"]
    assert cond["status"] == "False" and cond["reason"] == "Failed"
    assert "onFailure is Fail" in cond["message"] and "onFailure: Restart" in cond["message"]
    assert status["schedulerRestarts"] == 0


# --- Restart -------------------------------------------------------------------------------

@pytest.mark.parametrize("state", [JobState.CANCELLED, JobState.FAILED, JobState.COMPLETED,
                                   JobState.GONE, JobState.ENDING])
def test_restart_cancels_the_workers_and_submits_scheduler_then_workers(
        state: JobState) -> None:
    jobs = [sched("s0", state), worker(0), worker(1, JobState.PENDING),
            worker(2, JobState.FAILED)]
    plan = plan_cluster(model(2), jobs, None, "s0", now=NOW_S, recovery=RESTART)
    assert plan.failed == ""
    assert plan.lost.startswith("scheduler job s0 ended")
    assert plan.cancel == ["default-w0", "default-w1"]
    assert plan.restarts == 1 and plan.max_restarts == 3
    # The next scheduler index, then replicas workers numbered after every worker seen.
    assert [(i.role, i.index) for i in plan.submit] == [
        (Role.SCHEDULER, 1), (Role.WORKER, 3), (Role.WORKER, 4)]


def test_restart_is_planned_once() -> None:
    """After the restart's actions are visible, the same observation plans nothing more:
    the old scheduler's end no longer counts (a newer scheduler is live)."""
    jobs = [sched("s0", JobState.CANCELLED), worker(0), worker(1)]
    plan = plan_cluster(model(2), jobs, None, "s0", now=NOW_S, recovery=RESTART)
    after = act(jobs, plan)
    again = plan_cluster(model(2), after, None, "new-scheduler-1", now=NOW_S,
                         recovery=RESTART, restarts=plan.restarts)
    assert again.empty and not again.failed and not again.lost
    assert again.restarts == 1


def test_restart_status_names_the_lost_job_and_the_restart() -> None:
    jobs = [sched("s0", JobState.CANCELLED, reason="CANCELLED"), worker(0)]
    plan = plan_cluster(model(1), jobs, None, "s0", now=NOW_S, recovery=RESTART)
    status = cluster_status(model(1), act(jobs, plan), None, plan, now=NOW)
    assert status["phase"] == "Pending"
    assert status["message"] == ("scheduler lost: scheduler job s0 ended (cancelled, "
                                 "CANCELLED); restart 1 of 3: scheduler job "
                                 "new-scheduler-1 submitted")
    cond = conditions(status)["SchedulerReady"]
    assert cond["status"] == "False" and cond["reason"] == "SchedulerLost"
    assert "s0" in cond["message"]
    assert status["schedulerJobId"] == "new-scheduler-1"
    assert status["schedulerRestarts"] == 1


def test_a_refused_submission_is_not_counted_as_a_restart() -> None:
    """sbatch of the new scheduler refused (a QOS limit): nothing new is visible after
    acting, so status.schedulerRestarts stays where it was and the next reconcile tries the
    same restart again, however many times, instead of using up maxRestarts."""
    jobs = [sched("s0", JobState.FAILED)]
    status: dict[str, Any] = {"schedulerJobId": "s0"}
    for _ in range(5):
        plan = plan_cluster(model(1), jobs, None, status["schedulerJobId"], now=NOW_S,
                            recovery=RESTART, restarts=status.get("schedulerRestarts", 0))
        assert (plan.submit[0].role, plan.submit[0].index) == (Role.SCHEDULER, 1)
        plan.notes.append("submission failed: QOSMaxSubmitJobPerUserLimit")
        status.update({k: v for k, v in cluster_status(model(1), jobs, None, plan,
                                                       now=NOW).items() if v is not None})
        assert status["phase"] == "Pending" and status["schedulerRestarts"] == 0
        assert "submission failed" in status["message"]
    # Once the submission goes through, the restart is counted.
    plan = plan_cluster(model(1), jobs, None, "s0", now=NOW_S, recovery=RESTART,
                        restarts=status["schedulerRestarts"])
    assert cluster_status(model(1), act(jobs, plan), None, plan,
                          now=NOW)["schedulerRestarts"] == 1


def test_the_limit_fails_the_cluster_and_says_what_to_do() -> None:
    jobs = [sched("s3", JobState.FAILED, index=3, reason="NodeFail"), worker(7)]
    plan = plan_cluster(model(1), jobs, None, "s3", now=NOW_S, recovery=RESTART)
    assert plan.submit == [] and plan.cancel == ["default-w7"]
    assert plan.failed.startswith("scheduler job s3 ended (failed, NodeFail); not restarted:")
    assert "restarted 3 time(s), spec.scheduler.maxRestarts is 3" in plan.failed
    assert "raise maxRestarts" in plan.failed
    status = cluster_status(model(1), jobs, None, plan, now=NOW)
    assert status["phase"] == "Failed" and status["schedulerRestarts"] == 3
    # Raising the limit (a spec change) is the way out: the next reconcile restarts.
    more = plan_cluster(model(1), jobs, None, "s3", now=NOW_S,
                        recovery=SchedulerRecovery(True, 4))
    assert [(i.role, i.index) for i in more.submit] == [(Role.SCHEDULER, 4), (Role.WORKER, 8)]


def test_max_restarts_zero_never_restarts() -> None:
    plan = plan_cluster(model(1), [sched("s0", JobState.FAILED)], None, "s0", now=NOW_S,
                        recovery=SchedulerRecovery(True, 0))
    assert plan.failed and plan.submit == []


def test_count_survives_the_batch_system_forgetting_old_jobs() -> None:
    """SLURM forgets ended jobs after MinJobAge: the live scheduler's index still says
    how many restarts came before it, and status.schedulerRestarts says it when every job
    of the cluster has been forgotten."""
    assert scheduler_incarnation([sched("s2", JobState.RUNNING, index=2)]) == 2
    assert scheduler_incarnation([], recorded=2) == 2
    assert scheduler_incarnation([sched("s1", JobState.CANCELLED, index=1)], recorded=0) == 1
    # Forgotten while the operator was down: only the status remembers the job and count.
    plan = plan_cluster(model(1), [], None, "s2", now=NOW_S, recovery=RESTART, restarts=2)
    assert plan.lost == "scheduler job s2 is no longer known to the batch system"
    assert [(i.role, i.index) for i in plan.submit] == [(Role.SCHEDULER, 3), (Role.WORKER, 0)]
    stop = plan_cluster(model(1), [], None, "s3", now=NOW_S, recovery=RESTART, restarts=3)
    assert stop.failed and stop.submit == []


def test_a_lost_race_is_not_a_restart() -> None:
    """Two live schedulers (a lost race): the lower index is kept and counted."""
    jobs = [sched("s0", JobState.RUNNING, 0), sched("s1", JobState.PENDING, 1)]
    plan = plan_cluster(model(0), jobs, None, "s0", now=NOW_S, recovery=RESTART)
    assert plan.cancel == ["s1"] and plan.restarts == 0 and not plan.lost


def test_allocations_are_never_restarted() -> None:
    jobs = [sched("a0", JobState.CANCELLED, role=Role.ALLOCATION)]
    plan = plan_cluster(model(2, mode="allocation"), jobs, None, "a0", now=NOW_S,
                        recovery=RESTART)
    assert plan.submit == [] and not plan.lost
    assert plan.failed.startswith("scheduler job a0 ended (cancelled); not restarted: an "
                                  "allocation (spec.mode: allocation) is not restarted")


def test_queued_or_running_scheduler_is_no_loss() -> None:
    for state in (JobState.PENDING, JobState.RUNNING):
        plan = plan_cluster(model(1), [sched("s0", state), worker(0, JobState.PENDING)], None,
                            "s0", now=NOW_S, recovery=RESTART)
        assert not plan.lost and not plan.failed and plan.empty


def test_group_workers_of_the_cluster() -> None:
    """The cluster's DaskWorkerGroups' live workers (other owners, same cluster name), not
    its own, not another cluster's, not ended ones, not a DaskJob's runner."""
    runner = ObservedJob("r0", JobIdentity(NS, NAME, "job-uid", Role.RUNNER, "runner", 0),
                         JobState.RUNNING)
    jobs = [worker(0), worker(1, uid="g-uid", group="gpu"),
            worker(2, JobState.PENDING, uid="g-uid", group="gpu"),
            worker(3, JobState.CANCELLED, uid="g-uid", group="gpu"),
            worker(4, uid="other", group="gpu", cluster="c2"), runner]
    assert group_workers_of(model(), jobs) == ["gpu-w1", "gpu-w2"]


# --- the field -----------------------------------------------------------------------------

def cluster_manifest(**scheduler: Any) -> dict[str, Any]:
    return {"apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
            "metadata": {"name": "c1", "uid": UID},
            "spec": {"scheduler": scheduler, "worker": {"replicas": 1}}}


def test_recovery_from_the_spec() -> None:
    assert SchedulerRecovery.of(validate(cluster_manifest())["spec"]) == FAIL_ON_SCHEDULER_LOSS
    assert SchedulerRecovery.of(validate(cluster_manifest(onFailure="Restart"))["spec"]) \
        == SchedulerRecovery(True, 3)
    got = SchedulerRecovery.of(validate(cluster_manifest(onFailure="Restart",
                                                         maxRestarts=0))["spec"])
    assert got == SchedulerRecovery(True, 0)
    with pytest.raises(ManifestError) as bad:
        validate(cluster_manifest(onFailure="restart"))
    assert bad.value.field == "spec.scheduler.onFailure"
    with pytest.raises(ManifestError) as bad:
        validate(cluster_manifest(maxRestarts=-1))
    assert bad.value.field == "spec.scheduler.maxRestarts"


def test_a_daskjob_cluster_cannot_restart_its_scheduler() -> None:
    """The command's client is connected to the one scheduler: a DaskJob's cluster is Fail
    only, refused with the field named; the defaulted spec it gives its cluster says Fail
    and validates again (`dask-hpc up` validates it twice)."""
    job: dict[str, Any] = {"apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskJob",
                           "metadata": {"name": "j1", "uid": "job-uid"},
                           "spec": {"job": {"command": ["true"]},
                                    "cluster": {"scheduler": {"onFailure": "Restart"}}}}
    with pytest.raises(ManifestError) as bad:
        validate(job)
    assert bad.value.field == "spec.cluster.scheduler.onFailure"
    del job["spec"]["cluster"]["scheduler"]["onFailure"]
    valid = validate(job)
    assert valid["spec"]["cluster"]["scheduler"]["onFailure"] == "Fail"
    assert validate(copy.deepcopy(valid)) == valid
    child = {**cluster_manifest(), "spec": valid["spec"]["cluster"]}
    assert SchedulerRecovery.of(validate(child)["spec"]) == FAIL_ON_SCHEDULER_LOSS
    assert ClusterModel.from_manifest(validate(child), SiteConfig()).mode == "jobs"


# --- a batch-system outage -----------------------------------------------------------------

def test_outage_status_keeps_phase_adds_a_condition_and_one_event() -> None:
    events: list[tuple[str, str, str]] = []

    def sink(type_: str, reason: str, message: str) -> None:
        events.append((type_, reason, message))

    old = [{"type": "SchedulerReady", "status": "True", "reason": "Connected",
            "message": "scheduler at tcp://x", "lastTransitionTime": NOW}]
    first = outage_status(RuntimeError("slurm: squeue exited 1: connect failure"), old, sink)
    assert "phase" not in first  # kept as it was
    assert first["message"].startswith("batch system unavailable, retrying: slurm: squeue")
    cond = conditions(first)
    assert cond["SchedulerReady"] == old[0]
    assert cond[BATCH_CONDITION]["status"] == "False"
    assert cond[BATCH_CONDITION]["reason"] == "Unreachable"
    assert [(t, r) for t, r, _ in events] == [("Warning", "BatchSystemUnavailable")]
    since = cond[BATCH_CONDITION]["lastTransitionTime"]
    second = outage_status(RuntimeError("retrying in 4s"), first["conditions"], sink)
    assert len(events) == 1, "one event per outage, not one per reconcile"
    assert conditions(second)[BATCH_CONDITION]["lastTransitionTime"] == since
    assert conditions(second)[BATCH_CONDITION]["message"].endswith("retrying in 4s")
    assert len(second["conditions"]) == 2
