"""dask_hpc_operator.planning: plan_cluster and cluster_status as pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from dask_hpc_operator.model import ClusterModel, GroupModel
from dask_hpc_operator.planning import (
    DEFAULT_FAILURE_POLICY,
    DaskView,
    Plan,
    Retirement,
    WorkerView,
    cluster_status,
    merge_conditions,
    plan_cluster,
    rejected_status,
)
from hpc_bridge.model import JobIdentity, JobState, JobTemplate, ObservedJob, Role

NS, NAME, UID = "default", "c1", "uid-1"
NOW = "2024-01-01T00:00:00Z"
LATER = "2024-01-01T01:00:00Z"
NOW_S = 1_704_067_200.0  # NOW in epoch seconds: the plans' clock


def model(replicas: int = 2, *groups: GroupModel) -> ClusterModel:
    return ClusterModel(
        namespace=NS, name=NAME, uid=UID, backend="slurm", protocols=("tcp",),
        scheduler=JobTemplate(), groups=groups or (GroupModel("default", UID, replicas,
                                                              JobTemplate()),))


def ident(role: Role, index: int, group: str = "default", uid: str = UID) -> JobIdentity:
    return JobIdentity(NS, NAME, uid, role, group, index)


def sched(job_id: str = "s0", state: JobState = JobState.RUNNING, index: int = 0,
          reason: str = "") -> ObservedJob:
    return ObservedJob(job_id, ident(Role.SCHEDULER, index), state, reason)


def worker(index: int, state: JobState = JobState.RUNNING, reason: str = "",
           group: str = "default", uid: str = UID) -> ObservedJob:
    return ObservedJob(f"w{index}" if group == "default" else f"{group}-w{index}",
                       ident(Role.WORKER, index, group, uid), state, reason)


def view(*workers: ObservedJob | tuple[str, int]) -> DaskView:
    """Workers connected to the scheduler: a job (named like it) or (name, managed bytes)."""
    views = []
    for w in workers:
        if isinstance(w, ObservedJob):
            views.append(_wv(w.identity.job_name, 0))
        else:
            views.append(_wv(*w))
    return DaskView("tcp://10.0.0.1:8786", "http://10.0.0.1:8787/status", tuple(views))


def _wv(name: str, managed: int) -> WorkerView:
    return WorkerView(name, f"tcp://10.0.0.2:{40000 + len(name)}", managed)


def submitted(plan: Plan, role: Role) -> list[JobIdentity]:
    return [i for i in plan.submit if i.role is role]


def as_observed(plan: Plan, state: JobState = JobState.PENDING) -> list[ObservedJob]:
    return [ObservedJob(f"new-{i.role.value}-{i.index}", i, state) for i in plan.submit]


# --- plan_cluster --------------------------------------------------------------------------

def test_fresh_cluster_submits_scheduler_and_workers() -> None:
    plan = plan_cluster(model(3), [], None, now=NOW_S)
    assert plan.submit[0] == ident(Role.SCHEDULER, 0)
    assert submitted(plan, Role.WORKER) == [ident(Role.WORKER, i) for i in range(3)]
    assert plan.cancel == [] and plan.retire == []
    assert plan.failed == "" and plan.notes == []
    assert not plan.empty


def test_plan_is_idempotent() -> None:
    m = model(3)
    first = plan_cluster(m, [], None, now=NOW_S)
    observed = as_observed(first)
    for _ in range(2):
        again = plan_cluster(m, observed, None, now=NOW_S)
        assert again.empty, again
        assert again.failed == ""


def test_running_cluster_plans_nothing() -> None:
    jobs = [sched(), worker(0), worker(1)]
    plan = plan_cluster(model(2), jobs, view(jobs[1], jobs[2]), known_scheduler_job="s0",
                        now=NOW_S)
    assert plan.empty
    assert plan.notes == []


def test_scale_up_uses_next_indices() -> None:
    jobs = [sched(), worker(0), worker(1)]
    plan = plan_cluster(model(4), jobs, view(*jobs[1:]), now=NOW_S)
    assert plan.submit == [ident(Role.WORKER, 2), ident(Role.WORKER, 3)]
    assert plan.cancel == []


def test_scale_up_skips_indices_of_ended_jobs() -> None:
    jobs = [sched(), worker(0), worker(1), worker(2, JobState.COMPLETED)]
    plan = plan_cluster(model(4), jobs, view(*jobs[1:3]), now=NOW_S)
    assert plan.submit == [ident(Role.WORKER, 3), ident(Role.WORKER, 4)]


def test_replaces_a_failed_worker() -> None:
    jobs = [sched(), worker(0), worker(1, JobState.FAILED)]
    plan = plan_cluster(model(2), jobs, view(jobs[1]), now=NOW_S)
    assert plan.submit == [ident(Role.WORKER, 2)]


def test_scale_down_cancels_pending_first_highest_index_first() -> None:
    jobs = [sched(), worker(0), worker(1), worker(2, JobState.PENDING),
            worker(3, JobState.PENDING), worker(4, JobState.PENDING)]
    plan = plan_cluster(model(3), jobs, view(*jobs[1:3]), now=NOW_S)
    assert plan.cancel == ["w4", "w3"]
    assert plan.retire == []
    assert plan.submit == []


def test_scale_down_then_unconnected_then_least_data() -> None:
    jobs = [sched(), worker(0), worker(1), worker(2), worker(3), worker(4, JobState.PENDING)]
    dask = view(("dask.default.c1.default.0", 500), ("dask.default.c1.default.1", 10),
                ("dask.default.c1.default.2", 200))  # w3 runs but never connected
    plan = plan_cluster(model(1), jobs, dask, now=NOW_S)
    assert plan.cancel == ["w4", "w3"]
    assert plan.retire == [Retirement("w1", ["dask.default.c1.default.1"]),
                           Retirement("w2", ["dask.default.c1.default.2"])]
    assert "w0" not in plan.cancel  # holds the most data: kept


def test_scale_down_sums_bytes_of_multi_process_jobs() -> None:
    jobs = [sched(), worker(0), worker(1)]
    dask = view(("dask.default.c1.default.0-0", 60), ("dask.default.c1.default.0-1", 60),
                ("dask.default.c1.default.1-0", 100), ("dask.default.c1.default.1-1", 0))
    plan = plan_cluster(model(1), jobs, dask, now=NOW_S)
    assert plan.cancel == []
    assert plan.retire == [Retirement("w1", ["dask.default.c1.default.1-0",
                                             "dask.default.c1.default.1-1"])]


def test_index_1_is_not_connected_through_worker_of_index_10() -> None:
    jobs = [sched(), worker(1), worker(10)]
    dask = view(("dask.default.c1.default.10", 5))
    plan = plan_cluster(model(1), jobs, dask, now=NOW_S)
    assert plan.cancel == ["w1"]  # running but not connected: cheapest
    assert plan.retire == []


def test_scale_down_without_scheduler_keeps_running_workers() -> None:
    jobs = [sched(), worker(0), worker(1), worker(2), worker(3, JobState.PENDING)]
    plan = plan_cluster(model(1), jobs, None, now=NOW_S)
    assert plan.cancel == ["w3"]
    assert plan.retire == []
    assert plan.notes == ["2 running worker(s) kept until the scheduler can retire them"]


def test_scale_to_zero() -> None:
    jobs = [sched(), worker(0), worker(1, JobState.PENDING)]
    plan = plan_cluster(model(0), jobs, view(jobs[1]), now=NOW_S)
    assert plan.cancel == ["w1"]
    assert plan.retire == [Retirement("w0", ["dask.default.c1.default.0"])]
    assert plan.submit == []


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.COMPLETED, JobState.CANCELLED,
                                   JobState.GONE])
def test_scheduler_ended_fails_cluster(state: JobState) -> None:
    jobs = [sched("s0", state, reason="NonZeroExitCode"), worker(0),
            worker(1, JobState.PENDING), worker(2, JobState.FAILED)]
    plan = plan_cluster(model(3), jobs, None, known_scheduler_job="s0", now=NOW_S)
    assert plan.failed == f"scheduler job s0 ended ({state.value.lower()}, NonZeroExitCode)"
    assert plan.cancel == ["w0", "w1"]
    assert plan.submit == []
    assert plan.retire == []


def test_scheduler_failure_without_reason() -> None:
    plan = plan_cluster(model(1), [sched("s0", JobState.FAILED)], None, now=NOW_S)
    assert plan.failed == "scheduler job s0 ended (failed)"


def test_scheduler_vanished_fails_cluster() -> None:
    jobs = [worker(0), worker(1)]
    plan = plan_cluster(model(2), jobs, None, known_scheduler_job="77", now=NOW_S)
    assert plan.failed == "scheduler job 77 is no longer known to the batch system"
    assert plan.cancel == ["w0", "w1"]
    assert plan.submit == []


def test_live_scheduler_with_other_known_id_is_fine() -> None:
    plan = plan_cluster(model(0), [sched("s9")], None, known_scheduler_job="77", now=NOW_S)
    assert plan.failed == ""
    assert plan.empty


def test_extra_scheduler_is_cancelled() -> None:
    jobs = [sched("s1", JobState.PENDING, index=1), sched("s0", JobState.RUNNING, index=0),
            worker(0)]
    plan = plan_cluster(model(1), jobs, None, now=NOW_S)
    assert plan.cancel == ["s1"]
    assert submitted(plan, Role.SCHEDULER) == []
    assert plan.failed == ""


def test_cancelled_extra_scheduler_does_not_fail_cluster() -> None:
    jobs = [sched("s1", JobState.ENDING, index=1), sched("s0", JobState.RUNNING), worker(0)]
    plan = plan_cluster(model(1), jobs, None, now=NOW_S)
    assert plan.failed == ""
    assert plan.empty


def test_repeated_worker_failures_stop_resubmission() -> None:
    limit = DEFAULT_FAILURE_POLICY.limit
    jobs = [sched()] + [worker(i, JobState.FAILED) for i in range(limit)]
    plan = plan_cluster(model(2), jobs, view(), now=NOW_S)
    assert plan.submit == []
    assert plan.failed == ""
    assert len(plan.notes) == 1
    assert plan.notes[0].startswith(f"group default: {limit} worker jobs failed in a row; "
                                    f"stopped after {limit} failures")


def test_failures_below_threshold_resubmit() -> None:
    limit = DEFAULT_FAILURE_POLICY.limit
    jobs = [sched()] + [worker(i, JobState.FAILED) for i in range(limit - 1)]
    plan = plan_cluster(model(1), jobs, view(), now=NOW_S)
    assert plan.submit == [ident(Role.WORKER, limit - 1)]


def test_failures_with_a_connected_worker_resubmit() -> None:
    jobs = [sched(), worker(0)] + [worker(i, JobState.FAILED) for i in range(1, 4)]
    plan = plan_cluster(model(2), jobs, view(jobs[1]), now=NOW_S)
    assert plan.submit == [ident(Role.WORKER, 4)]
    # The failures are newer than the connected worker: they are still a streak (without
    # end times there is no back-off to wait for, only the limit).
    assert plan.notes == ["group default: 3 worker jobs failed in a row; retrying now"]
    # A connected worker newer than the failures ends the streak.
    jobs = [sched(), worker(4)] + [worker(i, JobState.FAILED) for i in range(1, 4)]
    plan = plan_cluster(model(2), jobs, view(jobs[1]), now=NOW_S)
    assert plan.submit == [ident(Role.WORKER, 5)]
    assert plan.notes == [] and plan.failures == []


def test_groups_are_planned_separately() -> None:
    gpu = GroupModel("gpu", "uid-gpu", 1, JobTemplate(gpus=1))
    m = model(2, GroupModel("default", UID, 2, JobTemplate()), gpu)
    jobs = [sched(), worker(0), worker(1), worker(0, group="gpu", uid="uid-gpu"),
            worker(1, group="gpu", uid="uid-gpu", state=JobState.PENDING),
            # a job of a previous DaskWorkerGroup called gpu (another uid) is not counted
            worker(5, group="gpu", uid="uid-old")]
    plan = plan_cluster(m, jobs, view(*jobs[1:4]), now=NOW_S)
    assert plan.submit == []
    assert plan.cancel == ["gpu-w1"]


# --- cluster_status ------------------------------------------------------------------------

def status(m: ClusterModel, jobs: Sequence[ObservedJob], dask: DaskView | None,
           plan: Plan | None = None, old: Sequence[dict[str, str]] = ()) -> dict:
    plan = plan if plan is not None else plan_cluster(m, jobs, dask, now=NOW_S)
    return cluster_status(m, jobs, dask, plan, old, NOW)


def conditions(st: dict) -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in st["conditions"]}


def test_status_pending_with_queue_reason() -> None:
    jobs = [sched("s0", JobState.PENDING, reason="Priority"), worker(0, JobState.PENDING),
            worker(1, JobState.PENDING)]
    st = status(model(2), jobs, None)
    assert st["phase"] == "Pending"
    assert st["message"] == "scheduler job s0 is queued (Priority)"
    assert st["workers"] == {"desired": 2, "pending": 2, "running": 0, "ready": 0}
    assert st["replicas"] == 2
    assert st["schedulerJobId"] == "s0"
    assert st["schedulerAddress"] is None and st["dashboardURL"] is None
    assert st["backend"] == "slurm"
    cond = conditions(st)
    assert cond["Accepted"]["status"] == "True"
    assert cond["SchedulerReady"]["status"] == "False"
    assert cond["SchedulerReady"]["reason"] == "Waiting"
    assert cond["SchedulerReady"]["message"] == st["message"]
    assert cond["WorkersReady"]["status"] == "False"
    assert all(c["lastTransitionTime"] == NOW for c in st["conditions"])


def test_status_pending_before_submission_and_while_starting() -> None:
    st = status(model(1), [], None)
    assert (st["phase"], st["message"]) == ("Pending", "submitting the scheduler job")
    assert st["schedulerJobId"] is None
    st = status(model(1), [sched("s0", JobState.RUNNING)], None)
    assert (st["phase"], st["message"]) == ("Pending", "scheduler job s0 is starting")


def test_status_scaling() -> None:
    jobs = [sched(), worker(0), worker(1, JobState.PENDING, reason="Resources"),
            worker(2, JobState.PENDING, reason="Priority"), worker(3)]
    st = status(model(4), jobs, view(jobs[1]))
    assert st["phase"] == "Scaling"
    assert st["message"] == "1/4 workers ready, 2 queued (Priority, Resources)"
    assert st["workers"] == {"desired": 4, "pending": 2, "running": 2, "ready": 1}
    assert st["replicas"] == 4
    assert st["schedulerAddress"] == "tcp://10.0.0.1:8786"
    assert st["dashboardURL"] == "http://10.0.0.1:8787/status"
    cond = conditions(st)
    assert cond["SchedulerReady"]["status"] == "True"
    assert cond["SchedulerReady"]["reason"] == "Connected"
    assert cond["WorkersReady"]["status"] == "False"
    assert cond["WorkersReady"]["message"] == "1/4 workers connected to the scheduler"


def test_status_scaling_down_is_scaling() -> None:
    jobs = [sched(), worker(0), worker(1), worker(2)]
    st = status(model(2), jobs, view(*jobs[1:]))
    assert st["phase"] == "Scaling"
    assert st["workers"]["ready"] == 3


def test_status_running() -> None:
    jobs = [sched(), worker(0), worker(1)]
    st = status(model(2), jobs, view(*jobs[1:]))
    assert st["phase"] == "Running"
    assert st["message"] == "2/2 workers ready"
    assert st["workers"] == {"desired": 2, "pending": 0, "running": 2, "ready": 2}
    assert all(c["status"] == "True" for c in st["conditions"])
    assert conditions(st)["WorkersReady"]["reason"] == "AllReady"


def test_status_failed() -> None:
    jobs = [sched("s0", JobState.FAILED, reason="NonZeroExitCode"), worker(0)]
    st = status(model(1), jobs, None)
    assert st["phase"] == "Failed"
    assert st["message"] == "scheduler job s0 ended (failed, NonZeroExitCode)"
    assert conditions(st)["SchedulerReady"]["reason"] == "Failed"


def test_status_message_carries_notes() -> None:
    jobs = [sched()] + [worker(i, JobState.FAILED) for i in range(3)]
    st = status(model(1), jobs, view())
    assert st["phase"] == "Scaling"
    assert st["message"].startswith("0/1 workers ready; group default: 3 worker jobs failed")


def test_status_keeps_transition_time_unless_status_flips() -> None:
    jobs = [sched(), worker(0)]
    first = status(model(1), jobs, None)
    second = cluster_status(model(1), jobs, view(jobs[1]),
                            plan_cluster(model(1), jobs, None, now=NOW_S),
                            first["conditions"], LATER)
    cond = conditions(second)
    assert cond["Accepted"]["lastTransitionTime"] == NOW  # True -> True
    assert cond["SchedulerReady"]["lastTransitionTime"] == LATER  # False -> True
    assert cond["WorkersReady"]["lastTransitionTime"] == LATER


def test_merge_conditions() -> None:
    old = [{"type": "A", "status": "True", "lastTransitionTime": NOW},
           {"type": "B", "status": "False", "lastTransitionTime": NOW},
           {"type": "C", "status": "True"}]
    new = [{"type": "A", "status": "True", "reason": "r", "message": "m"},
           {"type": "B", "status": "True", "reason": "r", "message": "m"},
           {"type": "C", "status": "True", "reason": "r", "message": "m"},
           {"type": "D", "status": "False", "reason": "r", "message": "m"}]
    merged = {c["type"]: c for c in merge_conditions(old, new, LATER)}
    assert merged["A"]["lastTransitionTime"] == NOW
    assert merged["B"]["lastTransitionTime"] == LATER
    assert merged["C"]["lastTransitionTime"] == LATER  # none recorded before
    assert merged["D"]["lastTransitionTime"] == LATER
    assert merged["A"]["reason"] == "r"
    assert merge_conditions([], [], LATER) == []


def test_rejected_status() -> None:
    st = rejected_status("spec.worker.memory: bad", [], NOW)
    assert st["phase"] == "Failed"
    assert st["message"] == "spec.worker.memory: bad"
    (cond,) = st["conditions"]
    assert cond == {"type": "Accepted", "status": "False", "reason": "InvalidSpec",
                    "message": "spec.worker.memory: bad", "lastTransitionTime": NOW}
