"""HPCCluster, the Python API, standalone: the embedded session in a background thread of
the test process reconciles against a real one-node SLURM (and the local backend), with a
real Dask client on top.

The test bodies are synchronous on purpose: that is how a notebook uses the class (its
methods block on the cluster's private loop while the session steps in its own thread).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from distributed.core import Status

from dask_hpc_operator import HPCCluster
from dask_hpc_operator.hpc_cluster import ClusterStartTimeout
from dask_hpc_operator.site_config import SiteConfig
from helpers import live_slurm_jobs

# Lambdas, so that they travel by value: the scheduler and workers are other processes
# (SLURM jobs) that cannot import this module, and dask pickles module functions by reference.
slow = lambda i: time.sleep(1.0) or i  # noqa: E731
double = lambda x: x * 2  # noqa: E731


def until(check: Callable[[], Any], timeout: float, what: str,
          cluster: HPCCluster | None = None) -> Any:
    """Poll a condition; fail with `what` and the cluster's last status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    status = cluster.resource_status if cluster is not None else None
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (status: {status})")


def connected(cluster: HPCCluster) -> int:
    return len(cluster.scheduler_info["workers"])


def counts(cluster: HPCCluster) -> dict[str, int]:
    return dict(cluster.resource_status.get("workers") or {})


def slurm_jobs_named(prefix: str) -> list[str]:
    """squeue's view by job name (`dask.<ns>.<cluster>.…`), independent of our uid logic."""
    out = subprocess.run(["squeue", "--noheader", "--format=%i|%j"], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line.split("|", 1)[1].startswith(prefix)]


@pytest.fixture
def clusters() -> Iterator[list[HPCCluster]]:
    """Every cluster a test makes is closed, and leaves no job, even when the test fails."""
    made: list[HPCCluster] = []
    yield made
    for cluster in made:
        if cluster.status != Status.closed:
            cluster.close()
        if cluster.uid:
            assert live_slurm_jobs(cluster.uid) == []


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_standalone_cluster_on_slurm(site: SiteConfig, clusters: list[HPCCluster]) -> None:
    name = f"pyapi-{uuid.uuid4().hex[:6]}"
    cluster = HPCCluster(name, backend="slurm", queue="debug", memory="1GiB", replicas=1,
                         site_config=site, timeout=120, quiet=True)
    clusters.append(cluster)
    assert cluster.mode == "standalone" and cluster.uid
    assert cluster.scheduler_address.startswith("tcp://")
    assert live_slurm_jobs(cluster.uid), "the scheduler runs as a SLURM job"

    with Client(cluster) as client:
        assert client.submit(double, 21).result() == 42

        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=120)
        until(lambda: cluster.phase == "Running" and counts(cluster)["ready"] == 2, 30,
              "status Running with 2 ready", cluster)
        card = cluster._repr_html_()
        assert "Running" in card and "2 / 2" in card and "slurm" in card
        assert cluster.dashboard_link and cluster.dashboard_link in card

        cluster.scale(0)
        until(lambda: connected(cluster) == 0 and counts(cluster).get("desired") == 0
              and counts(cluster).get("running") == 0, 90, "scale-down to 0", cluster)

        # adapt(): a DaskAutoscaler in the session, driven by the scheduler's own target.
        scaler = cluster.adapt(0, 2, scale_down_delay=5)
        assert scaler == f"{name}-default-autoscaler"
        assert "Adaptive" in cluster._scaling_status()
        futures = client.map(slow, range(20), pure=False)
        until(lambda: connected(cluster) >= 1, 90, "the burst to bring a worker", cluster)
        assert sorted(client.gather(futures)) == list(range(20))
        del futures

        # Scaling by hand turns adaptivity off (the autoscaler would undo it otherwise).
        cluster.scale(0)
        assert "Manual" in cluster._scaling_status()
        until(lambda: connected(cluster) == 0 and counts(cluster).get("running") == 0, 90,
              "scale-down after the burst", cluster)

    uid = cluster.uid
    cluster.close()
    assert cluster.status == Status.closed
    assert live_slurm_jobs(uid) == []
    assert slurm_jobs_named(f"dask.default.{name}.") == []


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_start_timeout_says_why_and_leaves_nothing(site: SiteConfig) -> None:
    """A scheduler job that cannot start: the error carries the cluster's status (here
    sbatch's refusal of the partition; for a queued job, the queue's reason) and the
    cluster is gone when the constructor raises."""
    name = f"pyapi-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with pytest.raises(ClusterStartTimeout) as caught:
        HPCCluster(name, backend="slurm", queue="no-such-partition", memory="1GiB",
                   site_config=site, timeout=6, quiet=True)
    message = str(caught.value)
    assert f"DaskCluster default/{name}: no scheduler after 6 s" in message
    assert "Pending" in message and "invalid partition" in message.lower(), message
    assert "no job of it is left" in message
    assert time.monotonic() - started < 60
    assert slurm_jobs_named(f"dask.default.{name}.") == []


