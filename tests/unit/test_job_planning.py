"""dask_hpc_operator.job_planning: a DaskJob's lifecycle as a pure function."""

from __future__ import annotations

import pytest

from dask_hpc_operator.job_planning import ChildView, JobModel, plan_job
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import validate
from hpc_bridge.model import JobState, ObservedJob, Role

NOW = "2026-01-01T00:00:00Z"
UID = "job-uid-1"


def model(mode: str = "cluster") -> JobModel:
    manifest = validate({
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskJob",
        "metadata": {"name": "train", "namespace": "default", "uid": UID},
        "spec": {"mode": mode, "job": {"command": ["python", "train.py"]},
                 "cluster": {"worker": {"replicas": 2}}},
    })
    return JobModel.from_manifest(manifest, SiteConfig())


def job(state: JobState, index: int = 0, mode: str = "cluster", reason: str = "",
        exit_code: int | None = None) -> ObservedJob:
    return ObservedJob(f"{100 + index}", model(mode).identity(index), state, reason, exit_code)


OWNED = ChildView(owned=True, deleting=False, phase="Running", message="2/2 workers ready",
                  scheduler_address="tcp://10.0.0.1:8786")


def test_a_new_job_creates_its_cluster_first() -> None:
    plan = plan_job(model(), {}, [], None, None, NOW)
    assert plan.create_child and plan.submit is None
    assert plan.status["phase"] == "Pending"
    assert "creating DaskCluster train" in plan.status["message"]


def test_the_runner_waits_for_the_scheduler_then_is_submitted_once() -> None:
    starting = ChildView(owned=True, deleting=False, phase="Pending",
                         message="scheduler job 7 is queued (Priority)")
    plan = plan_job(model(), {}, [], starting, None, NOW)
    assert plan.submit is None and not plan.create_child
    assert "scheduler job 7 is queued (Priority)" in plan.status["message"]

    plan = plan_job(model(), {}, [], OWNED, None, NOW)
    assert plan.submit == model().identity(0) and plan.submit.role is Role.RUNNER
    # Next reconcile: the runner is visible (the poller recorded it): nothing new.
    plan = plan_job(model(), {"jobId": "100"}, [job(JobState.PENDING, reason="Resources")],
                    OWNED, None, NOW)
    assert plan.submit is None
    assert plan.status["phase"] == "Pending" and "(Resources)" in plan.status["message"]


def test_running_then_succeeded_from_the_exit_status_file() -> None:
    plan = plan_job(model(), {"phase": "Pending"}, [job(JobState.RUNNING)], OWNED, None, NOW)
    assert plan.status["phase"] == "Running" and plan.status["startTime"] == NOW
    old = {"phase": "Running", "startTime": "earlier", "jobId": "100"}
    plan = plan_job(model(), old, [job(JobState.COMPLETED)], OWNED, 0, "later")
    assert plan.status["phase"] == "Succeeded" and plan.status["exitCode"] == 0
    assert plan.status["startTime"] == "earlier" and plan.status["endTime"] == "later"
    assert plan.delete_child and plan.cancel == []


def test_a_failing_command_fails_the_job_with_its_exit_code() -> None:
    plan = plan_job(model(), {"phase": "Running"}, [job(JobState.FAILED, exit_code=3)],
                    OWNED, 3, NOW)
    assert plan.status["phase"] == "Failed" and plan.status["exitCode"] == 3
    assert "exited with 3" in plan.status["message"] and plan.delete_child


def test_an_exit_status_ends_the_job_even_while_its_batch_job_lingers() -> None:
    """No job stuck in Running after its runner ended: the file decides, leftovers go."""
    plan = plan_job(model(), {"phase": "Running"}, [job(JobState.RUNNING)], OWNED, 0, NOW)
    assert plan.status["phase"] == "Succeeded" and plan.cancel == ["100"]


@pytest.mark.parametrize(("state", "reason"), [(JobState.CANCELLED, "CANCELLED"),
                                               (JobState.FAILED, "NodeFail"),
                                               (JobState.GONE, "")])
def test_a_runner_that_died_without_an_exit_status_fails(state: JobState, reason: str) -> None:
    plan = plan_job(model(), {"phase": "Running"}, [job(state, reason=reason)], OWNED, None,
                    NOW)
    assert plan.status["phase"] == "Failed"
    assert "before the command reported an exit status" in plan.status["message"]
    assert plan.delete_child


def test_a_runner_forgotten_by_the_batch_system_is_not_resubmitted() -> None:
    plan = plan_job(model(), {"phase": "Running", "jobId": "100"}, [], OWNED, None, NOW)
    assert plan.submit is None and plan.status["phase"] == "Failed"
    assert "outcome is unknown" in plan.status["message"]


def test_a_failed_cluster_fails_the_job_and_cancels_its_runner() -> None:
    failed = ChildView(owned=True, deleting=False, phase="Failed",
                       message="scheduler job 5 ended (failed)")
    plan = plan_job(model(), {}, [], failed, None, NOW)
    assert plan.status["phase"] == "Failed" and "scheduler job 5" in plan.status["message"]
    plan = plan_job(model(), {"phase": "Running"}, [job(JobState.RUNNING)], failed, None, NOW)
    assert plan.status["phase"] == "Failed" and plan.cancel == ["100"] and plan.delete_child


def test_a_recreated_job_waits_for_the_cluster_of_its_predecessor() -> None:
    """Delete and re-create under the same name: the old cluster belongs to the old uid."""
    old_cluster = ChildView(owned=False, deleting=True, phase="Running")
    plan = plan_job(model(), {}, [], old_cluster, None, NOW)
    assert not plan.create_child and plan.submit is None and not plan.delete_child
    assert "does not own" in plan.status["message"]


def test_settled_jobs_only_clean_up() -> None:
    old = {"phase": "Succeeded", "exitCode": 0}
    plan = plan_job(model(), old, [job(JobState.RUNNING)], OWNED, None, NOW)
    assert plan.status == {} and plan.cancel == ["100"] and plan.delete_child
    plan = plan_job(model(), old, [], None, None, NOW)
    assert plan.status == {} and not plan.delete_child and plan.submit is None


def test_allocation_mode_submits_one_allocation_and_no_cluster() -> None:
    m = model("allocation")
    plan = plan_job(m, {}, [], None, None, NOW)
    assert plan.submit is not None and plan.submit.role is Role.ALLOCATION
    assert not plan.create_child
    plan = plan_job(m, {"jobId": "100"}, [job(JobState.RUNNING, mode="allocation")], None,
                    None, NOW)
    assert plan.status["phase"] == "Running" and "allocation 100" in plan.status["message"]
    plan = plan_job(m, {"phase": "Running"}, [job(JobState.FAILED, mode="allocation")], None,
                    2, NOW)
    assert plan.status["phase"] == "Failed" and plan.status["exitCode"] == 2


def test_job_model_reads_the_spec() -> None:
    m = model()
    assert m.command == ("python", "train.py") and m.script is None
    assert m.workers == 2 and m.runner.memory == "2GiB"
    assert m.identity(0).job_name == "dask.default.train.runner.0"
