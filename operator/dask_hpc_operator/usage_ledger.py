"""Each cluster's usage, kept up to date from the shared accounting collectors and written
to its staging directory (`usage.json`), where it outlives the operator and the cluster.

The ledger holds, per DaskCluster, one JobUsage row per batch job the cluster ever had: the
poll forgets finished jobs within minutes, the ledger does not, so a cluster whose workers
were replaced ten times still counts them all. It is read back from `usage.json` when an
operator (re)starts, and teardown takes the final records and leaves the file for history
to keep (`history.keep`). Rows change once per accounting query (`usageInterval`), so
status.usage and the file change at that pace, not at every reconcile.

Why a file of its own rather than a table in history.sqlite: the scheduler's preload owns
that file while the scheduler lives (its WAL, its shared-memory index on the scheduler's
host), and a cluster whose scheduler never started still used core-hours.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpc_bridge.accounting import AccountingCollector
from hpc_bridge.backends.base import Backend
from hpc_bridge.model import ObservedJob

from . import history
from .usage import (
    JobUsage,
    Requested,
    UsageSummary,
    document,
    group_of,
    job_usage,
    observed_of,
    rows_of,
    summarize,
)

log = logging.getLogger(__name__)

# A job that left the poll with no final record is asked for again at each query, until
# the batch system has answered this many queries without one, over at least this long
# (slurmdbd may file a record a little after the job left squeue). Then its row is final
# with the figures known (source `requested` or the last, unfinished record's): some jobs
# never get a record (PBS without job history, a SLURM array task the completion log
# cannot key, a site without sacct), and asking for every such job of every cluster
# forever would grow each query without bound.
GIVE_UP_QUERIES = 3
GIVE_UP_AFTER_S = 600.0


def gives_up(unanswered: int, seconds: float) -> bool:
    """Whether a gone job's row is final without a record: `unanswered` queries answered
    without one, over `seconds` (the query clock) since the first of them."""
    return unanswered >= GIVE_UP_QUERIES and seconds >= GIVE_UP_AFTER_S


@dataclass
class ClusterUsage:
    """One cluster's rows, and where they are written."""

    namespace: str
    name: str
    uid: str
    path: Path
    rows: dict[str, JobUsage] = field(default_factory=dict)
    as_of: float = 0.0
    written_as_of: float = -1.0
    # What the rows were last computed from (the query's time, the jobs seen): a reconcile
    # between two queries finds them unchanged and computes nothing (1,000 clusters of 50
    # workers reconcile every few seconds).
    computed_from: tuple[float, frozenset[str]] | None = None
    # Jobs gone from the poll without a final record: job id -> (queries answered without
    # one, the query time of the first), for gives_up; `counted_as_of`: the query last
    # counted (several reconciles may see the same one).
    unanswered: dict[str, tuple[int, float]] = field(default_factory=dict)
    counted_as_of: float = -1.0
    _summary: UsageSummary | None = None
    # The /metrics scrape reads the rows from its own thread while the event loop puts:
    # it sums a copy taken under the lock (never the dict while it changes), and caches
    # the sum only if no row was put meanwhile.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _puts: int = 0
    writing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)  # see write()

    def put(self, row: JobUsage) -> None:
        with self._lock:
            self.rows[row.job_id] = row
            self._summary = None
            self._puts += 1

    def summary(self) -> UsageSummary:
        with self._lock:
            if self._summary is not None:
                return self._summary
            rows, puts = list(self.rows.values()), self._puts
        summary = summarize(rows)
        with self._lock:
            if self._puts == puts:
                self._summary = summary
        return summary


