"""Usage accounting: reading the batch systems' records (real `sacct -c` output recorded on
this machine, PBS transcripts), the pure arithmetic (usage.py), the shared rate-limited
collector and the per-cluster ledger (against the real local backend's jobs), and the
usage metrics."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from dask_hpc_operator import usage_ledger
from dask_hpc_operator.metrics import OperatorMetrics
from dask_hpc_operator.model import ClusterModel
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.usage import (
    REQUESTED,
    JobUsage,
    Requested,
    UsageTotals,
    job_usage,
    requested_of,
    status_of,
    summarize,
)
from dask_hpc_operator.usage_ledger import (
    GIVE_UP_AFTER_S,
    GIVE_UP_QUERIES,
    UsageLedger,
    gives_up,
)
from hpc_bridge.accounting import AccountingCollector
from hpc_bridge.backends.base import BatchSystemError
from hpc_bridge.backends.local import LocalBackend
from hpc_bridge.backends.pbs import accounting, parse_qstat_json, parse_qstat_text
from hpc_bridge.backends.slurm import parse_sacct_usage, tres_gpus
from hpc_bridge.model import JobAccounting, JobIdentity, JobRequest, JobState, ObservedJob, Role

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
UID = "0f0e0d0c-0000-4000-8000-000000000001"


def stdout_of(path: Path) -> str:
    """The `--- stdout` section of a recorded transcript."""
    return path.read_text().split("--- stdout\n", 1)[1]


def epoch(text: str) -> float:
    """A SLURM/ctime time as this host reads it (local time, like the parsers)."""
    return dt.datetime.fromisoformat(text).timestamp()


def ident(role: Role = Role.WORKER, group: str = "default", index: int = 0,
          uid: str = UID, cluster: str = "c1", namespace: str = "ns") -> JobIdentity:
    return JobIdentity(namespace, cluster, uid, role, group, index)


# --- what the batch systems record ------------------------------------------------------------

def test_sacct_completion_log_as_recorded_here() -> None:
    """The job completion log (no slurmdbd): times, cores and elapsed; no TRES, so no GPUs;
    array tasks by their own ids."""
    found = parse_sacct_usage(stdout_of(FIXTURES / "slurm/sacct-completion-usage.txt"),
                              "sacct-completion")
    assert sorted(found) == ["2341", "2404", "2407", "2418", "2419", "2460"]
    alloc = found["2341"]
    assert alloc == JobAccounting(
        "2341", "sacct-completion", "CANCELLED", final=True,
        submitted_at=epoch("2026-11-22T00:39:27"), eligible_at=epoch("2026-11-22T00:39:27"),
        started_at=epoch("2026-11-22T00:39:27"), ended_at=epoch("2026-11-22T00:39:30"),
        cores=4, gpus=None, elapsed=3.0)
    assert found["2407"].elapsed == 190 and found["2407"].cores == 1
    assert found["2404"].state == "FAILED" and found["2404"].elapsed == 0
    assert all(r.final and r.gpus is None for r in found.values())


def test_sacct_accounting_records_gpus_running_and_pending_jobs() -> None:
    found = parse_sacct_usage(stdout_of(FIXTURES / "slurm/sacct-accounting-usage.txt"),
                              "sacct", offset=3600.0)
    assert sorted(found) == ["501", "502_0", "503"]  # the pending array line used nothing
    done = found["501"]
    assert (done.cores, done.gpus, done.elapsed, done.final) == (16, 2, 3600.0, True)
    assert done.started_at == epoch("2026-05-28T10:02:00") + 3600  # the zone correction
    running = found["502_0"]
    assert (running.final, running.ended_at, running.elapsed, running.gpus) == (
        False, None, None, 1)  # elapsed only once it ended; the start says the rest
    queued = found["503"]
    assert (queued.started_at, queued.final, queued.gpus) == (None, True, None)
    assert queued.ended_at == epoch("2026-05-28T09:10:00") + 3600


@pytest.mark.parametrize(("tres", "gpus"), [
    ("", None), ("billing=1,cpu=1,mem=1G,node=1", 0),
    ("billing=8,cpu=8,gres/gpu=1,mem=64G,node=1", 1),
    ("billing=8,cpu=8,gres/gpu:l20=1,gres/gpu=1,mem=96G,node=1", 1),  # typed + total: once
    ("cpu=8,gres/gpu:a100=2,gres/gpu:v100=1", 3),  # typed only: summed
])
def test_gpus_of_a_tres_list(tres: str, gpus: int | None) -> None:
    assert tres_gpus(tres) == gpus


def test_pbs_history_record_of_a_finished_job() -> None:
    """qstat -x -f text (PBS Pro 2017, tests/fixtures/pbs): run time from
    resources_used.walltime, cores from resources_used.ncpus, no ngpus listed."""
    records = parse_qstat_text(stdout_of(FIXTURES / "pbs/qstat-text-history-finished.txt"))
    record = accounting("171390152.mycluster", records["171390152.mycluster"])
    t = epoch("2017-10-18T09:08:22")
    assert record == JobAccounting("171390152.mycluster", "qstat", "F", final=True,
                                   submitted_at=t, eligible_at=t, started_at=t, ended_at=t,
                                   cores=1, gpus=None, elapsed=2.0)


def test_pbs_json_record_of_a_running_job_and_gpus() -> None:
    records = parse_qstat_json(stdout_of(FIXTURES / "pbs/qstat-json-running-metacentrum.txt"))
    (job_id,) = records
    record = accounting(job_id, records[job_id])
    assert (record.final, record.cores, record.gpus, record.ended_at) == (False, 4, None, None)
    assert record.started_at == epoch("2022-10-04T21:23:33")
    assert record.submitted_at == epoch("2022-10-04T21:23:20")
    # Resource_List.ngpus (PBS's GPU resource) and a walltime past a day, in JSON's nesting;
    # constructed from the documented attributes (no recorded GPU job was found).
    gpu_job = {"job_state": "F", "Exit_status": 0, "qtime": 100, "stime": 160,
               "mtime": 90_160, "Resource_List": {"ncpus": 8, "ngpus": 2},
               "resources_used": {"walltime": "25:00:00", "ncpus": 8}}
    record = accounting("7.pbs", gpu_job)
    assert (record.cores, record.gpus, record.elapsed, record.final) == (8, 2, 90_000.0, True)
    assert (record.submitted_at, record.started_at, record.ended_at) == (100, 160, 90_160)


# --- the arithmetic ---------------------------------------------------------------------------

def observed(job_id: str, state: JobState, identity: JobIdentity | None = None,
             started: float | None = None, ended: float | None = None) -> ObservedJob:
    return ObservedJob(job_id, identity or ident(), state, started_at=started, ended_at=ended)


def test_usage_of_an_accounted_job() -> None:
    record = JobAccounting("9", "sacct", "COMPLETED", True, submitted_at=1000.0,
                           eligible_at=1020.0, started_at=1030.0, ended_at=4630.0, cores=16,
                           gpus=2, elapsed=3590.0)
    u = job_usage(observed("9", JobState.COMPLETED), record, Requested(4, 1), as_of=9999.0)
    assert u is not None
    assert (u.cores, u.gpus, u.source, u.gpu_source, u.final) == (16, 2, "sacct", "sacct", True)
    assert u.run_seconds == 3590.0  # the batch system's own count beats end - start
    # Waiting for resources counts from eligibility: 20 s of a hold or begin time do not.
    assert u.queue_wait_seconds == 10.0 and u.submitted_at == 1000.0
    assert u.core_hours == pytest.approx(16 * 3590 / 3600)
    assert u.gpu_hours == pytest.approx(2 * 3590 / 3600)


def test_gpus_the_records_leave_out_come_from_the_request_and_say_so() -> None:
    record = JobAccounting("9", "sacct-completion", "COMPLETED", True, submitted_at=0.0,
                           started_at=0.0, ended_at=3600.0, cores=4, gpus=None)
    u = job_usage(observed("9", JobState.COMPLETED), record, Requested(4, 2), as_of=0.0)
    assert u is not None
    assert (u.gpus, u.gpu_source, u.source) == (2, REQUESTED, "sacct-completion")
    assert (u.core_hours, u.gpu_hours) == (4.0, 2.0)


def test_running_queued_and_unaccounted_jobs() -> None:
    running = JobAccounting("1", "sacct", "RUNNING", False, submitted_at=100.0,
                            started_at=160.0, cores=2)
    u = job_usage(observed("1", JobState.RUNNING), running, Requested(2), as_of=760.0)
    assert u is not None and (u.run_seconds, u.queue_wait_seconds, u.final) == (600.0, 60.0,
                                                                                  False)
    queued = JobAccounting("2", "sacct", "PENDING", False, submitted_at=100.0, cores=2)
    u = job_usage(observed("2", JobState.PENDING), queued, Requested(2), as_of=400.0)
    assert u is not None and (u.run_seconds, u.queue_wait_seconds) == (0.0, 300.0)
    gave_up = JobAccounting("3", "sacct", "CANCELLED by 0", True, submitted_at=100.0,
                            ended_at=700.0, cores=2)
    u = job_usage(observed("3", JobState.CANCELLED), gave_up, Requested(2), as_of=9e9)
    assert u is not None and (u.run_seconds, u.queue_wait_seconds, u.final) == (0.0, 600.0,
                                                                                 True)
    # No record at all (sacct unusable, an array task never seen running): the poll's times
    # and the request's cores, marked as such and never final.
    u = job_usage(observed("4", JobState.COMPLETED, started=10.0, ended=3610.0), None,
                  Requested(3, 1), as_of=9e9)
    assert u is not None
    assert (u.source, u.gpu_source, u.cores, u.gpus, u.run_seconds, u.final) == (
        REQUESTED, REQUESTED, 3, 1, 3600.0, False)
    assert u.queue_wait_seconds is None  # no submit time known: not a zero wait
    # Gone from the poll, nothing new: the last figures stay.
    assert job_usage(None, None, Requested(3), as_of=9e9, previous=u) is u


def row(job_id: str, group: str, cores: int, run: float, wait: float | None,
        namespace: str = "ns", gpus: int = 0, source: str = "sacct") -> JobUsage:
    return JobUsage(job_id, namespace, "c1", group, "worker", "COMPLETED", 0.0, wait, run,
                    cores, gpus, run, wait, source, source, True)


def test_groups_and_namespaces_add_up_to_the_total() -> None:
    rows = [row("1", "scheduler", 1, 3600, 5), row("2", "default", 4, 1800, 10),
            row("3", "default", 4, 900, None, gpus=1, source=REQUESTED),
            row("4", "gpu", 8, 7200, 60, namespace="other", gpus=2)]
    s = summarize(rows)
    assert s.total == UsageTotals(4, 1 + 2 + 1 + 16, 0.25 + 4, 13500, 75, 3)
    assert list(s.by_group) == ["default", "gpu", "scheduler"]
    assert s.by_group["default"] == UsageTotals(2, 3.0, 0.25, 2700, 10, 1)
    added = UsageTotals()
    for t in s.by_group.values():
        added = added.plus(t)
    assert added == s.total
    assert s.source == "requested+sacct" and s.gpu_source == "requested+sacct"
    assert s.total.mean_queue_wait_seconds == 25.0
    by_ns = summarize(rows, lambda u: u.namespace)
    assert {k: v.core_hours for k, v in by_ns.by_group.items()} == {"ns": 4.0, "other": 16.0}


def test_status_usage_is_rounded_and_has_no_nulls() -> None:
    s = summarize([row("1", "default", 3, 1234.5678, None)])
    status = status_of(s, 1_780_000_000.0)
    assert status == {
        "jobs": 1, "coreHours": 1.0288, "gpuHours": 0.0, "runSeconds": 1234.6,
        "queueWaitSeconds": 0.0,
        "byGroup": {"default": {"jobs": 1, "coreHours": 1.0288, "gpuHours": 0.0,
                                "runSeconds": 1234.6, "queueWaitSeconds": 0.0}},
        "source": "sacct", "gpuSource": "none", "final": True,
        "updatedAt": "2026-05-28T20:26:40Z"}
    assert "updatedAt" not in status_of(summarize([]), 0.0)


def test_what_a_cluster_requests_per_job() -> None:
    manifest = {"metadata": {"name": "c1", "namespace": "ns", "uid": UID},
                "spec": {"mode": "allocation", "scheduler": {"cores": 2, "memory": "1GiB",
                                                             "walltime": "01:00:00",
                                                             "protocol": "tcp"},
                         "worker": {"replicas": 3, "cores": 4, "gpus": 1, "memory": "1GiB",
                                    "processes": 1, "walltime": "01:00:00"}}}
    req = requested_of(ClusterModel.from_manifest(manifest, SiteConfig()))
    # An allocation: one task per worker plus the scheduler's, each a worker's share.
    assert req == {"scheduler": Requested(2, 0), "default": Requested(4, 1),
                   "allocation": Requested(16, 4)}


# --- the collector and the ledger, over the real local backend ---------------------------------

class CountingLocal(LocalBackend):
    """The real local backend, remembering which jobs each usage query asked about."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.asked: list[list[str]] = []

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        self.asked.append(sorted(j.job_id for j in jobs))
        return await super().usage(jobs)


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[CountingLocal]:
    backend = CountingLocal(tmp_path / "state")
    yield backend
    for pid_file in backend.jobs_dir.glob("*/pid"):
        with contextlib.suppress(ValueError, IndexError, OSError):
            os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    for child in backend._children.values():
        with contextlib.suppress(Exception):
            child.wait(timeout=5)


