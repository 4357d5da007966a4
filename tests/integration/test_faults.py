"""Faults on a real SLURM: a killed scheduler job, slurmctld stopped, and polling that stays
bounded however many clusters the operator holds.

The reconcilers are driven directly here, as the operator's timer would drive them (the
operator process itself killed and restarted is tests/e2e/test_operator_faults.py). squeue
calls are counted outside the operator, by a wrapper script named `squeue` put first on
PATH that appends a line to a file and execs the real squeue (as bench/counting.py does).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from dask_hpc_operator.embedded import Resource, Session
from dask_hpc_operator.reconcile import BATCH_CONDITION
from dask_hpc_operator.site_config import SiteConfig
from helpers import Cluster, group_manifest, manifest, slurm_runtime, wait_until
from hpc_bridge.backends.base import CommandRunner
from hpc_bridge.backends.slurm import SQUEUE_FORMAT, parse_squeue
from hpc_bridge.model import JobIdentity, Role
from hpc_bridge.poller import BatchedPoller

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]

REAL_SQUEUE = shutil.which("squeue") or "squeue"
REPO = Path(__file__).resolve().parents[2]
CTLD_PID_FILE = Path("/run/slurmctld.pid")
NAMESPACE = "faults"


def live_jobs(owner_uid: str) -> dict[str, JobIdentity]:
    """Job id -> identity of the owner's unfinished jobs (an array's tasks one by one, a
    pending range included), from the real squeue (never the counting wrapper, so the
    test's own look does not count as the operator's)."""
    out = subprocess.run([REAL_SQUEUE, "--noheader", "--states=all",
                          f"--format={SQUEUE_FORMAT}"],
                         capture_output=True, text=True, check=True).stdout
    return {j.job_id: j.identity for j in parse_squeue(out)
            if j.identity.owner_uid == owner_uid and not j.state.terminal}


def in_own_namespace(body: dict[str, Any]) -> dict[str, Any]:
    """A namespace of these tests' own: an orphan sweep tried elsewhere over namespace
    `it` (with its own idea of which resources exist) must not take their jobs."""
    body["metadata"]["namespace"] = NAMESPACE
    return body


def cancel_all(owner_uid: str) -> None:
    """Clean-up that needs no poller (one in back-off refuses to be asked)."""
    if jobs := live_jobs(owner_uid):
        subprocess.run(["scancel", *jobs], check=False)


def roles(owner_uid: str) -> collections.Counter[Role]:
    return collections.Counter(i.role for i in live_jobs(owner_uid).values())


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


class SqueueCounter:
    """`squeue` first on PATH: a script that appends a line per call, then runs the real one."""

    def __init__(self, directory: Path) -> None:
        self.log = directory / "squeue-calls.log"
        script = directory / "squeue"
        script.write_text(f"#!/bin/sh\necho squeue >> {shlex.quote(str(self.log))}\n"
                          f'exec {shlex.quote(REAL_SQUEUE)} "$@"\n')
        script.chmod(0o755)
        self.log.touch()

    def read(self) -> int:
        return len(self.log.read_text().splitlines())


@pytest.fixture
def squeue_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SqueueCounter:
    counter = SqueueCounter(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    return counter


async def step_with_events(cluster: Cluster) -> list[tuple[str, str, str]]:
    """One reconcile as the operator's timer runs it, keeping the events it posts."""
    events: list[tuple[str, str, str]] = []
    new = await cluster.reconciler.reconcile(
        cluster.body, cluster.status, lambda *event: events.append(event))
    cluster.status.update(new)
    return events


async def until_both(cluster: Cluster, group: Cluster, ready: int,
                     timeout: float = 120) -> None:
    """Cluster and group reconciled in turn (as the operator does) until both run."""
    async def check() -> bool:
        c, g = await cluster.step(), await group.step()
        assert c["phase"] != "Failed", c["message"]
        return bool(c["phase"] == "Running" and c["workers"]["ready"] == ready
                    and g["phase"] == "Running" and g["workers"]["ready"] == ready)
    await wait_until(check, timeout, f"cluster and group Running with {ready} ready")


# --- 2. the scheduler job killed ------------------------------------------------------------

