"""The orphan sweep: cancel batch jobs whose resource no longer exists.

Deletion normally ends a resource's jobs (finalizers, `up`'s teardown). Jobs are orphaned
when that never ran: a finalizer removed by hand, a namespace force-deleted, an operator
that was down while its resources were deleted, a `dask-hpc up` killed with SIGKILL. They
would hold nodes until their walltime. Every job carries its owner's uid, so a job whose
uid matches no DaskCluster, DaskWorkerGroup or DaskJob is an orphan.

Order matters: the batch system is polled first and the resources listed after, so every
job in the snapshot was submitted by a resource that existed before the listing began; a
resource created meanwhile cannot lose a job it has just submitted. Only namespaces this
operator watches are swept (another operator, or another namespace's, is not ours to judge).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable

from hpc_bridge.backends.base import BatchSystemError
from hpc_bridge.model import ObservedJob
from hpc_bridge.poller import BatchedPoller, BatchSystemUnavailable, Snapshot

from .reconcile import Runtime

log = logging.getLogger(__name__)


def _owned_by(uid: str) -> Callable[[ObservedJob], bool]:
    return lambda job: job.identity.owner_uid == uid


def orphans(jobs: Iterable[ObservedJob], live_uids: Collection[str],
            namespaces: Collection[str] | None = None) -> list[ObservedJob]:
    """Live jobs whose owner is not among `live_uids`, in the swept namespaces (None: all)."""
    return [j for j in jobs if j.state.live and j.identity.owner_uid not in live_uids
            and (namespaces is None or j.identity.namespace in namespaces)]


async def sweep(runtime: Runtime, list_uids: Callable[[], Awaitable[set[str]]],
                namespaces: Collection[str] | None = None) -> list[str]:
    """Cancel the orphans on every backend in use (the site default at least) under every
    submitting identity (the site's and each namespace policy's submitAs: an squeue as one
    user lists only that user's jobs); returns the ids cancelled. Cancellation goes through
    the same mechanism as a deletion, as the orphan's namespace's identity first.

    An identity that cannot list or cancel (a missing sudo rule, an unreachable login
    node) is logged and skipped: the other identities' orphans are still cancelled, and
    its own wait for the next sweep."""
    snapshots: list[tuple[str, BatchedPoller, Snapshot]] = []
    for kind, poller in runtime.sweep_pollers():
        try:
            snapshots.append((kind, poller, await poller.refresh()))
        except BatchSystemUnavailable as exc:
            log.warning("orphan sweep: cannot list %s jobs as one identity, skipped: %s",
                        kind, exc)
    live = await list_uids()
    cancelled: list[str] = []
    for kind, poller, snapshot in snapshots:
        found = orphans(snapshot.jobs.values(), live, namespaces)
        for uid in sorted({j.identity.owner_uid for j in found}):
            ids = [j.job_id for j in snapshot.jobs.values() if j.identity.owner_uid == uid
                   and j.state.live and j.job_id not in cancelled]
            if not ids:
                continue  # another identity's listing had them (squeueAllUsers)
            namespace = next(j.identity.namespace for j in found if j.identity.owner_uid == uid)
            log.warning("cancelling %s jobs of %s, which no longer exists: %s", kind,
                        uid, ", ".join(ids))
            try:
                await runtime.end_jobs_on(uid, [runtime.poller(kind, namespace), poller],
                                          _owned_by(uid))
            except (BatchSystemUnavailable, BatchSystemError) as exc:
                log.warning("orphan sweep: could not cancel every job of %s: %s", uid, exc)
                continue
            cancelled += ids
    return cancelled
