"""Per-namespace site policy: what a namespace's manifests may ask for, and whose name
their batch jobs run under.

The administrator writes it in the site configuration (`namespaces:`, one entry per
namespace, and `"*"` for every namespace not listed). It is enforced after a manifest has
passed validation and before anything reaches the batch system, by the same refusal path
as an invalid manifest: a PolicyError is a ManifestError, so a refused manifest gets a
condition and a Warning event, and nothing is submitted or cancelled (jobs of an earlier
accepted spec keep running). The decision is a pure function of the validated manifest,
the cluster it joins and that cluster's other worker groups (`check`), so every rule is
unit-tested without a batch system.

Why limits are counted per cluster: a DaskCluster with its DaskWorkerGroups (or a DaskJob
with its cluster) is what one user asks for at once; a namespace-wide quota would have to
count every cluster's jobs, which is the batch system's job (its QOS and account limits).

Why directives that set a limited resource are refused even without `allowedDirectives`:
`extraDirectives: [--time=7-00:00:00]` or `[--partition=gpu]` would otherwise walk around
maxWalltime or queues, since the batch system honours the last directive it reads.
"""

from __future__ import annotations

import grp
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import crd_schema, profiles
from .constants import KIND_AUTOSCALER, KIND_CLUSTER, KIND_JOB, KIND_WORKER_GROUP
from .site_config import BACKENDS
from .validation import Manifest, ManifestError, matches, parse_memory, parse_walltime, validate

if TYPE_CHECKING:
    from .site_config import SiteConfig

DEFAULT_POLICY = "*"  # the entry for namespaces not listed
POLICY_VIOLATION = "PolicyViolation"  # the event and condition reason of a refusal
ASK_ADMIN = "ask your site administrator"
# A staging directory shared with a submitting identity: the group may enter, read and
# write; others nothing; setgid, so what the jobs create inside stays in the group.
SHARED_STAGING_MODE = 0o2770

# camelCase key -> attribute; the order is the documentation's.
POLICY_KEYS = {
    "accounts": "accounts",
    "queues": "queues",
    "backends": "backends",
    "submitAs": "submit_as",
    "stagingGroup": "staging_group",
    "maxWorkers": "max_workers",
    "maxCoresPerJob": "max_cores_per_job",
    "maxCores": "max_cores",
    "maxMemoryPerJob": "max_memory_per_job",
    "maxWalltime": "max_walltime",
    "maxGpus": "max_gpus",
    "allowedDirectives": "allowed_directives",
    "allowedPrologue": "allowed_prologue",
}


class PolicyError(ManifestError):
    """A valid manifest that the namespace's policy does not allow. `rule` is the policy
    key (maxWalltime, queues, ...), `namespace` the manifest's namespace."""

    def __init__(self, field: str, message: str, fix: str, rule: str, namespace: str) -> None:
        self.rule = rule
        self.namespace = namespace
        super().__init__(field, message, fix)


@dataclass(frozen=True)
class NamespacePolicy:
    """One `namespaces:` entry. None means "no limit" (or, for submit_as, the site's
    submitPrefix); an empty tuple of accounts or queues allows none of them."""

    name: str = DEFAULT_POLICY  # the namespace it was written for, or "*"
    accounts: tuple[str, ...] | None = None
    queues: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None  # the batch systems it may use (spec.backend)
    submit_as: tuple[str, ...] | None = None
    staging_group: str | None = None
    max_workers: int | None = None
    max_cores_per_job: int | None = None
    max_cores: int | None = None
    max_memory_per_job: str | None = None  # as written (16GiB): messages quote it
    max_walltime: str | None = None  # as written (08:00:00)
    max_gpus: int | None = None
    allowed_directives: tuple[str, ...] | None = None  # regular expressions, whole match
    allowed_prologue: tuple[str, ...] | None = None

    def rule(self, key: str, namespace: str) -> str:
        """How a message names a rule: `policy maxWalltime of namespace "physics"`."""
        where = f'namespace "{namespace}"'
        if self.name == DEFAULT_POLICY:
            where += ' (the site\'s "*" entry)'
        return f"policy {key} of {where}"


# --- the site configuration's `namespaces:` ------------------------------------------------

def _config_error(message: str) -> Exception:
    from .site_config import ConfigError  # site_config imports this module: no cycle at load

    return ConfigError(f"site config: {message}")