async def submit(backend: LocalBackend, tmp_path: Path, script: str,
                 identity: JobIdentity) -> str:
    return await backend.submit(JobRequest(identity, script + "\n", str(tmp_path / "logs")))


async def seen(backend: LocalBackend, job_id: str, terminal: bool = False) -> ObservedJob:
    """The job as the poll sees it, once it has started (or ended)."""
    for _ in range(500):
        job = {j.job_id: j for j in await backend.poll()}.get(job_id)
        if job is not None and job.started_at is not None and (
                job.state.terminal or not terminal):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never got there")


async def test_collector_asks_once_per_interval_for_every_cluster_and_never_twice_for_the_final(
        local: CountingLocal, tmp_path: Path) -> None:
    quick = await submit(local, tmp_path, "true", ident(cluster="a"))
    slow = await submit(local, tmp_path, "sleep 30", ident(cluster="b", uid=UID[:-1] + "2"))
    a, b = await seen(local, quick, terminal=True), await seen(local, slow)
    collector = AccountingCollector(local, interval=3600)

    first = await collector.collect([a])  # cluster a: the first query is due at once
    assert local.asked == [[quick]] and first[quick].final
    assert await collector.collect([b]) == {}  # cluster b, within the interval: no query
    assert local.asked == [[quick]]
    # A teardown forces one query: it carries every unfinished job any cluster asked about,
    # never a final one again.
    forced = await collector.collect([b], force=True)
    assert local.asked == [[quick], [slow]]
    assert forced[slow].final is False and forced[slow].started_at == b.started_at
    again = await collector.collect([a])  # final: answered from memory
    assert again == first and local.asked == [[quick], [slow]]
    assert collector.queries == 2


