"""The OpenAPI schemas of the four custom resources, built once in Python.

Why Python and not hand-written YAML: the worker template appears in DaskCluster,
DaskWorkerGroup and DaskJob, and the string patterns that keep job scripts safe must be the
same everywhere. `crds/*.yaml` (what the Helm chart ships) is rendered from here by
`dask-hpc crds --write crds/`, a unit test fails when the two differ, and the operator
validates manifests against these same schemas at run time (`validation.py`), so the API
server's check and the operator's own check can never drift apart.
"""

from __future__ import annotations

from typing import Any

from .constants import (
    CATEGORY,
    GROUP,
    KIND_AUTOSCALER,
    KIND_CLUSTER,
    KIND_JOB,
    KIND_WORKER_GROUP,
    NAMES,
    VERSION,
)

Schema = dict[str, Any]

# --- patterns: every string that can reach a job script or a command line -----------------
# Kubernetes evaluates `pattern` with RE2 and the operator with Python's `re`; these use only
# the common subset (classes, anchors, bounded repeats).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SAFE_TOKEN = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$"  # queue, account, profile
MEMORY = r"^[0-9]+(\.[0-9]+)?[KMGTPkmgtp][iI]?[Bb]?$"  # 16GiB, 16GB, 16G, 512MiB
WALLTIME = r"^([0-9]{1,3}-)?[0-9]{1,4}:[0-5][0-9]:[0-5][0-9]$"  # HH:MM:SS or D-HH:MM:SS
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# One line, quoted later: no newline, NUL or escape, no C1 control (U+0085 NEL is a line
# break to some readers) and no Unicode line or paragraph separator. RE2 has no `\u` escape
# and Python's `re` no `\x{...}`, so U+2028 and U+2029 are in the class as themselves.
NO_CONTROL_CHARS = r"^[^\x00-\x1f\x7f-\x9f" + "\u2028\u2029" + r"]*$"
# A prologue line is a simple command (`module load cuda/12.2`, `source /opt/env.sh`): no
# separators, redirections, substitutions or quotes, so it cannot add directives or chain
# commands. Anything richer belongs in a site profile, which the administrator owns.
PROLOGUE_LINE = r"^[A-Za-z0-9_./:=@%+,~ -]*$"
# One directive: a long option with its value after `=` or one space, or ONE short option
# letter with its value after one space (--constraint=haswell, -C a100, -l storage=x/ab12).
# Not `-Ho/etc/x` (getopt reads clustered letters as -H -o /etc/x) and no value that starts
# with '-' after a space (after an option without argument it is read as the next option).
DIRECTIVE = (r"^(--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.:,/@%+=-]+| [A-Za-z0-9_.:,/@%+=]"
             r"[A-Za-z0-9_.:,/@%+=-]*)?|-[A-Za-z]( [A-Za-z0-9_.:,/@%+=][A-Za-z0-9_.:,/@%+=-]*)?)$")
# Directives that stay the operator's, whatever the batch system (SLURM and PBS letters
# both): who the job runs as (--uid, --gid, --get-user-env, PBS -u), where its output and
# working directory go (--output/-o, --error/-e, --input/-i, --chdir/-D, the old --workdir),
# its identity and environment (--comment, --job-name/-J, --array/-a, --export, PBS -v/-V,
# which carry the identity the operator adopts jobs by), what runs (--wrap, PBS -S shell)
# and whether the submit command returns at all (--wait/-W, PBS -W block=true, -I; PBS -W
# also sets any job attribute by name). SLURM's `-C` (--constraint) stays allowed: PBS's
# `-C` (directive prefix) takes effect only on qsub's command line, since qsub has chosen
# the prefix before it reads the script's directives. Nor may a job go to another
# cluster or server (SLURM --clusters, --cluster-constraint; PBS -q queue@server): the
# operator lists only its own, so it would never see the job and would submit it again
# every period. SLURM's -M (--clusters) is refused where the backend is known
# (policy.admit): PBS's -M is the mail recipients' list.
DENIED_LONG_DIRECTIVES = ("array", "chdir", "clusters", "cluster-constraint", "comment",
                          "error", "export-file", "get-user-env", "gid", "input", "job-name",
                          "output", "uid", "wait", "workdir", "wrap")
