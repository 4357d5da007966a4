"""kopf handlers: thin adapters from kopf's callbacks to the reconcilers.

Every handler for a DaskCluster — create, update, resume and the periodic timer — calls the
same idempotent reconcile; there is no phase state machine built from field handlers, so a
dropped or retried event can never leave a cluster stuck. Handlers are registered into an
explicit registry (not kopf's global one) so tests and the CLI each build their own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import kopf

from hpc_bridge.poller import BatchSystemUnavailable

from . import tls
from .autoscaler_reconcile import AutoscalerReconciler, ObjectStore
from .constants import (
    FINALIZER,
    GROUP,
    KIND_AUTOSCALER,
    KIND_CLUSTER,
    KIND_JOB,
    KIND_WORKER_GROUP,
    VERSION,
    plural,
)
from .job_reconcile import JobReconciler
from .reconcile import ClusterReconciler, GroupReconciler, Runtime
from .sweep import sweep

if TYPE_CHECKING:
    from .metrics import OperatorMetrics

log = logging.getLogger(__name__)


def _event_sink(body: kopf.Body) -> Any:
    def post(type_: str, reason: str, message: str) -> None:
        try:
            kopf.event(body, type=type_, reason=reason, message=message[:1000])
        except Exception:  # events are best effort; never fail a reconcile over one
            log.debug("could not post event %s", reason, exc_info=True)
    return post


def _register(registry: kopf.OperatorRegistry, resource: tuple[str, str, str],
              interval: float, reconcile: Any, delete: Any, cleanup: bool = True,
              metrics: OperatorMetrics | None = None) -> None:
    """Every cause calls the same reconcile; deletion has its own handler (and finalizer).
    With `metrics`, the kind's phase is watched and its handlers' errors counted."""
    delete = _retry_when_unreachable(delete, interval)
    if metrics is not None:
        reconcile, delete = metrics.instrument(registry, resource, reconcile, delete)
    for cause, decorator in (("create", kopf.on.create), ("update", kopf.on.update),
                             ("resume", kopf.on.resume)):
        decorator(*resource, registry=registry, id=f"reconcile-{cause}")(reconcile)
    kopf.timer(*resource, registry=registry, id="poll", interval=interval, idle=None)(reconcile)
    # Without cleanup (an autoscaler runs nothing of its own) no finalizer is needed.
    kopf.on.delete(*resource, registry=registry, id="teardown", optional=not cleanup)(delete)


def _retry_when_unreachable(delete: Any, delay: float) -> Any:
    """A deletion during a batch-system outage is retried at the poll interval, with a
    message saying why, instead of kopf's minute-long default for an unexpected error."""
    async def run(**kwargs: Any) -> Any:
        try:
            return await delete(**kwargs)
        except BatchSystemUnavailable as exc:
            raise kopf.TemporaryError(f"batch system unreachable, deletion waits: {exc}",
                                      delay=delay) from exc
    return run


def _wait_for(remaining: list[str]) -> None:
    if remaining:
        raise kopf.TemporaryError(f"waiting for jobs {', '.join(remaining)} to end", delay=2)


def _groups_of(kwargs: dict[str, Any], body: kopf.Body, cluster: Any) -> list[dict[str, Any]]:
    """The DaskWorkerGroups of DaskCluster `cluster` in the body's namespace, from the
    groups_by_cluster index."""
    index: kopf.Index[tuple[str, str], dict[str, Any]] | None = kwargs.get("groups_by_cluster")
    key = (str(body.metadata.get("namespace") or "default"), str(cluster))
    return list(index.get(key, [])) if index is not None else []


