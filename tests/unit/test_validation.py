"""dask_hpc_operator.validation: defaults, and refusals that name the exact field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dask_hpc_operator.model import ClusterModel
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import ManifestError, parse_memory, parse_walltime, validate

API = "hpc.dask.org/v1alpha1"


def cluster(spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskCluster",
            "metadata": {"name": "c1", **meta}, "spec": spec if spec is not None else {}}


def worker(**fields: Any) -> dict[str, Any]:
    return cluster({"worker": fields})


def scheduler(**fields: Any) -> dict[str, Any]:
    return cluster({"scheduler": fields})


def group(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskWorkerGroup", "metadata": {"name": "gpu"},
            "spec": spec}


def job(job_fields: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskJob", "metadata": {"name": "j1"},
            "spec": {"job": job_fields, **spec}}


def autoscaler(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskAutoscaler", "metadata": {"name": "a1"},
            "spec": {"cluster": "c1", **spec}}


# --- valid manifests -----------------------------------------------------------------------

def test_defaults_are_applied() -> None:
    valid = validate(cluster())
    w = valid["spec"]["worker"]
    assert w["replicas"] == 1
    assert w["cores"] == 1
    assert w["memory"] == "4GiB"
    assert w["processes"] == 1
    assert w["walltime"] == "01:00:00"
    assert w["gpus"] == 0
    s = valid["spec"]["scheduler"]
    assert s == {"cores": 1, "memory": "2GiB", "walltime": "01:00:00", "protocol": "tcp",
                 "onFailure": "Fail", "maxRestarts": 3}
    assert valid["spec"]["idleTimeout"] == 0
    assert "backend" not in valid["spec"]  # the operator's default applies


def test_validate_returns_a_copy() -> None:
    manifest = worker(replicas=3)
    before = copy.deepcopy(manifest)
    valid = validate(manifest)
    assert manifest == before
    assert valid["spec"]["worker"]["replicas"] == 3
    assert valid is not manifest


def test_full_cluster_is_valid() -> None:
    manifest = cluster({
        "backend": "slurm",
        "profile": "gpu.large",
        "idleTimeout": 3600,
        "scheduler": {"cores": 2, "memory": "8GiB", "walltime": "1-00:00:00", "queue": "debug",
                      "account": "proj_1", "protocol": "ucx",
                      "env": [{"name": "DASK_LOGGING__DISTRIBUTED", "value": "debug"}]},
        "worker": {
            "replicas": 4, "cores": 8, "memory": "16GiB", "processes": 2,
            "walltime": "04:00:00", "queue": "gpu", "account": "proj_1", "gpus": 2,
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"},
                    {"name": "GREETING", "value": "hello world, it's me"},
                    {"name": "EMPTY"}],
            "prologue": ["module load cuda/12.2", "source /opt/env.sh"],
            "extraDirectives": ["--constraint=haswell", "-C a100", "--exclusive"],
            "workerArgs": ["--no-dashboard", "--lifetime=1h"],
            "resources": {"GPU": 2, "HIGHMEM": 1.5},
            "cuda": {"enabled": True, "rmmPoolSize": "20GiB", "deviceMemoryLimit": "30GiB",
                     "protocol": "ucx"},
        },
    }, namespace="team-a", uid="abc")
    valid = validate(manifest)
    assert valid["spec"]["worker"]["env"][2] == {"name": "EMPTY", "value": ""}
    assert valid["spec"]["worker"]["cuda"]["enabled"] is True
    model = ClusterModel.from_manifest(valid, SiteConfig())
    assert model.namespace == "team-a"
    assert model.backend == "slurm"
    assert model.protocols[0] == "ucx"
    (g,) = model.groups
    assert g.replicas == 4 and g.owner_uid == "abc"
    assert g.template.env == (("OMP_NUM_THREADS", "1"), ("GREETING", "hello world, it's me"),
                              ("EMPTY", ""))
    assert g.template.resources == (("GPU", 2.0), ("HIGHMEM", 1.5))
    assert model.scheduler.memory == "8GiB"


@pytest.mark.parametrize("memory", ["16GiB", "16GB", "16G", "16gib", "512MiB", "1.5GiB",
                                    "64TiB", "1k"])
def test_memory_forms(memory: str) -> None:
    validate(worker(memory=memory))


@pytest.mark.parametrize("walltime", ["00:00:01", "1:00:00", "1-00:00:00", "72:00:00",
                                      "365-00:00:00", "8760:00:00"])
def test_walltime_forms(walltime: str) -> None:
    validate(worker(walltime=walltime))


def test_valid_other_kinds() -> None:
    g = validate(group({"cluster": "c1", "worker": {"replicas": 2, "gpus": 1,
                                                    "cuda": {"enabled": True}}}))
    assert g["spec"]["worker"]["memory"] == "4GiB"
    j = validate(job({"command": ["python", "-c", "print('hi; $(x)')"]}))
    assert j["spec"]["mode"] == "cluster"
    assert j["spec"]["job"]["memory"] == "2GiB"
    assert j["spec"]["cluster"]["worker"]["replicas"] == 1
    assert j["spec"]["cluster"]["scheduler"]["protocol"] == "tcp"
    j = validate(job({"script": "import dask\nprint(1)\n", "workingDir": "/scratch/me"},
                     mode="allocation"))
    assert j["spec"]["mode"] == "allocation"
    a = validate(autoscaler(maximum=10))
    assert a["spec"]["minimum"] == 0
    assert a["spec"]["workerGroup"] == "default"
    assert a["spec"]["scaleDownDelay"] == 60


def test_status_is_ignored() -> None:
    manifest = cluster()
    manifest["status"] = {"phase": "Whatever", "anything": [1, 2]}
    validate(manifest)


def test_parse_helpers() -> None:
    assert parse_memory("1KiB", "f") == 1024
    assert parse_walltime("1-01:01:01", "f") == 90061


# --- invalid manifests: the error names the exact field ------------------------------------

def _no_spec() -> dict[str, Any]:
    manifest = cluster()
    del manifest["spec"]
    return manifest


INVALID: list[tuple[str, dict[str, Any], str]] = [
    # metadata, kind, apiVersion
    ("name with capitals", cluster(name="My_Cluster"), "metadata.name"),
    ("name too long", cluster(name="c" * 64), "metadata.name"),
    ("name missing", {"apiVersion": API, "kind": "DaskCluster", "metadata": {}, "spec": {}},
     "metadata.name"),
    ("name not a string", cluster(name=5), "metadata.name"),
    ("namespace bad", cluster(namespace="Team A"), "metadata.namespace"),
    ("unknown kind", {**cluster(), "kind": "DaskThing"}, "kind"),
    ("old apiVersion", {**cluster(), "apiVersion": "hpc.dask.org/v1"}, "apiVersion"),
    # unknown fields
    ("typo replica", worker(replica=2), "spec.worker.replica"),
    ("typo in spec", cluster({"workers": {}}), "spec.workers"),
    ("typo in cuda", worker(gpus=1, cuda={"enable": True}), "spec.worker.cuda.enable"),
    ("typo in env item", worker(env=[{"name": "A", "valeu": "1"}]), "spec.worker.env[0].valeu"),
    # shell metacharacters and injected lines
    ("queue with ;", worker(queue="debug; rm -rf /"), "spec.worker.queue"),
    ("queue with $()", worker(queue="$(id)"), "spec.worker.queue"),
    ("account with backticks", worker(account="`id`"), "spec.worker.account"),
    ("queue with newline", worker(queue="debug\n#SBATCH --uid=0"), "spec.worker.queue"),
    ("scheduler queue newline", scheduler(queue="debug\n#SBATCH --uid=0"),
     "spec.scheduler.queue"),
    ("profile with space", cluster({"profile": "a b"}), "spec.profile"),
    ("directive with ;", worker(extraDirectives=["--exclusive", "--uid=0;id"]),
     "spec.worker.extraDirectives[1]"),
    ("directive with newline", worker(extraDirectives=["--exclusive", "-p x\n#SBATCH -A y"]),
     "spec.worker.extraDirectives[1]"),
    ("directive not an option", worker(extraDirectives=["exclusive"]),
     "spec.worker.extraDirectives[0]"),
    ("prologue with $()", worker(prologue=["echo $(id)"]), "spec.worker.prologue[0]"),
    ("prologue with &&", worker(prologue=["module load x", "a && b"]),
     "spec.worker.prologue[1]"),
    ("prologue with newline", worker(prologue=["true\n#SBATCH --uid=0"]),
     "spec.worker.prologue[0]"),
    ("worker arg with space", worker(workerArgs=["--a b"]), "spec.worker.workerArgs[0]"),
    ("worker arg with quote", worker(workerArgs=["ok", "it's"]), "spec.worker.workerArgs[1]"),
    ("env name bad", worker(env=[{"name": "1BAD", "value": "x"}]), "spec.worker.env[0].name"),
    ("env name injection", worker(env=[{"name": "A=1; id", "value": "x"}]),
     "spec.worker.env[0].name"),
    ("env value newline", worker(env=[{"name": "A", "value": "x\n#SBATCH --uid=0"}]),
     "spec.worker.env[0].value"),
    ("env missing name", worker(env=[{"value": "x"}]), "spec.worker.env[0].name"),
    ("env duplicate", worker(env=[{"name": "A"}, {"name": "B"}, {"name": "A", "value": "2"}]),
     "spec.worker.env[2].name"),
    ("scheduler env duplicate", scheduler(env=[{"name": "A"}, {"name": "A"}]),
     "spec.scheduler.env[1].name"),
    # counts
    ("negative replicas", worker(replicas=-1), "spec.worker.replicas"),
    ("absurd replicas", worker(replicas=10_001), "spec.worker.replicas"),
    ("zero cores", worker(cores=0), "spec.worker.cores"),
    ("absurd cores", worker(cores=1_000_000), "spec.worker.cores"),
    ("zero processes", worker(processes=0), "spec.worker.processes"),
    ("negative gpus", worker(gpus=-1), "spec.worker.gpus"),
    ("absurd gpus", worker(gpus=65), "spec.worker.gpus"),
    ("processes > cores", worker(cores=2, processes=4), "spec.worker.processes"),
    ("negative idleTimeout", cluster({"idleTimeout": -1}), "spec.idleTimeout"),
    ("negative resource", worker(resources={"GPU": -1}), "spec.worker.resources.GPU"),
    ("bad resource name", worker(resources={"my-gpu": 1}), "spec.worker.resources.my-gpu"),
    # types
    ("replicas as string", worker(replicas="2"), "spec.worker.replicas"),
    ("replicas as bool", worker(replicas=True), "spec.worker.replicas"),
    ("cores as float", worker(cores=1.5), "spec.worker.cores"),
    ("memory as number", worker(memory=16), "spec.worker.memory"),
    ("env as mapping", worker(env={"A": "1"}), "spec.worker.env"),
    ("prologue as string", worker(prologue="module load x"), "spec.worker.prologue"),
    ("worker as list", cluster({"worker": []}), "spec.worker"),
    ("spec as string", cluster("big"), "spec"),  # type: ignore[arg-type]
    ("resource as string", worker(resources={"GPU": "1"}), "spec.worker.resources.GPU"),
    ("cuda enabled as string", worker(gpus=1, cuda={"enabled": "yes"}),
     "spec.worker.cuda.enabled"),
    # enums
    ("unknown backend", cluster({"backend": "k8s"}), "spec.backend"),
    ("unknown protocol", scheduler(protocol="http"), "spec.scheduler.protocol"),
    ("unknown cuda protocol", worker(gpus=1, cuda={"protocol": "nccl"}),
     "spec.worker.cuda.protocol"),
    # memory
    ("memory with space", worker(memory="16 GB"), "spec.worker.memory"),
    ("memory words", worker(memory="lots"), "spec.worker.memory"),
    ("memory zero", worker(memory="0GiB"), "spec.worker.memory"),
    ("memory absurd", worker(memory="100PiB"), "spec.worker.memory"),
    ("memory no unit", worker(memory="16"), "spec.worker.memory"),
    ("scheduler memory", scheduler(memory="1 GiB"), "spec.scheduler.memory"),
    ("rmm pool zero", worker(gpus=1, cuda={"enabled": True, "rmmPoolSize": "0GB"}),
     "spec.worker.cuda.rmmPoolSize"),
    ("device limit words", worker(gpus=1, cuda={"deviceMemoryLimit": "half"}),
     "spec.worker.cuda.deviceMemoryLimit"),
    # walltime
    ("walltime 1h", worker(walltime="1h"), "spec.worker.walltime"),
    ("walltime 25:99:00", worker(walltime="25:99:00"), "spec.worker.walltime"),
    ("walltime zero", worker(walltime="00:00:00"), "spec.worker.walltime"),
    ("walltime two years", worker(walltime="730-00:00:00"), "spec.worker.walltime"),
    ("walltime minutes only", worker(walltime="90"), "spec.worker.walltime"),
    ("scheduler walltime", scheduler(walltime="1:2:3"), "spec.scheduler.walltime"),
    # cuda
    ("cuda without gpus", worker(cuda={"enabled": True}), "spec.worker.gpus"),
    # required
    ("no spec", _no_spec(), "spec"),
    # DaskWorkerGroup
    ("group cluster bad", group({"cluster": "Bad_Name"}), "spec.cluster"),
    ("group without cluster", group({"worker": {}}), "spec.cluster"),
    ("group worker memory", group({"cluster": "c1", "worker": {"memory": "lots"}}),
     "spec.worker.memory"),
    ("group processes > cores", group({"cluster": "c1", "worker": {"processes": 2}}),
     "spec.worker.processes"),
    # DaskJob
    ("job with command and script", job({"command": ["true"], "script": "print(1)"}),
     "spec.job"),
    ("job with neither", job({}), "spec.job"),
    ("job command newline", job({"command": ["echo", "a\nb"]}), "spec.job.command[1]"),
    ("job relative workingDir", job({"command": ["true"], "workingDir": "scratch"}),
     "spec.job.workingDir"),
    ("job workingDir space", job({"command": ["true"], "workingDir": "/a b"}),
     "spec.job.workingDir"),
    ("job memory", job({"command": ["true"], "memory": "lots"}), "spec.job.memory"),
    ("job walltime", job({"command": ["true"], "walltime": "00:00:00"}), "spec.job.walltime"),
    ("job mode", job({"command": ["true"]}, mode="mpi"), "spec.mode"),
    ("job cluster worker memory", job({"command": ["true"]},
                                      cluster={"worker": {"memory": "0GiB"}}),
     "spec.cluster.worker.memory"),
    ("job cluster worker unknown", job({"command": ["true"]},
                                       cluster={"worker": {"replica": 1}}),
     "spec.cluster.worker.replica"),
    ("job without job", {**job({}), "spec": {"mode": "cluster"}}, "spec.job"),
    # DaskAutoscaler
    ("autoscaler min > max", autoscaler(minimum=5, maximum=2), "spec.minimum"),
    ("autoscaler negative max", autoscaler(maximum=-1), "spec.maximum"),
    ("autoscaler group bad", autoscaler(maximum=1, workerGroup="GPU"), "spec.workerGroup"),
]


def test_invalid_table_is_large_enough() -> None:
    assert len(INVALID) >= 30
    assert len({case for case, _, _ in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("manifest", "field"), [(m, f) for _, m, f in INVALID],
                         ids=[case for case, _, _ in INVALID])
def test_invalid_manifest_names_field(manifest: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError) as info:
        validate(manifest)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_pattern_errors_carry_a_fix() -> None:
    with pytest.raises(ManifestError) as info:
        validate(worker(memory="16 GB"))
    assert info.value.fix == "use a number with a unit, e.g. 16GiB or 512MiB"
    with pytest.raises(ManifestError) as info:
        validate(worker(replica=2))
    assert "replicas" in info.value.fix  # lists the known fields


def test_not_a_mapping() -> None:
    with pytest.raises(ManifestError) as info:
        validate(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert info.value.field == "<root>"


# --- known defects --------------------------------------------------------------------------

def test_name_with_trailing_newline_is_refused() -> None:
    with pytest.raises(ManifestError) as info:
        validate(cluster(name="c1\n"))
    assert info.value.field == "metadata.name"


def test_queue_with_trailing_newline_is_refused() -> None:
    with pytest.raises(ManifestError) as info:
        validate(worker(queue="debug\n"))
    assert info.value.field == "spec.worker.queue"


def test_metadata_not_a_mapping() -> None:
    manifest = cluster()
    manifest["metadata"] = "c1"
    with pytest.raises(ManifestError) as info:
        validate(manifest)
    assert info.value.field == "metadata"


def test_long_namespace_is_refused() -> None:
    with pytest.raises(ManifestError) as info:
        validate(cluster(namespace="n" * 64))
    assert info.value.field == "metadata.namespace"


def test_integral_float_replicas_is_refused_or_normalised() -> None:
    try:
        valid = validate(worker(replicas=2.0))
    except ManifestError as exc:
        assert exc.field == "spec.worker.replicas"
    else:
        assert isinstance(valid["spec"]["worker"]["replicas"], int)


@pytest.mark.parametrize(("worker_fields", "field"), [
    ({"cuda": {"enabled": True}, "gpus": 1}, "spec.worker.cuda.enabled"),
    ({"workerArgs": ["--nworkers=2"]}, "spec.worker.workerArgs"),
    ({"processes": 2, "cores": 2}, "spec.worker.processes"),
])
def test_allocation_refuses_what_it_cannot_honour(worker_fields: dict[str, Any],
                                                 field: str) -> None:
    with pytest.raises(ManifestError) as err:
        validate(cluster({"mode": "allocation", "worker": worker_fields}))
    assert err.value.field == field
    with pytest.raises(ManifestError) as err:
        validate(job({"command": ["python", "x.py"]}, mode="allocation",
                     cluster={"worker": worker_fields}))
    assert err.value.field == field.replace("spec.", "spec.cluster.", 1)
    # The same template is fine for separate jobs.
    validate(cluster({"worker": worker_fields}))


def test_daskjob_needs_exactly_one_of_command_and_script() -> None:
    for fields in ({}, {"command": ["true"], "script": "print(1)"}):
        with pytest.raises(ManifestError) as err:
            validate(job(fields))
        assert err.value.field == "spec.job"
    assert validate(job({"script": "print(1)"}))["spec"]["mode"] == "cluster"


@pytest.mark.parametrize("name", ["default", "scheduler", "allocation"])
def test_worker_group_names_the_cluster_uses_itself_are_refused(name: str) -> None:
    """A DaskWorkerGroup named like the cluster's own worker group or its scheduler's job
    would share their job names and usage groups."""
    manifest = group({"cluster": "c1", "worker": {"replicas": 1}})
    manifest["metadata"]["name"] = name
    with pytest.raises(ManifestError) as err:
        validate(manifest)
    assert err.value.field == "metadata.name" and "is reserved" in str(err.value)
    assert "another name" in str(err.value)