def _strings(key: str, value: Any, pattern: str | None, hint: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _config_error(f"{key} must be a list of strings")
    for i, item in enumerate(value):
        if pattern is not None and not matches(pattern, item):
            raise _config_error(f"{key}[{i}] {item!r} is not allowed: {hint}")
    return tuple(value)


def _regexes(key: str, value: Any) -> tuple[str, ...]:
    items = _strings(key, value, None, "")
    for i, item in enumerate(items):
        try:
            re.compile(item)
        except re.error as exc:
            raise _config_error(f"{key}[{i}] {item!r} is not a regular expression: {exc}") \
                from exc
    return items


def _count(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _config_error(f"{key} is {value!r}; expected a whole number >= 0")
    return value


def _size_text(key: str, value: Any, parse: Any, example: str) -> str:
    if not isinstance(value, str):
        why = " (YAML reads an unquoted time as a number: quote it)" \
            if isinstance(value, int) else ""
        raise _config_error(f"{key} is {value!r}; expected a string like {example}{why}")
    try:
        parse(value, key)
    except ManifestError as exc:
        raise _config_error(f"{key} {value!r}: {exc.message} ({exc.fix})") from exc
    return value


def _group(key: str, value: Any) -> str:
    if not isinstance(value, str) or not matches(crd_schema.SAFE_TOKEN, value):
        raise _config_error(f"{key} is {value!r}; expected a group name")
    try:
        grp.getgrnam(value)
    except KeyError as exc:
        raise _config_error(f"{key}: no group {value!r} on the operator's host; create it "
                            "(the operator's user and the submitting user must both be "
                            "members) or remove the key") from exc
    return value


def parse_policy(name: str, data: Any) -> NamespacePolicy:
    """One namespace's entry; every problem is a ConfigError naming the key."""
    where = f"namespaces.{name}"
    if not isinstance(data, dict):
        raise _config_error(f"{where} must be a mapping of policy keys, e.g. "
                            "{maxWorkers: 10}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        attr = POLICY_KEYS.get(key)
        full = f"{where}.{key}"
        if attr is None:
            raise _config_error(f"unknown key {full!r}; known policy keys: "
                                + ", ".join(POLICY_KEYS))
        if key in ("accounts", "queues"):
            kwargs[attr] = _strings(full, value, crd_schema.SAFE_TOKEN,
                                    "letters, digits, '.', '_', '+' or '-'")
        elif key == "backends":
            kwargs[attr] = _strings(full, value, None, "")
            for i, item in enumerate(kwargs[attr]):
                if item not in BACKENDS:
                    raise _config_error(f"{full}[{i}] {item!r} is not one of "
                                        f"{', '.join(BACKENDS)}")
        elif key == "submitAs":
            kwargs[attr] = _strings(full, value, crd_schema.ARG_TOKEN,
                                    "one argument per item, no spaces or shell metacharacters")
        elif key == "stagingGroup":
            kwargs[attr] = _group(full, value)
        elif key == "maxMemoryPerJob":
            kwargs[attr] = _size_text(full, value, parse_memory, "64GiB")
        elif key == "maxWalltime":
            kwargs[attr] = _size_text(full, value, parse_walltime, '"08:00:00"')
        elif key in ("allowedDirectives", "allowedPrologue"):
            kwargs[attr] = _regexes(full, value)
        else:
            kwargs[attr] = _count(full, value)
    return NamespacePolicy(name=name, **kwargs)


def parse_namespaces(data: Any) -> dict[str, NamespacePolicy]:
    """The site configuration's `namespaces:` mapping (namespace or "*" -> entry)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _config_error('namespaces must be a mapping of namespace (or "*") to policy')
    out = {}
    for name, entry in data.items():
        if not isinstance(name, str) or not (
                name == DEFAULT_POLICY or matches(crd_schema.DNS_LABEL, name)):
            raise _config_error(f"namespaces: {name!r} is not a namespace name or \"*\"")
        out[name] = parse_policy(name, entry)
    return out


# --- which policy, which identity ----------------------------------------------------------

def policy_for(site: SiteConfig, namespace: str) -> NamespacePolicy | None:
    """The namespace's own entry, else the "*" entry, else None (no policy: anything valid)."""
    return site.namespaces.get(namespace) or site.namespaces.get(DEFAULT_POLICY)


def submit_prefix(site: SiteConfig, namespace: str | None) -> tuple[str, ...]:
    """The command prefix the namespace's jobs are submitted, listed and cancelled under:
    its policy's submitAs, else the site's submitPrefix."""
    policy = policy_for(site, namespace) if namespace is not None else None
    if policy is not None and policy.submit_as is not None:
        return policy.submit_as
    return site.submit_prefix


def make_staging(paths: Sequence[Path], policy: NamespacePolicy | None) -> None:
    """Create staging directories; under a policy with stagingGroup, hand them to that
    group (mode 2770), so that jobs running under the namespace's identity can write their
    scheduler file and logs where the operator reads them. chgrp needs the operator's user
    to be a member of the group (or root)."""
    gid = grp.getgrnam(policy.staging_group).gr_gid \
        if policy is not None and policy.staging_group else None
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, SHARED_STAGING_MODE)


# --- what a manifest asks for --------------------------------------------------------------

@dataclass(frozen=True)
class Ask:
    """One shape of batch job a cluster runs: a scheduler, a runner, a worker group
    (`replicas` jobs) or an allocation (one job of `replicas + extra_tasks` tasks).

    `checked`: the manifest under check defines it, so per-job rules apply to it.
    `replicas_field`: where its replica count is set in that manifest ("" when it is not
    the manifest's to change); a total over a limit is blamed there, with the largest
    count that fits as the fix."""

    where: str  # the template's field path, e.g. spec.worker
    template: Mapping[str, Any]
    replicas: int = 0  # dask workers it holds
    allocation: bool = False
    extra_tasks: int = 0  # an allocation's scheduler (and client) tasks
    checked: bool = True
    replicas_field: str = ""

    @property
    def scalable(self) -> bool:
        """A worker group or an allocation (not a scheduler or a runner: one job each)."""
        return self.allocation or "replicas" in self.template

    @property
    def jobs(self) -> int:
        return 1 if self.allocation or not self.scalable else self.replicas

    @property
    def tasks(self) -> int:
        return self.replicas + self.extra_tasks if self.allocation else 1

    def per_task(self, resource: str) -> int:
        if resource == "workers":
            return 0
        return int(self.template.get(resource, 0))

    def total(self, resource: str) -> int:
        if resource == "workers":
            return self.replicas
        return self.jobs * self.tasks * self.per_task(resource)

    def scales(self, resource: str) -> bool:
        """The manifest under check sets its replicas, and `resource` grows with them."""
        return bool(self.replicas_field) and self.fitting_replicas(resource, 0) is not None

    def fitting_replicas(self, resource: str, room: int) -> int | None:
        """The most replicas whose share of `resource` fits in `room`; None when the share
        does not grow with replicas."""
        per = 1 if resource == "workers" else self.per_task(resource)
        if per == 0:
            return None
        fixed = self.extra_tasks * per if self.allocation and resource != "workers" else 0
        return max(0, (room - fixed) // per)


def _cluster_asks(spec: Mapping[str, Any], where: str, checked: bool, client: bool = False,
                  replicas_field: str | None = None) -> list[Ask]:
    worker = spec["worker"]
    field = f"{where}.worker.replicas" if replicas_field is None else replicas_field
    if spec.get("mode") == "allocation" or client:
        # One MPI job: scheduler task, (client task,) workers, each sized like a worker.
        return [Ask(f"{where}.worker", worker, worker["replicas"], allocation=True,
                    extra_tasks=2 if client else 1, checked=checked, replicas_field=field)]
    return [Ask(f"{where}.scheduler", spec["scheduler"], checked=checked),
            Ask(f"{where}.worker", worker, worker["replicas"], checked=checked,
                replicas_field=field)]


def _lenient(manifest: Manifest | None) -> Manifest | None:
    """A related object, validated; None when it is invalid (its own reconcile says so)."""
    if manifest is None:
        return None
    try:
        return validate(manifest)
    except ManifestError:
        return None


def _whole(value: Any, top: int) -> int | None:
    """`value` if it is a whole number in 0..top (not a bool), else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top
    return value if ok else None


def _refused_group(doc: Manifest) -> Manifest | None:
    """What can be read of a DaskWorkerGroup the operator refuses as invalid, for the
    totals: a refusal leaves the jobs of its last accepted spec running, so it still
    counts, with the larger of its spec's replicas and its last live count
    (`status.replicas`), and its spec's cores and GPUs per job where they are sane numbers
    (else the defaults). None when it is not a named group of a named cluster."""
    meta, spec = doc.get("metadata"), doc.get("spec")
    if doc.get("kind") != KIND_WORKER_GROUP or not isinstance(meta, dict) \
            or not isinstance(spec, dict) or not isinstance(meta.get("name"), str) \
            or not isinstance(spec.get("cluster"), str):
        return None
    worker, status = spec.get("worker"), doc.get("status")
    worker = worker if isinstance(worker, dict) else {}
    status = status if isinstance(status, dict) else {}
    replicas = max(_whole(worker.get("replicas"), crd_schema.MAX_REPLICAS) or 0,
                   _whole(status.get("replicas"), crd_schema.MAX_REPLICAS) or 0)
    return {"kind": KIND_WORKER_GROUP,
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace")},
            "spec": {"cluster": spec["cluster"], "worker": {
                "replicas": replicas,
                "cores": _whole(worker.get("cores"), crd_schema.MAX_CORES) or 1,
                "gpus": _whole(worker.get("gpus"), crd_schema.MAX_GPUS) or 0}}}


def _other_groups(groups: Sequence[Manifest], namespace: str, cluster: str,
                  exclude: str | None) -> list[Manifest]:
    """The cluster's DaskWorkerGroups besides the one under check, in the same namespace,
    not being deleted: validated, or read leniently where the operator refuses them."""
    out: dict[str, Manifest] = {}  # by name: a caller may name a group twice
    for doc in groups:
        meta = doc.get("metadata") or {}
        if meta.get("deletionTimestamp") or (exclude and meta.get("name") == exclude):
            continue
        valid = _lenient(doc) or _refused_group(doc)
        if valid is None or valid["kind"] != KIND_WORKER_GROUP:
            continue
        if (valid["metadata"].get("namespace") or "default") != namespace \
                or valid["spec"]["cluster"] != cluster:
            continue
        out.setdefault(valid["metadata"]["name"], valid)
    return list(out.values())


def _group_ask(group: Manifest, checked: bool = False, replicas: int | None = None,
               replicas_field: str = "") -> Ask:
    worker = group["spec"]["worker"]
    name = group["metadata"]["name"]
    where = "spec.worker" if checked else f"DaskWorkerGroup {name}"
    return Ask(where, worker, worker["replicas"] if replicas is None else replicas,
               checked=checked, replicas_field=replicas_field)


def asks(valid: Manifest, cluster: Manifest | None = None,
         groups: Sequence[Manifest] = ()) -> tuple[str, list[Ask]]:
    """(the cluster the totals are about, every job shape of it) for a validated manifest;
    `cluster` is the DaskCluster a group or autoscaler names, `groups` its DaskWorkerGroups
    (others than the one under check; invalid or foreign ones are skipped)."""
    kind = valid["kind"]
    meta = valid["metadata"]
    namespace = meta.get("namespace") or "default"
    spec = valid["spec"]
    if kind == KIND_JOB:
        if spec["mode"] == "allocation":
            return f"DaskJob {meta['name']}", _cluster_asks(spec["cluster"], "spec.cluster",
                                                             True, client=True)
        return f"DaskJob {meta['name']}", [Ask("spec.job", spec["job"]),
                                          *_cluster_asks(spec["cluster"], "spec.cluster", True)]
    if kind == KIND_CLUSTER:
        others = _other_groups(groups, namespace, meta["name"], None)
        return f"DaskCluster {meta['name']}", [
            *_cluster_asks(spec, "spec", True), *(_group_ask(g) for g in others)]
    cluster_name = spec["cluster"]
    parent = _lenient(cluster)
    base = _cluster_asks(parent["spec"], "the cluster's spec", False,
                         replicas_field="") if parent is not None else []
    if kind == KIND_WORKER_GROUP:
        others = _other_groups(groups, namespace, cluster_name, meta["name"])
        return f"DaskCluster {cluster_name}", [
            *base, *(_group_ask(g) for g in others),
            _group_ask(valid, checked=True, replicas_field="spec.worker.replicas")]
    if kind == KIND_AUTOSCALER:
        target = spec["workerGroup"]
        others = _other_groups(groups, namespace, cluster_name, None)
        if target == "default":
            if parent is None:
                return f"DaskCluster {cluster_name}", []
            scaled = [Ask(a.where, a.template, spec["maximum"], a.allocation, a.extra_tasks,
                          False, "spec.maximum") if a.where.endswith(".worker") else a
                      for a in base]
            return f"DaskCluster {cluster_name}", [*scaled, *(_group_ask(g) for g in others)]
        return f"DaskCluster {cluster_name}", [
            *base, *(_group_ask(g, replicas=spec["maximum"], replicas_field="spec.maximum")
                     if g["metadata"]["name"] == target else _group_ask(g) for g in others)]
    return "", []


# --- the rules -----------------------------------------------------------------------------

# Options of extra directives that set what a limit governs, per batch system. Long SLURM
# options may be abbreviated (`--part=gpu`), so a long option counts when it is a prefix of
# one of these; short ones are one letter, their value may follow at once (`-pgpu`, which
# the CRD pattern refuses today). Arrays and identity options are refused for everyone by
# validation (DENIED_DIRECTIVE); they are listed here too so that a policy never depends
# on that list staying as it is.
SLURM_OPTIONS: dict[str, tuple[str, ...]] = {
    "queues": ("--partition", "-p"),
    "accounts": ("--account", "-A"),
    "maxWalltime": ("--time", "--time-min", "-t"),
    "maxMemoryPerJob": ("--mem", "--mem-per-cpu", "--mem-per-gpu"),
    "cores": ("--cpus-per-task", "--ntasks", "--ntasks-per-node", "--nodes", "--exclusive",
              "--mincpus", "--cpus-per-gpu", "--cores-per-socket", "--sockets-per-node",
              "--threads-per-core", "--extra-node-info", "-c", "-n", "-N", "-B"),
    # --exclusive: the job gets every CPU and GRES (GPU) of its nodes, but only the memory
    # it asks for (--mem=0 asks for all of it, and is read under maxMemoryPerJob).
    "maxGpus": ("--gres", "--gpus", "--gpus-per-node", "--gpus-per-task", "--gpus-per-socket",
                "--tres-per-task", "--exclusive", "-G"),
    "jobs": ("--array", "-a"),
    "identity": ("--uid", "--gid"),
    # Another cluster's queue, which the operator's squeue does not list (see admit).
    "clusters": ("--clusters", "--cluster-constraint", "-M"),
}
# PBS: -q, -A/-P, -J (arrays); `-l` resource lists are read key by key.
PBS_OPTIONS: dict[str, tuple[str, ...]] = {
    "queues": ("-q",), "accounts": ("-A", "-P"), "jobs": ("-J",), "identity": ("-u",),
}
PBS_RESOURCES: dict[str, tuple[str, ...]] = {
    # A shrink-to-fit job runs up to max_walltime; soft_walltime may be exceeded.
    "maxWalltime": ("walltime", "max_walltime", "min_walltime", "soft_walltime"),
    "maxMemoryPerJob": ("mem", "vmem", "pmem", "pvmem", "select"),
    "cores": ("ncpus", "nodes", "select", "mpiprocs", "ompthreads", "place", "nodect"),
    # place=excl: whole nodes, their GPUs included where no cgroup hook fences them.
    "maxGpus": ("ngpus", "gpus", "naccelerators", "select", "place"),
}
# Which limits make which kind of directive off limits.
GOVERNS: dict[str, tuple[str, ...]] = {
    "cores": ("maxCoresPerJob", "maxCores"),
    "jobs": ("maxWorkers", "maxCores", "maxGpus"),
    "identity": (),  # always, under any policy: the identity is the site's choice
}


def _limited(policy: NamespacePolicy, what: str) -> bool:
    if what == "clusters":
        return False  # refused for everyone, policy or none (admit)
    if what in GOVERNS:
        return what == "identity" or any(
            getattr(policy, POLICY_KEYS[k]) is not None for k in GOVERNS[what])
    return getattr(policy, POLICY_KEYS[what]) is not None


def directive_governs(directive: str, backend: str) -> list[str]:
    """What a directive sets among the things policies limit (queues, maxWalltime, cores,
    jobs, identity, ...), as the batch system would read it."""
    m = re.match(r"^(--?)([A-Za-z][A-Za-z0-9-]*)(?:[= ](.*))?$", directive)
    if not m:
        return []
    dashes, name = m.group(1), m.group(2)
    if backend == "pbs":
        if dashes == "--":
            return []  # qsub's long options (--version) set nothing limited
        letter, rest = f"-{name[0]}", directive[2:].lstrip(" =")
        found = [what for what, options in PBS_OPTIONS.items() if letter in options]
        if letter == "-q" and "@" in rest:
            found.append("clusters")  # queue@server: another server's queue
        if letter == "-l":
            keys = {part.split("=", 1)[0].strip().lower()
                    for part in re.split(r"[,:+]", rest) if part.strip()}
            found += [what for what, names in PBS_RESOURCES.items() if keys & set(names)]
        return found
    if backend != "slurm":
        return []  # the local backend reads no directives
    if dashes == "--":
        option = f"--{name}"
        return [what for what, options in SLURM_OPTIONS.items()
                if any(o.startswith("--") and o.startswith(option) for o in options)]
    letter = f"-{name[0]}"
    return [what for what, options in SLURM_OPTIONS.items() if letter in options]


def _check_backend(valid: Manifest, backend: str, parent: Manifest | None,
                   policy: NamespacePolicy, namespace: str) -> None:
    """The batch system the manifest's jobs go to must be one of `backends`, and not the
    local backend under a submitAs identity: local jobs are the operator's own processes,
    so a namespace whose jobs run as another user would get the operator's account (its
    prologue lines and DaskJob commands run as the operator)."""
    kind = valid["kind"]
    if kind == KIND_CLUSTER:
        field, written = "spec.backend", valid["spec"].get("backend")
    elif kind == KIND_JOB:
        field, written = "spec.cluster.backend", valid["spec"]["cluster"].get("backend")
    elif kind == KIND_WORKER_GROUP and parent is not None:
        field, written = "spec.cluster", parent["spec"].get("backend")
    else:
        return  # an autoscaler runs no job; a group without its cluster submits nothing
    identity = bool(policy.submit_as)  # [] is the operator's own account: local is that
    if policy.backends is not None and backend not in policy.backends:
        rule, why = "backends", "is not allowed by"
    elif identity and backend == "local":
        rule, why = "submitAs", ("runs jobs as the operator's own processes, not as the "
                                 "user named by")
    else:
        return
    choices = [b for b in (policy.backends or BACKENDS) if not (identity and b == "local")]
    asked = f"backend {backend}" + ("" if written else " (the site's default)")
    if not choices:
        fix = "this namespace may use no backend"
    elif kind == KIND_WORKER_GROUP:
        fix = f"name a DaskCluster whose backend is {' or '.join(choices)}"
    else:
        fix = f"set {field} to {' or '.join(choices)}"
    if kind == KIND_WORKER_GROUP:
        asked = f"DaskCluster {valid['spec']['cluster']} uses {asked}, which"
    raise PolicyError(field, f"{asked} {why} {policy.rule(rule, namespace)}",
                      f"{fix}, or {ASK_ADMIN}", rule, namespace)


def _check_placement(ask: Ask, policy: NamespacePolicy, namespace: str) -> None:
    for key, allowed, word in (("queue", policy.queues, "queues"),
                               ("account", policy.accounts, "accounts")):
        value = ask.template.get(key)
        if allowed is None or value is None or value in allowed:
            continue
        choices = f"use one of {', '.join(allowed)}" if allowed else f"remove {key}"
        raise PolicyError(f"{ask.where}.{key}", f"{key} {value!r} is not allowed by "
                          f"{policy.rule(word, namespace)}", f"{choices}, or {ASK_ADMIN}",
                          word, namespace)


def _check_sizes(ask: Ask, policy: NamespacePolicy, namespace: str) -> None:
    tasks = ask.tasks
    many = tasks > 1  # an allocation: the job holds all its tasks
    if policy.max_cores_per_job is not None:
        cores = tasks * int(ask.template["cores"])
        if cores > policy.max_cores_per_job:
            asked = f"{tasks} tasks of {ask.template['cores']} cores" if many else \
                f"{cores} cores per job"
            raise PolicyError(
                f"{ask.where}.cores", f"{asked} exceed {policy.rule('maxCoresPerJob', namespace)}"
                f" ({policy.max_cores_per_job})",
                f"{ASK_ADMIN}, or lower it" + (" or the replicas" if many else "")
                + f" to fit {policy.max_cores_per_job} cores per job", "maxCoresPerJob",
                namespace)
    if policy.max_memory_per_job is not None:
        limit = parse_memory(policy.max_memory_per_job, "maxMemoryPerJob")
        memory = tasks * parse_memory(ask.template["memory"], f"{ask.where}.memory")
        if memory > limit:
            asked = f"{ask.template['memory']} per job" if tasks == 1 else \
                f"{tasks} tasks of {ask.template['memory']} per job"
            raise PolicyError(
                f"{ask.where}.memory", f"{asked} exceed {policy.rule('maxMemoryPerJob', namespace)}"
                f" ({policy.max_memory_per_job})",
                f"{ASK_ADMIN}, or lower it to {policy.max_memory_per_job}"
                + (" in all" if tasks > 1 else ""), "maxMemoryPerJob", namespace)
    if policy.max_walltime is not None:
        limit = parse_walltime(policy.max_walltime, "maxWalltime")
        walltime = ask.template.get("walltime")
        if walltime is not None and parse_walltime(walltime, f"{ask.where}.walltime") > limit:
            raise PolicyError(f"{ask.where}.walltime", f"{walltime} exceeds "
                              f"{policy.rule('maxWalltime', namespace)} ({policy.max_walltime})",
                              f"{ASK_ADMIN}, or lower it to {policy.max_walltime}",
                              "maxWalltime", namespace)


def _check_lines(ask: Ask, policy: NamespacePolicy, namespace: str, backend: str) -> None:
    if policy.allowed_prologue is not None:
        for i, line in enumerate(ask.template.get("prologue") or []):
            if not any(re.fullmatch(p, line) for p in policy.allowed_prologue):
                raise PolicyError(f"{ask.where}.prologue[{i}]", f"{line!r} is not allowed by "
                                  f"{policy.rule('allowedPrologue', namespace)}",
                                  _allowed_fix(policy.allowed_prologue), "allowedPrologue",
                                  namespace)
    for i, directive in enumerate(ask.template.get("extraDirectives") or []):
        field = f"{ask.where}.extraDirectives[{i}]"
        for what in directive_governs(directive, backend):
            if _limited(policy, what):
                rule = "submitAs" if what == "identity" else (
                    next((k for k in GOVERNS.get(what, (what,)) if
                          getattr(policy, POLICY_KEYS[k]) is not None), what))
                raise PolicyError(field, f"{directive!r} would override what "
                                  f"{policy.rule(rule, namespace)} limits",
                                  "set it through the manifest's own fields (queue, account, "
                                  "walltime, memory, cores, gpus, replicas), which the policy "
                                  f"checks, or {ASK_ADMIN}", rule, namespace)
        if policy.allowed_directives is not None and not any(
                re.fullmatch(p, directive) for p in policy.allowed_directives):
            raise PolicyError(field, f"{directive!r} is not allowed by "
                              f"{policy.rule('allowedDirectives', namespace)}",
                              _allowed_fix(policy.allowed_directives), "allowedDirectives",
                              namespace)


def _allowed_fix(patterns: tuple[str, ...]) -> str:
    if not patterns:
        return f"remove it: this namespace may not add any; {ASK_ADMIN}"
    return f"remove it or write one matching {' or '.join(patterns)}; {ASK_ADMIN}"


TOTALS = (("maxWorkers", "workers", "workers"), ("maxCores", "cores", "cores"),
          ("maxGpus", "gpus", "GPUs"))


def _check_totals(subject: str, shapes: list[Ask], policy: NamespacePolicy,
                  namespace: str) -> None:
    """A total over its limit refuses the manifest only if the jobs it defines (or, for an
    autoscaler, the group it scales) add to that total: a DaskCluster without GPUs is not
    refused because its GPU worker groups ask too many; those groups are."""
    for key, resource, unit in TOTALS:
        limit = getattr(policy, POLICY_KEYS[key])
        total = sum(a.total(resource) for a in shapes)
        if limit is None or total <= limit:
            continue
        mine = [a for a in shapes if (a.checked or a.replicas_field) and a.total(resource) > 0]
        if not mine:
            continue
        blamed = max(mine, key=lambda a: (a.scales(resource), a.total(resource)))
        others = total - blamed.total(resource)
        if blamed.scales(resource):
            field = blamed.replicas_field
            fits = blamed.fitting_replicas(resource, limit - others)
            fix = f"{ASK_ADMIN}, or lower it to {fits}"
        else:
            field = f"{blamed.where}.{resource}"
            fix = f"{ASK_ADMIN}, or lower it"
        parts = f" ({others} of them in its other parts)" if others else ""
        raise PolicyError(field, f"{subject} would use {total} {unit}{parts}, over "
                          f"{policy.rule(key, namespace)} ({limit})", fix, key, namespace)


def backend_of(valid: Manifest, parent: Manifest | None, site: SiteConfig) -> str:
    """The batch system a validated manifest's jobs go to (a group's and an autoscaler's:
    their validated cluster `parent`'s), the site's default where none is named."""
    spec = valid["spec"]
    backend_spec = spec.get("cluster", spec) if valid["kind"] == KIND_JOB else spec
    if valid["kind"] == KIND_WORKER_GROUP or valid["kind"] == KIND_AUTOSCALER:
        backend_spec = parent["spec"] if parent is not None else {}
    return str(backend_spec.get("backend") or site.backend)


def check_reach(valid: Manifest, site: SiteConfig, cluster: Manifest | None = None) -> None:
    """Refuse, under any policy or none, a directive that sends a job to another cluster
    or server than the one the operator lists (SLURM's -M and --clusters, PBS's -q
    queue@server): the operator would never see the job, and would submit it again every
    period. The CRD refuses the spelled-out options for every backend; SLURM's -M only
    here, where the backend is known, since PBS's -M names the mail recipients."""
    backend = backend_of(valid, _lenient(cluster), site)
    for ask in asks(valid, cluster)[1]:
        if not ask.checked:
            continue  # the cluster's own, which its reconcile checks
        for i, directive in enumerate(ask.template.get("extraDirectives") or []):
            if "clusters" in directive_governs(directive, backend):
                raise ManifestError(
                    f"{ask.where}.extraDirectives[{i}]", f"{directive!r} sends the job to "
                    f"another {backend} cluster or server, whose jobs the operator does not "
                    "list (it would submit them again every period)",
                    f"remove it; jobs go where the operator's own {backend} commands "
                    f"submit ({ASK_ADMIN})")


def check(valid: Manifest, policy: NamespacePolicy, site: SiteConfig, *,
          cluster: Manifest | None = None, groups: Sequence[Manifest] = ()) -> None:
    """Raise PolicyError if the validated manifest breaks `policy`.

    Per-job rules (queues, accounts, maxCoresPerJob, maxMemoryPerJob, maxWalltime,
    allowedPrologue, allowedDirectives and directives that would override a limit) apply to
    the jobs the manifest itself defines; totals (maxWorkers, maxCores, maxGpus) to the
    whole cluster: the DaskCluster `cluster` a group or autoscaler names, and its other
    DaskWorkerGroups `groups` (an autoscaler's target counted at its maximum). `site` gives
    the default backend, whose directive syntax is read."""
    namespace = valid["metadata"].get("namespace") or "default"
    parent = _lenient(cluster)
    backend = backend_of(valid, parent, site)
    _check_backend(valid, backend, parent, policy, namespace)
    subject, shapes = asks(valid, cluster, groups)
    for ask in shapes:
        if ask.checked:
            _check_placement(ask, policy, namespace)
            _check_sizes(ask, policy, namespace)
            _check_lines(ask, policy, namespace, backend)
    _check_totals(subject, shapes, policy, namespace)


def counts_siblings(manifest: Manifest, old_status: Mapping[str, Any]) -> bool:
    """Whether a DaskCluster's totals count its DaskWorkerGroups this time: not when this
    generation of its spec was accepted already (status.observedGeneration, condition
    Accepted=True). A group added or grown later that pushes the cluster over a limit is
    refused on its own reconcile; it must not turn the running cluster Failed (which ends
    the DaskJob whose cluster it is). A new spec of the cluster (scaled up, say) is checked
    with its groups, so the cluster cannot grow into room its groups already fill."""
    meta = manifest.get("metadata")  # not validated yet: admit() refuses a bad one
    generation = meta.get("generation") if isinstance(meta, dict) else None
    accepted = any(c.get("type") == "Accepted" and c.get("status") == "True"
                   for c in old_status.get("conditions") or [] if isinstance(c, dict))
    return not (accepted and "observedGeneration" in old_status
                and old_status["observedGeneration"] == generation)


def _enforce(applied: profiles.Applied, site: SiteConfig, cluster: Manifest | None,
             groups: Sequence[Manifest]) -> None:
    """check() the manifest as its profile made it; a refused value that is the profile's
    is blamed on the profile the manifest names (the user never wrote that field)."""
    valid = applied.manifest
    policy = policy_for(site, valid["metadata"].get("namespace") or "default")
    if policy is None:
        return
    try:
        check(valid, policy, site, cluster=cluster, groups=groups)
    except PolicyError as exc:
        field, message, fix = applied.blame(exc.field, exc.message, exc.fix)
        if field == exc.field:
            raise
        raise PolicyError(field, message, fix, exc.rule, exc.namespace) from None


def enforce(valid: Manifest, site: SiteConfig, *, cluster: Manifest | None = None,
            groups: Sequence[Manifest] = ()) -> None:
    """check() against the policy of the manifest's namespace, if it has one, of the
    manifest as its site profile makes it (`valid` is as validate() returned it, without
    the profile). Raises ManifestError for a profile the site does not define."""
    _enforce(profiles.apply(valid, site, cluster=cluster), site, cluster, groups)


def admit(manifest: Manifest, site: SiteConfig, *, cluster: Manifest | None = None,
          groups: Sequence[Manifest] = ()) -> Manifest:
    """validate(), the site profile (profiles.py), then the policy: what every reconcile
    and `up`/`render` accept; returns the manifest with its profile applied. Raises
    ManifestError (PolicyError for a policy's refusal)."""
    valid = validate(manifest)
    check_reach(valid, site, cluster)
    applied = profiles.apply(valid, site, cluster=cluster)
    _enforce(applied, site, cluster, groups)
    return applied.manifest
