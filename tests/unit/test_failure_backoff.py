"""Failing worker jobs: the failure streak, back-off and limit in the plan (pure), the
WorkersFailing condition with the error output's tail, and where that output is found."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dask_hpc_operator.job_logs import error_file, error_tail
from dask_hpc_operator.model import ClusterModel, GroupModel
from dask_hpc_operator.planning import (
    DaskView,
    FailurePolicy,
    Plan,
    WorkerView,
    bounded_tail,
    cluster_status,
    failure_streak,
    group_status,
    plan_cluster,
    plan_group,
)
from dask_hpc_operator.reconcile import ClusterReconciler, Runtime
from dask_hpc_operator.site_config import SiteConfig
from hpc_bridge.model import JobIdentity, JobRequest, JobState, JobTemplate, ObservedJob, Role

NS, NAME, UID = "default", "c1", "uid-1"
NOW = 1_704_067_200.0
POLICY = FailurePolicy(base_s=5.0, max_delay_s=300.0, limit=5, long_run_s=300.0)


def gpu_group(replicas: int = 1) -> GroupModel:
    return GroupModel("gpu", "uid-gpu", replicas, JobTemplate())


def model(replicas: int = 1) -> ClusterModel:
    return ClusterModel(NS, NAME, UID, "slurm", ("tcp",), JobTemplate(),
                        (GroupModel("default", UID, replicas, JobTemplate()),))


def sched() -> ObservedJob:
    return ObservedJob("s0", JobIdentity(NS, NAME, UID, Role.SCHEDULER, "default", 0),
                       JobState.RUNNING, started_at=NOW - 600)


def job(index: int, state: JobState, ended_ago: float | None = 1.0, ran: float = 2.0,
        group: str = "gpu", uid: str = "uid-gpu", reason: str = "",
        exit_code: int | None = None) -> ObservedJob:
    ended = None if ended_ago is None else NOW - ended_ago
    started = None if ended is None else ended - ran
    if state.live:
        ended = None
    return ObservedJob(f"{group}-{index}", JobIdentity(NS, NAME, uid, Role.WORKER, group, index),
                       state, reason, exit_code, started_at=started, ended_at=ended)


def failed(*indices: int, ended_ago: float = 1.0) -> list[ObservedJob]:
    return [job(i, JobState.FAILED, ended_ago, reason="NonZeroExitCode", exit_code=3)
            for i in indices]


def plan_gpu(jobs: Sequence[ObservedJob], dask: DaskView | None = None, now: float = NOW,
             spec_changed: bool = False, replicas: int = 1) -> Plan:
    return plan_group(NS, NAME, gpu_group(replicas), jobs, dask, Plan(), now=now,
                      spec_changed=spec_changed, policy=POLICY)


def connected(*jobs: ObservedJob) -> DaskView:
    return DaskView("tcp://10.0.0.1:8786", "http://10.0.0.1:8787/status",
                    tuple(WorkerView(j.identity.job_name, "tcp://10.0.0.2:1") for j in jobs))


# --- the streak ----------------------------------------------------------------------------

def test_streak_counts_newest_failures_until_one_did_not_fail() -> None:
    jobs = [*failed(0, 1), job(2, JobState.COMPLETED), *failed(3, 4, 5)]
    assert [j.identity.index for j in failure_streak(jobs, None, POLICY)] == [5, 4, 3]


@pytest.mark.parametrize("state", [JobState.CANCELLED, JobState.COMPLETED])
def test_cancelled_or_completed_job_ends_the_streak(state: JobState) -> None:
    """A preempted job is CANCELLED in our mapping: not the job's fault."""
    assert failure_streak([*failed(0, 1), job(2, state)], None, POLICY) == []


@pytest.mark.parametrize("state", [JobState.GONE, JobState.ENDING, JobState.PENDING])
def test_unknown_outcomes_and_queued_jobs_are_passed_over(state: JobState) -> None:
    jobs = [*failed(0, 1), job(2, state)]
    assert len(failure_streak(jobs, None, POLICY)) == 2


def test_newer_connected_worker_ends_the_streak() -> None:
    running = job(2, JobState.RUNNING)
    jobs = [*failed(0, 1), running]
    assert failure_streak(jobs, connected(running), POLICY) == []
    assert len(failure_streak(jobs, connected(), POLICY)) == 2  # running, not connected


