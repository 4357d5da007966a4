"""One Dask cluster inside one MPI allocation: `python -m hpc_bridge.mpi_entry ...`.

Started once per task by an MPI launcher (`mpiexec -n N`, `srun --mpi=...`) inside one batch
job. Rank 0 runs the scheduler and writes the scheduler file; with a client command (after
`--`) rank 1 runs it and every other rank is a worker; without one, ranks 1.. are all
workers and the cluster lives until the job is cancelled (a DaskCluster in mode
`allocation`).

The rank layout, the address broadcast, the workers (named `<name>-<rank>`, which is how the
operator maps a worker back to its job) and the shutdown after the client are
`dask_mpi.execute`'s. Hand-written here, and why:

- The scheduler file is written by a scheduler preload (this module's `dask_setup`), not by
  dask's `Scheduler(scheduler_file=...)`: dask opens the final path and writes into it, so a
  poller (the operator, a worker of another job) can read half a file. Ours is a temporary
  file renamed into place.
- The client is the user's program, run as a subprocess (no shell) rather than a Python
  function in this process: dask-mpi's client function returns nothing, so its exit status,
  output file and exit-code file are ours. The function never raises, since dask-mpi only
  shuts the cluster down after it returns normally (an exception would leave the
  allocation idle until its walltime).
- The rank count is checked before `execute` (which accepts a client with no worker rank, and
  would then wait forever for workers).
- Any exception on any rank ends in `MPI.COMM_WORLD.Abort`: the other ranks may be blocked in
  the address broadcast, and only an abort reaches them there. Once started, workers leave
  a scheduler that has gone after `--death-timeout`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

import dask.config
from dask.utils import parse_bytes

# The dask config key through which the launching process tells the scheduler preload (a
# fresh import of this module, see `_preload_scheduler_file`) where the file goes.
SCHEDULER_FILE_KEY = "hpc-bridge.allocation-scheduler-file"
PRELOAD_MODULE = "hpc_bridge.mpi_entry"
SCHEDULER_RANK = 0
CLIENT_RANK = 1
# A client process that could not be started, as a shell reports it.
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126
EXIT_USAGE = 2


class AllocationError(RuntimeError):
    """The allocation cannot run as asked (too few ranks)."""


# --- arguments --------------------------------------------------------------------------------

def _memory_limit(text: str) -> int | str:
    """`auto` (dask's share of the machine), or a size that dask can parse, as bytes."""
    if text == "auto":
        return text
    try:
        return int(parse_bytes(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r}") from exc


def _resources(text: str) -> dict[str, float]:
    """`GPU=1,foo=2` -> {"GPU": 1.0, "foo": 2.0} (dask-worker's --resources, comma form)."""
    result: dict[str, float] = {}
    for part in filter(None, text.replace(" ", ",").split(",")):
        name, _, value = part.partition("=")
        try:
            result[name] = float(value)
        except ValueError:
            name = ""
        if not name:
            raise argparse.ArgumentTypeError(f"resources must be NAME=NUMBER,...: {text!r}")
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpc_bridge.mpi_entry",
        description="A Dask scheduler, workers and optionally one client command, one per "
                    "MPI rank. The client command comes after `--`.")
    parser.add_argument("--scheduler-file", required=True,
                        help="where rank 0 writes the scheduler's address (atomically)")
    parser.add_argument("--name", required=True,
                        help="worker name prefix; workers are <name>-<rank>")
    parser.add_argument("--nthreads", type=int, default=1)
    parser.add_argument("--memory-limit", type=_memory_limit, default="auto")
    parser.add_argument("--resources", type=_resources, default=None)
    parser.add_argument("--protocol", default=None, help="e.g. tcp, ucx (default: tcp)")
    parser.add_argument("--interface", default=None, help="network interface, e.g. ib0")
    parser.add_argument("--death-timeout", type=float, default=60.0,
                        help="seconds a worker outlives a scheduler it cannot reach")
    parser.add_argument("--worker-class", default="distributed.Nanny",
                        help="distributed.Nanny (restarts a worker past its memory) or "
                             "distributed.Worker")
    parser.add_argument("--preload", action="append", default=[],
                        help="a scheduler preload (path or module), repeatable")
    parser.add_argument("--output-file", help="the client's stdout and stderr (appended)")
    parser.add_argument("--exit-code-file", help="the client's exit status, when it ends")
    parser.add_argument("--working-dir", help="the client's working directory")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the client's argv (run without a shell)")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if args.command and not (args.output_file and args.exit_code_file):
        parser.error("a client command needs --output-file and --exit-code-file")
    return args


def required_ranks(with_client: bool) -> int:
    """Scheduler, at least one worker, and the client's own rank if there is a client."""
    return 3 if with_client else 2


# --- the scheduler file -----------------------------------------------------------------------

def write_atomically(path: str, text: str) -> None:
    """Write a sibling temporary file and rename it over `path`: a reader sees the old file,
    no file, or the whole new one, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def dask_setup(scheduler: Any) -> None:
    """Scheduler preload: once the scheduler listens, write its identity where asked.

    The same JSON as dask's own scheduler file (what `Client(scheduler_file=...)` and the
    operator read), written atomically."""
    path = dask.config.get(SCHEDULER_FILE_KEY, None)
    if path:
        write_atomically(path, json.dumps(scheduler.identity(), indent=2))


def dask_teardown(scheduler: Any) -> None:
    """A scheduler that closes takes its file along (as dask's own does): a stale file
    would send readers to a dead address."""
    path = dask.config.get(SCHEDULER_FILE_KEY, None)
    if path:
        with contextlib.suppress(OSError):
            os.remove(path)


def _preload_scheduler_file(path: str, extra: Sequence[str] = ()) -> None:
    """Have this process's scheduler write `path` through the preload above.

    The preload is named as a module (a fresh import of this file, since the running one
    is `__main__`); site preloads from the dask config are kept."""
    preloads = list(dask.config.get("distributed.scheduler.preload", None) or [])
    dask.config.set({SCHEDULER_FILE_KEY: os.path.abspath(path),
                     "distributed.scheduler.preload": [*preloads, *extra, PRELOAD_MODULE]})


# --- the client -------------------------------------------------------------------------------

def _client_env(scheduler_address: str) -> dict[str, str]:
    """The client's environment: the scheduler's address, and no process-manager variables
    (PMI_*): a client that imports mpi4py must start as a singleton, not try to join this
    job's MPI world as a second rank 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_"))}
    env["DASK_SCHEDULER_ADDRESS"] = scheduler_address
    return env


def run_client(command: Sequence[str], output_file: str, exit_code_file: str,
               working_dir: str | None, scheduler_address: str) -> int:
    """Run the user's command to its end; its exit status, as a shell reports it (128+N for
    a death by signal N). Never raises: the caller must go on to shut the cluster down."""
    try:
        with open(output_file, "ab") as out:
            try:
                proc = subprocess.run(list(command), stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, cwd=working_dir or None,
                                      env=_client_env(scheduler_address), check=False)
                code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            except OSError as exc:
                if working_dir and not os.path.isdir(working_dir):
                    code = 1
                else:
                    code = (EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError)
                            else EXIT_NOT_EXECUTABLE)
                out.write(f"hpc_bridge.mpi_entry: cannot run {command[0]!r}: {exc}\n".encode())
    except OSError:
        traceback.print_exc()
        code = 1
    try:
        write_atomically(exit_code_file, f"{code}\n")
    except OSError:
        traceback.print_exc()
    return code


