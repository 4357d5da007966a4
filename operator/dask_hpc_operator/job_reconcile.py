"""The DaskJob reconcile: observe, plan (job_planning, pure), act, report.

A DaskJob in mode `cluster` owns a DaskCluster object (created through a `ClusterStore`: the
Kubernetes API under the operator, a list in memory under `dask-hpc up`) and one runner
job; in mode `allocation` it owns one MPI allocation and nothing else. The command's
output and exit status go to the job's staging directory on the shared filesystem, which
is where its outcome is read from, whatever the batch system keeps.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from hpc_bridge.allocation import render_allocation
from hpc_bridge.backends.base import BatchSystemError
from hpc_bridge.model import JobRequest, JobState, ObservedJob, RunnerCommand, TLSFiles
from hpc_bridge.poller import BatchedPoller, BatchSystemUnavailable
from hpc_bridge.scripts import RenderContext, render_runner

from . import staging_files, tls
from .constants import (
    API_VERSION,
    KIND_CLUSTER,
    KIND_JOB,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    MANAGER_NAME,
)
from .job_planning import ChildView, JobModel, JobPlan, plan_job
from .policy import admit
from .reconcile import EventSink, Runtime, _no_events, now_iso, refused, unavailable_status
from .validation import ManifestError


class ClusterStore(Protocol):
    """Where DaskCluster objects live: the API server, or `up`'s memory."""

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create(self, manifest: dict[str, Any]) -> None: ...

    async def delete(self, namespace: str, name: str) -> None: ...


@dataclass(frozen=True)
class JobPaths:
    staging: Path
    output: Path  # the command's stdout and stderr
    exit_code: Path  # its exit status, once it has ended
    script: Path  # spec.job.script, written out
    scheduler_file: Path  # mode allocation
    logs: Path  # the batch system's own logs of the job


