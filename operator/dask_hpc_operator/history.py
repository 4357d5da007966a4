"""What past clusters computed: find, read and keep the schedulers' `history.sqlite`.

The scheduler's preload (hpc_bridge.preloads.history, whose docstring has the schema)
writes the file in the cluster's staging directory while the cluster runs. Deleting the
cluster removes that directory, so teardown first copies the file to
`<staging>/history/<ns>/<name>-<uid8>.sqlite` (`archive`); `dask-hpc history` and
`dask-hpc report` read both places, the live one winning while it exists.

Beside it are kept what the operator and the other preload wrote in the staging directory:
`usage.json` (the batch system's accounting of every job: core-hours, GPU-hours, queue
waits; usage_ledger.py) as `<name>-<uid8>.usage.json`, and Dask's performance reports
(`reports/*.html`, spec.diagnostics.performanceReport) as `<name>-<uid8>.reports/`.

A job user may write the staging directory (policy stagingGroup: mode 2770), so `keep`
follows no link there and copies only regular files (staging_files.py). What is kept is
the operator's account's alone (files 0600, directories 0700): a history holds the users'
code lines, errors and performance reports.

Reading never writes: files are opened read-only, so a reader cannot disturb a scheduler
that is still writing, nor need write access to a colleague's staging directory. A run
(one scheduler process) that has no end and has not flushed for STALE_AFTER_S was killed:
its history stops at its last flush, and its unfinished computations are `interrupted`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, cast

from hpc_bridge.preloads.history import FILE_NAME as FILE_NAME  # re-exported
from hpc_bridge.preloads.performance import REPORTS_DIR

from .staging_files import open_regular, replace_file
from .usage import JobUsage, UsageSummary, rows_of, summarize

log = logging.getLogger(__name__)
T = TypeVar("T")

ARCHIVE_DIR = "history"  # under the site's staging directory
USAGE_FILE = "usage.json"  # in a cluster's staging directory (usage_ledger.py)
# A live scheduler flushes every second or so; one silent this long, with no end, is gone.
STALE_AFTER_S = 15.0
KEPT_MODE = 0o600  # archived files: the operator's account only (users' code and errors)
KEPT_DIR_MODE = 0o700


@dataclass(frozen=True)
class HistoryFile:
    """One cluster's history file: live in its staging directory, or archived."""

    namespace: str
    name: str
    uid8: str
    path: Path
    archived: bool

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}-{self.uid8}"

    @property
    def usage_path(self) -> Path:
        return (self.path.with_name(self.path.stem + ".usage.json") if self.archived
                else self.path.parent / USAGE_FILE)

    @property
    def reports_dir(self) -> Path:
        return (self.path.with_name(self.path.stem + ".reports") if self.archived
                else self.path.parent / REPORTS_DIR)


@dataclass
class Run:
    """One scheduler process."""

    id: int
    start: float
    end: float | None
    last_seen: float
    address: str | None
    host: str | None
    job_id: str | None
    pid: int | None
    state: str = "running"  # running | stopped | killed

    @property
    def until(self) -> float:
        return self.end if self.end is not None else self.last_seen


@dataclass
class PrefixStats:
    prefix: str
    tasks: int
    erred: int
    compute_seconds: float
    max_seconds: float
    transfer_seconds: float
    bytes_transferred: int
    output_bytes: int


@dataclass
class Computation:
    id: str
    run: int
    seq: int
    start: float
    end: float | None
    state: str  # running | finished | erred | interrupted
    tasks_submitted: int
    tasks_done: int
    tasks_erred: int
    compute_seconds: float
    transfer_seconds: float
    bytes_transferred: int
    output_bytes: int
    worker_memory_peak: int
    cluster_memory_peak: int
    code: str | None
    code_location: str | None
    prefixes: list[PrefixStats] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return max(0.0, (self.end or self.start) - self.start)

    @property
    def label(self) -> str:
        """The user's line of code when the client sent it, else the busiest prefixes."""
        if self.code:
            return self.code
        top = sorted(self.prefixes, key=lambda p: (-p.compute_seconds, p.prefix))[:3]
        return ", ".join(p.prefix for p in top) or "-"


@dataclass
class TaskError:
    computation: str | None
    time: float
    key: str
    prefix: str
    worker: str | None
    exception: str
    traceback: str


@dataclass
class Worker:
    run: int
    address: str
    name: str
    host: str | None
    nthreads: int
    memory_limit: int
    joined: float
    left: float | None
    memory_peak: int


