"""Files in a staging directory that a job user may write too (policy stagingGroup, mode
2770): the operator never writes through, copies or reads a symbolic link (or a FIFO) the
jobs planted there, and what it keeps of a history is its own account's alone (0600).

The "victim" files stand for the operator's own files (its kubeconfig, a TLS key): each
test plants links to them where the operator writes or copies, and checks they are intact
and did not end up anywhere a job user could read them."""

from __future__ import annotations

import copy
import os
import sqlite3
import stat
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dask_hpc_operator import history, staging_files
from dask_hpc_operator.embedded import EmbeddedStore
from dask_hpc_operator.job_planning import JobModel
from dask_hpc_operator.job_reconcile import JobReconciler
from dask_hpc_operator.reconcile import SCHEDULER_PRELOADS, ClusterReconciler, Runtime
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import validate
from hpc_bridge.model import JobAccounting, JobRequest, ObservedJob
from hpc_bridge.preloads.history import Batch, HistoryWriter
from hpc_bridge.scripts import LISTENERS_PRELOAD_NAME

SECRET = "operator's secret\n"


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text(SECRET)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- writing ----------------------------------------------------------------------------

def test_write_json_replaces_a_planted_link_and_ignores_the_old_temporary_name(
        tmp_path: Path) -> None:
    target = victim(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    # The name the temporary file used to have (predictable: the operator's pid) ...
    (staging / f".usage.json.{os.getpid()}.tmp").symlink_to(target)
    # ... and the file itself.
    (staging / history.USAGE_FILE).symlink_to(target)
    history.write_json(staging / history.USAGE_FILE, {"jobs": 1})
    assert target.read_text() == SECRET
    assert not (staging / history.USAGE_FILE).is_symlink()
    assert history.read_json(staging / history.USAGE_FILE) == {"jobs": 1}
    # No temporary file left behind but the planted one.
    assert sorted(p.name for p in staging.iterdir()) == [
        f".usage.json.{os.getpid()}.tmp", history.USAGE_FILE]


def test_replace_file_sets_the_mode_it_is_given(tmp_path: Path) -> None:
    path = tmp_path / "f"
    staging_files.replace_file(path, b"x", 0o600)
    assert (path.read_bytes(), mode(path)) == (b"x", 0o600)
    staging_files.replace_file(path, b"y")
    assert (path.read_bytes(), mode(path)) == (b"y", 0o644)


def test_read_json_reads_no_link(tmp_path: Path) -> None:
    target = tmp_path / "operator.json"
    target.write_text('{"token": "x"}')
    (tmp_path / "usage.json").symlink_to(target)
    assert history.read_json(tmp_path / "usage.json") is None
    assert history.read_json(target) == {"token": "x"}


class Accepting:
    """An in-memory batch system that accepts every submission (the tests are about the
    files written before it, not about a batch system)."""

    kind = "slurm"
    supports_arrays = False

    def __init__(self) -> None:
        self.scripts: list[str] = []

    def task_job_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        return [], list(indices)

    async def submit(self, request: JobRequest) -> str:
        self.scripts.append(request.script)
        return str(100 + len(self.scripts))

    async def poll(self) -> list[ObservedJob]:
        return []

    async def cancel(self, job_ids: Sequence[str]) -> None:
        pass

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        return {}


def runtime(tmp_path: Path) -> Runtime:
    site = SiteConfig(backend="slurm", staging_dir=str(tmp_path / "staging"),
                      python=sys.executable, min_poll_interval=0.01, poll_interval=0.01)
    return Runtime(site, backends={"slurm": Accepting()})


CLUSTER: dict[str, Any] = {
    "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
    "metadata": {"name": "c1", "namespace": "team", "uid": "1234abcd-5678", "generation": 1},
    "spec": {"worker": {"replicas": 1},
             "scheduler": {"protocol": "tcp", "extraProtocols": ["ws"]},
             "diagnostics": {"performanceReport": True}}}


async def test_scheduler_preloads_replace_planted_links(tmp_path: Path) -> None:
    target = victim(tmp_path)
    rt = runtime(tmp_path)
    staging = rt.staging_dir("team", "c1", "1234abcd-5678")
    staging.mkdir(parents=True)
    names = [*SCHEDULER_PRELOADS, LISTENERS_PRELOAD_NAME]
    for name in names:
        (staging / name).symlink_to(target)
    status = await ClusterReconciler(rt).reconcile(copy.deepcopy(CLUSTER), {})
    assert status["phase"] != "Failed", status
    assert target.read_text() == SECRET
    for name in names:
        assert not (staging / name).is_symlink()
        assert mode(staging / name) == 0o644  # the jobs' user reads it
    for name in SCHEDULER_PRELOADS:
        assert (staging / name).read_text() == SCHEDULER_PRELOADS[name]


async def test_a_daskjob_script_replaces_a_planted_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    rt = runtime(tmp_path)
    manifest: dict[str, Any] = {
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskJob",
        "metadata": {"name": "j1", "namespace": "team", "uid": "33333333-1", "generation": 1},
        "spec": {"mode": "allocation", "job": {"script": "print('hello')"},
                 "cluster": {"worker": {"replicas": 1}}}}
    script = JobReconciler(rt).paths(JobModel.from_manifest(validate(manifest), rt.site)).script
    script.parent.mkdir(parents=True)
    script.symlink_to(target)
    status = await JobReconciler(rt).reconcile(manifest, {}, EmbeddedStore([]))
    assert status["phase"] == "Pending", status
    assert target.read_text() == SECRET
    assert not script.is_symlink() and script.read_text() == "print('hello')"


# --- keeping a history ------------------------------------------------------------------

def killed_history(staging: Path) -> Path:
    """A history as a killed scheduler leaves it: the database and its WAL, which holds
    the last batch, and no -shm file."""
    scheduler = staging.parent / "scheduler-side"
    scheduler.mkdir()
    writer = HistoryWriter(str(scheduler / history.FILE_NAME))
    writer.open({"namespace": "team", "name": "c1", "uid": "1234abcd-5678"}, 1000.0,
                "tcp://10.0.0.1:8786", "4242")
    writer.write(Batch(last_seen=1010.0, end=None, computations=[
        ("c1-1", 1, 1, 1001.0, 1009.0, "finished", 3, 3, 0, 1.0, 0.0, 0, 0, 0, 0, None,
         None)]))
    for suffix in ("", "-wal"):  # copied while it runs: what a SIGKILL leaves
        name = history.FILE_NAME + suffix
        (staging / name).write_bytes((scheduler / name).read_bytes())
    assert (staging / (history.FILE_NAME + "-wal")).stat().st_size > 0
    writer.close()
    return staging / history.FILE_NAME


def test_keep_copies_regular_files_only_and_keeps_them_private(tmp_path: Path) -> None:
    target = victim(tmp_path)
    target.chmod(0o644)
    staging = tmp_path / "staging" / "c1"
    (staging / "reports").mkdir(parents=True)
    killed_history(staging)
    (staging / history.USAGE_FILE).symlink_to(target)
    (staging / "reports" / "c1-1.html").write_text("<html>report</html>")
    (staging / "reports" / "stolen.html").symlink_to(target)
    kept = tmp_path / "archive" / "history" / "team" / "c1-1234abcd.sqlite"
    history.keep(staging, kept)
    assert target.read_text() == SECRET
    files = {p.relative_to(kept.parent).as_posix(): p for p in kept.parent.rglob("*")}
    assert sorted(files) == ["c1-1234abcd.reports", "c1-1234abcd.reports/c1-1.html",
                             "c1-1234abcd.sqlite"]
    assert not any(p.is_symlink() for p in files.values())
    assert SECRET not in "".join(p.read_text(errors="replace") for p in files.values()
                                 if p.is_file())
    assert {mode(p) for p in files.values() if p.is_file()} == {0o600}
    assert mode(kept.parent) == mode(files["c1-1234abcd.reports"]) == 0o700
    # The operator's account still reads it (`dask-hpc history`).
    (found,) = history.find(tmp_path / "archive")
    h = history.load(found)
    assert [c.id for c in h.computations] == ["c1-1"] and len(h.reports) == 1


def test_a_linked_history_is_not_kept_nor_is_a_linked_reports_directory(
        tmp_path: Path) -> None:
    other = tmp_path / "operator.sqlite"  # a database of the operator's, not the job's
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE secrets (value TEXT)")
        conn.execute("INSERT INTO secrets VALUES ('x')")
    conn.close()
    secret_dir = tmp_path / "secret-dir"
    secret_dir.mkdir()
    (secret_dir / "key.html").write_text(SECRET)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / history.FILE_NAME).symlink_to(other)
    (staging / "reports").symlink_to(secret_dir)
    kept = tmp_path / "kept" / "c1-1234abcd.sqlite"
    history.keep(staging, kept)
    assert not kept.exists() and not kept.with_name("c1-1234abcd.reports").exists()


