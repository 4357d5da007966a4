"""dask_hpc_operator.policy: the site's per-namespace policy, every rule checked directly,
its loading from the site configuration, and its enforcement on the refusal paths (the
reconcilers, `up`, `render`) with nothing submitted; the submitting identity per namespace
(one backend and poller per identity) and the sweep over every identity."""

from __future__ import annotations

import copy
import grp
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from dask_hpc_operator.autoscaler_reconcile import AutoscalerReconciler
from dask_hpc_operator.cli import main
from dask_hpc_operator.embedded import prepare
from dask_hpc_operator.job_reconcile import JobReconciler
from dask_hpc_operator.policy import (
    POLICY_KEYS,
    NamespacePolicy,
    PolicyError,
    admit,
    check,
    counts_siblings,
    directive_governs,
    make_staging,
    parse_namespaces,
    policy_for,
    submit_prefix,
)
from dask_hpc_operator.reconcile import GroupReconciler, Runtime
from dask_hpc_operator.site_config import ConfigError, SiteConfig
from dask_hpc_operator.sweep import sweep
from dask_hpc_operator.validation import ManifestError, validate
from hpc_bridge.backends.base import BatchSystemError
from hpc_bridge.backends.slurm import SlurmBackend
from hpc_bridge.model import (
    JobAccounting,
    JobIdentity,
    JobRequest,
    JobState,
    ObservedJob,
    Role,
)
from hpc_bridge.poller import BatchSystemUnavailable

API = "hpc.dask.org/v1alpha1"
NS = "physics"


def cluster(name: str = "c1", namespace: str = NS, **spec: Any) -> dict[str, Any]:
    worker = {"replicas": 2, "cores": 4, "memory": "8GiB", "walltime": "01:00:00",
              **spec.pop("worker", {})}
    return {"apiVersion": API, "kind": "DaskCluster",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "generation": 1},
            "spec": {"backend": "slurm", "scheduler": {"cores": 1, "memory": "2GiB",
                                                       **spec.pop("scheduler", {})},
                     "worker": worker, **spec}}


def group(name: str, of: str = "c1", namespace: str = NS, **worker: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskWorkerGroup",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "generation": 1},
            "spec": {"cluster": of, "worker": {"replicas": 1, "cores": 4, "memory": "8GiB",
                                               **worker}}}


def daskjob(mode: str = "cluster", **job: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskJob",
            "metadata": {"name": "j1", "namespace": NS, "uid": "uid-j1", "generation": 1},
            "spec": {"mode": mode, "job": {"command": ["python", "-c", "1"], **job},
                     "cluster": {"backend": "slurm",
                                 "worker": {"replicas": 3, "cores": 2, "memory": "4GiB"}}}}


def autoscaler(maximum: int, target: str = "default") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskAutoscaler",
            "metadata": {"name": "a1", "namespace": NS, "uid": "uid-a1", "generation": 1},
            "spec": {"cluster": "c1", "workerGroup": target, "minimum": 0,
                     "maximum": maximum}}


SITE = SiteConfig(backend="slurm")


def refuse(manifest: dict[str, Any], policy: NamespacePolicy, *,
           cluster_doc: dict[str, Any] | None = None,
           groups: Sequence[dict[str, Any]] = (), site: SiteConfig = SITE) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        check(validate(manifest), policy, site, cluster=cluster_doc, groups=groups)
    return info.value


def accept(manifest: dict[str, Any], policy: NamespacePolicy, *,
           cluster_doc: dict[str, Any] | None = None,
           groups: Sequence[dict[str, Any]] = (), site: SiteConfig = SITE) -> None:
    check(validate(manifest), policy, site, cluster=cluster_doc, groups=groups)


def policy(**kw: Any) -> NamespacePolicy:
    return NamespacePolicy(name=NS, **kw)


# --- per-job rules -------------------------------------------------------------------------

def test_walltime_over_the_limit_names_rule_field_and_fix() -> None:
    rule = policy(max_walltime="04:00:00")
    error = refuse(cluster(worker={"walltime": "04:00:01"}), rule)
    assert isinstance(error, ManifestError)  # the existing refusal paths catch it
    assert error.field == "spec.worker.walltime" and error.rule == "maxWalltime"
    text = str(error)
    assert text.startswith("spec.worker.walltime: 04:00:01 exceeds ")
    assert 'policy maxWalltime of namespace "physics" (04:00:00)' in text
    assert "ask your site administrator, or lower it to 04:00:00" in text
    accept(cluster(worker={"walltime": "04:00:00"}), rule)
    # The scheduler's job is a job too.
    assert refuse(cluster(worker={"walltime": "01:00:00"}, scheduler={"walltime": "1-00:00:00"}),
                  rule).field == "spec.scheduler.walltime"


@pytest.mark.parametrize(("where", "field"), [
    ({"worker": {"queue": "gpu"}}, "spec.worker.queue"),
    ({"scheduler": {"queue": "gpu"}}, "spec.scheduler.queue"),
])
def test_queue_not_allowed(where: dict[str, Any], field: str) -> None:
    error = refuse(cluster(**where), policy(queues=("debug", "highmem")))
    assert error.field == field and error.rule == "queues"
    assert "'gpu' is not allowed by policy queues" in str(error)
    assert "use one of debug, highmem" in str(error)


def test_allowed_queue_and_no_queue_pass() -> None:
    rule = policy(queues=("debug",), accounts=("phys01",))
    accept(cluster(worker={"queue": "debug", "account": "phys01"}), rule)
    accept(cluster(), rule)  # none asked: the batch system's default, the site's choice


def test_account_not_allowed_and_empty_list_allows_none() -> None:
    error = refuse(cluster(worker={"account": "chem02"}), policy(accounts=("phys01",)))
    assert (error.field, error.rule) == ("spec.worker.account", "accounts")
    error = refuse(cluster(worker={"account": "phys01"}), policy(accounts=()))
    assert "remove account" in str(error)


