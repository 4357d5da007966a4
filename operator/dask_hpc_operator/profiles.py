"""Named site profiles: `spec.profile` picks placement defaults the administrator wrote once.

A site configuration's `profiles:` maps a name to what that profile gives each kind of job
it targets: `scheduler` (spec.scheduler), `worker` (spec.worker: the default group, a
DaskWorkerGroup's workers, an allocation's tasks) and `job` (a DaskJob's runner, spec.job):

    profiles:
      a100:
        worker: {queue: gpu, extraDirectives: ["--constraint=a100"],
                 prologue: ["module load cuda/12.2"]}
        scheduler: {queue: debug}

Why only queue, account, env, prologue and extraDirectives: those are the job fields the
CRD gives no default. The API server fills a CRD's defaults in before the operator sees an
object, so `cores: 1` written by the server and `cores: 1` written by the user look the
same; a profile's cores could never tell them apart and would either never apply or
override the user. Sizes are limited per namespace instead (policy.py). The fields are read
from the schema (`profile_fields`), so a default added to the CRD later takes the field out
of profiles, and the unit test that pins the list says so.

How a profile applies (`apply_profile`, pure, run by policy.admit after validation and
before the policy check, so the policy sees the effective values):
- queue, account: the profile's where the manifest leaves them unset;
- prologue, extraDirectives: the profile's lines first, then the manifest's (a site's
  `module load` runs before the user's; the batch system reads the last directive, so the
  user's own directive wins over the profile's);
- env: the profile's variables, then the manifest's; a name in both keeps the manifest's.
It is idempotent (applying it to its own result changes nothing), so a spec admitted twice
never gets a profile's lines twice. A DaskJob's cluster spec, made effective when the job is
admitted, becomes the spec of the DaskCluster the job creates without its `profile`: that
cluster is a snapshot of the profile as it was, not re-profiled later.

Which profile: a DaskCluster's spec.profile; a DaskWorkerGroup's own spec.profile, else
its cluster's; a DaskJob's spec.cluster.profile (its cluster and its runner). A name the
site does not define is refused at spec.profile, with the defined names.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import crd_schema
from .constants import KIND_CLUSTER, KIND_JOB, KIND_WORKER_GROUP
from .validation import (
    Manifest,
    ManifestError,
    apply_defaults,
    check_fragment,
    matches,
)

if TYPE_CHECKING:
    from .site_config import SiteConfig

# target -> (the kind whose schema has it, its key in that kind's spec)
TARGETS: dict[str, tuple[str, str]] = {
    "scheduler": (KIND_CLUSTER, "scheduler"),
    "worker": (KIND_CLUSTER, "worker"),
    "job": (KIND_JOB, "job"),
}
# What a profile may set, where the target's schema has the field and gives it no default.
CANDIDATE_FIELDS = ("queue", "account", "env", "prologue", "extraDirectives")
LINE_FIELDS = ("prologue", "extraDirectives")
SCALAR_FIELDS = ("queue", "account")
MAX_NAME = 64  # as spec.profile's maxLength
ASK_ADMIN = "ask your site administrator"


@functools.cache
def target_schema(target: str) -> dict[str, Any]:
    """The CRD's schema of what `target` fills (spec.scheduler, spec.worker, spec.job).
    Cached, like the two below (building the CRD schemas on every reconcile would cost more
    than the merge): callers only read what they return."""
    kind, key = TARGETS[target]
    schema: dict[str, Any] = crd_schema.object_schema(kind)["properties"]["spec"]["properties"][key]
    return schema


@functools.cache
def profile_fields(target: str) -> tuple[str, ...]:
    """The fields a profile may set in `target`: candidates the schema has, undefaulted."""
    props = target_schema(target)["properties"]
    return tuple(f for f in CANDIDATE_FIELDS if f in props and "default" not in props[f])


@functools.cache
def fragment_schema(target: str) -> dict[str, Any]:
    """The part of the target's schema a profile is checked against."""
    props = target_schema(target)["properties"]
    return {"type": "object", "properties": {f: props[f] for f in profile_fields(target)}}


@dataclass(frozen=True)
class Profile:
    """One `profiles:` entry: target -> fields (CRD names, checked, env values defaulted)."""

    name: str
    targets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    def describe(self) -> str:
        """For messages: `a100 (worker, scheduler)`."""
        return f"{self.name} ({', '.join(self.targets) or 'empty'})"


# --- the site configuration's `profiles:` ---------------------------------------------------

def _config_error(message: str) -> Exception:
    from .site_config import ConfigError  # site_config imports this module: no cycle at load

    return ConfigError(f"site config: {message}")