async def test_killed_scheduler_fails_the_cluster_by_default(site: SiteConfig) -> None:
    """onFailure: Fail (the default): the next reconcile says Failed and names the job, its
    workers are cancelled, nothing is resubmitted, and it stays so."""
    runtime, runner = slurm_runtime(site)
    cluster = Cluster(runtime, in_own_namespace(manifest("lost-fail", 1)))
    uid = cluster.body["metadata"]["uid"]
    status = await cluster.until("Running", 1)
    scheduler_job = status["schedulerJobId"]
    submitted = runner.calls["sbatch"]

    subprocess.run(["scancel", scheduler_job], check=True)
    await runtime.poller("slurm", NAMESPACE).refresh()  # what the next timer tick sees
    events = await step_with_events(cluster)
    status = cluster.status
    assert status["phase"] == "Failed", status
    assert status["message"].startswith(f"scheduler job {scheduler_job} ended"), status
    ready = conditions(status)["SchedulerReady"]
    assert ready["status"] == "False" and ready["reason"] == "Failed"
    assert "onFailure is Fail" in ready["message"]
    assert ("Warning", "Failed") in [(t, r) for t, r, _ in events]

    async def workers_gone() -> bool:
        return roles(uid)[Role.WORKER] == 0
    await wait_until(workers_gone, 30, "the dead scheduler's workers to be cancelled")
    for _ in range(3):
        assert (await cluster.step())["phase"] == "Failed"
    assert runner.calls["sbatch"] == submitted, "Fail must not resubmit"
    assert not live_jobs(uid)
    await cluster.delete()


async def test_killed_scheduler_is_restarted_up_to_max_restarts(site: SiteConfig) -> None:
    """onFailure: Restart, maxRestarts: 1. First loss: the next reconcile says the
    scheduler was lost (phase, condition, events, the job named), cancels the workers —
    its DaskWorkerGroup's too — and submits a new scheduler and workers; the cluster and
    its group run again on the new scheduler and compute. Second loss: over the limit, the
    cluster is Failed with what to do, and no job of it or its group is left."""
    runtime, runner = slurm_runtime(site)
    body = in_own_namespace(manifest("lost-restart", 1))
    body["spec"]["scheduler"].update(onFailure="Restart", maxRestarts=1)
    cluster = Cluster(runtime, body)
    group_body = in_own_namespace(group_manifest("lost-restart-g", "lost-restart", 1))
    group = Cluster(runtime, group_body, cluster)
    uid, group_uid = body["metadata"]["uid"], group.body["metadata"]["uid"]
    await until_both(cluster, group, 1)
    first = cluster.status["schedulerJobId"]
    old = set(live_jobs(uid)) | set(live_jobs(group_uid))
    assert len(old) == 3

    subprocess.run(["scancel", first], check=True)
    await runtime.poller("slurm", NAMESPACE).refresh()
    events = await step_with_events(cluster)
    status = cluster.status
    assert status["phase"] == "Pending", status
    assert status["message"].startswith(f"scheduler lost: scheduler job {first} ended"), status
    assert "restart 1 of 1" in status["message"]
    ready = conditions(status)["SchedulerReady"]
    assert ready["reason"] == "SchedulerLost" and first in ready["message"]
    assert status["schedulerRestarts"] == 1
    reasons = [r for _, r, _ in events]
    assert "SchedulerLost" in reasons and "SchedulerRestarted" in reasons, events
    second = status["schedulerJobId"]
    assert second != first

    await until_both(cluster, group, 1)
    assert cluster.status["schedulerJobId"] == second
    now = live_jobs(uid)
    assert not old & (set(now) | set(live_jobs(group_uid))), "an old job survived"
    assert sorted((i.role, i.index) for i in now.values()) == [
        (Role.SCHEDULER, 1), (Role.WORKER, 1)], now  # no duplicate, the next indices
    assert roles(group_uid) == {Role.WORKER: 1}
    async with Client(cluster.status["schedulerAddress"], asynchronous=True) as client:
        assert await client.submit(lambda x: x * 2, 21) == 42
        assert len((await client.scheduler.identity())["workers"]) == 2  # cluster + group

    subprocess.run(["scancel", second], check=True)
    await runtime.poller("slurm", NAMESPACE).refresh()
    await cluster.step()
    status = cluster.status
    assert status["phase"] == "Failed", status
    assert f"scheduler job {second} ended" in status["message"]
    assert "spec.scheduler.maxRestarts is 1" in status["message"]
    await group.step()
    assert group.status["phase"] == "Pending" and "has failed" in group.status["message"]

    async def nothing_left() -> bool:
        return not live_jobs(uid) and not live_jobs(group_uid)
    await wait_until(nothing_left, 30, "the lost scheduler's workers (cluster and group)")
    sbatches = runner.calls["sbatch"]
    await cluster.step()
    await group.step()
    assert runner.calls["sbatch"] == sbatches and cluster.status["phase"] == "Failed"
    await group.delete()
    await cluster.delete()


WAIT_FOREVER = """
import time
from distributed import Client
with Client() as client:
    client.wait_for_workers(1, timeout=120)
    print("connected", flush=True)
    while True:
        client.submit(time.sleep, 0.2, pure=False).result()
"""


