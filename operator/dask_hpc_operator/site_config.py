"""The administrator's site configuration: one YAML file (a ConfigMap in the chart).

Everything here may reach a job script or a command line (python path, prologue, staging
directory, submit prefix), so it is checked as strictly as users' manifests: an
administrator's typo should fail at start-up with the key named, not in a job script.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import crd_schema
from .validation import matches

if TYPE_CHECKING:
    from .policy import NamespacePolicy
    from .profiles import Profile

BACKENDS = ("slurm", "pbs", "local")


class ConfigError(ValueError):
    pass


def default_staging_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return os.path.join(base, "dask-hpc")


@dataclass(frozen=True)
class SiteConfig:
    backend: str = "local"
    # On a filesystem shared by the operator's host and the compute nodes: scheduler files,
    # logs and (for the local backend) job state live here.
    staging_dir: str = field(default_factory=default_staging_dir)
    python: str = sys.executable  # interpreter on the compute nodes
    prologue: tuple[str, ...] = ()  # site-wide lines before every job (module load ...)
    submit_prefix: tuple[str, ...] = ()  # e.g. ("ssh", "login1") or ("sudo", "-u", "alice")
    poll_interval: float = 5.0  # seconds between reconciles of one resource
    min_poll_interval: float = 2.0  # floor between two batch-system queries
    command_timeout: float = 60.0
    worker_death_timeout: int = 900
    scheduler_timeout: float = 600.0  # how long a running scheduler job may take to write its file
    squeue_all_users: bool = False
    # Worker jobs failing in a row: the k-th retry waits failureBackoffBase · 2^(k-1) s (at
    # most failureBackoffMax) after the last failure; failureLimit failures stop retrying
    # until the spec changes or a worker job succeeds (planning.FailurePolicy).
    failure_backoff_base: float = 5.0
    failure_backoff_max: float = 300.0
    failure_limit: int = 5
    # How an allocation starts its MPI tasks; empty: the `mpiexec` beside `python` (the
    # mpich wheel's, which finds SLURM's and PBS's node lists itself). E.g. [srun, --mpi=pmix].
    mpi_launcher: tuple[str, ...] = ()
    # The operator's Prometheus endpoint (/metrics); 0 = none. Not 8080, which kopf's
    # liveness endpoint conventionally takes. `dask-hpc operator --metrics-port` overrides it.
    metrics_port: int = 8000
    # PBS servers differ: Job_Name limit (15 on older servers), whether job arrays are
    # allowed at all (NCI Gadi: no) and the server's max_array_size (0: no limit known).
    # Seconds between orphan sweeps (jobs whose resource no longer exists are cancelled);
    # 0 = never. Only the operator sweeps, never `dask-hpc up`.
    sweep_interval: float = 300.0
    # Seconds between two usage-accounting queries (sacct / qstat -x) for all clusters of a
    # backend; finished jobs are asked once (hpc_bridge.accounting).
    usage_interval: float = 60.0
    pbs_job_name_limit: int = 15
    pbs_arrays: bool = True
    pbs_max_array_size: int = 0
    # Per-namespace policy (policy.py): namespace or "*" -> what its manifests may ask for
    # and whose name its jobs run under. Empty: no policy, anything valid is accepted.
    namespaces: dict[str, NamespacePolicy] = field(default_factory=dict, hash=False)
    # Named profiles (profiles.py): name -> queue, account, env, prologue and
    # extraDirectives for the scheduler, worker and job (runner) of a manifest whose
    # spec.profile names it, where the manifest leaves them unset (lines and env are added).
    profiles: dict[str, Profile] = field(default_factory=dict, hash=False)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> SiteConfig:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in (data or {}).items():
            if not isinstance(key, str):  # YAML reads `1:` or `true:` as a non-string key
                raise ConfigError(f"site config: key {key!r} is not a name; known keys: "
                                  + ", ".join(sorted(_camel(k) for k in known)))
            attr = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()  # stagingDir -> staging_dir
            if attr not in known:
                raise ConfigError(f"site config: unknown key {key!r}; known keys: "
                                  + ", ".join(sorted(_camel(k) for k in known)))
            if attr in ("prologue", "submit_prefix", "mpi_launcher"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"site config: {key} must be a list of strings")
                value = tuple(value)
            elif attr == "namespaces":
                from .policy import parse_namespaces  # policy imports this module

                value = parse_namespaces(value)
            elif attr == "profiles":
                from .profiles import parse_profiles  # its errors are this module's

                value = parse_profiles(value)
            else:
                _check_type(key, value, known[attr].default)
            kwargs[attr] = value
        config = cls(**kwargs)
        config.check()
        return config

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None) -> SiteConfig:
        if path is None:
            env = os.environ.get("DASK_HPC_CONFIG")
            if not env:
                return cls.from_mapping({})
            path = env
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"site config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"site config {path}: expected a mapping at the top level")
        return cls.from_mapping(data)

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"site config: backend {self.backend!r} is not one of {BACKENDS}")
        for key in ("staging_dir", "python"):
            value = getattr(self, key)
            if not isinstance(value, str) or not matches(crd_schema.PATH, value):
                raise ConfigError(f"site config: {_camel(key)} {value!r} must be an absolute "
                                  "path without spaces or shell metacharacters")
        for line in self.prologue:
            if not isinstance(line, str) or not matches(crd_schema.PROLOGUE_LINE, line):
                raise ConfigError(f"site config: prologue line {line!r} is not a simple command")
        for word in self.mpi_launcher:
            if not matches(crd_schema.ARG_TOKEN, word):
                raise ConfigError(f"site config: mpiLauncher word {word!r} must be one "
                                  "argument without spaces or shell metacharacters")
        if self.min_poll_interval <= 0 or self.poll_interval < self.min_poll_interval:
            raise ConfigError("site config: pollInterval must be >= minPollInterval > 0")
        if self.pbs_job_name_limit < 8:
            raise ConfigError("site config: pbsJobNameLimit must be at least 8 (PBS Pro 13+ "
                              "allows 236, older servers 15)")
        if self.metrics_port > 65535:
            raise ConfigError("site config: metricsPort must be a TCP port (0 = no metrics "
                              "endpoint)")
        if self.failure_limit < 1 or self.failure_backoff_max < self.failure_backoff_base:
            raise ConfigError("site config: failureLimit must be >= 1 and failureBackoffMax "
                              ">= failureBackoffBase")


def _check_type(key: str, value: Any, default: Any) -> None:
    """Numbers and switches must be what they look like: `workerDeathTimeout: 15m` would
    otherwise reach every worker's command line."""
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number of seconds"
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"site config: {key} is {value!r}; expected {expected}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"site config: {key} must not be negative")


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p.title() for p in rest)