def test_failure_after_a_long_run_ends_the_streak() -> None:
    """Workers that ran for a while proved the job can start: not a fast failure."""
    long_run = job(2, JobState.FAILED, ran=POLICY.long_run_s + 1)
    assert failure_streak([*failed(0, 1), long_run], None, POLICY) == []


# --- back-off and limit --------------------------------------------------------------------

def test_first_failure_waits_the_base_delay() -> None:
    jobs = failed(0, ended_ago=2.0)
    plan = plan_gpu(jobs)
    assert plan.submit == []
    assert plan.notes == ["group gpu: 1 worker jobs failed in a row; retrying in 3 s"]
    # once the delay has passed, the replacement goes out, and the plan says why
    plan = plan_gpu(jobs, now=NOW + 3.5)
    assert [i.index for i in plan.submit] == [1]
    assert plan.notes == ["group gpu: 1 worker jobs failed in a row; retrying now"]


@pytest.mark.parametrize(("streak", "delay"), [(1, 5), (2, 10), (3, 20), (4, 40)])
def test_delay_doubles(streak: int, delay: float) -> None:
    jobs = failed(*range(streak), ended_ago=0.0)
    plan = plan_gpu(jobs)
    assert plan.submit == []
    assert plan.notes == [f"group gpu: {streak} worker jobs failed in a row; "
                          f"retrying in {delay} s"]
    assert [i.index for i in plan_gpu(jobs, now=NOW + delay).submit] == [streak]


def test_delay_is_capped() -> None:
    policy = FailurePolicy(base_s=5.0, max_delay_s=60.0, limit=100)
    jobs = failed(*range(10), ended_ago=0.0)
    plan = plan_group(NS, NAME, gpu_group(), jobs, None, Plan(), now=NOW + 59, policy=policy)
    assert plan.submit == [] and plan.failures[0].retry_in == pytest.approx(1.0)
    plan = plan_group(NS, NAME, gpu_group(), jobs, None, Plan(), now=NOW + 60, policy=policy)
    assert len(plan.submit) == 1


def test_limit_stops_resubmission() -> None:
    jobs = failed(*range(5), ended_ago=3600.0)  # long ago: no delay left, still stopped
    plan = plan_gpu(jobs)
    assert plan.submit == []
    assert plan.notes == ["group gpu: 5 worker jobs failed in a row; stopped after 5 failures "
                          "(until the spec changes or a worker job succeeds)"]
    assert plan.failures[0].stopped


def test_spec_change_lifts_the_stop_once() -> None:
    jobs = failed(*range(5))
    plan = plan_gpu(jobs, spec_changed=True, replicas=2)
    assert [i.index for i in plan.submit] == [5, 6]
    # the next reconcile sees the new jobs queued: nothing more; if they fail, it stops
    queued = [job(5, JobState.PENDING), job(6, JobState.PENDING)]
    assert plan_gpu([*jobs, *queued], replicas=2).submit == []
    plan = plan_gpu([*jobs, *failed(5, 6)], replicas=2)
    assert plan.submit == [] and plan.failures[0].stopped


def test_a_success_resets_the_streak() -> None:
    jobs = [*failed(*range(5)), job(5, JobState.COMPLETED)]
    plan = plan_gpu(jobs)
    assert [i.index for i in plan.submit] == [6]
    assert plan.notes == [] and plan.failures == []


def test_failure_without_end_time_is_bounded_by_the_limit_only() -> None:
    jobs = [job(i, JobState.FAILED, ended_ago=None) for i in range(3)]
    assert len(plan_gpu(jobs).submit) == 1
    jobs = [job(i, JobState.FAILED, ended_ago=None) for i in range(5)]
    assert plan_gpu(jobs).submit == []


def test_waiting_group_keeps_its_other_jobs() -> None:
    """Back-off holds only new submissions: running workers are not touched."""
    running = job(3, JobState.RUNNING)
    jobs = [running, *failed(4, 5, ended_ago=0.0)]
    plan = plan_gpu(jobs, dask=connected(), replicas=2)
    assert plan.empty and plan.notes[0].endswith("retrying in 10 s")


def test_plan_cluster_uses_the_policy() -> None:
    jobs = [sched(), *failed(0, 1, 2, ended_ago=0.0)]
    jobs = [ObservedJob(f"w{j.identity.index}",
                        JobIdentity(NS, NAME, UID, Role.WORKER, "default", j.identity.index),
                        j.state, j.reason, j.exit_code, started_at=j.started_at,
                        ended_at=j.ended_at) for j in jobs[1:]] + [jobs[0]]
    plan = plan_cluster(model(), jobs, connected(), now=NOW, policy=POLICY)
    assert plan.notes == ["group default: 3 worker jobs failed in a row; retrying in 20 s"]
    assert plan_cluster(model(), jobs, connected(), now=NOW,
                        policy=FailurePolicy(limit=3)).failures[0].stopped