def _refused_field(where: str, key: str, target: str) -> Exception:
    """Why a profile may not set `key`, and what to do instead."""
    props = target_schema(target)["properties"]
    allowed = ", ".join(profile_fields(target))
    if key not in props:
        return _config_error(f"{where}.{key}: unknown field; a profile's {target} may set "
                             f"{allowed}")
    if "default" in props[key]:
        return _config_error(
            f"{where}.{key}: a profile cannot set {key}: the CRD defaults it (to "
            f"{props[key]['default']!r}) and the API server fills defaults in before the "
            f"operator reads a manifest, so a profile's value could never apply; limit it per "
            f"namespace with `namespaces:` policy instead. A profile's {target} may set {allowed}")
    return _config_error(f"{where}.{key}: a profile sets batch placement only; its {target} "
                         f"may set {allowed}")


def _parse_target(name: str, target: str, data: Any) -> dict[str, Any]:
    where = f"profiles.{name}.{target}"
    if not isinstance(data, dict):
        raise _config_error(f"{where} must be a mapping, e.g. {{queue: gpu}}")
    allowed = profile_fields(target)
    for key in data:
        if key not in allowed:
            raise _refused_field(where, str(key), target)
    schema = fragment_schema(target)
    try:
        check_fragment(schema, data, where)
    except ManifestError as exc:
        raise _config_error(str(exc)) from exc
    fragment: dict[str, Any] = apply_defaults(schema, copy.deepcopy(data))
    seen: set[str] = set()
    for i, item in enumerate(fragment.get("env", [])):
        if item["name"] in seen:
            raise _config_error(f"{where}.env[{i}].name: {item['name']} is set twice")
        seen.add(item["name"])
    return fragment


def parse_profile(name: Any, data: Any) -> Profile:
    """One profile; every problem is a ConfigError naming `profiles.<name>.<field>`."""
    if not isinstance(name, str) or len(name) > MAX_NAME \
            or not matches(crd_schema.SAFE_TOKEN, name):
        raise _config_error(f"profiles: {name!r} cannot be named by spec.profile; use "
                            f"letters, digits, '.', '_', '+' or '-' (at most {MAX_NAME})")
    if data is None:
        data = {}  # `default:` with nothing under it: a profile that sets nothing
    if not isinstance(data, dict):
        raise _config_error(f"profiles.{name} must be a mapping of {', '.join(TARGETS)} to "
                            "fields, e.g. {worker: {queue: gpu}}")
    targets = {}
    for target, fields in data.items():
        if target not in TARGETS:
            raise _config_error(f"profiles.{name}.{target}: unknown target; a profile sets "
                                "scheduler, worker or job (a DaskJob's runner)")
        targets[target] = _parse_target(name, target, fields)
    return Profile(name, targets)


def parse_profiles(data: Any) -> dict[str, Profile]:
    """The site configuration's `profiles:` mapping (name -> profile)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _config_error("profiles must be a mapping of profile name to "
                            "{scheduler: ..., worker: ..., job: ...}")
    return {name: parse_profile(name, entry) for name, entry in data.items()}


# --- applying one ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Applied:
    """A validated manifest as its profile makes it, and where each value came from.

    `field` is where the manifest names the profile (spec.profile, spec.cluster.profile);
    `inherited_from` the DaskCluster whose profile a group takes; `filled` the fields whose
    value is the profile's (spec.worker.queue, spec.worker.extraDirectives[0], ...), so a
    policy refusal of one of them can name the profile the user chose, not a field the
    user never wrote."""

    manifest: Manifest
    profile: str | None = None
    field: str = "spec.profile"
    inherited_from: str | None = None
    filled: frozenset[str] = frozenset()
    known: tuple[str, ...] = ()

    def blame(self, field: str, message: str, fix: str) -> tuple[str, str, str]:
        """(field, message, fix) of a refusal of `field`: moved to the profile's field when
        the refused value is the profile's, unchanged otherwise."""
        if self.profile is None or field not in self.filled:
            return field, message, fix
        whose = f"profile {self.profile!r}" + (
            f" (DaskCluster {self.inherited_from}'s; this group sets no spec.profile)"
            if self.inherited_from else "")
        others = [n for n in self.known if n != self.profile]
        choose = f"choose another profile ({', '.join(others)}) or none" if others \
            else "remove the profile"
        if "[" in field:  # a line: the manifest cannot take it out
            fix = (f"{choose}; the profile and the namespace's policy disagree, so also "
                   f"tell your site administrator")
        else:
            fix = f"set {field} yourself, which wins over the profile: {fix}"
        return self.field, f"{message}; {field} is set by {whose}", fix


