"""Computation history, recorded inside the Dask scheduler, kept after the cluster is gone.

Why in the scheduler: it alone sees every task finish (with its compute and transfer times
from the workers' own `startstops`), every worker join and leave, and every error; the
dashboard shows the same facts but they vanish with the scheduler's job. So this preload
writes them, as the cluster runs, to `history.sqlite` next to itself (the operator copies it
into the cluster's staging directory, so the file lands there; see `dask_setup`), and
`dask-hpc history` / `dask-hpc report` read it after the cluster was deleted (the operator
moves the file to `<staging>/history/<ns>/<name>-<uid8>.sqlite` before it removes the
staging directory).

What is recorded (the schema is `SCHEMA` below; `PRAGMA user_version` is `SCHEMA_VERSION`):
- `meta`: the cluster's namespace, name and uid (from the job's `DASK_HPC_IDENTITY`, else
  from the staging directory's path `<ns>/<name>-<uid8>`).
- `runs`: one row per scheduler process: start, end (None while it runs, and forever if it
  was killed), `last_seen` (the last flush: where a killed scheduler's history stops).
- `computations`: distributed's own `Scheduler.computations` (a new one starts when a graph
  arrives at an idle scheduler; graphs sent while it is busy join the current one): start,
  end (the last task's end), tasks submitted / done / erred, compute and transfer seconds,
  bytes transferred, result bytes, the largest worker memory (process RSS) and the largest
  cluster total seen while it ran, and the user's line of code that submitted it.
- `prefixes`: the same counters per task prefix (`inc`, `lambda`, `sum-aggregate`...).
- `errors`: each task that failed itself (not its dependents): key, worker, exception and
  traceback text (at most MAX_ERRORS_PER_COMPUTATION per computation; `tasks_erred` counts all).
- `workers` and `events`: worker join / leave and scheduler start / stop, for a timeline;
  `samples`: workers, threads, tasks processing and waiting, and memory every SAMPLE_INTERVAL_S.

Bytes transferred are the scheduler's estimate: when a task is assigned to a worker, the
sizes of its dependencies that worker does not hold (each key counted once per worker). The
worker's own `startstops` give transfer times, not sizes.

Durability: hooks only update counters in memory (they run for every task, on the
scheduler's event loop); every FLUSH_INTERVAL_S a snapshot of what changed is written in
one transaction, in WAL mode, from one thread of its own (a slow shared filesystem must not
stall the event loop). A committed WAL transaction survives `kill -9`, so a killed
scheduler loses at most the last second or two. WAL keeps its index in shared memory:
read the file on the scheduler's host while it runs, or anywhere once it has stopped.

Imports only the standard library, dask and distributed: the compute nodes may not have
this package. Nothing here may stop the scheduler: a failing write is logged and retried at
the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.metrics import time
from distributed.scheduler import Scheduler, TaskState

log = logging.getLogger(__name__)

PLUGIN_NAME = "dask-hpc-history"
FILE_NAME = "history.sqlite"
SCHEMA_VERSION = 1
FLUSH_INTERVAL_S = 1.0
SAMPLE_INTERVAL_S = 5.0
MAX_ERRORS_PER_COMPUTATION = 100
KEEP_FINISHED = 200  # finished computations kept in memory (a late retry updates them)
MAX_PENDING_ROWS = 10_000  # of each kind, held while writes fail (a full disk...)
CLOSE_TIMEOUT_S = 10.0  # a hung filesystem must not hold up the scheduler's shutdown
IDENTITY_PREFIX = "dask-hpc:v1:"
ACTIVE_STATES = ("waiting", "queued", "processing", "no-worker")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, start REAL NOT NULL, end REAL, last_seen REAL NOT NULL,
    address TEXT, host TEXT, pid INTEGER, job_id TEXT);
CREATE TABLE IF NOT EXISTS computations (
    id TEXT PRIMARY KEY, run INTEGER NOT NULL, seq INTEGER NOT NULL,
    start REAL NOT NULL, end REAL, state TEXT NOT NULL,
    tasks_submitted INTEGER NOT NULL, tasks_done INTEGER NOT NULL,
    tasks_erred INTEGER NOT NULL, compute_seconds REAL NOT NULL,
    transfer_seconds REAL NOT NULL, bytes_transferred INTEGER NOT NULL,
    output_bytes INTEGER NOT NULL, worker_memory_peak INTEGER NOT NULL,
    cluster_memory_peak INTEGER NOT NULL, code TEXT, code_location TEXT);
CREATE TABLE IF NOT EXISTS prefixes (
    computation TEXT NOT NULL, prefix TEXT NOT NULL, tasks INTEGER NOT NULL,
    erred INTEGER NOT NULL, compute_seconds REAL NOT NULL, max_seconds REAL NOT NULL,
    transfer_seconds REAL NOT NULL, bytes_transferred INTEGER NOT NULL,
    output_bytes INTEGER NOT NULL, PRIMARY KEY (computation, prefix));
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY, computation TEXT, time REAL NOT NULL, key TEXT NOT NULL,
    prefix TEXT NOT NULL, worker TEXT, exception TEXT, traceback TEXT);
CREATE TABLE IF NOT EXISTS workers (
    run INTEGER NOT NULL, address TEXT NOT NULL, name TEXT, host TEXT, nthreads INTEGER,
    memory_limit INTEGER, joined REAL NOT NULL, left REAL, memory_peak INTEGER NOT NULL,
    PRIMARY KEY (run, address));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, run INTEGER NOT NULL, time REAL NOT NULL, kind TEXT NOT NULL,
    subject TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS samples (
    run INTEGER NOT NULL, time REAL NOT NULL, workers INTEGER NOT NULL,
    threads INTEGER NOT NULL, processing INTEGER NOT NULL, waiting INTEGER NOT NULL,
    memory INTEGER NOT NULL);
"""