def holding_site(staging: Path, tmp_path: Path) -> SiteConfig:
    """Every sbatch gets --hold: the jobs stay queued with a real SLURM reason."""
    wrapper = tmp_path / "hold-submissions"
    wrapper.write_text('#!/bin/sh\nif [ "$1" = sbatch ]; then shift; exec sbatch --hold "$@"; '
                       'fi\nexec "$@"\n')
    wrapper.chmod(0o755)
    return SiteConfig(staging_dir=str(staging), min_poll_interval=0.5, poll_interval=1.0,
                      submit_prefix=(str(wrapper),))


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_queued_scheduler_times_out_with_the_queue_reason(staging: Path, tmp_path: Path) -> None:
    """A scheduler job that stays queued: the timeout names SLURM's reason. The job is held
    (a real pending reason, and deterministic on an idle node) by a submit prefix that adds
    --hold to sbatch, the hook a site uses for `ssh login1`."""
    site = holding_site(staging, tmp_path)
    name = f"pyapi-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ClusterStartTimeout) as caught:
        HPCCluster(name, backend="slurm", memory="1GiB", site_config=site, timeout=6,
                   quiet=True)
    message = str(caught.value)
    assert "(Pending: scheduler job " in message and " is queued (JobHeld" in message, message
    assert "no job of it is left" in message
    assert slurm_jobs_named(f"dask.default.{name}.") == []


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_ctrl_c_while_waiting_leaves_no_job(staging: Path, tmp_path: Path) -> None:
    """Interrupted while the scheduler is queued: the constructor ends what it submitted
    before it lets the interruption through (in a script dask-jobqueue's SIGINT handler
    turns it into SystemExit; either is handled)."""
    name = f"pyapi-{uuid.uuid4().hex[:6]}"
    program = (
        "import sys\n"
        "from dask_hpc_operator import HPCCluster\n"
        "from dask_hpc_operator.site_config import SiteConfig\n"
        f"site = SiteConfig(staging_dir={str(staging)!r}, min_poll_interval=0.5,\n"
        f"                  submit_prefix={holding_site(staging, tmp_path).submit_prefix!r})\n"
        "try:\n"
        f"    HPCCluster({name!r}, backend='slurm', memory='1GiB', site_config=site,\n"
        "               timeout=300, quiet=True)\n"
        "except (KeyboardInterrupt, SystemExit) as exc:\n"
        "    print('interrupted', type(exc).__name__, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: slurm_jobs_named(f"dask.default.{name}."), 60, "the held scheduler job")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "interrupted" in out, out
    assert slurm_jobs_named(f"dask.default.{name}.") == []


def test_local_backend_groups_and_resources(tmp_path: Path,
                                            clusters: list[HPCCluster]) -> None:
    """No SLURM needed: the local backend runs the same job scripts as processes. A worker
    group with a Dask resource receives the work that asks for it; scaling and deleting the
    group go through the group's own object."""
    staging = tmp_path / "staging"
    site = SiteConfig(staging_dir=str(staging), min_poll_interval=0.5, poll_interval=1.0)
    cluster = HPCCluster("local-api", backend="local", memory="1GiB", replicas=1,
                         site_config=site, timeout=60, quiet=True)
    clusters.append(cluster)
    with cluster.get_client() as client:
        assert client.cluster is cluster
        assert cluster.add_worker_group("himem", replicas=1, memory="1GiB",
                                        resources={"HIGHMEM": 1}) == "himem"
        cluster.wait_for_workers(2, timeout=60)
        routed = client.submit(double, 5, resources={"HIGHMEM": 1}, pure=False)
        assert routed.result(timeout=60) == 10
        [holder] = client.who_has(routed)[routed.key]
        assert cluster.scheduler_info["workers"][holder]["name"].startswith(
            "dask.default.local-api.himem.")
        with pytest.raises(ValueError, match="has no worker group 'nope'"):
            cluster.scale(1, group="nope")
        cluster.scale(0, group="himem")
        until(lambda: connected(cluster) == 1, 60, "the group to shrink", cluster)
        cluster.delete_worker_group("himem")
    cluster.close()
    assert not list((staging / "clusters").glob("*/*")), "staging directory removed"


async def test_local_backend_asynchronous(tmp_path: Path) -> None:
    """`asynchronous=True`: awaitable methods on the caller's loop; the session still steps
    in its own thread."""
    site = SiteConfig(staging_dir=str(tmp_path / "staging"), min_poll_interval=0.5,
                      poll_interval=1.0)
    async with HPCCluster("local-async", backend="local", memory="1GiB", replicas=1,
                          site_config=site, timeout=60, quiet=True,
                          asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            assert await client.submit(double, 4) == 8
            await cluster.scale(2)
            await client.wait_for_workers(2, timeout=60)
        assert cluster.phase in ("Running", "Scaling")
    assert cluster.status == Status.closed


def test_jobs_end_when_the_interpreter_exits_without_close(tmp_path: Path) -> None:
    """A standalone session is the only thing that would ever end its jobs, so a program
    that forgets close() still ends them at exit (the atexit hook)."""
    staging = tmp_path / "staging"
    program = (
        "from dask_hpc_operator import HPCCluster\n"
        "from dask_hpc_operator.site_config import SiteConfig\n"
        f"site = SiteConfig(staging_dir={str(staging)!r}, min_poll_interval=0.5)\n"
        "cluster = HPCCluster('forgotten', backend='local', memory='1GiB', replicas=1,\n"
        "                     site_config=site, timeout=60, quiet=True)\n"
        "cluster.wait_for_workers(1, timeout=60)\n"
        "print('running', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "running" in result.stdout, result.stderr
    out = subprocess.run(["ps", "-ww", "-eo", "args="], capture_output=True, text=True).stdout
    assert [line for line in out.splitlines() if str(staging) in line] == []
