"""Usage accounting records, asked of the batch system for every cluster at once, rarely.

What a job was given (cores, GPUs) and when it waited and ran is the batch system's own
record: sacct on SLURM, `qstat -x` on PBS. Those records are asked for here, not in the
poll, because they are expensive where it matters (sacct is a slurmdbd database query, and
centres ask users not to run it in loops) and change slowly: a running job's record changes
only by its run time, which is known from its start, and a finished job's never changes.

So one `AccountingCollector` per backend, shared by every cluster (like the BatchedPoller):
- a finished job's record is kept and never asked for again;
- the others (queued, running, or ended but not yet final in the records) join the next
  query, which runs at most every `interval` seconds, as ONE backend call for every such job
  of every cluster that asked since (concurrent askers share one in-flight query);
- a teardown may `force` a query, to take the final records of a deleted cluster's jobs.
Jobs nobody asked about for FORGET_AFTER_S are dropped (their clusters are gone; what they
used was written to the clusters' usage files by then).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from .backends.base import Backend, BatchSystemError
from .model import JobAccounting, ObservedJob

log = logging.getLogger(__name__)

FORGET_AFTER_S = 3600.0


class AccountingCollector:
    def __init__(self, backend: Backend, interval: float = 60.0) -> None:
        self.backend = backend
        self.interval = interval
        self.records: dict[str, JobAccounting] = {}
        self.queries = 0
        self.failures = 0
        # When the latest query began: monotonic (for the interval) and wall clock (what
        # the figures of unfinished jobs are "as of", so they change once per query).
        self.queried_at = float("-inf")
        self.as_of = 0.0
        self._wanted: dict[str, ObservedJob] = {}
        self._asked: dict[str, float] = {}  # job id -> when a caller last asked (monotonic)
        self._inflight: asyncio.Task[None] | None = None

    def due(self) -> bool:
        return time.monotonic() - self.queried_at >= self.interval

    async def collect(self, jobs: Iterable[ObservedJob],
                      force: bool = False) -> dict[str, JobAccounting]:
        """The records of `jobs` as of the latest query (jobs without one are left out).

        A query runs when `interval` has passed since the last one, or with `force` when
        one of these jobs has no final record yet; either way it asks for every unfinished
        job any caller asked about, in one backend call."""
        now = time.monotonic()
        ids = []
        for job in jobs:
            ids.append(job.job_id)
            self._asked[job.job_id] = now
            record = self.records.get(job.job_id)
            if record is None or not record.final:
                self._wanted[job.job_id] = job
        if self._inflight is not None and not self._inflight.done():
            await asyncio.shield(self._inflight)
        mine = any(i in self._wanted for i in ids)
        if (force and mine) or (self._wanted and self.due()):
            self._inflight = asyncio.ensure_future(self._query())
            await asyncio.shield(self._inflight)
        return {i: self.records[i] for i in ids if i in self.records}

    async def _query(self) -> None:
        self.queries += 1
        previous = self.queried_at
        self.queried_at, self.as_of = time.monotonic(), time.time()
        stale = self.queried_at - FORGET_AFTER_S
        for job_id in [i for i, t in self._asked.items() if t < stale]:
            del self._asked[job_id]
            self._wanted.pop(job_id, None)
            self.records.pop(job_id, None)
        # Only jobs some caller asked about since the previous query: one its cluster no
        # longer asks for (the usage ledger gave up on it, the cluster is gone) is not asked
        # for again (its record, if any, is kept until FORGET_AFTER_S).
        for job_id in [i for i in self._wanted if self._asked[i] < previous]:
            del self._wanted[job_id]
        asked = list(self._wanted.values())
        if not asked or not hasattr(self.backend, "usage"):  # a backend without records
            return
        try:
            found = await self.backend.usage(asked)
        except (BatchSystemError, OSError, ValueError) as exc:  # usage is not worth
            self.failures += 1                                 # failing a reconcile over
            log.warning("usage records from %s failed (%d in a row): %s", self.backend.kind,
                        self.failures, exc)
            return
        self.failures = 0
        for job_id, record in found.items():
            self.records[job_id] = record
            if record.final:
                self._wanted.pop(job_id, None)
