"""The documentation's YAML is what the operator accepts, and its links lead somewhere.

Manifests in README.md and docs/*.md are validated exactly as the operator validates them;
a site configuration shown there loads as one; relative links point at files that exist.
Blocks that are neither (a status excerpt) are recognised and skipped, and the test counts
what it checked so an empty match cannot pass silently.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from dask_hpc_operator.site_config import SiteConfig, _camel
from dask_hpc_operator.validation import validate

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SITE_KEYS = {_camel(f.name) for f in fields(SiteConfig)}


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)


def kind_of(doc: Any) -> str:
    if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
        return "manifest"
    if isinstance(doc, dict) and doc and set(doc) <= SITE_KEYS:
        return "site"
    return "other"


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_yaml_in_the_docs_is_accepted(path: Path) -> None:
    for block in yaml_blocks(path):
        for doc in yaml.safe_load_all(block):
            kind = kind_of(doc)
            if kind == "manifest":
                validate(doc)
            elif kind == "site":
                SiteConfig.from_mapping(doc)


def test_the_docs_show_every_kind_and_a_site_configuration() -> None:
    kinds, sites = set(), 0
    for path in DOCS:
        for block in yaml_blocks(path):
            for doc in yaml.safe_load_all(block):
                if kind_of(doc) == "manifest":
                    kinds.add(doc["kind"])
                sites += kind_of(doc) == "site"
    assert kinds == {"DaskCluster", "DaskWorkerGroup", "DaskJob", "DaskAutoscaler"}
    assert sites >= 1


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_relative_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
