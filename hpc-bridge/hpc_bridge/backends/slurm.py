"""SLURM over its command-line clients: sbatch, squeue, scancel, and sacct for the departed."""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
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
# it is the only free-form field. %K is the array task id or list ("N/A" for plain jobs),
# %S the start time (for a pending job "N/A" or the scheduler's estimate, so ignored), %e the
# end time (for a running job the time limit's end, so read only once the job ends), %M the
# time used so far, %A the job's own id (an array task's differs from its `<array>_<index>`
# id; its log files use it).
SQUEUE_FORMAT = "%i|%T|%r|%K|%S|%e|%M|%A|%k"
SQUEUE_FIELDS = 9
SACCT_FIELDS = "JobID,State,ExitCode,Start,End"
TZ_STEP_S = 900  # time zones differ by multiples of 15 minutes


def parse_state(word: str) -> JobState:
    # sacct writes "CANCELLED by 1000"; unknown future states are treated as still running
    # rather than failed, so nothing is resubmitted on a word we do not know.
    words = word.split()
    return STATES.get(words[0] if words else "", JobState.RUNNING)


def parse_time(text: str) -> float | None:
    """SLURM's `2024-05-01T12:30:00` (the local time of the host that runs the command) ->
    epoch seconds, read in this host's time zone; epoch seconds as they are (a site with
    SLURM_TIME_FORMAT=%s); "N/A", "Unknown", "None" and empty -> None."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def parse_elapsed(text: str) -> float | None:
    """squeue's %M: `SS`, `M:SS`, `H:MM:SS` or `D-H:MM:SS` -> seconds."""
    days, _, rest = text.strip().rpartition("-")
    try:
        seconds = 0
        for part in rest.split(":"):
            seconds = seconds * 60 + int(part)
        return float(seconds + int(days or 0) * 86400)
    except ValueError:
        return None


def job_times(state: JobState, start: str, end: str,
              offset: float = 0.0) -> tuple[float | None, float | None]:
    """(started_at, ended_at) as far as they are facts: a pending job's start is at most an
    estimate, and an unfinished job's end is its time limit's. `offset` corrects a time
    zone that differs between this host and the one that printed the times."""
    if state is JobState.PENDING:
        return None, None
    ended = state is JobState.ENDING or state.terminal
    started_at, ended_at = parse_time(start), parse_time(end) if ended else None
    return (None if started_at is None else started_at + offset,
            None if ended_at is None else ended_at + offset)