def identity_from(environ: Mapping[str, str], directory: str) -> dict[str, str]:
    """The cluster this scheduler serves: the job's identity (`dask-hpc:v1:<ns>:<name>:
    <uid>:...`, set by the job script), else the staging directory `<ns>/<name>-<uid8>`."""
    comment = environ.get("DASK_HPC_IDENTITY", "")
    if comment.startswith(IDENTITY_PREFIX):
        parts = comment[len(IDENTITY_PREFIX):].split(":")
        if len(parts) == 6:
            return {"namespace": parts[0], "name": parts[1], "uid": parts[2]}
    leaf = os.path.basename(os.path.normpath(directory))
    name, _, uid8 = leaf.rpartition("-")
    return {"namespace": os.path.basename(os.path.dirname(os.path.normpath(directory))),
            "name": name or leaf, "uid": uid8 if name else ""}


@dataclass
class PrefixStats:
    tasks: int = 0
    erred: int = 0
    compute_seconds: float = 0.0
    max_seconds: float = 0.0
    transfer_seconds: float = 0.0
    bytes_transferred: int = 0
    output_bytes: int = 0


@dataclass
class ComputationRecord:
    """One computation's counters, in memory between flushes."""

    id: str
    seq: int
    start: float
    source: Any = None  # distributed's Computation (for its groups' states); not stored
    end: float | None = None
    state: str = "running"  # running | finished | erred | interrupted
    tasks_submitted: int = 0
    errors_kept: int = 0
    worker_memory_peak: int = 0
    cluster_memory_peak: int = 0
    code: str | None = None
    code_location: str | None = None
    prefixes: dict[str, PrefixStats] = field(default_factory=dict)
    dirty: bool = True

    def prefix(self, name: str) -> PrefixStats:
        return self.prefixes.setdefault(name, PrefixStats())

    def row(self, run: int) -> tuple[Any, ...]:
        p = self.prefixes.values()
        return (self.id, run, self.seq, self.start, self.end, self.state,
                self.tasks_submitted, sum(s.tasks for s in p), sum(s.erred for s in p),
                sum(s.compute_seconds for s in p), sum(s.transfer_seconds for s in p),
                sum(s.bytes_transferred for s in p), sum(s.output_bytes for s in p),
                self.worker_memory_peak, self.cluster_memory_peak, self.code,
                self.code_location)


