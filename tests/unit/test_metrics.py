"""The metrics collector reads the operator's state at scrape time: CommandRunner counters,
the pollers' latest snapshots, the local backend's counts, and what handlers recorded.

These tests set that state directly (no batch system, no Kubernetes) and read it back
through prometheus_client, as a scrape would; tests/e2e/test_metrics_scrape.py scrapes a
running operator over HTTP."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import kopf
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dask_hpc_operator.cli import EXIT_INVALID, main
from dask_hpc_operator.constants import GROUP, VERSION
from dask_hpc_operator.metrics import OperatorMetrics, serve
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import ConfigError, SiteConfig
from hpc_bridge.backends.base import CommandRunner
from hpc_bridge.backends.local import LocalBackend
from hpc_bridge.backends.slurm import SlurmBackend
from hpc_bridge.model import JobIdentity, JobState, ObservedJob, Role
from hpc_bridge.poller import BatchedPoller, Snapshot

UID = "0f0e0d0c-0000-4000-8000-000000000001"


def job(job_id: str, role: Role, state: JobState, index: int = 0) -> ObservedJob:
    identity = JobIdentity("ns", "c1", UID, role, "default", index)
    return ObservedJob(job_id, identity, state)


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    """A Runtime as the operator has it after some work: a SLURM backend whose runner ran
    commands (one sbatch failed), its poller's latest snapshot, and a local backend."""
    site = SiteConfig(staging_dir=str(tmp_path))
    runner = CommandRunner()
    runner.calls.update({"sbatch": 3, "squeue": 10, "scancel": 2, "sacct": 1})
    runner.latency.update({"sbatch": 0.6, "squeue": 1.5, "scancel": 0.2, "sacct": 0.1})
    runner.errors.update({"sbatch": 1})
    slurm = SlurmBackend(runner)
    local = LocalBackend(tmp_path / "local-jobs")
    local.calls.update({"submit": 4, "cancel": 1})
    rt = Runtime(site, backends={"slurm": slurm, "local": local})
    poller = BatchedPoller(slurm)
    poller.snapshot = Snapshot({
        "10": job("10", Role.SCHEDULER, JobState.RUNNING),
        "11": job("11", Role.WORKER, JobState.RUNNING, 0),
        "12": job("12", Role.WORKER, JobState.PENDING, 1),
        "13": job("13", Role.WORKER, JobState.PENDING, 2),
        "9": job("9", Role.WORKER, JobState.FAILED, 3),
    }, taken_at=time.monotonic() - 2.0)
    poller.polls, poller.failures = 7, 0
    rt.pollers["slurm"] = poller
    return rt


