"""The orphan sweep's decision and its order (poll first, then list the resources)."""

from __future__ import annotations

from collections.abc import Sequence

from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.sweep import orphans, sweep
from hpc_bridge.model import JobIdentity, JobRequest, JobState, ObservedJob, Role


def job(job_id: str, uid: str, state: JobState = JobState.RUNNING,
        namespace: str = "ns") -> ObservedJob:
    return ObservedJob(job_id, JobIdentity(namespace, "c", uid, Role.WORKER, "default", 0),
                       state)


def test_orphans_are_live_jobs_of_unknown_owners_in_swept_namespaces() -> None:
    jobs = [job("1", "alive"), job("2", "gone"), job("3", "gone", JobState.COMPLETED),
            job("4", "gone", JobState.PENDING), job("5", "gone", namespace="other")]
    assert [j.job_id for j in orphans(jobs, {"alive"}, ["ns"])] == ["2", "4"]
    assert [j.job_id for j in orphans(jobs, {"alive"})] == ["2", "4", "5"]
    assert orphans(jobs, {"alive", "gone"}) == []


class Recorder:
    """An in-memory backend that logs the order of polls, listings and cancels."""

    kind = "slurm"
    supports_arrays = False

    def __init__(self, jobs: list[ObservedJob], log: list[str]) -> None:
        self.jobs, self.log = jobs, log

    def task_job_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        return [], list(indices)

    async def submit(self, request: JobRequest) -> str:
        raise AssertionError("the sweep never submits")

    async def poll(self) -> list[ObservedJob]:
        self.log.append("poll")
        return list(self.jobs)

    async def cancel(self, job_ids: Sequence[str]) -> None:
        self.log.append("cancel " + " ".join(job_ids))
        self.jobs = [ObservedJob(j.job_id, j.identity, JobState.CANCELLED)
                     if j.job_id in job_ids else j for j in self.jobs]


async def test_sweep_polls_before_listing_and_cancels_only_orphans() -> None:
    log: list[str] = []
    backend = Recorder([job("1", "alive"), job("2", "gone"), job("3", "gone")], log)
    runtime = Runtime(SiteConfig(backend="slurm", min_poll_interval=0.001),
                      backends={"slurm": backend})

    async def list_uids() -> set[str]:
        log.append("list")
        return {"alive"}

    assert await sweep(runtime, list_uids, ["ns"]) == ["2", "3"]
    assert log[:2] == ["poll", "list"]
    assert "cancel 2 3" in log
    assert [j.job_id for j in backend.jobs if j.state.live] == ["1"]