def test_runner_job_placement_and_walltime_are_checked() -> None:
    assert refuse(daskjob(queue="gpu"), policy(queues=("debug",))).field == "spec.job.queue"
    assert refuse(daskjob(walltime="10:00:00"),
                  policy(max_walltime="08:00:00")).field == "spec.job.walltime"
    error = refuse({**daskjob(), "spec": {**daskjob()["spec"], "cluster": {
        "worker": {"queue": "gpu"}}}}, policy(queues=("debug",)))
    assert error.field == "spec.cluster.worker.queue"


def test_cores_per_job() -> None:
    rule = policy(max_cores_per_job=16)
    accept(cluster(worker={"cores": 16}), rule)
    error = refuse(cluster(worker={"cores": 17}), rule)
    assert error.field == "spec.worker.cores" and error.rule == "maxCoresPerJob"
    assert "17 cores per job exceed" in str(error)


def test_an_allocation_is_one_job_of_all_its_tasks() -> None:
    """Scheduler task + 3 workers (+ the client of a DaskJob), each sized like a worker."""
    rule = policy(max_cores_per_job=16, max_memory_per_job="32GiB")
    accept(cluster(mode="allocation", worker={"replicas": 3, "cores": 4, "memory": "8GiB"}),
           rule)
    error = refuse(cluster(mode="allocation", worker={"replicas": 4, "cores": 4,
                                                      "memory": "4GiB"}), rule)
    assert error.field == "spec.worker.cores" and "5 tasks of 4 cores" in str(error)
    job = daskjob("allocation")  # 3 workers + scheduler + client, 2 cores each: 10 cores
    accept(job, policy(max_cores_per_job=10))
    assert refuse(job, policy(max_cores_per_job=9)).field == "spec.cluster.worker.cores"


def test_memory_per_job() -> None:
    rule = policy(max_memory_per_job="64GiB")
    accept(cluster(worker={"memory": "64GiB"}), rule)
    error = refuse(cluster(worker={"memory": "65GiB"}), rule)
    assert error.field == "spec.worker.memory" and error.rule == "maxMemoryPerJob"
    assert "lower it to 64GiB" in str(error)


def test_prologue_lines_must_match_when_a_list_is_given() -> None:
    rule = policy(allowed_prologue=("module load .*", "source /opt/site/env.sh"))
    accept(cluster(worker={"prologue": ["module load cuda/12.2", "source /opt/site/env.sh"]}),
           rule)
    error = refuse(cluster(worker={"prologue": ["module load x", "source /home/me/env.sh"]}),
                   rule)
    assert error.field == "spec.worker.prologue[1]" and error.rule == "allowedPrologue"
    assert "'source /home/me/env.sh' is not allowed" in str(error)
    # The whole line must match: a pattern is not a prefix.
    assert refuse(cluster(scheduler={"prologue": ["xmodule load a"]}),
                  rule).field == "spec.scheduler.prologue[0]"
    accept(cluster(worker={"prologue": ["anything goes"]}), policy())  # no list: no rule
    assert "may not add any" in str(refuse(cluster(worker={"prologue": ["ls"]}),
                                           policy(allowed_prologue=())))


def test_directives_must_match_when_a_list_is_given() -> None:
    rule = policy(allowed_directives=("--constraint=.*", "--qos=(low|normal)"))
    accept(cluster(worker={"extraDirectives": ["--constraint=haswell", "--qos=low"]}), rule)
    error = refuse(cluster(worker={"extraDirectives": ["--qos=high"]}), rule)
    assert error.field == "spec.worker.extraDirectives[0]"
    assert error.rule == "allowedDirectives"
    accept(cluster(worker={"extraDirectives": ["--qos=high"]}), policy())


@pytest.mark.parametrize(("directive", "backend", "governs"), [
    ("--time=7-00:00:00", "slurm", ["maxWalltime"]),
    ("-t 10:00:00", "slurm", ["maxWalltime"]),
    ("--partition=gpu", "slurm", ["queues"]),
    ("--part=gpu", "slurm", ["queues"]),  # sbatch takes unambiguous abbreviations
    ("-pgpu", "slurm", ["queues"]),  # and a short option's value right after it
    ("-A chem", "slurm", ["accounts"]),
    ("--mem-per-cpu=100G", "slurm", ["maxMemoryPerJob"]),
    ("--gres=gpu:8", "slurm", ["maxGpus"]),
    ("--ntasks=64", "slurm", ["cores"]),
    ("--exclusive", "slurm", ["cores", "maxGpus"]),  # every GPU of its nodes too
    ("--exc", "slurm", ["cores", "maxGpus"]),
    ("-M other", "slurm", ["clusters"]),
    ("--clusters=other", "slurm", ["clusters"]),
    ("--cluster-constraint=x", "slurm", ["clusters"]),
    ("--array=0-999", "slurm", ["jobs"]),
    ("--uid=0", "slurm", ["identity"]),
    ("--constraint=haswell", "slurm", []),
    ("--exclude=node1", "slurm", []),
    ("-l walltime=100:00:00", "pbs", ["maxWalltime"]),
    ("-l select=4:ncpus=64:ngpus=4", "pbs", ["maxMemoryPerJob", "cores", "maxGpus"]),
    ("-q gpu", "pbs", ["queues"]),
    ("-P chem", "pbs", ["accounts"]),
    ("-J 0-99", "pbs", ["jobs"]),
    ("-l place=excl", "pbs", ["cores", "maxGpus"]),
    ("-l max_walltime=100:00:00", "pbs", ["maxWalltime"]),
    ("-l min_walltime=10:00:00,max_walltime=99:00:00", "pbs", ["maxWalltime"]),
    ("-l soft_walltime=100:00:00", "pbs", ["maxWalltime"]),
    ("-q gpu@other-server", "pbs", ["queues", "clusters"]),
    ("-m abe", "pbs", []),
    ("-M me@example.org", "pbs", []),  # PBS's -M: the mail recipients
    ("--time=1:00:00", "local", []),
])
def test_what_a_directive_sets(directive: str, backend: str, governs: list[str]) -> None:
    assert sorted(directive_governs(directive, backend)) == sorted(governs)