@dataclass
class Event:
    run: int
    time: float
    kind: str
    subject: str | None
    detail: str | None


@dataclass
class Sample:
    run: int
    time: float
    workers: int
    threads: int
    processing: int
    waiting: int
    memory: int


@dataclass
class ClusterHistory:
    file: HistoryFile
    namespace: str
    name: str
    uid: str
    runs: list[Run]
    computations: list[Computation]
    errors: list[TaskError]
    workers: list[Worker]
    events: list[Event]
    samples: list[Sample]
    usage: list[JobUsage] = field(default_factory=list)  # the batch jobs' accounting
    usage_as_of: float | None = None
    reports: list[Path] = field(default_factory=list)  # Dask performance reports (HTML)

    @property
    def start(self) -> float | None:
        return min((r.start for r in self.runs), default=None)

    @property
    def end(self) -> float | None:
        """None while a scheduler runs; else when the last one stopped (or was last seen)."""
        if not self.runs or any(r.state == "running" for r in self.runs):
            return None
        return max(r.until for r in self.runs)

    @property
    def state(self) -> str:
        return self.runs[-1].state if self.runs else "empty"

    @property
    def tasks(self) -> int:
        return sum(c.tasks_done for c in self.computations)

    @property
    def erred(self) -> int:
        return sum(c.tasks_erred for c in self.computations)

    def prefix_totals(self) -> list[PrefixStats]:
        """Every computation's prefixes added up, slowest (most compute time) first."""
        totals: dict[str, PrefixStats] = {}
        for c in self.computations:
            for p in c.prefixes:
                t = totals.setdefault(p.prefix, PrefixStats(p.prefix, 0, 0, 0.0, 0.0, 0.0, 0, 0))
                t.tasks += p.tasks
                t.erred += p.erred
                t.compute_seconds += p.compute_seconds
                t.max_seconds = max(t.max_seconds, p.max_seconds)
                t.transfer_seconds += p.transfer_seconds
                t.bytes_transferred += p.bytes_transferred
                t.output_bytes += p.output_bytes
        return sorted(totals.values(), key=lambda p: (-p.compute_seconds, p.prefix))

    def usage_summary(self) -> UsageSummary:
        return summarize(self.usage)

    def report_of(self, computation: str) -> Path | None:
        """The performance report of one computation (named by its id), if there is one."""
        return next((p for p in self.reports if p.stem == computation), None)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["file"] = {"path": str(self.file.path), "archived": self.file.archived}
        out.update(start=self.start, end=self.end, state=self.state, tasks=self.tasks,
                   erred=self.erred, reports=[str(p) for p in self.reports],
                   usage_totals=usage_json(self.usage_summary()))
        return out


def usage_json(summary: UsageSummary) -> dict[str, Any]:
    def one(t: Any) -> dict[str, Any]:
        return {"jobs": t.jobs, "core_hours": t.core_hours, "gpu_hours": t.gpu_hours,
                "run_seconds": t.run_seconds, "queue_wait_seconds": t.queue_wait_seconds,
                "mean_queue_wait_seconds": t.mean_queue_wait_seconds}
    return {**one(summary.total), "by_group": {g: one(t) for g, t in summary.by_group.items()},
            "source": summary.source, "gpu_source": summary.gpu_source,
            "final": summary.final}


# --- finding and keeping files -----------------------------------------------------------

def archive_path(staging_dir: str | Path, namespace: str, name: str, uid: str) -> Path:
    """Where a deleted cluster's history is kept (the staging directory's naming)."""
    return Path(staging_dir) / ARCHIVE_DIR / namespace / f"{name}-{uid[:8]}.sqlite"


def _split_leaf(leaf: str) -> tuple[str, str]:
    name, _, uid8 = leaf.rpartition("-")
    return (name, uid8) if name else (leaf, "")


