"""(b) This operator under kopf, against a Kubernetes API over HTTP (bench.kube).

"Requested" is the API call that creates the DaskCluster (what `kubectl apply` does); the
operator (one kopf operator for the whole run, already running, as a deployment would be)
reacts to the watch event, reconciles at once, then on its 1 s timer. The bench reads the
object over the API every STATUS_POLL_S, as a client would (a watch would notice at most
that much sooner). Deletion is the API's delete: kopf's finalizer runs the teardown
handler, which retries every 2 s until no job is left, then releases the object.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes

from dask_hpc_operator.constants import GROUP, KIND_CLUSTER, VERSION, plural

from ..common import STATUS_POLL_S, cluster_manifest, operator_owner, wait_for
from . import KOPF


class KopfLaunch:
    system = KOPF

    def __init__(self, n: int, namespace: str, name: str,
                 api: kubernetes.client.CustomObjectsApi) -> None:
        self.n = n
        self.api = api
        self.namespace, self.name = namespace, name
        self.args = (GROUP, VERSION, namespace, plural(KIND_CLUSTER))
        self._owner = operator_owner(namespace, name)
        self.created = False

    async def _get(self) -> dict[str, Any] | None:
        try:
            found = await asyncio.to_thread(self.api.get_namespaced_custom_object,
                                            *self.args, self.name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found if isinstance(found, dict) else None

    async def _status(self) -> dict[str, Any]:
        obj = await self._get()
        status = (obj or {}).get("status") or {}
        if status.get("phase") == "Failed":
            raise RuntimeError(f"the cluster failed: {status.get('message')}")
        return dict(status)

    async def request(self) -> None:
        body = cluster_manifest(self.namespace, self.name, self.n, stamp=False)
        await asyncio.to_thread(self.api.create_namespaced_custom_object, *self.args, body)
        self.created = True

    async def address(self, timeout: float) -> str:
        async def known() -> str | None:
            return (await self._status()).get("schedulerAddress")
        return await wait_for(known, timeout, "the operator's schedulerAddress", STATUS_POLL_S)

    async def reported_ready(self, timeout: float) -> bool:
        async def ready() -> bool:
            return ((await self._status()).get("workers") or {}).get("ready") == self.n
        return await wait_for(ready, timeout, f"status workers.ready == {self.n}",
                              STATUS_POLL_S)

    async def delete(self) -> None:
        await asyncio.to_thread(self.api.delete_namespaced_custom_object, *self.args,
                                self.name)

    async def released(self, timeout: float) -> None:
        async def gone() -> bool:
            return await self._get() is None
        await wait_for(gone, timeout, "the finalizer to release the DaskCluster",
                       STATUS_POLL_S)

    def owns(self, name: str, comment: str) -> bool:
        return self._owner(name, comment)

    async def close(self) -> list[str]:
        if not self.created:
            return []
        try:
            if await self._get() is not None:
                try:
                    await self.delete()
                except kubernetes.client.ApiException as exc:
                    if exc.status != 404:
                        raise
                await self.released(60.0)
        except Exception as exc:
            return [f"kopf teardown: {type(exc).__name__}: {exc}"]
        return []
