"""DaskCluster objects through the Kubernetes API, for DaskJobs under the operator, and the
Secret holding a TLS cluster's credentials (tls.py).

kopf has no public client for creating other objects, so this uses the official
`kubernetes` client (its blocking calls run in a thread so the operator's loop never waits
on the network). The operator's CLI builds it from the in-cluster service account or the
kubeconfig; tests point it at their API server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import tls
from .constants import GROUP, KIND_CLUSTER, KIND_JOB, KIND_WORKER_GROUP, VERSION, plural
from .site_config import ConfigError


class KubeClusterStore:
    def __init__(self, api: kubernetes.client.CustomObjectsApi) -> None:
        self.api = api
        # Core objects (the Secret of a TLS cluster) through the same connection.
        self.core = kubernetes.client.CoreV1Api(api.api_client)
        self.args = (GROUP, VERSION)
        self.plural = plural(KIND_CLUSTER)

    @classmethod
    def from_environment(cls) -> KubeClusterStore:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            try:
                kubernetes.config.load_kube_config()
            except (kubernetes.config.ConfigException, OSError) as exc:
                raise ConfigError(
                    f"no Kubernetes API to talk to: not in a pod, and no usable kubeconfig "
                    f"({exc}). Set KUBECONFIG or run in the cluster; without Kubernetes, "
                    "use `dask-hpc up -f FILE`") from exc
        return cls(kubernetes.client.CustomObjectsApi())

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get_object(KIND_CLUSTER, namespace, name)

    async def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = await asyncio.to_thread(
                self.api.get_namespaced_custom_object, *self.args, namespace, plural(kind),
                name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found if isinstance(found, dict) else None

    async def list_uids(self, namespaces: list[str] | None = None) -> set[str]:
        """The uids of every resource that may own batch jobs (clusters, worker groups,
        DaskJobs), in these namespaces or all: what the orphan sweep keeps."""
        uids: set[str] = set()
        pages: list[Any]
        for kind in (KIND_CLUSTER, KIND_WORKER_GROUP, KIND_JOB):
            if namespaces:
                pages = [await asyncio.to_thread(self.api.list_namespaced_custom_object,
                                                 *self.args, ns, plural(kind))
                         for ns in namespaces]
            else:
                pages = [await asyncio.to_thread(self.api.list_cluster_custom_object,
                                                 *self.args, plural(kind))]
            uids |= {str(item["metadata"]["uid"]) for page in pages
                     for item in page.get("items", [])}
        return uids

    async def create(self, manifest: dict[str, Any]) -> None:
        namespace = manifest["metadata"]["namespace"]
        try:
            await asyncio.to_thread(self.api.create_namespaced_custom_object, *self.args,
                                    namespace, self.plural, manifest)
        except ApiException as exc:
            if exc.status != 409:  # created by an earlier, interrupted reconcile
                raise

    async def delete(self, namespace: str, name: str) -> None:
        try:
            await asyncio.to_thread(self.api.delete_namespaced_custom_object, *self.args,
                                    namespace, self.plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def put_secret(self, secret: dict[str, Any]) -> None:
        """Create a TLS cluster's Secret, or bring an existing one (an earlier, interrupted
        reconcile's) to this content. A Secret of that name that is not this operator's
        for this cluster is left alone, and the error says so (tls.secret_update)."""
        namespace, name = secret["metadata"]["namespace"], secret["metadata"]["name"]
        body: Any = secret  # the client takes a plain dict for any model
        try:
            await asyncio.to_thread(self.core.create_namespaced_secret, namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            patch: Any = tls.secret_update(secret)  # a list: sent as a JSON patch
            try:
                await asyncio.to_thread(self.core.patch_namespaced_secret, name, namespace,
                                        patch)
            except ApiException as exc2:
                if exc2.status != 422:
                    raise
                raise tls.TLSError(f"Secret {namespace}/{name} exists and is not this "
                                  "operator's: delete or rename it, and the cluster's "
                                  "credentials will be published there") from exc2

    async def delete_secret(self, namespace: str, name: str) -> None:
        try:
            await asyncio.to_thread(self.core.delete_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        """What `kubectl scale` does through the scale subresource's specReplicasPath."""
        await asyncio.to_thread(self.api.patch_namespaced_custom_object, *self.args, namespace,
                                plural(kind), name, {"spec": {"worker": {"replicas": replicas}}})