def find(staging_dir: str | Path, namespace: str | None = None) -> list[HistoryFile]:
    """Every cluster's history under the site's staging directory: live ones
    (`clusters/<ns>/<name>-<uid8>/history.sqlite`) and deleted ones (`history/<ns>/
    <name>-<uid8>.sqlite`); a cluster found in both places is listed once, live.

    A cluster is found by its usage file too (`usage.json`, `<name>-<uid8>.usage.json`):
    one whose scheduler never started has no history.sqlite, and still used core-hours.
    Its HistoryFile names the history that is not there (`load` reads it as empty)."""
    root = Path(staging_dir)
    ns = namespace or "*"
    found: dict[str, HistoryFile] = {}
    usage_suffix = ".usage.json"
    kept = [(p, p.name.removesuffix(usage_suffix) + ".sqlite")
            for p in root.glob(f"{ARCHIVE_DIR}/{ns}/*{usage_suffix}")]
    for path in sorted({p.with_name(n) for p, n in kept}
                       | set(root.glob(f"{ARCHIVE_DIR}/{ns}/*.sqlite"))):
        name, uid8 = _split_leaf(path.stem)
        f = HistoryFile(path.parent.name, name, uid8, path, archived=True)
        found[f.key] = f
    live = {p.with_name(FILE_NAME) for p in root.glob(f"clusters/{ns}/*/{USAGE_FILE}")}
    for path in sorted(live | set(root.glob(f"clusters/{ns}/*/{FILE_NAME}"))):
        name, uid8 = _split_leaf(path.parent.name)
        f = HistoryFile(path.parent.parent.name, name, uid8, path, archived=False)
        found[f.key] = f
    return list(found.values())


def _copy_regular(source: Path, target: Path, dir_fd: int | None = None) -> bool:
    """`replace_file(target)` with the content of `source` if it is a regular file
    (`open_regular`), mode 0600; whether it was."""
    f = open_regular(source, dir_fd)
    if f is None:
        return False
    with f:
        _kept_dir(target.parent)
        replace_file(target, f, KEPT_MODE)
    return True


def archive(source: Path, target: Path) -> bool:
    """Copy a history out of a staging directory that is about to be removed.

    The file and its WAL (a killed scheduler leaves its last transactions there) are
    copied, as regular files only, into a private temporary directory, where sqlite opens
    them: sqlite follows a link in place of the database (a job user could point it at a
    database of the operator's), and a link in place of its -shm file would stop it from
    opening the history at all. sqlite's backup API reads through the WAL, and the
    copy is switched to a rollback journal so it is one self-contained file, readable on
    any host, kept with mode 0600 (`replace_file`). Never raises: losing the history must
    not stop a deletion. Returns whether a copy was made."""
    try:
        with tempfile.TemporaryDirectory(prefix="dask-hpc-history-") as private:
            copy, out = Path(private) / FILE_NAME, Path(private) / "kept.sqlite"
            if not _copy_regular(source, copy):
                return False
            _copy_regular(source.with_name(source.name + "-wal"),
                          copy.with_name(copy.name + "-wal"))
            with contextlib.closing(sqlite3.connect(copy, timeout=10)) as src, \
                    contextlib.closing(sqlite3.connect(out)) as dst:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")
            return _copy_regular(out, target)
    except (sqlite3.Error, OSError) as exc:
        log.warning("could not keep the history %s in %s: %s", source, target, exc)
        return False


def _kept_dir(path: Path) -> None:
    """The archive directory of a namespace, created 0700 (an existing one is left as the
    administrator made it)."""
    path.mkdir(mode=KEPT_DIR_MODE, parents=True, exist_ok=True)


