"""hpc_bridge.preloads.history inside real Dask schedulers: what it records, and what is
left when the scheduler is killed.

The preload is loaded the way the scheduler job loads it: a copy of the file in a
staging-like directory `<ns>/<name>-<uid8>/`, passed as `--preload <path>`; the history
is read back with the operator's reader (dask_hpc_operator.history).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import dask
import pytest
from distributed import Client, Scheduler, Worker

from dask_hpc_operator import history
from hpc_bridge.preloads import history as preload

pytestmark = pytest.mark.timeout(90)


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def fails(x: int) -> int:
    raise ValueError(f"<b>bad</b> input {x}")


def staged_preload(root: Path, namespace: str = "ns1", name: str = "c1",
                   uid8: str = "abcdef12") -> Path:
    """The preload copied into a cluster's staging directory, as the operator does."""
    directory = root / "clusters" / namespace / f"{name}-{uid8}"
    directory.mkdir(parents=True)
    target = directory / "dask_hpc_history.py"
    shutil.copy(preload.__file__, target)
    return target


@asynccontextmanager
async def cluster(preload_path: Path, *names: str) -> AsyncIterator[Client]:
    async with AsyncExitStack() as stack:
        s = await stack.enter_async_context(
            Scheduler(dashboard_address=":0", preload=[str(preload_path)]))
        for name in names:
            await stack.enter_async_context(Worker(s.address, name=name, nthreads=2))
        yield await stack.enter_async_context(Client(s.address, asynchronous=True))


