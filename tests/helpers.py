"""Helpers shared by test modules (importable because tests/ is on pythonpath)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from dask_hpc_operator.reconcile import GroupReconciler, Runtime
from dask_hpc_operator.site_config import SiteConfig
from hpc_bridge.backends.base import CommandRunner
from hpc_bridge.backends.slurm import SlurmBackend

T = TypeVar("T")

def slurm_problem() -> str | None:
    """Why SLURM cannot be used here, or None when a node is up and idle."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM clients are not installed (run scripts/slurm-up.sh as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is slurmctld running? (scripts/slurm-up.sh)"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated")
                                      for s in states):
        return f"no usable SLURM node (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


async def wait_until(check: Callable[[], Awaitable[T | None]], timeout: float,
                     what: str, interval: float = 0.5) -> T:
    """Poll an async condition until it returns a truthy value; fail with `what`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def live_slurm_jobs(uid: str) -> list[str]:
    """Our jobs for this owner that squeue still shows as not finished."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%k"],
                         capture_output=True, text=True, check=True).stdout
    live = []
    for line in out.splitlines():
        job_id, state, comment = line.split("|", 2)
        if uid in comment and state in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            live.append(job_id)
    return live


def manifest(name: str, replicas: int, **worker: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hpc.dask.org/v1alpha1",
        "kind": "DaskCluster",
        "metadata": {"name": name, "namespace": "it", "uid": str(uuid.uuid4()),
                     "generation": 1},
        "spec": {"backend": "slurm", "scheduler": {"memory": "1GiB"},
                 "worker": {"replicas": replicas, "cores": 1, "memory": "1GiB", **worker}},
    }


def group_manifest(name: str, cluster: str, replicas: int, **worker: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hpc.dask.org/v1alpha1",
        "kind": "DaskWorkerGroup",
        "metadata": {"name": name, "namespace": "it", "uid": str(uuid.uuid4()),
                     "generation": 1},
        "spec": {"cluster": cluster,
                 "worker": {"replicas": replicas, "cores": 1, "memory": "1GiB", **worker}},
    }


class Cluster:
    """A DaskCluster or DaskWorkerGroup manifest plus its status, reconciled like the
    operator would (a group reads its `cluster`'s manifest and status)."""

    created: list[Cluster] = []

    def __init__(self, runtime: Runtime, body: dict[str, Any],
                 cluster: Cluster | None = None) -> None:
        self.reconciler = GroupReconciler(runtime)
        self.body = body
        self.cluster = cluster
        self.deleted = False
        self.status: dict[str, Any] = {}
        Cluster.created.append(self)

    @property
    def is_group(self) -> bool:
        return bool(self.body["kind"] == "DaskWorkerGroup")

    async def step(self) -> dict[str, Any]:
        if self.is_group:
            parent = self.cluster
            known = None if parent is None or parent.deleted else {**parent.body,
                                                                    "status": parent.status}
            new = await self.reconciler.reconcile_group(self.body, self.status, known)
        else:
            new = await self.reconciler.reconcile(self.body, self.status)
        self.status.update(new)
        return self.status

    async def until(self, phase: str, ready: int, timeout: float = 90) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            s = await self.step()
            assert s["phase"] != "Failed", s["message"]
            ok = s["phase"] == phase and s["workers"]["ready"] == ready
            return dict(s) if ok else None
        return await wait_until(check, timeout, f"{phase} with {ready} ready workers")

    def scale(self, replicas: int) -> None:
        self.body["spec"]["worker"]["replicas"] = replicas
        self.body["metadata"]["generation"] += 1

    async def delete(self) -> None:
        async def gone() -> bool:
            return not await self.reconciler.teardown(self.body, whole_cluster=not self.is_group)
        await wait_until(gone, 60, "teardown")
        self.deleted = True
        assert live_slurm_jobs(self.body["metadata"]["uid"]) == []


def slurm_runtime(site: SiteConfig) -> tuple[Runtime, CommandRunner]:
    runner = CommandRunner()
    return Runtime(site, backends={"slurm": SlurmBackend(runner)}), runner


# --- screenshots of reports in a real browser ------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1600) -> bytes:
    """A PNG of `page` as headless Chromium draws it at this window size."""
    assert CHROMIUM is not None, "chromium is not installed (apt-get install chromium)"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={png.parent / '.chromium-profile'}",
                    f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return png.read_bytes()


def png_dimensions(png: bytes) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, the first after the signature."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def png_detail(png: bytes) -> int:
    """How many distinct byte values the PNG's pixel stream holds: a blank page compresses
    to a few (the filters turn a flat colour into zeros), a drawn one to hundreds."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    data, i = b"", 8
    while i < len(png):
        length = int.from_bytes(png[i:i + 4], "big")
        if png[i + 4:i + 8] == b"IDAT":
            data += png[i + 8:i + 8 + length]
        i += 12 + length
    return len(set(zlib.decompress(data)))
