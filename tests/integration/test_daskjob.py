"""DaskJob on a real one-node SLURM: a cluster it owns, a runner job, real Dask, real MPI.

The objects live in `dask-hpc up`'s in-memory store (embedded.Session): the same
reconcilers the kopf handlers call (the Kubernetes path is in tests/e2e).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from dask_hpc_operator.embedded import Resource, Session
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from helpers import live_slurm_jobs, slurm_runtime, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]

COMPUTE = """
from distributed import Client
with Client() as client:
    client.wait_for_workers(2, timeout=60)
    total = client.submit(sum, client.map(lambda i: i * i, range(100))).result()
    print("sum of squares:", total, "workers:", len(client.scheduler_info()["workers"]))
"""


def job_manifest(name: str, script: str, mode: str = "cluster", replicas: int = 2,
                 **cluster: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskJob",
        "metadata": {"name": name, "namespace": "it", "uid": str(uuid.uuid4()),
                     "generation": 1},
        "spec": {"mode": mode, "job": {"script": script, "memory": "1GiB"},
                 "cluster": {"backend": "slurm", "scheduler": {"memory": "1GiB"},
                             "worker": {"replicas": replicas, "cores": 1, "memory": "1GiB"},
                             **cluster}},
    }


class Run:
    """A session's objects plus every uid it has seen (the child cluster's included)."""

    def __init__(self, runtime: Runtime, body: dict[str, Any]) -> None:
        self.job = Resource(body)
        self.session = Session(runtime, [self.job])
        self.uids = {body["metadata"]["uid"]}

    async def step(self) -> dict[str, Any]:
        await self.session.step()
        self.uids |= {r.manifest["metadata"]["uid"] for r in self.session.resources}
        return self.job.status

    async def until(self, *phases: str, timeout: float = 120) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            status = await self.step()
            return dict(status) if status.get("phase") in phases else None
        return await wait_until(check, timeout, f"DaskJob phase in {phases}")

    async def settled(self, timeout: float = 60) -> None:
        """Until the job's cluster is gone and no job of any of its objects is live."""
        async def check() -> bool:
            await self.step()
            return len(self.session.resources) == 1 and not any(
                live_slurm_jobs(uid) for uid in self.uids)
        await wait_until(check, timeout, "no cluster and no live job left")


@pytest.fixture
async def runs() -> AsyncIterator[list[Run]]:
    made: list[Run] = []
    yield made
    for run in made:  # whatever a failed test left behind
        for r in list(run.session.resources):
            r.deleting = True
        for _ in range(30):  # paced as `dask-hpc up` paces its teardown
            await run.session.step()
            if not run.session.resources:
                break
            await asyncio.sleep(0.5)


async def test_cluster_mode_runs_the_script_and_cleans_up(site: SiteConfig,
                                                           runs: list[Run]) -> None:
    runtime, _ = slurm_runtime(site)
    run = Run(runtime, job_manifest("squares", COMPUTE))
    runs.append(run)
    status = await run.until("Running", "Succeeded", "Failed")
    assert status["clusterName"] == "squares"
    status = await run.until("Succeeded", "Failed")
    output = Path(status["outputFile"]).read_text()
    assert status["phase"] == "Succeeded", (status, output)
    assert status["exitCode"] == 0 and status["startTime"] <= status["endTime"]
    assert "sum of squares: 328350 workers: 2" in output
    await run.settled()


async def test_a_script_that_raises_fails_with_its_exit_code(site: SiteConfig,
                                                              runs: list[Run]) -> None:
    runtime, _ = slurm_runtime(site)
    run = Run(runtime, job_manifest("raises", "import sys\nprint('about to fail')\n"
                                    "sys.exit(3)\n", replicas=1))
    runs.append(run)
    status = await run.until("Succeeded", "Failed")
    assert status["phase"] == "Failed" and status["exitCode"] == 3
    assert "exited with 3" in status["message"]
    assert "about to fail" in Path(status["outputFile"]).read_text()
    await run.settled()


async def test_deleting_a_running_job_cancels_runner_and_cluster(site: SiteConfig,
                                                                  runs: list[Run]) -> None:
    runtime, _ = slurm_runtime(site)
    run = Run(runtime, job_manifest("sleeper", "import time\nprint('started', flush=True)\n"
                                    "time.sleep(600)\n", replicas=1))
    runs.append(run)
    status = await run.until("Running")
    runner_job = status["jobId"]
    assert live_slurm_jobs(run.job.manifest["metadata"]["uid"]) == [runner_job]
    run.job.deleting = True  # what a deletionTimestamp does under the operator

    async def all_gone() -> bool:
        await run.session.step()
        return not run.session.resources and not any(live_slurm_jobs(u) for u in run.uids)
    await wait_until(all_gone, 60, "the runner and the cluster's jobs to end")


async def test_allocation_mode_runs_scheduler_client_and_workers_in_one_job(
        site: SiteConfig, runs: list[Run]) -> None:
    """4 MPI tasks (mpich, mpi4py, dask-mpi): scheduler, the script, 2 workers."""
    runtime, runner = slurm_runtime(site)
    run = Run(runtime, job_manifest("mpi", COMPUTE, mode="allocation", replicas=2))
    runs.append(run)
    status = await run.until("Succeeded", "Failed")
    output = Path(status["outputFile"]).read_text()
    assert status["phase"] == "Succeeded", (status, output)
    assert "sum of squares: 328350 workers: 2" in output
    assert runner.calls["sbatch"] == 1, "one allocation, one submission"
    assert "clusterName" not in status
    await run.settled()

    failing = Run(runtime, job_manifest("mpi-fails", "raise SystemExit(4)\n",
                                        mode="allocation", replicas=1))
    runs.append(failing)
    status = await failing.until("Succeeded", "Failed")
    assert status["phase"] == "Failed" and status["exitCode"] == 4
    await failing.settled()


async def test_daskcluster_in_one_allocation(site: SiteConfig) -> None:
    """spec.mode: allocation: the scheduler and 3 workers in one 4-task job; a client from
    outside connects, computes; deleting the cluster ends the allocation."""
    from helpers import Cluster, manifest

    runtime, runner = slurm_runtime(site)
    body = manifest("alloc", 3)
    body["spec"]["mode"] = "allocation"
    cluster = Cluster(runtime, body)
    status = await cluster.until("Running", 3)
    assert runner.calls["sbatch"] == 1
    assert len(live_slurm_jobs(body["metadata"]["uid"])) == 1
    async with Client(status["schedulerAddress"], asynchronous=True) as client:
        names = [w["name"] for w in (await client.scheduler.identity())["workers"].values()]
        assert sorted(names) == [f"dask.it.alloc.allocation.0-{rank}" for rank in (1, 2, 3)]
        assert await client.submit(lambda x: x + 1, 41) == 42
    await cluster.delete()
