"""The four systems of section 1 behind one interface (`Launch`), so that the clocks in
bench.ready and bench.teardown are the same code for every system.

* embedded: this operator as `dask-hpc up` runs it (an embedded Session, stepped).
* kopf_api: this operator under kopf, against a Kubernetes API (kmock's emulator).
* jobqueue: dask-jobqueue's SLURMCluster, scale(N).
* floor: N `dask worker` processes against an in-process scheduler, no batch system.
"""

from __future__ import annotations

from typing import Protocol

EMBEDDED, KOPF, JOBQUEUE, FLOOR = "operator", "kopf", "jobqueue", "floor"
SYSTEMS = (EMBEDDED, KOPF, JOBQUEUE, FLOOR)
LABELS = {EMBEDDED: "operator (dask-hpc up)", KOPF: "operator (kopf + API)",
          JOBQUEUE: "dask-jobqueue", FLOOR: "floor (no batch system)"}


class Launch(Protocol):
    """One cluster of N workers of one system, from request to deletion."""

    system: str
    n: int

    async def request(self) -> None:
        """What "cluster requested" means for this system; returns once asked (it does not
        wait for the cluster)."""
        ...

    async def address(self, timeout: float) -> str:
        """The scheduler's address, as soon as the system tells it to its user."""
        ...

    async def reported_ready(self, timeout: float) -> bool:
        """Until the system itself reports N ready workers (the operator's status); False
        where the system has no such report."""
        ...

    async def delete(self) -> None:
        """Start the deletion (returns at once; `released` waits for its end)."""
        ...

    async def released(self, timeout: float) -> None:
        """Until the system says the cluster is gone (object dropped, finalizer released,
        close() returned)."""
        ...

    def owns(self, name: str, comment: str) -> bool:
        """Is this SLURM job (name, comment) one of this cluster's?"""
        ...

    async def close(self) -> list[str]:
        """Last resort, idempotent, never raises: end whatever is left; returns notes."""
        ...
