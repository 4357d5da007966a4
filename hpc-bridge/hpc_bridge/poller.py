"""One batched query per backend per period, shared by every reconcile.

A site with 50 clusters must not run 50 squeues every few seconds. Reconciles ask the poller
for a snapshot no older than they can tolerate; concurrent askers share one in-flight query;
a failing batch system is backed off exponentially, and while it is down reconciles get an
error instead of a stale view (acting on a stale view could submit duplicates).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backends.base import Backend, BatchSystemError
from .model import JobState, ObservedJob

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    jobs: dict[str, ObservedJob] = field(default_factory=dict)
    taken_at: float = 0.0  # monotonic

    _by_owner: dict[str, list[ObservedJob]] | None = field(default=None, repr=False,
                                                           compare=False)

    def owned_by(self, owner_uid: str) -> list[ObservedJob]:
        """One owner's jobs. Every reconcile asks this of the shared snapshot, so the owner
        index is built once per snapshot (a scan per call made a cycle over C clusters of
        W jobs cost C x C x W)."""
        if self._by_owner is None:
            index: dict[str, list[ObservedJob]] = {}
            for job in self.jobs.values():
                index.setdefault(job.identity.owner_uid, []).append(job)
            self._by_owner = index
        return list(self._by_owner.get(owner_uid, ()))

    def put(self, job: ObservedJob) -> None:
        self.jobs[job.job_id] = job
        self._by_owner = None


class BatchSystemUnavailable(RuntimeError):
    pass


class BatchedPoller:
    def __init__(self, backend: Backend, min_interval: float = 2.0,
                 max_backoff: float = 60.0) -> None:
        self.backend = backend
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self.snapshot = Snapshot()
        self.polls = 0
        self.failures = 0
        self.last_error = ""
        self._next_allowed = 0.0
        self._inflight: asyncio.Task[Snapshot] | None = None
        # Submits and cancels recorded since the last poll began, with when: a poll that was
        # already in flight cannot have seen them, so they are laid over its result.
        self._recorded: dict[str, tuple[ObservedJob, float]] = {}

    async def get(self, max_age: float | None = None) -> Snapshot:
        """A snapshot no older than `max_age` (default: the minimum interval)."""
        max_age = self.min_interval if max_age is None else max(max_age, self.min_interval)
        now = time.monotonic()
        if self.failures == 0 and now - self.snapshot.taken_at <= max_age:
            return self.snapshot
        if now < self._next_allowed:
            raise BatchSystemUnavailable(
                f"{self.backend.kind} unreachable, retrying in {self._next_allowed - now:.0f}s: "
                f"{self.last_error}")
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._poll())
        return await asyncio.shield(self._inflight)

    async def refresh(self) -> Snapshot:
        """A snapshot taken after this call began (after submits and cancels)."""
        self.snapshot.taken_at = 0.0
        return await self.get(max_age=0)

    async def _poll(self) -> Snapshot:
        self.polls += 1
        started = time.monotonic()
        try:
            jobs = await self.backend.poll()
        except BatchSystemError as exc:
            self.failures += 1
            self.last_error = str(exc)
            delay = min(self.max_backoff, self.min_interval * 2 ** self.failures)
            self._next_allowed = time.monotonic() + delay
            log.warning("poll of %s failed (%d in a row), next try in %.0fs: %s",
                        self.backend.kind, self.failures, delay, exc)
            raise BatchSystemUnavailable(f"{self.backend.kind}: {exc}") from exc
        self.failures = 0
        self.last_error = ""
        observed = {j.job_id: j for j in jobs}
        for job_id, (job, recorded_at) in list(self._recorded.items()):
            if recorded_at < started:
                del self._recorded[job_id]  # this poll saw the batch system after the change
                continue
            seen = observed.get(job_id)
            if seen is None or (job.state is JobState.ENDING and seen.state.live):
                observed[job_id] = job
        self.snapshot = Snapshot(observed, started)  # its age counts from when it began
        return self.snapshot

    def _record(self, job: ObservedJob) -> None:
        self.snapshot.put(job)
        self._recorded[job.job_id] = (job, time.monotonic())

    def record_submitted(self, job: ObservedJob) -> None:
        """Make a fresh submission visible at once, so the next reconcile cannot repeat it."""
        self._record(job)

    def record_cancelled(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            job = self.snapshot.jobs.get(job_id)
            if job is not None and job.state.live:
                self._record(ObservedJob(job.job_id, job.identity, JobState.ENDING,
                                         "cancel requested"))
