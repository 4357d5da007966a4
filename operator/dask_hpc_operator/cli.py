"""`dask-hpc`: operator, up, render, validate, crds, history, report.

Exit codes: 0 success, 1 runtime failure, 2 invalid input (the message names the field).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any

import yaml

from . import crd_schema, history
from .constants import KIND_CLUSTER, KIND_JOB, KIND_WORKER_GROUP, NAMES
from .job_reconcile import JobReconciler
from .manifests import load_documents
from .policy import enforce
from .reconcile import GroupReconciler, Runtime
from .site_config import ConfigError, SiteConfig
from .validation import ManifestError, validate

EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dask-hpc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    op = sub.add_parser("operator", help="run the kopf operator")
    op.add_argument("--config", help="site configuration YAML (default: $DASK_HPC_CONFIG)")
    op.add_argument("--namespace", action="append",
                    help="watch only this namespace (repeatable; default: cluster-wide)")
    op.add_argument("--metrics-port", type=int, metavar="PORT",
                    help="serve Prometheus metrics at :PORT/metrics (default: the site "
                    "config's metricsPort, 8000; 0 = off)")
    op.add_argument("--verbose", action="store_true")

    up = sub.add_parser("up", help="run manifests without Kubernetes, in the foreground",
                        description="Reconcile manifests in the foreground. A DaskJob runs to "
                        "its end, its output streamed, and `up` exits with its exit code. "
                        "With `-- COMMAND`, run COMMAND once every cluster is ready "
                        "(DASK_SCHEDULER_ADDRESS set), then tear down and exit with its exit "
                        "code.")
    up.add_argument("-f", "--filename", required=True, help="manifest file or directory")
    up.add_argument("--config")
    up.add_argument("--backend", choices=["slurm", "local"],
                    help="override spec.backend (a DaskJob's spec.cluster.backend)")
    up.add_argument("exec", nargs=argparse.REMAINDER, help="-- COMMAND to run when ready")

    render = sub.add_parser("render", help="print the job scripts a manifest would submit")
    render.add_argument("-f", "--filename", required=True)
    render.add_argument("--config")
    render.add_argument("--backend", choices=["slurm", "pbs", "local"])

    val = sub.add_parser("validate", help="check manifests as the operator would")
    val.add_argument("-f", "--filename", required=True)

    crds = sub.add_parser("crds", help="print the CRDs (or write them to a directory)")
    crds.add_argument("--write", metavar="DIR")

    hist = sub.add_parser("history", help="list past clusters, or one cluster's computations",
                          description="What clusters computed, read from the history their "
                          "schedulers recorded in the staging directory (kept after the "
                          "cluster is deleted), and what their batch jobs used (core-hours, "
                          "GPU-hours, queue waits; per namespace under the list). Times are "
                          "UTC.")
    hist.add_argument("cluster", nargs="?", metavar="CLUSTER",
                      help="a cluster name (or NAME-UID8): list its computations")
    hist.add_argument("--namespace", "-n", help="only this namespace (default: all)")
    hist.add_argument("--json", action="store_true", help="machine-readable output")
    hist.add_argument("--config")
    hist.add_argument("--staging-dir", help="read this staging directory instead of the "
                      "site configuration's")

    report = sub.add_parser("report", help="write one cluster's history as an HTML report",
                            description="A self-contained HTML file (no script, no network): "
                            "timeline of workers and computations, slowest task prefixes, "
                            "errors.")
    report.add_argument("cluster", metavar="CLUSTER", help="a cluster name (or NAME-UID8)")
    report.add_argument("--namespace", "-n", help="only this namespace (default: all)")
    report.add_argument("-o", "--output", help="file to write (default: CLUSTER-report.html)")
    report.add_argument("--config")
    report.add_argument("--staging-dir")
    return p


def _fail(message: str) -> int:
    print(f"dask-hpc: error: {message}", file=sys.stderr)
    return EXIT_INVALID


def cmd_render(args: argparse.Namespace, site: SiteConfig) -> int:
    reconciler = GroupReconciler(Runtime(site))
    docs = load_documents(args.filename)
    for doc in docs:
        doc.setdefault("metadata", {}).setdefault("uid", "00000000-render")
        if args.backend and doc.get("kind") == KIND_CLUSTER:
            doc.setdefault("spec", {})["backend"] = args.backend
    clusters = {d["metadata"]["name"]: d for d in docs if d.get("kind") == KIND_CLUSTER}

    def groups_of(cluster: str) -> list[dict[str, Any]]:  # for the policy's totals
        return [d for d in docs if d.get("kind") == KIND_WORKER_GROUP
                and (d.get("spec") or {}).get("cluster") == cluster]

    for doc in docs:
        valid = validate(doc)
        kind = valid["kind"]
        if kind == KIND_CLUSTER:
            requests = reconciler.render_all(doc, groups_of(doc["metadata"]["name"]))
        elif kind == KIND_JOB:
            if args.backend:
                doc["spec"].setdefault("cluster", {})["backend"] = args.backend
            children, runner = JobReconciler(reconciler.runtime).render(doc)
            requests = []
            for child in children:
                child["metadata"]["uid"] = "00000000-render-cluster"
                requests += reconciler.render_all(child)
            requests.append(runner)
        elif kind == KIND_WORKER_GROUP and doc["spec"]["cluster"] in clusters:
            requests = reconciler.render_group(doc, clusters[doc["spec"]["cluster"]],
                                               groups_of(doc["spec"]["cluster"]))
        else:
            # Refused here as the operator would refuse it (the site's policy).
            enforce(valid, site, cluster=clusters.get(valid["spec"]["cluster"]),
                    groups=groups_of(valid["spec"]["cluster"]))
            print(f"# {kind} {doc['metadata']['name']}: valid (nothing to render here"
                  + (": its DaskCluster is not in these files)" if kind == KIND_WORKER_GROUP
                     else ")"))
            continue
        for request in requests:
            ident = request.identity
            what = (f"array of {len(request.array)} {ident.role.value} jobs"
                    if request.array else f"{ident.role.value} job {ident.job_name}")
            print(f"# ---- {what}  ({ident.comment()})")
            print(request.script.strip() + "\n")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    for doc in load_documents(args.filename):
        valid = validate(doc)
        print(f"{valid['kind']}/{valid['metadata']['name']}: valid")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    docs = {kind: crd_schema.crd(kind) for kind in crd_schema.ALL_KINDS}
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for kind, doc in docs.items():
            (out / f"{NAMES[kind][0]}.yaml").write_text(render_crd(doc))
    else:
        print("---\n".join(render_crd(d) for d in docs.values()), end="")
    return 0


def render_crd(doc: dict[str, object]) -> str:
    header = "# Generated by `dask-hpc crds --write crds/` from crd_schema.py; do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)


def cmd_operator(args: argparse.Namespace, site: SiteConfig) -> int:
    import kopf

    from .handlers import build_registry

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .kube_store import KubeClusterStore
    from .metrics import OperatorMetrics, serve

    runtime = Runtime(site)
    port = site.metrics_port if args.metrics_port is None else args.metrics_port
    metrics = OperatorMetrics(runtime) if port else None
    if metrics is not None:
        try:
            serve(metrics, port)  # a daemon thread: it ends with the operator
        except (OSError, OverflowError) as exc:
            raise ConfigError(f"metrics endpoint: cannot listen on port {port}: {exc} (set "
                              "metricsPort or --metrics-port; 0 = off)") from exc
    registry = build_registry(runtime, kopf.get_default_registry(),
                              store=KubeClusterStore.from_environment(), metrics=metrics,
                              namespaces=args.namespace or None)
    kopf.run(registry=registry, clusterwide=not args.namespace,
             namespaces=args.namespace or (), standalone=True)
    return 0


def cmd_up(args: argparse.Namespace, site: SiteConfig) -> int:
    from .embedded import prepare, up

    command = args.exec[1:] if args.exec[:1] == ["--"] else args.exec
    resources = prepare(load_documents(args.filename), args.backend, site)
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(up(Runtime(site), resources, command or None))


def _history_of(args: argparse.Namespace, site: SiteConfig) -> history.ClusterHistory | None:
    """The history `args.cluster` names (the newest of that name), or None (said why)."""
    files = history.find(args.staging_dir or site.staging_dir, args.namespace)
    try:
        chosen, others = history.select(files, args.cluster)
    except LookupError:
        print(f"dask-hpc: no history of a cluster named {args.cluster!r} under "
              f"{args.staging_dir or site.staging_dir}", file=sys.stderr)
        return None
    if others:
        print(f"dask-hpc: {len(others) + 1} clusters named {args.cluster!r}; showing the "
              f"newest, {chosen.key} (others: {', '.join(f.key for f in others)})",
              file=sys.stderr)
    return history.load(chosen)


def cmd_history(args: argparse.Namespace, site: SiteConfig) -> int:
    if args.cluster:
        one = _history_of(args, site)
        if one is None:
            return 1
        print(history.dumps(one.to_json()) if args.json else
              history.format_computations(one) + "\n\n" + history.format_usage(one))
        return 0
    loaded = []
    for f in history.find(args.staging_dir or site.staging_dir, args.namespace):
        try:
            loaded.append(history.load(f))
        except sqlite3.Error as exc:
            print(f"dask-hpc: skipping {f.path}: {exc}", file=sys.stderr)
    loaded.sort(key=lambda h: h.start or 0.0)
    if args.json:
        print(history.dumps([{k: v for k, v in h.to_json().items()
                              if k in ("namespace", "name", "uid", "start", "end", "state",
                                       "tasks", "erred", "file", "usage_totals")}
                             | {"computations": len(h.computations)} for h in loaded]))
    elif loaded:
        print(history.format_clusters(loaded))
        if any(h.usage for h in loaded):
            print("\n" + history.format_namespaces(loaded))
    else:
        print(f"no cluster history under {args.staging_dir or site.staging_dir}")
    return 0


def cmd_report(args: argparse.Namespace, site: SiteConfig) -> int:
    from .history_report import render as render_report

    one = _history_of(args, site)
    if one is None:
        return 1
    out = Path(args.output or f"{one.name}-report.html")
    out.write_text(render_report(one), encoding="utf-8")
    print(f"wrote {out} ({len(one.computations)} computations, {one.tasks} tasks)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "crds":
            return cmd_crds(args)
        if args.command == "validate":
            return cmd_validate(args)
        site = SiteConfig.load(args.config)
        if args.command == "render":
            return cmd_render(args, site)
        if args.command == "up":
            return cmd_up(args, site)
        if args.command == "history":
            return cmd_history(args, site)
        if args.command == "report":
            return cmd_report(args, site)
        return cmd_operator(args, site)
    except ManifestError as exc:
        return _fail(f"invalid manifest: {exc}")
    except ConfigError as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
