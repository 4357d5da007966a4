"""crds/*.yaml are generated from crd_schema.py; examples/*.yaml validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dask_hpc_operator import crd_schema
from dask_hpc_operator.cli import render_crd
from dask_hpc_operator.constants import (
    GROUP,
    KIND_AUTOSCALER,
    KIND_CLUSTER,
    KIND_JOB,
    KIND_WORKER_GROUP,
    NAMES,
    VERSION,
)
from dask_hpc_operator.manifests import load_documents
from dask_hpc_operator.validation import validate

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def crd_file(kind: str) -> Path:
    return CRDS / f"{NAMES[kind][0]}.yaml"


def test_one_file_per_kind() -> None:
    assert sorted(p.name for p in CRDS.glob("*.yaml")) == sorted(
        crd_file(kind).name for kind in crd_schema.ALL_KINDS)


@pytest.mark.parametrize("kind", crd_schema.ALL_KINDS)
def test_crd_file_is_generated(kind: str) -> None:
    expected = render_crd(crd_schema.crd(kind))
    assert crd_file(kind).read_text() == expected, (
        f"{crd_file(kind)} is stale: run `dask-hpc crds --write crds/`")


@pytest.mark.parametrize("kind", crd_schema.ALL_KINDS)
def test_crd_shape(kind: str) -> None:
    doc = yaml.safe_load(crd_file(kind).read_text())
    plural, singular, short_names = NAMES[kind]
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["kind"] == "CustomResourceDefinition"
    assert doc["metadata"]["name"] == f"{plural}.{GROUP}"
    spec = doc["spec"]
    assert spec["group"] == GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == kind
    assert spec["names"]["plural"] == plural
    assert spec["names"]["singular"] == singular
    assert spec["names"]["shortNames"] == list(short_names)
    assert spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == VERSION
    assert version["served"] is True and version["storage"] is True
    assert "status" in version["subresources"]
    columns = version["additionalPrinterColumns"]
    assert columns
    names = [c["name"] for c in columns]
    assert "Age" in names
    for column in columns:
        assert column["jsonPath"].startswith(".")
        assert column["type"] in ("string", "integer", "date", "number", "boolean")
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["type"] == "object"
    assert "spec" in schema["properties"]
    assert "status" in schema["properties"]


@pytest.mark.parametrize("kind", [KIND_CLUSTER, KIND_WORKER_GROUP])
def test_scalable_kinds(kind: str) -> None:
    version = yaml.safe_load(crd_file(kind).read_text())["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.worker.replicas",
        "statusReplicasPath": ".status.replicas",
    }
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Phase", "Ready", "Desired"} <= set(names)


@pytest.mark.parametrize("kind", [KIND_JOB, KIND_AUTOSCALER])
def test_unscalable_kinds(kind: str) -> None:
    version = yaml.safe_load(crd_file(kind).read_text())["spec"]["versions"][0]
    assert "scale" not in version["subresources"]


def test_cluster_printer_columns() -> None:
    version = yaml.safe_load(crd_file(KIND_CLUSTER).read_text())["spec"]["versions"][0]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Ready"]["jsonPath"] == ".status.workers.ready"
    assert columns["Desired"]["jsonPath"] == ".spec.worker.replicas"
    assert columns["Scheduler"]["jsonPath"] == ".status.schedulerAddress"


def test_examples_exist() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates(path: Path) -> None:
    docs = load_documents(path)
    assert docs
    for doc in docs:
        valid = validate(doc)
        assert valid["kind"] in crd_schema.ALL_KINDS


def test_every_kind_has_an_example() -> None:
    kinds = {doc["kind"] for path in EXAMPLES for doc in load_documents(path)}
    assert kinds == set(crd_schema.ALL_KINDS)
