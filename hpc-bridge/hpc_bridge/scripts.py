"""Job scripts, rendered by dask-jobqueue's Job classes.

Using dask-jobqueue (rather than our own templates) means a site's existing `jobqueue.yaml`
keeps applying (its `job-directives-skip`, `shebang`, `interface`...), and its header logic
for SLURM/PBS resources is the one thousands of users already rely on.

dask-jobqueue joins the worker command with plain spaces and writes directives verbatim, so
it does not quote. Everything user-supplied that reaches it has been pattern-checked by the
caller (see dask_hpc_operator.validation), and everything this module adds itself — paths,
env values — is quoted with `shlex.quote` here.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from typing import Any

import dask.config
from dask.utils import parse_bytes
from dask_jobqueue.core import Job
from dask_jobqueue.local import LocalJob
from dask_jobqueue.pbs import PBSJob
from dask_jobqueue.slurm import SLURMJob

from .backends.pbs import array_directive, pbs_job_name
from .lifetime import Lifetime, worker_lifetime
from .model import (
    JobIdentity,
    JobRequest,
    JobTemplate,
    Role,
    RunnerCommand,
    TLSFiles,
    compress_ranges,
)

JOB_CLASSES: dict[str, type[Job]] = {"slurm": SLURMJob, "pbs": PBSJob, "local": LocalJob}


# Written next to the scheduler file and preloaded by the scheduler when it listens on more
# than one protocol: dask's own scheduler file records only the first listener, so this
# writes one file per listener (scheduler-ucx.json, ...) for the workers of that protocol.
LISTENERS_PRELOAD = """\
import json, os
from distributed.diagnostics.plugin import SchedulerPlugin


class WriteListenerFiles(SchedulerPlugin):
    name = "dask-hpc-listener-files"

    async def start(self, scheduler):
        here = os.path.dirname(os.path.abspath(__file__))
        for listener in scheduler.listeners:
            address = listener.contact_address
            protocol = address.split("://", 1)[0]
            info = dict(scheduler.identity(n_workers=0), address=address)
            path = os.path.join(here, "scheduler-%s.json" % protocol)
            with open(path + ".tmp", "w") as f:
                json.dump(info, f)
            os.replace(path + ".tmp", path)


def dask_setup(scheduler):
    scheduler.add_plugin(WriteListenerFiles())
"""
LISTENERS_PRELOAD_NAME = "listeners_preload.py"


@dataclass(frozen=True)
class RenderContext:
    """Site- and cluster-level facts a script needs besides the job's own template."""

    backend: str  # slurm | pbs | local
    python: str  # interpreter on the compute nodes
    scheduler_file: str  # in the cluster's staging directory on the shared filesystem
    log_dir: str
    protocols: tuple[str, ...] = ("tcp",)  # the scheduler's listeners; the first is primary
    site_prologue: tuple[str, ...] = ()
    # Seconds a worker waits for the scheduler file (and for a lost scheduler) before exiting.
    # Long, because the scheduler's own job may queue; the operator cancels workers of a
    # scheduler that is gone, so this only bounds orphans when the operator is down too.
    death_timeout: int = 900
    # Preloaded by the scheduler (e.g. the per-group scaling handler), by path.
    scheduler_preloads: tuple[str, ...] = ()
    # The cluster's credentials (`protocol: tls`); None for a cluster without TLS.
    tls: TLSFiles | None = None

    @property
    def protocol(self) -> str:
        return self.protocols[0]

    def scheduler_file_for(self, protocol: str | None) -> str:
        """Workers of the primary protocol read dask's own file; others their listener's."""
        if protocol is None or protocol == self.protocol:
            return self.scheduler_file
        return os.path.join(os.path.dirname(self.scheduler_file), f"scheduler-{protocol}.json")

    @property
    def preload_path(self) -> str:
        return os.path.join(os.path.dirname(self.scheduler_file), LISTENERS_PRELOAD_NAME)