DENIED_SHORT_DIRECTIVES = "aDeIiJoSuVvW"


def _prefixes(name: str) -> str:
    """Every non-empty prefix of a long option name (`uid` -> `u(i(d)?)?`): sbatch reads
    directives with getopt_long, which takes any unambiguous abbreviation (`--out=` is
    `--output=`), so a refused name must be refused abbreviated too."""
    regex = ""
    for char in reversed(name[1:]):
        regex = f"({char}{regex})?"
    return name[0] + regex


DENIED_DIRECTIVE = ("^(--(" + "|".join(map(_prefixes, DENIED_LONG_DIRECTIVES))
                    + ")([= ].*)?|-[" + DENIED_SHORT_DIRECTIVES + "]( .*)?|-q .*@.*)$")
ARG_TOKEN = r"^[A-Za-z0-9_.:,/@%+=-]+$"  # one argv element of the worker command
RESOURCE_NAME = r"^[A-Za-z][A-Za-z0-9_]*$"
PATH = r"^/[A-Za-z0-9_./@%+=-]*$"  # absolute, no spaces or metacharacters

PROTOCOLS = ["tcp", "tls", "ucx", "ws", "wss"]  # what distributed can listen on
MAX_REPLICAS = 10_000
MAX_CORES = 4096
MAX_PROCESSES = 256
MAX_GPUS = 64
MAX_IDLE_TIMEOUT = 30 * 24 * 3600
# What a cluster does when its scheduler job ends (spec.scheduler.onFailure): Fail keeps
# the cluster Failed (its workers are cancelled); Restart submits a new scheduler and new
# workers, at most maxRestarts times (planning.SchedulerRecovery).
ON_FAILURE = ["Fail", "Restart"]
DEFAULT_MAX_RESTARTS = 3
MAX_RESTARTS = 1000


def _string(pattern: str, max_length: int, description: str, **extra: Any) -> Schema:
    return {
        "type": "string",
        "pattern": pattern,
        "maxLength": max_length,
        "description": description,
        **extra,
    }


def _int(minimum: int, maximum: int, description: str, **extra: Any) -> Schema:
    return {
        "type": "integer",
        "minimum": minimum,
        "maximum": maximum,
        "description": description,
        **extra,
    }


def _env() -> Schema:
    return {
        "type": "array",
        "description": "Environment variables exported in the job script (values are quoted).",
        "maxItems": 128,
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": _string(ENV_NAME, 128, "Variable name."),
                "value": _string(NO_CONTROL_CHARS, 4096, "Value, exported single-quoted.",
                                 default=""),
            },
        },
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    }


def _memory(description: str, **extra: Any) -> Schema:
    return _string(MEMORY, 32, description + " (e.g. 16GiB, 512MiB).", **extra)


def _walltime(description: str, **extra: Any) -> Schema:
    return _string(WALLTIME, 16, description + " (HH:MM:SS or D-HH:MM:SS).", **extra)


def _batch_placement() -> Schema:
    """Fields every batch job has: where it queues and who pays."""
    return {
        "queue": _string(SAFE_TOKEN, 64, "Partition (SLURM) or queue (PBS)."),
        "account": _string(SAFE_TOKEN, 64, "Account (SLURM -A) or project (PBS -P)."),
    }


