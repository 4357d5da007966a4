"""Computation history on a real one-node SLURM: what a DaskCluster computed is still
listed after the cluster is deleted, and a scheduler killed mid-computation leaves its
history up to its last flush; what its batch jobs used is what sacct says, shown in
status.usage while it runs and kept with the history, whose report (with Dask's performance
reports) is photographed in headless Chromium (the README's docs/images/report.png, with
DASK_HPC_SCREENSHOT=docs/images/report.png).

The objects live in `dask-hpc up`'s in-memory store (embedded.Session), reconciled by the
same code the kopf handlers call. Tasks are lambdas (they travel by value: the scheduler
and workers, SLURM jobs, cannot import this module) with explicit key prefixes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from dask_hpc_operator import history
from dask_hpc_operator.cli import main
from dask_hpc_operator.embedded import Resource, Session
from dask_hpc_operator.site_config import SiteConfig
from helpers import (
    CHROMIUM,
    group_manifest,
    live_slurm_jobs,
    manifest,
    png_detail,
    png_dimensions,
    screenshot,
    slurm_runtime,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]


@pytest.fixture
def site(site: SiteConfig) -> SiteConfig:
    """Usage accounting asked every second (the default is a minute), so that tests see
    status.usage move."""
    return dataclasses.replace(site, usage_interval=1.0)


class Clusters:
    """One embedded session; `start` adds a DaskCluster and waits until it is ready."""

    def __init__(self, site: SiteConfig) -> None:
        runtime, _ = slurm_runtime(site)
        self.resources: list[Resource] = []
        self.session = Session(runtime, self.resources)
        self.uids: set[str] = set()

    async def start(self, name: str, workers: int = 1, **spec: Any) -> Resource:
        r = Resource(manifest(name, workers))
        r.manifest["spec"].update(spec)
        self.uids.add(r.manifest["metadata"]["uid"])
        self.resources.append(r)

        async def ready() -> bool:
            await self.session.step()
            assert r.status.get("phase") != "Failed", r.status.get("message")
            return bool(r.status.get("phase") == "Running"
                        and r.status["workers"]["ready"] == workers)
        await wait_until(ready, 120, f"DaskCluster {name} running with {workers} workers")
        return r

    async def delete(self, r: Resource) -> None:
        r.deleting = True

        async def gone() -> bool:
            await self.session.step()
            return r not in self.resources
        await wait_until(gone, 90, f"DaskCluster {r.manifest['metadata']['name']} deleted")
        assert live_slurm_jobs(r.manifest["metadata"]["uid"]) == []


@pytest.fixture
async def clusters(site: SiteConfig) -> AsyncIterator[Clusters]:
    made = Clusters(site)
    yield made
    for r in made.resources:
        r.deleting = True

    async def all_gone() -> bool:
        await made.session.step()
        return not made.resources
    await wait_until(all_gone, 90, "every cluster deleted")
    assert not any(live_slurm_jobs(uid) for uid in made.uids)


def history_of(site: SiteConfig, r: Resource, now: float | None = None
               ) -> history.ClusterHistory | None:
    uid8 = r.manifest["metadata"]["uid"][:8]
    files = [f for f in history.find(site.staging_dir, "it") if f.uid8 == uid8]
    try:
        return history.load(files[0], now) if files else None
    except sqlite3.Error:  # the scheduler is creating its tables
        return None


async def test_history_lists_both_computations_after_the_cluster_is_deleted(
        site: SiteConfig, clusters: Clusters, capsys: pytest.CaptureFixture[str]) -> None:
    r = await clusters.start("hist")
    uid = r.manifest["metadata"]["uid"]
    async with Client(r.status["schedulerAddress"], asynchronous=True) as client:
        squares = client.map(lambda i: time.sleep(0.05) or i * i, range(30),
                             key=[f"squares-{i}" for i in range(30)])
        assert sum(await client.gather(squares)) == sum(i * i for i in range(30))
        increments = client.map(lambda i: i + 1, range(12),
                                key=[f"increments-{i}" for i in range(12)])
        assert await client.gather(increments) == list(range(1, 13))
    await clusters.delete(r)

    staging = Path(site.staging_dir) / "clusters" / "it" / f"hist-{uid[:8]}"
    assert not staging.exists()
    h = history_of(site, r)
    assert h is not None and h.file.archived
    assert (h.namespace, h.name, h.uid) == ("it", "hist", uid)
    assert [run.state for run in h.runs] == ["stopped"]  # scancel: SIGTERM, a clean close
    assert h.runs[0].job_id == r.status["schedulerJobId"]
    first, second = h.computations
    assert {p.prefix: p.tasks for p in first.prefixes} == {"squares": 30}
    assert {p.prefix: p.tasks for p in second.prefixes} == {"increments": 12}
    assert (first.state, first.tasks_submitted, first.tasks_done) == ("finished", 30, 30)
    assert (second.state, second.tasks_submitted, second.tasks_done) == ("finished", 12, 12)
    # One worker thread: 30 naps of 0.05 s take at least 1.5 s of task time.
    assert 1.5 <= first.prefixes[0].compute_seconds < 30
    assert 1.5 <= first.duration < 60 and 0 <= second.duration < 30
    assert first.end is not None and first.end <= second.start
    assert [w.name for w in h.workers] == ["dask.it.hist.default.0"]
    assert h.workers[0].memory_peak > 0

    assert main(["history", "--staging-dir", site.staging_dir, "-n", "it"]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines()
               if line.split()[1:3] == ["hist", uid[:8]])
    assert row[3:5] == ["stopped,", "deleted"] and row[-5:-2] == ["2", "42", "0"]
    assert float(row[-2]) > 0 and row[-1] == "0.00"  # core-hours, GPU-hours
    assert main(["history", "hist", "--staging-dir", site.staging_dir]) == 0
    out = capsys.readouterr().out
    assert "finished  30/30" in out and "finished  12/12" in out


async def test_a_killed_scheduler_leaves_its_history_up_to_that_point(
        site: SiteConfig, clusters: Clusters) -> None:
    r = await clusters.start("histkill")
    async with Client(r.status["schedulerAddress"], asynchronous=True) as client:
        naps = client.map(lambda i: time.sleep(0.5) or i, range(40),
                          key=[f"naps-{i}" for i in range(40)])

        async def progress() -> history.ClusterHistory | None:
            h = history_of(site, r)
            done = h is not None and h.computations and h.computations[0].tasks_done >= 4
            return h if done else None
        before = await wait_until(progress, 60, "4 tasks recorded in the live history")
        run = before.runs[0]
        assert run.host == socket.gethostname() and run.pid
        os.kill(run.pid, signal.SIGKILL)  # the scheduler process of the SLURM job: kill -9
        del naps

    # Readable at once (the WAL holds the last flushes); the run no longer flushes.
    h = history_of(site, r, now=time.time() + history.STALE_AFTER_S + 1)
    assert h is not None and not h.file.archived
    assert [run.state for run in h.runs] == ["killed"]
    (c,) = h.computations
    assert c.state == "interrupted" and c.tasks_submitted == 40
    assert before.computations[0].tasks_done <= c.tasks_done < 40
    assert {p.prefix for p in c.prefixes} == {"naps"}

    await clusters.delete(r)
    kept = history_of(site, r)
    assert kept is not None and kept.file.archived
    assert [run.state for run in kept.runs] == ["killed"]
    assert kept.computations[0].tasks_done == c.tasks_done
    assert kept.computations[0].state == "interrupted"


def sacct_jobs(names: set[str], since: float) -> dict[str, dict[str, float]]:
    """What the batch system itself recorded for jobs of these names eligible since
    `since`, asked independently of the operator: the job completion log of this SLURM (no
    slurmdbd; `sacct -c` ignores --name and --starttime, so they are filtered here). The
    queue wait is start - eligible (usage.py)."""
    out = subprocess.run(
        ["sacct", "--completion", "--allocations", "--noheader", "--parsable2",
         "--format=JobID,JobName,NCPUS,ElapsedRaw,Eligible,Start"],
        capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        job_id, name, ncpus, elapsed, eligible, start = line.split("|")
        if name not in names:  # other tests' jobs, some never started ("Unknown")
            continue
        eligible_at = dt.datetime.fromisoformat(eligible).timestamp()
        if eligible_at >= since - 1:
            found[job_id] = {"name": name, "cores": float(ncpus), "elapsed": float(elapsed),
                             "wait": dt.datetime.fromisoformat(start).timestamp() - eligible_at}
    return found


async def test_usage_matches_sacct_and_the_report_shows_it(
        site: SiteConfig, clusters: Clusters, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    began = time.time()
    r = await clusters.start("usage", workers=2, diagnostics={"performanceReport": True})
    uid = r.manifest["metadata"]["uid"]
    big = Resource(group_manifest("big", "usage", 1, cores=2))
    clusters.resources.append(big)

    async def group_ready() -> bool:
        await clusters.session.step()
        return bool(big.status.get("workers", {}).get("ready") == 1)
    await wait_until(group_ready, 120, "DaskWorkerGroup big ready")

    async with Client(r.status["schedulerAddress"], asynchronous=True) as client:
        loaded = client.map(lambda i: time.sleep(0.3) or list(range(i * 100)), range(24),
                            key=[f"load-{i}" for i in range(24)])
        doubled = client.map(lambda xs: [2 * x for x in xs], loaded,
                             key=[f"transform-{i}" for i in range(24)])
        total = client.submit(lambda parts: sum(map(sum, parts)), doubled, key="aggregate-0")
        assert await total == 2 * sum(sum(range(i * 100)) for i in range(24))
        scores = client.map(lambda i: time.sleep(0.05) or i % 7, range(60),
                            key=[f"score-{i}" for i in range(60)])
        assert sum(await client.gather(scores)) == sum(i % 7 for i in range(60))

    # While it runs: the scheduler, the two array tasks and the group's job, by group.
    async def shown() -> dict[str, Any] | None:
        await clusters.session.step()
        used = r.status.get("usage") or {}
        groups = used.get("byGroup") or {}
        return used if used.get("jobs") == 4 and all(
            groups.get(g, {}).get("runSeconds", 0) > 0
            for g in ("scheduler", "default", "big")) else None
    live = await wait_until(shown, 30, "status.usage of four running jobs")
    assert set(live["byGroup"]) == {"scheduler", "default", "big"}
    assert live["byGroup"]["default"]["jobs"] == 2 and live["final"] is False
    # Running jobs are not in the completion log yet: their cores are the request's.
    assert live["source"] == "requested" and live["gpuSource"] == "none"
    assert live["coreHours"] > 0 and live["updatedAt"].endswith("Z")
    staging = Path(r.status["stagingDirectory"])
    assert (staging / "usage.json").exists()
    reports = staging / "reports"

    async def two_reports() -> bool:
        return len(list(reports.glob("*.html"))) >= 2
    await wait_until(two_reports, 60, "two Dask performance reports")

    big.deleting = True
    await clusters.delete(r)

    h = history_of(site, r)
    assert h is not None and h.file.archived and len(h.computations) == 2
    rows = {u.job_id: u for u in h.usage}
    assert len(rows) == 4 and all(u.final for u in rows.values())
    assert {u.source for u in rows.values()} == {"sacct-completion"}
    # The batch system's own record, asked independently: same jobs, same figures.
    names = {"dask.it.usage.scheduler.0", "dask.it.usage.default.array", "dask.it.usage.big.0"}
    recorded = sacct_jobs(names, began)
    assert {u.raw_job_id or u.job_id for u in rows.values()} == set(recorded)
    summary = h.usage_summary()
    core_hours = sum(j["cores"] * j["elapsed"] for j in recorded.values()) / 3600
    assert summary.total.core_hours == pytest.approx(core_hours, rel=1e-6, abs=1e-9)
    assert summary.total.queue_wait_seconds == pytest.approx(
        sum(j["wait"] for j in recorded.values()), abs=1e-6)
    by_name = {"scheduler": "dask.it.usage.scheduler.0", "default": "dask.it.usage.default.array",
               "big": "dask.it.usage.big.0"}
    for group, name in by_name.items():
        expected = sum(j["cores"] * j["elapsed"] for j in recorded.values()
                       if j["name"] == name) / 3600
        assert summary.by_group[group].core_hours == pytest.approx(expected, rel=1e-6,
                                                                   abs=1e-9), group
    assert sum(t.core_hours for t in summary.by_group.values()) == pytest.approx(
        summary.total.core_hours)
    assert {u.cores for u in rows.values() if u.group == "big"} == {2}
    # Dask's performance reports were kept beside the history, one per computation.
    assert sorted(p.stem for p in h.reports) == sorted(c.id for c in h.computations)

    assert main(["history", "-n", "it", "--staging-dir", site.staging_dir]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if uid[:8] in line)
    assert row[-2] == history.hours(summary.total.core_hours) and row[-1] == "0.00"
    assert any(line.startswith("namespace it: ") for line in out.splitlines())
    assert main(["history", f"usage-{uid[:8]}", "--staging-dir", site.staging_dir]) == 0
    assert "usage: 4 batch jobs, " in capsys.readouterr().out

    page = tmp_path / "report.html"
    assert main(["report", f"usage-{uid[:8]}", "-o", str(page), "--staging-dir",
                 site.staging_dir]) == 0
    text = page.read_text(encoding="utf-8")
    for shown_text in ("Batch jobs: queue waits and usage", "Dask performance reports (2)",
                       "load", "transform", "score", "dask.it.usage.big.0"):
        assert shown_text in text, shown_text
    if CHROMIUM is None and os.environ.get("CI") != "true":
        pytest.skip("chromium is not installed (apt-get install chromium): no screenshot")
    png = screenshot(page, tmp_path / "report.png", 1280, 1800)
    assert png_dimensions(png) == (1280, 1800)
    assert len(png) > 50_000 and png_detail(png) > 100
    target = os.environ.get("DASK_HPC_SCREENSHOT")
    if target:  # the README's figure: DASK_HPC_SCREENSHOT=docs/images/report.png
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "report.png", target)