def test_a_link_beside_the_history_neither_is_written_through_nor_loses_it(
        tmp_path: Path) -> None:
    """sqlite opens a WAL database's -shm file read-write (and refuses to open the
    database when it is a link): the copy it opens is private, with the WAL, whose last
    batch is kept."""
    staging = tmp_path / "staging"
    staging.mkdir()
    source = killed_history(staging)
    (staging / (history.FILE_NAME + "-shm")).symlink_to(victim(tmp_path))
    kept = tmp_path / "kept" / "c1-1234abcd.sqlite"
    assert history.archive(source, kept)
    assert (tmp_path / "victim").read_text() == SECRET
    with sqlite3.connect(kept) as conn:
        assert conn.execute("SELECT id FROM computations").fetchall() == [("c1-1",)]
    conn.close()


def test_a_fifo_in_place_of_a_file_does_not_hang_the_deletion(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "reports").mkdir(parents=True)
    os.mkfifo(staging / history.FILE_NAME)
    os.mkfifo(staging / history.USAGE_FILE)
    os.mkfifo(staging / "reports" / "x.html")
    done = threading.Event()

    def run() -> None:
        history.keep(staging, tmp_path / "kept" / "c1-1234abcd.sqlite")
        done.set()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert done.wait(10), "keep() blocked on a FIFO"
    assert not (tmp_path / "kept" / "c1-1234abcd.sqlite").exists()


def test_error_tail_never_follows_a_planted_link(tmp_path: Path) -> None:
    from dask_hpc_operator.job_logs import read_tail

    secret = tmp_path / "secret"
    secret.write_text("token: s3cr3t\n")
    log = tmp_path / "dask.ns.c.default.0-7.err"
    log.symlink_to(secret)
    assert read_tail(log) == ""
    log.unlink()
    log.write_text("Traceback ...\nMemoryError\n")
    assert read_tail(log).endswith("MemoryError\n")