def _manifest(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": dict(body.metadata), "spec": dict(body.spec)}


def build_registry(runtime: Runtime, registry: kopf.OperatorRegistry | None = None,
                   timer_interval: float | None = None,
                   store: ObjectStore | None = None,
                   metrics: OperatorMetrics | None = None,
                   namespaces: list[str] | None = None) -> kopf.OperatorRegistry:
    """Register the handlers. The CLI passes kopf's default registry, whose fallback logins
    (kubeconfig, in-cluster service account) production needs; tests pass a fresh one and
    add a login handler for the emulator. `store` is how DaskJobs create their clusters
    (the Kubernetes API; without one, DaskJobs of mode cluster wait with a message).
    `metrics` (metrics.OperatorMetrics), when given, is fed every kind's phase and errors.
    With a store that can list resources, the orphan sweep (sweep.py) runs every
    `sweepInterval` over `namespaces` (None: all), the ones kopf watches."""
    registry = registry if registry is not None else kopf.OperatorRegistry()
    reconciler = ClusterReconciler(runtime)
    interval = timer_interval or runtime.site.poll_interval
    resource = (GROUP, VERSION, plural(KIND_CLUSTER))

    put_secret = getattr(store, "put_secret", None)
    delete_secret = getattr(store, "delete_secret", None)

    async def publish_tls(manifest: dict[str, Any], status: dict[str, Any], body: kopf.Body,
                          patch: kopf.Patch) -> None:
        """A TLS cluster's credentials as a Secret, for clients away from the shared
        filesystem; once: status.tls.secretName says it exists. A failure (RBAC) is an
        event and a retry at the next reconcile, never a failed reconcile."""
        files = tls.files_of_status(status.get("tls") or {})
        if files is None or put_secret is None or (body.status.get("tls") or {}).get(
                "secretName"):
            return
        try:
            await put_secret(tls.secret_manifest(manifest, tls.load_credentials(files)))
        except Exception as exc:
            _event_sink(body)("Warning", "SecretFailed", f"TLS Secret not written: {exc}")
            return
        patch.status["tls"] = {**status["tls"],
                               "secretName": tls.secret_name(manifest["metadata"]["name"])}

    async def reconcile_cluster(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        if body.metadata.get("deletionTimestamp"):
            return  # deletion is the delete handler's; never resubmit while it runs
        manifest = _manifest(body)
        groups_of_it = _groups_of(kwargs, body, body.metadata.get("name"))
        status = await reconciler.reconcile(manifest, dict(body.status), _event_sink(body),
                                            groups=groups_of_it)
        patch.status.update(status)
        await publish_tls(manifest, status, body, patch)
        if status.get("idleExpired") and store is not None:
            await store.delete(str(body.metadata.get("namespace") or "default"),
                               str(body.metadata.get("name")))

    async def delete_cluster(body: kopf.Body, **_: Any) -> None:
        manifest = {"metadata": dict(body.metadata), "spec": dict(body.spec)}
        # The cluster's worker groups lose their scheduler: their jobs end with it. (With a
        # real API server the groups themselves are garbage-collected through the owner
        # references set below.)
        _wait_for(await reconciler.teardown(manifest, whole_cluster=True))
        if delete_secret is not None and (body.status.get("tls") or {}).get("secretName"):
            # The API server's garbage collector would too (the Secret is owned by the
            # cluster); the key should not outlive the cluster by a collector's delay.
            # By its own name, never the one in status (status is not the operator's alone).
            await delete_secret(manifest["metadata"].get("namespace") or "default",
                                tls.secret_name(manifest["metadata"]["name"]))

    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 60
        settings.watching.client_timeout = 90

    groups = GroupReconciler(runtime)
    group_resource = (GROUP, VERSION, plural(KIND_WORKER_GROUP))

    def clusters_by_name(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
        key = (body.metadata.get("namespace") or "default", str(body.metadata.get("name")))
        return {key: {"apiVersion": body.get("apiVersion"),
                                    "kind": body.get("kind"), "metadata": dict(body.metadata),
                                    "spec": dict(body.spec), "status": dict(body.status)}}

    def groups_by_cluster(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
        """A namespace's DaskWorkerGroups by the cluster they name: the site policy's
        totals (maxWorkers, maxCores, maxGpus) count a whole cluster."""
        key = (body.metadata.get("namespace") or "default", str(body.spec.get("cluster")))
        return {key: _manifest(body)}

    async def reconcile_group(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        if body.metadata.get("deletionTimestamp"):
            return
        index: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["clusters_by_name"]
        key = (str(body.metadata.get("namespace") or "default"), str(body.spec.get("cluster")))
        cluster: dict[str, Any] | None = next(iter(index.get(key, [])), None)
        manifest = _manifest(body)
        status = await groups.reconcile_group(manifest, dict(body.status), cluster,
                                              _event_sink(body),
                                              groups=_groups_of(kwargs, body,
                                                                body.spec.get("cluster")))
        patch.status.update(status)
        if cluster is not None and not body.metadata.get("ownerReferences"):
            meta = cluster["metadata"]
            patch.metadata["ownerReferences"] = [{
                "apiVersion": cluster["apiVersion"], "kind": KIND_CLUSTER,
                "name": meta["name"], "uid": meta["uid"], "blockOwnerDeletion": True}]

    async def delete_group(body: kopf.Body, **_: Any) -> None:
        _wait_for(await groups.teardown({"metadata": dict(body.metadata), "spec": {}}))

    jobs = JobReconciler(runtime)
    job_resource = (GROUP, VERSION, plural(KIND_JOB))

    async def reconcile_job(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        if body.metadata.get("deletionTimestamp"):
            return
        if store is None:
            patch.status["message"] = "this operator was started without API access for DaskJobs"
            return
        patch.status.update(await jobs.reconcile(_manifest(body), dict(body.status), store,
                                                 _event_sink(body)))

    async def delete_job(body: kopf.Body, **_: Any) -> None:
        if store is not None:
            _wait_for(await jobs.teardown(_manifest(body), store))

    autoscalers = AutoscalerReconciler(runtime)

    async def reconcile_autoscaler(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        if body.metadata.get("deletionTimestamp") or store is None:
            return
        patch.status.update(await autoscalers.reconcile(
            _manifest(body), dict(body.status), store, _event_sink(body),
            groups=_groups_of(kwargs, body, body.spec.get("cluster"))))

    async def forget_autoscaler(**_: Any) -> None:
        pass  # the target keeps its replicas; nothing of the autoscaler's own runs

    kopf.index(*resource, registry=registry, id="clusters_by_name")(clusters_by_name)
    kopf.index(*group_resource, registry=registry, id="groups_by_cluster")(groups_by_cluster)
    _register(registry, (GROUP, VERSION, plural(KIND_AUTOSCALER)), interval,
              reconcile_autoscaler, forget_autoscaler, cleanup=False, metrics=metrics)
    _register(registry, job_resource, interval, reconcile_job, delete_job, metrics=metrics)
    _register(registry, resource, interval, reconcile_cluster, delete_cluster, metrics=metrics)
    _register(registry, group_resource, interval, reconcile_group, delete_group,
              metrics=metrics)

    kopf.on.startup(registry=registry)(configure)
    list_uids = getattr(store, "list_uids", None)
    if list_uids is not None and runtime.site.sweep_interval > 0:
        sweeper: dict[str, asyncio.Task[None]] = {}

        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(runtime.site.sweep_interval)
                try:
                    await sweep(runtime, lambda: list_uids(namespaces), namespaces)
                except Exception:  # an API or batch outage: try again next period
                    logging.getLogger(__name__).exception("orphan sweep failed")

        async def start_sweep(**_: Any) -> None:
            sweeper["task"] = asyncio.create_task(sweep_forever())

        async def stop_sweep(**_: Any) -> None:
            if "task" in sweeper:
                sweeper["task"].cancel()

        kopf.on.startup(registry=registry, id="sweep")(start_sweep)
        kopf.on.cleanup(registry=registry, id="sweep")(stop_sweep)
    return registry
