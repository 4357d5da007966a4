"""hpc_bridge.preloads.performance inside a real Dask scheduler: Dask's own performance
report of every computation, whichever client sent it, named by the computation's id (the
id the history records), readable with the history preload beside it."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import dask
import pytest
from distributed import Client, Scheduler, Worker

from dask_hpc_operator import history
from hpc_bridge.preloads import history as history_preload
from hpc_bridge.preloads import performance

pytestmark = pytest.mark.timeout(90)


def slow_square(x: int) -> int:
    time.sleep(0.01)
    return x * x


def increment(x: int) -> int:
    return x + 1


async def until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_every_computation_of_any_client_gets_a_report(tmp_path: Path) -> None:
    staging = tmp_path / "clusters" / "ns" / "perf-abcdef12"
    staging.mkdir(parents=True)
    preloads = [staging / "dask_hpc_history.py", staging / "dask_hpc_performance.py"]
    shutil.copy(history_preload.__file__, preloads[0])
    shutil.copy(performance.__file__, preloads[1])
    reports = staging / performance.REPORTS_DIR
    with dask.config.set({"distributed.diagnostics.computations.nframes": 1}):
        async with Scheduler(dashboard_address=":0", preload=[str(p) for p in preloads]) as s, \
                Worker(s.address, nthreads=2), \
                Client(s.address, asynchronous=True) as first, \
                Client(s.address, asynchronous=True) as second:
            assert sum(await first.gather(first.map(slow_square, range(40)))) == 20540
            await until(lambda: len(list(reports.glob("*.html"))) == 1, "the first report")
            # Another client, which never asked for a report, gets one too.
            assert await second.gather(second.map(increment, range(5))) == [1, 2, 3, 4, 5]
            await until(lambda: len(list(reports.glob("*.html"))) == 2, "the second report")
            ids = [str(c.id) for c in s.computations]
    assert sorted(p.stem for p in reports.glob("*.html")) == sorted(ids)
    pages = {p.stem: p.read_text(encoding="utf-8") for p in reports.glob("*.html")}
    first_page = pages[ids[0]]
    assert "Dask Performance Report" in first_page
    assert "number of tasks: 40" in first_page  # the first computation's task stream
    assert "first.map(slow_square" in first_page  # the calling code, from the scheduler
    assert len(first_page) > 500_000  # bokeh inline: opens offline, like `dask-hpc report`
    assert not re.search(r'<script[^>]+src="https?://', first_page)
    # The history links each computation to its page.
    (kept,) = history.find(tmp_path)
    h = history.load(kept)
    assert [c.id for c in h.computations] == ids
    assert [h.report_of(c.id) for c in h.computations] == [reports / f"{i}.html" for i in ids]


async def test_at_most_max_reports(tmp_path: Path) -> None:
    plugin = performance.PerformanceReportPlugin(str(tmp_path / "reports"),
                                                 check_interval=0.1, max_reports=1)
    async with Scheduler(dashboard_address=":0") as s, Worker(s.address, nthreads=1), \
            Client(s.address, asynchronous=True) as client:
        s.add_plugin(plugin)
        await plugin.start(s)  # add_plugin of a running scheduler does not start it
        for n in range(3):
            assert await client.submit(increment, n, pure=False) == n + 1
            await until(lambda: plugin.due() == [] or len(plugin.written) == 1,
                        "the plugin to catch up")
        await until(lambda: plugin.watcher is not None and plugin.watcher.done(),
                    "the watcher to stop at its limit")
    assert len(plugin.written) == 1 and len(list((tmp_path / "reports").glob("*.html"))) == 1
    assert plugin.monitor_counts == {}  # nothing kept for computations never reported


async def test_only_computations_distributed_keeps_are_remembered(tmp_path: Path) -> None:
    """A long-lived scheduler serves many graphs; distributed keeps the last
    `computations.max-history`, and the plugin keeps no more than that."""
    plugin = performance.PerformanceReportPlugin(str(tmp_path / "reports"))
    with dask.config.set({"distributed.diagnostics.computations.max-history": 5}):
        async with Scheduler(dashboard_address=":0") as s, Worker(s.address, nthreads=1), \
                Client(s.address, asynchronous=True) as client:
            s.add_plugin(plugin)  # not started: no report is written, only update_graph
            for n in range(30):  # one at a time: each graph is a computation of its own
                assert await client.submit(increment, n, pure=False) == n + 1
            assert len(s.computations) == 5
            assert str(s.computations[-1].id) in plugin.monitor_counts
            assert set(plugin.monitor_counts) <= {str(c.id) for c in s.computations}