@pytest.mark.parametrize(("directive", "rule"), [
    ("--time=7-00:00:00", policy(max_walltime="08:00:00")),
    ("--partition=gpu", policy(queues=("debug",))),
    ("--account=chem", policy(accounts=("phys01",))),
    ("--mem=1T", policy(max_memory_per_job="64GiB")),
    ("--cpus-per-task=128", policy(max_cores_per_job=16)),
    ("--gpus=8", policy(max_gpus=4)),
    ("--ntasks=64", policy(max_cores=200)),
    ("-p gpu", policy(queues=("debug",))),
])
def test_directives_cannot_walk_around_a_limit(directive: str, rule: NamespacePolicy) -> None:
    """Even with allowedDirectives absent (anything else allowed), and even when an
    allowedDirectives pattern would match: the batch system reads the last directive."""
    error = refuse(cluster(worker={"extraDirectives": ["--constraint=a", directive]}), rule)
    assert error.field == "spec.worker.extraDirectives[1]"
    assert "would override what policy" in str(error)
    loose = NamespacePolicy(**{**rule.__dict__, "allowed_directives": (".*",)})
    refuse(cluster(worker={"extraDirectives": [directive]}), loose)


def test_exclusive_nodes_are_governed_by_max_gpus_not_memory() -> None:
    """--exclusive gets every GPU of the node; memory only as asked (--mem=0 asks all)."""
    for directive in ("--exclusive", "--exc"):
        error = refuse(cluster(worker={"extraDirectives": [directive]}), policy(max_gpus=0))
        assert (error.field, error.rule) == ("spec.worker.extraDirectives[0]", "maxGpus")
    accept(cluster(worker={"extraDirectives": ["--exclusive"]}),
           policy(max_memory_per_job="8GiB"))
    assert refuse(cluster(worker={"extraDirectives": ["--mem=0"]}),
                  policy(max_memory_per_job="8GiB")).rule == "maxMemoryPerJob"
    pbs = cluster(backend="pbs", worker={"extraDirectives": ["-l place=excl"]})
    assert refuse(pbs, policy(max_gpus=2)).rule == "maxGpus"


@pytest.mark.parametrize("resource", ["max_walltime", "min_walltime", "soft_walltime"])
def test_pbs_walltime_resources_are_governed_by_max_walltime(resource: str) -> None:
    manifest = cluster(backend="pbs", worker={"extraDirectives": [f"-l {resource}=99:00:00"]})
    assert refuse(manifest, policy(max_walltime="08:00:00")).rule == "maxWalltime"
    accept(manifest, policy(queues=("debug",)))


def test_directives_of_unlimited_things_pass() -> None:
    accept(cluster(worker={"extraDirectives": ["--time-min=00:30:00"]}),
           policy(queues=("debug",)))


def test_pbs_directives_are_read_as_pbs() -> None:
    manifest = cluster(backend="pbs", worker={"extraDirectives": ["-l walltime=99:00:00"]})
    assert refuse(manifest, policy(max_walltime="08:00:00")).rule == "maxWalltime"
    # The same text on SLURM sets nothing limited (-l is --licenses there).
    accept(cluster(worker={"extraDirectives": ["-l walltime=99:00:00"]}),
           policy(max_walltime="08:00:00"))
    # A cluster without backend: the site's default decides the syntax.
    default_backend = cluster(worker={"extraDirectives": ["-q gpu"]})
    del default_backend["spec"]["backend"]
    accept(default_backend, policy(queues=("debug",)))
    refuse(default_backend, policy(queues=("debug",)), site=SiteConfig(backend="pbs"))


# --- totals over the whole cluster ---------------------------------------------------------

def test_max_workers_on_a_cluster() -> None:
    rule = policy(max_workers=20)
    accept(cluster(worker={"replicas": 20}), rule)
    error = refuse(cluster(worker={"replicas": 21}), rule)
    assert error.field == "spec.worker.replicas" and error.rule == "maxWorkers"
    assert "DaskCluster c1 would use 21 workers, over policy maxWorkers" in str(error)
    assert "lower it to 20" in str(error)


def test_max_workers_counts_every_group_of_the_cluster() -> None:
    rule = policy(max_workers=10)
    base = cluster(worker={"replicas": 4})
    gpu, big = group("gpu", replicas=3), group("big", replicas=3)
    accept(base, rule, groups=[gpu, big])
    accept(group("gpu", replicas=3), rule, cluster_doc=base, groups=[gpu, big])
    error = refuse(group("gpu", replicas=5), rule, cluster_doc=base, groups=[gpu, big])
    assert error.field == "spec.worker.replicas"
    assert "DaskCluster c1 would use 12 workers (7 of them in its other parts)" in str(error)
    assert "lower it to 3" in str(error)
    # The cluster scaled up past the limit with its groups: refused too.
    assert refuse(cluster(worker={"replicas": 6}), rule,
                  groups=[gpu, big]).field == "spec.worker.replicas"
    # Groups of other clusters, other namespaces, invalid or being deleted do not count.
    gone = group("gone", replicas=50)
    gone["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    accept(base, rule, groups=[gpu, big, group("x", of="c2", replicas=50),
                               group("y", namespace="other", replicas=50), gone,
                               group("bad", replicas=-1)])


