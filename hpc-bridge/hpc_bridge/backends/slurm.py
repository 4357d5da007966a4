"""SLURM over its command-line clients: sbatch, squeue, scancel, and sacct for the departed."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from ..model import (
    JobAccounting,
    JobIdentity,
    JobRequest,
    JobState,
    ObservedJob,
    expand_ranges,
)
from .base import BatchSystemError, CommandRunner, id_batches, with_departed

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
# Usage accounting (`usage`): one line per job allocation (-X: no steps). The job
# completion log (`sacct -c`, no slurmdbd) fills all but AllocTRES, which it leaves empty.
SACCT_USAGE_FIELDS = "JobID,State,Submit,Eligible,Start,End,NCPUS,AllocTRES,ElapsedRaw"
_TRES_GPU = re.compile(r"(?:^|,)gres/gpu(?::[^=,]*)?=(\d+)")
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


def tres_gpus(tres: str) -> int | None:
    """GPUs in a TRES list (`cpu=8,mem=16G,node=1,gres/gpu=2`; typed `gres/gpu:a100=2` is
    counted too, once: SLURM lists the untyped total beside typed entries). None for an
    empty list (the completion log records none), 0 for a list without GPUs."""
    if not tres.strip():
        return None
    found = [int(n) for n in _TRES_GPU.findall(tres)]
    untyped = re.search(r"(?:^|,)gres/gpu=(\d+)", tres)
    return int(untyped.group(1)) if untyped else sum(found)


def _number(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_sacct_usage(text: str, source: str, offset: float = 0.0) -> dict[str, JobAccounting]:
    """`sacct -X --parsable2 --format=SACCT_USAGE_FIELDS` -> {JobID as printed: record}.
    Pending array lines (`123_[4-7]`) and steps are skipped: a pending job has used
    nothing yet. Times get squeue's time zone correction like parse_sacct."""
    found: dict[str, JobAccounting] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 9 or not parts[0] or "." in parts[0] or "[" in parts[0]:
            continue
        job_id, word, submit, eligible, start, end, ncpus, tres, elapsed = parts[:9]
        state = parse_state(word)
        started, ended = job_times(state, start, end, offset)
        submitted = parse_time(submit)
        eligible_at = parse_time(eligible)
        found[job_id] = JobAccounting(
            job_id, source, word, final=state.terminal and ended is not None,
            submitted_at=None if submitted is None else submitted + offset,
            eligible_at=None if eligible_at is None else eligible_at + offset,
            started_at=started, ended_at=ended, cores=_number(ncpus), gpus=tres_gpus(tres),
            elapsed=float(elapsed) if ended is not None and elapsed.strip().isdigit()
            else None)
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

    async def _sacct(self, options: list[str],
                     ids: Callable[[bool], list[str]]) -> tuple[str, bool] | None:
        """sacct for some jobs: (its output, whether it read the job completion log), or None
        when sacct cannot be used here. `ids(completion)` gives the jobs to ask for,
        IDS_PER_CALL per call (an output is kept where only a later call fails).

        Sites without slurmdbd answer "accounting storage is disabled"; then the job
        completion log (`sacct -c`, JobCompType=jobcomp/filetxt) is tried, and which one
        works is remembered. Only a definite answer stops the asking for good: the
        completion log is disabled too, or there is no sacct. Any other failure (a timeout,
        slurmdbd restarting: "Problem talking to the database") is this time's:
        BatchSystemError, and the next call asks again.
        """
        while self._sacct_mode is not None:
            completion = bool(self._sacct_mode)
            asked = ids(completion)
            if not asked:
                return "", completion
            outputs: list[str] = []
            for batch in id_batches(asked):
                rc, out, err, missing = await self._sacct_call(options, batch)
                if rc != 0:
                    break
                outputs.append(out)
            else:
                return "".join(outputs), completion
            if outputs:  # a later call failed: what the earlier ones said still holds
                log.warning("sacct failed part-way, asking again next time: %s", err.strip())
                return "".join(outputs), completion
            said = err.lower()
            if "accounting storage is disabled" in said and not self._sacct_mode:
                self._sacct_mode = ["--completion"]
            elif missing or "job completion is disabled" in said:
                log.info("sacct unusable, jobs that leave squeue are GONE and usage is "
                         "counted from requests: %s", err.strip())
                self._sacct_mode = None
            else:
                raise BatchSystemError(f"sacct failed, asking again next time: {err.strip()}")
        return None

    async def _sacct_call(self, options: list[str], ids: list[str]
                          ) -> tuple[int, str, str, bool]:
        """One sacct command: (exit status, output, error, whether sacct is missing)."""
        try:
            rc, out, err = await self.runner.run(
                ["sacct", *(self._sacct_mode or []), "--noheader", "--parsable2", *options,
                 "--jobs=" + ",".join(ids)], check=False)
        except BatchSystemError as exc:  # not installed, or slurmdbd hangs: squeue works
            return 1, "", str(exc), isinstance(exc.__cause__, FileNotFoundError)
        return rc, out, err, rc == 127 and "not found" in err.lower()  # ssh: no sacct there

    async def _departed(self, job_ids: list[str]) -> list[ObservedJob]:
        """Jobs squeue no longer shows, asked of sacct in one call (failing that, GONE with
        no exit code)."""
        try:
            answer = await self._sacct([f"--format={SACCT_FIELDS}"], lambda _: job_ids)
        except BatchSystemError as exc:
            log.warning("%s: jobs %s that left squeue are GONE", exc, ",".join(job_ids[:10]))
            answer = None
        found = parse_sacct(answer[0], self._offset) if answer else {}
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

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        """Accounting records of these jobs, in ONE sacct call per IDS_PER_CALL jobs
        (keyed by our job ids).

        The completion log knows a job only by its own id: an array task `123_4` is asked
        for by the id squeue showed for it while it ran (%A, `extra["raw_job_id"]`); a task
        never seen running cannot be found there and gets no record (its usage is then
        counted from the poll and the request). Jobs sacct does not know are left out; a
        passing failure raises BatchSystemError (the collector counts it, asks again)."""
        def wanted(completion: bool) -> dict[str, str]:
            out = {}
            for job in jobs:
                raw = job.extra.get("raw_job_id") if completion else None
                if raw or not (completion and "_" in job.job_id):
                    out[raw or job.job_id] = job.job_id
            return out
        if not jobs:
            return {}
        answer = await self._sacct(["--allocations", f"--format={SACCT_USAGE_FIELDS}"],
                                   lambda completion: list(wanted(completion)))
        if answer is None:
            return {}
        out, completion = answer
        ours = wanted(completion)
        records = parse_sacct_usage(out, "sacct-completion" if completion else "sacct",
                                    self._offset)
        return {ours[printed]: replace(record, job_id=ours[printed])
                for printed, record in records.items() if printed in ours}

    async def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        rc, _out, err = await self.runner.run(["scancel", *job_ids], check=False)
        # Finished or unknown jobs are what cancel wants anyway.
        if rc != 0 and "invalid job id" not in err.lower() and "already" not in err.lower():
            raise BatchSystemError(f"scancel exited {rc}: {err.strip()}")