@dataclass
class WorkerRecord:
    address: str
    name: str
    host: str
    nthreads: int
    memory_limit: int
    joined: float
    left: float | None = None
    memory_peak: int = 0

    def row(self, run: int) -> tuple[Any, ...]:
        return (run, self.address, self.name, self.host, self.nthreads, self.memory_limit,
                self.joined, self.left, self.memory_peak)


@dataclass
class Batch:
    """What one flush writes: plain rows, so the writer thread reads no scheduler state."""

    last_seen: float
    end: float | None = None
    address: str | None = None
    computations: list[tuple[Any, ...]] = field(default_factory=list)
    prefixes: list[tuple[Any, ...]] = field(default_factory=list)
    errors: list[tuple[Any, ...]] = field(default_factory=list)
    workers: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    samples: list[tuple[Any, ...]] = field(default_factory=list)


def _source_line(code: Any) -> tuple[str | None, str | None]:
    """The user's line that submitted the graph, from `Computation.code` (tuples of
    distributed's SourceCode: code, lineno_frame, lineno_relative, filename; after msgpack
    they are plain sequences)."""
    try:
        last = list(code)[-1][-1]  # the newest code block's innermost frame
        text, lineno_frame, lineno_relative, filename = last[0], last[1], last[2], last[3]
        lines = str(text).splitlines()
        line = lines[int(lineno_relative)].strip() if lines else ""  # 0-based there
        return line[:200], f"{filename}:{lineno_frame}"
    except (IndexError, TypeError, ValueError):
        return None, None


