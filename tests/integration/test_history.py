"""Computation history on a real one-node SLURM: what a DaskCluster computed is still
listed after the cluster is deleted, and a scheduler killed mid-computation leaves its
history up to its last flush.

The objects live in `dask-hpc up`'s in-memory store (embedded.Session), reconciled by the
same code the kopf handlers call. Tasks are lambdas (they travel by value: the scheduler
and workers, SLURM jobs, cannot import this module) with explicit key prefixes.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from distributed import Client

from dask_hpc_operator import history
from dask_hpc_operator.cli import main
from dask_hpc_operator.embedded import Resource, Session
from dask_hpc_operator.site_config import SiteConfig
from helpers import live_slurm_jobs, manifest, slurm_runtime, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]


class Clusters:
    """One embedded session; `start` adds a DaskCluster and waits until it is ready."""

    def __init__(self, site: SiteConfig) -> None:
        runtime, _ = slurm_runtime(site)
        self.resources: list[Resource] = []
        self.session = Session(runtime, self.resources)
        self.uids: set[str] = set()

    async def start(self, name: str, workers: int = 1) -> Resource:
        r = Resource(manifest(name, workers))
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
    assert row[3:5] == ["stopped,", "deleted"] and row[-3:] == ["2", "42", "0"]
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
