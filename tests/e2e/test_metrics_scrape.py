"""The operator's /metrics endpoint, scraped over HTTP while it does real work.

kopf runs the operator against the Kubernetes API emulator (kmock over HTTP) with the
metrics the CLI would give it; a DaskCluster on the real SLURM comes up and is deleted, and
each step is checked in a real scrape: the sbatch/squeue/scancel counts and latencies, the
batch jobs by state from the latest poll, the cluster's phase and workers, and no reconcile
errors.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import kubernetes
import pytest
from kube_emulator import StampingEmulator, custom_objects, kube, run_operator
from prometheus_client.parser import text_string_to_metric_families

from dask_hpc_operator.constants import API_VERSION, GROUP, VERSION
from dask_hpc_operator.metrics import MetricsServer, OperatorMetrics, serve
from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from helpers import live_slurm_jobs, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]
__all__ = ["kube"]  # the emulator fixture, re-exported for pytest

ARGS = (GROUP, VERSION, "default", "daskclusters")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def endpoint(kube: StampingEmulator, site: SiteConfig) -> Iterator[MetricsServer]:
    """The operator with its metrics endpoint on a free port of the loopback interface."""
    metrics = OperatorMetrics(Runtime(site))
    server = serve(metrics, 0, "127.0.0.1")
    try:
        for _ in run_operator(str(kube.url).rstrip("/"), metrics.runtime, metrics):
            yield server  # run_operator's one yield: kopf runs; resuming it stops kopf
    finally:
        server.close()


async def scrape(server: MetricsServer) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=10) as response:
            return str(response.read().decode())
    text = await asyncio.to_thread(get)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_scrape_while_a_cluster_runs_and_is_deleted(kube: StampingEmulator,
                                                          endpoint: MetricsServer) -> None:
    api = custom_objects(str(kube.url).rstrip("/"))
    call = asyncio.to_thread  # the sync client must not block the loop serving kmock
    body = {"apiVersion": API_VERSION, "kind": "DaskCluster",
            "metadata": {"name": "metered", "namespace": "default"},
            "spec": {"backend": "slurm", "scheduler": {"memory": "1GiB"},
                     "worker": {"replicas": 1, "cores": 1, "memory": "1GiB"}}}
    await call(api.create_namespaced_custom_object, *ARGS, body)
    uid = (await call(api.get_namespaced_custom_object, *ARGS, "metered"))["metadata"]["uid"]

    async def running() -> Samples | None:
        samples = await scrape(endpoint)
        phase = sample(samples, "dask_hpc_resources", kind="DaskCluster", phase="Running")
        ready = sample(samples, "dask_hpc_workers", kind="DaskCluster", state="ready")
        return samples if phase == 1 and ready == 1 else None
    samples = await wait_until(running, 120, "a Running cluster with 1 ready worker in /metrics")

    def count(command: str) -> float:
        return sample(samples, "dask_hpc_batch_command_duration_seconds_count",
                      backend="slurm", command=command) or 0
    assert count("sbatch") >= 2  # the scheduler and one worker, each its own job
    assert count("squeue") >= 1
    assert 0 < (sample(samples, "dask_hpc_batch_command_duration_seconds_sum",
                       backend="slurm", command="squeue") or 0) < 60 * count("squeue")
    assert sample(samples, "dask_hpc_batch_submissions_total", backend="slurm") == count(
        "sbatch")
    assert sample(samples, "dask_hpc_batch_command_errors_total", backend="slurm",
                  command="sbatch") == 0
    for role in ("scheduler", "worker"):  # >=: the poll sees every dask-hpc job of the
        # user, and other tests may share this SLURM
        assert (sample(samples, "dask_hpc_batch_jobs", backend="slurm", state="RUNNING",
                       role=role) or 0) >= 1
    assert sample(samples, "dask_hpc_resources", kind="DaskCluster", phase="Pending") == 0
    assert (sample(samples, "dask_hpc_reconciles_total", kind="DaskCluster") or 0) >= 1
    assert sample(samples, "dask_hpc_reconcile_errors_total", kind="DaskCluster") == 0
    assert sample(samples, "dask_hpc_batch_poll_failures", backend="slurm") == 0

    await call(api.delete_namespaced_custom_object, *ARGS, "metered")

    async def deleted() -> bool:
        try:
            await call(api.get_namespaced_custom_object, *ARGS, "metered")
        except kubernetes.client.ApiException as exc:
            return exc.status == 404
        return False
    await wait_until(deleted, 60, "the finalizer to release the object")
    assert live_slurm_jobs(uid) == []

    async def forgotten() -> Samples | None:
        samples = await scrape(endpoint)
        left = [sample(samples, "dask_hpc_resources", kind="DaskCluster", phase=p)
                for p in ("Running", "Terminating", "Unknown")]
        return samples if left[:2] == [0, 0] and not left[2] else None
    samples = await wait_until(forgotten, 30, "the deleted cluster to leave /metrics")
    assert (sample(samples, "dask_hpc_batch_cancellations_total", backend="slurm") or 0) >= 1
    assert sample(samples, "dask_hpc_workers", kind="DaskCluster", state="ready") == 0
    assert sample(samples, "dask_hpc_reconcile_errors_total", kind="DaskCluster") == 0