def worker_template_schema() -> Schema:
    cuda = {
        "type": "object",
        "description": "Run `dask cuda worker` (one worker per GPU) instead of `dask worker`.",
        "properties": {
            "enabled": {"type": "boolean", "default": False},
            "rmmPoolSize": _memory("RMM pool per GPU"),
            "deviceMemoryLimit": _memory("Spill from device memory above this"),
            "protocol": {"type": "string", "enum": ["ucx", "tcp"],
                         "description": "Protocol of the GPU workers; default: the "
                                        "scheduler's. The scheduler must listen on it."},
        },
    }
    return {
        "type": "object",
        "description": "A worker group: how many batch jobs, and what each job asks for.",
        "default": {},
        "properties": {
            "replicas": _int(0, MAX_REPLICAS, "Number of worker jobs.", default=1),
            "cores": _int(1, MAX_CORES, "Cores per job (threads are cores/processes).",
                          default=1),
            "memory": _memory("Memory per job", default="4GiB"),
            "processes": _int(1, MAX_PROCESSES, "Dask worker processes per job.", default=1),
            "walltime": _walltime("Walltime per job", default="01:00:00"),
            **_batch_placement(),
            "gpus": _int(0, MAX_GPUS, "GPUs per job.", default=0),
            "env": _env(),
            **_job_site_lines("worker"),
            "workerArgs": {
                "type": "array",
                "description": "Extra arguments to the dask worker command, one token each.",
                "maxItems": 64,
                "items": _string(ARG_TOKEN, 256, "One argument."),
            },
            "resources": {
                "type": "object",
                "description": "Dask abstract resources of each worker, e.g. {GPU: 1}.",
                "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1e9},
                "maxProperties": 32,
                "x-kubernetes-validations": [{
                    "rule": f"self.all(k, k.matches('{RESOURCE_NAME}'))",
                    "message": "resource names are letters, digits and underscores",
                }],
            },
            "cuda": cuda,
            "packing": {
                "type": "string", "enum": ["auto", "array", "single"], "default": "auto",
                "description": "How a scale-up is submitted: array = one job array for all "
                               "new workers; single = one job each; auto = array where the "
                               "batch system has arrays.",
            },
        },
        "x-kubernetes-validations": [{
            "rule": "!has(self.processes) || !has(self.cores) || self.processes <= self.cores",
            "message": "processes must not exceed cores",
        }, {
            "rule": "!has(self.cuda) || !has(self.cuda.enabled) || !self.cuda.enabled "
                    "|| (has(self.gpus) && self.gpus >= 1)",
            "message": "cuda.enabled needs gpus >= 1",
        }],
    }


def _job_site_lines(who: str) -> dict[str, Schema]:
    """What a site may require of every job: set-up commands and batch directives (NCI Gadi
    jobs, the scheduler's included, see /scratch only with `-l storage=...`)."""
    return {
        "prologue": {
            "type": "array",
            "description": f"Simple commands run before the {who} starts (module load ...).",
            "maxItems": 64,
            "items": _string(PROLOGUE_LINE, 512, "One command line."),
        },
        "extraDirectives": {
            "type": "array",
            "description": "Extra batch directives, e.g. --constraint=haswell (SLURM) or "
                           "-l storage=scratch/ab12 (PBS).",
            "maxItems": 64,
            "items": _string(DIRECTIVE, 256, "One directive without the #SBATCH/#PBS prefix.",
                             **{"not": {"pattern": DENIED_DIRECTIVE}}),
        },
    }


def scheduler_schema(recovery: bool = True) -> Schema:
    return {
        "type": "object",
        "description": "The Dask scheduler's own batch job.",
        "default": {},
        "properties": {
            "cores": _int(1, MAX_CORES, "Cores of the scheduler job.", default=1),
            "memory": _memory("Memory of the scheduler job", default="2GiB"),
            "walltime": _walltime("Walltime of the scheduler job", default="01:00:00"),
            **_batch_placement(),
            "protocol": {"type": "string", "enum": PROTOCOLS[:3], "default": "tcp"},
            "extraProtocols": {
                "type": "array",
                "description": "More listeners, e.g. [ucx] for GPU worker groups of a "
                               "cluster whose CPU workers use tcp.",
                "maxItems": 4,
                "items": {"type": "string", "enum": PROTOCOLS},
            },
            "env": _env(),
            **_job_site_lines("scheduler"),
            "onFailure": {
                "type": "string", "enum": ON_FAILURE if recovery else ON_FAILURE[:1],
                "default": ON_FAILURE[0],
                "description": "When the scheduler job ends (killed, node failure, "
                               "walltime): Fail = the cluster is Failed and its workers are "
                               "cancelled; Restart = its workers are cancelled and a new "
                               "scheduler and new workers are submitted (at most maxRestarts "
                               "times). Work in progress is lost either way." if recovery
                               else "Always Fail in a DaskJob: its command's client is "
                               "connected to the one scheduler, and a new scheduler would "
                               "not have the command's work.",
            },
            "maxRestarts": _int(0, MAX_RESTARTS, "With onFailure: Restart, how many times "
                                "the scheduler is restarted before the cluster is Failed.",
                                default=DEFAULT_MAX_RESTARTS),
        },
    }