def test_policy_from_site_config() -> None:
    site = SiteConfig.from_mapping({"failureBackoffBase": 1, "failureBackoffMax": 8.5,
                                    "failureLimit": 3})
    assert FailurePolicy.of(site) == FailurePolicy(base_s=1, max_delay_s=8.5, limit=3)
    assert FailurePolicy.of(SiteConfig()) == FailurePolicy()


@pytest.mark.parametrize("bad", [{"failureLimit": 0}, {"failureLimit": 1.5},
                                 {"failureBackoffBase": 10, "failureBackoffMax": 5}])
def test_bad_failure_settings_are_refused(bad: dict[str, Any]) -> None:
    from dask_hpc_operator.site_config import ConfigError

    with pytest.raises(ConfigError):
        SiteConfig.from_mapping(bad)


# --- the condition -------------------------------------------------------------------------

ERR = "\n".join(f"line {i}" for i in range(40)) + "\nbash: /opt/env.sh: No such file\n"


def conditions(status: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in status["conditions"]}


def test_condition_carries_the_tail_of_the_newest_failure() -> None:
    jobs = [sched(), *failed(0, 1, 2, ended_ago=0.0)]
    m = ClusterModel(NS, NAME, UID, "slurm", ("tcp",), JobTemplate(),
                     (gpu_group(),))
    plan = plan_cluster(m, jobs, connected(), now=NOW, policy=POLICY)
    status = cluster_status(m, jobs, connected(), plan, (), "t0", {"gpu-2": ERR})
    cond = conditions(status)["WorkersFailing"]
    assert (cond["status"], cond["reason"]) == ("True", "RepeatedFailures")
    first, _, tail = cond["message"].partition("\n")
    assert first == ("group gpu: 3 worker jobs failed in a row; retrying in 20 s; newest: job "
                     "gpu-2 (NonZeroExitCode, exit code 3); its error output ends with:")
    assert tail.splitlines() == [f"line {i}" for i in range(21, 40)] + [
        "bash: /opt/env.sh: No such file"]
    assert "retrying in 20 s" in status["message"]
    # the other conditions are unchanged
    assert conditions(status)["WorkersReady"]["status"] == "False"


def test_condition_on_a_worker_group_status() -> None:
    jobs = failed(*range(5))
    plan = plan_gpu(jobs, dask=connected())
    status = group_status(gpu_group(), jobs, connected(), plan, "", [], "t0", {})
    cond = conditions(status)["WorkersFailing"]
    assert cond["message"] == ("group gpu: 5 worker jobs failed in a row; stopped after 5 "
                               "failures (until the spec changes or a worker job succeeds); "
                               "newest: job gpu-4 (NonZeroExitCode, exit code 3)")


def test_no_condition_for_a_single_failure_or_after_success() -> None:
    plan = plan_gpu(failed(0))
    status = group_status(gpu_group(), failed(0), None, plan, "", [], "t0", {"gpu-0": "x"})
    assert "WorkersFailing" not in conditions(status)
    jobs = [*failed(0, 1), job(2, JobState.COMPLETED)]
    status = group_status(gpu_group(), jobs, None, plan_gpu(jobs), "", [], "t0")
    assert "WorkersFailing" not in conditions(status)


def test_bounded_tail() -> None:
    assert bounded_tail("") == ""
    assert bounded_tail("a\n\n  \nb\n") == "a\nb"
    cut = bounded_tail("x" * 5000 + "\nend")
    assert len(cut) == 2048 and cut.endswith("x\nend")
    long_lines = "\n".join("y" * 300 for _ in range(20))
    assert len(bounded_tail(long_lines)) == 2048


# --- where the error output is -------------------------------------------------------------

def worker_job(job_id: str, index: int = 3, **extra: str) -> ObservedJob:
    return ObservedJob(job_id, JobIdentity(NS, NAME, UID, Role.WORKER, "default", index),
                       JobState.FAILED, extra=dict(extra))


def test_slurm_and_local_error_files(tmp_path: Path) -> None:
    plain = tmp_path / "dask.default.c1.default.3-812.err"
    plain.write_text("boom\n")
    assert error_file("slurm", tmp_path, worker_job("812")) == plain
    assert error_file("local", tmp_path, worker_job("812")) == plain
    assert error_file("slurm", tmp_path, worker_job("813")) is None