class _ClientOutcome:
    """The client's exit status, handed from dask-mpi's client thread to the main thread."""

    def __init__(self) -> None:
        self.code = 1
        self.done = threading.Event()

    def run(self, args: argparse.Namespace) -> None:
        try:
            self.code = run_client(args.command, args.output_file, args.exit_code_file,
                                   args.working_dir, dask.config.get("scheduler_address"))
        except BaseException:  # never let dask-mpi's thread end without its shutdown
            traceback.print_exc()
        finally:
            self.done.set()


# --- main -------------------------------------------------------------------------------------

def run(args: argparse.Namespace, comm: Any) -> int:
    """This rank's part; returns its exit status (the client's, on the client's rank)."""
    from dask_mpi import execute
    from dask_mpi.exceptions import WorldTooSmallException

    with_client = bool(args.command)
    size, rank = comm.Get_size(), comm.Get_rank()
    needed = required_ranks(with_client)
    if size < needed:
        what = "a scheduler, a client and a worker" if with_client else "a scheduler and a worker"
        raise WorldTooSmallException(
            f"hpc_bridge.mpi_entry needs at least {needed} MPI ranks ({what}), found {size}: "
            "start it under an MPI launcher, e.g. `mpiexec -n 4 python -m hpc_bridge.mpi_entry`")

    if rank == SCHEDULER_RANK:
        _preload_scheduler_file(args.scheduler_file, args.preload)
    outcome = _ClientOutcome() if with_client and rank == CLIENT_RANK else None
    worker_options: dict[str, Any] = {"death_timeout": args.death_timeout}
    if args.resources:
        worker_options["resources"] = args.resources
    execute(
        client_function=outcome.run if outcome else None,
        client_args=(args,),
        client_rank=CLIENT_RANK,
        scheduler_rank=SCHEDULER_RANK,
        scheduler_port=0,  # random: several allocations may share a node
        scheduler_file=None,  # written atomically by the preload instead
        dashboard=True,
        dashboard_address=":0",
        interface=args.interface,
        protocol=args.protocol,
        nthreads=args.nthreads,
        memory_limit=args.memory_limit,
        local_directory=None,  # dask's temporary-directory, not the job's working directory
        exclusive_workers=True,
        worker_class=args.worker_class,
        worker_options=worker_options,
        worker_name=args.name,
        comm=comm,
    )
    if outcome is None:
        return 0
    # dask-mpi returns at once on the client's rank; its thread runs the client and then
    # shuts the cluster down. Python waits for that thread before it exits.
    outcome.done.wait()
    return outcome.code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from dask_mpi.exceptions import WorldTooSmallException
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        return run(args, comm)
    except WorldTooSmallException as exc:
        # Every rank sees the same size and stops alike: nothing waits, no abort needed.
        if comm.Get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)  # the other ranks may be blocked in a collective call
        return 1


if __name__ == "__main__":
    sys.exit(main())
