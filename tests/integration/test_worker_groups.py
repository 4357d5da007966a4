"""Heterogeneous worker pools on real SLURM: groups, resources, packing, several listeners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import Client

from dask_hpc_operator.site_config import SiteConfig
from helpers import (
    Cluster,
    group_manifest,
    live_slurm_jobs,
    manifest,
    slurm_runtime,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]
REPO = Path(__file__).resolve().parents[2]


def partition_of(job_id: str) -> str:
    out = subprocess.run(["squeue", "--noheader", "-j", job_id, "-o", "%P"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


async def test_highmem_group_routes_tasks_and_scales_on_its_own(site: SiteConfig) -> None:
    runtime, _ = slurm_runtime(site)
    cluster = Cluster(runtime, manifest("hetero", 1))
    highmem = Cluster(runtime, group_manifest("highmem", "hetero", 1, memory="2GiB",
                                              queue="highmem", resources={"HIGHMEM": 1}),
                      cluster)
    status = await cluster.until("Running", 1)
    group_status = await highmem.until("Running", 1)
    assert group_status["resources"] == ["HIGHMEM"]
    assert {c["type"]: c["status"] for c in group_status["conditions"]}["ClusterReady"] == "True"
    group_jobs = live_slurm_jobs(highmem.body["metadata"]["uid"])
    assert [partition_of(j) for j in group_jobs] == ["highmem"]

    async with Client(status["schedulerAddress"], asynchronous=True) as client:
        def where() -> str:
            from distributed import get_worker
            return str(get_worker().name)

        placed = await client.gather([client.submit(where, resources={"HIGHMEM": 1},
                                                    pure=False) for _ in range(8)])
        assert set(placed) == {"dask.it.hetero.highmem.0"}

        # Each group scales on its own.
        highmem.scale(2)
        await highmem.until("Running", 2)
        cluster.status.update(await cluster.step())
        assert cluster.status["workers"]["ready"] == 1
        cluster.scale(2)
        await cluster.until("Running", 2)
        assert (await highmem.step())["workers"]["ready"] == 2

        # Deleting the group ends only its jobs; the default group keeps running.
        await highmem.delete()
        status = await cluster.until("Running", 2)
        workers = (await client.scheduler.identity())["workers"].values()
        assert sorted(w["name"] for w in workers) == ["dask.it.hetero.default.0",
                                                       "dask.it.hetero.default.1"]
    await cluster.delete()


async def test_group_waits_for_its_cluster_and_ends_with_it(site: SiteConfig) -> None:
    runtime, runner = slurm_runtime(site)
    cluster_body = manifest("later", 0)
    group = Cluster(runtime, group_manifest("extra", "later", 1))
    status = await group.step()
    assert status["phase"] == "Pending"
    assert "DaskCluster it/later" in status["message"]
    ready = {c["type"]: c for c in status["conditions"]}["ClusterReady"]
    assert ready["status"] == "False"
    assert runner.calls["sbatch"] == 0, "nothing is submitted for a group without a cluster"

    cluster = Cluster(runtime, cluster_body)
    group.cluster = cluster
    await cluster.until("Running", 0)
    await group.until("Running", 1)

    await cluster.delete()  # whole cluster: the group's jobs end too
    assert live_slurm_jobs(group.body["metadata"]["uid"]) == []
    status = await group.step()
    assert status["phase"] == "Pending" and "does not exist" in status["message"]


async def test_scaling_to_16_is_one_submission(site: SiteConfig) -> None:
    runtime, runner = slurm_runtime(site)
    cluster = Cluster(runtime, manifest("packed", 0, memory="512MiB"))
    await cluster.until("Running", 0)
    assert runner.calls["sbatch"] == 1  # the scheduler

    cluster.scale(16)
    await cluster.step()
    assert runner.calls["sbatch"] == 2, "16 workers must cost one sbatch (a job array)"
    snapshot = await runtime.poller("slurm").refresh()
    tasks = [j.job_id for j in snapshot.owned_by(cluster.body["metadata"]["uid"])
             if j.state.live and j.identity.role.value == "worker"]
    assert len(tasks) == 16 and len({t.split("_")[0] for t in tasks}) == 1, tasks
    await cluster.until("Running", 16, timeout=240)

    cluster.scale(3)  # array tasks are retired and cancelled one by one
    status = await cluster.until("Running", 3, timeout=120)
    assert status["workers"] == {"desired": 3, "pending": 0, "running": 3, "ready": 3}
    assert runner.calls["sbatch"] == 2
    await cluster.delete()


async def test_one_scheduler_listens_on_two_protocols(site: SiteConfig) -> None:
    """The part of mixing CPU (tcp) and GPU (ucx) groups that needs no GPU: the scheduler
    listens on a second protocol (ws:// here stands in for ucx://), the preload writes that
    listener's own scheduler file, and a client on either protocol sees the same workers."""
    runtime, _ = slurm_runtime(site)
    body = manifest("listeners", 1)
    body["spec"]["scheduler"]["extraProtocols"] = ["ws"]
    cluster = Cluster(runtime, body)
    status = await cluster.until("Running", 1)
    staging = Path(status["stagingDirectory"])
    second = json.loads((staging / "scheduler-ws.json").read_text())["address"]
    assert status["schedulerAddress"].startswith("tcp://") and second.startswith("ws://")
    async with Client(second, asynchronous=True) as client:
        assert await client.submit(lambda: 6 * 7) == 42
        assert len((await client.scheduler.identity())["workers"]) == 1
    await cluster.delete()


UCX_VENV = REPO / ".venv-ucx"


def test_ucx_cluster_computes_over_ucx(tmp_path: Path) -> None:
    """A `protocol: ucx` cluster on real SLURM, through distributed-ucxx over UCX's TCP
    transport (no GPU here). UCXX pins its own dask, so it lives in .venv-ucx."""
    python = UCX_VENV / "bin" / "python"
    if not python.exists():
        reason = ".venv-ucx is missing (scripts/test.sh builds it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    config = tmp_path / "site.yaml"
    config.write_text(f"stagingDir: {tmp_path / 'staging'}\nminPollInterval: 0.5\n"
                      f"python: {python}\nbackend: slurm\n")
    cluster = tmp_path / "ucx.yaml"
    cluster.write_text(json.dumps({
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
        "metadata": {"name": "ucx"},
        "spec": {"scheduler": {"protocol": "ucx", "memory": "1GiB",
                               "env": [{"name": "UCX_TLS", "value": "tcp,self,sm"}]},
                 "worker": {"replicas": 2, "memory": "1GiB",
                            "env": [{"name": "UCX_TLS", "value": "tcp,self,sm"}]}}}))
    check = ("import os; from distributed import Client; c = Client(); "
             "a = c.scheduler.address; w = c.scheduler_info()['workers']; "
             "assert a.startswith('ucx://') and all(k.startswith('ucx://') for k in w), (a, w); "
             "print('computed over', a, c.submit(sum, range(10)).result(), len(w))")
    env = {**os.environ, "UCX_TLS": "tcp,self,sm"}
    result = subprocess.run([str(UCX_VENV / "bin" / "dask-hpc"), "up", "-f", str(cluster),
                             "--config", str(config), "--", str(python), "-c", check],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "computed over ucx://" in result.stdout and " 45 2" in result.stdout
    assert "no job left" in result.stdout
    assert sys.executable  # the main venv's dask is untouched by UCXX's pin
