"""HPCCluster in Kubernetes mode: the Python API writes the custom resources through the
API (kmock's emulator over real HTTP, reached through a kubeconfig file), the kopf operator
reconciles them onto real SLURM, and a real Dask client computes.

The emulator is served by the test's event loop, so the synchronous API (what a notebook
uses) runs in a worker thread; a blocking call on the loop itself would starve the emulator.
kmock has no garbage collector: the owner references HPCCluster sets are checked here, and
close() deletes what it created itself, so nothing depends on the collector.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from distributed import Client
from kube_emulator import StampingEmulator, custom_objects, kube, run_operator

from dask_hpc_operator import HPCCluster
from dask_hpc_operator.constants import GROUP, VERSION
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from helpers import live_slurm_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]
__all__ = ["kube"]  # the emulator fixture, re-exported for pytest

double = lambda x: x * 2  # noqa: E731  (by value: the workers cannot import this module)


@pytest.fixture
def operator(kube: StampingEmulator, site: SiteConfig) -> Iterator[None]:
    yield from run_operator(str(kube.url).rstrip("/"), Runtime(site))


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator",
                                                      "user": "tester"}}],
    }))
    return path


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_hpccluster_through_the_kubernetes_api(kube: StampingEmulator, operator: None,
                                                     tmp_path: Path) -> None:
    server = str(kube.url).rstrip("/")
    config = write_kubeconfig(tmp_path / "kubeconfig", server)
    api = custom_objects(server)

    def objects(plural: str) -> list[dict[str, Any]]:
        found = api.list_namespaced_custom_object(GROUP, VERSION, "default", plural)
        return list(found["items"])

    def session() -> str:
        with HPCCluster("pyapi", backend="slurm", memory="1GiB", replicas=1,
                        kubernetes=True, kube_config=config, timeout=120, close_timeout=90,
                        quiet=True) as cluster:
            assert cluster.mode == "kubernetes" and cluster.uid
            [obj] = objects("daskclusters")
            assert obj["spec"]["worker"] == {"replicas": 1, "memory": "1GiB"}
            with Client(cluster) as client:
                assert client.submit(double, 21).result() == 42
                cluster.scale(2)
                cluster.wait_for_workers(2, timeout=120)
                assert objects("daskclusters")[0]["spec"]["worker"]["replicas"] == 2

                # Another process (a colleague's notebook) attaches by name; closing it
                # only disconnects.
                attached = HPCCluster.from_name("pyapi", kube_config=config, quiet=True)
                assert attached.scheduler_address == cluster.scheduler_address
                attached.close()
                assert [o["metadata"]["uid"] for o in objects("daskclusters")] == [cluster.uid]

                # adapt() creates a DaskAutoscaler owned by the cluster; scale() removes it.
                name = cluster.adapt(0, 2)
                [scaler] = objects("daskautoscalers")
                assert scaler["metadata"]["name"] == name
                owner = scaler["metadata"]["ownerReferences"][0]
                assert (owner["kind"], owner["uid"]) == ("DaskCluster", cluster.uid)
                cluster.scale(1)
                wait_for(lambda: objects("daskautoscalers") == [], 30,
                         "the autoscaler to be deleted")
                wait_for(lambda: len(cluster.scheduler_info["workers"]) == 1, 40,
                         f"the scale-down to 1 worker {objects('daskclusters')}")
            uid = cluster.uid
        return uid

    uid = await asyncio.to_thread(session)
    # close() returned only once the finalizer let the object go: its jobs have ended.
    with pytest.raises(kubernetes.client.ApiException) as gone:
        await asyncio.to_thread(api.get_namespaced_custom_object, GROUP, VERSION, "default",
                                "daskclusters", "pyapi")
    assert gone.value.status == 404
    assert live_slurm_jobs(uid) == []