class UsageLedger:
    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.clusters: dict[str, ClusterUsage] = {}  # by cluster uid
        # DaskWorkerGroups of each cluster (cluster uid -> group uid -> group name), told by
        # their reconciles: their jobs are the cluster's too.
        self.groups: dict[str, dict[str, str]] = {}
        # What one job of each group asks for (cluster uid -> group -> request): the
        # figures of jobs the batch system's records leave out (GPUs without slurmdbd).
        self.requested: dict[str, dict[str, Requested]] = {}
        self._collectors: dict[int, tuple[Backend, AccountingCollector]] = {}
        self._backend_of: dict[str, Backend] = {}  # cluster uid -> the backend it used

    def collector(self, backend: Backend) -> AccountingCollector:
        """The one collector of this backend object (keyed by identity: a runtime may hold
        several backends of one kind, e.g. per submitting account)."""
        key = id(backend)
        if key not in self._collectors:
            self._collectors[key] = (backend, AccountingCollector(backend, self.interval))
        return self._collectors[key][1]

    def link_group(self, cluster_uid: str, group_uid: str, group: str,
                   requested: Requested) -> None:
        self.groups.setdefault(cluster_uid, {})[group_uid] = group
        self.requested.setdefault(cluster_uid, {})[group] = requested

    def group_uids(self, cluster_uid: str) -> list[str]:
        return list(self.groups.get(cluster_uid, {}))

    def _entry(self, namespace: str, name: str, uid: str, path: Path) -> ClusterUsage:
        entry = self.clusters.get(uid)
        if entry is None:
            entry = ClusterUsage(namespace, name, uid, path)
            doc = history.read_json(path)
            if doc is not None:  # an operator restart: what the previous one counted
                entry.rows = {r.job_id: r for r in rows_of(doc)}
                entry.as_of = entry.written_as_of = float(doc.get("asOf") or 0.0)
            self.clusters[uid] = entry
        return entry

    async def update(self, namespace: str, name: str, uid: str, path: Path,
                     jobs: Iterable[ObservedJob], backend: Backend,
                     requested: dict[str, Requested] | None = None,
                     force: bool = False) -> ClusterUsage:
        """Bring one cluster's rows up to date with the poll's `jobs` (the cluster's own
        and its groups'), asking the backend's collector for records (at its pace, or now
        with `force`), and write its usage file when the figures moved."""
        entry = self._entry(namespace, name, uid, path)
        self._backend_of[uid] = backend
        wanted = self.requested.setdefault(uid, {})
        wanted.update(requested or {})
        seen = {j.job_id: j for j in jobs}
        ask = list(seen.values())
        for row in entry.rows.values():
            if row.job_id not in seen and not row.final:
                job = observed_of(row)
                if job is not None:
                    ask.append(job)
        collector = self.collector(backend)
        records = await collector.collect(ask, force=force)
        as_of = collector.as_of or time.time()
        basis = (as_of, frozenset(seen))
        if not force and entry.computed_from == basis:
            return entry
        entry.computed_from = basis
        # A query the batch system answered (not failed) since the last one counted.
        answered = as_of != entry.counted_as_of and collector.queries > 0 \
            and collector.failures == 0
        if answered:
            entry.counted_as_of = as_of
        for job in ask:
            previous = entry.rows.get(job.job_id)
            if previous is not None and previous.final:
                continue
            want = wanted.get(group_of(job.identity)) or (
                Requested(previous.cores, previous.gpus) if previous else Requested(1, 0))
            updated = job_usage(seen.get(job.job_id), records.get(job.job_id), want, as_of,
                                previous)
            if updated is None:
                continue
            if job.job_id in seen or updated.final:
                entry.unanswered.pop(job.job_id, None)
            elif answered:
                count, since = entry.unanswered.get(job.job_id, (0, as_of))
                if gives_up(count + 1, as_of - since):
                    entry.unanswered.pop(job.job_id, None)
                    updated = replace(updated, final=True)
                else:
                    entry.unanswered[job.job_id] = (count + 1, since)
            entry.put(updated)
        entry.as_of = as_of
        if force or entry.written_as_of != as_of:
            await self.write(entry)
        return entry

    async def finish(self, namespace: str, name: str, uid: str, path: Path,
                     jobs: Iterable[ObservedJob], backend: Backend) -> ClusterUsage:
        """A deleted cluster's last update, once all its jobs have ended: one forced query
        for the records not final yet (SLURM writes a job's completion record as it ends;
        with slurmdbd it may take a moment longer, and such a job keeps what the poll saw,
        marked not final). The file is written and the cluster forgotten here; a
        repeated teardown (the staging directory is gone) changes nothing."""
        if not path.parent.is_dir():
            self.forget(uid)
            return ClusterUsage(namespace, name, uid, path)
        entry = await self.update(namespace, name, uid, path, jobs,
                                  self._backend_of.get(uid, backend), force=True)
        self.forget(uid)
        return entry

    async def write(self, entry: ClusterUsage) -> None:
        """Write the usage file, into the staging directory the reconcile made: never
        re-create one a teardown removed. The document is made here, from the rows as
        they are; the file is written in a thread (a slow shared filesystem must not hold
        up the event loop every cluster's reconcile runs on), one write per cluster at a
        time, so an older document never lands after a newer one."""
        async with entry.writing:
            if not entry.path.parent.is_dir():
                return
            as_of = entry.as_of
            doc = document(entry.namespace, entry.name, entry.uid, entry.rows.values(), as_of)
            try:
                await asyncio.to_thread(history.write_json, entry.path, doc)
                entry.written_as_of = as_of
            except OSError as exc:  # a full or vanished staging directory: status shows it
                log.warning("could not write usage of %s/%s to %s: %s", entry.namespace,
                            entry.name, entry.path, exc)

    def forget(self, uid: str) -> None:
        self.clusters.pop(uid, None)
        self.groups.pop(uid, None)
        self.requested.pop(uid, None)
        self._backend_of.pop(uid, None)
