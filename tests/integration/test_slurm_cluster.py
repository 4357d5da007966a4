"""A DaskCluster reconciled against a real one-node SLURM: real sbatch, real Dask.

These drive ClusterReconciler directly (the kopf path is in tests/e2e); each test waits on
conditions with deadlines and ends by checking squeue holds no live job of the cluster.
"""

from __future__ import annotations

import pytest
from distributed import Client

from dask_hpc_operator.site_config import SiteConfig
from helpers import Cluster, live_slurm_jobs, manifest, slurm_runtime, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]


async def test_create_compute_scale_and_delete(site: SiteConfig) -> None:
    runtime, runner = slurm_runtime(site)
    cluster = Cluster(runtime, manifest("scale", 2))
    status = await cluster.until("Running", 2)
    assert status["schedulerAddress"].startswith("tcp://")
    assert status["dashboardURL"].startswith("http://")
    assert status["replicas"] == 2
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Accepted": "True", "SchedulerReady": "True", "WorkersReady": "True"}

    async with Client(status["schedulerAddress"], asynchronous=True) as client:
        assert await client.submit(sum, range(10)) == 45
        # Results that live only on workers: they must survive scale-down.
        futures = client.map(lambda i: bytes(1000) * i, range(40), pure=False)
        await client.wait_for_workers(2)
        await client.gather(futures)

        cluster.scale(4)
        await cluster.until("Running", 4)
        submitted_before = runner.calls["sbatch"]

        cluster.scale(1)
        status = await cluster.until("Running", 1)
        assert status["workers"] == {"desired": 1, "pending": 0, "running": 1, "ready": 1}
        info = await client.scheduler.identity()
        assert len(info["workers"]) == 1
        # Retirement moved the data before the jobs were cancelled: every key is still here.
        results = await client.gather(futures)
        assert [len(r) for r in results] == [1000 * i for i in range(40)]
        assert runner.calls["sbatch"] == submitted_before, "scale-down must not submit"

    await cluster.delete()


async def test_restarted_operator_adopts_jobs(site: SiteConfig) -> None:
    """A new Runtime (an operator restart) finds the jobs by their identity: no sbatch."""
    runtime, _ = slurm_runtime(site)
    first = Cluster(runtime, manifest("adopt", 2))
    status = await first.until("Running", 2)

    restarted, runner = slurm_runtime(site)
    second = Cluster(restarted, first.body)
    second.status = {"schedulerJobId": status["schedulerJobId"]}
    again = await second.until("Running", 2)
    assert runner.calls["sbatch"] == 0
    assert again["schedulerJobId"] == status["schedulerJobId"]
    assert again["schedulerAddress"] == status["schedulerAddress"]
    await second.delete()


async def test_invalid_edit_keeps_running_jobs(site: SiteConfig) -> None:
    """A bad value is refused with the field named; what already runs is not touched."""
    runtime, runner = slurm_runtime(site)
    cluster = Cluster(runtime, manifest("edit", 1))
    await cluster.until("Running", 1)
    jobs_before = sorted(live_slurm_jobs(cluster.body["metadata"]["uid"]))
    calls_before = dict(runner.calls)

    cluster.body["spec"]["worker"]["memory"] = "16 GB; rm -rf /"
    status = await cluster.step()
    assert status["phase"] == "Failed"
    assert "spec.worker.memory" in status["message"]
    accepted = next(c for c in status["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False"
    assert dict(runner.calls) == calls_before, "an invalid spec must not reach the batch system"
    assert sorted(live_slurm_jobs(cluster.body["metadata"]["uid"])) == jobs_before

    cluster.body["spec"]["worker"]["memory"] = "1GiB"
    await cluster.until("Running", 1)
    await cluster.delete()


async def test_dead_worker_job_is_replaced(site: SiteConfig) -> None:
    import subprocess

    runtime, _ = slurm_runtime(site)
    cluster = Cluster(runtime, manifest("heal", 2))
    await cluster.until("Running", 2)
    victim = next(j for j in live_slurm_jobs(cluster.body["metadata"]["uid"])
                  if j != cluster.status["schedulerJobId"])
    subprocess.run(["scancel", victim], check=True)
    uid = cluster.body["metadata"]["uid"]

    async def victim_gone() -> bool:
        return victim not in live_slurm_jobs(uid)
    await wait_until(victim_gone, 30, f"job {victim} to end")
    await cluster.until("Running", 2)
    live = live_slurm_jobs(uid)
    assert victim not in live and len(live) == 3, live  # scheduler + 2 workers, one of them new
    await cluster.delete()