async def test_killed_scheduler_fails_a_daskjob(site: SiteConfig) -> None:
    """A DaskJob's cluster is never restarted (its command's client is connected to that
    scheduler): the job is Failed, naming the lost scheduler job, and its runner and
    cluster are gone."""
    runtime, _ = slurm_runtime(site)
    job = Resource(in_own_namespace({
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskJob",
        "metadata": {"name": "lost-job", "uid": str(uuid.uuid4()), "generation": 1},
        "spec": {"job": {"script": WAIT_FOREVER, "memory": "512MiB"},
                 "cluster": {"backend": "slurm", "scheduler": {"memory": "512MiB"},
                             "worker": {"replicas": 1, "memory": "512MiB"}}}}))
    session = Session(runtime, [job])
    uids = {job.manifest["metadata"]["uid"]}
    try:
        async def connected() -> Resource | None:
            await session.step()
            uids.update(r.manifest["metadata"]["uid"] for r in session.resources)
            assert job.status.get("phase") not in ("Succeeded", "Failed"), job.status
            out = Path(job.status.get("outputFile", "/nonexistent"))
            child = next((r for r in session.resources if r.kind == "DaskCluster"), None)
            return child if out.exists() and "connected" in out.read_text() else None
        child = await wait_until(connected, 120, "the DaskJob's command to connect")
        scheduler_job = child.status["schedulerJobId"]
        assert child.manifest["spec"]["scheduler"]["onFailure"] == "Fail"
        subprocess.run(["scancel", scheduler_job], check=True)

        async def failed() -> dict[str, Any] | None:
            await session.step()
            return job.status if job.status.get("phase") == "Failed" else None
        status = await wait_until(failed, 60, "the DaskJob to fail")
        print(f"DaskJob: {status['message']}")
        assert f"scheduler job {scheduler_job} ended" in status["message"] \
            or "the command exited with" in status["message"], status

        async def settled() -> bool:
            await session.step()
            return len(session.resources) == 1 and not any(live_jobs(u) for u in uids)
        await wait_until(settled, 60, "the job's runner and cluster to be gone")
    finally:
        for uid in uids:
            cancel_all(uid)


# --- 3. slurmctld stopped ---------------------------------------------------------------------

def _ctld_pid() -> int | None:
    try:
        pid = int(CTLD_PID_FILE.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _ctld_running() -> bool:
    return subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0


@contextlib.contextmanager
def slurmctld_stopped() -> Iterator[None]:
    """slurmctld stopped (SIGTERM, as an administrator or a crash-restart loop would),
    always brought back by scripts/slurm-up.sh, which starts it when it is not running.
    slurmd keeps the jobs running meanwhile."""
    pid = _ctld_pid()
    assert pid is not None, f"no slurmctld pid in {CTLD_PID_FILE}"
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _ctld_running():
            assert time.monotonic() < deadline, "slurmctld did not stop"
            time.sleep(0.2)
        yield
    finally:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm-up.sh")], check=True,
                       timeout=300)


@pytest.mark.skipif(os.geteuid() != 0, reason="stopping slurmctld needs root")
async def test_slurmctld_outage_is_reported_backed_off_and_survived(
        site: SiteConfig, squeue_calls: SqueueCounter) -> None:
    """slurmctld down for 35 s while the operator keeps reconciling: no reconcile
    raises, the status says the batch system is unreachable (phase kept, a condition, one
    event), squeue is asked on a back-off schedule, not once per reconcile; once slurmctld
    is back the cluster is Running with the same jobs and nothing was resubmitted."""
    outage_s, step_s = 35.0, 0.5
    runtime, runner = slurm_runtime(site)
    cluster = Cluster(runtime, in_own_namespace(manifest("outage", 1)))
    uid = cluster.body["metadata"]["uid"]
    try:
        await _outage(cluster, runtime.poller("slurm", NAMESPACE), runner, squeue_calls,
                      outage_s, step_s)
    finally:
        cancel_all(uid)


