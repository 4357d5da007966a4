"""A Kubernetes API over real HTTP (kmock's emulator) and this operator run against it by
kopf, for the kopf path of section 1.

Copied, at its minimum, from tests/e2e/kube_emulator.py (the end-to-end tests' emulator),
rather than imported: that module is a pytest fixture module whose imports follow the
tests' needs, and a benchmark must not break when a test helper changes. What it does and
why is explained there; in short, no kube-apiserver can run on these machines (DESIGN.md
section 7), kmock's emulator stores objects and serves watches over HTTP, the subclass
stamps uid/resourceVersion/generation as an API server would (kopf's finalizer patches
need them), and kopf runs cluster-wide in its own thread and event loop.

What the benchmark changes: nothing in kopf's or the operator's behaviour. kopf's timer
runs every 1 s (as in the end-to-end tests) and the site's minPollInterval is the one of
the run (bench.common.FAST_MIN_POLL_S), the same periods as the embedded operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jsonpatch
import kmock
import kopf
import kubernetes

from dask_hpc_operator.constants import GROUP, NAMES, VERSION
from dask_hpc_operator.handlers import build_registry
from dask_hpc_operator.kube_store import KubeClusterStore
from dask_hpc_operator.reconcile import Runtime

KOPF_TIMER_S = 1.0


class StampingEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
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


@contextlib.asynccontextmanager
async def emulator() -> AsyncIterator[str]:
    """The API server, on this event loop; yields its URL."""
    async with StampingEmulator() as api, kmock.Server(api):
        for kind, (plural, singular, short) in NAMES.items():
            api.resources[f"{GROUP}/{VERSION}/{plural}"] = kmock.ResourceInfo(
                kind=kind, singular=singular, namespaced=True, shortnames=set(short),
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                subresources={"status", "scale"})
        # kopf waits for these two in discovery before it starts.
        api.resources["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs={"get", "list", "watch"})
        api.resources["v1/events"] = kmock.ResourceInfo(
            kind="Event", namespaced=True, verbs={"create", "get", "list"})
        yield str(api.url).rstrip("/")


def custom_objects(url: str) -> kubernetes.client.CustomObjectsApi:
    config = kubernetes.client.Configuration(host=url)
    return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(config))


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


class KopfOperator:
    """The operator under kopf, in its own thread and event loop (kopf cancels foreign
    tasks of its loop on exit), against the emulator at `url`."""

    def __init__(self, url: str, runtime: Runtime) -> None:
        store = KubeClusterStore(custom_objects(url))
        self.registry = build_registry(runtime, kopf.OperatorRegistry(),
                                       timer_interval=KOPF_TIMER_S, store=store)

        @kopf.on.login(registry=self.registry)  # type: ignore[untyped-decorator]
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True, default_namespace="default")

        self.ready, self.stop_flag = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._main, name="kopf", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(kopf.operator(registry=self.registry, settings=_settings(),
                                      clusterwide=True, standalone=True,
                                      ready_flag=self.ready, stop_flag=self.stop_flag))
        except BaseException as exc:
            self.errors.append(exc)

    async def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        if not await asyncio.to_thread(self.ready.wait, timeout):
            raise RuntimeError(f"kopf did not start within {timeout:.0f} s: {self.errors}")

    async def stop(self, timeout: float = 15.0) -> list[str]:
        """Stop kopf; returns problems (it did not stop, or it had failed)."""
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, timeout)
        problems = [f"kopf failed: {e!r}" for e in self.errors]
        if self.thread.is_alive():
            problems.append(f"kopf did not stop within {timeout:.0f} s")
        return problems


def quiet_kopf() -> None:
    """kopf logs every handler call at INFO; the benchmark's output is its table."""
    for name in ("kopf", "kopf.objects", "kopf.activities"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