def clock_offset(rows: list[list[str]], now: float) -> float:
    """What to add to squeue's times to make them this host's epoch seconds.

    squeue prints local time of the host where it runs, which with a submit prefix (ssh to a
    login node) may be another time zone than the operator's (a UTC container, say). A job's
    age read there would be off by hours, and every job would look due for replacement. A
    running job's time used (%M) does not depend on time zones, so `now - used` is its start
    in our terms; the difference to its printed start, rounded to 15 minutes (so that a few
    seconds of polling delay never count), is the zone offset. No running job: no offset.
    """
    diffs = []
    for row in rows:
        state, start, used = row[1], row[4], row[6]
        started, elapsed = parse_time(start), parse_elapsed(used)
        # RUNNING only: a suspended job's time used leaves out its suspension
        if state == "RUNNING" and started is not None and elapsed:
            diffs.append(now - elapsed - started)
    if not diffs:
        return 0.0
    median = sorted(diffs)[len(diffs) // 2]
    return float(round(median / TZ_STEP_S) * TZ_STEP_S)


def squeue_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        parts = line.split("|", SQUEUE_FIELDS - 1)
        if len(parts) == SQUEUE_FIELDS:
            rows.append([p.strip() for p in parts])
    return rows


def parse_squeue(text: str, now: float | None = None) -> list[ObservedJob]:
    """One ObservedJob per job or array task; a task's index is its array task id (the
    array's comment names only the first). With `now` (when squeue ran), start and end
    times are corrected for a time zone that differs from squeue's (clock_offset)."""
    jobs = []
    rows = squeue_rows(text)
    offset = clock_offset(rows, now) if now is not None else 0.0
    for job_id, state, reason, tasks, start, end, _used, raw_id, comment in rows:
        identity = JobIdentity.parse(comment)
        if identity is None:
            continue
        job_state = parse_state(state)
        why = "" if reason == "None" else reason
        started, ended = job_times(job_state, start, end, offset)
        if tasks in ("N/A", ""):
            jobs.append(ObservedJob(job_id, identity, job_state, why, started_at=started,
                                    ended_at=ended))
            continue
        base = job_id.split("_", 1)[0]
        indices = expand_ranges(tasks)
        # A line of one task is that task's own record; a pending range shares the array's.
        extra = {"raw_job_id": raw_id} if len(indices) == 1 and raw_id.isdigit() else {}
        for index in indices:
            task = JobIdentity(identity.namespace, identity.cluster, identity.owner_uid,
                               identity.role, identity.group, index)
            jobs.append(ObservedJob(f"{base}_{index}", task, job_state, why, extra=dict(extra),
                                    started_at=started, ended_at=ended))
    return jobs


def parse_exit_code(text: str) -> int | None:
    """sacct's ExitCode is `code:signal`; a signal death reads as 128+signal like a shell."""
    try:
        code, _, signal = text.partition(":")
        return 128 + int(signal) if signal and int(signal) else int(code)
    except ValueError:
        return None


SacctRecord = tuple[JobState, int | None, str, float | None, float | None]


def parse_sacct(text: str, offset: float = 0.0) -> dict[str, SacctRecord]:
    """job id -> (state, exit code, sacct's state word, started_at, ended_at); job steps
    (123.batch) are skipped. Start/End read "Unknown" or "None" where unset; `offset` is
    squeue's time zone correction (clock_offset), since sacct prints the same local time."""
    found = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or "." in parts[0] or not parts[0]:
            continue
        job_id, state, exit_code = parts[:3]
        job_state = parse_state(state)
        start, end = (parts[3], parts[4]) if len(parts) >= 5 else ("", "")
        found[job_id] = (job_state, parse_exit_code(exit_code), state,
                         *job_times(job_state, start, end, offset))
    return found


class SlurmBackend:
    kind = "slurm"
    supports_arrays = True

    def __init__(self, runner: CommandRunner | None = None, all_users: bool = False) -> None:
        self.runner = runner or CommandRunner()
        self.all_users = all_users
        self._last_seen: dict[str, ObservedJob] = {}
        self._sacct_mode: list[str] | None = []  # [] = accounting, ["--completion"], None
        self._offset = 0.0  # squeue's time zone correction, also applied to sacct's times

    def task_job_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"  # scancel 1234_5 cancels one task

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        """One array of any index list (`--array=3,5-7`); a one-task array is valid too."""
        return ([tuple(sorted(set(indices)))] if indices else []), []

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
        now = time.time()
        self._offset = clock_offset(squeue_rows(out), now)
        jobs = await with_departed(parse_squeue(out, now), self._last_seen, self._departed)
        self._last_seen = {j.job_id: j for j in jobs}
        return jobs

    async def _departed(self, job_ids: list[str]) -> list[ObservedJob]:
        """Jobs squeue no longer shows, asked of sacct in one call.

        Sites without slurmdbd answer "accounting storage is disabled"; then the job
        completion log (`sacct -c`, JobCompType=jobcomp/filetxt) is tried, and failing that
        the jobs are GONE with no exit code.
        """
        found: dict[str, SacctRecord] = {}
        while self._sacct_mode is not None:
            try:
                rc, out, err = await self.runner.run(
                    ["sacct", *self._sacct_mode, "--noheader", "--parsable2",
                     f"--format={SACCT_FIELDS}", "--jobs=" + ",".join(job_ids)], check=False)
            except BatchSystemError as exc:  # not installed, or slurmdbd hangs: squeue works
                rc, out, err = 1, "", str(exc)
            if rc == 0:
                found = parse_sacct(out, self._offset)
                break
            if "accounting storage is disabled" in err.lower() and not self._sacct_mode:
                self._sacct_mode = ["--completion"]
            else:
                log.info("sacct unusable, jobs that leave squeue are GONE: %s", err.strip())
                self._sacct_mode = None
        result = []
        for job_id in job_ids:
            last = self._last_seen[job_id]
            if job_id in found:
                state, code, word, started, ended = found[job_id]
                result.append(ObservedJob(job_id, last.identity, state, word, exit_code=code,
                                          extra=last.extra,
                                          started_at=started or last.started_at,
                                          ended_at=ended))
            else:
                result.append(ObservedJob(job_id, last.identity, JobState.GONE,
                                          "no longer reported by squeue", extra=last.extra,
                                          started_at=last.started_at))
        return result

    async def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        rc, _out, err = await self.runner.run(["scancel", *job_ids], check=False)
        # Finished or unknown jobs are what cancel wants anyway.
        if rc != 0 and "invalid job id" not in err.lower() and "already" not in err.lower():
            raise BatchSystemError(f"scancel exited {rc}: {err.strip()}")