def keep(staging: Path, target: Path) -> None:
    """Everything of a cluster's history out of its staging directory before it is removed:
    the history (`archive`), the usage file and the performance reports (`*.html`), beside
    `target` (the `archive_path`), regular files only, mode 0600. Never raises, like
    `archive`."""
    archive(staging / FILE_NAME, target)
    kept = HistoryFile("", "", "", target, archived=True)
    try:
        _copy_regular(staging / USAGE_FILE, kept.usage_path)
        try:  # the directory itself, not where a link in its place points
            reports = os.open(staging / REPORTS_DIR,
                              os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            for name in sorted(os.listdir(reports)):
                if name.endswith(".html"):
                    _copy_regular(Path(name), kept.reports_dir / name, dir_fd=reports)
        finally:
            os.close(reports)
    except OSError as exc:
        log.warning("could not keep the usage and reports of %s in %s: %s", staging,
                    target.parent, exc)


def write_json(path: Path, doc: Any) -> None:
    """Replace `path` atomically and safely (`replace_file`)."""
    replace_file(path, json.dumps(doc, indent=1, default=str).encode())


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is missing or not one."""
    f = open_regular(path)  # a link a job user planted is not read
    if f is None:
        return None
    try:
        with f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# --- reading ---------------------------------------------------------------------------

def _connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=10)


def _rows(conn: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # a table a scheduler never got to create
        return []


def _records(conn: sqlite3.Connection, cls: type[T], table: str, order: str,
             skip: tuple[str, ...] = ()) -> list[T]:
    """Rows as `cls`, selecting its fields by name (columns added later are ignored)."""
    names = [f.name for f in fields(cast(Any, cls)) if f.name not in skip]
    columns = ", ".join(f'"{n}"' for n in names)
    return [cls(*row) for row in _rows(conn, f"SELECT {columns} FROM {table} ORDER BY {order}")]


def load(file: HistoryFile, now: float | None = None) -> ClusterHistory:
    """Read one history (raises sqlite3.Error for a file that is not one). A cluster
    found by its usage file alone (its scheduler never started) has no runs and no
    computations, only its usage."""
    now = time.time() if now is None else now
    meta: dict[Any, Any] = {}
    runs: list[Run] = []
    computations: list[Computation] = []
    prefixes: dict[str, list[PrefixStats]] = {}
    errors: list[TaskError] = []
    workers: list[Worker] = []
    events: list[Event] = []
    samples: list[Sample] = []
    if file.path.exists():
        with contextlib.closing(_connect_ro(file.path)) as conn:
            meta = dict(_rows(conn, "SELECT key, value FROM meta"))
            runs = _records(conn, Run, "runs", "id", skip=("state",))
            computations = _records(conn, Computation, "computations", "seq",
                                    skip=("prefixes",))
            for computation, *rest in _rows(conn, "SELECT computation, " + ", ".join(
                    f.name for f in fields(PrefixStats)) + " FROM prefixes"):
                prefixes.setdefault(computation, []).append(PrefixStats(*rest))
            errors = _records(conn, TaskError, "errors", "id")
            workers = _records(conn, Worker, "workers", "joined")
            events = _records(conn, Event, "events", "id")
            samples = _records(conn, Sample, "samples", "time")
    for i, run in enumerate(runs):
        # A later run means the earlier scheduler is gone, whatever its last flush says.
        newer = i < len(runs) - 1
        if run.end is not None:
            run.state = "stopped"
        elif newer or file.archived or now - run.last_seen > STALE_AFTER_S:
            run.state = "killed"
    live = {r.id for r in runs if r.state == "running"}
    until = {r.id: r.until for r in runs}
    for c in computations:
        c.prefixes = sorted(prefixes.get(c.id, []), key=lambda p: (-p.compute_seconds,
                                                                   p.prefix))
        if c.state == "running" and c.run not in live:
            c.state = "interrupted"
            c.end = c.end or until.get(c.run)
    for w in workers:
        if w.left is None and w.run not in live:
            w.left = until.get(w.run)
    usage = read_json(file.usage_path) or {}
    reports = sorted(file.reports_dir.glob("*.html")) if file.reports_dir.is_dir() else []
    meta = {**{k: usage[k] for k in ("namespace", "name", "uid") if isinstance(
        usage.get(k), str)}, **meta}  # no history.sqlite: the usage file says who it was
    return ClusterHistory(file, meta.get("namespace", file.namespace),
                          meta.get("name", file.name), meta.get("uid", file.uid8), runs,
                          computations, errors, workers, events, samples, rows_of(usage),
                          usage.get("asOf"), reports)


def select(files: Iterable[HistoryFile], cluster: str) -> tuple[HistoryFile, list[HistoryFile]]:
    """The history of `cluster` (a name, or `name-uid8`): the newest when several clusters
    had that name; also returns the others. LookupError when there is none."""
    candidates = [f for f in files if cluster in (f.name, f"{f.name}-{f.uid8}")]
    if not candidates:
        raise LookupError(cluster)

    def started(f: HistoryFile) -> float:
        try:
            return load(f).start or 0.0
        except sqlite3.Error:
            return 0.0
    ordered = sorted(candidates, key=started, reverse=True)
    return ordered[0], ordered[1:]


# --- text output -------------------------------------------------------------------------

def when(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def size(n: int | None) -> str:
    if not n:
        return "0 B"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # not reached


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def cluster_state(h: ClusterHistory) -> str:
    state = h.state
    return f"{state}, deleted" if h.file.archived and state != "running" else state


def hours(h: float) -> str:
    return f"{h:.2f}" if h >= 0.995 or h == 0 else f"{h:.3f}"


def format_clusters(histories: list[ClusterHistory]) -> str:
    rows = []
    for h in histories:
        used = h.usage_summary().total
        rows.append([h.namespace, h.name, h.file.uid8, cluster_state(h), when(h.start),
                     when(h.end), seconds(((h.end or time.time()) - h.start) if h.start
                                          else None),
                     str(len(h.computations)), str(h.tasks), str(h.erred),
                     hours(used.core_hours) if h.usage else "-",
                     hours(used.gpu_hours) if h.usage else "-"])
    return table(["NAMESPACE", "NAME", "UID", "STATE", "START", "END", "DURATION",
                  "COMPUTATIONS", "TASKS", "ERRED", "CORE-H", "GPU-H"], rows)


def format_namespaces(histories: list[ClusterHistory]) -> str:
    """One line per namespace: its clusters' batch jobs added up (what a group or project
    used, for a report to whoever pays)."""
    by_ns = summarize((u for h in histories for u in h.usage), lambda u: u.namespace)
    clusters: dict[str, int] = {}
    for h in histories:
        clusters[h.namespace] = clusters.get(h.namespace, 0) + 1
    lines = []
    for ns, t in by_ns.by_group.items():
        lines.append(f"namespace {ns}: {clusters.get(ns, 0)} clusters, {t.jobs} batch jobs, "
                     f"{hours(t.core_hours)} core-hours, {hours(t.gpu_hours)} GPU-hours, "
                     f"queue wait {seconds(t.queue_wait_seconds)} in all (mean "
                     f"{seconds(t.mean_queue_wait_seconds)})")
    return "\n".join(lines)


def format_usage(h: ClusterHistory) -> str:
    """The batch jobs of one cluster: what each was given, waited and ran, per group."""
    if not h.usage:
        return "no usage recorded (the cluster predates usage accounting, or no job ran)"
    summary = h.usage_summary()
    t = summary.total
    provisional = "" if summary.final else (
        "; provisional: some jobs had no final accounting record when last asked")
    head = (f"usage: {t.jobs} batch jobs, {hours(t.core_hours)} core-hours, "
            f"{hours(t.gpu_hours)} GPU-hours, run {seconds(t.run_seconds)}, queue wait "
            f"{seconds(t.queue_wait_seconds)} in all (mean "
            f"{seconds(t.mean_queue_wait_seconds)}); source {summary.source}, GPUs "
            f"{summary.gpu_source}; as of {when(h.usage_as_of)}{provisional}")
    groups = table(["GROUP", "JOBS", "CORE-H", "GPU-H", "RUN", "QUEUE WAIT", "MEAN WAIT"],
                   [[g, str(x.jobs), hours(x.core_hours), hours(x.gpu_hours),
                     seconds(x.run_seconds), seconds(x.queue_wait_seconds),
                     seconds(x.mean_queue_wait_seconds)]
                    for g, x in summary.by_group.items()])
    jobs = table(["JOB", "GROUP", "STATE", "CORES", "GPUS", "SUBMITTED", "QUEUE WAIT", "RUN",
                  "CORE-H", "GPU-H", "SOURCE"],
                 [[u.job_id, u.group, u.state, str(u.cores),
                   str(u.gpus) + ("" if u.gpu_source == u.source or not u.gpus
                                  else f" ({u.gpu_source})"),
                   when(u.submitted_at), seconds(u.queue_wait_seconds),
                   seconds(u.run_seconds), hours(u.core_hours), hours(u.gpu_hours),
                   u.source + ("" if u.final else ", provisional")]
                  for u in sorted(h.usage, key=lambda u: (u.submitted_at or 0.0, u.job_id))])
    return f"{head}\n{groups}\n\n{jobs}"


def format_computations(h: ClusterHistory) -> str:
    head = (f"DaskCluster {h.namespace}/{h.name} (uid {h.uid}): {cluster_state(h)}, "
            f"{when(h.start)} - {when(h.end)}; {len(h.workers)} workers; "
            + (f"history: {h.file.path}" if h.runs or h.file.path.exists()
               else "no history: the scheduler never started"))
    if not h.computations:
        return head + "\nno computation recorded"
    rows = [[str(c.seq), when(c.start), seconds(c.duration), c.state,
             f"{c.tasks_done}/{c.tasks_submitted}", str(c.tasks_erred),
             seconds(c.compute_seconds), size(c.bytes_transferred),
             size(c.worker_memory_peak), c.label[:60]] for c in h.computations]
    out = head + "\n" + table(["#", "START", "DURATION", "STATE", "TASKS", "ERRED",
                               "TASK TIME", "TRANSFERRED", "WORKER MEM", "WHAT"], rows)
    if h.errors:
        first = h.errors[0]
        out += (f"\n{len(h.errors)} error(s); first: {first.key} on {first.worker}: "
                f"{first.exception}")
    if h.reports:
        out += f"\nDask performance reports: {h.file.reports_dir} ({len(h.reports)})"
    return out


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
