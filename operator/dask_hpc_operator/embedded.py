"""`dask-hpc up`: the operator's reconcile, in the foreground, without Kubernetes.

The same ClusterReconciler the kopf handlers call runs here in a loop over manifests held in
memory. It is how a user on a login node (or a laptop, with the local backend) gets a
cluster from a manifest, and how the README's quick start works with nothing installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO

from .constants import KIND_CLUSTER, KIND_WORKER_GROUP
from .reconcile import GroupReconciler, Runtime
from .validation import ManifestError, validate

LOOP_PERIOD_S = 0.5
TEARDOWN_TIMEOUT_S = 120.0


@dataclass
class Resource:
    manifest: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        meta = self.manifest["metadata"]
        return f"{meta.get('namespace', 'default')}/{meta['name']}"


def prepare(docs: list[dict[str, Any]], backend: str | None) -> list[Resource]:
    """Validate everything before anything is submitted; give each object the metadata
    the API server would (uid, namespace, generation)."""
    resources = []
    for doc in docs:
        valid = validate(doc)
        if valid["kind"] not in (KIND_CLUSTER, KIND_WORKER_GROUP):
            raise ManifestError("kind", f"{valid['kind']} is not handled by `up` in this "
                                "version", "run DaskCluster and DaskWorkerGroup manifests")
        meta = valid.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta["uid"] = str(uuid.uuid4())
        meta["generation"] = 1
        if backend and valid["kind"] == KIND_CLUSTER:
            valid["spec"]["backend"] = backend
        resources.append(Resource(valid))
    # Clusters first: a group's reconcile reads its cluster's status.
    return sorted(resources, key=lambda r: r.manifest["kind"] != KIND_CLUSTER)


def _cluster_of(group: Resource, resources: list[Resource]) -> dict[str, Any] | None:
    meta = group.manifest["metadata"]
    for r in resources:
        m = r.manifest["metadata"]
        if r.manifest["kind"] == KIND_CLUSTER and m["name"] == group.manifest["spec"][
                "cluster"] and m["namespace"] == meta["namespace"]:
            return {**r.manifest, "status": r.status}
    return None


class Progress:
    """One line per change of what a cluster is doing; quiet while nothing changes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self.last: dict[str, str] = {}

    def show(self, resource: Resource) -> None:
        status = resource.status
        line = f"{status.get('phase', '?')}: {status.get('message', '')}"
        if self.last.get(resource.key) != line:
            self.last[resource.key] = line
            elapsed = time.monotonic() - self.started
            print(f"[{elapsed:6.1f}s] {resource.key} {line}", file=self.out, flush=True)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _ready(resource: Resource) -> bool:
    return resource.status.get("phase") == "Running"


async def _teardown(reconciler: GroupReconciler, resources: list[Resource],
                    progress: Progress) -> bool:
    progress.say("tearing down: cancelling every job of " +
                 ", ".join(r.key for r in resources))
    deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
    pending = list(resources)
    while pending and time.monotonic() < deadline:
        pending = [r for r in pending if await reconciler.teardown(
            r.manifest, whole_cluster=r.manifest["kind"] == KIND_CLUSTER)]
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


async def _run_command(command: list[str], resources: list[Resource]) -> int:
    env = dict(os.environ)
    env["DASK_SCHEDULER_ADDRESS"] = resources[0].status["schedulerAddress"]
    proc = await asyncio.create_subprocess_exec(*command, env=env)
    return await proc.wait()


async def up(runtime: Runtime, resources: list[Resource], command: list[str] | None = None,
             out: TextIO = sys.stdout) -> int:
    """Reconcile until interrupted (or until `command` has run); then tear down."""
    reconciler = GroupReconciler(runtime)  # reconciles clusters too
    progress = Progress(out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announced: set[str] = set()
    exit_code = 0
    runner: asyncio.Task[int] | None = None
    try:
        while not stop.is_set():
            for r in resources:
                if r.manifest["kind"] == KIND_CLUSTER:
                    new = await reconciler.reconcile(r.manifest, r.status)
                else:
                    new = await reconciler.reconcile_group(r.manifest, r.status,
                                                           _cluster_of(r, resources))
                r.status.update(new)
                r.status = {k: v for k, v in r.status.items() if v is not None}
                progress.show(r)
                if _ready(r) and r.key not in announced:
                    announced.add(r.key)
                    progress.say(f"{r.key} is ready: scheduler {r.status['schedulerAddress']}"
                                 f", dashboard {r.status.get('dashboardURL') or '-'}")
                    if command is None:
                        progress.say("press Ctrl-C to tear the cluster down")
                if r.status.get("phase") == "Failed" and r.manifest["kind"] == KIND_CLUSTER:
                    exit_code = 1
                    stop.set()
            if command is not None and runner is None and all(map(_ready, resources)):
                runner = asyncio.ensure_future(_run_command(command, resources))
            if runner is not None and runner.done():
                exit_code = runner.result()
                progress.say(f"command exited with {exit_code}")
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), LOOP_PERIOD_S)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if runner is not None and not runner.done():
            runner.cancel()
        clean = await _teardown(reconciler, resources, progress)
    if stop.is_set() and exit_code == 0 and command is not None and runner is None:
        exit_code = 130  # interrupted before the command could run
    return exit_code if clean else (exit_code or 1)
