"""hpc_bridge.preloads.scaling against a real in-process Dask scheduler and real workers.

Worker names follow JobIdentity.job_name (`dask.<ns>.<cluster>.<group>.<index>`, plus
`-<i>` for a job running several processes), which is how the handler tells groups apart.
"""

from __future__ import annotations

import ast
import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, Scheduler, Worker
from distributed.core import rpc

from hpc_bridge.preloads import scaling

PRELOAD = Path(scaling.__file__)
PREFIX = "dask.default.c1."
DEFAULT = {"name": "default", "prefix": PREFIX + "default.", "resources": {}}
GPU = {"name": "gpu", "prefix": PREFIX + "gpu.", "resources": {"GPU": 1}}
GROUPS = [DEFAULT, GPU]
TARGET_DURATION = 1.0  # small, so a handful of short tasks asks for several workers

pytestmark = pytest.mark.timeout(60)


def slow(x: int, seconds: float = 0.5) -> int:
    time.sleep(seconds)
    return x


# The workers run in this process, so a task can block on a plain event that the test sets
# before tearing down (a worker waits for its running tasks when it closes).
RELEASE = threading.Event()


def blocked(x: int) -> int:
    RELEASE.wait(20)
    return x


@asynccontextmanager
async def cluster(*workers: tuple[str, Mapping[str, float]]
                  ) -> AsyncIterator[tuple[Scheduler, Client]]:
    """A scheduler preloaded from the module's file, as the scheduler job does it."""
    async with AsyncExitStack() as stack:
        s = await stack.enter_async_context(
            Scheduler(dashboard_address=":0", preload=[str(PRELOAD)]))
        for name, resources in workers:
            await stack.enter_async_context(
                Worker(s.address, name=name, nthreads=1, resources=dict(resources)))
        client = await stack.enter_async_context(Client(s.address, asynchronous=True))
        yield s, client


def ask(s: Scheduler, groups: Sequence[dict[str, Any]] = GROUPS) -> dict[str, Any]:
    answer: dict[str, Any] = s.handlers[scaling.HANDLER_NAME](
        groups=list(groups), target_duration=TARGET_DURATION)
    return answer