class HistoryWriter:
    """The sqlite side, used from one thread only (the plugin's executor)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.run: int = 0

    def open(self, identity: Mapping[str, str], start: float, address: str,
             job_id: str | None) -> tuple[int, int]:
        """Create or reopen the file (a replaced scheduler appends a run); returns the run
        id and the last computation number used."""
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a killed process
        with conn:
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [*identity.items(), ("schema_version", str(SCHEMA_VERSION))])
            cur = conn.execute(
                "INSERT INTO runs (start, last_seen, address, host, pid, job_id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (start, start, address, socket.gethostname(), os.getpid(), job_id))
            self.run = int(cur.lastrowid or 0)
            conn.execute("INSERT INTO events (run, time, kind, subject, detail) "
                         "VALUES (?, ?, 'scheduler-start', ?, ?)",
                         (self.run, start, address, job_id))
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM computations").fetchone()[0]
        self.conn = conn
        return self.run, int(seq)

    def write(self, batch: Batch) -> None:
        conn = self.conn
        if conn is None:
            return
        run = self.run
        with conn:
            conn.execute("UPDATE runs SET last_seen = ?, end = ?, address = COALESCE(?, "
                         "address) WHERE id = ?",
                         (batch.last_seen, batch.end, batch.address, run))
            conn.executemany("INSERT OR REPLACE INTO computations VALUES "
                             "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             batch.computations)
            conn.executemany("INSERT OR REPLACE INTO prefixes VALUES "
                             "(?, ?, ?, ?, ?, ?, ?, ?, ?)", batch.prefixes)
            conn.executemany("INSERT INTO errors (computation, time, key, prefix, worker, "
                             "exception, traceback) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             batch.errors)
            conn.executemany("INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             batch.workers)
            conn.executemany("INSERT INTO events (run, time, kind, subject, detail) "
                             "VALUES (?, ?, ?, ?, ?)", batch.events)
            conn.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                             batch.samples)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.close()
            self.conn = None


class HistoryPlugin(SchedulerPlugin):
    """Records computations, workers and errors into `path` (see the module docstring)."""

    name = PLUGIN_NAME

    def __init__(self, path: str, identity: Mapping[str, str] | None = None,
                 flush_interval: float = FLUSH_INTERVAL_S,
                 sample_interval: float = SAMPLE_INTERVAL_S) -> None:
        self.path = path
        self.identity = dict(identity or identity_from(os.environ, os.path.dirname(path)))
        self.flush_interval = flush_interval
        self.sample_interval = sample_interval
        self.scheduler: Scheduler | None = None
        self.writer = HistoryWriter(path)
        self.run = 0
        self.seq = 0
        self.computations: OrderedDict[str, ComputationRecord] = OrderedDict()
        self.group_owner: dict[str, str] = {}  # TaskGroup name -> computation id
        self.workers: dict[str, WorkerRecord] = {}
        self.dirty_workers: set[str] = set()
        self.events: list[tuple[Any, ...]] = []
        self.errors: list[tuple[Any, ...]] = []
        self.samples: list[tuple[Any, ...]] = []
        self.last_sample = 0.0
        # key -> (worker address, [(dependency key, nbytes) it did not hold when assigned])
        self.assigned: dict[Hashable, tuple[str, list[tuple[Hashable, int]]]] = {}
        self.moved: dict[Hashable, set[str]] = {}  # dependency key -> workers it went to
        # Keys counted as submitted and not finished: a graph names the tasks it depends on
        # too, and those still running were submitted by an earlier graph.
        self.counted: set[Hashable] = set()
        self.executor: ThreadPoolExecutor | None = None
        self.flusher: asyncio.Task[None] | None = None
        self.ended: float | None = None
        self.failed_writes = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dask-hpc-history")
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
        try:
            self.run, self.seq = await self._in_thread(
                self.writer.open, self.identity, time(), scheduler.address, job_id)
        except (sqlite3.Error, OSError) as exc:
            log.warning("dask-hpc history: cannot write %s (%s); not recording", self.path,
                        exc)
            self.executor.shutdown(wait=False)
            self.executor = None
            return
        for address in scheduler.workers:  # present before the plugin (add_plugin later)
            self.add_worker(scheduler, address)
        self.flusher = asyncio.create_task(self._flush_every(), name="dask-hpc-history")

    async def close(self) -> None:
        """Scheduler shutdown: unfinished computations were interrupted; last flush."""
        if self.executor is None:
            return
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        self.ended = now = time()
        for record in self.computations.values():
            if record.state == "running":  # finished since the last flush, or cut short
                self._settle(record, interrupted=True)
        for worker in self.workers.values():
            if worker.left is None:
                worker.left = now
                self.dirty_workers.add(worker.address)
        self.events.append((self.run, now, "scheduler-stop", None, None))
        try:
            await asyncio.wait_for(self._last_write(), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("dask-hpc history: the last write to %s did not finish in %s s",
                        self.path, CLOSE_TIMEOUT_S)
        self.executor.shutdown(wait=False)
        self.executor = None

    async def _last_write(self) -> None:
        await self.flush()
        await self._in_thread(self.writer.close)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        assert self.executor is not None
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except Exception:  # e.g. a distributed release that renamed what is read here
                log.exception("dask-hpc history: recording failed; trying again")

    async def flush(self) -> None:
        """Write what changed since the last flush (never raises: the scheduler goes on)."""
        if self.executor is None or self.scheduler is None:
            return
        batch = self._collect()
        try:
            # Shielded: when close() cancels the flush loop, a write already handed to the
            # thread still happens (and before close's own final write, in order).
            await asyncio.shield(self._in_thread(self.writer.write, batch))
        except (sqlite3.Error, OSError) as exc:
            self.failed_writes += 1
            if self.failed_writes in (1, 10, 100) or self.failed_writes % 1000 == 0:
                log.warning("dask-hpc history: writing %s failed %d times (%s); retrying",
                            self.path, self.failed_writes, exc)
            self._requeue(batch)
        else:
            self._prune()

    # --- scheduler hooks (hot paths: counters only) ---------------------------------------

    def update_graph(self, scheduler: Scheduler, *, client: str, keys: set[Any],
                     tasks: list[Any], annotations: dict[str, dict[Any, Any]],
                     priority: dict[Any, tuple[int | float, ...]], stimulus_id: str,
                     **kwargs: Any) -> None:
        if not scheduler.computations:
            return
        computation = scheduler.computations[-1]
        cid = str(computation.id)
        record = self.computations.get(cid)
        if record is None:
            self.seq += 1
            record = ComputationRecord(cid, self.seq, float(computation.start), computation)
            self.computations[cid] = record
        record.code, record.code_location = _source_line(computation.code)
        record.state, record.dirty = "running", True
        # Also sampled here, not only every flush: a short computation still gets one.
        self._peaks(record, *self._memory())
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is None:
                continue
            self.group_owner[ts.group.name] = cid
            if ts.state not in ("memory", "erred") and key not in self.counted:
                self.counted.add(key)
                record.tasks_submitted += 1

    def transition(self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str,
                   **kwargs: Any) -> None:
        if finish in ("memory", "erred", "released", "forgotten"):
            self.counted.discard(key)
        if finish == "processing":
            self._assigned(key)
        elif start == "processing" and finish in ("memory", "erred"):
            self._finished(key, finish, kwargs)
        elif finish == "erred":  # a dependent of a failed task
            record = self._owner(key)
            if record is not None:
                ts = self._task(key)
                record.prefix(ts.prefix.name if ts else str(key)).erred += 1
                record.dirty = True
        elif finish in ("released", "forgotten"):
            self.assigned.pop(key, None)
            self.moved.pop(key, None)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is None:
            return
        now = time()
        self.workers[worker] = WorkerRecord(worker, str(ws.name), str(ws.host),
                                            int(ws.nthreads), int(ws.memory_limit or 0), now)
        self.dirty_workers.add(worker)
        self.events.append((self.run, now, "worker-join", str(ws.name), worker))

    def remove_worker(self, scheduler: Scheduler, worker: str, *, stimulus_id: str,
                      **kwargs: Any) -> None:
        record = self.workers.get(worker)
        now = time()
        if record is not None:
            record.left = now
            self.dirty_workers.add(worker)
        self.events.append((self.run, now, "worker-leave",
                            record.name if record else worker, stimulus_id))

    # --- helpers --------------------------------------------------------------------------

    def _task(self, key: Any) -> TaskState | None:
        return self.scheduler.tasks.get(key) if self.scheduler is not None else None

    def _owner(self, key: Any) -> ComputationRecord | None:
        """The computation a task belongs to: its group's, else the newest one."""
        ts = self._task(key)
        cid = self.group_owner.get(ts.group.name) if ts is not None else None
        record = self.computations.get(cid) if cid else None
        if record is None and self.computations:
            record = next(reversed(self.computations.values()))
        return record

    def _assigned(self, key: Any) -> None:
        ts = self._task(key)
        ws = ts.processing_on if ts is not None else None
        if ts is None or ws is None:
            return
        missing: list[tuple[Hashable, int]] = [
            (dts.key, dts.get_nbytes()) for dts in ts.dependencies
            if ws not in (dts.who_has or ())]
        self.assigned[key] = (ws.address, missing)

    def _finished(self, key: Any, finish: str, kwargs: Mapping[str, Any]) -> None:
        record = self._owner(key)
        ts = self._task(key)
        assigned = self.assigned.pop(key, None)
        if record is None:
            return
        now = time()
        stats = record.prefix(ts.prefix.name if ts is not None else str(key))
        compute = transfer = 0.0
        for ss in kwargs.get("startstops") or ():
            try:
                seconds = max(0.0, float(ss["stop"]) - float(ss["start"]))
            except (KeyError, TypeError, ValueError):
                continue
            if ss.get("action") == "compute":
                compute += seconds
            elif ss.get("action") == "transfer":
                transfer += seconds
        stats.compute_seconds += compute
        stats.max_seconds = max(stats.max_seconds, compute)
        stats.transfer_seconds += transfer
        worker = kwargs.get("worker")
        if assigned is not None and assigned[0] == worker:
            for dep, nbytes in assigned[1]:
                went = self.moved.setdefault(dep, set())
                if worker not in went:
                    went.add(worker)
                    stats.bytes_transferred += nbytes
        if finish == "memory":
            stats.tasks += 1
            stats.output_bytes += int(kwargs.get("nbytes") or 0)
        else:
            stats.erred += 1
            if "exception_text" in kwargs and record.errors_kept < MAX_ERRORS_PER_COMPUTATION:
                record.errors_kept += 1
                self.errors.append((
                    record.id, now, str(key), ts.prefix.name if ts is not None else str(key),
                    str(worker) if worker else None,
                    str(kwargs.get("exception_text") or "")[:2000],
                    str(kwargs.get("traceback_text") or "")[:10000]))
        record.end = now
        record.dirty = True

    def _collect(self) -> Batch:
        """Sample the scheduler and take the rows that changed (on the event loop)."""
        scheduler = self.scheduler
        assert scheduler is not None
        now = time()
        batch = Batch(last_seen=now, end=self.ended, address=scheduler.address)
        largest, total = self._memory()
        for record in self.computations.values():
            if record.state == "running":
                self._peaks(record, largest, total)
                self._settle(record)
        if now - self.last_sample >= self.sample_interval or self.ended is not None:
            self.last_sample = now
            processing = sum(len(ws.processing) for ws in scheduler.workers.values())
            waiting = sum(tp.states.get(state, 0) for tp in scheduler.task_prefixes.values()
                          for state in ("waiting", "queued", "no-worker"))
            self.samples.append((self.run, now, len(scheduler.workers), int(sum(
                ws.nthreads for ws in scheduler.workers.values())), processing, waiting, total))
        for record in self.computations.values():
            if record.dirty:
                record.dirty = False
                batch.computations.append(record.row(self.run))
                batch.prefixes += [(record.id, name, s.tasks, s.erred, s.compute_seconds,
                                    s.max_seconds, s.transfer_seconds, s.bytes_transferred,
                                    s.output_bytes) for name, s in record.prefixes.items()]
        batch.workers = [self.workers[a].row(self.run) for a in self.dirty_workers
                         if a in self.workers]
        self.dirty_workers.clear()
        batch.errors, self.errors = self.errors, []
        batch.events, self.events = self.events, []
        batch.samples, self.samples = self.samples, []
        return batch

    def _memory(self) -> tuple[int, int]:
        """The largest worker's memory and the cluster's total (process RSS from the last
        heartbeats); raises each worker's peak on the way."""
        largest = total = 0
        assert self.scheduler is not None
        for address, ws in self.scheduler.workers.items():
            rss = int(ws.memory.process)
            total += rss
            largest = max(largest, rss)
            worker = self.workers.get(address)
            if worker is not None and rss > worker.memory_peak:
                worker.memory_peak = rss
                self.dirty_workers.add(address)
        return largest, total

    @staticmethod
    def _peaks(record: ComputationRecord, largest: int, total: int) -> None:
        if largest > record.worker_memory_peak or total > record.cluster_memory_peak:
            record.worker_memory_peak = max(record.worker_memory_peak, largest)
            record.cluster_memory_peak = max(record.cluster_memory_peak, total)
            record.dirty = True

    @staticmethod
    def _settle(record: ComputationRecord, interrupted: bool = False) -> None:
        """A running computation with no task waiting or running any more is over (with
        `interrupted`, the scheduler is closing: over either way)."""
        states = record.source.states if record.source is not None else {}
        if any(states.get(s, 0) for s in ACTIVE_STATES) or record.source is None:
            if interrupted:
                record.state, record.dirty = "interrupted", True
            return
        record.state = "erred" if any(s.erred for s in record.prefixes.values()) \
            else "finished"
        record.end = record.end or record.start
        record.dirty = True

    def _requeue(self, batch: Batch) -> None:
        """A failed write: its rows go out with the next flush."""
        for cid, *_ in batch.computations:
            if cid in self.computations:
                self.computations[cid].dirty = True
        self.dirty_workers.update(row[1] for row in batch.workers)
        self.errors = (batch.errors + self.errors)[-MAX_PENDING_ROWS:]
        self.events = (batch.events + self.events)[-MAX_PENDING_ROWS:]
        self.samples = (batch.samples + self.samples)[-MAX_PENDING_ROWS:]

    def _prune(self) -> None:
        """Forget finished computations beyond KEEP_FINISHED, and their groups."""
        finished = [cid for cid, r in self.computations.items() if r.state != "running"]
        for cid in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.computations[cid]
        if len(self.group_owner) > 10 * KEEP_FINISHED and self.scheduler is not None:
            live = self.scheduler.task_groups
            self.group_owner = {g: c for g, c in self.group_owner.items()
                                if g in live or c in self.computations}


def history_path() -> str:
    """`history.sqlite` beside this file: the operator copies the preload into the
    cluster's staging directory, so that is where the history lands."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), FILE_NAME)


def dask_setup(scheduler: Scheduler) -> None:
    scheduler.add_plugin(HistoryPlugin(history_path()), name=PLUGIN_NAME)