def read_exit_code(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def child_manifest(model: JobModel, job_manifest: dict[str, Any]) -> dict[str, Any]:
    """The DaskCluster a DaskJob runs against; owned by the job, so that deleting the job
    (or Kubernetes' garbage collector) removes it."""
    meta = job_manifest["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND_CLUSTER,
        "metadata": {
            "name": model.name,
            "namespace": model.namespace,
            "labels": {LABEL_MANAGED_BY: MANAGER_NAME, LABEL_JOB: model.name},
            "ownerReferences": [{
                "apiVersion": job_manifest.get("apiVersion") or API_VERSION,
                "kind": KIND_JOB, "name": meta["name"], "uid": meta["uid"],
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": dict(model.cluster_spec),
    }


class JobReconciler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def paths(self, model: JobModel) -> JobPaths:
        staging = self.runtime.staging_dir(model.namespace, model.name, model.uid, "jobs")
        return JobPaths(staging, staging / "output.log", staging / "exit_code",
                        staging / "script.py", staging / "scheduler.json", staging / "logs")

    def _context(self, model: JobModel, paths: JobPaths) -> RenderContext:
        site = self.runtime.site
        return RenderContext(backend=model.backend, python=site.python,
                             scheduler_file=str(paths.scheduler_file), log_dir=str(paths.logs),
                             site_prologue=site.prologue, death_timeout=site.worker_death_timeout)

    def _command(self, model: JobModel, paths: JobPaths) -> RunnerCommand:
        argv = model.command or (self.runtime.site.python, str(paths.script))
        return RunnerCommand(argv=argv, output_file=str(paths.output),
                             exit_code_file=str(paths.exit_code), working_dir=model.working_dir)

    def child_tls(self, model: JobModel, child_doc: dict[str, Any] | None) -> TLSFiles | None:
        """The credentials of the job's DaskCluster (`protocol: tls`), where that cluster's
        reconcile keeps them (its staging directory, by its uid), for the runner's client."""
        uid = ((child_doc or {}).get("metadata") or {}).get("uid")
        if model.mode != "cluster" or not uid \
                or not tls.needs_tls([model.cluster_spec["scheduler"]["protocol"]]):
            return None
        return tls.tls_files(self.runtime.staging_dir(model.namespace, model.name, str(uid)))

    def render_request(self, model: JobModel, scheduler_address: str = "",
                       child_tls: TLSFiles | None = None) -> JobRequest:
        paths = self.paths(model)
        ctx = replace(self._context(model, paths), tls=child_tls)
        command = self._command(model, paths)
        identity = model.identity(0)
        if model.mode == "allocation":
            return render_allocation(ctx, identity, model.worker, model.workers, command,
                                     self.runtime.site.mpi_launcher)
        return render_runner(ctx, identity, model.runner, command,
                             scheduler_address or "<the cluster's scheduler address>")

    def render(self, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], JobRequest]:
        """What a fresh DaskJob would create (for `dask-hpc render`)."""
        valid = admit(manifest, self.runtime.site)
        model = JobModel.from_manifest(valid, self.runtime.site)
        children = [child_manifest(model, valid)] if model.mode == "cluster" else []
        return children, self.render_request(model)

    async def reconcile(self, manifest: dict[str, Any], old_status: dict[str, Any],
                        store: ClusterStore, events: EventSink = _no_events) -> dict[str, Any]:
        old_conditions = old_status.get("conditions") or []
        try:
            valid = admit(manifest, self.runtime.site)
            model = JobModel.from_manifest(valid, self.runtime.site)
            poller = self.runtime.poller(model.backend, model.namespace)
        except ManifestError as exc:
            return refused(exc, old_status, events)
        paths = self.paths(model)
        async with self.runtime.lock(model.uid):
            try:
                snapshot = await poller.get()
            except BatchSystemUnavailable as exc:
                return unavailable_status(exc, old_conditions)
            jobs = snapshot.owned_by(model.uid)
            child_doc = await store.get(model.namespace, model.name) \
                if model.mode == "cluster" else None
            child = ChildView.of(child_doc, model.uid) if child_doc is not None else None
            plan = plan_job(model, old_status, jobs, child, read_exit_code(paths.exit_code),
                            now_iso())
            await self._act(model, valid, paths, plan, child, store, poller, events,
                            self.child_tls(model, child_doc))
        status: dict[str, Any] = {**plan.status, "outputFile": str(paths.output),
                                  "observedGeneration": valid["metadata"].get("generation")}
        if model.mode == "cluster":
            status["clusterName"] = model.name
        phase = status.get("phase")
        if phase and phase != old_status.get("phase"):
            events("Warning" if phase == "Failed" else "Normal", phase,
                   str(status.get("message", "")))
        return status

    async def _act(self, model: JobModel, manifest: dict[str, Any], paths: JobPaths,
                   plan: JobPlan, child: ChildView | None, store: ClusterStore,
                   poller: BatchedPoller, events: EventSink,
                   child_tls: TLSFiles | None = None) -> None:
        if plan.cancel:
            with contextlib.suppress(BatchSystemError):
                await poller.backend.cancel(plan.cancel)
                poller.record_cancelled(plan.cancel)
        if plan.delete_child:
            await store.delete(model.namespace, model.name)
        if plan.create_child:
            await store.create(child_manifest(model, manifest))
            events("Normal", "ClusterCreated", f"created DaskCluster {model.name}")
        if plan.submit is None:
            return
        self.runtime.make_staging(model.namespace, paths.staging, paths.logs)
        if model.script is not None:
            # Replaced, never written through: the job's user may write the directory.
            staging_files.replace_file(paths.script, model.script.encode())
        address = child.scheduler_address if child is not None else None
        request = self.render_request(model, address or "", child_tls)
        try:
            job_id = await poller.backend.submit(request)
        except BatchSystemError as exc:
            plan.status["message"] = f"submission failed, retrying: {exc}"
            events("Warning", "SubmitFailed", str(exc))
            return
        poller.record_submitted(ObservedJob(job_id, request.identity, JobState.PENDING,
                                            "submitted"))
        plan.status.update(jobId=job_id, message=f"submitted {model.role.value} job {job_id}")
        events("Normal", "Submitted", f"submitted {model.role.value} job {job_id}")

    async def teardown(self, manifest: dict[str, Any], store: ClusterStore,
                       keep_output: bool = False) -> list[str]:
        """Delete: cancel the job's own batch jobs, delete its cluster; returns what is
        still running (empty when done). The staging directory (with the command's output)
        goes too, unless `keep_output` (`dask-hpc up` leaves it for the user to read)."""
        meta = manifest["metadata"]
        namespace = meta.get("namespace") or "default"
        child_doc = await store.get(namespace, meta["name"])
        if child_doc is not None and ChildView.of(child_doc, meta["uid"]).owned:
            await store.delete(namespace, meta["name"])
        backend_kind = ((manifest.get("spec") or {}).get("cluster") or {}).get("backend") \
            or self.runtime.site.backend
        remaining = await self.runtime.end_jobs(
            meta["uid"], [backend_kind], lambda j: j.identity.owner_uid == meta["uid"],
            namespace)
        if not remaining and not keep_output:
            shutil.rmtree(self.runtime.staging_dir(namespace, meta["name"], meta["uid"], "jobs"),
                          ignore_errors=True)
        return remaining
