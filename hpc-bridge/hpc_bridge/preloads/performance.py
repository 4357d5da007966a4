"""Dask's own performance report of every computation, written by the scheduler itself.

`distributed.performance_report` is a client-side context manager: only the client that
wraps its work in it gets a report, and only if its author thought of it beforehand. What
it does is ask the scheduler (`Scheduler.performance_report`, an RPC handler) for a page
built from the scheduler's task stream, profiles, bandwidth and system monitor since a
given time. This preload calls the same method inside the scheduler, for each computation
of ANY client, once the computation has no task left to run (checked every
CHECK_INTERVAL_S): `<staging>/reports/<computation id>.html` (the id is distributed's, the
one history.sqlite records, so `dask-hpc report` links each computation to its page).

Loaded only where a DaskCluster asks for it (`spec.diagnostics.performanceReport: true`):
a report costs the scheduler about half a second of its event loop (bokeh builds the page
there) and 1.7 MB of disk, since the page carries bokeh's JavaScript inline so that it
opens anywhere, offline, like `dask-hpc report`. At most MAX_REPORTS are written per
scheduler; a computation still running when the scheduler stops gets none. The report's
window starts at the computation's start and ends when it is written, so a computation
that follows within a second may show in its predecessor's task stream.

The pages need bokeh on the scheduler's Python (the dashboard's dependency). Without it,
`reports/UNAVAILABLE.txt` says so and nothing else happens. Imports only the standard
library, dask and distributed (compute nodes may not have dask-hpc installed), and nothing
here may stop the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

log = logging.getLogger(__name__)

PLUGIN_NAME = "dask-hpc-performance"
REPORTS_DIR = "reports"
UNAVAILABLE_FILE = "UNAVAILABLE.txt"
CHECK_INTERVAL_S = 1.0
MAX_REPORTS = 50
REPORT_TIMEOUT_S = 120.0
ACTIVE_STATES = ("waiting", "queued", "processing", "no-worker")


def source_code(code: Any) -> str:
    """The user's code block that submitted a computation (distributed's SourceCode
    tuples: code, lineno_frame, lineno_relative, filename), for the report's Calling Code."""
    try:
        return str(list(code)[-1][-1][0])
    except (IndexError, TypeError):
        return "<code not available>"


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class PerformanceReportPlugin(SchedulerPlugin):
    name = PLUGIN_NAME

    def __init__(self, directory: str, check_interval: float = CHECK_INTERVAL_S,
                 max_reports: int = MAX_REPORTS) -> None:
        self.directory = directory
        self.check_interval = check_interval
        self.max_reports = max_reports
        self.scheduler: Scheduler | None = None
        self.reported: set[str] = set()
        self.monitor_counts: dict[str, int] = {}  # computation id -> system monitor count
        self.written: list[str] = []
        self.failures = 0
        self.watcher: asyncio.Task[None] | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        try:
            os.makedirs(self.directory, exist_ok=True)
            if importlib.util.find_spec("bokeh") is None:
                write_atomically(os.path.join(self.directory, UNAVAILABLE_FILE),
                                 "Dask performance reports need bokeh in the scheduler's "
                                 "Python (pip install bokeh); none were written.\n")
                log.warning("dask-hpc performance reports: bokeh is not installed")
                return
        except OSError as exc:
            log.warning("dask-hpc performance reports: cannot write %s: %s", self.directory,
                        exc)
            return
        # The task stream is recorded only once someone asks for it (what the client's
        # performance_report does on entry): from the start, so every task is in it.
        scheduler.get_task_stream(start=0, stop=0)
        self.watcher = asyncio.create_task(self._watch(), name=PLUGIN_NAME)

    async def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher

    def update_graph(self, scheduler: Scheduler, **kwargs: Any) -> None:
        """Remember the system monitor's position when a computation begins: its report
        shows CPU, memory and network from there on. Only while reports are still written,
        and only for computations distributed still keeps (its last 100): the others can
        never be reported, and a long-lived scheduler serves many graphs."""
        if len(self.written) >= self.max_reports:
            self.monitor_counts.clear()
            return
        if scheduler.computations:
            cid = str(scheduler.computations[-1].id)
            self.monitor_counts.setdefault(cid, int(scheduler.monitor.count))
            if len(self.monitor_counts) + len(self.reported) > len(scheduler.computations):
                kept = {str(c.id) for c in scheduler.computations}
                self.monitor_counts = {k: v for k, v in self.monitor_counts.items()
                                       if k in kept}
                self.reported &= kept

    def due(self) -> list[Any]:
        """Computations with tasks, none of them left to run, not reported yet."""
        assert self.scheduler is not None
        out = []
        computations: list[Any] = list(self.scheduler.computations)
        for c in computations:
            if str(c.id) in self.reported or not c.groups:
                continue
            states: dict[str, int] = dict(c.states)
            if not any(states.get(s, 0) for s in ACTIVE_STATES):
                out.append(c)
        return out

    async def _watch(self) -> None:
        while len(self.written) < self.max_reports:
            await asyncio.sleep(self.check_interval)
            for computation in self.due():
                if len(self.written) >= self.max_reports:
                    break
                try:
                    await self.report(computation)
                except Exception as exc:  # a bokeh or distributed change must not stop us
                    self.failures += 1
                    log.warning("dask-hpc performance report of %s failed: %r",
                                computation.id, exc)
                    self.reported.add(str(computation.id))
        log.info("dask-hpc performance reports: %d written, the most one scheduler writes",
                 len(self.written))

    async def report(self, computation: Any) -> str:
        """Write one computation's report; returns its path."""
        assert self.scheduler is not None
        cid = str(computation.id)
        self.reported.add(cid)
        html = await asyncio.wait_for(self.scheduler.performance_report(
            start=float(computation.start), last_count=self.monitor_counts.pop(cid, 0),
            code=source_code(computation.code), mode="inline"), REPORT_TIMEOUT_S)
        path = os.path.join(self.directory, f"{cid}.html")
        await asyncio.get_running_loop().run_in_executor(None, write_atomically, path, html)
        self.written.append(path)
        return path


def reports_dir() -> str:
    """`reports/` beside this file: the operator copies the preload into the cluster's
    staging directory, so that is where the reports land."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), REPORTS_DIR)


def dask_setup(scheduler: Scheduler) -> None:
    scheduler.add_plugin(PerformanceReportPlugin(reports_dir()), name=PLUGIN_NAME)
