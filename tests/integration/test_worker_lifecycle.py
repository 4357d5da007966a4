"""Worker jobs that end on a real one-node SLURM: killed, failing at start, and reaching
their walltime while a computation runs.

Like test_slurm_cluster.py these drive the reconcile directly (what the operator's timer
does), waiting on conditions with deadlines; every test ends with no live job of its own.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import replace
from typing import Any

import pytest
from distributed import Client

from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from helpers import Cluster, manifest, slurm_runtime, wait_until
from hpc_bridge.model import Role

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]


def conditions(status: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in status["conditions"]}


def worker_jobs(runtime: Runtime, uid: str, live: bool = True) -> list[str]:
    """The cluster's worker job ids as the operator last saw them."""
    snapshot = runtime.poller("slurm").snapshot
    return sorted(j.job_id for j in snapshot.owned_by(uid)
                  if j.identity.role is Role.WORKER and (j.state.live or not live))


async def test_killed_worker_job_is_replaced(site: SiteConfig) -> None:
    """scancel is not a failure: the job is replaced at once, with no failure reported."""
    runtime, _ = slurm_runtime(site)
    cluster = Cluster(runtime, manifest("killed", 2))
    await cluster.until("Running", 2)
    uid = cluster.body["metadata"]["uid"]
    before = worker_jobs(runtime, uid)
    assert len(before) == 2
    victim = before[0]
    subprocess.run(["scancel", victim], check=True)

    async def replaced() -> dict[str, Any] | None:
        status = await cluster.step()
        live = worker_jobs(runtime, uid)
        ok = (victim not in live and len(live) == 2 and status["phase"] == "Running"
              and status["workers"]["ready"] == 2)
        return dict(status) if ok else None

    status = await wait_until(replaced, 60, f"a replacement of job {victim}")
    assert status["replicas"] == 2
    assert status["workers"] == {"desired": 2, "pending": 0, "running": 2, "ready": 2}
    new = set(worker_jobs(runtime, uid)) - set(before)
    assert len(new) == 1, new
    assert "WorkersFailing" not in conditions(status)
    await cluster.delete()


async def test_failing_workers_back_off_then_stop_with_the_error(site: SiteConfig) -> None:
    """A prologue that fails at start: retried with growing delays, then reported (the
    error output's tail on the object) and no longer submitted."""
    fast = replace(site, failure_backoff_base=1.0, failure_backoff_max=4.0, failure_limit=3)
    runtime, runner = slurm_runtime(fast)
    cluster = Cluster(runtime, manifest(
        "broken", 1, prologue=["source /nonexistent/dask-hpc-site-env.sh", "exit 3"]))
    messages: list[str] = []

    async def stopped() -> dict[str, Any] | None:
        status = await cluster.step()
        assert status["phase"] != "Failed", status["message"]
        messages.append(status["message"])
        cond = conditions(status).get("WorkersFailing")
        return dict(status) if cond and "stopped after 3 failures" in cond["message"] else None

    status = await wait_until(stopped, 60, "the failing group to stop")
    cond = conditions(status)["WorkersFailing"]
    assert (cond["status"], cond["reason"]) == ("True", "RepeatedFailures")
    assert "3 worker jobs failed in a row" in cond["message"]
    assert "(NonZeroExitCode" in cond["message"]  # squeue's reason (it has no exit code)
    # the tail of the newest failed job's .err file, written by SLURM on the shared fs
    assert "/nonexistent/dask-hpc-site-env.sh: No such file or directory" in cond["message"]
    # between failures the plan waited, and said so
    assert any("retrying in" in m for m in messages), messages
    assert status["workers"]["desired"] == 1 and status["replicas"] == 0
    uid = cluster.body["metadata"]["uid"]
    assert len(worker_jobs(runtime, uid, live=False)) == 3
    assert runner.calls["sbatch"] == 4  # the scheduler and three workers

    # It stays stopped: keep reconciling for a while, nothing more is submitted.
    loop = asyncio.get_running_loop()
    until = loop.time() + 6

    async def a_while_later() -> bool:
        await cluster.step()
        return loop.time() >= until

    await wait_until(a_while_later, 20, "six seconds of reconciles")
    assert runner.calls["sbatch"] == 4

    # A fixed spec (a new generation) is tried again.
    cluster.body["spec"]["worker"]["prologue"] = []
    cluster.body["metadata"]["generation"] += 1
    status = await cluster.until("Running", 1, timeout=60)
    assert "WorkersFailing" not in conditions(status)
    await cluster.delete()


COMPUTE_S = 180.0  # stages of 100 short tasks go on for this long: two worker walltimes


@pytest.mark.timeout(480)
async def test_computation_outlives_worker_walltimes(site: SiteConfig) -> None:
    """Workers with a 90 s walltime (SLURM rounds it up to 2 min) retire after about a
    minute; their replacements were submitted before, so the group never drops below its
    replicas and a 3-minute computation with intermediate results finishes intact."""
    replicas = 2
    runtime, _ = slurm_runtime(site)
    cluster = Cluster(runtime, manifest("walltime", replicas, walltime="00:01:30"))
    status = await cluster.until("Running", replicas)
    uid = cluster.body["metadata"]["uid"]
    live_counts: list[int] = []
    ended: dict[str, str] = {}  # worker job id -> how it ended

    async def compute(client: Client) -> tuple[int, list[int], list[int]]:
        def slow_inc(x: int) -> int:
            import time

            time.sleep(0.2)
            return x + 1

        loop = asyncio.get_running_loop()
        start = loop.time()
        stages = [client.map(slow_inc, range(100))]
        while loop.time() - start < COMPUTE_S:
            await client.gather(stages[-1])  # one stage after the other
            stages.append(client.map(slow_inc, stages[-1]))
        # Every stage's results are still held: the first one must have survived every
        # retirement (its keys moved off the workers that left).
        return len(stages), await client.gather(stages[-1]), await client.gather(stages[0])

    async with Client(status["schedulerAddress"], asynchronous=True) as client:
        computation = asyncio.ensure_future(compute(client))

        async def finished() -> bool:
            s = await cluster.step()
            assert s["phase"] != "Failed", s["message"]
            live_counts.append(s["workers"]["pending"] + s["workers"]["running"])
            for job in runtime.poller("slurm").snapshot.owned_by(uid):
                if job.identity.role is Role.WORKER and job.state.terminal:
                    ended[job.job_id] = f"{job.state.value} {job.reason}".strip()
            return computation.done()

        try:
            await wait_until(finished, COMPUTE_S + 180, "the computation", interval=1.0)
        finally:
            if not computation.done():
                computation.cancel()
        stages, last, first = computation.result()  # raises KilledWorker had a task been lost

    assert last == [i + stages for i in range(100)]
    assert first == [i + 1 for i in range(100)]
    assert min(live_counts) >= replicas, live_counts
    # Replacements happened, and the replaced workers retired themselves (exit 0) before
    # the batch system's kill: none ended FAILED (TIMEOUT).
    assert len(ended) >= replicas, ended
    assert all(how.startswith("COMPLETED") for how in ended.values()), ended
    await cluster.delete()
