"""The operator's own check of a manifest, on the same schema the API server enforces.

Two reasons it exists although the CRD validates too: `dask-hpc up` and `render` run with no
API server, and defence in depth — a CRD installed by an older chart, or an object written
before a pattern was tightened, must still never reach a job script unchecked.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import jsonschema
from dask.utils import parse_bytes

from . import crd_schema
from .constants import API_VERSION, DEFAULT_GROUP_NAME, KIND_JOB

Manifest = dict[str, Any]

# What to tell a person whose value does not match a pattern.
PATTERN_HINTS = {
    crd_schema.MEMORY: "use a number with a unit, e.g. 16GiB or 512MiB",
    crd_schema.WALLTIME: "use HH:MM:SS or D-HH:MM:SS, e.g. 01:30:00",
    crd_schema.SAFE_TOKEN: "use letters, digits, '.', '_', '+' or '-' only",
    crd_schema.DNS_LABEL: "use a DNS label: lower-case letters, digits and '-'",
    crd_schema.ENV_NAME: "use a shell variable name: letters, digits and '_'",
    crd_schema.NO_CONTROL_CHARS: ("remove newlines, other control characters and Unicode "
                                  "line separators (U+0085, U+2028, U+2029)"),
    crd_schema.PROLOGUE_LINE: ("keep prologue lines to simple commands (no ; | & $ ` < > "
                               "quotes or newlines); set variables with `env` instead"),
    crd_schema.DIRECTIVE: ("write one directive: --name=value, --name value or one short "
                           "option -x value (e.g. --constraint=haswell, -l storage=x/ab12); "
                           "no quotes, no spaces inside the value, no value starting with '-'"),
    crd_schema.ARG_TOKEN: "give one argument per list item, without spaces or quotes",
    crd_schema.PATH: "use an absolute path without spaces or shell metacharacters",
}
# What to tell a person whose value matches a pattern it must not (`not: {pattern}`).
REFUSED_HINTS = {
    crd_schema.DENIED_DIRECTIVE: (
        "the operator sets who a job runs as, where its output goes, its name, identity and "
        "environment, and submits without waiting; directives that change these (--uid, "
        "--gid, --get-user-env, --output/-o, --error/-e, --input/-i, --chdir/-D, --export, "
        "--comment, --job-name/-J, --array/-a, --wrap, --wait/-W, PBS -u -v -V -S -I -W, "
        "or any abbreviation of them) are refused, and so are --clusters, "
        "--cluster-constraint and PBS -q queue@server, which send the job where the "
        "operator cannot see it: remove it"),
}
UID = r"^[A-Za-z0-9-]{1,64}$"  # what hpc_bridge.model.JobIdentity accepts as an owner uid
# DaskWorkerGroup names a cluster's own jobs already use as group (job names, usage groups).
RESERVED_GROUP_NAMES = (DEFAULT_GROUP_NAME, "scheduler", "allocation")
MAX_MEMORY = 64 * 2**40  # 64 TiB: larger is a typo, not a node
MAX_WALLTIME_S = 365 * 86_400


class ManifestError(ValueError):
    """A manifest that cannot be accepted; `field` is a dotted path like spec.worker.memory."""

    def __init__(self, field: str, message: str, fix: str = "") -> None:
        self.field = field
        self.message = message
        self.fix = fix
        super().__init__(f"{field}: {message}" + (f" ({fix})" if fix else ""))


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _shown(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: repr (newlines and escapes visible) and cut
    short, so that a megabyte of hostile input does not become a megabyte of status message
    and event."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def matches(pattern: str, value: str) -> bool:
    """A whole-string match, as RE2 (the API server) reads `^...$`.

    Python's `$` also matches before a trailing newline, which would let `"debug\n"` through
    and split a directive line; fullmatch does not.
    """
    return re.fullmatch(pattern, value) is not None


def _strict(schema: Any) -> Any:
    r"""The CRD schema, made as strict in Python as the API server is, and stricter on typos.

    - Unknown fields (`replica:`) are errors where the schema lists properties: the API
      server prunes them silently, and a user of `up` has no such warning.
    - A pattern's closing `$` becomes `\Z`, because jsonschema applies patterns with Python's
      re.search, whose `$` accepts a trailing newline (RE2's does not).
    """
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if isinstance(out.get("pattern"), str) and out["pattern"].endswith("$"):
            out["pattern"] = out["pattern"][:-1] + r"\Z"
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


# JSON Schema counts 2.0 as an integer; the API server does not, and a float replica count
# would break arithmetic later. Booleans are not numbers either.
_StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    type_checker=jsonschema.Draft7Validator.TYPE_CHECKER.redefine_many({
        "integer": lambda _c, v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda _c, v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }),
)
_VALIDATORS: dict[str, jsonschema.protocols.Validator] = {}


def _validator(kind: str) -> jsonschema.protocols.Validator:
    if kind not in _VALIDATORS:
        schema = _strict(crd_schema.object_schema(kind))
        # status is the operator's to write; users' manifests may carry anything there.
        schema["properties"]["status"] = {"type": "object"}
        # metadata's schema restricts only the name; labels, uid and the rest stay open.
        schema["properties"]["metadata"].pop("additionalProperties", None)
        _VALIDATORS[kind] = _StrictValidator(schema)
    return _VALIDATORS[kind]


def _explain(error: jsonschema.ValidationError) -> ManifestError:
    field = _path(error.absolute_path)
    if error.validator == "pattern":
        return ManifestError(field, f"{_shown(error.instance)} is not allowed",
                             PATTERN_HINTS.get(str(error.validator_value).removesuffix(r"\Z")
                                               + "$", "see the CRD"))
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        known = ", ".join(sorted(error.schema.get("properties", {})))
        return ManifestError(_path([*error.absolute_path, extra[0]]) if extra else field,
                             "unknown field", f"known fields here: {known}")
    if error.validator in ("minimum", "maximum"):
        return ManifestError(field, f"{_shown(error.instance)} is out of range",
                             f"{error.validator} is {error.validator_value}")
    if error.validator == "type":
        return ManifestError(field, f"{_shown(error.instance)} is not of type "
                             f"{error.validator_value}", f"write a {error.validator_value}")
    if error.validator == "enum":
        return ManifestError(field, f"{_shown(error.instance)} is not one of "
                             f"{error.validator_value}")
    if error.validator == "required":
        present = error.instance if isinstance(error.instance, dict) else {}
        missing = [k for k in error.validator_value if k not in present]
        return ManifestError(_path([*error.absolute_path, missing[0]]) if missing else field,
                             "is required")
    if error.validator == "maxLength":
        return ManifestError(field, "is too long", f"at most {error.validator_value} characters")
    if error.validator == "not":
        refused = str(error.validator_value.get("pattern", "")).removesuffix(r"\Z") + "$"
        return ManifestError(field, f"{_shown(error.instance)} is not allowed",
                             REFUSED_HINTS.get(refused, "see the CRD"))
    if error.validator in ("minItems", "maxItems", "minProperties", "maxProperties"):
        return ManifestError(field, f"has {len(error.instance)} entries",
                             f"{error.validator} is {error.validator_value}")
    return ManifestError(field, error.message[:200])


def check_fragment(schema: dict[str, Any], value: Any, where: str) -> None:
    """Check part of a manifest written somewhere else (a site profile's `worker:`) against
    the CRD's sub-schema for it, exactly as strictly as validate() checks a manifest, so
    that what reaches a job script through the site configuration passes the same patterns.
    The ManifestError names the field under `where`, e.g. profiles.gpu.worker.queue."""
    errors = sorted(_StrictValidator(_strict(schema)).iter_errors(value),
                    key=lambda e: (len(e.absolute_path), _path(e.absolute_path)), reverse=True)
    if errors:
        exc = _explain(errors[0])
        field = where if exc.field == "<root>" else (
            where + exc.field if exc.field.startswith("[") else f"{where}.{exc.field}")
        raise ManifestError(field, exc.message, exc.fix)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill in schema defaults the way the API server does (objects present or defaulted)."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def parse_memory(value: str, field: str) -> int:
    try:
        n = parse_bytes(value)
    except (ValueError, TypeError) as exc:
        raise ManifestError(field, f"{_shown(value)} is not a memory size",
                            PATTERN_HINTS[crd_schema.MEMORY]) from exc
    if not 0 < n <= MAX_MEMORY:
        raise ManifestError(field, f"{_shown(value)} is out of range", "between 1KiB and 64TiB")
    return int(n)


def parse_walltime(value: str, field: str) -> int:
    m = re.match(r"^(?:(\d+)-)?(\d+):(\d\d):(\d\d)$", value)
    if not m:
        raise ManifestError(field, f"{_shown(value)} is not a walltime",
                            PATTERN_HINTS[crd_schema.WALLTIME])
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if not 0 < total <= MAX_WALLTIME_S:
        raise ManifestError(field, f"{_shown(value)} is out of range",
                            "between 00:00:01 and 365 days")
    return total


def _check_worker(worker: dict[str, Any], field: str) -> None:
    parse_memory(worker["memory"], f"{field}.memory")
    parse_walltime(worker["walltime"], f"{field}.walltime")
    if worker["processes"] > worker["cores"]:
        raise ManifestError(f"{field}.processes",
                            f"{worker['processes']} processes exceed {worker['cores']} cores",
                            "each process needs at least one core: lower processes or raise cores")
    for name in worker.get("resources", {}):
        if not matches(crd_schema.RESOURCE_NAME, name):
            raise ManifestError(f"{field}.resources.{name}", "is not a valid resource name",
                                "use letters, digits and '_', starting with a letter")
    cuda = worker.get("cuda", {})
    if cuda.get("enabled") and worker["gpus"] < 1:
        raise ManifestError(f"{field}.gpus", "cuda.enabled needs GPUs", "set gpus: 1 or more")
    for key in ("rmmPoolSize", "deviceMemoryLimit"):
        if key in cuda:
            parse_memory(cuda[key], f"{field}.cuda.{key}")
    _check_env(worker.get("env", []), f"{field}.env")


def _check_env(env: list[dict[str, str]], field: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(env):
        if item["name"] in seen:
            raise ManifestError(f"{field}[{i}].name", f"{item['name']} is set twice")
        seen.add(item["name"])


def _check_allocation(worker: dict[str, Any], field: str) -> None:
    """In one MPI allocation each task runs one plain dask-mpi worker: what a worker
    template asks beyond that cannot be honoured, so it is refused, not ignored."""
    if (worker.get("cuda") or {}).get("enabled"):
        raise ManifestError(f"{field}.cuda.enabled", "GPU (dask-cuda) workers cannot run in "
                            "one MPI allocation", "use mode: jobs, or a DaskWorkerGroup for GPUs")
    if worker.get("workerArgs"):
        raise ManifestError(f"{field}.workerArgs", "is not used in an MPI allocation",
                            "remove it, or use mode: jobs")
    if worker["processes"] != 1:
        raise ManifestError(f"{field}.processes", "an MPI allocation runs one worker per task",
                            "set processes: 1 and raise replicas instead")


def _check_tls(spec: dict[str, Any], field: str, allocation: bool) -> None:
    """TLS (tls.py) is all or nothing: a scheduler started with certificates requires
    encryption on every connection, so it cannot also serve plain listeners, and every
    process must get the cluster's credentials."""
    scheduler = spec["scheduler"]
    extra = scheduler.get("extraProtocols") or []
    if scheduler["protocol"] != "tls":
        if "tls" in extra:
            raise ManifestError(f"{field}.scheduler.extraProtocols",
                                "tls needs the cluster's certificates on every listener",
                                "set scheduler.protocol: tls instead (and no other listener)")
        return
    if allocation:
        raise ManifestError(f"{field}.scheduler.protocol", "TLS is not available in one MPI "
                            "allocation (dask-mpi starts its scheduler and workers without "
                            "certificates)", "use protocol: tcp, or mode: jobs for TLS")
    plain = [p for p in extra if p != "tls"]
    if plain:
        raise ManifestError(f"{field}.scheduler.extraProtocols", f"{plain[0]} next to tls: "
                            "a TLS scheduler refuses unencrypted connections",
                            f"remove {plain[0]}, or use protocol: {plain[0]} without TLS")
    cuda = spec["worker"].get("cuda") or {}
    if cuda.get("enabled") and cuda.get("protocol"):
        raise ManifestError(f"{field}.worker.cuda.protocol", "a TLS cluster's workers all "
                            "connect over tls", "remove cuda.protocol (GPU workers then use "
                            "tls), or use scheduler.protocol: tcp or ucx")


def check_cluster_spec(spec: dict[str, Any], field: str = "spec",
                       allocation: bool = False) -> None:
    allocation = allocation or spec.get("mode") == "allocation"
    _check_tls(spec, field, allocation)
    if allocation:
        _check_allocation(spec["worker"], f"{field}.worker")
    scheduler = spec["scheduler"]
    parse_memory(scheduler["memory"], f"{field}.scheduler.memory")
    parse_walltime(scheduler["walltime"], f"{field}.scheduler.walltime")
    _check_env(scheduler.get("env", []), f"{field}.scheduler.env")
    _check_worker(spec["worker"], f"{field}.worker")


def validate(manifest: Manifest) -> Manifest:
    """Return a defaulted deep copy of a valid manifest; raise ManifestError otherwise."""
    if not isinstance(manifest, dict):
        raise ManifestError("<root>", "a manifest must be a mapping")
    kind = manifest.get("kind")
    if kind not in crd_schema.ALL_KINDS:
        raise ManifestError("kind", f"{_shown(kind)} is not a dask-hpc kind",
                            "one of " + ", ".join(crd_schema.ALL_KINDS))
    if manifest.get("apiVersion") != API_VERSION:
        raise ManifestError("apiVersion", f"{_shown(manifest.get('apiVersion'))} is not served",
                            f"use {API_VERSION}")
    metadata = manifest.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ManifestError("metadata", "must be a mapping", "write metadata: {name: ...}")
    for key, default in (("name", ""), ("namespace", "default")):
        value = metadata.get(key, default)
        if not isinstance(value, str) or len(value) > 63 \
                or not matches(crd_schema.DNS_LABEL, value):
            raise ManifestError(f"metadata.{key}", f"{_shown(value)} is not a valid {key}",
                                PATTERN_HINTS[crd_schema.DNS_LABEL] + ", at most 63 characters")
    # The API server assigns uids; `dask-hpc render` takes one from the file. It becomes a
    # path component and part of every job's identity comment.
    if "uid" in metadata and not (isinstance(metadata["uid"], str)
                                  and matches(UID, metadata["uid"])):
        raise ManifestError("metadata.uid", f"{_shown(metadata['uid'])} is not a uid",
                            "leave metadata.uid out: the API server (or `dask-hpc up`) sets it")
    errors = sorted(_validator(kind).iter_errors(manifest),
                    key=lambda e: (len(e.absolute_path), _path(e.absolute_path)), reverse=True)
    if errors:
        raise _explain(errors[0])
    result = copy.deepcopy(manifest)
    apply_defaults(crd_schema.object_schema(kind), result)
    spec = result["spec"]
    if kind == KIND_JOB:
        job = spec["job"]
        if ("command" in job) == ("script" in job):
            raise ManifestError("spec.job", "set exactly one of command or script")
        parse_memory(job["memory"], "spec.job.memory")
        parse_walltime(job["walltime"], "spec.job.walltime")
        spec.setdefault("cluster", {})
        apply_defaults(crd_schema.cluster_spec_schema(), spec["cluster"])
        check_cluster_spec(spec["cluster"], "spec.cluster", spec["mode"] == "allocation")
    elif "worker" in spec and "scheduler" in spec:
        check_cluster_spec(spec)
    elif "worker" in spec:
        if metadata.get("name") in RESERVED_GROUP_NAMES:
            raise ManifestError(
                "metadata.name", f"{metadata['name']!r} is reserved: a cluster's own workers "
                f"(spec.worker) are its group {DEFAULT_GROUP_NAME!r}, and 'scheduler' and "
                "'allocation' name its scheduler's job in job names and usage",
                "give the DaskWorkerGroup another name, e.g. gpu or big-memory")
        _check_worker(spec["worker"], "spec.worker")
    elif kind != KIND_JOB and "minimum" in spec and spec["minimum"] > spec["maximum"]:
        raise ManifestError("spec.minimum", "exceeds spec.maximum", "lower minimum")
    return result
