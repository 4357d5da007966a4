"""Talking to a cluster's Dask scheduler: its scheduler file and its RPC.

Only the scheduler's own RPC handlers are used (identity, retire_workers), not the optional
HTTP routes, which sites often leave disabled. A cluster with `protocol: tls` is spoken to
with its own credentials (`security`, from tls.security_for): its scheduler refuses anyone
else, the operator included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from distributed.core import rpc
from distributed.security import Security

from hpc_bridge.scripts import RenderContext

from .planning import DaskView, WorkerView
from .tls import connection_args

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 5.0
RETIRE_TIMEOUT_S = 300.0


def read_scheduler_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):  # absent, or being written right now
        return None
    return data if isinstance(data, dict) and data.get("address") else None


def dashboard_url(info: dict[str, Any]) -> str:
    port = (info.get("services") or {}).get("dashboard")
    host = urlsplit(info["address"]).hostname or "localhost"
    return f"http://{host}:{port}/status" if port else ""


def _worker_view(info: dict[str, Any], address: str) -> WorkerView:
    metrics = info.get("metrics") or {}
    return WorkerView(name=str(info.get("name", address)), address=address,
                      managed_bytes=int(metrics.get("managed_bytes", 0) or 0))


def group_query(namespace: str, cluster: str, name: str,
                resources: tuple[tuple[str, float], ...]) -> dict[str, Any]:
    """One worker group as the scaling handler takes it: workers are named after their
    jobs, `dask.<ns>.<cluster>.<group>.<index>[-<process>]`."""
    return {"name": name, "prefix": f"dask.{namespace}.{cluster}.{name}.",
            "resources": dict(resources)}


async def scaling_advice(address: str, groups: list[dict[str, Any]],
                         security: Security | None = None) -> dict[str, Any] | None:
    """The scheduler's per-group advice (hpc_bridge.preloads.scaling), or None when it
    cannot be had (no scheduler, or one started without the preload)."""
    try:
        async with rpc(address, timeout=RPC_TIMEOUT_S,
                       connection_args=connection_args(security)) as scheduler:
            answer = await asyncio.wait_for(scheduler.dask_hpc_scaling(groups=groups),
                                            RPC_TIMEOUT_S)
    except Exception as exc:
        # The handler runs against the compute nodes' distributed, whatever its version:
        # any failure there must cost the advice, never the reconcile.
        log.info("no scaling advice from %s: %r", address, exc)
        return None
    return answer if isinstance(answer, dict) else None


async def observe(scheduler_file: str, groups: list[dict[str, Any]] | None = None,
                  security: Security | None = None) -> DaskView | None:
    """The scheduler's view, or None if it has not started or does not answer. With
    `groups`, also the order in which the scheduler would close their workers and since
    when it has been idle (from the scaling handler; absent on older schedulers)."""
    info = read_scheduler_file(scheduler_file)
    if info is None:
        return None
    address = info["address"]
    if security is None and address.startswith("tls://"):
        log.warning("scheduler %s uses TLS, and no credentials were given for it", address)
        return None
    try:
        async with rpc(address, timeout=RPC_TIMEOUT_S,
                       connection_args=connection_args(security)) as scheduler:
            ident = await asyncio.wait_for(scheduler.identity(), RPC_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        log.info("scheduler %s does not answer: %s", address, exc)
        return None
    workers = tuple(_worker_view(w, addr) for addr, w in (ident.get("workers") or {}).items())
    view = DaskView(address=address, dashboard_url=dashboard_url(info), workers=workers)
    advice = await scaling_advice(address, groups, security) if groups else None
    if advice is None:
        return view
    order = tuple(str(n) for g in (advice.get("groups") or {}).values()
                  for n in g.get("to_close") or ())
    idle = advice.get("idle_since")
    return replace(view, close_order=order,
                   idle_since=float(idle) if isinstance(idle, (int, float)) else None,
                   clock=float(advice.get("time") or 0.0))


async def retire(address: str, worker_names: list[str],
                 security: Security | None = None) -> set[str]:
    """Retire workers so their data moves first; returns the names actually retired.

    The scheduler leaves out any worker holding keys it could not copy elsewhere; those
    must not be cancelled.
    """
    async with rpc(address, timeout=RPC_TIMEOUT_S,
                   connection_args=connection_args(security)) as scheduler:
        retired = await asyncio.wait_for(
            scheduler.retire_workers(names=worker_names, close_workers=True, remove=True),
            RETIRE_TIMEOUT_S)
    return {str(info.get("name", addr)) for addr, info in (retired or {}).items()}


def remove_stale_scheduler_files(ctx: RenderContext) -> None:
    """Before a new scheduler job, so workers never find the previous scheduler's address."""
    for protocol in ctx.protocols:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ctx.scheduler_file_for(protocol))
