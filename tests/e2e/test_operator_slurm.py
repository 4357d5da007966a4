"""End to end: kopf operator + Kubernetes API over HTTP (kmock) + real SLURM + real Dask.

Create a DaskCluster through the API, wait for status.schedulerAddress, compute, scale
2 -> 4 -> 1, delete, and check that squeue holds no live job of the cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from distributed import Client
from kube_emulator import StampingEmulator, custom_objects, kube, run_operator

from dask_hpc_operator.constants import API_VERSION, GROUP, VERSION
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from helpers import live_slurm_jobs, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]
__all__ = ["kube"]  # the emulator fixture, re-exported for pytest

ARGS = (GROUP, VERSION, "default", "daskclusters")


@pytest.fixture
def operator(kube: StampingEmulator, site: SiteConfig) -> Iterator[None]:
    yield from run_operator(str(kube.url).rstrip("/"), Runtime(site))


async def test_daskcluster_lifecycle_through_the_api(kube: StampingEmulator,
                                                     operator: None) -> None:
    api = custom_objects(str(kube.url).rstrip("/"))
    call = asyncio.to_thread  # the sync client must not block the loop serving kmock

    body = {
        "apiVersion": API_VERSION, "kind": "DaskCluster",
        "metadata": {"name": "e2e", "namespace": "default"},
        "spec": {"backend": "slurm", "scheduler": {"memory": "1GiB"},
                 "worker": {"replicas": 2, "cores": 1, "memory": "1GiB"}},
    }
    await call(api.create_namespaced_custom_object, *ARGS, body)
    # kmock answers a create with an empty body (an API server returns the object): read it.
    created = await call(api.get_namespaced_custom_object, *ARGS, "e2e")
    uid = created["metadata"]["uid"]

    async def status_where(phase: str, ready: int) -> dict[str, Any] | None:
        obj = await call(api.get_namespaced_custom_object, *ARGS, "e2e")
        status = obj.get("status") or {}
        assert status.get("phase") != "Failed", status
        ok = status.get("phase") == phase and (status.get("workers") or {}).get("ready") == ready
        return status if ok else None

    status = await wait_until(lambda: status_where("Running", 2), 120, "2 ready workers")
    assert status["schedulerAddress"].startswith("tcp://")
    assert status["observedGeneration"] == 1
    assert len(live_slurm_jobs(uid)) == 3  # scheduler + 2 workers, no duplicates

    async with Client(status["schedulerAddress"], asynchronous=True) as client:
        assert await client.submit(lambda x: x * 2, 21) == 42
        kept = client.map(lambda i: i * i, range(20), pure=False)
        await client.gather(kept)

        # `kubectl scale` writes spec.worker.replicas through the scale subresource; kmock has
        # no scale subresource, so the test patches the same field directly.
        for replicas in (4, 1):
            await call(api.patch_namespaced_custom_object, *ARGS, "e2e",
                       {"spec": {"worker": {"replicas": replicas}}})
            await wait_until(lambda r=replicas: status_where("Running", r), 120,
                             f"{replicas} ready workers")
        assert len((await client.scheduler.identity())["workers"]) == 1
        assert await client.gather(kept) == [i * i for i in range(20)]

    events = [obj["reason"] for key, obj in kube.objects.items()
              if key[0] == "v1/events" and not obj.deleted]
    assert "Submitted" in events and "Running" in events

    await call(api.delete_namespaced_custom_object, *ARGS, "e2e")

    async def deleted() -> bool:
        try:
            await call(api.get_namespaced_custom_object, *ARGS, "e2e")
        except kubernetes.client.ApiException as exc:
            return exc.status == 404
        return False
    await wait_until(deleted, 60, "the finalizer to release the object")
    assert live_slurm_jobs(uid) == []


GROUPS = (GROUP, VERSION, "default", "daskworkergroups")


async def test_worker_group_through_the_api(kube: StampingEmulator, operator: None) -> None:
    """A DaskWorkerGroup created before its cluster waits, then joins it; kopf's index of
    clusters is how the group finds the scheduler."""
    api = custom_objects(str(kube.url).rstrip("/"))
    call = asyncio.to_thread
    group = {"apiVersion": API_VERSION, "kind": "DaskWorkerGroup",
             "metadata": {"name": "himem", "namespace": "default"},
             "spec": {"cluster": "pool", "worker": {"replicas": 1, "memory": "1GiB",
                                                    "queue": "highmem",
                                                    "resources": {"HIGHMEM": 1}}}}
    await call(api.create_namespaced_custom_object, *GROUPS, group)

    async def group_status(phase: str, fragment: str = "") -> dict[str, Any] | None:
        obj = await call(api.get_namespaced_custom_object, *GROUPS, "himem")
        status = obj.get("status") or {}
        ok = status.get("phase") == phase and fragment in status.get("message", "")
        return obj if ok else None

    await wait_until(lambda: group_status("Pending", "does not exist"), 30, "group to wait")

    cluster = {"apiVersion": API_VERSION, "kind": "DaskCluster",
               "metadata": {"name": "pool", "namespace": "default"},
               "spec": {"backend": "slurm", "scheduler": {"memory": "1GiB"},
                        "worker": {"replicas": 1, "memory": "1GiB"}}}
    await call(api.create_namespaced_custom_object, *ARGS, cluster)
    obj = await wait_until(lambda: group_status("Running"), 120, "the group to run")
    assert obj["status"]["resources"] == ["HIGHMEM"]
    owner = obj["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "DaskCluster" and owner["name"] == "pool"
    group_uid = obj["metadata"]["uid"]
    assert len(live_slurm_jobs(group_uid)) == 1

    await call(api.delete_namespaced_custom_object, *GROUPS, "himem")

    async def group_gone() -> bool:
        try:
            await call(api.get_namespaced_custom_object, *GROUPS, "himem")
        except kubernetes.client.ApiException as exc:
            return exc.status == 404
        return False
    await wait_until(group_gone, 60, "the group's finalizer")
    assert live_slurm_jobs(group_uid) == []
    cluster_obj = await call(api.get_namespaced_custom_object, *ARGS, "pool")
    cluster_uid = cluster_obj["metadata"]["uid"]
    assert live_slurm_jobs(cluster_uid), "the cluster keeps running without the group"
    await call(api.delete_namespaced_custom_object, *ARGS, "pool")

    async def cluster_gone() -> bool:
        return not live_slurm_jobs(cluster_uid)
    await wait_until(cluster_gone, 60, "the cluster's jobs to end")


JOBS = (GROUP, VERSION, "default", "daskjobs")


async def test_daskjob_through_the_api(kube: StampingEmulator, operator: None) -> None:
    """A DaskJob created through the API creates its DaskCluster (an object of its own,
    owned by the job), runs its script on SLURM, reaches Succeeded and removes the cluster.
    Then the same name again: a re-created job starts afresh."""
    api = custom_objects(str(kube.url).rstrip("/"))
    call = asyncio.to_thread
    script = ("from distributed import Client\n"
              "with Client() as c:\n"
              "    print('answer', c.submit(lambda x: x * 2, 21).result())\n")

    async def run_once() -> dict[str, Any]:
        job = {"apiVersion": API_VERSION, "kind": "DaskJob",
               "metadata": {"name": "answer", "namespace": "default"},
               "spec": {"job": {"script": script, "memory": "1GiB"},
                        "cluster": {"backend": "slurm", "scheduler": {"memory": "1GiB"},
                                    "worker": {"replicas": 1, "memory": "1GiB"}}}}
        await call(api.create_namespaced_custom_object, *JOBS, job)

        async def cluster_made() -> dict[str, Any] | None:
            try:
                return dict(await call(api.get_namespaced_custom_object, *ARGS, "answer"))
            except kubernetes.client.ApiException:
                return None
        cluster = await wait_until(cluster_made, 30, "the job's DaskCluster")
        owner = cluster["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "DaskJob" and owner["controller"] is True

        async def finished() -> dict[str, Any] | None:
            obj = await call(api.get_namespaced_custom_object, *JOBS, "answer")
            status = obj.get("status") or {}
            return obj if status.get("phase") in ("Succeeded", "Failed") else None
        obj = await wait_until(finished, 120, "the DaskJob to finish")
        status = obj["status"]
        assert status["phase"] == "Succeeded", status
        assert status["exitCode"] == 0 and status["clusterName"] == "answer"
        with open(status["outputFile"]) as f:
            assert "answer 42" in f.read()

        async def cluster_gone() -> bool:
            return await cluster_made() is None
        await wait_until(cluster_gone, 60, "the job's cluster to be deleted")
        for uid in (obj["metadata"]["uid"], cluster["metadata"]["uid"]):
            assert live_slurm_jobs(uid) == []
        return obj

    first = await run_once()
    await call(api.delete_namespaced_custom_object, *JOBS, "answer")

    async def job_gone() -> bool:
        try:
            await call(api.get_namespaced_custom_object, *JOBS, "answer")
        except kubernetes.client.ApiException as exc:
            return exc.status == 404
        return False
    await wait_until(job_gone, 60, "the DaskJob's finalizer")
    second = await run_once()
    assert second["metadata"]["uid"] != first["metadata"]["uid"]


async def test_autoscaler_scales_a_cluster_through_the_api(kube: StampingEmulator,
                                                           operator: None) -> None:
    """The autoscaler writes spec.worker.replicas through the API (what `kubectl scale`
    does); the cluster's own reconcile then submits. Its minimum lifts an empty cluster."""
    api = custom_objects(str(kube.url).rstrip("/"))
    call = asyncio.to_thread
    cluster = {"apiVersion": API_VERSION, "kind": "DaskCluster",
               "metadata": {"name": "elastic", "namespace": "default"},
               "spec": {"backend": "slurm", "scheduler": {"memory": "1GiB"},
                        "worker": {"replicas": 0, "memory": "1GiB"}}}
    scaler = {"apiVersion": API_VERSION, "kind": "DaskAutoscaler",
              "metadata": {"name": "elastic-as", "namespace": "default"},
              "spec": {"cluster": "elastic", "minimum": 1, "maximum": 3}}
    await call(api.create_namespaced_custom_object, *ARGS, cluster)
    await call(api.create_namespaced_custom_object, GROUP, VERSION, "default",
               "daskautoscalers", scaler)

    async def one_ready() -> dict[str, Any] | None:
        obj = await call(api.get_namespaced_custom_object, *ARGS, "elastic")
        ready = ((obj.get("status") or {}).get("workers") or {}).get("ready")
        return obj if obj["spec"]["worker"]["replicas"] == 1 and ready == 1 else None
    obj = await wait_until(one_ready, 120, "the autoscaler's minimum to be applied")
    assert obj["metadata"]["generation"] >= 1
    scaled = await call(api.get_namespaced_custom_object, GROUP, VERSION, "default",
                        "daskautoscalers", "elastic-as")
    assert scaled["status"]["desiredWorkers"] == 1
    assert "minimum is 1: 0 -> 1" in scaled["status"]["message"] or scaled["status"][
        "lastScaleTime"]
    uid = obj["metadata"]["uid"]
    await call(api.delete_namespaced_custom_object, *ARGS, "elastic")
    await wait_until(lambda: _no_jobs(uid), 60, "the cluster's jobs to end")


async def _no_jobs(uid: str) -> bool:
    return not live_slurm_jobs(uid)