def cluster_spec_schema(recovery: bool = True) -> Schema:
    """A DaskCluster's spec; in a DaskJob's `spec.cluster` (`recovery=False`) the scheduler
    is never restarted (scheduler.onFailure may only be Fail)."""
    return {
        "type": "object",
        "properties": {
            "backend": {
                "type": "string",
                "enum": ["slurm", "pbs", "local"],
                "description": "Batch system; empty means the operator's configured default.",
            },
            "profile": _string(SAFE_TOKEN, 64, "A profile of the site configuration: "
                               "queue, account, env, prologue and extraDirectives the "
                               "scheduler, the workers (and a DaskJob's runner) get where "
                               "this spec leaves them unset (lines and env are added)."),
            "mode": {
                "type": "string", "enum": ["jobs", "allocation"], "default": "jobs",
                "description": "jobs: the scheduler and each worker group in batch jobs of "
                               "their own (scalable); allocation: the scheduler and "
                               "worker.replicas workers inside ONE batch allocation (MPI, "
                               "fixed size, ends with its walltime or on delete).",
            },
            "idleTimeout": _int(0, MAX_IDLE_TIMEOUT, "Seconds without tasks before the "
                                "cluster deletes itself; 0 = never.", default=0),
            "scheduler": scheduler_schema(recovery),
            "worker": worker_template_schema(),
            "diagnostics": {
                "type": "object",
                "description": "What the scheduler records beyond the computation history.",
                "properties": {
                    "performanceReport": {
                        "type": "boolean", "default": False,
                        "description": "Write Dask's performance report (task stream, "
                                       "profiles, bandwidth) of every computation to "
                                       "<staging>/reports/, kept with the history and linked "
                                       "from `dask-hpc report`. Needs bokeh on the "
                                       "scheduler's Python.",
                    },
                },
            },
        },
    }


def _condition_list() -> Schema:
    return {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "status": {"type": "string"},
                "reason": {"type": "string"},
                "message": {"type": "string"},
                "lastTransitionTime": {"type": "string"},
            },
        },
    }


def _workers_status() -> Schema:
    return {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in ("desired", "pending", "running", "ready")},
    }


def _status(properties: Schema) -> Schema:
    # Unknown fields are kept so that a newer operator's status survives a rollback.
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "phase": {"type": "string"},
            "observedGeneration": {"type": "integer"},
            "message": {"type": "string"},
            "conditions": _condition_list(),
            **properties,
        },
    }


def _group_status() -> Schema:
    return _status({
        "replicas": {"type": "integer"},
        "workers": _workers_status(),
        "resources": {"type": "array", "items": {"type": "string"}},
    })


def _usage_totals(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "properties": {
            "jobs": {"type": "integer", "description": "Batch jobs counted."},
            "coreHours": {"type": "number", "description": "Cores x run time, in hours."},
            "gpuHours": {"type": "number", "description": "GPUs x run time, in hours."},
            "runSeconds": {"type": "number", "description": "Run time of all jobs, summed."},
            "queueWaitSeconds": {"type": "number",
                                 "description": "Queue wait (start - submit), SUMMED over "
                                                "the jobs."},
            "meanQueueWaitSeconds": {"type": "number",
                                     "description": "Mean queue wait per job."},
        },
    }


