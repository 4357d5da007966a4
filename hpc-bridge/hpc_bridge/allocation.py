"""One batch job holding a whole Dask cluster: MPI tasks run by `hpc_bridge.mpi_entry`.

Task 0 is the scheduler, task 1 the client (a DaskJob's command, if any), the rest workers.
Every task gets what one worker of the template asks for (cores, memory, GPUs): batch
systems size MPI tasks alike, and a scheduler or client task as large as a worker is what a
one-size request costs.

The header is dask-jobqueue's, like every other job's (so a site's `jobqueue.yaml` keeps
applying), with its one-task lines swapped for N tasks; the identity directives are
scripts'. The template's `worker_args` and `cuda` are not applied here: the workers are
dask-mpi's plain Dask workers, not `dask worker`/`dask cuda worker` command lines.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any

import dask.config
from dask.utils import parse_bytes
from dask_jobqueue.core import Job

from .model import JobIdentity, JobRequest, JobTemplate, RunnerCommand
from .scripts import JOB_CLASSES, RenderContext, _directives, _prologue, pbs_job_kwargs, pbs_memory

ENTRY_MODULE = "hpc_bridge.mpi_entry"
# In an allocation the scheduler starts before the workers (they wait for its address over
# MPI, not for a file), so the long wait for a queued scheduler job that the site's
# death_timeout allows for does not apply; a worker whose scheduler died should give the
# allocation back soon.
ALLOCATION_DEATH_TIMEOUT = 60

# dask-jobqueue's SLURM lines that say "one task of this size": replaced by per-task ones.
# (Substrings, as job_directives_skip matches them; `--mem=` does not match `--mem-per-cpu`.)
SLURM_ONE_TASK_LINES = ("-n 1", "--mem=")


def task_count(workers: int, client: RunnerCommand | None) -> int:
    """Scheduler + workers (+ the client's own task)."""
    return workers + 1 + (1 if client else 0)


# The one shell expansion a launcher line may hold: PBS's list of the allocation's hosts,
# one line per MPI process (`mpiprocs` per chunk), which only exists inside the job.
PBS_NODEFILE = '"$PBS_NODEFILE"'


def default_launcher(ctx: RenderContext, tasks: int) -> tuple[str, ...]:
    """The `mpiexec` installed beside the compute nodes' Python (the mpich wheel's Hydra,
    the MPI that mpi4py there was built against). Under SLURM it finds the allocation's
    nodes itself and starts one proxy per node through `srun`; under PBS it is given
    `$PBS_NODEFILE` as its host file (`-f`) rather than trusting its own detection, and
    reaches the other hosts the way the site's MPI does (ssh, or a site `mpiLauncher` with
    PBS's TM such as `mpiexec.hydra -launcher pbs`). The local backend forks: there is no
    batch system to ask, and a stray SLURM environment (an operator that itself runs in a
    job) must not be obeyed."""
    mpiexec = os.path.join(os.path.dirname(ctx.python), "mpiexec")
    hosts: tuple[str, ...] = {"local": ("-launcher", "fork"),
                              "pbs": ("-f", PBS_NODEFILE)}.get(ctx.backend, ())
    return (mpiexec, *hosts, "-n", str(tasks))


def _launcher_word(word: str) -> str:
    return word if word == PBS_NODEFILE else shlex.quote(word)


def allocation_command(ctx: RenderContext, identity: JobIdentity, template: JobTemplate,
                       workers: int, client: RunnerCommand | None,
                       launcher: tuple[str, ...] = ()) -> str:
    """The launcher line; every word shell-quoted, the client's argv after `--`."""
    if workers < 1:
        raise ValueError(f"an allocation needs at least one worker, got {workers}")
    tasks = task_count(workers, client)
    head = [_launcher_word(w) for w in launcher or default_launcher(ctx, tasks)]
    parts = [ctx.python, "-m", ENTRY_MODULE,
             "--scheduler-file", ctx.scheduler_file,
             "--name", identity.job_name,
             "--nthreads", str(template.cores),
             "--memory-limit", str(parse_bytes(template.memory)),
             "--death-timeout", str(min(ctx.death_timeout, ALLOCATION_DEATH_TIMEOUT))]
    if template.resources:
        parts += ["--resources", ",".join(f"{k}={v:g}" for k, v in template.resources)]
    protocol = template.protocol or ctx.protocol
    if protocol != "tcp":
        parts += ["--protocol", protocol]
    for preload in ctx.scheduler_preloads:  # e.g. the scaling handler (idle timeout)
        parts += ["--preload", preload]
    if client is not None:
        parts += ["--output-file", client.output_file, "--exit-code-file", client.exit_code_file]
        if client.working_dir:
            parts += ["--working-dir", client.working_dir]
        parts += ["--", *client.argv]
    return " ".join([*head, *(shlex.quote(p) for p in parts)])


def _site_skip(backend: str) -> set[str]:
    """The site's jobqueue.yaml `job-directives-skip` (or its old name `header-skip`)."""
    return set(dask.config.get(f"jobqueue.{backend}.job-directives-skip", None)
               or dask.config.get(f"jobqueue.{backend}.header-skip", None) or ())


def slurm_task_directives(template: JobTemplate, tasks: int) -> list[str]:
    """N tasks of the template's size. Memory per CPU (rounded up to MiB, SLURM's `M`), as
    `--mem` would be per node and the tasks may spread over nodes. The site's skip list
    applies to the resource lines, never to the task count the allocation depends on."""
    mem_per_cpu = -(-parse_bytes(template.memory) // (template.cores * 2**20))
    lines = [f"--mem-per-cpu={mem_per_cpu}M"]
    if template.gpus:
        lines.append(f"--gpus-per-task={template.gpus}")
    skip = _site_skip("slurm")
    return [f"--ntasks={tasks}",
            *(line for line in lines if not any(word in line for word in skip))]


def pbs_select(template: JobTemplate, tasks: int) -> str:
    """One chunk per task, one MPI process each (PBS writes each chunk's host into
    $PBS_NODEFILE once, which is what mpiexec places ranks by)."""
    chunk = f"select={tasks}:ncpus={template.cores}"
    if template.gpus:
        chunk += f":ngpus={template.gpus}"
    return f"{chunk}:mpiprocs=1:mem={pbs_memory(template.memory)}"


def _allocation_job(ctx: RenderContext, identity: JobIdentity, template: JobTemplate,
                    tasks: int) -> Job:
    # Directives as every job of this identity has them (SLURM's --comment, PBS's -v), but
    # GPUs go per task below rather than as scripts' per-node --gres.
    directives = _directives(ctx, identity, dataclasses.replace(template, gpus=0))
    kwargs: dict[str, Any] = {
        "name": identity.job_name,
        "job_name": identity.job_name,
        "cores": template.cores,
        "memory": template.memory,
        "processes": 1,
        "walltime": template.walltime,
        "python": ctx.python,
        "job_script_prologue": _prologue(ctx, identity, template),
        "job_extra_directives": directives,
    }
    if ctx.backend != "local":
        kwargs.update(queue=template.queue, account=template.account,
                      log_directory=ctx.log_dir)
    if ctx.backend == "slurm":
        kwargs["job_cpu"] = template.cores  # --cpus-per-task, whatever jobqueue.yaml says
        kwargs["job_directives_skip"] = _site_skip("slurm") | set(SLURM_ONE_TASK_LINES)
        kwargs["job_extra_directives"] = [*slurm_task_directives(template, tasks),
                                          *directives]
    elif ctx.backend == "pbs":
        kwargs.update(pbs_job_kwargs(identity, template))
        kwargs["resource_spec"] = pbs_select(template, tasks)
    return JOB_CLASSES[ctx.backend](**kwargs)


def render_allocation(ctx: RenderContext, identity: JobIdentity, template: JobTemplate,
                      workers: int, client: RunnerCommand | None,
                      launcher: tuple[str, ...] = ()) -> JobRequest:
    """One batch job of `workers` + 1 (+ 1 with a client) MPI tasks, each the size of one
    worker of `template`, running `hpc_bridge.mpi_entry` under `launcher` (default: the
    `mpiexec` beside `ctx.python`, with `-n <tasks>`; a site's own, e.g. `srun --mpi=pmix`,
    is used as given: srun takes the task count from the allocation).

    With a client, its exit status is the job's; without, the cluster runs until the job
    is cancelled. Workers are named `<identity.job_name>-<rank>`.
    """
    tasks = task_count(workers, client)
    job = _allocation_job(ctx, identity, template, tasks)
    # dask-jobqueue has no MPI job class: its worker command is replaced, as for the
    # scheduler's job (scripts.render_scheduler).
    job._command_template = allocation_command(ctx, identity, template, workers, client,
                                               launcher)
    return JobRequest(identity=identity, script=job.job_script(), log_dir=ctx.log_dir)
