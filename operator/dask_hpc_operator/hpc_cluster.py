"""`HPCCluster`: a Dask cluster on SLURM or PBS from Python, used like Dask's own clusters.

Users of dask-jobqueue and dask-kubernetes expect `cluster = XCluster(...)`,
`Client(cluster)`, `cluster.scale(n)`, `cluster.adapt(...)` and a notebook card showing the
workers and the dashboard. This class gives them that while every decision stays the
operator's: it only writes the same objects a manifest would (a DaskCluster, DaskWorkerGroups,
DaskAutoscalers) and reads their status, so scaling down still retires workers through Dask
before cancelling their jobs, and `kubectl get dhc` shows what a notebook started.

Two places run the reconcile (`hpc_cluster_stores`): standalone, `dask-hpc up`'s embedded
session in a background thread of this process (the default without a Kubernetes
configuration); or the operator, through the Kubernetes API (`kubernetes=True`).

It subclasses `distributed.deploy.cluster.Cluster`, which brings `scheduler_info` (kept
current by the scheduler's worker-status stream), `Client(cluster)`, `wait_for_workers`,
`get_logs` and the HTML card, and the sync/async convention of Dask's clusters: in a
synchronous program every method blocks on a private event loop; with `asynchronous=True`
the methods are awaitable and `await HPCCluster(...)` starts it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import html
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from distributed.core import Status, rpc
from distributed.deploy.cluster import Cluster
from distributed.objects import SchedulerInfo
from distributed.security import Security

from . import crd_schema, tls
from .constants import (
    API_VERSION,
    DEFAULT_GROUP_NAME,
    KIND_AUTOSCALER,
    KIND_CLUSTER,
    KIND_WORKER_GROUP,
    LABEL_CLUSTER,
)
from .embedded import TEARDOWN_TIMEOUT_S
from .hpc_cluster_stores import (
    HPCClusterError,
    KubernetesStore,
    ObjectExists,
    ResourceStore,
    StandaloneStore,
)
from .queue_reasons import explain, waiting_reason
from .site_config import SiteConfig
from .validation import ManifestError, matches, validate

__all__ = ["ClusterStartTimeout", "HPCCluster", "HPCClusterError", "ObjectExists",
           "autoscaler_manifest", "cluster_manifest", "worker_group_manifest"]

log = logging.getLogger(__name__)

# Keyword shortcut -> worker template field (the CRD's camelCase).
WORKER_FIELDS: dict[str, str] = {
    "cores": "cores", "memory": "memory", "processes": "processes", "walltime": "walltime",
    "queue": "queue", "account": "account", "gpus": "gpus", "env": "env",
    "prologue": "prologue", "extra_directives": "extraDirectives",
    "worker_args": "workerArgs", "resources": "resources", "cuda": "cuda",
    "packing": "packing", "replicas": "replicas",
}
# The shortcuts that place the scheduler's job too: a site that requires an account or a
# partition requires it of every job, and a scheduler that ends before its workers' walltime
# ends the cluster. `scheduler=` overrides them.
SCHEDULER_SHARED = ("queue", "account", "walltime")

START_TIMEOUT_S = 600.0  # a busy queue can hold the scheduler job for long; say so, then stop
STATUS_PERIOD_S = 1.0
STATUS_RPC_TIMEOUT_S = 10.0


class ClusterStartTimeout(HPCClusterError, TimeoutError):
    """The scheduler was not ready in time; the message carries the cluster's last status
    (for a queued job, the batch system's reason)."""


# --- manifests ---------------------------------------------------------------------------

def _env_list(env: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Any]:
    """`{"OMP_NUM_THREADS": 1}` or the CRD's `[{name, value}]`; numbers become strings."""
    if isinstance(env, Mapping):
        return [{"name": k, "value": str(v) if isinstance(v, (int, float))
                 and not isinstance(v, bool) else v} for k, v in env.items()]
    return [dict(item) for item in env]


def worker_spec(worker: Mapping[str, Any] | None = None, **shortcuts: Any) -> dict[str, Any]:
    """A worker template from `worker=` (CRD field names) and keyword shortcuts (snake_case).
    A field given both ways is an error rather than a silent override."""
    unknown = sorted(set(shortcuts) - set(WORKER_FIELDS))
    if unknown:
        raise TypeError(f"unknown worker option {unknown[0]}=; known: "
                        + ", ".join(sorted(WORKER_FIELDS)))
    spec = dict(worker or {})
    for key, value in shortcuts.items():
        if value is None:
            continue
        field = WORKER_FIELDS[key]
        if key == "env":
            value = _env_list(value)
        elif isinstance(value, (tuple, list)):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        if field in spec and spec[field] != value:
            raise ValueError(f"{key}= and worker[{field!r}] are both given (with different "
                             "values); pass one of them")
        spec[field] = value
    return spec


def _validated(manifest: dict[str, Any], given: Mapping[str, str]) -> dict[str, Any]:
    """validate(), with the keyword a bad value came from named next to its field."""
    try:
        validate(manifest)
    except ManifestError as exc:
        for path, keyword in given.items():
            if exc.field == path or exc.field.startswith((path + ".", path + "[")):
                raise ManifestError(exc.field, f"{exc.message} (from {keyword}=)",
                                    exc.fix) from None
        raise
    return manifest


def _shortcut_paths(prefix: str, shortcuts: Mapping[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{WORKER_FIELDS[k]}": k for k, v in shortcuts.items()
            if v is not None and k in WORKER_FIELDS}


def cluster_manifest(name: str, namespace: str = "default", *, backend: str | None = None,
                     worker: Mapping[str, Any] | None = None,
                     scheduler: Mapping[str, Any] | None = None,
                     idle_timeout: int | None = None, profile: str | None = None,
                     **shortcuts: Any) -> dict[str, Any]:
    """The DaskCluster an HPCCluster creates, checked exactly as the operator checks it
    (a bad value raises ManifestError naming the field, e.g. `spec.worker.memory`).

    `replicas` defaults to 0. `queue=`, `account=` and `walltime=` place the scheduler's
    job too unless `scheduler=` sets them; inside `worker=` they concern workers only."""
    worker_doc = worker_spec(worker, **shortcuts)
    worker_doc.setdefault("replicas", 0)
    scheduler_doc = dict(scheduler or {})
    given = _shortcut_paths("spec.worker", shortcuts)
    for key in SCHEDULER_SHARED:
        if shortcuts.get(key) is not None and WORKER_FIELDS[key] not in scheduler_doc:
            scheduler_doc[WORKER_FIELDS[key]] = shortcuts[key]
            given[f"spec.scheduler.{WORKER_FIELDS[key]}"] = key
    spec: dict[str, Any] = {"scheduler": scheduler_doc, "worker": worker_doc}
    for key, value in (("backend", backend), ("idleTimeout", idle_timeout),
                       ("profile", profile)):
        if value is not None:
            spec[key] = value
    given.update({"spec.backend": "backend", "spec.idleTimeout": "idle_timeout",
                  "spec.profile": "profile", "metadata.name": "name",
                  "metadata.namespace": "namespace"})
    return _validated({"apiVersion": API_VERSION, "kind": KIND_CLUSTER,
                       "metadata": {"name": name, "namespace": namespace},
                       "spec": spec}, given)


def worker_group_manifest(name: str, namespace: str, cluster: str, *,
                          worker: Mapping[str, Any] | None = None,
                          **shortcuts: Any) -> dict[str, Any]:
    """A DaskWorkerGroup of `cluster`, checked like cluster_manifest."""
    if name == DEFAULT_GROUP_NAME:
        raise ValueError(f"{DEFAULT_GROUP_NAME!r} is the cluster's own worker group: scale it "
                         "with scale(n), or give the new group another name")
    worker_doc = worker_spec(worker, **shortcuts)
    worker_doc.setdefault("replicas", 0)
    given = {**_shortcut_paths("spec.worker", shortcuts), "metadata.name": "name"}
    return _validated({"apiVersion": API_VERSION, "kind": KIND_WORKER_GROUP,
                       "metadata": {"name": name, "namespace": namespace,
                                    "labels": {LABEL_CLUSTER: cluster}},
                       "spec": {"cluster": cluster, "worker": worker_doc}}, given)


def autoscaler_name(cluster: str, group: str) -> str:
    """Deterministic, so a second adapt() finds the first; a DNS label of at most 63."""
    name = f"{cluster}-{group}-autoscaler"
    if len(name) <= 63:
        return name
    digest = hashlib.sha1(f"{cluster}/{group}".encode()).hexdigest()[:10]
    return f"{cluster[:40].rstrip('-')}-as-{digest}"


def _schema_default(kind: str, field: str) -> Any:
    return crd_schema.object_schema(kind)["properties"]["spec"]["properties"][field]["default"]


def autoscaler_manifest(cluster: str, namespace: str, group: str, minimum: int, maximum: int,
                        scale_down_delay: int | None = None) -> dict[str, Any]:
    """A DaskAutoscaler for one group. Every spec field is written out (scaleDownDelay
    included) so that updating an existing one replaces its whole spec."""
    delay = scale_down_delay if scale_down_delay is not None else _schema_default(
        KIND_AUTOSCALER, "scaleDownDelay")
    return _validated({
        "apiVersion": API_VERSION, "kind": KIND_AUTOSCALER,
        "metadata": {"name": autoscaler_name(cluster, group), "namespace": namespace,
                     "labels": {LABEL_CLUSTER: cluster}},
        "spec": {"cluster": cluster, "workerGroup": group, "minimum": minimum,
                 "maximum": maximum, "scaleDownDelay": delay},
    }, {"spec.minimum": "minimum", "spec.maximum": "maximum",
        "spec.scaleDownDelay": "scale_down_delay", "spec.workerGroup": "group"})


def _check_count(what: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= crd_schema.MAX_REPLICAS:
        raise ValueError(f"{what} must be a whole number from 0 to {crd_schema.MAX_REPLICAS}, "
                         f"not {n!r}")
    return n


def _choose_store(kubernetes: bool | Literal["auto"], kube_config: str | os.PathLike[str] | None,
                  kube_context: str | None, site_config: SiteConfig | str | os.PathLike[str] | None,
                  namespace: str, attach: bool, close_timeout: float) -> ResourceStore:
    """kubernetes=True: the API (site_config then makes no sense: the operator's applies).
    "auto": the API if a configuration loads and serves DaskClusters, unless site_config
    is given (that asks for standalone). False: standalone."""
    if kubernetes not in (True, False, "auto"):
        raise ValueError(f"kubernetes must be True, False or 'auto', not {kubernetes!r}")
    explicit = kubernetes is True or (kubernetes == "auto" and (kube_config or kube_context))
    if explicit:
        if site_config is not None:
            raise ValueError("site_config= configures a standalone cluster; under Kubernetes "
                             "the operator's site configuration applies")
        return KubernetesStore.connect(kube_config, kube_context)
    if kubernetes == "auto" and site_config is None:
        found = KubernetesStore.detect(namespace)
        if found is not None:
            return found
    if attach:
        raise ValueError("from_name attaches to a DaskCluster through the Kubernetes API; "
                         "standalone clusters live only in the process that started them")
    site = site_config if isinstance(site_config, SiteConfig) else SiteConfig.load(site_config)
    return StandaloneStore(site, close_timeout)


# --- interpreter exit --------------------------------------------------------------------

@dataclass
class _ExitRecord:
    """What the exit hook needs of one cluster, without the cluster object: one dropped
    without close() is gone from memory, but its jobs are not, and a standalone session is
    the only thing that would end them."""

    store: ResourceStore
    namespace: str
    name: str
    timeout: float
    delete: bool = False  # Kubernetes: only once this object created (or owns) it


_OPEN: dict[int, _ExitRecord] = {}
_OPEN_LOCK = threading.Lock()


@atexit.register
def _close_at_exit() -> None:
    with _OPEN_LOCK:
        records = list(_OPEN.values())
        _OPEN.clear()
    for r in records:
        if r.store.mode == "standalone" or r.delete:
            r.store.close_at_exit(r.namespace, r.name, r.timeout)


# --- the cluster -------------------------------------------------------------------------

class HPCCluster(Cluster):
    """A Dask cluster whose scheduler and workers are SLURM/PBS (or local) jobs.

    >>> cluster = HPCCluster("analysis", backend="slurm", queue="debug", cores=4,
    ...                      memory="16GiB", walltime="02:00:00", replicas=2)
    >>> client = Client(cluster)
    >>> cluster.scale(8); cluster.adapt(minimum=0, maximum=16)
    >>> cluster.close()   # every job ended (standalone: waits until none is left)

    Worker options are keyword shortcuts (cores, memory, processes, walltime, queue,
    account, gpus, env, resources, and prologue, extra_directives, worker_args, cuda,
    packing) or `worker={...}` with the CRD's field names. `kubernetes="auto"` (default)
    uses the Kubernetes API when a configuration loads and serves DaskClusters, otherwise
    runs the reconcile in this process with `site_config` (a SiteConfig, a path, or None for
    $DASK_HPC_CONFIG / the defaults). The constructor returns once the scheduler answers, or
    raises (ClusterStartTimeout after `timeout` s, with the queue's reason) after deleting
    what it created.
    """

    def __init__(self, name: str | None = None, namespace: str = "default", *,
                 backend: str | None = None, replicas: int | None = None,
                 cores: int | None = None, memory: str | None = None,
                 processes: int | None = None, walltime: str | None = None,
                 queue: str | None = None, account: str | None = None,
                 gpus: int | None = None,
                 env: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                 resources: Mapping[str, float] | None = None,
                 worker: Mapping[str, Any] | None = None,
                 scheduler: Mapping[str, Any] | None = None,
                 idle_timeout: int | None = None, profile: str | None = None,
                 kubernetes: bool | Literal["auto"] = "auto",
                 kube_config: str | os.PathLike[str] | None = None,
                 kube_context: str | None = None,
                 site_config: SiteConfig | str | os.PathLike[str] | None = None,
                 timeout: float = START_TIMEOUT_S, close_timeout: float = TEARDOWN_TIMEOUT_S,
                 shutdown_on_close: bool = True, asynchronous: bool = False,
                 loop: Any = None, quiet: bool = False, _attach: bool = False,
                 **worker_options: Any) -> None:
        self.namespace = namespace
        # A TLS cluster's client credentials, once known (`Client(cluster)` and
        # `get_client()` read this attribute, as they do of Dask's own clusters).
        self.security: Security | None = None
        if _attach:
            if name is None or not matches(crd_schema.DNS_LABEL, name):
                raise ManifestError("metadata.name", f"{name!r} is not a valid name",
                                    "give the name of an existing DaskCluster")
            self._manifest: dict[str, Any] | None = None
        else:
            name = name or f"hpc-{uuid.uuid4().hex[:8]}"
            self._manifest = cluster_manifest(
                name, namespace, backend=backend, worker=worker, scheduler=scheduler,
                idle_timeout=idle_timeout, profile=profile, replicas=replicas, cores=cores,
                memory=memory, processes=processes, walltime=walltime, queue=queue,
                account=account, gpus=gpus, env=env, resources=resources, **worker_options)
        store = _choose_store(kubernetes, kube_config, kube_context, site_config, namespace,
                              _attach, close_timeout)
        if store.mode == "standalone" and not shutdown_on_close:
            raise ValueError("a standalone cluster lives in this process and ends with it; "
                             "use kubernetes=True to keep a cluster after close()")
        self._store = store
        self.shutdown_on_close = shutdown_on_close
        self._timeout = timeout
        self._close_timeout = close_timeout
        self.uid = ""  # the DaskCluster's, once created or found
        self.resource_status: dict[str, Any] = {}  # its status, refreshed every second
        self._created = False
        self._owned: list[tuple[str, str]] = []  # (kind, name) of groups/autoscalers made here
        self._adaptive_groups: dict[str, tuple[int, int]] = {}
        self._status_task: asyncio.Future[None] | None = None
        self._start_task: asyncio.Task[Any] | None = None
        self._said = ""
        super().__init__(asynchronous=asynchronous, loop=loop, quiet=quiet, name=name)
        self._exit = _ExitRecord(store, namespace, name, close_timeout)
        with _OPEN_LOCK:
            _OPEN[id(self)] = self._exit
        if not self.called_from_running_loop:
            self._loop_runner.start()
            try:
                self.sync(self._start)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    # Ctrl-C while waiting (SystemExit where dask-jobqueue's import replaced
                    # the SIGINT handler): end what the start created before the loop stops,
                    # or its jobs would outlive the interruption.
                    with contextlib.suppress(BaseException):
                        self.sync(self._interrupted, callback_timeout=close_timeout + 30)
                self._loop_runner.stop()
                raise

    @classmethod
    def from_name(cls, name: str, namespace: str = "default", *,
                  kube_config: str | os.PathLike[str] | None = None,
                  kube_context: str | None = None, timeout: float = START_TIMEOUT_S,
                  shutdown_on_close: bool = False, asynchronous: bool = False,
                  loop: Any = None, quiet: bool = False) -> HPCCluster:
        """Attach to an existing DaskCluster through the Kubernetes API (one created by
        kubectl, GitOps or another HPCCluster). close() then only disconnects, unless
        `shutdown_on_close=True`."""
        return cls(name, namespace, kubernetes=True, kube_config=kube_config,
                   kube_context=kube_context, timeout=timeout,
                   shutdown_on_close=shutdown_on_close, asynchronous=asynchronous, loop=loop,
                   quiet=quiet, _attach=True)

    # --- what the notebook and `repr` show -----------------------------------------------

    @property
    def mode(self) -> str:
        """Who reconciles this cluster: "standalone" (this process) or "kubernetes"."""
        return self._store.mode

    @property
    def phase(self) -> str:
        return str(self.resource_status.get("phase") or "")

    @property
    def dashboard_link(self) -> str:
        link = super().dashboard_link
        return str(link or self.resource_status.get("dashboardURL") or "")

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        s = self.resource_status
        workers = s.get("workers") or {}
        esc = html.escape
        cell = '<td style="text-align: left;">'
        rows = (
            f"<tr>{cell}<strong>Phase:</strong> {esc(str(s.get('phase') or '-'))}</td>"
            f"{cell}<strong>Ready / desired:</strong> {workers.get('ready', 0)} / "
            f"{workers.get('desired', 0)}</td></tr>"
            f"<tr>{cell}<strong>Backend:</strong> {esc(str(s.get('backend') or '-'))} "
            f"({esc(self.mode)})</td>{cell}<strong>Scheduler job:</strong> "
            f"{esc(str(s.get('schedulerJobId') or '-'))}</td></tr>"
            f'<tr><td colspan="2" style="text-align: left;"><strong>Status:</strong> '
            f"{esc(str(s.get('message') or '-'))}</td></tr>")
        return str(super()._repr_html_(cluster_status=rows + (cluster_status or "")))

    def _scaling_status(self) -> str:
        workers = self.resource_status.get("workers") or {}
        if self._adaptive_groups:
            mode = "Adaptive (DaskAutoscaler: " + ", ".join(
                f"{g} {lo}-{hi}" for g, (lo, hi) in sorted(self._adaptive_groups.items())) + ")"
        else:
            mode = "Manual"
        return (f'<table><tr><td style="text-align: left;">Scaling mode: {html.escape(mode)}'
                f'</td></tr><tr><td style="text-align: left;">Workers: '
                f"{workers.get('ready', 0)} / {workers.get('desired', 0)}</td></tr></table>")

    def _say(self, line: str) -> None:
        """Each change of what the start waits for goes to the cluster's log, which Dask's
        Cluster also prints unless `quiet=True` (a notebook shows it under the cell); a
        queued job's reason is explained in plain words, so a long wait never looks hung."""
        if line and line != self._said:
            self._said = line
            reason = waiting_reason(line)
            why = explain(reason) if reason else None
            text = f"DaskCluster {self.namespace}/{self.name}: {line}" + (
                f" ({why})" if why else "")
            self._log(text)

    # --- start ---------------------------------------------------------------------------

    def __await__(self) -> Any:
        async def _() -> HPCCluster:
            if self.status == Status.created:
                await self._start()
            return self
        return _().__await__()

    async def _start(self) -> None:
        while self.status == Status.starting:  # a second awaiter waits for the first
            await asyncio.sleep(0.1)
        if self.status != Status.created:
            return
        self.status = Status.starting
        self._start_task = asyncio.current_task()
        try:
            self._store.start()
            if self._manifest is None:
                found = await self._store.get(KIND_CLUSTER, self.namespace, self.name)
                if found is None:
                    raise HPCClusterError(f"DaskCluster {self.namespace}/{self.name} does "
                                          "not exist")
            else:
                found = await self._store.create(self._manifest)
                self._created = True
            self.uid = str(found["metadata"].get("uid") or "")
            self._exit.delete = self.shutdown_on_close
            status = await self._wait_for_scheduler()
            self.security = await self._credentials(status)
            self.scheduler_comm = self._rpc(status["schedulerAddress"])
            await self._connected()
            if self._manifest is None:
                for scaler in await self._store.list_objects(KIND_AUTOSCALER, self.namespace):
                    spec = scaler.get("spec") or {}
                    if spec.get("cluster") == self.name:
                        self._adaptive_groups[spec.get("workerGroup", DEFAULT_GROUP_NAME)] = (
                            spec.get("minimum", 0), spec.get("maximum", 0))
        except BaseException as exc:
            # Shielded: a cancellation (Ctrl-C) must not cut the cleanup short.
            cleanup = await asyncio.shield(self._abandon())
            if isinstance(exc, ClusterStartTimeout):
                raise ClusterStartTimeout(f"{exc}{cleanup}") from None
            if isinstance(exc, HPCClusterError) and not isinstance(exc, ObjectExists):
                raise HPCClusterError(f"{exc}{cleanup}") from None
            raise
        self._status_task = asyncio.ensure_future(self._follow_status())

    async def _interrupted(self) -> None:
        """Stop a start that was interrupted and wait until its cleanup has run."""
        if self.status == Status.running:
            await self._close()
        task = self._start_task
        if task is not None and not task.done():
            task.cancel()
        while self.status != Status.closed:
            await asyncio.sleep(0.1)

    def _progress(self, status: dict[str, Any]) -> str:
        phase = status.get("phase")
        if phase:
            text = f"{phase}: {status.get('message', '')}"
        elif self.mode == "kubernetes":
            text = ("no status yet: is the dask-hpc operator running and watching namespace "
                    f"{self.namespace}?")
        else:
            text = "not reconciled yet"
        problem = self._store.problem()
        return text + (f"; last reconcile error: {problem}" if problem else "")

    async def _wait_for_scheduler(self) -> dict[str, Any]:
        deadline = time.monotonic() + self._timeout
        what = f"DaskCluster {self.namespace}/{self.name}"
        while True:
            found = await self._store.get(KIND_CLUSTER, self.namespace, self.name)
            if found is None or (found.get("metadata") or {}).get("deletionTimestamp"):
                raise HPCClusterError(f"{what} was deleted before its scheduler was ready")
            status = found.get("status") or {}
            self.resource_status = status
            if status.get("schedulerAddress"):
                self._say(f"scheduler ready at {status['schedulerAddress']}")
                return status
            if status.get("phase") == "Failed":
                raise HPCClusterError(f"{what} failed: {status.get('message', '')}")
            self._say(self._progress(status) if status.get("phase") else "")
            if time.monotonic() >= deadline:
                raise ClusterStartTimeout(f"{what}: no scheduler after {self._timeout:g} s "
                                          f"({self._progress(status)})")
            await asyncio.sleep(STATUS_PERIOD_S)

    def _rpc(self, address: str) -> rpc:
        return rpc(address, connection_args=tls.connection_args(self.security))

    async def _credentials(self, status: dict[str, Any]) -> Security | None:
        """A TLS cluster's credentials: its files where this process can read them (the
        shared filesystem, as the operator's user), else its Secret through the API."""
        tls_status = status.get("tls") or {}
        files = tls.files_of_status(tls_status)
        if files is None:
            return None
        paths = (files.ca_file, files.cert_file, files.key_file)
        if all(os.access(p, os.R_OK) for p in paths):
            return tls.client_security(files)
        read_secret = getattr(self._store, "read_secret", None)
        secret = tls_status.get("secretName")
        if read_secret is not None and secret:
            data = await read_secret(self.namespace, str(secret))
            return tls.memory_security(tls.credentials_of_secret(data))
        raise HPCClusterError(
            f"DaskCluster {self.namespace}/{self.name} uses TLS, but its credentials in "
            f"{os.path.dirname(files.ca_file)} are not readable here"
            + ("" if read_secret is None else " and its Secret is not published yet")
            + ": run where the operator's files are readable, or grant read on the Secret "
            f"{tls.secret_name(self.name)}")

    async def _connected(self) -> None:
        """What `Cluster._start` does, except subscribing to the scheduler's worker-status
        stream: that stream has ONE subscriber per scheduler (its plugin has a fixed name),
        so a second cluster object on the same DaskCluster (`from_name` in another
        notebook) would silently take it from the first. `scheduler_info` is refreshed from
        the scheduler's identity instead (`_follow_status`), as Client does."""
        assert self.scheduler_comm is not None
        self.scheduler_info = SchedulerInfo(await self.scheduler_comm.identity())
        for pc in self.periodic_callbacks.values():
            pc.start()
        self.status = Status.running

    async def _follow_status(self) -> None:
        """Keeps `resource_status` (phase, counts, message) and `scheduler_info` current,
        and follows the scheduler if the operator had to start a new one."""
        while self.status == Status.running:
            try:
                found = await self._store.get(KIND_CLUSTER, self.namespace, self.name)
            except Exception as exc:  # a blip of the API or a closing session: keep the last
                log.debug("status of %s/%s not read: %s", self.namespace, self.name, exc)
            else:
                self.resource_status = (found.get("status") or {}) if found is not None else {
                    "phase": "Deleted", "message": "the DaskCluster no longer exists"}
            address = self.resource_status.get("schedulerAddress")
            if address and self.scheduler_comm is not None \
                    and address != self.scheduler_comm.address:
                with contextlib.suppress(Exception):
                    await self.scheduler_comm.close_rpc()
                self.scheduler_comm = self._rpc(address)
            try:
                assert self.scheduler_comm is not None
                self.scheduler_info = SchedulerInfo(await asyncio.wait_for(
                    self.scheduler_comm.identity(), STATUS_RPC_TIMEOUT_S))
            except Exception as exc:  # scheduler restarting or gone: keep the last view
                log.debug("identity of %s not read: %s", self.scheduler_address, exc)
            await asyncio.sleep(STATUS_PERIOD_S)

    # --- scaling -------------------------------------------------------------------------

    async def _target(self, group: str) -> tuple[str, str]:
        """The object whose replicas are the group's: the DaskCluster for `default`."""
        if group == DEFAULT_GROUP_NAME:
            return KIND_CLUSTER, self.name
        found = await self._store.get(KIND_WORKER_GROUP, self.namespace, group)
        if found is None or (found.get("spec") or {}).get("cluster") != self.name \
                or (found.get("metadata") or {}).get("deletionTimestamp"):
            raise ValueError(f"DaskCluster {self.namespace}/{self.name} has no worker group "
                             f"{group!r} (add one with add_worker_group)")
        return KIND_WORKER_GROUP, group

    async def _autoscalers_of(self, group: str) -> list[str]:
        return [str(a["metadata"]["name"])
                for a in await self._store.list_objects(KIND_AUTOSCALER, self.namespace)
                if (a.get("spec") or {}).get("cluster") == self.name
                and (a.get("spec") or {}).get("workerGroup", DEFAULT_GROUP_NAME) == group
                and not a["metadata"].get("deletionTimestamp")]

    async def _stop_adapting(self, group: str) -> None:
        for name in await self._autoscalers_of(group):
            await self._store.delete(KIND_AUTOSCALER, self.namespace, name)
        self._adaptive_groups.pop(group, None)

    async def _create_owned(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Groups and autoscalers made here belong to the cluster: under Kubernetes the
        owner reference lets the API server's garbage collector remove them with it."""
        if self.mode == "kubernetes" and self.uid:
            manifest = {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [
                {"apiVersion": API_VERSION, "kind": KIND_CLUSTER, "name": self.name,
                 "uid": self.uid, "blockOwnerDeletion": True}]}}
        created = await self._store.create(manifest)
        self._owned.append((str(manifest["kind"]), str(manifest["metadata"]["name"])))
        return created

    def scale(self, n: int, group: str = DEFAULT_GROUP_NAME) -> Any:
        """Set a group's replicas (worker jobs), as `kubectl scale` would; the reconcile
        submits, or retires workers through Dask (their data moves) before cancelling.
        Scaling by hand switches the group's autoscaler off, as in dask-kubernetes,
        rather than letting it undo the change a moment later."""
        _check_count("n", n)
        return self.sync(self._scale, n, group)

    async def _scale(self, n: int, group: str) -> None:
        kind, target = await self._target(group)
        await self._stop_adapting(group)
        await self._store.scale(kind, self.namespace, target, n)

    def adapt(self, minimum: int = 0, maximum: int | None = None,  # type: ignore[override]
              *, group: str = DEFAULT_GROUP_NAME, scale_down_delay: int | None = None) -> Any:
        """Let a DaskAutoscaler size the group between `minimum` and `maximum` worker jobs
        from the scheduler's own adaptive target (created, or updated if one exists).

        Unlike Dask's in-process `Adaptive`, the decision runs where the reconcile runs (the
        operator, or this process's session), so it keeps working with no client attached.
        `scale_down_delay`: seconds the scheduler must want fewer before jobs are removed
        (the CRD's default when None). Returns the DaskAutoscaler's name."""
        if maximum is None:
            raise ValueError("adapt needs maximum=: the most worker jobs the group may have")
        _check_count("minimum", minimum)
        _check_count("maximum", maximum)
        manifest = autoscaler_manifest(self.name, self.namespace, group, minimum, maximum,
                                       scale_down_delay)
        return self.sync(self._adapt, manifest)

    async def _adapt(self, manifest: dict[str, Any]) -> str:
        spec = manifest["spec"]
        group = spec["workerGroup"]
        await self._target(group)
        existing = await self._autoscalers_of(group)
        if existing:
            name, *duplicates = existing
            await self._store.update_spec(KIND_AUTOSCALER, self.namespace, name, spec)
            for other in duplicates:  # two autoscalers on one group would fight
                await self._store.delete(KIND_AUTOSCALER, self.namespace, other)
        else:
            name = str((await self._create_owned(manifest))["metadata"]["name"])
        self._adaptive_groups[group] = (spec["minimum"], spec["maximum"])
        return name

    def add_worker_group(self, name: str, replicas: int = 0, *,
                         worker: Mapping[str, Any] | None = None, **template: Any) -> Any:
        """Add a DaskWorkerGroup (its own queue, cores, memory, GPUs, `resources=` for
        routing work with `client.submit(f, resources={...})`). Its name is the object's
        name in the namespace, so it must be unique there. Returns the name."""
        _check_count("replicas", replicas)
        manifest = worker_group_manifest(name, self.namespace, self.name, worker=worker,
                                         replicas=replicas, **template)
        return self.sync(self._add_worker_group, manifest)

    async def _add_worker_group(self, manifest: dict[str, Any]) -> str:
        created = await self._create_owned(manifest)
        return str(created["metadata"]["name"])

    def delete_worker_group(self, name: str) -> Any:
        """Delete a worker group (and its autoscaler): its jobs end, the cluster stays."""
        return self.sync(self._delete_worker_group, name)

    async def _delete_worker_group(self, name: str) -> None:
        await self._target(name)
        await self._stop_adapting(name)
        await self._store.delete(KIND_WORKER_GROUP, self.namespace, name)

    # --- close ---------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> Any:
        """Delete the cluster (with `shutdown_on_close`) and wait until its jobs are gone;
        raises HPCClusterError naming any job whose end could not be confirmed."""
        try:
            return super().close(timeout)
        finally:
            if not self.asynchronous:
                self._loop_runner.stop()

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task
        try:
            await super()._close()  # the scheduler connections first, then the jobs
        finally:
            problems = await self._release(delete=self.shutdown_on_close)
        if problems:
            raise HPCClusterError("; ".join(problems))

    async def _abandon(self) -> str:
        """After a failed start: end what was created, and say how that went."""
        self.status = Status.failed
        if self.scheduler_comm is not None:
            with contextlib.suppress(Exception):
                await self.scheduler_comm.close_rpc()
        try:
            problems = await self._release(delete=self._created)
        except Exception as exc:
            problems = [f"cleaning up failed: {exc}"]
        self.status = Status.closed
        if problems:
            return "; and " + "; ".join(problems)
        return "; it was deleted and no job of it is left" if self._created else ""

    async def _release(self, delete: bool) -> list[str]:
        """End the cluster's objects (if `delete`) and close the store; returns problems."""
        problems: list[str] = []
        with _OPEN_LOCK:
            _OPEN.pop(id(self), None)
        try:
            if delete and self.uid and self.mode == "kubernetes":
                problems += await self._delete_and_wait()
        finally:
            left = await self._store.close()  # standalone: ends every job of the session
        if left:
            problems.append(f"could not confirm the end of jobs {', '.join(left)} of DaskCluster "
                            f"{self.namespace}/{self.name} within {self._close_timeout:g} s: "
                            "check the batch system (squeue/qstat) and cancel them")
        return problems

    async def _delete_and_wait(self) -> list[str]:
        """Kubernetes: delete, then wait until the object is gone, which its finalizer
        allows only once the operator has seen every job end."""
        for kind, name in reversed(self._owned):
            with contextlib.suppress(LookupError):
                await self._store.delete(kind, self.namespace, name)
        await self._store.delete(KIND_CLUSTER, self.namespace, self.name)
        deadline = time.monotonic() + self._close_timeout
        found: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            found = await self._store.get(KIND_CLUSTER, self.namespace, self.name)
            if found is None or found["metadata"].get("uid") != self.uid:
                return []
            await asyncio.sleep(STATUS_PERIOD_S)
        message = ((found or {}).get("status") or {}).get("message", "")
        return [f"DaskCluster {self.namespace}/{self.name} still exists "
                f"{self._close_timeout:g} s after its deletion ({message}); the operator "
                "releases it once every job of it has ended"]
