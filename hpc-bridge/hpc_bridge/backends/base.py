"""The backend interface and the one place that runs batch-system commands."""

from __future__ import annotations

import asyncio
import collections
import logging
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from ..model import JobAccounting, JobRequest, ObservedJob

log = logging.getLogger(__name__)


class BatchSystemError(RuntimeError):
    """A batch-system command failed or timed out; the message carries its stderr."""


# Job ids per command for the queries that name their jobs (sacct --jobs, qstat -f): one
# --jobs argument with every id of 1,000 clusters of 50 workers is past the kernel's limit
# for one argument (MAX_ARG_STRLEN, 128 KiB) and the exec fails with E2BIG. 500 ids are a
# few KiB, and such queries stay a handful of calls.
IDS_PER_CALL = 500


def id_batches(ids: Sequence[str], size: int = IDS_PER_CALL) -> list[list[str]]:
    """`ids` in consecutive lists of at most `size` (none for no ids)."""
    return [list(ids[i:i + size]) for i in range(0, len(ids), size)]


class Backend(Protocol):
    kind: str
    supports_arrays: bool  # submit() accepts JobRequest.array (one submission, many tasks)

    async def submit(self, request: JobRequest) -> str:
        """Submit one job (or one array); returns its id."""
        ...

    def task_job_id(self, job_id: str, index: int) -> str:
        """The id of one task of the array `job_id`, as poll() reports and cancel() takes."""
        ...

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        """How to submit these new tasks of one group: (arrays, each one submission; indices
        to submit as plain jobs). Batch systems differ in what one array can hold."""
        ...

    async def poll(self) -> list[ObservedJob]:
        """Every job that carries a dask-hpc identity, in ONE batch-system query."""
        ...

    async def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel these jobs (one command for all of them). Unknown ids are not an error."""
        ...

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        """The batch system's accounting records of these jobs, in ONE query (of at most
        IDS_PER_CALL ids per command), keyed by job id (jobs it has no record of are left
        out). A query the batch system did not answer at all raises BatchSystemError, so
        that it is not taken for "no record" (the usage ledger gives up on jobs with
        none). Jobs, not ids: SLURM's completion log needs the raw id squeue showed for an
        array task."""
        ...


async def with_departed(jobs: list[ObservedJob], last_seen: dict[str, ObservedJob],
                        ask: Callable[[list[str]], Awaitable[list[ObservedJob]]]
                        ) -> list[ObservedJob]:
    """`jobs` plus what became of the unfinished jobs the previous poll saw and this listing
    no longer shows (asked of the batch system's history in one `ask` call)."""
    listed = {j.job_id for j in jobs}
    departed = [jid for jid, j in last_seen.items() if jid not in listed and not j.state.terminal]
    return jobs + await ask(departed) if departed else jobs


class CommandRunner:
    """Runs batch commands without a shell, behind the site's optional prefix.

    `prefix` is the administrator's submit prefix (e.g. `["ssh", "login1"]` or
    `["sudo", "-u", "alice"]`); arguments are passed as a list end to end, and when a prefix
    goes through ssh (which re-joins argv into a remote shell line) every argument is quoted.
    Call counts per command are kept so benchmarks and tests can verify batching.
    """

    def __init__(self, prefix: Sequence[str] = (), timeout: float = 60.0) -> None:
        self.prefix = list(prefix)
        self.timeout = timeout
        self.calls: collections.Counter[str] = collections.Counter()
        self.latency: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.errors: collections.Counter[str] = collections.Counter()

    def _argv(self, argv: Sequence[str]) -> list[str]:
        if self.prefix and self.prefix[0] == "ssh":
            return [*self.prefix, *(shlex.quote(a) for a in argv)]
        return [*self.prefix, *argv]

    async def run(self, argv: Sequence[str], stdin: str | None = None,
                  check: bool = True) -> tuple[int, str, str]:
        name = argv[0]
        self.calls[name] += 1
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(argv),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            self.errors[name] += 1
            raise BatchSystemError(f"{name}: command not found ({exc.filename}); is the batch "
                                   "system's client installed on the operator's host?") from exc
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), self.timeout)
        except asyncio.TimeoutError as exc:
            proc.kill()
            await proc.wait()
            self.errors[name] += 1
            raise BatchSystemError(f"{name} did not answer within {self.timeout:.0f}s") from exc
        finally:
            self.latency[name] += time.monotonic() - started
        rc = proc.returncode if proc.returncode is not None else -1
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if check and rc != 0:
            self.errors[name] += 1
            raise BatchSystemError(f"{name} exited {rc}: {stderr.strip() or stdout.strip()}")
        return rc, stdout, stderr
