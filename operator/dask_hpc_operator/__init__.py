"""dask-hpc-operator: declarative Dask clusters on HPC batch schedulers.

`from dask_hpc_operator import HPCCluster` is the Python API. It is imported on first use
(PEP 562) so that the operator, the CLI and the job scripts' imports of submodules do not
pay for distributed's cluster machinery and the Kubernetes client they may never use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hpc_cluster import HPCCluster

__all__ = ["HPCCluster"]


def __getattr__(name: str) -> Any:
    if name == "HPCCluster":
        from .hpc_cluster import HPCCluster

        return HPCCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
