"""Talking to a cluster's Dask scheduler: its scheduler file and its RPC.

Only the scheduler's own RPC handlers are used (identity, retire_workers), not the optional
HTTP routes, which sites often leave disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any
from urllib.parse import urlsplit

from distributed.core import rpc

from hpc_bridge.scripts import RenderContext

from .planning import DaskView, WorkerView

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


async def observe(scheduler_file: str) -> DaskView | None:
    """The scheduler's view, or None if it has not started or does not answer."""
    info = read_scheduler_file(scheduler_file)
    if info is None:
        return None
    address = info["address"]
    try:
        async with rpc(address, timeout=RPC_TIMEOUT_S) as scheduler:
            ident = await asyncio.wait_for(scheduler.identity(), RPC_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        log.info("scheduler %s does not answer: %s", address, exc)
        return None
    workers = tuple(_worker_view(w, addr) for addr, w in (ident.get("workers") or {}).items())
    return DaskView(address=address, dashboard_url=dashboard_url(info), workers=workers)


async def retire(address: str, worker_names: list[str]) -> set[str]:
    """Retire workers so their data moves first; returns the names actually retired.

    The scheduler leaves out any worker holding keys it could not copy elsewhere; those
    must not be cancelled.
    """
    async with rpc(address, timeout=RPC_TIMEOUT_S) as scheduler:
        retired = await asyncio.wait_for(
            scheduler.retire_workers(names=worker_names, close_workers=True, remove=True),
            RETIRE_TIMEOUT_S)
    return {str(info.get("name", addr)) for addr, info in (retired or {}).items()}


def remove_stale_scheduler_files(ctx: RenderContext) -> None:
    """Before a new scheduler job, so workers never find the previous scheduler's address."""
    for protocol in ctx.protocols:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ctx.scheduler_file_for(protocol))