def _usage_status() -> Schema:
    schema = _usage_totals("What the cluster's batch jobs (and its DaskWorkerGroups') used, "
                           "from the batch system's accounting, updated every usageInterval.")
    schema["properties"].update({
        "byGroup": {"type": "object", "description": "The same per worker group (the "
                    "scheduler's job: `scheduler`).",
                    "additionalProperties": _usage_totals("One group's jobs.")},
        "source": {"type": "string", "description": "Where run times and cores came from: "
                   "sacct, sacct-completion (no slurmdbd), qstat, local or requested (the "
                   "job request, where the batch system had no record); several joined by +."},
        "gpuSource": {"type": "string", "description": "Where GPU counts came from: the "
                      "batch system's name, or requested (sacct -c records no GPUs); none "
                      "without GPUs."},
        "final": {"type": "boolean", "description": "Every job ended and its figures are "
                  "final."},
        "updatedAt": {"type": "string", "description": "When the batch system was last "
                      "asked; running jobs are counted up to then."},
    })
    return schema


def _column(name: str, path: str, type_: str = "string", priority: int = 0,
            description: str = "") -> Schema:
    col: Schema = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        col["priority"] = priority
    if description:
        col["description"] = description
    return col


AGE = _column("Age", ".metadata.creationTimestamp", "date")

SCALE = {
    "specReplicasPath": ".spec.worker.replicas",
    "statusReplicasPath": ".status.replicas",
}


