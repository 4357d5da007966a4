"""HPCCluster's manifests and refusals: what it would create, and that bad input names the
field (and the keyword it came from) before anything starts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dask_hpc_operator import HPCCluster
from dask_hpc_operator.hpc_cluster import (
    autoscaler_manifest,
    autoscaler_name,
    cluster_manifest,
    worker_group_manifest,
)
from dask_hpc_operator.hpc_cluster_stores import HPCClusterError, KubernetesStore
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import ManifestError, validate


@pytest.fixture(autouse=True)
def no_kube_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever the machine has, these tests see no Kubernetes configuration."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_shortcuts_fill_the_worker_and_place_the_scheduler() -> None:
    doc = cluster_manifest("analysis", "team", backend="slurm", replicas=2, cores=4,
                           memory="16GiB", walltime="02:00:00", queue="debug",
                           account="proj1", env={"OMP_NUM_THREADS": 1},
                           resources={"HIGHMEM": 1}, extra_directives=("--constraint=hsw",))
    assert doc["metadata"] == {"name": "analysis", "namespace": "team"}
    assert doc["spec"]["backend"] == "slurm"
    assert doc["spec"]["worker"] == {
        "replicas": 2, "cores": 4, "memory": "16GiB", "walltime": "02:00:00",
        "queue": "debug", "account": "proj1",
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}], "resources": {"HIGHMEM": 1},
        "extraDirectives": ["--constraint=hsw"]}
    # Same partition, account and walltime for the scheduler's own job...
    assert doc["spec"]["scheduler"] == {"queue": "debug", "account": "proj1",
                                        "walltime": "02:00:00"}
    # ...unless scheduler= says otherwise; inside worker= they stay the workers'.
    doc = cluster_manifest("a", queue="debug", scheduler={"queue": "service"},
                           worker={"account": "w"})
    assert doc["spec"]["scheduler"] == {"queue": "service"}
    assert doc["spec"]["worker"]["account"] == "w"
    assert "account" not in doc["spec"]["scheduler"]
    assert validate(doc)["spec"]["worker"]["replicas"] == 0  # replicas default to 0


@pytest.mark.parametrize(("kwargs", "field", "keyword"), [
    ({"memory": "16 GB"}, "spec.worker.memory", "memory="),
    ({"walltime": "1h"}, "spec.worker.walltime", "walltime="),
    ({"cores": 0}, "spec.worker.cores", "cores="),
    ({"queue": "debug; rm -rf /"}, "spec.worker.queue", "queue="),
    ({"replicas": -1}, "spec.worker.replicas", "replicas="),
    ({"env": {"BAD NAME": "x"}}, "spec.worker.env[0].name", "env="),
    ({"backend": "lsf"}, "spec.backend", "backend="),
    ({"worker": {"replica": 2}}, "spec.worker.replica", None),
    ({"scheduler": {"memory": "lots"}}, "spec.scheduler.memory", None),
])
def test_bad_values_name_the_field_and_the_keyword(kwargs: dict[str, object], field: str,
                                                   keyword: str | None) -> None:
    with pytest.raises(ManifestError) as caught:
        cluster_manifest("a", **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field
    if keyword:
        assert f"(from {keyword})" in str(caught.value)


def test_invalid_names_and_conflicts() -> None:
    with pytest.raises(ManifestError, match=r"metadata.name: 'My_Cluster'"):
        cluster_manifest("My_Cluster")
    with pytest.raises(ValueError, match=r"memory= and worker\['memory'\] are both given"):
        cluster_manifest("a", memory="1GiB", worker={"memory": "2GiB"})
    cluster_manifest("a", memory="1GiB", worker={"memory": "1GiB"})  # agreeing is fine
    with pytest.raises(TypeError, match="unknown worker option nodes="):
        cluster_manifest("a", nodes=2)


def test_worker_groups_and_autoscalers() -> None:
    group = worker_group_manifest("himem", "ns", "pool", replicas=1, memory="64GiB",
                                  resources={"HIGHMEM": 1})
    assert group["spec"] == {"cluster": "pool", "worker": {
        "replicas": 1, "memory": "64GiB", "resources": {"HIGHMEM": 1}}}
    assert group["metadata"]["labels"] == {"hpc.dask.org/cluster": "pool"}
    with pytest.raises(ValueError, match="the cluster's own worker group"):
        worker_group_manifest("default", "ns", "pool")

    scaler = autoscaler_manifest("pool", "ns", "himem", 0, 4)
    assert scaler["metadata"]["name"] == "pool-himem-autoscaler"
    # Every field written out, so an update replaces the whole spec.
    assert scaler["spec"] == {"cluster": "pool", "workerGroup": "himem", "minimum": 0,
                              "maximum": 4, "scaleDownDelay": 60}
    with pytest.raises(ManifestError, match=r"spec\.minimum: exceeds spec\.maximum"):
        autoscaler_manifest("pool", "ns", "default", 5, 2)
    long = autoscaler_name("c" * 60, "g" * 60)
    assert len(long) <= 63 and long == autoscaler_name("c" * 60, "g" * 60)
    assert validate(autoscaler_manifest("c" * 60, "ns", "g" * 60, 0, 1))


def _session_threads() -> int:
    return sum(t.name == "dask-hpc-session" for t in threading.enumerate())


def test_refusals_start_nothing(tmp_path: Path) -> None:
    site = SiteConfig(staging_dir=str(tmp_path / "staging"))
    before = _session_threads()
    with pytest.raises(ManifestError, match=r"spec\.worker\.memory"):
        HPCCluster("a", memory="16 GB", site_config=site)
    with pytest.raises(ValueError, match="standalone cluster lives in this process"):
        HPCCluster("a", site_config=site, shutdown_on_close=False)
    with pytest.raises(ValueError, match="site_config= configures a standalone cluster"):
        HPCCluster("a", kubernetes=True, site_config=site)
    with pytest.raises(ValueError, match="kubernetes must be"):
        HPCCluster("a", kubernetes="yes", site_config=site)  # type: ignore[arg-type]
    assert _session_threads() == before
    assert not (tmp_path / "staging").exists()


def test_kubernetes_without_configuration_says_so(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(HPCClusterError, match="no usable Kubernetes configuration"):
        HPCCluster.from_name("pool")
    with pytest.raises(HPCClusterError, match="no usable Kubernetes configuration"):
        HPCCluster("pool", kubernetes=True)


def test_auto_runs_standalone_without_a_usable_api(tmp_path: Path) -> None:
    assert KubernetesStore.detect("default") is None  # no configuration at all
    # A configuration whose server does not answer: standalone, with a warning.
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    assert KubernetesStore.detect("default", config) is None
