"""Per-worker-group scaling advice, computed inside the Dask scheduler by its own logic.

Why a preload: `distributed` has one cluster-wide adaptive target (`Scheduler.adaptive_target`)
and no notion of which workers a task can use, so an autoscaler built on it alone would add
CPU workers for tasks that wait for a GPU, and would never add GPU workers. The operator also
must not depend on the scheduler's optional HTTP routes, so the advice is served through the
scheduler's RPC, by a handler this preload registers:

    from distributed.core import rpc
    async with rpc(address) as scheduler:
        answer = await scheduler.dask_hpc_scaling(
            groups=[{"name": "default", "prefix": "dask.ns.c1.default.", "resources": {}},
                    {"name": "gpu", "prefix": "dask.ns.c1.gpu.", "resources": {"GPU": 1}}],
            target_duration="5s")  # optional; default distributed.adaptive.target-duration

Pass every worker group of the cluster, not only the one being scaled: which group a task
belongs to depends on which groups exist. End each prefix with "." (`JobIdentity.job_name`
of the group's index 0, minus the index) so group `gpu` never claims group `gpu2`'s workers.
The answer (JSON-able; through the RPC, msgpack hands the lists back as tuples):

    {"groups": {"<name>": {"target": int,          # Dask workers wanted (not jobs)
                           "workers": [str, ...],   # connected workers of the group
                           "to_close": [str, ...],  # safe to retire, in closing order
                           "processing": int, "queued": int, "unrunnable": int}},
     "idle_since": float | None,   # scheduler's clock; None while anything runs or waits
     "time": float,                # the scheduler's clock now (compare idle_since to this)
     "tasks": {"total": int, "processing": int, "queued": int, "unrunnable": int,
               "unsatisfiable": int}}   # waiting for resources no listed group provides

What is the scheduler's own logic and what is written here:
- `target` is `Scheduler.adaptive_target` itself (occupancy / target duration, bounded by the
  task count, raised under memory pressure, lowered only by what `workers_to_close` allows),
  run against a view of the scheduler that shows one group's workers and one group's tasks.
- `to_close` is `Scheduler.workers_to_close` on the same view (idle workers holding the least
  data first, keeping enough memory for the data), with the workers of one batch job grouped
  (`key=`) so a job running several worker processes is closed whole.
- `idle_since` is the scheduler's own, kept by its `check_idle` periodic callback.
- Hand-written, because distributed has no per-resource target: the partition. A worker
  belongs to the group whose name prefix it carries (worker names are the job names,
  `<prefix><index>` or `<prefix><index>-<process>`). A task belongs to exactly one group:
  with resource restrictions, the first listed group whose workers each provide them all;
  without, the first listed group that provides no resources (else the first group). A
  task's group is decided by what it needs, not by where it happens to run, so CPU tasks
  running on a GPU worker never ask for more GPU workers (they only keep that busy worker
  off `to_close`, as the scheduler would). A group's occupancy is the
  scheduler's `_calc_occupancy` over the group's processing tasks, with each worker's
  pending-transfer time split by its share of that worker's tasks; when the group owns every
  processing task it is exactly `total_occupancy`, so with one group that covers every
  worker the answer equals `adaptive_target()`. Host and worker restrictions are ignored.

Everything runs on the scheduler's event loop and writes no scheduler state. It reads a few
private attributes (`_calc_occupancy`, `WorkerState._network_occ`, and whatever
`adaptive_target` reads through the view); the unit test comparing a single group with
`adaptive_target()` is what catches a distributed release that changes them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from distributed.metrics import time
from distributed.scheduler import Scheduler, TaskState, WorkerState

HANDLER_NAME = "dask_hpc_scaling"


class _Group:
    def __init__(self, spec: Mapping[str, Any]) -> None:
        name, prefix = spec.get("name"), spec.get("prefix")
        if not isinstance(name, str) or not isinstance(prefix, str) or not prefix:
            raise ValueError(f"a group needs a name and a non-empty prefix, got {spec!r}")
        self.name = name
        self.prefix = prefix
        self.resources = {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
        self._job = re.compile(re.escape(prefix) + r"\d+")

    def has(self, ws: WorkerState) -> bool:
        return str(ws.name).startswith(self.prefix)

    def can_run(self, needs: Mapping[str, float]) -> bool:
        return all(self.resources.get(r, 0.0) >= amount for r, amount in needs.items())

    def job_of(self, ws: WorkerState) -> str:
        """Workers `<prefix><i>-0`, `<prefix><i>-1` are processes of one job: close together."""
        match = self._job.match(str(ws.name))
        return match.group(0) if match else str(ws.address)


class _GroupView:
    """The scheduler as seen by one group: only the attributes `adaptive_target` and
    `workers_to_close` read are narrowed; everything else (task prefixes, plugins, bandwidth,
    configuration) is the real scheduler's."""

    def __init__(self, scheduler: Scheduler, workers: dict[str, WorkerState],
                 queued: list[TaskState], unrunnable: dict[TaskState, float],
                 total_occupancy: float, key: Callable[[WorkerState], str]) -> None:
        self._scheduler = scheduler
        self.workers = workers
        self.queued = queued
        self.unrunnable = unrunnable
        self.total_occupancy = total_occupancy
        self._key = key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def workers_to_close(self, **kwargs: Any) -> list[str]:
        kwargs.setdefault("key", self._key)
        return Scheduler.workers_to_close(cast(Any, self), **kwargs)

    def adaptive_target(self, target_duration: Any = None) -> int:
        return Scheduler.adaptive_target(cast(Any, self), target_duration)


