"""hpc_bridge.poller.BatchedPoller with an in-memory backend and a controlled clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

import hpc_bridge.poller as poller_module
from hpc_bridge.backends.base import BatchSystemError
from hpc_bridge.model import JobIdentity, JobRequest, JobState, ObservedJob, Role
from hpc_bridge.poller import BatchedPoller, BatchSystemUnavailable


def job(job_id: str, state: JobState = JobState.RUNNING, index: int = 0,
        uid: str = "uid-1") -> ObservedJob:
    return ObservedJob(job_id, JobIdentity("default", "c1", uid, Role.WORKER, "default", index),
                       state)


class FakeBackend:
    kind = "fake"

    def __init__(self) -> None:
        self.jobs: list[ObservedJob] = []
        self.polls = 0
        self.fail: BatchSystemError | None = None
        self.gate: asyncio.Event | None = None  # when set, poll waits for it
        self.started = asyncio.Event()

    async def submit(self, request: JobRequest) -> str:
        raise NotImplementedError

    async def cancel(self, job_ids: Sequence[str]) -> None:
        raise NotImplementedError

    async def poll(self) -> list[ObservedJob]:
        self.polls += 1
        self.started.set()
        await asyncio.sleep(0)  # let concurrent callers pile up
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return list(self.jobs)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    # Only the poller's view of time: asyncio keeps the real clock.
    monkeypatch.setattr(poller_module, "time", clock)
    return clock


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


async def test_concurrent_gets_share_one_poll(backend: FakeBackend, clock: Clock) -> None:
    backend.jobs = [job("1"), job("2", index=1)]
    poller = BatchedPoller(backend, min_interval=2.0)
    snapshots = await asyncio.gather(*(poller.get() for _ in range(10)))
    assert backend.polls == 1
    assert poller.polls == 1
    assert all(s is snapshots[0] for s in snapshots)
    assert sorted(snapshots[0].jobs) == ["1", "2"]


async def test_fresh_snapshot_is_reused(backend: FakeBackend, clock: Clock) -> None:
    poller = BatchedPoller(backend, min_interval=2.0)
    first = await poller.get()
    clock.now += 1.0
    assert await poller.get() is first
    assert await poller.get(max_age=0) is first  # never more often than min_interval
    clock.now += 5.0
    assert await poller.get(max_age=30) is first
    assert backend.polls == 1
    clock.now += 30.0
    await poller.get(max_age=30)
    assert backend.polls == 2


async def test_stale_snapshot_is_refreshed(backend: FakeBackend, clock: Clock) -> None:
    poller = BatchedPoller(backend, min_interval=2.0)
    await poller.get()
    backend.jobs = [job("7")]
    clock.now += 2.5
    snap = await poller.get()
    assert backend.polls == 2
    assert list(snap.jobs) == ["7"]
    assert snap.taken_at == clock.now


async def test_refresh_always_polls(backend: FakeBackend, clock: Clock) -> None:
    poller = BatchedPoller(backend, min_interval=2.0)
    await poller.get()
    await poller.refresh()
    assert backend.polls == 2


async def test_failure_raises_and_backs_off(backend: FakeBackend, clock: Clock) -> None:
    poller = BatchedPoller(backend, min_interval=2.0, max_backoff=10.0)
    backend.fail = BatchSystemError("squeue exited 1: Unable to contact slurm controller")
    with pytest.raises(BatchSystemUnavailable, match="Unable to contact"):
        await poller.get()
    assert backend.polls == 1
    assert poller.failures == 1
    # within the back-off (2 * 2**1 = 4 s): no call to the batch system at all
    clock.now += 3.0
    with pytest.raises(BatchSystemUnavailable, match="retrying in"):
        await poller.get()
    assert backend.polls == 1
    # after it: tried again, fails again, back-off doubles (8 s)
    clock.now += 1.5
    with pytest.raises(BatchSystemUnavailable):
        await poller.get()
    assert backend.polls == 2
    clock.now += 7.0
    with pytest.raises(BatchSystemUnavailable):
        await poller.get()
    assert backend.polls == 2
    # capped by max_backoff (would be 16 s)
    clock.now += 1.5
    with pytest.raises(BatchSystemUnavailable):
        await poller.get()
    assert backend.polls == 3
    clock.now += 10.5
    backend.fail = None
    backend.jobs = [job("1")]
    snap = await poller.get()
    assert backend.polls == 4
    assert list(snap.jobs) == ["1"]
    assert poller.failures == 0
    assert poller.last_error == ""


async def test_failure_does_not_serve_stale_snapshot(backend: FakeBackend,
                                                     clock: Clock) -> None:
    poller = BatchedPoller(backend, min_interval=2.0)
    backend.jobs = [job("1")]
    await poller.get()
    clock.now += 3.0
    backend.fail = BatchSystemError("down")
    with pytest.raises(BatchSystemUnavailable):
        await poller.get()
    # a stale view could cause duplicate submissions: even a lenient caller gets an error
    with pytest.raises(BatchSystemUnavailable):
        await poller.get(max_age=3600)


async def test_concurrent_gets_share_a_failure(backend: FakeBackend, clock: Clock) -> None:
    poller = BatchedPoller(backend)
    backend.fail = BatchSystemError("down")
    results = await asyncio.gather(*(poller.get() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, BatchSystemUnavailable) for r in results)
    assert backend.polls == 1


async def test_record_submitted_is_visible_at_once(backend: FakeBackend,
                                                   clock: Clock) -> None:
    poller = BatchedPoller(backend)
    await poller.get()
    poller.record_submitted(job("42", JobState.PENDING))
    snap = await poller.get()
    assert backend.polls == 1
    assert snap.jobs["42"].state is JobState.PENDING
    assert [j.job_id for j in snap.owned_by("uid-1")] == ["42"]
    assert snap.owned_by("uid-2") == []


async def test_record_cancelled_marks_live_jobs_ending(backend: FakeBackend,
                                                       clock: Clock) -> None:
    backend.jobs = [job("1", JobState.RUNNING), job("2", JobState.PENDING, index=1),
                    job("3", JobState.COMPLETED, index=2), job("4", JobState.FAILED, index=3)]
    poller = BatchedPoller(backend)
    await poller.get()
    poller.record_cancelled(["1", "2", "3", "4", "unknown"])
    snap = await poller.get()
    assert snap.jobs["1"].state is JobState.ENDING
    assert snap.jobs["1"].reason == "cancel requested"
    assert snap.jobs["1"].identity == backend.jobs[0].identity
    assert snap.jobs["2"].state is JobState.ENDING
    assert snap.jobs["3"].state is JobState.COMPLETED
    assert snap.jobs["4"].state is JobState.FAILED
    assert "unknown" not in snap.jobs


async def test_submission_survives_a_poll_started_before_it(backend: FakeBackend,
                                                            clock: Clock) -> None:
    poller = BatchedPoller(backend)
    backend.gate = asyncio.Event()
    inflight = asyncio.ensure_future(poller.get())
    await backend.started.wait()  # squeue has run; sbatch happens now
    poller.record_submitted(job("42", JobState.PENDING))
    backend.gate.set()  # the poll answers without job 42
    await inflight
    clock.now += 1.0  # the next reconcile, within min_interval: served from the snapshot
    snap = await poller.get()
    assert "42" in snap.jobs