def _directives(ctx: RenderContext, identity: JobIdentity, template: JobTemplate) -> list[str]:
    if ctx.backend == "slurm":
        lines = [f"--comment={identity.comment()}"]
        if template.gpus:
            lines.append(f"--gres=gpu:{template.gpus}")
    elif ctx.backend == "pbs":
        lines = pbs_directives(identity, template)
    else:
        lines = []
    return lines + list(template.extra_directives)


# --- PBS (Professional / OpenPBS) -------------------------------------------------------------

def pbs_memory(memory: str) -> str:
    """`16GiB` -> `16gb`: PBS sizes are binary (1gb = 2**30 bytes); the largest unit that
    is exact, else megabytes rounded up (`16GB`, 16e9 bytes, -> `15259mb`)."""
    size = parse_bytes(memory)
    for unit, factor in (("tb", 2**40), ("gb", 2**30), ("mb", 2**20)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{-(-size // 2**20)}mb"


def pbs_walltime(walltime: str) -> str:
    """`1-02:00:00` -> `26:00:00`: PBS has no days field (its hours may exceed 24)."""
    days, sep, rest = walltime.partition("-")
    if not sep:
        return walltime
    hours, _, minutes_seconds = rest.partition(":")
    return f"{int(days) * 24 + int(hours):02d}:{minutes_seconds}"


def _pbs_directives_skip() -> tuple[str, ...]:
    """The site's jobqueue.yaml `job-directives-skip` (dask-jobqueue applies it to the lines
    it generates; the lines added here honour it too, except the identity)."""
    skip = (dask.config.get("jobqueue.pbs.job-directives-skip", None)
            or dask.config.get("jobqueue.pbs.header-skip", None) or ())
    return tuple(skip)


def pbs_directives(identity: JobIdentity, template: JobTemplate,
                   array: tuple[int, ...] = ()) -> list[str]:
    """What PBS needs besides dask-jobqueue's header: `-J` for an array, the project (`-P`,
    as NCI Gadi uses it; dask-jobqueue's `account` would write `-A`, an accounting string),
    and the identity. PBS has no free-form comment at submit time, so the identity travels
    in the job's Variable_List (`-v`), which `qstat -f` reports back; it is never skipped,
    since adoption after a restart depends on it."""
    skip = _pbs_directives_skip()
    # Arrays must be rerunnable (PBS Pro refuses "non-rerunable Array Job" where a site
    # makes jobs non-rerunnable by default); a rerun worker just reconnects.
    lines = [array_directive(array), "-r y"] if array else []
    if template.account:
        lines.append(f"-P {template.account}")
    lines = [line for line in lines if not any(word in line for word in skip)]
    lines.append(f"-v DASK_HPC_IDENTITY={identity.comment()}")
    return lines + list(template.extra_directives)


def pbs_job_kwargs(identity: JobIdentity, template: JobTemplate,
                   array: tuple[int, ...] = ()) -> dict[str, Any]:
    """PBSJob arguments: a Job_Name that fits old servers' 15 characters, the project
    instead of `-A`, and one `select` chunk (ncpus, ngpus for GPU groups, mem). Placement
    (`-l place=...`) and site resources (`-l storage=...`, `-l jobfs=...`) come from the
    manifest's extraDirectives, checked by the same policy as SLURM's."""
    chunk = f"select=1:ncpus={template.cores}"
    if template.gpus:
        chunk += f":ngpus={template.gpus}"
    return {
        "job_name": pbs_job_name(identity),
        "account": None,
        "resource_spec": f"{chunk}:mem={pbs_memory(template.memory)}",
        "walltime": pbs_walltime(template.walltime),
        "job_extra_directives": pbs_directives(identity, template, array),
    }


def _prologue(ctx: RenderContext, identity: JobIdentity, template: JobTemplate) -> list[str]:
    lines = [f"export DASK_HPC_IDENTITY={shlex.quote(identity.comment())}"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in template.env]
    lines += list(ctx.site_prologue)
    lines += list(template.prologue)
    return lines


ARRAY_TASK_VARIABLE = {"slurm": "${SLURM_ARRAY_TASK_ID}", "pbs": "${PBS_ARRAY_INDEX}"}


def _job(ctx: RenderContext, identity: JobIdentity, template: JobTemplate,
         worker_args: list[str], array: tuple[int, ...] = ()) -> Job:
    cls = JOB_CLASSES[ctx.backend]
    name = job_name = identity.job_name
    directives = _directives(ctx, identity, template)
    if array:
        # One submission, one task per index: each worker's name (and so its identity)
        # takes the task's index from the batch system at run time.
        stem = name.rsplit(".", 1)[0]
        name, job_name = f"{stem}.{ARRAY_TASK_VARIABLE[ctx.backend]}", f"{stem}.array"
        directives.insert(0, f"--array={compress_ranges(array)}")
    kwargs: dict[str, Any] = {
        "scheduler": f"--scheduler-file {shlex.quote(ctx.scheduler_file_for(template.protocol))}",
        "name": name,
        "job_name": job_name,
        "cores": template.cores,
        "memory": template.memory,
        "processes": template.processes,
        "walltime": template.walltime,
        "python": ctx.python,
        "death_timeout": ctx.death_timeout,
        "job_script_prologue": _prologue(ctx, identity, template),
        "job_extra_directives": directives,
        "worker_extra_args": worker_args,
    }
    if template.cuda:
        # `python -m dask cuda worker` goes through dask's CLI entry points, so it does not
        # depend on dask-cuda's module layout; it starts one worker per visible GPU, so
        # threads and host memory are split per GPU.
        kwargs["worker_command"] = "dask cuda worker"
        kwargs["processes"] = max(template.gpus, 1)
    protocol = template.protocol or ctx.protocol
    if protocol != "tcp":
        kwargs["protocol"] = protocol
    if ctx.backend != "local":
        kwargs["queue"] = template.queue
        kwargs["account"] = template.account
        kwargs["log_directory"] = ctx.log_dir
    if ctx.backend == "pbs":
        kwargs.update(pbs_job_kwargs(identity, template, array))
    return cls(**kwargs)


def _tls_args(ctx: RenderContext) -> list[str]:
    """The worker's TLS options, quoted here: dask-jobqueue's own `security=` would add
    the same options but joins them into the command unquoted."""
    return [shlex.quote(a) for a in ctx.tls.cli_args()] if ctx.tls else []


def _user_sets(args: tuple[str, ...], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def _walltime_lifetime(template: JobTemplate) -> Lifetime | None:
    """The lifetime this module adds to a worker, or None where the user set their own
    `--lifetime` (their choice wins) or the walltime is too short for one."""
    if _user_sets(template.worker_args, "--lifetime"):
        return None
    return worker_lifetime(template.walltime)


def worker_command_args(template: JobTemplate) -> list[str]:
    """The worker command's extra arguments. Workers retire themselves before the walltime
    (hpc_bridge.lifetime) so their results move to other workers instead of dying with the
    job; `dask cuda worker` has no such options and gets the same values as environment
    (see render_worker)."""
    args = list(template.worker_args)
    lifetime = _walltime_lifetime(template)
    if lifetime is not None and not template.cuda:
        extra = lifetime.worker_args()
        if _user_sets(template.worker_args, "--lifetime-stagger"):
            extra = extra[:2]
        args += extra
    if template.cuda and template.rmm_pool_size:
        args += ["--rmm-pool-size", template.rmm_pool_size]
    if template.cuda and template.device_memory_limit:
        args += ["--device-memory-limit", template.device_memory_limit]
    if template.resources:
        # Comma-separated so that the value is one token without quoting.
        args += ["--resources", ",".join(f"{k}={v:g}" for k, v in template.resources)]
    return args


def render_worker(ctx: RenderContext, identity: JobIdentity, template: JobTemplate,
                  array: tuple[int, ...] = ()) -> JobRequest:
    """One worker job, or with `array` one job array whose tasks are these indices."""
    lifetime = _walltime_lifetime(template)
    if lifetime is not None and template.cuda:
        template = replace(template, env=(*template.env, *lifetime.worker_env()))
    job = _job(ctx, identity, template, worker_command_args(template) + _tls_args(ctx), array)
    return JobRequest(identity=identity, script=job.job_script(), log_dir=ctx.log_dir,
                      array=tuple(array))


def scheduler_command(ctx: RenderContext) -> str:
    # Random ports: several clusters may share a node; the scheduler file tells.
    ports = ",".join("0" for _ in ctx.protocols)
    parts = [ctx.python, "-m", "distributed.cli.dask_scheduler",
             "--scheduler-file", ctx.scheduler_file,
             "--port", ports, "--dashboard-address", ":0"]
    if len(ctx.protocols) > 1:
        # One listener per protocol (e.g. tcp for CPU groups, ucx for GPU groups); the
        # preload writes each listener's own scheduler file.
        parts += ["--protocol", ",".join(ctx.protocols), "--preload", ctx.preload_path]
    elif ctx.protocol != "tcp":
        parts += ["--protocol", ctx.protocol]
    if ctx.tls:
        parts += ctx.tls.cli_args()
    for preload in ctx.scheduler_preloads:
        parts += ["--preload", preload]
    return " ".join(shlex.quote(p) for p in parts)


def render_scheduler(ctx: RenderContext, identity: JobIdentity,
                     template: JobTemplate) -> JobRequest:
    """The scheduler's job uses the same header logic; only the command differs.

    dask-jobqueue has no scheduler job class, so the command it would run is replaced by
    the scheduler's (the attribute is private but stable since dask-jobqueue 0.7).
    """
    job = _job(ctx, identity, template, [])
    job._command_template = scheduler_command(ctx)
    return JobRequest(identity=identity, script=job.job_script(), log_dir=ctx.log_dir)


def runner_command(command: RunnerCommand, scheduler_address: str,
                   tls: TLSFiles | None = None) -> str:
    """The shell lines of a DaskJob's runner: the user's argv (each element quoted), its
    output appended to one file, and its exit status written next to it atomically, so
    the operator knows the outcome even where the batch system keeps no exit codes. With
    `tls`, the cluster's credentials reach the command as dask configuration (environment),
    so its `Client()` connects over TLS unchanged."""
    q = shlex.quote
    lines = [f"export DASK_SCHEDULER_ADDRESS={q(scheduler_address)}"]
    if tls:
        lines += [f"export {name}={q(value)}" for name, value in tls.client_env().items()]
    if command.working_dir:
        lines.append(f"cd {q(command.working_dir)} || exit 1")
    lines += [
        " ".join(q(a) for a in command.argv) + f" >> {q(command.output_file)} 2>&1",
        "rc=$?",
        f'echo "$rc" > {q(command.exit_code_file + ".tmp")} && '
        f"mv {q(command.exit_code_file + '.tmp')} {q(command.exit_code_file)}",
        'exit "$rc"',
    ]
    return "\n".join(lines)


def render_runner(ctx: RenderContext, identity: JobIdentity, template: JobTemplate,
                  command: RunnerCommand, scheduler_address: str) -> JobRequest:
    """A DaskJob's runner job: dask-jobqueue's header for the runner's own resources, the
    user's command as the body (like the scheduler's job, the worker command is replaced)."""
    job = _job(ctx, identity, template, [])
    job._command_template = runner_command(command, scheduler_address, ctx.tls)
    return JobRequest(identity=identity, script=job.job_script(), log_dir=ctx.log_dir)


def render(ctx: RenderContext, identity: JobIdentity, template: JobTemplate) -> JobRequest:
    if identity.role is Role.SCHEDULER:
        return render_scheduler(ctx, identity, template)
    return render_worker(ctx, identity, template)