async def _outage(cluster: Cluster, poller: BatchedPoller, runner: CommandRunner,
                  squeue_calls: SqueueCounter, outage_s: float, step_s: float) -> None:
    uid = cluster.body["metadata"]["uid"]
    await cluster.until("Running", 1)
    before = live_jobs(uid)
    assert len(before) == 2
    submitted = runner.calls["sbatch"]
    # The default cap (60 s) would make the test wait up to a minute after the outage; the
    # schedule is the same exponential one, capped lower.
    poller.max_backoff = 8.0

    steps, statuses, events = 0, [], []
    with slurmctld_stopped():
        calls_before, started = squeue_calls.read(), time.monotonic()
        while time.monotonic() - started < outage_s:
            events += await step_with_events(cluster)  # must not raise
            statuses.append(dict(cluster.status))
            steps += 1
            await asyncio.sleep(step_s)
        calls = squeue_calls.read() - calls_before
    # Back-off: tries at 0, then min_interval * 2^k later (k = 1, 2, ...), capped; each
    # failing squeue also takes its own time (about 9 s here: it retries the connection),
    # so this bound is generous.
    bound, t, k = 1, 0.0, 1
    while True:
        t += min(poller.max_backoff, poller.min_interval * 2 ** k)
        if t > outage_s:
            break
        bound, k = bound + 1, k + 1
    print(f"outage: {steps} reconciles, {calls} squeue calls (back-off bound {bound + 1})")
    assert 1 <= calls <= bound + 1, (calls, bound)
    assert steps >= 2 * calls, "the bound comes from the back-off, not from few reconciles"
    down = statuses[-1]
    assert down["phase"] == "Running", "an outage is not the cluster's failure"
    assert down["message"].startswith("batch system unavailable, retrying"), down
    outage = conditions(down)[BATCH_CONDITION]
    assert outage["status"] == "False" and outage["reason"] == "Unreachable"
    assert [r for _, r, _ in events].count("BatchSystemUnavailable") == 1, events

    async def back() -> dict[str, Any] | None:
        events.extend(await step_with_events(cluster))
        s = cluster.status
        return s if s["phase"] == "Running" and s["workers"]["ready"] == 1 \
            and BATCH_CONDITION not in conditions(s) else None
    status = await wait_until(back, 60, "the cluster to report Running again")
    assert status["message"] == "1/1 workers ready"
    assert live_jobs(uid) == before, "the same jobs, adopted, no duplicate"
    assert runner.calls["sbatch"] == submitted
    assert "BatchSystemReachable" in [r for _, r, _ in events]
    await cluster.delete()


# --- 5. polling stays bounded -----------------------------------------------------------------

async def _timers(clusters: list[Cluster], interval: float, duration: float) -> int:
    """Each cluster on its own timer (as kopf runs one per object), phases spread over the
    interval; returns how many reconciles ran."""
    count = 0

    async def timer(cluster: Cluster, offset: float) -> None:
        nonlocal count
        await asyncio.sleep(offset)
        end = time.monotonic() + duration - offset
        while time.monotonic() < end:
            began = time.monotonic()
            status = await cluster.step()
            assert status["phase"] == "Pending", status
            count += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    n = len(clusters)
    await asyncio.gather(*(timer(c, interval * i / n) for i, c in enumerate(clusters)))
    return count


async def _held_clusters(site: SiteConfig, m: int
                         ) -> tuple[list[Cluster], Callable[[], Awaitable[None]]]:
    """m clusters of 0 workers whose scheduler jobs SLURM holds (`--hold`, a directive any
    user may give): real jobs that squeue reports PENDING (JobHeldUser) and that never
    start, so 20 clusters cost no Dask processes on this machine."""
    runtime, _ = slurm_runtime(site)
    clusters = []
    for i in range(m):
        body = in_own_namespace(manifest(f"poll-{m}-{i}", 0))
        body["spec"]["scheduler"]["extraDirectives"] = ["--hold"]
        clusters.append(Cluster(runtime, body))

    async def settled() -> bool:
        statuses = await asyncio.gather(*(c.step() for c in clusters))
        return all(s["phase"] == "Pending" and "JobHeldUser" in s["message"]
                   for s in statuses)
    await wait_until(settled, 60, f"{m} held scheduler jobs to be seen")

    async def delete() -> None:
        await asyncio.gather(*(c.delete() for c in clusters))
    return clusters, delete


async def test_squeue_calls_do_not_grow_with_clusters(site: SiteConfig,
                                                      squeue_calls: SqueueCounter) -> None:
    """1 and then 20 clusters, each reconciled on its own timer every poll interval for
    the same number of periods: one squeue per period serves them all."""
    interval, periods = 1.0, 8
    site = replace(site, poll_interval=interval, min_poll_interval=interval)
    calls, reconciles = {}, {}
    for m in (1, 20):
        clusters, delete = await _held_clusters(site, m)
        try:
            before = squeue_calls.read()
            reconciles[m] = await _timers(clusters, interval, interval * periods)
            calls[m] = squeue_calls.read() - before
        finally:
            await delete()
    print(f"squeue calls over {periods} periods: {calls}; reconciles: {reconciles}")
    assert reconciles[20] >= 15 * reconciles[1], reconciles  # 20 clusters were reconciled
    assert 1 <= calls[1] <= periods + 1
    assert calls[20] <= calls[1] + 2, calls
