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

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hpc_bridge.accounting import AccountingCollector
from hpc_bridge.backends.base import Backend
from hpc_bridge.model import ObservedJob

from . import history
from .usage import (
    JobUsage,
    Requested,
    UsageSummary,
    UsageTotals,
    document,
    group_of,
    job_usage,
    observed_of,
    rows_of,
    summarize,
)

log = logging.getLogger(__name__)


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
    _summary: UsageSummary | None = None

    def put(self, row: JobUsage) -> None:
        self.rows[row.job_id] = row
        self._summary = None

    def summary(self) -> UsageSummary:
        if self._summary is None:
            self._summary = summarize(self.rows.values())
        return self._summary


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
        # Totals of deleted clusters per namespace, since this process started (metrics).
        self.retired: dict[str, UsageTotals] = {}

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
        for job in ask:
            previous = entry.rows.get(job.job_id)
            if previous is not None and previous.final:
                continue
            want = wanted.get(group_of(job.identity)) or (
                Requested(previous.cores, previous.gpus) if previous else Requested(1, 0))
            updated = job_usage(seen.get(job.job_id), records.get(job.job_id), want, as_of,
                                previous)
            if updated is not None:
                entry.put(updated)
        entry.as_of = as_of
        if force or entry.written_as_of != as_of:
            self.write(entry)
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
        self.forget(uid)  # first: a scrape in between undercounts (a counter holds its
        self.retired[namespace] = self.retired.get(namespace, UsageTotals()).plus(
            entry.summary().total)  # value), where it would count the cluster twice
        return entry

    def write(self, entry: ClusterUsage) -> None:
        """Write the usage file, into the staging directory the reconcile made: never
        re-create one a teardown removed."""
        if not entry.path.parent.is_dir():
            return
        try:
            history.write_json(entry.path, document(entry.namespace, entry.name, entry.uid,
                                                    entry.rows.values(), entry.as_of))
            entry.written_as_of = entry.as_of
        except OSError as exc:  # a full or vanished staging directory: status still shows it
            log.warning("could not write usage of %s/%s to %s: %s", entry.namespace,
                        entry.name, entry.path, exc)

    def forget(self, uid: str) -> None:
        self.clusters.pop(uid, None)
        self.groups.pop(uid, None)
        self.requested.pop(uid, None)
        self._backend_of.pop(uid, None)