def test_a_group_the_operator_refuses_still_counts() -> None:
    """An edit the CRD accepts and the operator refuses (100TiB) leaves the group's earlier
    jobs running: its replicas, cores and GPUs are read where they are sane numbers, its
    last live count (status.replicas) where they are not."""
    rule = policy(max_workers=10, max_cores=1000, max_gpus=8)
    base = cluster(worker={"replicas": 0})
    edited = group("g1", replicas=10, memory="100TiB")
    with pytest.raises(ManifestError):
        validate(edited)
    error = refuse(group("g2", replicas=1), rule, cluster_doc=base, groups=[edited])
    assert "11 workers (10 of them in its other parts)" in str(error)
    assert refuse(cluster(worker={"replicas": 1}), rule, groups=[edited]).rule == "maxWorkers"
    # Unreadable replicas: the last live count; cores and GPUs as written where sane.
    broken = group("g1", replicas=-1, cores=4, gpus=8, memory="100TiB")
    broken["status"] = {"replicas": 9}
    assert "11 workers (9 of them" in str(refuse(group("g2", replicas=2), rule,
                                                  cluster_doc=base, groups=[broken]))
    error = refuse(group("g2", replicas=1, gpus=1), policy(max_gpus=72), cluster_doc=base,
                   groups=[broken])
    assert "73 GPUs (72 of them in its other parts)" in str(error)
    accept(group("g2", replicas=1), policy(max_workers=10), cluster_doc=base,
           groups=[group("g1", replicas="ten"), group("g3", of="c2", replicas=50,
                                                        memory="100TiB")])


def test_a_group_without_a_known_cluster_counts_alone() -> None:
    accept(group("g", replicas=10), policy(max_workers=10))
    refuse(group("g", replicas=11), policy(max_workers=10))


def test_max_cores_total_includes_scheduler_and_runner() -> None:
    # 1 scheduler core + 2 workers x 4 cores = 9
    accept(cluster(), policy(max_cores=9))
    error = refuse(cluster(), policy(max_cores=8))
    assert error.rule == "maxCores" and error.field == "spec.worker.replicas"
    assert "lower it to 1" in str(error)
    # DaskJob: runner (1) + scheduler (1) + 3 workers x 2 cores = 8
    accept(daskjob(), policy(max_cores=8))
    assert refuse(daskjob(), policy(max_cores=7)).field == "spec.cluster.worker.replicas"


def test_max_gpus_refuses_the_groups_that_ask_not_the_cluster() -> None:
    rule = policy(max_gpus=4)
    base = cluster()
    gpus = [group("g1", replicas=2, gpus=2), group("g2", replicas=1, gpus=2)]
    accept(base, rule, groups=gpus)  # no GPUs of its own: not its doing
    error = refuse(gpus[0], rule, cluster_doc=base, groups=gpus)
    assert error.rule == "maxGpus" and "6 GPUs (2 of them in its other parts)" in str(error)
    assert "lower it to 1" in str(error)
    accept(group("g1", replicas=1, gpus=2), rule, cluster_doc=base, groups=gpus)


def test_autoscaler_maximum_counts_against_max_workers() -> None:
    rule = policy(max_workers=10)
    base = cluster(worker={"replicas": 2})
    accept(autoscaler(10), rule, cluster_doc=base)
    error = refuse(autoscaler(11), rule, cluster_doc=base)
    assert (error.field, error.rule) == ("spec.maximum", "maxWorkers")
    assert "lower it to 10" in str(error)
    # Scaling a group: the cluster's own workers count beside the maximum.
    gpu = group("gpu", replicas=1)
    accept(autoscaler(8, "gpu"), rule, cluster_doc=base, groups=[gpu])
    error = refuse(autoscaler(9, "gpu"), rule, cluster_doc=base, groups=[gpu])
    assert "lower it to 8" in str(error)
    # No cluster yet: nothing to count (the autoscaler waits for it anyway).
    accept(autoscaler(100), rule)


def test_an_allocation_counts_its_tasks() -> None:
    # 4 workers + the scheduler's task, 4 cores each = 20
    manifest = cluster(mode="allocation", worker={"replicas": 4, "cores": 4})
    accept(manifest, policy(max_cores=20))
    error = refuse(manifest, policy(max_cores=19))
    assert "lower it to 3" in str(error)


def test_a_cluster_once_accepted_is_not_refused_for_a_group_added_later() -> None:
    """The group that pushes the cluster over a limit is refused on its own reconcile; the
    running cluster (maybe a DaskJob's) is not turned Failed for it. A new spec of the
    cluster is checked with its groups, so it cannot grow into room they fill."""
    manifest = cluster(worker={"replicas": 8})
    ran = {"observedGeneration": 1, "conditions": [
        {"type": "Accepted", "status": "True", "reason": "Valid"}]}
    assert not counts_siblings(manifest, ran)
    assert counts_siblings(manifest, {})  # never accepted
    assert counts_siblings(manifest, {**ran, "observedGeneration": 0})  # a new spec
    assert counts_siblings(manifest, {**ran, "conditions": [
        {"type": "Accepted", "status": "False", "reason": "PolicyViolation"}]})


# --- which policy applies ------------------------------------------------------------------

def test_the_star_entry_covers_unlisted_namespaces() -> None:
    site = SiteConfig.from_mapping({"namespaces": {
        "physics": {"maxWorkers": 20}, "*": {"maxWorkers": 4, "submitAs": ["sudo", "-u", "x"]}}})
    assert policy_for(site, "physics") is site.namespaces["physics"]
    assert policy_for(site, "chemistry") is site.namespaces["*"]
    assert policy_for(SiteConfig(), "physics") is None
    with pytest.raises(PolicyError) as info:
        admit(cluster(namespace="chemistry", worker={"replicas": 5}), site)
    assert ('policy maxWorkers of namespace "chemistry" (the site\'s "*" entry) (4)'
            in str(info.value))
    admit(cluster(worker={"replicas": 20}), site)
    admit(cluster(worker={"replicas": 500}), SiteConfig())  # no policy: anything valid


