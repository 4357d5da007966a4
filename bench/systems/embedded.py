"""(a) This operator standalone: the embedded Session that `dask-hpc up` runs.

The DaskCluster is held in memory and reconciled by `dask_hpc_operator.embedded.Session`,
one `step()` every LOOP_PERIOD_S (0.5 s) as `up` does, in this process. Each launch gets
its own Runtime (its own batched poller and CommandRunner), as each `dask-hpc up` process
would; the start of that process (Python, imports, reading the manifest) is not timed.
Deletion marks the object deleted while the loop keeps stepping: the Session's own
teardown (what a DaskJob's cluster and an idle timeout go through; Ctrl-C runs the same
`Runtime.end_jobs` with 1 s between rounds instead of 0.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from dask_hpc_operator.embedded import LOOP_PERIOD_S, Resource, Session
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig

from ..common import STATUS_POLL_S, cluster_manifest, operator_owner, wait_for
from . import EMBEDDED

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0


class Driver:
    """`dask-hpc up`'s loop: one Session.step(), then LOOP_PERIOD_S, until stopped. A
    failing step is noted and the loop goes on (kopf retries too). Stopped by an event,
    never cancelled mid-step, unless a step hangs past STOP_TIMEOUT_S."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.errors: list[str] = []
        self.steps = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.session.step()
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                log.warning("reconcile failed: %s", exc)
            self.steps += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), LOOP_PERIOD_S)

    async def stop(self) -> list[str]:
        self.stopping.set()
        if self.task is None:
            return []
        done, _ = await asyncio.wait({self.task}, timeout=STOP_TIMEOUT_S)
        if done:
            return []
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=5)
        return [f"the reconcile loop did not stop within {STOP_TIMEOUT_S:.0f} s; cancelled"]


class EmbeddedLaunch:
    system = EMBEDDED

    def __init__(self, n: int, namespace: str, name: str, site: SiteConfig) -> None:
        self.n = n
        self.resource = Resource(cluster_manifest(namespace, name, n))
        self.session = Session(Runtime(site), [self.resource])
        self.driver = Driver(self.session)
        self._owner = operator_owner(namespace, name)

    def _failed(self) -> None:
        if self.resource.status.get("phase") == "Failed":
            raise RuntimeError(f"the cluster failed: {self.resource.status.get('message')}")

    async def request(self) -> None:
        self.driver.start()

    async def address(self, timeout: float) -> str:
        async def known() -> str | None:
            self._failed()
            return self.resource.status.get("schedulerAddress")
        return await wait_for(known, timeout, "the operator's schedulerAddress", STATUS_POLL_S)

    async def reported_ready(self, timeout: float) -> bool:
        async def ready() -> bool:
            self._failed()
            return (self.resource.status.get("workers") or {}).get("ready") == self.n
        return await wait_for(ready, timeout, f"status workers.ready == {self.n}",
                              STATUS_POLL_S)

    async def delete(self) -> None:
        self.resource.deleting = True

    async def released(self, timeout: float) -> None:
        async def dropped() -> bool:
            return self.resource not in self.session.resources
        await wait_for(dropped, timeout, "the Session to drop the deleted cluster",
                       STATUS_POLL_S)

    def owns(self, name: str, comment: str) -> bool:
        return self._owner(name, comment)

    async def close(self) -> list[str]:
        notes: list[str] = []
        if self.resource in self.session.resources and self.driver.task is not None:
            self.resource.deleting = True
            try:
                await self.released(60.0)
            except Exception as exc:
                notes.append(f"operator teardown: {exc}")
        notes += await self.driver.stop()
        notes += self.driver.errors
        return notes
