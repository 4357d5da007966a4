"""End to end, `protocol: tls`: kopf + the API emulator over HTTP + real SLURM + real Dask.

The operator publishes a TLS cluster's credentials as the Secret `<cluster>-dask-tls`
(owned by the DaskCluster), a client built from that Secret alone computes on the cluster,
and deleting the cluster removes the Secret, the key files and every job.

kmock stores core/v1 Secrets like any other object once the resource is registered; it
does not garbage-collect by ownerReferences (a real API server would), which is why the
operator's delete handler removing the Secret itself is what the test sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kmock
import kubernetes
import pytest
from distributed import Client
from kube_emulator import StampingEmulator, custom_objects, kube, run_operator

from dask_hpc_operator import HPCCluster, tls
from dask_hpc_operator.constants import API_VERSION, GROUP, VERSION
from dask_hpc_operator.hpc_cluster import HPCClusterError
from dask_hpc_operator.hpc_cluster_stores import KubernetesStore
from dask_hpc_operator.kube_store import KubeClusterStore
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from helpers import live_slurm_jobs, wait_until

__all__ = ["kube"]  # the emulator fixture, re-exported for pytest

ARGS = (GROUP, VERSION, "default", "daskclusters")


@pytest.fixture
def operator(kube: StampingEmulator, site: SiteConfig) -> Iterator[None]:
    kube.resources["v1/secrets"] = kmock.ResourceInfo(
        kind="Secret", namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
    yield from run_operator(str(kube.url).rstrip("/"), Runtime(site))


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
async def test_tls_cluster_publishes_its_secret(kube: StampingEmulator, operator: None) -> None:
    url = str(kube.url).rstrip("/")
    api = custom_objects(url)
    core = kubernetes.client.CoreV1Api(api.api_client)
    call = asyncio.to_thread  # the sync client must not block the loop serving kmock

    body = {
        "apiVersion": API_VERSION, "kind": "DaskCluster",
        "metadata": {"name": "secure", "namespace": "default"},
        "spec": {"backend": "slurm", "scheduler": {"memory": "1GiB", "protocol": "tls"},
                 "worker": {"replicas": 1, "cores": 1, "memory": "1GiB"}},
    }
    await call(api.create_namespaced_custom_object, *ARGS, body)
    created = await call(api.get_namespaced_custom_object, *ARGS, "secure")
    uid = created["metadata"]["uid"]

    async def running() -> dict[str, Any] | None:
        obj = await call(api.get_namespaced_custom_object, *ARGS, "secure")
        status = obj.get("status") or {}
        assert status.get("phase") != "Failed", status
        ok = status.get("phase") == "Running" and (status.get("workers") or {}).get(
            "ready") == 1 and (status.get("tls") or {}).get("secretName")
        return status if ok else None

    status = await wait_until(running, 120, "a ready worker and a published Secret")
    assert status["schedulerAddress"].startswith("tls://")
    assert status["tls"]["secretName"] == "secure-dask-tls"

    secret = await call(core.read_namespaced_secret, "secure-dask-tls", "default")
    assert secret.type == "kubernetes.io/tls"
    (owner,) = secret.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("DaskCluster", "secure", uid)
    creds = tls.credentials_of_secret(secret.data)
    files = tls.files_of_status(status["tls"])
    assert files is not None
    assert creds == tls.load_credentials(files)  # the files are the single source

    # A client with nothing but the Secret's content (no access to the staging files).
    async with Client(status["schedulerAddress"], security=tls.memory_security(creds),
                      asynchronous=True, timeout="10s") as client:
        assert await client.submit(lambda x: x + 1, 41) == 42
    # A later reconcile's status.tls (paths only) merges with it: the name stays.
    seen = (await call(api.get_namespaced_custom_object, *ARGS, "secure"))["metadata"][
        "resourceVersion"]

    async def patched_again() -> dict[str, Any] | None:
        obj = await call(api.get_namespaced_custom_object, *ARGS, "secure")
        return obj if obj["metadata"]["resourceVersion"] != seen else None
    later = await wait_until(patched_again, 20, "a later reconcile's status patch")
    assert later["status"]["tls"]["secretName"] == "secure-dask-tls"

    await call(api.delete_namespaced_custom_object, *ARGS, "secure")

    async def gone() -> bool:
        try:
            await call(api.get_namespaced_custom_object, *ARGS, "secure")
        except kubernetes.client.ApiException as exc:
            return exc.status == 404
        return False
    await wait_until(gone, 60, "the finalizer to release the cluster")
    with pytest.raises(kubernetes.client.ApiException) as err:
        await call(core.read_namespaced_secret, "secure-dask-tls", "default")
    assert err.value.status == 404
    assert not Path(files.key_file).parent.exists()
    assert live_slurm_jobs(uid) == []


async def test_put_secret_creates_then_brings_up_to_date(kube: StampingEmulator,
                                                         tmp_path: Path) -> None:
    """An interrupted reconcile may have created the Secret already: the second write
    (409, then a merge patch) leaves the current content; a user's HPCCluster can read it.
    No operator or SLURM needed."""
    kube.resources["v1/secrets"] = kmock.ResourceInfo(
        kind="Secret", namespaced=True, verbs={"get", "create", "patch", "delete"})
    store = KubeClusterStore(custom_objects(str(kube.url).rstrip("/")))
    cluster = {"apiVersion": API_VERSION, "kind": "DaskCluster",
               "metadata": {"name": "c1", "namespace": "default", "uid": "u-1"}}
    first = tls.load_credentials(tls.ensure_cluster_credentials(tmp_path / "a", "default",
                                                                "c1", "u-1"))
    second = tls.load_credentials(tls.ensure_cluster_credentials(tmp_path / "b", "default",
                                                                 "c1", "u-1"))
    await store.put_secret(tls.secret_manifest(cluster, first))
    await store.put_secret(tls.secret_manifest(cluster, second))
    found = await asyncio.to_thread(store.core.read_namespaced_secret, "c1-dask-tls",
                                    "default")
    assert tls.credentials_of_secret(found.data) == second

    # HPCCluster away from the shared filesystem (the status' paths do not exist here)
    # takes its credentials from the Secret, through the user's own API access.
    elsewhere = {"caFile": "/nowhere/tls/ca.crt", "certFile": "/nowhere/tls/tls.crt",
                 "keyFile": "/nowhere/tls/tls.key"}
    attached = SimpleNamespace(_store=KubernetesStore(store.api), namespace="default",
                               name="c1")
    security = await HPCCluster._credentials(
        attached, {"tls": {**elsewhere, "secretName": "c1-dask-tls"}})  # type: ignore[arg-type]
    assert security is not None and security.require_encryption
    assert security.tls_client_key == second.key_pem.decode()
    with pytest.raises(HPCClusterError, match="c1-dask-tls"):
        await HPCCluster._credentials(attached, {"tls": elsewhere})  # type: ignore[arg-type]
    await store.delete_secret("default", "c1-dask-tls")
    await store.delete_secret("default", "c1-dask-tls")  # already gone: no error
    with pytest.raises(kubernetes.client.ApiException):
        await asyncio.to_thread(store.core.read_namespaced_secret, "c1-dask-tls", "default")

    # A user's own Secret that happens to have the name is refused, not overwritten (the
    # JSON patch tests the operator's labels; kmock applies JSON patches as a server does).
    foreign: Any = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": "c1-dask-tls", "namespace": "default"},
                    "data": {"password": "aHVudGVyMg=="}}
    await asyncio.to_thread(store.core.create_namespaced_secret, "default", foreign)
    with pytest.raises(tls.TLSError, match="not this operator's"):
        await store.put_secret(tls.secret_manifest(cluster, first))
    kept = await asyncio.to_thread(store.core.read_namespaced_secret, "c1-dask-tls", "default")
    assert kept.data == {"password": "aHVudGVyMg=="}
