"""The Helm chart agrees with the code: its CRDs are crds/, its RBAC grants what the
operator does, its site config is one the operator accepts, its metrics port is wired.

Helm cannot be installed here (DESIGN.md §7), so the templates are rendered by
tests/chart_render.py, a tiny renderer of the Go-template subset this chart uses (it raises
on anything else, so a template that outgrows it fails here rather than passing unchecked).
What Helm itself would add (schema validation of values, `helm lint`) is not covered.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_render import render_documents
from dask_hpc_operator import kube_store
from dask_hpc_operator.constants import GROUP, KIND_CLUSTER, KIND_WORKER_GROUP, NAMES, plural
from dask_hpc_operator.site_config import SiteConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dask-hpc-operator"
VALUES: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
PLURALS = [names[0] for names in NAMES.values()]


def documents(template: str, **overrides: Any) -> list[dict[str, Any]]:
    values = copy.deepcopy(VALUES)
    for key, value in overrides.items():
        if isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return render_documents((CHART / "templates" / template).read_text(), values)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# -- CRDs ---------------------------------------------------------------------------------

def test_chart_crds_are_the_crds() -> None:
    """Helm installs charts/…/crds/*.yaml; they must be crds/ (today a symlink to it; a
    copy would have to be kept identical)."""
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    source = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    assert sorted(chart) == sorted(source)
    assert source, "no CRDs found"
    for name in source:
        assert chart[name] == source[name], f"charts/…/crds/{name} differs from crds/{name}"


# -- RBAC ---------------------------------------------------------------------------------

# What the operator does through the API, read from the code. (api group, resource, verbs)
KOPF_NEEDS = [
    # handlers.build_registry: kopf lists and watches the four kinds, patches them (its
    # finalizer, its progress annotations, owner references) and their status subresource.
    *[(GROUP, p, v) for p in PLURALS for v in ("list", "watch", "patch")],
    *[(GROUP, f"{p}/status", "patch") for p in PLURALS],
    ("", "events", "create"),  # kopf.event in handlers._event_sink
    # kopf's resource scanning (on by default) watches CRDs to notice the kinds appear.
    *[("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")],
]
OWNER_REFERENCE_NEEDS = [
    # OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs update on the owner's
    # finalizers (job_reconcile: a DaskJob owns its DaskCluster; handlers.reconcile_group:
    # a DaskCluster owns its groups), and changing an object's ownerReferences needs delete
    # on that object (the group's ownerReferences are patched, not set at creation).
    (GROUP, "daskjobs/finalizers", "update"),
    (GROUP, "daskclusters/finalizers", "update"),
    (GROUP, plural(KIND_WORKER_GROUP), "delete"),
]
# The CustomObjectsApi methods kube_store calls, and the verb each needs.
API_VERBS = {"get_namespaced_custom_object": "get", "create_namespaced_custom_object": "create",
             "delete_namespaced_custom_object": "delete",
             "patch_namespaced_custom_object": "patch",
             "list_namespaced_custom_object": "list", "list_cluster_custom_object": "list"}
# The CoreV1Api methods kube_store calls (`self.core.<method>`): (resource, verb).
CORE_VERBS = {"create_namespaced_secret": ("secrets", "create"),
              "patch_namespaced_secret": ("secrets", "patch"),
              "delete_namespaced_secret": ("secrets", "delete")}


def kube_store_needs() -> list[tuple[str, str, str]]:
    """Every `self.api.<method>(...)` in kube_store.py: a call naming `self.plural` touches
    DaskClusters, one naming `plural(kind)` may touch any kind. A method not in API_VERBS
    fails the test: add its verb (and the chart rule). Every `self.core.<method>` (core
    objects: a TLS cluster's Secret) likewise, with CORE_VERBS."""
    tree = ast.parse(Path(kube_store.__file__).read_text())
    needs = []
    core_calls = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "core"):
            assert node.attr in CORE_VERBS, f"kube_store calls {node.attr}: which verb is that?"
            core_calls.append(node.attr)
            needs.append(("", *CORE_VERBS[node.attr]))
            continue
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "api"):
            continue
        assert node.attr in API_VERBS, f"kube_store calls {node.attr}: which verb is that?"
        call = next(c for c in ast.walk(tree) if isinstance(c, ast.Call)
                    and any(a is node for a in c.args))
        names_own_plural = any(isinstance(a, ast.Attribute) and a.attr == "plural"
                               for a in call.args)
        plurals = [plural(KIND_CLUSTER)] if names_own_plural else PLURALS
        needs += [(GROUP, p, API_VERBS[node.attr]) for p in plurals]
    assert {v for g, _, v in needs if g == GROUP} == set(API_VERBS.values()), \
        "kube_store parse went wrong"
    assert sorted(set(core_calls)) == sorted(CORE_VERBS), "kube_store parse went wrong"
    return needs


def grants(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any((group in r["apiGroups"] or "*" in r["apiGroups"])
               and (resource in r["resources"] or "*" in r["resources"])
               and (verb in r["verbs"] or "*" in r["verbs"]) for r in rules)


@pytest.mark.parametrize("scope,kind", [("cluster", "ClusterRole"), ("namespace", "Role")])
def test_rbac_grants_what_the_operator_does(scope: str, kind: str) -> None:
    docs = documents("rbac.yaml", scope=scope)
    role = by_kind(docs, kind)
    needs = KOPF_NEEDS + OWNER_REFERENCE_NEEDS + kube_store_needs()
    if scope == "namespace":  # a Role cannot grant a cluster-scoped resource; kopf does
        needs = [n for n in needs if n[1] != "customresourcedefinitions"]  # without it
    missing = sorted({n for n in needs if not grants(role["rules"], *n)})
    assert not missing, f"the chart's {kind} lacks (apiGroup, resource, verb): {missing}"

    binding = by_kind(docs, f"{kind}Binding")
    account = by_kind(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind,
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"][
        "name"], "namespace": "hpc"}]
    pod = by_kind(documents("deployment.yaml", scope=scope), "Deployment")["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_rbac_asks_for_nothing_it_does_not_use() -> None:
    """Minimum RBAC (DESIGN.md §6): no wildcards, no Pods or other kinds; Secrets only
    written (a TLS cluster's), never read, listed or watched."""
    role = by_kind(documents("rbac.yaml"), "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
        assert set(rule["apiGroups"]) <= {GROUP, "", "events.k8s.io", "apiextensions.k8s.io"}
        if "" in rule["apiGroups"]:
            assert rule["resources"] in (["events"], ["secrets"]), rule
        if "secrets" in rule["resources"]:
            assert rule["apiGroups"] == [""], rule
            assert set(rule["verbs"]) <= {v for _, v in CORE_VERBS.values()}, rule


# -- site configuration -------------------------------------------------------------------

def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p.title() for p in rest)


def site_config_keys() -> set[str]:
    """The keys SiteConfig.from_mapping accepts (camelCase of its fields)."""
    return {camel(f.name) for f in dataclasses.fields(SiteConfig)}


def test_values_site_config_is_a_site_config() -> None:
    """values.siteConfig is rendered into the ConfigMap's site.yaml, which the Deployment
    mounts and passes as --config: every key must be one the operator knows, and the whole
    must load (the operator refuses to start otherwise)."""
    unknown = set(VALUES["siteConfig"]) - site_config_keys()
    assert not unknown, f"values.yaml siteConfig keys the operator does not know: {unknown}"

    configmap = by_kind(documents("configmap.yaml"), "ConfigMap")
    (key,) = configmap["data"]
    site = yaml.safe_load(configmap["data"][key])
    assert site == VALUES["siteConfig"]
    SiteConfig.from_mapping(site)

    pod = by_kind(documents("deployment.yaml"), "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap")]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert f"--config={mount['mountPath']}/{key}" in container["args"]


def test_every_site_config_key_is_accepted_in_values() -> None:
    """An administrator may set any site key in values.siteConfig: the ConfigMap renders
    them all verbatim (checked with every key at its default value)."""
    defaults = SiteConfig(staging_dir="/shared/dask-hpc", python="/usr/bin/python3")
    site = {camel(f.name): getattr(defaults, f.name) for f in dataclasses.fields(SiteConfig)}
    site = {k: list(v) if isinstance(v, tuple) else v for k, v in site.items()}
    configmap = by_kind(documents("configmap.yaml", siteConfig=site), "ConfigMap")
    (text,) = configmap["data"].values()
    assert SiteConfig.from_mapping(yaml.safe_load(text)) == defaults


# -- metrics ------------------------------------------------------------------------------

def test_metrics_port_is_wired() -> None:
    """values.metrics.port is the --metrics-port the operator listens on, the container port
    and the prometheus.io annotations; it is not kopf's conventional liveness port."""
    port = VALUES["metrics"]["port"]
    assert VALUES["metrics"]["enabled"] and port != 8080
    template = by_kind(documents("deployment.yaml"), "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert f"--metrics-port={port}" in container["args"]
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_metrics_can_be_turned_off() -> None:
    template = by_kind(documents("deployment.yaml", metrics={"enabled": False}),
                       "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert "--metrics-port=0" in container["args"]
    assert "ports" not in container
    assert not any(a.startswith("prometheus.io/") for a in template["metadata"]["annotations"])