def _specs() -> dict[str, tuple[Schema, Schema, list[Schema], Schema | None]]:
    """kind -> (spec schema, status schema, printer columns, scale subresource)."""
    cluster_spec = cluster_spec_schema()
    cluster_status = _group_status()
    cluster_status["properties"].update({
        "schedulerAddress": {"type": "string"},
        "dashboardURL": {"type": "string"},
        "schedulerJobId": {"type": "string"},
        "backend": {"type": "string"},
        "stagingDirectory": {"type": "string"},
        "tls": {
            "type": "object",
            "description": "protocol tls: where the cluster's credentials are. Connect with "
                           "Client(address, security=Security(tls_ca_file=caFile, "
                           "tls_client_cert=certFile, tls_client_key=keyFile, "
                           "require_encryption=True)), from the files or from the Secret "
                           "secretName (keys ca.crt, tls.crt, tls.key).",
            "properties": {k: {"type": "string"}
                           for k in ("caFile", "certFile", "keyFile", "secretName")},
        },
        "schedulerRestarts": {"type": "integer"},
        "usage": _usage_status(),
    })
    group_spec = {
        "type": "object",
        "required": ["cluster"],
        "properties": {
            "cluster": _string(DNS_LABEL, 63, "Name of the DaskCluster in the same namespace."),
            "profile": _string(SAFE_TOKEN, 64, "A profile of the site configuration for this "
                               "group's workers; unset: the cluster's spec.profile."),
            "worker": worker_template_schema(),
        },
    }
    job_spec = {
        "type": "object",
        "required": ["job"],
        "properties": {
            "mode": {"type": "string", "enum": ["cluster", "allocation"], "default": "cluster",
                     "description": "cluster: a DaskCluster owned by the job plus a runner job "
                                    "for the command; allocation: ONE MPI allocation whose "
                                    "tasks are the scheduler, the command and "
                                    "cluster.worker.replicas workers."},
            "job": {
                "type": "object",
                "description": "The runner: `command` (argv) or `script` (Python source).",
                "properties": {
                    "command": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 256,
                        "items": _string(NO_CONTROL_CHARS, 4096, "One argv element, quoted."),
                    },
                    "script": {"type": "string", "maxLength": 1_000_000,
                               "description": "Python source, written to a file and run."},
                    "cores": _int(1, MAX_CORES, "Cores of the runner.", default=1),
                    "memory": _memory("Memory of the runner", default="2GiB"),
                    "walltime": _walltime("Walltime of the runner", default="01:00:00"),
                    **_batch_placement(),
                    "env": _env(),
                    "workingDir": _string(PATH, 4096, "Absolute working directory."),
                },
                "x-kubernetes-validations": [{
                    "rule": "has(self.command) != has(self.script)",
                    "message": "set exactly one of command or script",
                }],
            },
            "cluster": cluster_spec_schema(recovery=False),
        },
    }
    job_status = _status({
        "clusterName": {"type": "string"},
        "jobId": {"type": "string"},
        "startTime": {"type": "string"},
        "endTime": {"type": "string"},
        "exitCode": {"type": "integer"},
        "outputFile": {"type": "string"},
    })
    autoscaler_spec = {
        "type": "object",
        "required": ["cluster", "maximum"],
        "properties": {
            "cluster": _string(DNS_LABEL, 63, "Name of the DaskCluster."),
            "workerGroup": _string(DNS_LABEL, 63, "Worker group to scale.", default="default"),
            "minimum": _int(0, MAX_REPLICAS, "Fewest worker jobs.", default=0),
            "maximum": _int(0, MAX_REPLICAS, "Most worker jobs."),
            "scaleDownDelay": _int(0, 86_400, "Seconds of surplus before scaling down.",
                                   default=60),
        },
        "x-kubernetes-validations": [{
            "rule": "self.minimum <= self.maximum",
            "message": "minimum must not exceed maximum",
        }],
    }
    autoscaler_status = _status({
        "desiredWorkers": {"type": "integer"},
        "lastScaleTime": {"type": "string"},
    })
    return {
        KIND_CLUSTER: (cluster_spec, cluster_status, [
            _column("Phase", ".status.phase"),
            _column("Ready", ".status.workers.ready", "integer", description="Workers connected"),
            _column("Desired", ".spec.worker.replicas", "integer"),
            _column("Scheduler", ".status.schedulerAddress"),
            _column("Backend", ".status.backend", priority=1),
            _column("Dashboard", ".status.dashboardURL", priority=1),
            AGE,
        ], SCALE),
        KIND_WORKER_GROUP: (group_spec, _group_status(), [
            _column("Cluster", ".spec.cluster"),
            _column("Phase", ".status.phase"),
            _column("Ready", ".status.workers.ready", "integer"),
            _column("Desired", ".spec.worker.replicas", "integer"),
            AGE,
        ], SCALE),
        KIND_JOB: (job_spec, job_status, [
            _column("Mode", ".spec.mode"),
            _column("Phase", ".status.phase"),
            _column("Job", ".status.jobId"),
            _column("Exit", ".status.exitCode", "integer"),
            AGE,
        ], None),
        KIND_AUTOSCALER: (autoscaler_spec, autoscaler_status, [
            _column("Cluster", ".spec.cluster"),
            _column("Group", ".spec.workerGroup"),
            _column("Min", ".spec.minimum", "integer"),
            _column("Max", ".spec.maximum", "integer"),
            _column("Desired", ".status.desiredWorkers", "integer"),
            AGE,
        ], None),
    }


def object_schema(kind: str) -> Schema:
    """The openAPIV3Schema of one kind (what the API server validates against)."""
    spec, status, _, _ = _specs()[kind]
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # The one part of metadata a CRD may restrict: names become job names and path
            # components (the API server alone would allow dots and 253 characters).
            "metadata": {"type": "object", "properties": {
                "name": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}}},
            "spec": spec,
            "status": status,
        },
    }


def crd(kind: str) -> Schema:
    plural, singular, short_names = NAMES[kind]
    _, _, columns, scale = _specs()[kind]
    subresources: Schema = {"status": {}}
    if scale is not None:
        subresources["scale"] = dict(scale)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": [CATEGORY],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": object_schema(kind)},
                "subresources": subresources,
                "additionalPrinterColumns": columns,
            }],
        },
    }


ALL_KINDS = (KIND_CLUSTER, KIND_WORKER_GROUP, KIND_JOB, KIND_AUTOSCALER)
