"""DaskAutoscaler on a real one-node SLURM with real Dask: bursts, idleness, per-group
targets, data safety while shrinking, and the idle timeout.

The objects live in `dask-hpc up`'s in-memory store (embedded.Session), reconciled by the
same code the kopf handlers call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from distributed import Client

from dask_hpc_operator.embedded import Resource, Session
from dask_hpc_operator.site_config import SiteConfig
from helpers import group_manifest, live_slurm_jobs, manifest, slurm_runtime, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]


def autoscaler(name: str, cluster: str, group: str = "default", minimum: int = 0,
               maximum: int = 4, delay: int = 5) -> dict[str, Any]:
    return {
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskAutoscaler",
        "metadata": {"name": name, "namespace": "it", "uid": str(uuid.uuid4()),
                     "generation": 1},
        "spec": {"cluster": cluster, "workerGroup": group, "minimum": minimum,
                 "maximum": maximum, "scaleDownDelay": delay},
    }


class Objects:
    """A session plus accessors by name, and every uid seen (for the leftover check)."""

    def __init__(self, site: SiteConfig, *bodies: dict[str, Any]) -> None:
        runtime, self.runner = slurm_runtime(site)
        self.resources = [Resource(b) for b in bodies]
        self.session = Session(runtime, self.resources)
        self.uids = {b["metadata"]["uid"] for b in bodies}
        self.said: dict[str, list[str]] = {}  # name -> every distinct status message

    def heard(self, name: str, fragment: str) -> bool:
        return any(fragment in m for m in self.said.get(name, []))

    def __getitem__(self, name: str) -> Resource:
        return next(r for r in self.resources if r.manifest["metadata"]["name"] == name)

    async def until(self, what: str, check: Any, timeout: float = 120) -> Any:
        async def step() -> Any:
            await self.session.step()
            for r in self.resources:
                said = self.said.setdefault(r.manifest["metadata"]["name"], [])
                if r.status.get("message") and r.status["message"] not in said[-1:]:
                    said.append(r.status["message"])
            return check()
        try:
            return await wait_until(step, timeout, what)
        except AssertionError as exc:
            states = {r.key: (r.manifest["spec"].get("worker", {}).get("replicas"),
                              r.status.get("phase"), r.status.get("message"))
                      for r in self.resources}
            raise AssertionError(f"{exc}; objects: {states}") from None

    def ready(self, name: str) -> int:
        return int((self[name].status.get("workers") or {}).get("ready", -1))

    def replicas(self, name: str) -> int:
        return int(self[name].manifest["spec"]["worker"]["replicas"])


@pytest.fixture
async def made() -> AsyncIterator[list[Objects]]:
    sessions: list[Objects] = []
    yield sessions
    for objects in sessions:
        for r in objects.resources:
            r.deleting = True
        for _ in range(60):  # paced as `dask-hpc up` paces its teardown
            await objects.session.step()
            if not objects.resources:
                break
            await asyncio.sleep(0.5)
        assert not any(live_slurm_jobs(uid) for uid in objects.uids)


# A lambda, so that it travels by value: the scheduler and workers (SLURM jobs) cannot
# import this module, and dask pickles module functions by reference.
slow = lambda i: time.sleep(1.0) or i  # noqa: E731


async def test_burst_scales_up_then_idleness_scales_back(site: SiteConfig,
                                                         made: list[Objects]) -> None:
    objs = Objects(site, manifest("burst", 0), autoscaler("burst-as", "burst", maximum=4))
    made.append(objs)
    await objs.until("scheduler up", lambda: objs["burst"].status.get("schedulerAddress"))
    async with Client(objs["burst"].status["schedulerAddress"], asynchronous=True) as client:
        futures = client.map(slow, range(40), pure=False)
        await objs.until("4 workers", lambda: objs.ready("burst") == 4)
        scaled_up = objs["burst-as"].status
        assert scaled_up["desiredWorkers"] == 4 and scaled_up["lastScaleTime"]
        assert objs.heard("burst-as", "40 tasks waiting for workers: 0 -> 4"), objs.said
        assert sorted(await client.gather(futures)) == list(range(40))
        del futures
    await objs.until("back to the minimum", lambda: objs.replicas("burst") == 0
                     and objs.ready("burst") == 0, timeout=90)
    assert objs.heard("burst-as", "idle for 5 s: 4 -> 0"), objs.said


async def test_scale_down_keeps_every_result(site: SiteConfig, made: list[Objects]) -> None:
    """Results persisted across 4 workers; the autoscaler shrinks to 1 after idleness, then
    replicas edits go up and down again: every key is still retrievable."""
    objs = Objects(site, manifest("keep", 4), autoscaler("keep-as", "keep", minimum=1,
                                                        maximum=4, delay=3))
    made.append(objs)
    await objs.until("4 workers", lambda: objs.ready("keep") == 4)
    async with Client(objs["keep"].status["schedulerAddress"], asynchronous=True) as client:
        futures = client.map(lambda i: bytes(10_000) + i.to_bytes(4, "big"), range(200),
                             pure=False)
        await client.gather(futures)
        holders = {w for ws in (await client.who_has(futures)).values() for w in ws}
        assert len(holders) > 1, "the results should be spread over several workers"
        await objs.until("shrunk to the minimum", lambda: objs.replicas("keep") == 1
                         and objs.ready("keep") == 1, timeout=90)
        results = await client.gather(futures)
        assert [r[-4:] for r in results] == [i.to_bytes(4, "big") for i in range(200)]
        # Now replicas edits (the autoscaler holds while within bounds and idle at minimum).
        objs.resources.remove(objs["keep-as"])
        for replicas in (3, 1):
            objs["keep"].manifest["spec"]["worker"]["replicas"] = replicas
            objs["keep"].manifest["metadata"]["generation"] += 1
            await objs.until(f"{replicas} workers", lambda r=replicas: objs.ready("keep") == r
                             and objs["keep"].status["phase"] == "Running")
        results = await client.gather(futures)
        assert [r[-4:] for r in results] == [i.to_bytes(4, "big") for i in range(200)]


async def test_gpu_tasks_scale_the_gpu_group_not_the_default(site: SiteConfig,
                                                             made: list[Objects]) -> None:
    """Tasks that need the abstract resource GPU scale the group that provides it. (No GPU
    here: `resources: {GPU: 1}` is Dask's abstract resource, which is what decides.)"""
    objs = Objects(site, manifest("mixed", 0),
                   group_manifest("gpu", "mixed", 0, resources={"GPU": 1}),
                   autoscaler("cpu-as", "mixed", maximum=3),
                   autoscaler("gpu-as", "mixed", group="gpu", maximum=3))
    made.append(objs)
    await objs.until("scheduler up", lambda: objs["mixed"].status.get("schedulerAddress"))
    async with Client(objs["mixed"].status["schedulerAddress"], asynchronous=True) as client:
        futures = client.map(slow, range(12), resources={"GPU": 1}, pure=False)
        seen_default: set[int] = set()

        def gpu_group_up() -> bool:
            seen_default.add(objs.replicas("mixed"))
            return objs.ready("gpu") >= 2
        await objs.until("GPU workers", gpu_group_up)
        assert sorted(await client.gather(futures)) == list(range(12))
        assert seen_default == {0}, "GPU tasks must not scale the default group"
        assert objs.heard("gpu-as", "12 tasks waiting for GPU workers: 0 -> "), objs.said
        workers = (await client.scheduler.identity())["workers"].values()
        assert all(".gpu." in w["name"] for w in workers)


async def test_idle_timeout_deletes_the_cluster(site: SiteConfig, made: list[Objects]) -> None:
    body = manifest("idle", 1)
    body["spec"]["idleTimeout"] = 5
    objs = Objects(site, body)
    made.append(objs)
    await objs.until("1 worker", lambda: objs.ready("idle") == 1)
    await objs.until("the cluster to delete itself", lambda: not objs.resources, timeout=60)
    assert live_slurm_jobs(body["metadata"]["uid"]) == []