def _owner_finder(groups: Sequence[_Group]) -> Callable[[TaskState], str | None]:
    plain = [g for g in groups if not g.resources] or list(groups)
    default = plain[0].name if plain else None

    def owner(ts: TaskState) -> str | None:
        needs = ts.resource_restrictions
        if not needs:
            return default
        return next((g.name for g in groups if g.can_run(needs)), None)

    return owner


def scaling_advice(scheduler: Scheduler, groups: Sequence[Mapping[str, Any]],
                   target_duration: Any = None) -> dict[str, Any]:
    """The handler's answer (see the module docstring); a plain function for tests."""
    parsed = [_Group(g) for g in groups]
    if len({g.name for g in parsed}) != len(parsed):
        raise ValueError("group names must be unique")
    owner = _owner_finder(parsed)

    prefix_counts: dict[str, defaultdict[str, int]] = {g.name: defaultdict(int) for g in parsed}
    network: dict[str, float] = defaultdict(float)
    processing: dict[str, int] = defaultdict(int)
    total_processing = 0
    for ws in scheduler.workers.values():
        if not ws.processing:
            continue
        share: dict[str, int] = defaultdict(int)
        for ts in ws.processing:
            name = owner(ts)
            if name is not None:
                prefix_counts[name][ts.prefix.name] += 1
                share[name] += 1
        for name, count in share.items():
            network[name] += ws._network_occ * count / len(ws.processing)
            processing[name] += count
        total_processing += len(ws.processing)

    queued: dict[str, list[TaskState]] = defaultdict(list)
    for ts in scheduler.queued:  # iteration order kept: adaptive_target samples the first 100
        name = owner(ts)
        if name is not None:
            queued[name].append(ts)
    unrunnable: dict[str, dict[TaskState, float]] = defaultdict(dict)
    unsatisfiable = 0
    for ts, since in scheduler.unrunnable.items():
        name = owner(ts)
        if name is None:
            unsatisfiable += 1
        else:
            unrunnable[name][ts] = since

    answer: dict[str, Any] = {}
    for group in parsed:
        if processing[group.name] == total_processing:
            occupancy = scheduler.total_occupancy
        else:
            occupancy = scheduler._calc_occupancy(prefix_counts[group.name],
                                                  network[group.name])
        view = _GroupView(
            scheduler,
            {addr: ws for addr, ws in scheduler.workers.items() if group.has(ws)},
            queued[group.name], unrunnable[group.name], occupancy, group.job_of)
        answer[group.name] = {
            "target": int(view.adaptive_target(target_duration)),
            "workers": [str(ws.name) for ws in view.workers.values()],
            "to_close": [str(n) for n in view.workers_to_close(attribute="name")],
            "processing": processing[group.name],
            "queued": len(queued[group.name]),
            "unrunnable": len(unrunnable[group.name]),
        }
    return {
        "groups": answer,
        "idle_since": scheduler.idle_since,
        "time": time(),
        "tasks": {"total": len(scheduler.tasks), "processing": total_processing,
                  "queued": len(scheduler.queued), "unrunnable": len(scheduler.unrunnable),
                  "unsatisfiable": unsatisfiable},
    }


def dask_setup(scheduler: Scheduler) -> None:
    def handler(groups: list[dict[str, Any]], target_duration: Any = None) -> dict[str, Any]:
        return scaling_advice(scheduler, groups, target_duration)

    scheduler.handlers[HANDLER_NAME] = handler