def test_slurm_array_task_error_file_uses_the_task_s_own_id(tmp_path: Path) -> None:
    """#SBATCH -e <dir>/<array job name>-%J.err: %J is the task's own job id."""
    (tmp_path / "dask.default.c1.default.array-815.err").write_text("task 3\n")
    (tmp_path / "dask.default.c1.default.array-814.err").write_text("task 2\n")
    job_ = worker_job("813_3", raw_job_id="815")
    assert error_tail("slurm", tmp_path, job_) == "task 3\n"
    assert error_tail("slurm", tmp_path, worker_job("813_3")) == ""  # id unknown: nothing


def test_pbs_error_files(tmp_path: Path) -> None:
    (tmp_path / "dask.default.c1.e1234").write_text("plain\n")
    (tmp_path / "daskw0-1a2b3c.e1300.5").write_text("subjob\n")
    assert error_tail("pbs", tmp_path, worker_job("1234.pbs01")) == "plain\n"
    assert error_tail("pbs", tmp_path, worker_job("1300[5].pbs01", index=5)) == "subjob\n"
    assert error_tail("pbs", tmp_path, worker_job("999.pbs01")) == ""


def test_error_tail_reads_only_the_end(tmp_path: Path) -> None:
    path = tmp_path / "dask.default.c1.default.3-1.err"
    path.write_bytes(b"x" * 200_000 + b"\xff\nthe end\n")
    text = error_tail("local", tmp_path, worker_job("1"))
    assert len(text) <= 64 * 1024 and text.endswith("\ufffd\nthe end\n")
    assert error_tail("local", tmp_path / "missing", worker_job("1")) == ""


# --- through the reconcile -----------------------------------------------------------------

class ScriptedBackend:
    """Reports what a test sets; counts submissions (each one fails at once)."""

    kind = "slurm"
    supports_arrays = False

    def __init__(self) -> None:
        self.jobs: dict[str, ObservedJob] = {}
        self.submitted: list[JobRequest] = []

    def task_job_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"

    async def submit(self, request: JobRequest) -> str:
        self.submitted.append(request)
        job_id = str(100 + len(self.submitted))
        state = JobState.PENDING if request.identity.role is Role.SCHEDULER else JobState.FAILED
        self.jobs[job_id] = ObservedJob(job_id, request.identity, state, "NonZeroExitCode",
                                        exit_code=None if state.live else 3,
                                        started_at=1.0, ended_at=None if state.live else 2.0)
        Path(request.log_dir, f"{request.identity.job_name}-{job_id}.err").write_text(
            f"job {job_id}\nbash: /opt/site/env.sh: No such file or directory\n")
        return job_id

    async def poll(self) -> list[ObservedJob]:
        return list(self.jobs.values())

    async def cancel(self, job_ids: Any) -> None:
        pass


async def test_reconcile_reports_the_error_tail_and_stops(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    site = SiteConfig(staging_dir=str(tmp_path), min_poll_interval=0.001, poll_interval=0.001,
                      failure_limit=3)
    runtime = Runtime(site, backends={"slurm": backend})
    body: dict[str, Any] = {
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
        "metadata": {"name": "c1", "namespace": "default", "uid": UID, "generation": 1},
        "spec": {"backend": "slurm", "worker": {"replicas": 1}}}
    reconciler = ClusterReconciler(runtime)
    status: dict[str, Any] = {}
    for _ in range(6):  # ended long ago (epoch 2): no delay to wait, only the limit
        status.update(await reconciler.reconcile(body, status))
        runtime.poller("slurm").snapshot.taken_at = 0.0  # the next reconcile polls again
    workers = [r for r in backend.submitted if r.identity.role is Role.WORKER]
    assert len(workers) == 3
    cond = conditions(status)["WorkersFailing"]
    assert "3 worker jobs failed in a row; stopped after 3 failures" in cond["message"]
    newest = str(100 + len(backend.submitted))
    assert cond["message"].endswith(f"its error output ends with:\njob {newest}\n"
                                    "bash: /opt/site/env.sh: No such file or directory")
    # an edit of the spec (a new generation) is worth one more try
    body["metadata"]["generation"] = 2
    status.update(await reconciler.reconcile(body, status))
    assert len([r for r in backend.submitted if r.identity.role is Role.WORKER]) == 4
