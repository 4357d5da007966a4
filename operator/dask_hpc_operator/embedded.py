"""`dask-hpc up`: the operator's reconcile, in the foreground, without Kubernetes.

The same reconcilers the kopf handlers call run here in a loop over manifests held in
memory. It is how a user on a login node (or a laptop, with the local backend) gets a
cluster or runs a DaskJob from a manifest, and how the README's quick start works with
nothing installed. A DaskJob's DaskCluster is created in this same memory (the
`EmbeddedStore` stands in for the API server), so the lifecycle is the operator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from . import tls
from .autoscaler_reconcile import AutoscalerReconciler
from .constants import KIND_AUTOSCALER, KIND_CLUSTER, KIND_JOB, KIND_WORKER_GROUP
from .job_planning import TERMINAL_PHASES
from .job_reconcile import JobReconciler
from .policy import enforce
from .queue_reasons import explain, waiting_reason
from .reconcile import GroupReconciler, Runtime
from .site_config import SiteConfig
from .validation import ManifestError, validate

UP_KINDS = (KIND_CLUSTER, KIND_WORKER_GROUP, KIND_JOB, KIND_AUTOSCALER)

LOOP_PERIOD_S = 0.5
TEARDOWN_TIMEOUT_S = 120.0


@dataclass
class Resource:
    manifest: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)
    deleting: bool = False  # like a deletionTimestamp: torn down, then dropped

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def key(self) -> str:
        """`daskjob default/train`: a DaskJob and its DaskCluster share a name."""
        meta = self.manifest["metadata"]
        return f"{self.kind.lower()} {meta.get('namespace', 'default')}/{meta['name']}"


def _stamp(valid: dict[str, Any]) -> dict[str, Any]:
    """The metadata an API server would give a new object."""
    meta = valid.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    meta["uid"] = str(uuid.uuid4())
    meta["generation"] = 1
    return valid


def prepare(docs: list[dict[str, Any]], backend: str | None,
            site: SiteConfig | None = None) -> list[Resource]:
    """Validate everything before anything is submitted; with `site`, check its
    per-namespace policy too (the namespace is metadata.namespace, default "default"),
    each cluster with the groups of it among `docs`."""
    resources = []
    for doc in docs:
        valid = validate(doc)
        if valid["kind"] not in UP_KINDS:
            raise ManifestError("kind", f"{valid['kind']} is not handled by `up` in this "
                                "version", "run " + ", ".join(UP_KINDS) + " manifests")
        _stamp(valid)
        if backend and valid["kind"] == KIND_CLUSTER:
            valid["spec"]["backend"] = backend
        elif backend and valid["kind"] == KIND_JOB:
            valid["spec"]["cluster"]["backend"] = backend
        resources.append(Resource(valid))
    if site is not None:
        store = EmbeddedStore(resources)
        for r in resources:
            meta, spec = r.manifest["metadata"], r.manifest["spec"]
            parent = store.find(meta["namespace"], spec["cluster"]) \
                if r.kind in (KIND_WORKER_GROUP, KIND_AUTOSCALER) else None
            enforce(r.manifest, site, cluster=parent.manifest if parent else None,
                    groups=store.groups_of(r.manifest))
    # Clusters first: a group's reconcile reads its cluster's status.
    return sorted(resources, key=lambda r: r.kind != KIND_CLUSTER)


class EmbeddedStore:
    """The DaskCluster objects of a DaskJob, kept in `up`'s list instead of an API server."""

    def __init__(self, resources: list[Resource]) -> None:
        self.resources = resources

    def find(self, namespace: str, name: str, kind: str = KIND_CLUSTER) -> Resource | None:
        for r in self.resources:
            meta = r.manifest["metadata"]
            if r.kind == kind and meta["name"] == name and meta["namespace"] == namespace:
                return r
        return None

    def groups_of(self, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        """The DaskWorkerGroups (not being deleted) of the cluster a manifest is (a
        DaskCluster) or names (spec.cluster), for the policy's per-cluster totals."""
        meta = manifest["metadata"]
        cluster = meta["name"] if manifest["kind"] == KIND_CLUSTER \
            else (manifest.get("spec") or {}).get("cluster")
        return [r.manifest for r in self.resources
                if r.kind == KIND_WORKER_GROUP and not r.deleting
                and r.manifest["metadata"]["namespace"] == meta.get("namespace", "default")
                and r.manifest["spec"]["cluster"] == cluster]

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get_object(KIND_CLUSTER, namespace, name)

    async def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.find(namespace, name, kind)
        if found is None:
            return None
        meta = dict(found.manifest["metadata"])
        if found.deleting:
            meta["deletionTimestamp"] = "now"
        return {**found.manifest, "metadata": meta, "status": dict(found.status)}

    async def create(self, manifest: dict[str, Any]) -> None:
        self.resources.insert(0, Resource(_stamp(validate(manifest))))

    async def delete(self, namespace: str, name: str) -> None:
        found = self.find(namespace, name)
        if found is not None:
            found.deleting = True

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        found = self.find(namespace, name, kind)
        if found is not None and not found.deleting:
            found.manifest["spec"]["worker"]["replicas"] = replicas
            found.manifest["metadata"]["generation"] += 1


class OutputTail:
    """Streams a DaskJob's output file to the terminal as it grows."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.offsets: dict[str, int] = {}

    def pump(self, path: str) -> None:
        offset = self.offsets.get(path, 0)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return
        if data:
            self.offsets[path] = offset + len(data)
            self.out.write(data.decode(errors="replace"))
            self.out.flush()


class Progress:
    """One line per change of what a cluster is doing; while a job waits in the queue with
    nothing changing, a reminder at 30 s, 2, 10 and 30 min (then every 30 min) that says
    why in plain words (queue_reasons), so a long wait never looks like a hang."""

    NUDGES = (30.0, 120.0, 600.0, 1800.0)

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.clock = clock
        self.started = clock()
        self.last: dict[str, str] = {}
        self.since: dict[str, float] = {}
        self.nudged: dict[str, int] = {}

    def _print(self, text: str) -> None:
        print(f"[{self.clock() - self.started:6.1f}s] {text}", file=self.out, flush=True)

    def show(self, resource: Resource) -> None:
        status = resource.status
        message = str(status.get("message", ""))
        line = f"{status.get('phase', '?')}: {message}"
        key = resource.key
        if self.last.get(key) != line:
            self.last[key], self.since[key], self.nudged[key] = line, self.clock(), 0
            self._print(f"{key} {line}")
            return
        reason = waiting_reason(message)
        if reason is None:
            return
        waited = self.clock() - self.since[key]
        n = self.nudged[key]
        due = self.NUDGES[n] if n < len(self.NUDGES) else self.NUDGES[-1] * (n - 2)
        if waited >= due:
            self.nudged[key] = n + 1
            why = explain(reason)
            self._print(f"{key} still queued after {waited / 60:.0f} min ({reason})"
                        + (f": {why}" if why else ""))

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _ready(resource: Resource) -> bool:
    return resource.status.get("phase") == "Running"


def _job_done(resource: Resource) -> bool:
    return resource.kind == KIND_JOB and resource.status.get("phase") in TERMINAL_PHASES


def _job_exit_code(resource: Resource) -> int:
    code = resource.status.get("exitCode")
    if resource.status.get("phase") == "Succeeded":
        return 0
    return code if isinstance(code, int) and code != 0 else 1


class Session:
    """The reconcilers and the objects of one `up`."""

    def __init__(self, runtime: Runtime, resources: list[Resource]) -> None:
        self.resources = resources
        self.clusters = GroupReconciler(runtime)  # reconciles clusters too
        self.jobs = JobReconciler(runtime)
        self.autoscalers = AutoscalerReconciler(runtime)
        self.store = EmbeddedStore(resources)

    def cluster_of(self, group: Resource) -> dict[str, Any] | None:
        meta = group.manifest["metadata"]
        found = self.store.find(meta["namespace"], group.manifest["spec"]["cluster"])
        if found is None or found.deleting:
            return None
        return {**found.manifest, "status": found.status}

    async def reconcile(self, r: Resource) -> None:
        groups = self.store.groups_of(r.manifest)
        if r.kind == KIND_CLUSTER:
            new = await self.clusters.reconcile(r.manifest, r.status, groups=groups)
        elif r.kind == KIND_WORKER_GROUP:
            new = await self.clusters.reconcile_group(r.manifest, r.status, self.cluster_of(r),
                                                      groups=groups)
        elif r.kind == KIND_AUTOSCALER:
            new = await self.autoscalers.reconcile(r.manifest, r.status, self.store,
                                                   groups=groups)
        else:
            new = await self.jobs.reconcile(r.manifest, r.status, self.store)
        r.status.update(new)
        r.status = {k: v for k, v in r.status.items() if v is not None}
        if r.status.get("idleExpired"):
            r.deleting = True

    async def step(self) -> list[Resource]:
        """One pass: reconcile every object, tear down those being deleted (dropping them
        once no job of theirs is left). Returns the objects visited."""
        visited = list(self.resources)
        for r in visited:
            if r.deleting:
                if not await self.teardown(r):
                    self.resources.remove(r)
            else:
                await self.reconcile(r)
        return visited

    async def teardown(self, r: Resource) -> list[str]:
        """Jobs of `r` still not ended; empty once it is gone."""
        if r.kind == KIND_JOB:
            return await self.jobs.teardown(r.manifest, self.store, keep_output=True)
        if r.kind == KIND_AUTOSCALER:
            return []
        return await self.clusters.teardown(r.manifest, whole_cluster=r.kind == KIND_CLUSTER)


async def _teardown(session: Session, progress: Progress) -> bool:
    resources = session.resources
    reconciler = session.clusters
    if any(not _job_done(r) for r in resources):
        progress.say("tearing down: cancelling every job of " +
                     ", ".join(r.key for r in resources))
    deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
    pending = list(resources)
    while pending and time.monotonic() < deadline:
        pending = [r for r in pending if await session.teardown(r)]
        if pending:
            await asyncio.sleep(1.0)
    for backend in reconciler.runtime.backends.values():
        shutdown = getattr(backend, "shutdown", None)
        if shutdown is not None:
            await shutdown()
    if pending:
        progress.say("could not confirm the end of jobs of " + ", ".join(r.key for r in pending))
        return False
    progress.say("no job left")
    return True


async def up(runtime: Runtime, resources: list[Resource], command: list[str] | None = None,
             out: TextIO = sys.stdout) -> int:
    """Reconcile until interrupted, until `command` has run, or until every DaskJob has
    ended; then tear down. The exit code is the command's or the DaskJobs'."""
    session = Session(runtime, resources)
    progress = Progress(out)
    tail = OutputTail(out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    has_jobs = any(r.kind == KIND_JOB for r in resources)
    announced: set[str] = set()
    exit_code = 0
    proc: asyncio.subprocess.Process | None = None
    try:
        while not stop.is_set():
            for r in await session.step():
                if r.deleting:
                    if r not in resources:
                        progress.say(f"{r.key} deleted, no job of it left")
                    continue
                if r.kind == KIND_JOB and r.status.get("outputFile"):
                    tail.pump(r.status["outputFile"])
                progress.show(r)
                if _ready(r) and r.key not in announced and r.kind in (KIND_CLUSTER,
                                                                        KIND_WORKER_GROUP):
                    announced.add(r.key)
                    progress.say(f"{r.key} is ready: scheduler {r.status['schedulerAddress']}"
                                 f", dashboard {r.status.get('dashboardURL') or '-'}")
                    files = tls.files_of_status(r.status.get("tls") or {})
                    if files is not None:
                        progress.say(tls.connect_hint(files))
                    if command is None and not has_jobs:
                        progress.say("press Ctrl-C to tear the cluster down")
                if r.status.get("phase") == "Failed" and r.kind == KIND_CLUSTER \
                        and not r.manifest["metadata"].get("ownerReferences"):
                    exit_code = 1
                    stop.set()
            if has_jobs and all(_job_done(r) or r.kind != KIND_JOB for r in resources) \
                    and not any(r.deleting for r in resources):
                jobs = [r for r in resources if r.kind == KIND_JOB]
                exit_code = max(_job_exit_code(r) for r in jobs)
                for r in jobs:
                    progress.say(f"{r.key} {r.status['phase'].lower()}"
                                 f" (exit code {r.status.get('exitCode', '-')}); output in "
                                 f"{r.status.get('outputFile')}")
                break
            if not any(r.kind in (KIND_CLUSTER, KIND_JOB) for r in resources):
                progress.say("nothing left to run")
                break
            if command is not None and proc is None and all(
                    _ready(r) for r in resources if r.kind != KIND_AUTOSCALER):
                env = dict(os.environ)
                first = next(r for r in resources if r.kind == KIND_CLUSTER)
                env["DASK_SCHEDULER_ADDRESS"] = first.status["schedulerAddress"]
                files = tls.files_of_status(first.status.get("tls") or {})
                if files is not None:  # its Client() connects over TLS as it is
                    env.update(files.client_env())
                proc = await asyncio.create_subprocess_exec(*command, env=env)
            if proc is not None and proc.returncode is not None:
                exit_code = proc.returncode
                progress.say(f"command exited with {exit_code}")
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), LOOP_PERIOD_S)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if proc is not None and proc.returncode is None:
            # Interrupted: the command gets the signal too, then the cluster goes.
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
        clean = await _teardown(session, progress)
    if stop.is_set() and exit_code == 0 and (command is not None or has_jobs):
        exit_code = 130  # interrupted before the command or job could finish
    return exit_code if clean else (exit_code or 1)
