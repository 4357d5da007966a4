"""Typed views of validated manifests, in the bridge's own terms (JobTemplate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpc_bridge.model import JobTemplate

from .constants import DEFAULT_GROUP_NAME
from .site_config import SiteConfig


def _env(items: list[dict[str, str]] | None) -> tuple[tuple[str, str], ...]:
    return tuple((e["name"], e.get("value", "")) for e in items or [])


def worker_template(worker: dict[str, Any]) -> JobTemplate:
    cuda = worker.get("cuda") or {}
    resources = dict(worker.get("resources") or {})
    if cuda.get("enabled"):
        resources.setdefault("GPU", 1)  # each `dask cuda worker` process owns one GPU
    return JobTemplate(
        cores=worker["cores"],
        memory=worker["memory"],
        processes=worker["processes"],
        walltime=worker["walltime"],
        queue=worker.get("queue"),
        account=worker.get("account"),
        gpus=worker.get("gpus", 0),
        env=_env(worker.get("env")),
        prologue=tuple(worker.get("prologue", [])),
        extra_directives=tuple(worker.get("extraDirectives", [])),
        worker_args=tuple(worker.get("workerArgs", [])),
        resources=tuple(sorted((k, float(v)) for k, v in resources.items())),
        cuda=bool(cuda.get("enabled")),
        rmm_pool_size=cuda.get("rmmPoolSize"),
        device_memory_limit=cuda.get("deviceMemoryLimit"),
        protocol=cuda.get("protocol") if cuda.get("enabled") else None,
    )


def scheduler_template(scheduler: dict[str, Any]) -> JobTemplate:
    return JobTemplate(
        cores=scheduler["cores"],
        memory=scheduler["memory"],
        walltime=scheduler["walltime"],
        queue=scheduler.get("queue"),
        account=scheduler.get("account"),
        env=_env(scheduler.get("env")),
        prologue=tuple(scheduler.get("prologue", [])),
        extra_directives=tuple(scheduler.get("extraDirectives", [])),
    )


@dataclass(frozen=True)
class GroupModel:
    name: str
    owner_uid: str  # the cluster's uid for the default group, the DaskWorkerGroup's otherwise
    replicas: int
    template: JobTemplate
    packing: str = "auto"  # auto | array | single

    @classmethod
    def from_worker(cls, name: str, owner_uid: str, worker: dict[str, Any]) -> GroupModel:
        return cls(name, owner_uid, worker["replicas"], worker_template(worker),
                   worker.get("packing", "auto"))

    @property
    def resource_names(self) -> list[str]:
        return [name for name, _ in self.template.resources]


@dataclass(frozen=True)
class ClusterModel:
    namespace: str
    name: str
    uid: str
    backend: str
    protocols: tuple[str, ...]  # the scheduler's listeners; the first is the primary
    scheduler: JobTemplate
    groups: tuple[GroupModel, ...]
    mode: str = "jobs"  # jobs | allocation (scheduler and default workers in one MPI job)
    idle_timeout: int = 0  # seconds without tasks before the cluster deletes itself
    # spec.diagnostics.performanceReport: the scheduler writes Dask's performance report
    # of every computation (hpc_bridge.preloads.performance)
    performance_report: bool = False

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], site: SiteConfig) -> ClusterModel:
        """`manifest` has passed validation.validate (defaults applied)."""
        meta = manifest["metadata"]
        spec = manifest["spec"]
        uid = meta["uid"]
        default = GroupModel.from_worker(DEFAULT_GROUP_NAME, uid, spec["worker"])
        protocols = [spec["scheduler"]["protocol"], *spec["scheduler"].get("extraProtocols", [])]
        if default.template.protocol:
            protocols.append(default.template.protocol)  # the default group's GPU listener
        return cls(
            namespace=meta.get("namespace") or "default",
            name=meta["name"],
            uid=uid,
            backend=spec.get("backend") or site.backend,
            protocols=tuple(dict.fromkeys(protocols)),
            scheduler=scheduler_template(spec["scheduler"]),
            groups=(default,),
            mode=spec.get("mode", "jobs"),
            idle_timeout=spec.get("idleTimeout", 0),
            performance_report=bool((spec.get("diagnostics") or {}).get("performanceReport")),
        )

    @property
    def desired_workers(self) -> int:
        return sum(g.replicas for g in self.groups)