async def test_concurrent_reconciles_share_one_query(local: CountingLocal,
                                                     tmp_path: Path) -> None:
    jobs = [await seen(local, await submit(local, tmp_path, "sleep 30",
                                           ident(cluster=f"c{i}", index=i)))
            for i in range(3)]
    collector = AccountingCollector(local, interval=3600)
    results = await asyncio.gather(*(collector.collect([j]) for j in jobs))
    assert all(r for r in results)
    # The later two joined the first one's query before it began: one call for all three.
    assert local.asked == [sorted(j.job_id for j in jobs)] and collector.queries == 1


async def test_ledger_keeps_jobs_across_restarts_and_counts_group_jobs(
        local: CountingLocal, tmp_path: Path) -> None:
    group_uid = UID[:-1] + "9"
    own = await seen(local, await submit(local, tmp_path, "true", ident()), terminal=True)
    grouped = await seen(local, await submit(local, tmp_path, "true", ident(
        group="big", uid=group_uid)), terminal=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    path = staging / "usage.json"
    ledger = UsageLedger(interval=3600)
    ledger.link_group(UID, group_uid, "big", Requested(8, 1))
    assert ledger.group_uids(UID) == [group_uid]
    entry = await ledger.update("ns", "c1", UID, path, [own, grouped], local,
                                {"default": Requested(2)})
    assert set(entry.rows) == {own.job_id, grouped.job_id}
    big = entry.rows[grouped.job_id]
    # The local backend runs what was requested: cores and GPUs are the request's.
    assert (big.group, big.cores, big.gpus, big.source, big.gpu_source, big.final) == (
        "big", 8, 1, "local", REQUESTED, True)
    assert entry.rows[own.job_id].cores == 2
    doc = json.loads(path.read_text())
    assert (doc["namespace"], doc["name"], doc["uid"]) == ("ns", "c1", UID)
    assert sorted(j["job_id"] for j in doc["jobs"]) == sorted(entry.rows)

    # A new operator process: the jobs left the poll long ago, the file still counts them,
    # and final rows are not asked for again.
    restarted = UsageLedger(interval=3600)
    again = await restarted.update("ns", "c1", UID, path, [], local)
    assert again.rows == entry.rows and len(local.asked) == 1
    assert summarize(again.rows.values()).total.jobs == 2


class NoRecords:
    """A batch system that keeps no record of finished jobs (PBS without job history: its
    qstat answers "Unknown Job Id"), or fails to answer. A stand-in: no PBS runs here."""

    kind = "pbs"

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.failing = False

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        if self.failing:
            raise BatchSystemError("qstat did not answer within 60s")
        self.asked.append(sorted(j.job_id for j in jobs))
        return {}


def test_a_gone_job_without_a_record_is_given_up_after_queries_and_time() -> None:
    assert not gives_up(GIVE_UP_QUERIES - 1, GIVE_UP_AFTER_S)
    assert not gives_up(GIVE_UP_QUERIES, GIVE_UP_AFTER_S - 1)  # slurmdbd may lag a little
    assert gives_up(GIVE_UP_QUERIES, GIVE_UP_AFTER_S)


async def test_a_gone_job_the_batch_system_has_no_record_of_is_not_asked_for_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autoscaled clusters replace workers all day: a job that left the poll and that the
    batch system has no record of is final (with what the poll saw, source `requested`)
    after GIVE_UP_QUERIES answered queries, then never asked for again. Failed queries do
    not count."""
    backend = NoRecords()
    ledger = UsageLedger(interval=0)  # every update is a query
    path = tmp_path / "usage.json"
    job = ObservedJob("7.pbs", ident(), JobState.RUNNING, started_at=1.0)

    async def update(*jobs: ObservedJob) -> JobUsage:
        entry = await ledger.update("ns", "c1", UID, path, list(jobs), backend)  # type: ignore[arg-type]
        return entry.rows["7.pbs"]

    await update(job)  # seen running
    for _ in range(GIVE_UP_QUERIES):  # gone, asked for, no record: not before the time floor
        assert not (await update()).final
    monkeypatch.setattr(usage_ledger, "GIVE_UP_AFTER_S", 0.0)  # as if ten minutes went by
    ledger.clusters[UID].unanswered.clear()
    for _ in range(GIVE_UP_QUERIES - 1):
        assert not (await update()).final
    backend.failing = True
    assert not (await update()).final  # not answered: not counted
    backend.failing = False
    row = await update()
    assert row.final and row.source == REQUESTED and row.started_at == 1.0
    assert json.loads(path.read_text())["jobs"][0]["final"] is True
    asked = len(backend.asked)
    other = ObservedJob("8.pbs", ident(index=1), JobState.RUNNING, started_at=2.0)
    await ledger.update("ns", "c1", UID, path, [other], backend)  # type: ignore[arg-type]
    await ledger.update("ns", "c1", UID, path, [other], backend)  # type: ignore[arg-type]
    assert backend.asked[asked:] == [["8.pbs"], ["8.pbs"]]  # 7.pbs: never again


async def test_usage_figures_move_once_per_query(local: CountingLocal, tmp_path: Path) -> None:
    """A running job is counted up to the latest query, so status.usage (and the file) do
    not change at every reconcile."""
    job = await seen(local, await submit(local, tmp_path, "sleep 30", ident()))
    (tmp_path / "s").mkdir()
    ledger = UsageLedger(interval=3600)
    first = await ledger.update("ns", "c1", UID, tmp_path / "s/usage.json", [job], local)
    run = first.rows[job.job_id].run_seconds
    await asyncio.sleep(0.05)
    second = await ledger.update("ns", "c1", UID, tmp_path / "s/usage.json", [job], local)
    assert second.rows[job.job_id].run_seconds == run and len(local.asked) == 1


async def test_teardown_of_a_removed_staging_directory_writes_nothing(
        local: CountingLocal, tmp_path: Path) -> None:
    ledger = UsageLedger()
    gone = tmp_path / "removed" / "usage.json"
    entry = await ledger.finish("ns", "c1", UID, gone, [], local)
    assert not entry.rows and not gone.parent.exists() and local.asked == []


# --- metrics ------------------------------------------------------------------------------------

def test_a_scrape_sums_rows_while_the_loop_puts_them(tmp_path: Path) -> None:
    """The /metrics thread sums a cluster's rows while the event loop adds them: without a
    copy under the lock, "dictionary changed size during iteration". A short thread switch
    interval makes the interleaving that a busy operator meets by chance happen at once."""
    entry = UsageLedger()._entry("ns", "c1", UID, tmp_path / "usage.json")
    errors: list[Exception] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            try:
                entry.summary()
            except RuntimeError as exc:
                errors.append(exc)
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(5000):
            entry.put(row(str(i), "default", 1, 60, 1))
    finally:
        stop.set()
        scraper.join()
        sys.setswitchinterval(interval)
    assert errors == []
    assert entry.summary().total.jobs == 5000  # the cache is not a sum from before a put


def test_usage_metrics_per_cluster_and_group(tmp_path: Path) -> None:
    runtime = Runtime(SiteConfig(staging_dir=str(tmp_path)))
    ledger = runtime.usage()
    entry = ledger._entry("team", "etl", UID, tmp_path / "usage.json")
    for r in (row("1", "scheduler", 1, 3600, 5, namespace="team"),
              row("2", "default", 4, 1800, 10, namespace="team", gpus=1),
              row("3", "default", 4, 900, 20, namespace="team")):
        entry.put(r)
    metrics = OperatorMetrics(runtime)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry().get_sample_value(name, labels)

    labels = {"namespace": "team", "cluster": "etl"}
    assert value("dask_hpc_cluster_core_hours_total", **labels, group="default") == 3.0
    assert value("dask_hpc_cluster_core_hours_total", **labels, group="scheduler") == 1.0
    assert value("dask_hpc_cluster_gpu_hours_total", **labels, group="default") == 0.5
    assert value("dask_hpc_cluster_queue_wait_seconds_count", **labels, group="default") == 2
    assert value("dask_hpc_cluster_queue_wait_seconds_sum", **labels, group="default") == 30
    # No per-namespace counter: it would drop the deleted clusters at an operator restart,
    # which Prometheus reads as a reset (their hours counted twice by increase()).
    names = {m.name for m in metrics.registry().collect()}
    assert "dask_hpc_cluster_core_hours" in names
    assert not any(n.startswith("dask_hpc_namespace_") for n in names)
    # A final record that ends a job a little before the last query counted: the counter
    # holds its value instead of going down (Prometheus would read a reset).
    entry.put(row("3", "default", 4, 450, 20, namespace="team"))
    assert value("dask_hpc_cluster_core_hours_total", **labels, group="default") == 3.0
    entry.put(row("4", "default", 36, 3600, 0, namespace="team"))
    assert value("dask_hpc_cluster_core_hours_total", **labels, group="default") == 38.5