def _merge(template: dict[str, Any], fragment: Mapping[str, Any], where: str,
           schema: Mapping[str, Any], profile: str) -> list[str]:
    """Fill `template` (a validated spec.worker, spec.scheduler or spec.job) in place from a
    profile's fragment; the fields whose value is the profile's."""
    filled = []
    for key in SCALAR_FIELDS:
        if key not in fragment:
            continue
        if template.get(key) is None:
            template[key] = fragment[key]
        if template[key] == fragment[key]:
            filled.append(f"{where}.{key}")
    for key in LINE_FIELDS:
        lines = list(fragment.get(key) or [])
        if not lines:
            continue
        own = list(template.get(key) or [])
        merged = own if own[:len(lines)] == lines else lines + own  # idempotent
        limit = schema["properties"][key]["maxItems"]
        if len(merged) > limit:
            raise ManifestError(f"{where}.{key}", f"has {len(merged)} entries with the "
                                f"{len(lines)} of profile {profile!r}",
                                f"at most {limit}: remove some")
        template[key] = merged
        filled += [f"{where}.{key}[{i}]" for i in range(len(lines))]
    env = list(fragment.get("env") or [])
    if env:
        own_env = list(template.get("env") or [])
        names = {item["name"] for item in own_env}
        merged_env = [copy.deepcopy(item) for item in env if item["name"] not in names] + own_env
        limit = schema["properties"]["env"]["maxItems"]
        if len(merged_env) > limit:
            raise ManifestError(f"{where}.env", f"has {len(merged_env)} variables with those "
                                f"of profile {profile!r}", f"at most {limit}: remove some")
        template["env"] = merged_env
    return filled


def _unknown(name: str, field: str, site: SiteConfig, inherited_from: str | None) -> ManifestError:
    known = sorted(site.profiles)
    what = f"{name!r} is not a profile of this site"
    if inherited_from:
        what = (f"unset, so this group takes DaskCluster {inherited_from}'s profile {name!r}, "
                "which this site does not define")
    if known:
        fix = (f"use one of {', '.join(known)}" + (" here" if inherited_from else "")
               + f", or remove it; {ASK_ADMIN} for a new profile")
    else:
        fix = f"this site defines no profiles: remove it, or {ASK_ADMIN} to define {name!r}"
    return ManifestError(field, what, fix)


def _targets(valid: Manifest) -> tuple[Any, str, list[tuple[str, str, dict[str, Any]]]]:
    """(profile name or None, where it is named, [(target, field path, template)])."""
    kind, spec = valid["kind"], valid["spec"]
    if kind == KIND_CLUSTER:
        return spec.get("profile"), "spec.profile", [
            ("scheduler", "spec.scheduler", spec["scheduler"]),
            ("worker", "spec.worker", spec["worker"])]
    if kind == KIND_JOB:
        inner = spec["cluster"]
        return inner.get("profile"), "spec.cluster.profile", [
            ("scheduler", "spec.cluster.scheduler", inner["scheduler"]),
            ("worker", "spec.cluster.worker", inner["worker"]),
            ("job", "spec.job", spec["job"])]
    if kind == KIND_WORKER_GROUP:
        return spec.get("profile"), "spec.profile", [("worker", "spec.worker", spec["worker"])]
    return None, "", []


def apply(valid: Manifest, site: SiteConfig, *, cluster: Manifest | None = None) -> Applied:
    """The validated manifest `valid` as its profile makes it (a copy; `valid` is kept),
    with the provenance of the profile's values. `cluster`: the DaskCluster a
    DaskWorkerGroup names (as read, validated or not), whose spec.profile the group takes
    when it sets none. Raises ManifestError for a profile the site does not define."""
    name, where, targets = _targets(valid)
    inherited_from = None
    if name is None and valid["kind"] == KIND_WORKER_GROUP and isinstance(cluster, dict):
        inherited = (cluster.get("spec") or {}).get("profile") \
            if isinstance(cluster.get("spec"), dict) else None
        if isinstance(inherited, str) and matches(crd_schema.SAFE_TOKEN, inherited):
            # Anything else makes the cluster invalid: its own reconcile says so.
            name, inherited_from = inherited, valid["spec"]["cluster"]
    if name is None:
        return Applied(valid)
    profile = site.profiles.get(name)
    if profile is None:
        raise _unknown(name, where, site, inherited_from)
    effective = copy.deepcopy(valid)
    _, _, targets = _targets(effective)
    filled: list[str] = []
    for target, path, template in targets:
        fragment = profile.targets.get(target)
        if fragment:
            filled += _merge(template, fragment, path, fragment_schema(target), name)
    if effective["kind"] == KIND_JOB:
        # Its cluster spec, now effective, becomes the spec of the DaskCluster the job
        # creates: that cluster is a snapshot, not re-profiled (a profile changed while
        # the job runs would otherwise add its new lines to the old ones).
        del effective["spec"]["cluster"]["profile"]
    return Applied(effective, name, where, inherited_from, frozenset(filled),
                   tuple(sorted(site.profiles)))


def apply_profile(valid: Manifest, site: SiteConfig, *,
                  cluster: Manifest | None = None) -> Manifest:
    """`valid` with its site profile applied (see the module's docstring); `valid` itself
    is not changed. Raises ManifestError at spec.profile for an unknown profile."""
    return apply(valid, site, cluster=cluster).manifest