def test_submit_prefix_per_namespace() -> None:
    site = SiteConfig.from_mapping({"submitPrefix": ["ssh", "login1"], "namespaces": {
        "physics": {"submitAs": ["sudo", "-n", "-u", "phys", "--"]},
        "chemistry": {"maxWorkers": 3}, "root-ns": {"submitAs": []}}})
    assert submit_prefix(site, "physics") == ("sudo", "-n", "-u", "phys", "--")
    assert submit_prefix(site, "chemistry") == ("ssh", "login1")  # a policy without submitAs
    assert submit_prefix(site, "root-ns") == ()  # [] is the operator's own user, no prefix
    assert submit_prefix(site, None) == ("ssh", "login1")


# --- which batch system ---------------------------------------------------------------------

AS_PHYS = ("sudo", "-n", "-u", "phys", "--")


def test_the_local_backend_is_refused_where_jobs_run_as_another_user() -> None:
    """Local jobs are the operator's own processes: under submitAs they would run the
    namespace's prologue lines and DaskJob commands as the operator."""
    rule = policy(submit_as=AS_PHYS)
    error = refuse(cluster(backend="local"), rule)
    assert (error.field, error.rule) == ("spec.backend", "submitAs")
    assert "backend local runs jobs as the operator's own processes" in str(error)
    assert "set spec.backend to slurm or pbs" in str(error)
    job = daskjob()
    job["spec"]["cluster"]["backend"] = "local"
    assert refuse(job, rule).field == "spec.cluster.backend"
    # A group joins its cluster's backend.
    error = refuse(group("g"), rule, cluster_doc=cluster(backend="local"))
    assert error.field == "spec.cluster" and "DaskCluster c1 uses backend local" in str(error)
    # The site's default backend, when the manifest names none.
    unnamed = cluster()
    del unnamed["spec"]["backend"]
    error = refuse(unnamed, rule, site=SiteConfig(backend="local"))
    assert "backend local (the site's default)" in str(error)
    accept(unnamed, rule)  # the site's slurm
    accept(cluster(backend="local"), policy(submit_as=()))  # [] is the operator's account
    accept(cluster(backend="local"), policy())
    accept(autoscaler(2), rule, cluster_doc=cluster(backend="local"))  # submits nothing


def test_backends_lists_the_batch_systems_a_namespace_may_use() -> None:
    rule = policy(backends=("slurm",))
    accept(cluster(), rule)
    error = refuse(cluster(backend="pbs"), rule)
    assert (error.field, error.rule) == ("spec.backend", "backends")
    assert "backend pbs is not allowed by policy backends" in str(error)
    assert "set spec.backend to slurm" in str(error)
    error = refuse(cluster(backend="local"), policy(backends=("slurm", "local"),
                                                    submit_as=AS_PHYS))
    assert error.rule == "submitAs" and "set spec.backend to slurm," in str(error)
    site = SiteConfig.from_mapping({"namespaces": {NS: {"backends": ["slurm", "pbs"]}}})
    assert site.namespaces[NS].backends == ("slurm", "pbs")
    with pytest.raises(ConfigError, match=r"namespaces.physics.backends\[1\] 'lsf'"):
        SiteConfig.from_mapping({"namespaces": {NS: {"backends": ["slurm", "lsf"]}}})


async def test_a_local_cluster_under_submit_as_runs_nothing(tmp_path: Path) -> None:
    site = SiteConfig(backend="slurm", staging_dir=str(tmp_path),
                      namespaces={NS: policy(submit_as=AS_PHYS)})
    canary = tmp_path / "pwned"
    manifest = cluster(backend="local", worker={"replicas": 1},
                       scheduler={"prologue": [f"touch {canary}"]})
    status = await GroupReconciler(Runtime(site)).reconcile(manifest, {})
    assert accepted(status)["reason"] == "PolicyViolation"
    assert status["message"].startswith("spec.backend: ")
    assert not canary.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("directive", ["-M other", "--clusters=other", "-q gpu@other"])
def test_a_job_cannot_be_sent_to_another_cluster(directive: str) -> None:
    """The operator's squeue/qstat lists its own cluster (server) only: it would never see
    the job and would submit it again every period. Refused with or without a policy."""
    with pytest.raises(ManifestError) as info:
        admit(cluster(worker={"extraDirectives": ["--qos=low", directive]}), SITE)
    assert info.value.field == "spec.worker.extraDirectives[1]"
    with pytest.raises(ManifestError) as info:
        admit(group("g", extraDirectives=[directive]), SITE, cluster=cluster())
    assert info.value.field == "spec.worker.extraDirectives[0]"


def test_pbs_mail_recipients_stay_allowed() -> None:
    """-M is the mail list on PBS, --clusters on SLURM: only the backend tells them apart."""
    admit(cluster(backend="pbs", worker={"extraDirectives": ["-M me@example.org"]}), SITE)
    admit(group("g", extraDirectives=["-M me@example.org"]), SITE,
          cluster=cluster(backend="pbs"))
    unnamed = cluster(worker={"extraDirectives": ["-M me@example.org"]})
    del unnamed["spec"]["backend"]
    admit(unnamed, SiteConfig(backend="pbs"))
    with pytest.raises(ManifestError, match="another slurm cluster"):
        admit(unnamed, SITE)


# --- the site configuration ----------------------------------------------------------------

FULL: dict[str, dict[str, Any]] = {
    "physics": {"accounts": ["phys01"], "queues": ["debug", "highmem"],
                "submitAs": ["sudo", "-n", "-u", "phys", "--"], "maxWorkers": 20,
                "maxCoresPerJob": 16, "maxCores": 200, "maxMemoryPerJob": "64GiB",
                "maxWalltime": "08:00:00", "maxGpus": 4,
                "allowedDirectives": ["--constraint=.*"],
                "allowedPrologue": ["module load .*"]},
    "*": {"maxWorkers": 4}}