async def until(check: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


def only(root: Path) -> history.ClusterHistory:
    files = history.find(root)
    assert len(files) == 1, files
    return history.load(files[0])


async def test_records_computations_workers_and_errors(tmp_path: Path) -> None:
    path = staged_preload(tmp_path)
    # The user's line of code travels with the graph only when the client is asked to.
    with dask.config.set({"distributed.diagnostics.computations.nframes": 1}):
        async with cluster(path, "w0", "w1") as client:
            squares = await client.gather(client.map(square, range(20)))
            assert sum(squares) == 2470
            # A chain across the two workers, one graph: its input must move.
            with dask.annotate(workers=["w0"]):
                big = dask.delayed(bytes)(2_000_000)
            with dask.annotate(workers=["w1"]):
                length = dask.delayed(len)(big)
            assert await client.compute(length) == 2_000_000
            # Three tasks that fail and one that depends on a failure, one graph.
            failing = [dask.delayed(fails)(i) for i in range(3)]
            with pytest.raises(ValueError, match="bad"):
                await client.gather(client.compute([*failing[1:], dask.delayed(add)(
                    failing[0], 1)]))
            await until(lambda: (path.parent / "history.sqlite").exists(), "the history file")
            # While the scheduler runs, flushes make it readable within ~a second.
            await until(lambda: len(only(tmp_path).computations) == 3
                        and only(tmp_path).computations[-1].state == "erred",
                        "three computations flushed")
            live = only(tmp_path)
            assert live.state == "running" and live.end is None
            assert not live.file.archived

    h = only(tmp_path)
    assert (h.namespace, h.name, h.uid) == ("ns1", "c1", "abcdef12")
    assert [r.state for r in h.runs] == ["stopped"]
    first, second, third = h.computations
    assert [c.seq for c in h.computations] == [1, 2, 3]
    assert (first.state, first.tasks_submitted, first.tasks_done, first.tasks_erred) == (
        "finished", 20, 20, 0)
    assert [p.prefix for p in first.prefixes] == ["square"]
    assert first.code and "client.map(square" in first.code
    assert first.code_location
    assert Path(first.code_location.rsplit(":", 1)[0]).name == Path(__file__).name
    assert first.start <= first.end <= second.start  # type: ignore[operator]

    by_prefix = {p.prefix: p for p in second.prefixes}
    assert set(by_prefix) == {"bytes", "len"}
    assert by_prefix["len"].bytes_transferred >= 2_000_000
    assert by_prefix["len"].transfer_seconds > 0
    assert by_prefix["bytes"].output_bytes >= 2_000_000
    assert second.bytes_transferred == by_prefix["len"].bytes_transferred
    assert second.worker_memory_peak > 0 and second.cluster_memory_peak >= \
        second.worker_memory_peak

    assert third.state == "erred"
    assert (third.tasks_erred, third.tasks_done) == (4, 0)  # 3 failed, 1 dependent
    assert len(h.errors) == 3  # only the tasks that failed themselves
    assert {e.prefix for e in h.errors} == {"fails"}
    assert all("<b>bad</b> input" in e.exception and e.traceback for e in h.errors)
    assert all(e.computation == third.id and e.worker for e in h.errors)

    assert sorted(w.name for w in h.workers) == ["w0", "w1"]
    assert all(w.left is not None and w.left >= w.joined and w.nthreads == 2
               for w in h.workers)
    assert all(w.memory_peak > 0 for w in h.workers)
    kinds = [e.kind for e in h.events]
    assert kinds[0] == "scheduler-start" and kinds[-1] == "scheduler-stop"
    assert kinds.count("worker-join") == 2 and kinds.count("worker-leave") == 2
    assert h.samples and h.samples[-1].workers == 0


async def test_graphs_sent_while_busy_join_the_running_computation(tmp_path: Path) -> None:
    """distributed's own notion: a computation ends when the scheduler is idle."""
    path = staged_preload(tmp_path)
    async with cluster(path, "w0") as client:
        first = client.map(time.sleep, [0.3] * 4, key=[f"nap-{i}" for i in range(4)])
        second = client.map(square, range(5))
        await client.gather(first + second)
        await until(lambda: only(tmp_path).computations
                    and only(tmp_path).computations[0].state == "finished", "a flush")
    h = only(tmp_path)
    assert len(h.computations) == 1
    (c,) = h.computations
    assert c.tasks_done == c.tasks_submitted == 9
    assert {p.prefix: p.tasks for p in c.prefixes} == {"nap": 4, "square": 5}
    assert c.prefixes[0].prefix == "nap"  # the slowest prefix first
    assert c.prefixes[0].compute_seconds >= 4 * 0.3 * 0.9
    assert c.duration >= 0.3


async def test_tasks_a_later_graph_depends_on_are_submitted_once(tmp_path: Path) -> None:
    """A graph names the tasks it depends on: those still running (sent by an earlier graph
    of the same computation) are not counted as submitted again."""
    path = staged_preload(tmp_path)
    async with cluster(path, "w0") as client:
        naps = client.map(time.sleep, [0.2] * 4, key=[f"nap-{i}" for i in range(4)])
        after = client.map(lambda _: 1, naps, key=[f"after-{i}" for i in range(4)])
        total = client.submit(sum, after, key="total-0")
        assert await total == 4
        await until(lambda: only(tmp_path).computations
                    and only(tmp_path).computations[0].state == "finished", "a flush")
    (c,) = only(tmp_path).computations
    assert c.tasks_done == c.tasks_submitted == 9


async def test_a_second_scheduler_appends_a_run(tmp_path: Path) -> None:
    """A replaced scheduler writes to the same file: runs and computations add up."""
    path = staged_preload(tmp_path)
    for _ in range(2):
        async with cluster(path, "w0") as client:
            assert await client.submit(square, 3) == 9
    h = only(tmp_path)
    assert [r.state for r in h.runs] == ["stopped", "stopped"]
    assert [(c.run, c.seq) for c in h.computations] == [(1, 1), (2, 2)]
    # Each ended between two flushes, just before its scheduler closed: still finished.
    assert [c.state for c in h.computations] == ["finished", "finished"]
    assert all(c.worker_memory_peak > 0 for c in h.computations)


async def test_an_unwritable_history_does_not_stop_the_scheduler(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    plugin = preload.HistoryPlugin(str(blocked / "history.sqlite"), {"name": "x"})
    async with Scheduler(dashboard_address=":0") as s:
        s.add_plugin(plugin)
        await plugin.start(s)
        async with Worker(s.address, nthreads=1), Client(s.address, asynchronous=True) as c:
            assert await c.submit(square, 4) == 16
    assert plugin.executor is None  # gave up recording, said so once, scheduler unharmed


async def test_a_failed_write_is_retried_at_the_next_flush(tmp_path: Path) -> None:
    """A write that fails (a full disk, a filesystem hiccup) loses nothing: its rows go
    out with the next flush."""
    path = tmp_path / "clusters/ns1/c1-abcdef12/history.sqlite"
    path.parent.mkdir(parents=True)
    plugin = preload.HistoryPlugin(str(path), flush_interval=3600)  # flushed by hand here
    real_write = plugin.writer.write
    failures = []

    def flaky(batch: preload.Batch) -> None:
        if not failures:
            failures.append(batch)
            raise sqlite3.OperationalError("disk I/O error")
        real_write(batch)
    plugin.writer.write = flaky  # type: ignore[method-assign]
    async with Scheduler(dashboard_address=":0") as s:
        s.add_plugin(plugin)
        await plugin.start(s)
        async with Worker(s.address, nthreads=1, name="w0"), \
                Client(s.address, asynchronous=True) as c:
            assert await c.submit(square, 5) == 25
            await plugin.flush()  # fails
            assert failures and failures[0].computations and failures[0].events
            await plugin.flush()  # carries the first one's rows
            h = only(tmp_path)
            assert [c.tasks_done for c in h.computations] == [1]
            assert [e.kind for e in h.events] == ["scheduler-start", "worker-join"]
    assert plugin.failed_writes == 1


def test_identity_from_the_job_or_the_staging_path() -> None:
    env = {"DASK_HPC_IDENTITY": "dask-hpc:v1:team:etl:1234abcd-0000:scheduler:scheduler:0"}
    assert preload.identity_from(env, "/x/clusters/ignored/n-00000000") == {
        "namespace": "team", "name": "etl", "uid": "1234abcd-0000"}
    assert preload.identity_from({}, "/s/clusters/team/my-etl-1234abcd") == {
        "namespace": "team", "name": "my-etl", "uid": "1234abcd"}


def test_a_killed_scheduler_leaves_its_history_up_to_its_last_flush(tmp_path: Path) -> None:
    """kill -9 of the scheduler process mid-computation: the WAL keeps every committed
    flush; the reader marks the run killed and the computation interrupted, and the copy
    kept at deletion is one self-contained file."""
    path = staged_preload(tmp_path, name="killed")
    scheduler_file = path.parent / "scheduler.json"
    env = {**os.environ, "DASK_HPC_IDENTITY": "dask-hpc:v1:ns1:killed:abcdef12-full-uid:"
           "scheduler:scheduler:0"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
         str(scheduler_file), "--port", "0", "--dashboard-address", ":0", "--preload",
         str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
             str(scheduler_file), "--nthreads", "2", "--name", "w0", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(scheduler_file), timeout=30) as client:
            futures = client.map(time.sleep, [0.2] * 60, key=[f"nap-{i}" for i in range(60)])
            deadline = time.monotonic() + 30
            while True:  # the live file, read while the scheduler writes it
                seen = only(tmp_path).computations
                if seen and seen[0].tasks_done >= 6:
                    break
                assert time.monotonic() < deadline, f"no progress recorded: {seen}"
                time.sleep(0.2)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            del futures
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert (path.parent / "history.sqlite-wal").exists(), "no close: the WAL is left behind"
    later = time.time() + history.STALE_AFTER_S + 1
    h = history.load(history.find(tmp_path)[0], now=later)
    assert h.uid == "abcdef12-full-uid"
    assert [r.state for r in h.runs] == ["killed"]
    assert h.end == h.runs[0].last_seen
    (c,) = h.computations
    assert c.state == "interrupted"
    assert c.tasks_submitted == 60
    assert 6 <= c.tasks_done < 60

    kept = history.archive_path(tmp_path, "ns1", "killed", "abcdef12-full-uid")
    assert history.archive(path.parent / "history.sqlite", kept)
    assert not Path(str(kept) + "-wal").exists()
    assert sqlite3.connect(kept).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    shutil.rmtree(path.parent)
    (archived,) = history.find(tmp_path)
    assert archived.archived and archived.path == kept
    again = history.load(archived)  # archived: no scheduler can still be running
    assert again.runs[0].state == "killed"
    assert again.computations[0].tasks_done == c.tasks_done