async def wait_for(probe: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll a condition on the scheduler's state until it holds, or fail saying what."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def answer_when(s: Scheduler, holds: Callable[[dict[str, Any]], bool], what: str,
                      timeout: float = 10.0) -> dict[str, Any]:
    """The handler's first answer for which `holds` is true."""
    deadline = time.monotonic() + timeout
    while not holds(answer := ask(s)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {answer}")
        await asyncio.sleep(0.05)
    return answer


def names(group: str, *indices: str) -> list[str]:
    return [f"{PREFIX}{group}.{i}" for i in indices]


async def test_one_group_without_resources_equals_adaptive_target() -> None:
    only = [DEFAULT]
    workers: list[tuple[str, Mapping[str, float]]] = [(n, {}) for n in names("default", "0", "1")]
    async with cluster(*workers) as (s, client):
        seen: list[int] = []
        assert ask(s, only)["groups"]["default"]["target"] == s.adaptive_target(TARGET_DURATION)
        futures = client.map(slow, range(12), pure=False)
        await wait_for(lambda: s.queued or s.unrunnable, "queued tasks")
        while not all(f.done() for f in futures):
            target = ask(s, only)["groups"]["default"]["target"]
            assert target == s.adaptive_target(TARGET_DURATION)  # no await between: same state
            seen.append(target)
            await asyncio.sleep(0.2)
        assert max(seen) > 2  # the burst asked for more than the two workers there are
        # With results held on the workers (memory counts), then with nothing at all.
        assert ask(s, only)["groups"]["default"]["target"] == s.adaptive_target(TARGET_DURATION)
        del futures
        await wait_for(lambda: not s.tasks, "released results")
        assert ask(s, only)["groups"]["default"]["target"] == s.adaptive_target(TARGET_DURATION)


async def test_cpu_work_scales_the_default_group_not_the_gpu_group() -> None:
    async with cluster((names("default", "0")[0], {}), (names("gpu", "0")[0], {"GPU": 1})) \
            as (s, client):
        futures = client.map(slow, range(30), pure=False)
        answer = await answer_when(s, lambda a: a["groups"]["default"]["target"] >= 4,
                                   "the default group's target to grow")
        gpu = answer["groups"]["gpu"]
        # CPU tasks may run on the GPU worker, but they never ask for more GPU workers.
        assert gpu["target"] <= len(gpu["workers"]) == 1
        assert (gpu["processing"], gpu["queued"], gpu["unrunnable"]) == (0, 0, 0)
        assert answer["groups"]["default"]["queued"] + answer["groups"]["default"][
            "processing"] > 0
        await client.cancel(futures)


async def test_gpu_work_scales_the_gpu_group_not_the_default_group() -> None:
    async with cluster((names("default", "0")[0], {}), (names("gpu", "0")[0], {"GPU": 1})) \
            as (s, client):
        futures = [client.submit(slow, i, resources={"GPU": 1}, pure=False) for i in range(10)]
        answer = await answer_when(s, lambda a: a["groups"]["gpu"]["target"] >= 3,
                                   "the gpu group's target to grow")
        default = answer["groups"]["default"]
        assert default["target"] == 0  # idle, holding no data: the scheduler would close it
        assert (default["processing"], default["queued"], default["unrunnable"]) == (0, 0, 0)
        assert answer["groups"]["gpu"]["processing"] == 10
        await client.cancel(futures)


async def test_gpu_tasks_without_gpu_workers_still_ask_for_the_gpu_group() -> None:
    async with cluster((names("default", "0")[0], {})) as (s, client):
        futures = [client.submit(slow, i, resources={"GPU": 1}, pure=False) for i in range(4)]
        futures.append(client.submit(slow, 0, resources={"FPGA": 1}, pure=False))
        answer = await answer_when(s, lambda a: a["tasks"]["unrunnable"] == 5,
                                   "unrunnable tasks")
        gpu, default = answer["groups"]["gpu"], answer["groups"]["default"]
        assert gpu["workers"] == [] and gpu["unrunnable"] == 4
        assert gpu["target"] >= 1
        assert default["target"] == 0 and default["unrunnable"] == 0
        assert answer["tasks"]["unsatisfiable"] == 1  # FPGA: no listed group provides it
        await client.cancel(futures)


async def test_to_close_lists_only_the_groups_workers_and_whole_jobs() -> None:
    # Job 0 of the default group runs two worker processes; they must close together.
    default = names("default", "0-0", "0-1", "1")
    gpu = names("gpu", "0", "1")
    async with cluster(*[(n, {}) for n in default], *[(n, {"GPU": 1}) for n in gpu]) \
            as (s, client):
        answer = await answer_when(s, lambda a: len(a["groups"]["default"]["workers"]) == 3
                                   and len(a["groups"]["gpu"]["workers"]) == 2, "all workers")
        to_close = answer["groups"]["default"]["to_close"]
        assert sorted(to_close) == sorted(default)  # all idle, no data: all may go
        job0 = [to_close.index(n) for n in default[:2]]
        assert abs(job0[0] - job0[1]) == 1
        assert sorted(answer["groups"]["gpu"]["to_close"]) == sorted(gpu)

        # Data on one process of job 0 keeps the whole job: closing its empty sibling alone
        # would not free the job.
        holder = next(a for a, ws in s.workers.items() if ws.name == default[0])
        data = await client.scatter(b"x" * 100_000, workers=[holder])
        answer = await answer_when(
            s, lambda a: default[0] not in a["groups"]["default"]["to_close"], "the data")
        assert answer["groups"]["default"]["to_close"] == [default[2]]
        assert answer["groups"]["default"]["target"] == 2
        del data

        # A busy GPU worker is not offered; the idle one still is, and nothing of the
        # default group appears in the gpu group's list.
        RELEASE.clear()
        future = client.submit(blocked, 0, resources={"GPU": 1}, pure=False)
        answer = await answer_when(s, lambda a: a["groups"]["gpu"]["processing"] == 1,
                                   "the GPU task to start")
        busy = next(ws.name for ws in s.workers.values() if ws.processing)
        assert busy in gpu
        gpu_close = answer["groups"]["gpu"]["to_close"]
        assert busy not in gpu_close and set(gpu_close) <= set(gpu)
        RELEASE.set()
        assert await future == 0


async def test_idle_since_is_the_schedulers() -> None:
    async with cluster((names("default", "0")[0], {})) as (s, client):
        start = ask(s)
        assert start["idle_since"] is not None and start["idle_since"] <= start["time"]
        future = client.submit(slow, 0, 1.0, pure=False)
        await wait_for(lambda: ask(s)["idle_since"] is None, "idle_since to clear")
        await future
        after = await answer_when(s, lambda a: a["idle_since"] is not None, "idle again")
        assert start["idle_since"] < after["idle_since"] <= after["time"]


async def test_rpc_call_and_bad_request() -> None:
    """The exact call the operator makes, through the scheduler's RPC (msgpack both ways)."""
    async with cluster((names("default", "0")[0], {})) as (s, _client), \
            rpc(s.address) as scheduler:
        answer = await scheduler.dask_hpc_scaling(groups=GROUPS)
        assert set(answer) == {"groups", "idle_since", "time", "tasks"}
        assert set(answer["groups"]) == {"default", "gpu"}
        assert set(answer["groups"]["default"]) == {"target", "workers", "to_close",
                                                    "processing", "queued", "unrunnable"}
        # msgpack hands lists back as tuples.
        assert list(answer["groups"]["default"]["workers"]) == names("default", "0")
        with pytest.raises(ValueError, match="prefix"):
            await scheduler.dask_hpc_scaling(groups=[{"name": "x"}])


def test_preload_imports_only_stdlib_dask_and_distributed() -> None:
    """Its source is copied to compute nodes where this package may not be installed."""
    tree = ast.parse(PRELOAD.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break a preload loaded by path"
            roots.add((node.module or "").split(".")[0])
    assert roots - {"dask", "distributed", "__future__"} <= set(sys.stdlib_module_names)