def test_full_example_loads() -> None:
    site = SiteConfig.from_mapping({"namespaces": FULL})
    physics = site.namespaces["physics"]
    assert physics.queues == ("debug", "highmem") and physics.max_walltime == "08:00:00"
    assert physics.submit_as == ("sudo", "-n", "-u", "phys", "--")
    assert physics.allowed_prologue == ("module load .*",)
    assert site.namespaces["*"].max_workers == 4 and site.namespaces["*"].queues is None
    assert set(POLICY_KEYS) >= set(FULL["physics"])
    hash(site)  # still hashable, like before it had a policy
    assert SiteConfig.from_mapping({"namespaces": copy.deepcopy(FULL)}) == site


@pytest.mark.parametrize(("entry", "named"), [
    ({"maxWorker": 3}, "'namespaces.physics.maxWorker'"),
    ({"maxWorkers": "ten"}, "namespaces.physics.maxWorkers is 'ten'"),
    ({"maxWorkers": True}, "namespaces.physics.maxWorkers is True"),
    ({"maxGpus": -1}, "namespaces.physics.maxGpus is -1"),
    ({"maxWalltime": 28800}, "quote it"),  # what YAML makes of an unquoted 8:00:00
    ({"maxWalltime": "8 hours"}, "namespaces.physics.maxWalltime '8 hours'"),
    ({"maxMemoryPerJob": "lots"}, "namespaces.physics.maxMemoryPerJob 'lots'"),
    ({"allowedDirectives": ["--constraint=(a"]}, "allowedDirectives[0]"),
    ({"allowedPrologue": "module load .*"}, "allowedPrologue must be a list of strings"),
    ({"queues": ["debug", "a b"]}, "namespaces.physics.queues[1]"),
    ({"submitAs": ["sudo", "-u", "x;id"]}, "namespaces.physics.submitAs[2]"),
    ({"stagingGroup": "no-such-group-here"}, "no group 'no-such-group-here'"),
    ([1, 2], "namespaces.physics must be a mapping"),
])
def test_bad_policy_keys_are_named(entry: Any, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        SiteConfig.from_mapping({"namespaces": {"physics": entry}})
    assert named in str(info.value)


def test_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_namespaces({"physics": {"maxWallTime": "01:00:00"}})
    assert all(key in str(info.value) for key in POLICY_KEYS)


@pytest.mark.parametrize("name", ["Physics", "a_b", "", 3])
def test_bad_namespace_names(name: Any) -> None:
    with pytest.raises(ConfigError, match="not a namespace name"):
        parse_namespaces({name: {}})


def test_namespaces_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="namespaces must be a mapping"):
        SiteConfig.from_mapping({"namespaces": ["physics"]})
    assert SiteConfig.from_mapping({"namespaces": None}).namespaces == {}


# --- staging shared with the identity ------------------------------------------------------

def test_staging_group_hands_the_directories_to_the_group(tmp_path: Path) -> None:
    name = grp.getgrgid(os.getgid()).gr_name  # a group the test's user may chgrp to
    rule = SiteConfig.from_mapping({"namespaces": {NS: {"stagingGroup": name}}}).namespaces[NS]
    staging, logs = tmp_path / "c1", tmp_path / "c1" / "logs"
    make_staging([staging, logs], rule)
    for path in (staging, logs):
        info = path.stat()
        assert info.st_gid == os.getgid()
        assert stat.S_IMODE(info.st_mode) == 0o2770
    plain = tmp_path / "plain"
    make_staging([plain], policy())
    assert stat.S_IMODE(plain.stat().st_mode) & 0o2000 == 0  # untouched without the key


# --- enforcement on the refusal paths ------------------------------------------------------

class Untouchable:
    """A backend that fails the test on any call: a refused manifest must run nothing."""

    kind = "slurm"
    supports_arrays = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def task_job_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        return [tuple(indices)], []

    async def submit(self, request: JobRequest) -> str:
        self.calls.append("submit")
        raise AssertionError("submitted a refused manifest")

    async def poll(self) -> list[ObservedJob]:
        self.calls.append("poll")
        raise AssertionError("polled for a refused manifest")

    async def cancel(self, job_ids: Sequence[str]) -> None:
        self.calls.append("cancel")
        raise AssertionError("cancelled for a refused manifest")

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        self.calls.append("usage")
        raise AssertionError("asked usage for a refused manifest")


POLICED = SiteConfig(backend="slurm", namespaces={NS: policy(max_walltime="04:00:00",
                                                             max_workers=4)})


def untouchable_runtime(tmp_path: Path) -> tuple[Runtime, Untouchable]:
    backend = Untouchable()
    site = SiteConfig(**{**POLICED.__dict__, "staging_dir": str(tmp_path)})
    return Runtime(site, backends={"slurm": backend}), backend


Events = list[tuple[str, str, str]]


def sink(events: Events) -> Any:
    return lambda *event: events.append(event)