def value(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry().get_sample_value(name, labels)


def test_batch_command_counters_latency_and_errors(runtime: Runtime) -> None:
    metrics = OperatorMetrics(runtime)
    assert value(metrics, "dask_hpc_batch_submissions_total", backend="slurm") == 3
    assert value(metrics, "dask_hpc_batch_cancellations_total", backend="slurm") == 2
    assert value(metrics, "dask_hpc_batch_submissions_total", backend="local") == 4
    assert value(metrics, "dask_hpc_batch_cancellations_total", backend="local") == 1
    summary = "dask_hpc_batch_command_duration_seconds"
    assert value(metrics, summary + "_count", backend="slurm", command="squeue") == 10
    assert value(metrics, summary + "_sum", backend="slurm", command="squeue") == 1.5
    assert value(metrics, summary + "_count", backend="slurm", command="sbatch") == 3
    errors = "dask_hpc_batch_command_errors_total"
    assert value(metrics, errors, backend="slurm", command="sbatch") == 1
    assert value(metrics, errors, backend="slurm", command="squeue") == 0
    # The local backend runs processes, not commands: no latency to report.
    assert value(metrics, summary + "_count", backend="local", command="submit") is None


def test_counters_are_read_at_scrape_time(runtime: Runtime) -> None:
    """Nothing is copied when the collector is made: later work shows in the next scrape."""
    metrics = OperatorMetrics(runtime)
    registry = metrics.registry()
    runner = runtime.backends["slurm"].runner  # type: ignore[attr-defined]
    runner.calls["sbatch"] += 2
    assert registry.get_sample_value("dask_hpc_batch_submissions_total",
                                     {"backend": "slurm"}) == 5


def test_batch_jobs_by_state_from_the_latest_poll(runtime: Runtime) -> None:
    metrics = OperatorMetrics(runtime)
    jobs = "dask_hpc_batch_jobs"
    assert value(metrics, jobs, backend="slurm", state="RUNNING", role="scheduler") == 1
    assert value(metrics, jobs, backend="slurm", state="RUNNING", role="worker") == 1
    assert value(metrics, jobs, backend="slurm", state="PENDING", role="worker") == 2
    assert value(metrics, jobs, backend="slurm", state="FAILED", role="worker") == 1
    # Every state is reported, zeros included, so a series drops to 0 instead of vanishing.
    assert value(metrics, jobs, backend="slurm", state="CANCELLED", role="worker") == 0
    assert value(metrics, "dask_hpc_batch_polls_total", backend="slurm") == 7
    assert value(metrics, "dask_hpc_batch_poll_failures", backend="slurm") == 0
    age = value(metrics, "dask_hpc_batch_snapshot_age_seconds", backend="slurm")
    assert age is not None and 2.0 <= age < 60


def body(name: str, phase: str | None = None, deleting: bool = False,
         **workers: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns"}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase} if phase else {}
    if workers:
        status["workers"] = workers
    return {"metadata": meta, "status": status}


def test_resources_by_phase(runtime: Runtime) -> None:
    """The last phase each resource showed; deletion begun is Terminating, a resource not
    yet reconciled is Unknown, a deleted one is forgotten."""
    metrics = OperatorMetrics(runtime)
    metrics.observe("DaskCluster", body("a", "Running", desired=2, ready=2, running=2))
    metrics.observe("DaskCluster", body("b", "Pending", desired=3, pending=3))
    metrics.observe("DaskCluster", body("c", "Running", deleting=True))
    metrics.observe("DaskCluster", body("d"))
    metrics.observe("DaskJob", body("j", "Succeeded"))
    metrics.observe("DaskWorkerGroup", body("g", "Scaling", desired=4, ready=1))
    metrics.observe("DaskCluster", body("e", "Failed"))
    metrics.observe("DaskCluster", body("e", "Failed"), deleted=True)
    metrics.observe("DaskCluster", body("b", "Running", desired=3, ready=3))  # moved on

    def phase(kind: str, name: str) -> float | None:
        return value(metrics, "dask_hpc_resources", kind=kind, phase=name)
    assert phase("DaskCluster", "Running") == 2
    assert phase("DaskCluster", "Pending") == 0
    assert phase("DaskCluster", "Terminating") == 1
    assert phase("DaskCluster", "Unknown") == 1
    assert phase("DaskCluster", "Failed") == 0
    assert phase("DaskJob", "Succeeded") == 1
    assert phase("DaskWorkerGroup", "Scaling") == 1
    assert phase("DaskAutoscaler", "Active") == 0
    assert value(metrics, "dask_hpc_workers", kind="DaskCluster", state="ready") == 5
    assert value(metrics, "dask_hpc_workers", kind="DaskCluster", state="desired") == 5
    assert value(metrics, "dask_hpc_workers", kind="DaskWorkerGroup", state="ready") == 1


async def test_instrumented_handlers_count_runs_and_errors(runtime: Runtime) -> None:
    """An exception escaping a handler is an error; kopf.TemporaryError (a deletion
    waiting for its jobs) is not. Handlers still see their arguments and raise as before."""
    metrics = OperatorMetrics(runtime)
    seen: list[dict[str, Any]] = []

    async def reconcile(**kwargs: Any) -> None:
        seen.append(kwargs)
        if kwargs.get("fail"):
            raise RuntimeError("boom")

    async def delete(**_: Any) -> None:
        raise kopf.TemporaryError("waiting for jobs 1, 2 to end", delay=2)

    wrapped, wrapped_delete = metrics.instrument(
        kopf.OperatorRegistry(), (GROUP, VERSION, "daskclusters"), reconcile, delete)
    await wrapped(body={}, fail=False)
    with pytest.raises(RuntimeError, match="boom"):
        await wrapped(body={}, fail=True)
    with pytest.raises(kopf.TemporaryError):
        await wrapped_delete(body={})
    assert [s["fail"] for s in seen] == [False, True]
    assert value(metrics, "dask_hpc_reconciles_total", kind="DaskCluster") == 2
    assert value(metrics, "dask_hpc_reconcile_errors_total", kind="DaskCluster") == 1
    assert value(metrics, "dask_hpc_reconcile_errors_total", kind="DaskJob") == 0


def test_served_over_http(runtime: Runtime) -> None:
    """The endpoint answers a GET with the text format; the process collectors ride along."""
    server = serve(OperatorMetrics(runtime), 0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {name for name in families if name.startswith("dask_hpc_")}
    assert ours >= {"dask_hpc_resources", "dask_hpc_batch_jobs", "dask_hpc_batch_submissions",
                    "dask_hpc_batch_cancellations", "dask_hpc_batch_command_duration_seconds",
                    "dask_hpc_batch_command_errors", "dask_hpc_reconcile_errors"}
    assert families["dask_hpc_batch_command_duration_seconds"].type == "summary"
    assert families["dask_hpc_batch_submissions"].type == "counter"
    assert "process_cpu_seconds" in families or "python_info" in families


def test_metrics_port_in_site_config() -> None:
    assert SiteConfig().metrics_port == 8000
    assert SiteConfig.from_mapping({"metricsPort": 0}).metrics_port == 0
    with pytest.raises(ConfigError, match="metricsPort"):
        SiteConfig.from_mapping({"metricsPort": 70000})
    with pytest.raises(ConfigError, match="metricsPort"):
        SiteConfig.from_mapping({"metricsPort": "8000"})


def test_operator_refuses_a_taken_metrics_port(capsys: pytest.CaptureFixture[str]) -> None:
    """A port already in use stops `dask-hpc operator` at once, naming the way out, before
    it touches the Kubernetes API."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["operator", "--metrics-port", str(port)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert f"cannot listen on port {port}" in err and "--metrics-port" in err
