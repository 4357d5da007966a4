"""A Kubernetes API over real HTTP (kmock's emulator) and the operator run against it by kopf.

No kube-apiserver, kind or container engine can run on these machines (DESIGN.md §7), so
the API server is kmock's stateful emulator. Where it differs from a real API server the
subclass below makes it closer, and the tests say so where it matters:
- kmock assigns no uid/resourceVersion/creationTimestamp and ignores generateName; kopf's
  optimistic-concurrency patches need a changing resourceVersion, and its events need
  generated names. `StampingEmulator` adds these.
- kmock does not emulate the scale subresource or validate against CRD schemas: the tests
  scale by patching spec.worker.replicas (what `kubectl scale` does through the scale
  subresource's specReplicasPath) and rely on the operator's own validation.
- Listing namespaces fails in kmock 0.8, so kopf runs cluster-wide with scanning off.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jsonpatch
import kmock
import kopf
import kubernetes
import pytest

from dask_hpc_operator.constants import GROUP, NAMES, VERSION
from dask_hpc_operator.handlers import build_registry
from dask_hpc_operator.kube_store import KubeClusterStore
from dask_hpc_operator.metrics import OperatorMetrics
from dask_hpc_operator.reconcile import Runtime


class StampingEmulator(kmock.KubernetesEmulator):
    """Stamps metadata the way an API server does; returns 422 on a failed patch test."""

    _versions = itertools.count(1000)

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        if request.resource is not None and request.subresource in (None, "status"):
            if request.action == kmock.action.CREATE and isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta["resourceVersion"] = str(next(self._versions))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp",
                                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            elif request.action == kmock.action.UPDATE and isinstance(data, dict):
                data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
            elif request.action == kmock.action.UPDATE and isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion",
                             "value": str(next(self._versions))})
        return await super()._handle(request)

    async def _render_error(self, exc: Exception) -> Any:
        if isinstance(exc, jsonpatch.JsonPatchTestFailed):
            exc = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
        return await super()._render_error(exc)


@pytest.fixture
async def kube() -> AsyncIterator[StampingEmulator]:
    async with StampingEmulator() as emulator, kmock.Server(emulator):
        for kind, (plural, singular, short) in NAMES.items():
            emulator.resources[f"{GROUP}/{VERSION}/{plural}"] = kmock.ResourceInfo(
                kind=kind, singular=singular, namespaced=True, shortnames=set(short),
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                subresources={"status", "scale"})
        # kopf waits for these two in discovery before it starts.
        emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs={"get", "list", "watch"})
        emulator.resources["v1/events"] = kmock.ResourceInfo(
            kind="Event", namespaced=True, verbs={"create", "get", "list"})
        yield emulator


def _settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.watching.connect_timeout = 1
    settings.networking.request_timeout = 10
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 2
    settings.background.instant_exit_timeout = 1
    return settings


def run_operator(url: str, runtime: Runtime,
                 metrics: OperatorMetrics | None = None) -> Iterator[None]:
    """kopf in its own thread and event loop (kopf cancels foreign tasks of its loop on
    exit, which would include pytest-asyncio's). `metrics` is handed to the handlers as the
    CLI hands it (the test serves it itself)."""
    store = KubeClusterStore(custom_objects(url))
    registry = build_registry(runtime, kopf.OperatorRegistry(), timer_interval=1.0, store=store,
                              metrics=metrics)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True, default_namespace="default")

    ready, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(kopf.operator(registry=registry, settings=_settings(), clusterwide=True,
                                      standalone=True, ready_flag=ready, stop_flag=stop))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, name="kopf", daemon=True)
    thread.start()
    assert ready.wait(15), f"kopf did not start: {errors}"
    yield
    stop.set()
    thread.join(15)
    assert not thread.is_alive(), "kopf did not stop"
    assert not errors, errors


def custom_objects(url: str) -> kubernetes.client.CustomObjectsApi:
    config = kubernetes.client.Configuration(host=url)
    return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(config))