def accepted(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Accepted")


async def test_cluster_refusal_is_an_event_and_a_condition_and_runs_nothing(
        tmp_path: Path) -> None:
    runtime, backend = untouchable_runtime(tmp_path)
    reconciler = GroupReconciler(runtime)
    events: Events = []
    manifest = cluster(worker={"walltime": "05:00:00"})
    status = await reconciler.reconcile(manifest, {}, sink(events))
    assert status["phase"] == "Failed"
    cond = accepted(status)
    assert (cond["status"], cond["reason"]) == ("False", "PolicyViolation")
    assert "spec.worker.walltime" in cond["message"] and "maxWalltime" in cond["message"]
    assert events == [("Warning", "PolicyViolation", status["message"])]
    # The same refusal again: no second event; nothing ran either time.
    again = await reconciler.reconcile(manifest, status, sink(events))
    assert len(events) == 1 and again["message"] == status["message"]
    assert backend.calls == [] and not list(tmp_path.iterdir())
    # A group that would take the cluster over maxWorkers (2 + 3 > 4), with its siblings.
    status = await reconciler.reconcile_group(group("g", replicas=3), {}, cluster(),
                                              sink(events))
    assert accepted(status)["reason"] == "PolicyViolation" and "maxWorkers" in status["message"]
    # ...and so is the cluster that the group pushes over, when it knows its groups.
    status = await reconciler.reconcile(cluster(), {}, sink(events), groups=[group("g",
                                                                             replicas=3)])
    assert accepted(status)["reason"] == "PolicyViolation"
    assert backend.calls == []
    # An invalid manifest keeps its own reason.
    status = await reconciler.reconcile(cluster(worker={"replicas": -1}), {}, sink(events))
    assert accepted(status)["reason"] == "InvalidSpec" and events[-1][1] == "InvalidSpec"


async def test_job_and_autoscaler_refusals(tmp_path: Path) -> None:
    runtime, backend = untouchable_runtime(tmp_path)
    events: Events = []

    class NoStore:
        async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
            raise AssertionError("looked up the cluster of a refused DaskJob")

        async def create(self, manifest: dict[str, Any]) -> None:
            raise AssertionError("created the cluster of a refused DaskJob")

        async def delete(self, namespace: str, name: str) -> None:
            raise AssertionError("deleted for a refused DaskJob")

    status = await JobReconciler(runtime).reconcile(daskjob(walltime="06:00:00"), {},
                                                    NoStore(), sink(events))
    assert accepted(status)["reason"] == "PolicyViolation"
    assert "spec.job.walltime" in status["message"]

    class Targets:
        scaled: list[int] = []

        async def get_object(self, kind: str, namespace: str,
                             name: str) -> dict[str, Any] | None:
            return cluster() if kind == "DaskCluster" else None

        async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
            self.scaled.append(replicas)

    status = await AutoscalerReconciler(runtime).reconcile(autoscaler(5), {}, Targets(),
                                                           sink(events))
    assert accepted(status)["reason"] == "PolicyViolation"
    assert status["message"].startswith("spec.maximum: ")
    assert Targets.scaled == [] and backend.calls == []
    assert [e[1] for e in events] == ["PolicyViolation", "PolicyViolation"]


def test_up_refuses_before_anything_runs(tmp_path: Path) -> None:
    docs = [cluster(worker={"replicas": 3}), group("g", replicas=2)]
    with pytest.raises(PolicyError, match="maxWorkers"):
        prepare(copy.deepcopy(docs), None, POLICED)
    assert len(prepare(copy.deepcopy(docs), None)) == 2  # no site given: validation only
    prepare([cluster(worker={"replicas": 2}), group("g", replicas=2)], None, POLICED)


def write_site(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_up_and_render_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_site(tmp_path, {"backend": "slurm", "stagingDir": str(tmp_path / "s"),
                                   "namespaces": {NS: {"maxWalltime": "04:00:00"}}})
    manifest = tmp_path / "c.yaml"
    manifest.write_text(yaml.safe_dump(cluster(worker={"walltime": "05:00:00"})))
    for command in (["render"], ["up"]):
        assert main([*command, "-f", str(manifest), "--config", config]) == 2
        err = capsys.readouterr().err
        assert "spec.worker.walltime" in err and "policy maxWalltime" in err
    assert not (tmp_path / "s").exists()  # nothing staged, nothing submitted
    manifest.write_text(yaml.safe_dump(cluster()))
    assert main(["render", "-f", str(manifest), "--config", config]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH" in out


# --- one identity per namespace ------------------------------------------------------------

IDENTITIES = SiteConfig(backend="slurm", submit_prefix=("ssh", "login1"), namespaces={
    "physics": NamespacePolicy("physics", submit_as=("sudo", "-n", "-u", "phys", "--")),
    "chemistry": NamespacePolicy("chemistry", max_workers=3),
    "*": NamespacePolicy(submit_as=("sudo", "-n", "-u", "guest", "--"))})


def prefix_of(backend: Any) -> tuple[str, ...]:
    assert isinstance(backend, SlurmBackend)
    return tuple(backend.runner.prefix)


def test_backends_and_pollers_are_per_identity() -> None:
    runtime = Runtime(IDENTITIES)
    phys = runtime.poller("slurm", "physics")
    assert runtime.poller("slurm", "physics") is phys  # shared by every physics cluster
    assert prefix_of(phys.backend) == ("sudo", "-n", "-u", "phys", "--")
    # chemistry's policy names no identity: the site's, keyed by kind as before.
    assert runtime.poller("slurm", "chemistry") is runtime.poller("slurm") \
        is runtime.pollers["slurm"]
    assert prefix_of(runtime.backends["slurm"]) == ("ssh", "login1")
    guest = runtime.backend("slurm", "biology")
    assert prefix_of(guest) == ("sudo", "-n", "-u", "guest", "--")
    assert runtime.backend("slurm", "geology") is guest  # one per identity, not per namespace
    assert runtime.backend("local", "physics") is runtime.backend("local")  # no identity
    assert len(runtime.pollers_in_use()) == 2 and len(runtime.identity_backends) == 2


class Listing:
    """One identity's view of the batch system: `squeue --me` lists only its own jobs."""

    kind = "slurm"
    supports_arrays = False

    def __init__(self, jobs: list[ObservedJob], log: list[str], who: str) -> None:
        self.jobs, self.log, self.who = jobs, log, who

    def task_job_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        return [], list(indices)

    async def submit(self, request: JobRequest) -> str:
        raise AssertionError("the sweep never submits")

    async def poll(self) -> list[ObservedJob]:
        self.log.append(f"poll as {self.who}")
        return list(self.jobs)

    async def cancel(self, job_ids: Sequence[str]) -> None:
        self.log.append(f"cancel {' '.join(job_ids)} as {self.who}")
        self.jobs = [ObservedJob(j.job_id, j.identity, JobState.CANCELLED)
                     if j.job_id in job_ids else j for j in self.jobs]

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        return {}  # no accounting here


def job(job_id: str, uid: str, namespace: str) -> ObservedJob:
    return ObservedJob(job_id, JobIdentity(namespace, "c", uid, Role.WORKER, "default", 0),
                       JobState.RUNNING)


async def test_sweep_polls_and_cancels_as_every_identity() -> None:
    """After a restart no reconcile has used the physics identity yet: its orphans are
    found all the same, and cancelled as that identity."""
    log: list[str] = []
    site = SiteConfig(**{**IDENTITIES.__dict__, "min_poll_interval": 0.001})
    own = Listing([job("1", "alive", "chemistry"), job("2", "gone", "chemistry")], log, "site")
    phys = Listing([job("3", "gone-too", "physics"), job("4", "alive-2", "physics")], log,
                   "phys")
    guest = Listing([], log, "guest")
    runtime = Runtime(site, backends={"slurm": own}, identity_backends={
        ("slurm", ("sudo", "-n", "-u", "phys", "--")): phys,
        ("slurm", ("sudo", "-n", "-u", "guest", "--")): guest})

    async def list_uids() -> set[str]:
        log.append("list")
        return {"alive", "alive-2"}

    assert sorted(await sweep(runtime, list_uids)) == ["2", "3"]
    assert log[:4] == ["poll as site", "poll as phys", "poll as guest", "list"]
    assert "cancel 2 as site" in log and "cancel 3 as phys" in log
    assert [j.job_id for j in own.jobs + phys.jobs if j.state.live] == ["1", "4"]


class Refusing(Listing):
    """An identity the batch commands cannot run as (its sudo rule is missing)."""

    async def poll(self) -> list[ObservedJob]:
        self.log.append(f"poll as {self.who}")
        raise BatchSystemError("sudo: a password is required")


async def test_one_identity_that_cannot_list_does_not_stop_the_sweep() -> None:
    log: list[str] = []
    site = SiteConfig(**{**IDENTITIES.__dict__, "min_poll_interval": 0.001})
    own = Listing([job("2", "gone", "chemistry")], log, "site")
    runtime = Runtime(site, backends={"slurm": own}, identity_backends={
        ("slurm", ("sudo", "-n", "-u", "phys", "--")): Refusing([], log, "phys"),
        ("slurm", ("sudo", "-n", "-u", "guest", "--")): Listing(
            [job("3", "gone-too", "biology")], log, "guest")})

    async def list_uids() -> set[str]:
        return set()

    assert sorted(await sweep(runtime, list_uids)) == ["2", "3"]
    assert "poll as phys" in log and "cancel 2 as site" in log and "cancel 3 as guest" in log


async def test_ending_jobs_goes_on_past_an_identity_that_fails_then_says_so() -> None:
    """squeueAllUsers: the site's identity lists a physics job whose own identity cannot
    be used. It is cancelled all the same; the failure is still raised (a deletion must
    not pass for done while one identity could not look)."""
    log: list[str] = []
    site = SiteConfig(**{**IDENTITIES.__dict__, "min_poll_interval": 0.001})
    own = Listing([job("3", "gone", "physics")], log, "site")
    runtime = Runtime(site, backends={"slurm": own}, identity_backends={
        ("slurm", ("sudo", "-n", "-u", "phys", "--")): Refusing([], log, "phys")})
    with pytest.raises(BatchSystemUnavailable, match="password"):
        await runtime.end_jobs_on("gone", [runtime.poller("slurm", "physics"),
                                           runtime.poller("slurm")],
                                  lambda j: j.identity.owner_uid == "gone")
    assert log == ["poll as phys", "poll as site", "cancel 3 as site"]


class Accepting(Listing):
    """A batch system that accepts submissions, listed as pending from then on."""

    async def submit(self, request: JobRequest) -> str:
        self.log.append(f"submit as {self.who}")
        job_id = str(len(self.log))
        self.jobs.append(ObservedJob(job_id, request.identity, JobState.PENDING))
        return job_id


async def test_a_running_cluster_stays_accepted_when_a_group_pushes_it_over(
        tmp_path: Path) -> None:
    log: list[str] = []
    site = SiteConfig(backend="slurm", staging_dir=str(tmp_path), min_poll_interval=0.001,
                      poll_interval=0.001, namespaces={NS: policy(max_workers=10)})
    reconciler = GroupReconciler(Runtime(site, backends={"slurm": Accepting([], log, "site")}))
    manifest = cluster(worker={"replicas": 8})
    status = await reconciler.reconcile(manifest, {})
    assert accepted(status)["status"] == "True" and log
    extra = group("extra", replicas=5)
    again = await reconciler.reconcile(manifest, status, groups=[extra])
    assert accepted(again)["status"] == "True" and again["phase"] != "Failed"
    refused = await reconciler.reconcile_group(extra, {}, manifest, groups=[extra])
    assert accepted(refused)["reason"] == "PolicyViolation"
    # The cluster's own new spec is checked with its groups.
    grown = cluster(worker={"replicas": 9})
    grown["metadata"]["generation"] = 2
    status = await reconciler.reconcile(grown, again, groups=[extra])
    assert accepted(status)["reason"] == "PolicyViolation"


def test_handlers_find_a_clusters_groups_in_their_index() -> None:
    """kopf hands the groups_by_cluster index to every handler: a DaskCluster is looked up
    by its name, a group or autoscaler by the cluster it names, in its own namespace."""
    import kopf

    from dask_hpc_operator.handlers import _groups_of

    index = {(NS, "c1"): [group("a"), group("b")], ("other", "c1"): [group("x")]}
    body = kopf.Body({"metadata": {"name": "c1", "namespace": NS}, "spec": {}})
    names = [g["metadata"]["name"] for g in _groups_of({"groups_by_cluster": index}, body,
                                                       body.metadata.get("name"))]
    assert names == ["a", "b"]
    scaler = kopf.Body({"metadata": {"name": "a1", "namespace": "other"},
                        "spec": {"cluster": "c1"}})
    assert len(_groups_of({"groups_by_cluster": index}, scaler, scaler.spec.get("cluster"))) == 1
    assert _groups_of({}, body, "c1") == []  # registered without the index: no totals
