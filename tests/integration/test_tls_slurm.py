"""`protocol: tls` on a real one-node SLURM: a scheduler and workers started with the
cluster's own certificates (real sbatch, real Dask over TLS), the operator observing and
retiring workers through TLS, clients without the credentials refused, and nothing left
after deletion (no job, no key). Then the clients users write: a DaskJob's script,
HPCCluster.get_client(), and `dask-hpc up -- COMMAND` (local backend, no SLURM needed).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from distributed import Client
from distributed.security import Security
from test_daskjob import Run, job_manifest, runs

from dask_hpc_operator import HPCCluster, tls
from dask_hpc_operator.site_config import SiteConfig
from helpers import Cluster, group_manifest, live_slurm_jobs, manifest, slurm_runtime

__all__ = ["runs"]  # the DaskJob fixture, re-exported for pytest

CONNECT_TIMEOUT = "3s"


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
async def test_tls_cluster_computes_refuses_strangers_and_leaves_no_key(
        site: SiteConfig, tmp_path: Path) -> None:
    runtime, _ = slurm_runtime(site)
    body = manifest("tls", 2)
    body["spec"]["scheduler"]["protocol"] = "tls"
    cluster = Cluster(runtime, body)
    # Ready counts come from the operator's RPC to the scheduler: over TLS, with the
    # cluster's credentials, or they would stay 0.
    status = await cluster.until("Running", 2)
    address = status["schedulerAddress"]
    assert address.startswith("tls://")
    files = tls.files_of_status(status["tls"])
    assert files is not None
    staging = Path(status["stagingDirectory"])
    assert Path(files.key_file).parent == staging / "tls"
    assert stat.S_IMODE(os.stat(staging / "tls").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(files.key_file).st_mode) == 0o600

    async with Client(address, security=tls.client_security(files), asynchronous=True,
                      timeout="10s") as client:
        assert await client.submit(lambda x: x * 2, 21) == 42
        workers = (await client.scheduler.identity())["workers"]
        assert len(workers) == 2 and all(w.startswith("tls://") for w in workers)
        kept = client.map(lambda i: bytes(100) * i, range(20), pure=False)
        await client.gather(kept)

        # No credentials; credentials of another CA (ours for another cluster, and
        # distributed's own temporary ones); plain TCP to the TLS port: all refused.
        with pytest.raises(TypeError, match="ssl_context"):
            await Client(address, asynchronous=True, timeout=CONNECT_TIMEOUT)
        stranger = tls.client_security(tls.ensure_cluster_credentials(
            tmp_path / "stranger", "it", "other", str(uuid.uuid4())))
        for other in (stranger, Security.temporary()):
            with pytest.raises(OSError, match="certificate"):
                await Client(address, security=other, asynchronous=True,
                             timeout=CONNECT_TIMEOUT)
        with pytest.raises(OSError):
            await Client(address.replace("tls://", "tcp://"), asynchronous=True,
                         timeout=CONNECT_TIMEOUT)

        # A DaskWorkerGroup's workers get the cluster's credentials too.
        group = Cluster(runtime, group_manifest("tlsgroup", "tls", 1), cluster)
        await group.until("Running", 1)
        workers = (await client.scheduler.identity())["workers"]
        assert len(workers) == 3 and all(w.startswith("tls://") for w in workers)

        # Scale-down retires through the scheduler (TLS RPC) before cancelling: the data
        # held by the retired worker moved, so every result is still there.
        cluster.scale(1)
        await cluster.until("Running", 1)
        assert [len(r) for r in await client.gather(kept)] == [100 * i for i in range(20)]

    await cluster.delete()  # asserts no live job is left; the group's end with it
    assert live_slurm_jobs(group.body["metadata"]["uid"]) == []
    assert not (staging / "tls").exists()
    assert not staging.exists()


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
async def test_daskjob_runner_connects_over_tls_unchanged(site: SiteConfig,
                                                          runs: list[Run]) -> None:
    """The user's script is a plain `Client()`: the runner's environment carries the
    cluster's credentials as dask configuration."""
    script = (
        "from distributed import Client\n"
        "with Client(timeout='30s') as client:\n"
        "    print('address:', client.scheduler.address)\n"
        "    print('answer:', client.submit(lambda: 6 * 7).result())\n"
    )
    runtime, _ = slurm_runtime(site)
    body = job_manifest("tlsjob", script, replicas=1)
    body["spec"]["cluster"]["scheduler"]["protocol"] = "tls"
    run = Run(runtime, body)
    runs.append(run)
    status = await run.until("Succeeded", "Failed")
    output = Path(status["outputFile"]).read_text()
    assert status["phase"] == "Succeeded", (status, output)
    assert "address: tls://" in output and "answer: 42" in output
    await run.settled()
    # The job's cluster is gone, and its key with it.
    child_dirs = list((Path(site.staging_dir) / "clusters" / "it").glob("tlsjob-*"))
    assert child_dirs == []
    assert not any(live_slurm_jobs(uid) for uid in run.uids)


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_hpc_cluster_client_over_tls(site: SiteConfig) -> None:
    """`HPCCluster(..., scheduler={"protocol": "tls"})`: `get_client()` and the cluster's
    own RPC (scheduler_info) carry the credentials without the user naming them."""
    name = f"tlspy-{uuid.uuid4().hex[:6]}"
    cluster = HPCCluster(name, backend="slurm", memory="1GiB", replicas=1,
                         scheduler={"memory": "1GiB", "protocol": "tls"},
                         site_config=site, timeout=120, quiet=True)
    try:
        assert cluster.scheduler_address.startswith("tls://")
        assert cluster.security is not None and cluster.security.require_encryption
        with cluster.get_client() as client:
            client.wait_for_workers(1, timeout=60)
            assert client.submit(lambda x: x * 3, 14).result() == 42
        assert cluster.scheduler_info["address"] == cluster.scheduler_address
        tls_dir = Path(cluster.resource_status["tls"]["keyFile"]).parent
        assert tls_dir.is_dir()
    finally:
        uid = cluster.uid
        cluster.close()
    assert live_slurm_jobs(uid) == []
    assert not tls_dir.exists()


def test_up_gives_its_command_the_credentials(tmp_path: Path) -> None:
    """`dask-hpc up -- COMMAND` on a TLS cluster (local backend: real processes, real TLS):
    the command's plain `Client()` connects, and the connect hint is printed."""
    config = tmp_path / "site.yaml"
    config.write_text(f"stagingDir: {tmp_path / 'staging'}\nminPollInterval: 0.5\n")
    manifest_file = tmp_path / "tls.yaml"
    manifest_file.write_text(yaml.safe_dump({
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
        "metadata": {"name": "uptls"},
        "spec": {"backend": "local", "scheduler": {"protocol": "tls"},
                 "worker": {"replicas": 1, "cores": 1, "memory": "1GiB"}}}))
    command = ("from distributed import Client\n"
               "with Client(timeout='30s') as c:\n"
               "    print('answer', c.submit(lambda: 6 * 7).result(), c.scheduler.address)\n")
    result = subprocess.run(
        [sys.executable, "-m", "dask_hpc_operator.cli", "up", "--config", str(config), "-f",
         str(manifest_file), "--", sys.executable, "-c", command],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "answer 42 tls://" in result.stdout
    assert "TLS: credentials in" in result.stdout
    assert "no job left" in result.stdout
    assert list((tmp_path / "staging").rglob("tls.key")) == []
