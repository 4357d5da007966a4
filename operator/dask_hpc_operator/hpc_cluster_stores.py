"""Where an `HPCCluster` keeps its objects: an embedded session, or the Kubernetes API.

`HPCCluster` speaks to one `ResourceStore` and never to a backend directly, so the Python
API behaves the same whoever reconciles:

- `StandaloneStore` runs `dask-hpc up`'s `Session` (the operator's own reconcilers over
  objects held in memory) in a thread with its own event loop. A thread of its own, not the
  Dask client's loop: a reconcile renders job scripts, writes files and waits on
  sbatch/squeue, and none of that may stall the client's communication with the scheduler,
  whether the user's code is synchronous or asynchronous. Every access to the objects runs
  on that loop (`_call`), so the stepping loop and the user's requests never race.
- `KubernetesStore` creates, patches and deletes the custom resources through the official
  `kubernetes` client; the operator reconciles them. Its blocking calls run in a worker
  thread so the Dask loop keeps serving the client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

from .constants import GROUP, KIND_CLUSTER, VERSION, plural
from .embedded import LOOP_PERIOD_S, TEARDOWN_TIMEOUT_S, Resource, Session, prepare
from .reconcile import Runtime
from .site_config import SiteConfig
from .validation import validate

log = logging.getLogger(__name__)
T = TypeVar("T")
KUBE_REQUEST_TIMEOUT_S = 30.0
KUBE_PROBE_TIMEOUT_S = 5.0


class HPCClusterError(Exception):
    """A cluster that cannot start, be changed or be ended as asked; the message says why.

    Deliberately not a RuntimeError: distributed's `Cluster.close` swallows RuntimeError
    (it takes it for a loop closed at interpreter exit), and jobs left behind must never be
    reported silently.
    """


class ObjectExists(HPCClusterError):
    """An object of that kind and name is already there (attach with `from_name`)."""


class ResourceStore(Protocol):
    """The operations HPCCluster needs, on either side."""

    mode: str  # "standalone" | "kubernetes"

    def start(self) -> None: ...

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]: ...

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def list_objects(self, kind: str, namespace: str) -> list[dict[str, Any]]: ...

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None: ...

    async def update_spec(self, kind: str, namespace: str, name: str,
                          spec: dict[str, Any]) -> None: ...

    async def delete(self, kind: str, namespace: str, name: str) -> None: ...

    def problem(self) -> str:
        """Why reconciling is failing right now, if this side knows ('' otherwise)."""
        ...

    async def close(self) -> list[str]:
        """Release the store; standalone: tear everything down first and return the ids
        of jobs whose end could not be confirmed (empty when none is left)."""
        ...

    def close_at_exit(self, namespace: str, name: str, timeout: float) -> None:
        """Interpreter exit: end the cluster without an event loop, as best it can."""
        ...


def _describe(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}"


class StandaloneStore:
    """The embedded `Session` in a background thread, stepped every LOOP_PERIOD_S."""

    mode = "standalone"

    def __init__(self, site: SiteConfig, teardown_timeout: float = TEARDOWN_TIMEOUT_S) -> None:
        self.site = site
        self.teardown_timeout = teardown_timeout
        self.resources: list[Resource] = []
        self._session: Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        # Resolved by the thread when it ends: the job ids whose end it could not confirm.
        self._done: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
        self._last_error = ""

    # --- the session's thread -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="dask-hpc-session",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._done.done():  # it could not even start: say why
            self._done.result()

    def _main(self) -> None:
        try:
            left = asyncio.run(self._run())
        except BaseException as exc:
            self._done.set_exception(exc)
        else:
            self._done.set_result(left)
        finally:
            self._started.set()

    async def _run(self) -> list[str]:
        self._loop = asyncio.get_running_loop()
        self._closing, self._wake = asyncio.Event(), asyncio.Event()
        self._session = Session(Runtime(self.site), self.resources)
        self._started.set()
        while not self._closing.is_set():
            try:
                await self._session.step()
                self._last_error = ""
            except Exception as exc:
                # Keep stepping: a batch system that fails now may answer next time, and
                # the start-up wait reports the error if it lasts.
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning("reconcile failed, retrying: %s", self._last_error, exc_info=True)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), LOOP_PERIOD_S)
        return await self._teardown()

    async def _teardown(self) -> list[str]:
        """Every object is deleted; returns the job ids still not ended at the deadline."""
        assert self._session is not None
        session = self._session
        pending = list(session.resources)
        for r in pending:
            r.deleting = True
        left: list[str] = []
        deadline = time.monotonic() + self.teardown_timeout
        while pending:
            still, left = [], []
            for r in pending:
                remaining = await session.teardown(r)
                if remaining:
                    still.append(r)
                    left += remaining
                elif r in session.resources:
                    session.resources.remove(r)
            pending = still
            if not pending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(1.0)
        for backend in session.clusters.runtime.backends.values():
            shutdown = getattr(backend, "shutdown", None)
            if shutdown is not None:
                await shutdown()  # local processes: wait until they have exited
        return sorted(set(left))

    async def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run `fn(*args)` on the session's loop and wait for it from the caller's loop."""
        loop = self._loop
        if loop is None or self._done.done() or loop.is_closed():
            raise HPCClusterError("this standalone cluster's session has ended")
        future = asyncio.run_coroutine_threadsafe(fn(*args), loop)
        return await asyncio.wrap_future(future)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()  # reconcile now rather than at the next period

    def _find(self, kind: str, namespace: str, name: str) -> Resource:
        assert self._session is not None
        found = self._session.store.find(namespace, name, kind)
        if found is None or found.deleting:
            raise LookupError(f"{_describe(kind, namespace, name)} does not exist")
        return found

    # --- operations, each run on the session's loop ---------------------------------------

    async def _create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        assert self._session is not None
        [resource] = prepare([manifest], None)
        meta = resource.manifest["metadata"]
        if self._session.store.find(meta["namespace"], meta["name"], resource.kind):
            raise ObjectExists(f"{_describe(resource.kind, meta['namespace'], meta['name'])} "
                               "already exists")
        if resource.kind == KIND_CLUSTER:
            self.resources.insert(0, resource)  # a group's reconcile reads its cluster's
        else:
            self.resources.append(resource)
        self._poke()
        return copy.deepcopy(resource.manifest)

    async def _get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert self._session is not None
        return copy.deepcopy(await self._session.store.get_object(kind, namespace, name))

    async def _list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        return [copy.deepcopy({**r.manifest, "status": r.status}) for r in self.resources
                if r.kind == kind and not r.deleting
                and r.manifest["metadata"]["namespace"] == namespace]

    async def _scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        found = self._find(kind, namespace, name)
        found.manifest["spec"]["worker"]["replicas"] = replicas
        found.manifest["metadata"]["generation"] += 1
        self._poke()

    async def _update_spec(self, kind: str, namespace: str, name: str,
                           spec: dict[str, Any]) -> None:
        found = self._find(kind, namespace, name)
        valid = validate({**found.manifest, "spec": spec})
        found.manifest["spec"] = valid["spec"]
        found.manifest["metadata"]["generation"] += 1
        self._poke()

    async def _delete(self, kind: str, namespace: str, name: str) -> None:
        assert self._session is not None
        found = self._session.store.find(namespace, name, kind)
        if found is not None:
            found.deleting = True  # the next step ends its jobs, then drops it
            self._poke()

    # --- ResourceStore --------------------------------------------------------------------

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self._create, manifest)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call(self._get, kind, namespace, name)

    async def list_objects(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        return await self._call(self._list, kind, namespace)

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        await self._call(self._scale, kind, namespace, name, replicas)

    async def update_spec(self, kind: str, namespace: str, name: str,
                          spec: dict[str, Any]) -> None:
        await self._call(self._update_spec, kind, namespace, name, spec)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        await self._call(self._delete, kind, namespace, name)

    def problem(self) -> str:
        return self._last_error

    def _stop(self) -> None:
        loop, closing = self._loop, self._closing
        if loop is not None and closing is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                loop.call_soon_threadsafe(closing.set)

    async def close(self) -> list[str]:
        if self._thread is None:
            return []
        self._stop()
        left = await asyncio.wrap_future(self._done)
        await asyncio.to_thread(self._thread.join)
        return left

    def close_at_exit(self, namespace: str, name: str, timeout: float) -> None:
        if self._thread is None or self._done.done():
            return
        self._stop()
        try:
            left = self._done.result(timeout)
        except concurrent.futures.TimeoutError:
            log.error("DaskCluster %s/%s: teardown did not finish within %.0f s at exit; "
                      "check the batch system for its jobs", namespace, name, timeout)
            return
        if left:
            log.error("DaskCluster %s/%s: could not confirm the end of jobs %s at exit",
                      namespace, name, ", ".join(left))


def _api_message(exc: ApiException) -> str:
    """The API server's own explanation (its Status object), else the HTTP reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


class KubernetesStore:
    """The custom resources through the Kubernetes API; the operator reconciles them."""

    mode = "kubernetes"

    def __init__(self, api: kubernetes.client.CustomObjectsApi) -> None:
        self.api = api
        self.server = str(getattr(api.api_client.configuration, "host", "?"))

    @classmethod
    def connect(cls, kube_config: str | os.PathLike[str] | None = None,
                context: str | None = None) -> KubernetesStore:
        """An API client from `kube_config` (a kubeconfig file), else the in-cluster
        service account, else the default kubeconfig. Never the process-wide default
        configuration, so a notebook's other Kubernetes clients are left alone."""
        try:
            if kube_config is not None or context is not None:
                client = kubernetes.config.new_client_from_config(
                    config_file=str(kube_config) if kube_config is not None else None,
                    context=context)
            else:
                config = kubernetes.client.Configuration()
                try:
                    kubernetes.config.load_incluster_config(client_configuration=config)
                except kubernetes.config.ConfigException:
                    kubernetes.config.load_kube_config(client_configuration=config)
                client = kubernetes.client.ApiClient(config)
        except (kubernetes.config.ConfigException, OSError, TypeError) as exc:
            raise HPCClusterError(f"no usable Kubernetes configuration: {exc} (pass "
                                  "kube_config=PATH, or kubernetes=False for a standalone "
                                  "cluster)") from exc
        return cls(kubernetes.client.CustomObjectsApi(client))

    @classmethod
    def detect(cls, namespace: str, kube_config: str | os.PathLike[str] | None = None,
               context: str | None = None) -> KubernetesStore | None:
        """`kubernetes="auto"`: a store if a configuration loads AND its API serves
        DaskClusters in `namespace`; None otherwise (the caller runs standalone)."""
        configured = (kube_config is not None or "KUBERNETES_SERVICE_HOST" in os.environ
                      or bool(os.environ.get("KUBECONFIG"))
                      or (Path.home() / ".kube" / "config").is_file())
        if not configured:
            return None
        try:
            store = cls.connect(kube_config, context)
            store.api.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural(KIND_CLUSTER), limit=1,
                _request_timeout=KUBE_PROBE_TIMEOUT_S)
        except Exception as exc:  # unreachable, refused, not served: all mean standalone
            log.warning("a Kubernetes configuration exists but its API does not serve "
                        "DaskClusters in %s (%s); running standalone", namespace, exc)
            return None
        return store

    def start(self) -> None:
        pass

    def _fail(self, what: str, exc: ApiException) -> HPCClusterError:
        hint = ""
        if exc.status == 404:
            hint = (f" (does {self.server} serve {GROUP}/{VERSION}? install the CRDs: "
                    "`dask-hpc crds | kubectl apply -f -`)")
        elif exc.status in (401, 403):
            hint = " (check your credentials and RBAC for the hpc.dask.org resources)"
        return HPCClusterError(f"{what}: {_api_message(exc)}{hint}")

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, _request_timeout=KUBE_REQUEST_TIMEOUT_S,
                                       **kwargs)

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        kind, namespace, name = manifest["kind"], meta["namespace"], meta["name"]
        try:
            await self._in_thread(self.api.create_namespaced_custom_object, GROUP, VERSION,
                                  namespace, plural(kind), manifest)
        except ApiException as exc:
            if exc.status == 409:
                raise ObjectExists(f"{_describe(kind, namespace, name)} already exists "
                                   "(attach to it with HPCCluster.from_name, or choose "
                                   "another name)") from exc
            raise self._fail(f"creating {_describe(kind, namespace, name)}", exc) from exc
        # Read it back: the uid is the server's (and kmock answers a create with no body).
        created = await self.get(kind, namespace, name)
        if created is None:
            raise HPCClusterError(f"{_describe(kind, namespace, name)} vanished right after "
                                  "it was created")
        return created

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = await self._in_thread(self.api.get_namespaced_custom_object, GROUP,
                                          VERSION, namespace, plural(kind), name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._fail(f"reading {_describe(kind, namespace, name)}", exc) from exc
        return found if isinstance(found, dict) else None

    async def list_objects(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        try:
            found = await self._in_thread(self.api.list_namespaced_custom_object, GROUP,
                                          VERSION, namespace, plural(kind))
        except ApiException as exc:
            raise self._fail(f"listing {plural(kind)} in {namespace}", exc) from exc
        items = found.get("items") if isinstance(found, dict) else None
        return [i for i in items or [] if isinstance(i, dict)]

    async def _patch(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> None:
        try:
            await self._in_thread(self.api.patch_namespaced_custom_object, GROUP, VERSION,
                                  namespace, plural(kind), name, body)
        except ApiException as exc:
            if exc.status == 404:
                raise LookupError(f"{_describe(kind, namespace, name)} does not exist") \
                    from exc
            raise self._fail(f"patching {_describe(kind, namespace, name)}", exc) from exc

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        """What `kubectl scale` writes through the scale subresource's specReplicasPath
        (a merge patch of that field: kmock has no scale subresource)."""
        await self._patch(kind, namespace, name, {"spec": {"worker": {"replicas": replicas}}})

    async def update_spec(self, kind: str, namespace: str, name: str,
                          spec: dict[str, Any]) -> None:
        await self._patch(kind, namespace, name, {"spec": spec})

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._in_thread(self.api.delete_namespaced_custom_object, GROUP, VERSION,
                                  namespace, plural(kind), name)
        except ApiException as exc:
            if exc.status != 404:
                raise self._fail(f"deleting {_describe(kind, namespace, name)}", exc) from exc

    def problem(self) -> str:
        return ""

    async def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """A Secret's `data` (a TLS cluster's credentials, for a client that cannot read
        the operator's files)."""
        core = kubernetes.client.CoreV1Api(self.api.api_client)
        try:
            found = await self._in_thread(core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            raise self._fail(f"reading Secret {namespace}/{name}", exc) from exc
        return {str(k): v if isinstance(v, str) else v.decode()
                for k, v in (found.data or {}).items()}

    async def close(self) -> list[str]:
        await asyncio.to_thread(self.api.api_client.close)
        return []

    def close_at_exit(self, namespace: str, name: str, timeout: float) -> None:
        """Ask for the deletion; the operator ends the jobs (no waiting at exit)."""
        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, namespace,
                                                     plural(KIND_CLUSTER), name,
                                                     _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 404:
                log.error("could not delete DaskCluster %s/%s at exit: %s", namespace, name,
                          _api_message(exc))
        except Exception as exc:  # the API unreachable at exit: say so, never raise there
            log.error("could not delete DaskCluster %s/%s at exit: %s", namespace, name, exc)
