"""SLURM over its command-line clients: sbatch, squeue, scancel, and sacct for the departed."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ..model import JobIdentity, JobRequest, JobState, ObservedJob, expand_ranges
from .base import BatchSystemError, CommandRunner, with_departed

log = logging.getLogger(__name__)

# squeue/sacct state names -> ours. Queue wait is never failure: requeued and held jobs are
# PENDING; a preempted job that SLURM does not requeue ended, but not by its own fault.
STATES: dict[str, JobState] = {
    **dict.fromkeys(["PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                     "RESV_DEL_HOLD"], JobState.PENDING),
    **dict.fromkeys(["RUNNING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING",
                     "STAGE_OUT"], JobState.RUNNING),
    "COMPLETING": JobState.ENDING,
    "COMPLETED": JobState.COMPLETED,
    **dict.fromkeys(["CANCELLED", "REVOKED", "PREEMPTED", "DEADLINE"], JobState.CANCELLED),
    **dict.fromkeys(["FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY",
                     "SPECIAL_EXIT"], JobState.FAILED),
}

# One line per job (a pending array's tasks share one line); the comment goes last because
# it is the only free-form field. %K is the array task id or list ("N/A" for plain jobs).
SQUEUE_FORMAT = "%i|%T|%r|%K|%k"
SACCT_FIELDS = "JobID,State,ExitCode"


def parse_state(word: str) -> JobState:
    # sacct writes "CANCELLED by 1000"; unknown future states are treated as still running
    # rather than failed, so nothing is resubmitted on a word we do not know.
    words = word.split()
    return STATES.get(words[0] if words else "", JobState.RUNNING)


def parse_squeue(text: str) -> list[ObservedJob]:
    """One ObservedJob per job or array task; a task's index is its array task id (the
    array's comment names only the first)."""
    jobs = []
    for line in text.splitlines():
        parts = line.split("|", 4)
        if len(parts) != 5:
            continue
        job_id, state, reason, tasks, comment = (p.strip() for p in parts)
        identity = JobIdentity.parse(comment)
        if identity is None:
            continue
        job_state = parse_state(state)
        why = "" if reason == "None" else reason
        if tasks in ("N/A", ""):
            jobs.append(ObservedJob(job_id, identity, job_state, why))
            continue
        base = job_id.split("_", 1)[0]
        for index in expand_ranges(tasks):
            task = JobIdentity(identity.namespace, identity.cluster, identity.owner_uid,
                               identity.role, identity.group, index)
            jobs.append(ObservedJob(f"{base}_{index}", task, job_state, why))
    return jobs


def parse_exit_code(text: str) -> int | None:
    """sacct's ExitCode is `code:signal`; a signal death reads as 128+signal like a shell."""
    try:
        code, _, signal = text.partition(":")
        return 128 + int(signal) if signal and int(signal) else int(code)
    except ValueError:
        return None


def parse_sacct(text: str) -> dict[str, tuple[JobState, int | None, str]]:
    """job id -> (state, exit code, sacct's state word); job steps (123.batch) are skipped."""
    found = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or "." in parts[0] or not parts[0]:
            continue
        job_id, state, exit_code = parts[:3]
        found[job_id] = (parse_state(state), parse_exit_code(exit_code), state)
    return found


class SlurmBackend:
    kind = "slurm"
    supports_arrays = True

    def __init__(self, runner: CommandRunner | None = None, all_users: bool = False) -> None:
        self.runner = runner or CommandRunner()
        self.all_users = all_users
        self._last_seen: dict[str, ObservedJob] = {}
        self._sacct_mode: list[str] | None = []  # [] = accounting, ["--completion"], None

    def task_job_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"  # scancel 1234_5 cancels one task

    async def submit(self, request: JobRequest) -> str:
        os.makedirs(request.log_dir, exist_ok=True)
        # The script goes on stdin: nothing user-derived is ever a command-line word here.
        _, out, _ = await self.runner.run(
            ["sbatch", "--parsable", f"--chdir={request.log_dir}"], stdin=request.script)
        job_id = out.strip().split(";")[0]
        if not job_id:
            raise BatchSystemError(f"sbatch printed no job id: {out!r}")
        return job_id  # for an array, tasks are <job_id>_<index>

    async def poll(self) -> list[ObservedJob]:
        argv = ["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"]
        if not self.all_users:
            argv.append("--me")
        _, out, _ = await self.runner.run(argv)
        jobs = await with_departed(parse_squeue(out), self._last_seen, self._departed)
        self._last_seen = {j.job_id: j for j in jobs}
        return jobs

    async def _departed(self, job_ids: list[str]) -> list[ObservedJob]:
        """Jobs squeue no longer shows, asked of sacct in one call.

        Sites without slurmdbd answer "accounting storage is disabled"; then the job
        completion log (`sacct -c`, JobCompType=jobcomp/filetxt) is tried, and failing that
        the jobs are GONE with no exit code.
        """
        found: dict[str, tuple[JobState, int | None, str]] = {}
        while self._sacct_mode is not None:
            try:
                rc, out, err = await self.runner.run(
                    ["sacct", *self._sacct_mode, "--noheader", "--parsable2",
                     f"--format={SACCT_FIELDS}", "--jobs=" + ",".join(job_ids)], check=False)
            except BatchSystemError as exc:  # not installed, or slurmdbd hangs: squeue works
                rc, out, err = 1, "", str(exc)
            if rc == 0:
                found = parse_sacct(out)
                break
            if "accounting storage is disabled" in err.lower() and not self._sacct_mode:
                self._sacct_mode = ["--completion"]
            else:
                log.info("sacct unusable, jobs that leave squeue are GONE: %s", err.strip())
                self._sacct_mode = None
        result = []
        for job_id in job_ids:
            identity = self._last_seen[job_id].identity
            if job_id in found:
                state, code, word = found[job_id]
                result.append(ObservedJob(job_id, identity, state, word, exit_code=code))
            else:
                result.append(ObservedJob(job_id, identity, JobState.GONE,
                                          "no longer reported by squeue"))
        return result

    async def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        rc, _out, err = await self.runner.run(["scancel", *job_ids], check=False)
        # Finished or unknown jobs are what cancel wants anyway.
        if rc != 0 and "invalid job id" not in err.lower() and "already" not in err.lower():
            raise BatchSystemError(f"scancel exited {rc}: {err.strip()}")
