"""The DaskAutoscaler reconcile: ask the scheduler, decide (autoscaling.decide), scale.

The autoscaler changes nothing but the replicas of its target — the DaskCluster's
`spec.worker.replicas` for the `default` group, a DaskWorkerGroup's otherwise — exactly as
`kubectl scale` would. Everything else (submitting, retiring workers through the scheduler
before cancelling their jobs) is the cluster's and group's own reconcile, so a scale-down
by the autoscaler is as safe as any other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from . import dask_rpc, tls
from .autoscaling import AutoscalerSpec, Recommendation, ScaleState, decide
from .constants import DEFAULT_GROUP_NAME, KIND_CLUSTER, KIND_WORKER_GROUP
from .job_reconcile import ClusterStore
from .model import ClusterModel, GroupModel
from .planning import merge_conditions
from .policy import PolicyError, enforce
from .reconcile import EventSink, Runtime, _no_events, now_iso, refused
from .validation import ManifestError, validate


class ScaleTargets(Protocol):
    """Where the autoscaler reads clusters and groups and writes their replicas."""

    async def get_object(self, kind: str, namespace: str,
                         name: str) -> dict[str, Any] | None: ...

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None: ...


class ObjectStore(ClusterStore, ScaleTargets, Protocol):
    """Both: what the operator's handlers are given (the API, or `up`'s memory)."""


def _waiting(message: str, old: dict[str, Any]) -> dict[str, Any]:
    cond = {"type": "Active", "status": "False", "reason": "Waiting", "message": message}
    return {"phase": "Pending", "message": message,
            "conditions": merge_conditions(old.get("conditions") or [], [cond], now_iso())}


class AutoscalerReconciler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def reconcile(self, manifest: dict[str, Any], old_status: dict[str, Any],
                        targets: ScaleTargets, events: EventSink = _no_events,
                        groups: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """`groups`: the cluster's DaskWorkerGroups where the caller knows them, so that
        the policy's maxWorkers (and maxCores, maxGpus) count the target at its maximum
        beside the cluster's other workers."""
        try:
            valid = validate(manifest)
        except ManifestError as exc:
            return refused(exc, old_status, events)
        spec = valid["spec"]
        namespace = valid["metadata"].get("namespace") or "default"
        cluster_name, group_name = spec["cluster"], spec["workerGroup"]
        cluster = await targets.get_object(KIND_CLUSTER, namespace, cluster_name)
        if cluster is None:
            return _waiting(f"waiting for DaskCluster {namespace}/{cluster_name}", old_status)
        try:
            cmodel = ClusterModel.from_manifest(validate(cluster), self.runtime.site)
        except ManifestError as exc:
            return _waiting(f"DaskCluster {cluster_name} is invalid: {exc}", old_status)
        if cmodel.mode == "allocation" and group_name == DEFAULT_GROUP_NAME:
            message = (f"DaskCluster {cluster_name} runs in one allocation of fixed size; "
                       "autoscale a DaskWorkerGroup of it instead")
            return {**_waiting(message, old_status), "phase": "Failed"}
        if group_name == DEFAULT_GROUP_NAME:
            kind, target, group = KIND_CLUSTER, cluster_name, cmodel.groups[0]
        else:
            doc = await targets.get_object(KIND_WORKER_GROUP, namespace, group_name)
            if doc is None or doc.get("spec", {}).get("cluster") != cluster_name:
                return _waiting(f"waiting for DaskWorkerGroup {namespace}/{group_name} of "
                                f"cluster {cluster_name}", old_status)
            meta = doc["metadata"]
            group = GroupModel.from_worker(meta["name"], meta.get("uid", ""),
                                           validate(doc)["spec"]["worker"])
            kind, target = KIND_WORKER_GROUP, group_name
            groups = [*groups, doc]  # counted once, at the autoscaler's maximum
        try:
            enforce(valid, self.runtime.site, cluster=cluster, groups=groups)
        except PolicyError as exc:
            return refused(exc, old_status, events)

        recommendation = await self._recommend(cmodel, group, cluster.get("status") or {})
        scaler = AutoscalerSpec.from_spec(spec)
        decision = decide(scaler, group.replicas, recommendation, time.time(),
                          ScaleState.from_status(old_status))
        status: dict[str, Any] = {
            "phase": "Active",
            "message": decision.reason,
            "desiredWorkers": decision.replicas,
            "lastScaleTime": old_status.get("lastScaleTime"),
            "observedGeneration": valid["metadata"].get("generation"),
            **decision.state.to_status(),
        }
        if decision.changed:
            await targets.scale(kind, namespace, target, decision.replicas)
            status["lastScaleTime"] = now_iso()
            events("Normal", "Scaled", f"{kind} {target}: {decision.reason}")
        cond = {"type": "Active", "status": "True",
                "reason": "SchedulerAdvice" if recommendation else "SchedulerUnreachable",
                "message": decision.reason}
        status["conditions"] = merge_conditions(old_status.get("conditions") or [], [cond],
                                                now_iso())
        return status

    async def _recommend(self, cmodel: ClusterModel, group: GroupModel,
                         cluster_status: dict[str, Any]) -> Recommendation | None:
        address = cluster_status.get("schedulerAddress")
        if not address:
            return None
        groups = [cmodel.groups[0]] + ([group] if group.name != DEFAULT_GROUP_NAME else [])
        # A TLS cluster's credentials, where its own reconcile made them.
        files = tls.tls_files(self.runtime.staging_dir(cmodel.namespace, cmodel.name,
                                                       cmodel.uid)) \
            if tls.needs_tls(cmodel.protocols) else None
        advice = await dask_rpc.scaling_advice(address, [
            dask_rpc.group_query(cmodel.namespace, cmodel.name, g.name, g.template.resources)
            for g in groups], tls.security_for(files))
        answer = ((advice or {}).get("groups") or {}).get(group.name)
        if answer is None:
            return None
        per_job = max(group.template.gpus, 1) if group.template.cuda \
            else group.template.processes
        return Recommendation.from_response(answer, per_job, tuple(group.resource_names))
