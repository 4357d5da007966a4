"""API identity of the operator: the one place that names the group, versions and kinds.

Everything else (handlers, CRD generation, the CLI, the chart test) imports these, so a
rename happens in one line.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "hpc.dask.org"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

KIND_CLUSTER: Final = "DaskCluster"
KIND_WORKER_GROUP: Final = "DaskWorkerGroup"
KIND_JOB: Final = "DaskJob"
KIND_AUTOSCALER: Final = "DaskAutoscaler"

# kind -> (plural, singular, short names)
NAMES: Final[dict[str, tuple[str, str, tuple[str, ...]]]] = {
    KIND_CLUSTER: ("daskclusters", "daskcluster", ("dhc", "dcl")),
    KIND_WORKER_GROUP: ("daskworkergroups", "daskworkergroup", ("dwg",)),
    KIND_JOB: ("daskjobs", "daskjob", ("dj",)),
    KIND_AUTOSCALER: ("daskautoscalers", "daskautoscaler", ("das",)),
}
CATEGORY: Final = "dask-hpc"

FINALIZER: Final = f"{GROUP}/cleanup"
LABEL_CLUSTER: Final = f"{GROUP}/cluster"
LABEL_JOB: Final = f"{GROUP}/job"  # on a DaskCluster a DaskJob created
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGER_NAME: Final = "dask-hpc-operator"

DEFAULT_GROUP_NAME: Final = "default"

# Per-cluster TLS (protocol: tls; tls.py). A cluster's credentials live in <staging>/tls and,
# under the operator with the API, in the Secret <cluster>-dask-tls (owned by the cluster).
TLS_DIR_NAME: Final = "tls"
TLS_SECRET_SUFFIX: Final = "-dask-tls"
# One year: longer than any walltime a site allows in practice (the schema caps it at 365
# days); a cluster outliving its certificate must be re-created.
TLS_VALIDITY_DAYS: Final = 365


def plural(kind: str) -> str:
    return NAMES[kind][0]
