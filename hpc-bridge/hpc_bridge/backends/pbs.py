"""PBS Professional / OpenPBS over its command-line clients: qsub, qstat, qdel.

How each command is used, and why (sources are named in tests/fixtures/pbs/README.md):

- qsub reads the job script from stdin when no script file is given (qsub(1B): "submitting
  jobs from standard input"); it prints the job id, `<sequence>.<server>` (`<sequence>[].<server>`
  for an array). Nothing user-derived is ever a command-line word.
- qstat: ONE call per poll, `qstat -f -F json` without job ids: every job the server shows to
  this user (many sites show only the user's own), of which only those whose Variable_List
  carries DASK_HPC_IDENTITY are ours. `-u USER` cannot be used: with -f it switches qstat to
  the one-line "alternate" format (qstat.c; openpbs/openpbs#2675), and job ids cannot be used
  either: after an operator restart we do not know them, and `qstat -f -F json ID1 ID2`
  returns only the first job on OpenPBS built after 23.06 (openpbs/openpbs#2672).
  Servers without `-F json` (PBS Pro before JSON output, TORQUE) answer with a usage error;
  that is detected once, remembered, and `qstat -f` text is parsed instead. Invalid JSON
  (another user's job with a numeric-looking or multi-line variable, openpbs#1255, #2541)
  also switches to text, which has no such failure.
- Jobs that leave the listing (finished, or purged from history) are asked about once, all in
  one `qstat -x -f ID...` call, in text (several ids work in text on every version): the
  history record gives the exit status; "Unknown Job Id" means purged: GONE. This mirrors the
  SLURM backend's squeue + sacct.
- qdel ID... : one call; "Unknown Job Id" and "Job has finished" are what a cancel wants
  anyway. `-W force` is not used (it skips the MoM's cleanup; sites ask users not to default
  to it) and neither is `-x` (it would delete the history record the poll reads exit codes
  from).

State mapping (qstat(1B) job states; exit codes from openpbs src/include/job.h):
  Q queued, H held, W waiting for its start time, T in transit -> PENDING (queue wait is never
  failure); R running, S/U suspended, B array begun -> RUNNING; E exiting after having run ->
  ENDING (no longer counts as live, not settled yet); M moved to another server -> GONE;
  F finished / X finished subjob (C: TORQUE's completed) -> by substate and Exit_status:
  substate 91 (terminated, i.e. deleted) or no Exit_status at all (deleted before it ran) ->
  CANCELLED; Exit_status 0 -> COMPLETED; > 0 -> FAILED (>= 256 is 256 + the signal that
  killed the job, reported as 128 + signal like a shell); < 0 -> FAILED, named after PBS's
  JOB_EXEC_* code (-29 walltime exceeded, -27 memory exceeded, ...).

Times: a started job's `stime` is its start; a finished job's end is `obittime` where the
server records it, else `mtime` (the record's last change, its end for a finished job). The
recorded transcripts have stime and mtime (no obittime); both are ctime(3)-style local time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..model import JobAccounting, JobIdentity, JobRequest, JobState, ObservedJob
from .base import BatchSystemError, CommandRunner, id_batches, with_departed

log = logging.getLogger(__name__)

IDENTITY_VARIABLE = "DASK_HPC_IDENTITY"  # set with `#PBS -v`, reported in Variable_List

# Older PBS servers limit Job_Name to 15 characters (PBS Pro 13+ allows 236); the default
# name fits everywhere. A site with longer names passes name_limit to the backend.
PBS_NAME_LIMIT = 15
MIN_NAME_LIMIT = 8

STATES: dict[str, JobState] = {
    **dict.fromkeys("QHWT", JobState.PENDING),
    **dict.fromkeys("RSUB", JobState.RUNNING),
    "E": JobState.ENDING,
    "M": JobState.GONE,
}
FINISHED_STATES = frozenset("FXC")  # C: TORQUE's "completed"; parsed, not otherwise supported
WAITING_WORDS = {"Q": "queued", "H": "held", "W": "waiting for its start time",
                 "T": "in transit"}
SUBSTATE_TERMINATED = "91"  # job.h: JOB_SUBSTATE_TERMINATED, a deleted job's history record

# Negative Exit_status values PBS sets itself (openpbs src/include/job.h).
EXEC_CODES: dict[int, str] = {
    -1: "JOB_EXEC_FAIL1 (failed before files, no retry)",
    -2: "JOB_EXEC_FAIL2 (failed after files, no retry)",
    -3: "JOB_EXEC_RETRY (execution failed, retry)",
    -4: "JOB_EXEC_INITABT (aborted on MoM initialization)",
    -5: "JOB_EXEC_INITRST (aborted on MoM init, checkpoint, no migrate)",
    -6: "JOB_EXEC_INITRMG (aborted on MoM init, checkpoint, migrate)",
    -7: "JOB_EXEC_BADRESRT (restart failed)",
    -10: "JOB_EXEC_FAILUID (invalid uid/gid for job)",
    -11: "JOB_EXEC_RERUN (job rerun)",
    -12: "JOB_EXEC_CHKP (checkpointed and killed)",
    -13: "JOB_EXEC_FAIL_PASSWORD (bad password)",
    -14: "JOB_EXEC_RERUN_SIS_FAIL (rerun, sister failed)",
    -15: "JOB_EXEC_QUERST (requeued for restart from checkpoint)",
    -16: "JOB_EXEC_FAILHOOK_RERUN (rejected by a hook, requeued)",
    -17: "JOB_EXEC_FAILHOOK_DELETE (rejected by a hook, deleted)",
    -18: "JOB_EXEC_HOOK_RERUN (a hook requested requeue)",
    -19: "JOB_EXEC_HOOK_DELETE (a hook requested deletion)",
    -20: "JOB_EXEC_RERUN_MS_FAIL (mother superior connection failed)",
    -21: "JOB_EXEC_FAIL_SECURITY (security breach in PBS directory)",
    -22: "JOB_EXEC_HOOKERROR (hook error or timeout)",
    -23: "JOB_EXEC_FAIL_KRB5 (no kerberos credentials)",
    -24: "JOB_EXEC_KILL_NCPUS_BURST (exceeded ncpus, burst)",
    -25: "JOB_EXEC_KILL_NCPUS_SUM (exceeded ncpus, sum)",
    -26: "JOB_EXEC_KILL_VMEM (exceeded vmem)",
    -27: "JOB_EXEC_KILL_MEM (exceeded mem)",
    -28: "JOB_EXEC_KILL_CPUT (exceeded cput)",
    -29: "JOB_EXEC_KILL_WALLTIME (exceeded walltime)",
    -30: "JOB_EXEC_JOINJOB (join job error)",
}

# qsub/qstat/qdel print a usage message and exit non-zero on an option they do not know;
# PBS Pro before JSON output and TORQUE do so for `-F json`.
_UNSUPPORTED_OPTION = re.compile(r"invalid option|illegal option|unknown option|usage:",
                                 re.IGNORECASE)
_JOB_ID = re.compile(r"^\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?$")
_SUBJOB = re.compile(r"^(\d+)\[(\d+)\](.*)$")
_ARRAY_PARENT = re.compile(r"^\d+\[\](.*)$")
_ATTRIBUTE_LINE = re.compile(r"^    ([A-Za-z_][A-Za-z0-9_.]*) = (.*)$")
_UNKNOWN_JOB = re.compile(r"Unknown Job Id (\S+)")
_HISTORY_DISABLED = "not configured to maintain job history"
_QDEL_HARMLESS = ("Unknown Job Id", "Job has finished")


# --- names, arrays ---------------------------------------------------------------------------

def pbs_job_name(identity: JobIdentity, limit: int = PBS_NAME_LIMIT) -> str:
    """The Job_Name: the readable dask name when it fits, else a short deterministic one.

    `dask<role letter><index>-<hash of the identity>`, cut to `limit`; it starts with a
    letter and has no whitespace (qsub -N). Names need not be unique: the identity that
    adoption relies on travels in Variable_List, never in the name.
    """
    if limit < MIN_NAME_LIMIT:
        raise ValueError(f"a PBS job name limit below {MIN_NAME_LIMIT} leaves no room")
    if len(identity.job_name) <= limit:
        return identity.job_name
    digest = hashlib.sha256(identity.comment().encode()).hexdigest()
    return f"dask{identity.role.value[0]}{identity.index}-{digest}"[:limit]


def array_directive(indices: Iterable[int]) -> str:
    """`-J X-Y[:Z]`: PBS arrays are one range with an optional step (qsub(1B) -J)."""
    ordered = sorted(set(indices))
    if not ordered:
        raise ValueError("an array needs at least one index")
    low, high = ordered[0], ordered[-1]
    step = ordered[1] - low if len(ordered) > 1 else 1
    if ordered != list(range(low, high + 1, step)):
        raise ValueError(f"PBS arrays are one range with one step; {ordered} is not")
    return f"-J {low}-{high}" + (f":{step}" if step != 1 else "")


def array_batches(indices: Iterable[int], max_size: int = 0
                  ) -> tuple[list[tuple[int, ...]], list[int]]:
    """New tasks as PBS can submit them: (arrays, plain jobs).

    A PBS array is one range (`-J X-Y`) of at least two subjobs (`-J 5-5` is refused:
    openpbs/openpbs#2701) and at most the server's `max_array_size` (NCI's Raijin kept it at
    10). Replacement leaves gaps in a group's indices, so each run of consecutive indices is
    cut into arrays of at most `max_size` (0: no limit); a run or remainder of one index is
    a plain job.
    """
    ordered = sorted(set(indices))
    runs: list[list[int]] = []
    for index in ordered:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    arrays: list[tuple[int, ...]] = []
    singles: list[int] = []
    for run in runs:
        size = max_size if max_size > 1 else len(run)
        for start in range(0, len(run), size):
            chunk = run[start:start + size]
            if len(chunk) > 1:
                arrays.append(tuple(chunk))
            else:
                singles += chunk
    return arrays, singles


def array_task_id(job_id: str, index: int) -> str:
    """`1234[].server` (what qsub prints for an array) -> `1234[5].server` (a subjob)."""
    match = _ARRAY_PARENT.match(job_id)
    if not match:
        raise ValueError(f"{job_id!r} is not an array job id")
    return f"{job_id.split('[', 1)[0]}[{index}]{match.group(1)}"


# --- attribute parsing -----------------------------------------------------------------------

def split_variable_list(value: str) -> dict[str, str]:
    """`A=1,B=x\\,y` -> {"A": "1", "B": "x,y"}: PBS escapes commas inside values."""
    result: dict[str, str] = {}
    for item in re.split(r"(?<!\\),", value):
        name, sep, val = item.partition("=")
        if sep:
            result[name.strip()] = val.replace("\\,", ",")
    return result


def identity_of(attrs: Mapping[str, Any]) -> JobIdentity | None:
    variables = attrs.get("Variable_List")
    if isinstance(variables, str):
        variables = split_variable_list(variables)
    if not isinstance(variables, Mapping):
        return None
    comment = variables.get(IDENTITY_VARIABLE)
    return JobIdentity.parse(comment) if isinstance(comment, str) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def parse_time(value: Any) -> float | None:
    """A qstat time attribute -> epoch seconds. `qstat -f` prints ctime(3)'s local time
    (`Wed Apr 14 23:21:57 2021`, day padded with a space); some JSON outputs give epoch
    seconds. Anything else is None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text.isdigit():
        return float(text)
    try:
        return time.mktime(time.strptime(text, "%a %b %d %H:%M:%S %Y"))
    except (ValueError, OverflowError):
        return None


def job_times(attrs: Mapping[str, Any], state: JobState) -> tuple[float | None, float | None]:
    """(started_at, ended_at): `stime` is when the job (last) started; a finished job's end
    is `obittime` where the server records it, else `mtime` (its record's last change,
    which for a finished job is its end). A queued job has neither."""
    if state is JobState.PENDING:
        return None, None
    started = parse_time(attrs.get("stime"))
    if not state.terminal:
        return started, None
    return started, parse_time(attrs.get("obittime", attrs.get("mtime")))


def finished_state(attrs: Mapping[str, Any]) -> tuple[JobState, int | None, str]:
    """State, shell-like exit code and reason of a finished (F/X/C) job's history record."""
    status = _int(attrs.get("Exit_status", attrs.get("exit_status")))
    substate = str(attrs.get("substate", "")).strip()
    if substate == SUBSTATE_TERMINATED:
        return JobState.CANCELLED, status, "deleted" + (
            f" (Exit_status {status})" if status is not None else "")
    if status is None:
        return JobState.CANCELLED, None, "finished without an exit status (deleted before it ran)"
    if status == 0:
        return JobState.COMPLETED, 0, "Exit_status 0"
    if status > 0:
        if status >= 256:  # PBS: 256 + the signal that killed the job's top process
            signal = status - 256
            reason = f"killed by signal {signal} (Exit_status {status})"
            return JobState.FAILED, 128 + signal, reason
        return JobState.FAILED, status, f"Exit_status {status}"
    return JobState.FAILED, status, EXEC_CODES.get(status, f"Exit_status {status}")


def observe(job_id: str, attrs: Mapping[str, Any]) -> ObservedJob | None:
    """One qstat record as ours, or None when it carries no dask-hpc identity."""
    if _ARRAY_PARENT.match(job_id):
        return None  # its subjobs (qstat -t) are the tasks; the parent is bookkeeping
    identity = identity_of(attrs)
    if identity is None:
        return None
    subjob = _SUBJOB.match(job_id)
    if subjob:  # a task's index is its array index (the Variable_List names the first)
        identity = JobIdentity(identity.namespace, identity.cluster, identity.owner_uid,
                               identity.role, identity.group, int(subjob.group(2)))
    letter = str(attrs.get("job_state", "")).strip()[:1]
    comment = str(attrs.get("comment", "") or "")
    extra = {"pbs_state": letter}
    if letter in FINISHED_STATES:
        state, code, reason = finished_state(attrs)
        started, ended = job_times(attrs, state)
        return ObservedJob(job_id, identity, state, reason, exit_code=code, extra=extra,
                           started_at=started, ended_at=ended)
    # Unknown future letters read as running, never failed: nothing is resubmitted on them.
    state = STATES.get(letter, JobState.RUNNING)
    if state is JobState.PENDING:
        reason = comment or WAITING_WORDS[letter]
    elif state is JobState.GONE:
        reason = "moved to another server"
    else:
        reason = ""
    started, _ = job_times(attrs, state)
    return ObservedJob(job_id, identity, state, reason, extra=extra, started_at=started)


def flatten(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """`qstat -F json`'s nested resources (`"Resource_List": {"ncpus": 4}`) as `qstat -f`
    text names them (`Resource_List.ncpus`), so one reader serves both outputs."""
    flat: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, Mapping) and key != "Variable_List":
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def parse_duration(value: Any) -> float | None:
    """PBS's `[[HH:]MM:]SS` (hours may exceed 24: `123:04:05`) or plain seconds -> seconds."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    seconds = 0
    try:
        for part in str(value).strip().split(":"):
            seconds = seconds * 60 + int(part)
    except ValueError:
        return None
    return float(seconds)


def accounting(job_id: str, attrs: Mapping[str, Any]) -> JobAccounting:
    """One job's usage record from its qstat attributes (listing or `-x` history, text or
    JSON): cores `resources_used.ncpus` (else `Resource_List.ncpus`), GPUs
    `Resource_List.ngpus` (PBS's consumable GPU count; None where the job has none listed),
    submitted `qtime`, eligible `etime`, started `stime`, ended `obittime` or `mtime` (see
    job_times), run time `resources_used.walltime`. Final once the job is finished (F/X)."""
    flat = flatten(attrs)
    letter = str(flat.get("job_state", "")).strip()[:1]
    finished = letter in FINISHED_STATES
    state = finished_state(flat)[0] if finished else STATES.get(letter, JobState.RUNNING)
    started, ended = job_times(flat, state)
    cores = _int(flat.get("resources_used.ncpus"))
    return JobAccounting(
        job_id, "qstat", letter or "?", final=finished,
        submitted_at=parse_time(flat.get("qtime")), eligible_at=parse_time(flat.get("etime")),
        started_at=started, ended_at=ended,
        cores=cores if cores else _int(flat.get("Resource_List.ncpus")),
        gpus=_int(flat.get("Resource_List.ngpus")),
        elapsed=parse_duration(flat.get("resources_used.walltime")) if finished else None)


def parse_qstat_json(text: str) -> dict[str, dict[str, Any]]:
    """`qstat -f -F json` -> {job id: attributes}. An empty server has no "Jobs" key.

    Raises ValueError (json.JSONDecodeError) on invalid JSON; literal control characters
    inside strings are tolerated.
    """
    data = json.loads(text, strict=False)
    if not isinstance(data, dict):
        raise ValueError("qstat JSON is not an object")
    jobs = data.get("Jobs") or {}
    return {str(k): v for k, v in jobs.items() if isinstance(v, dict)}


def parse_qstat_text(text: str) -> dict[str, dict[str, str]]:
    """`qstat -f` -> {job id: {attribute: value}}.

    qstat wraps long values at 78 columns with a newline and a tab, mid-token if it must, so
    a line starting with a tab continues the previous value verbatim. A value holding a real
    newline (a bash function exported with -V, aiida-core's fixture) continues on lines that
    are neither; those are kept with their newline.
    """
    jobs: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    key = ""
    for line in text.splitlines():
        if line.startswith("Job Id:"):
            current = jobs.setdefault(line.split(":", 1)[1].strip(), {})
            key = ""
            continue
        if current is None:
            continue
        match = _ATTRIBUTE_LINE.match(line)
        if match:
            key, value = match.groups()
            current[key] = value
        elif key and line.startswith("\t"):
            current[key] += line[1:]
        elif key and line.strip():
            current[key] += "\n" + line
    return jobs


def observe_all(records: Mapping[str, Mapping[str, Any]]) -> list[ObservedJob]:
    jobs = []
    for job_id, attrs in records.items():
        job = observe(job_id, attrs)
        if job is not None:
            jobs.append(job)
    return jobs


def parse_qsub(stdout: str) -> str:
    job_id = stdout.strip().splitlines()[-1].strip() if stdout.strip() else ""
    if not _JOB_ID.match(job_id):
        raise BatchSystemError(f"qsub printed no job id: {stdout!r}")
    return job_id


def qdel_errors(stderr: str) -> list[str]:
    """qdel's complaints that matter: not about jobs that are gone or finished already."""
    return [line for line in stderr.splitlines()
            if line.strip() and not any(word in line for word in _QDEL_HARMLESS)]


# --- the backend -----------------------------------------------------------------------------

class PbsBackend:
    kind = "pbs"

    def __init__(self, runner: CommandRunner | None = None, *, name_limit: int = PBS_NAME_LIMIT,
                 arrays: bool = False, max_array_size: int = 0) -> None:
        """`name_limit`: the server's Job_Name limit (15 on older servers). `arrays`: submit
        a group's new workers as `-J` arrays (see array_batches; `max_array_size` is the
        server's limit, 0 none); polls then list subjobs too (`qstat -t`), and the reconcile
        records each task as `<seq>[<index>].<server>` (array_task_id). Sites that forbid
        arrays (NCI Gadi) turn them off in the site configuration."""
        if name_limit < MIN_NAME_LIMIT:
            raise ValueError(f"a PBS job name limit below {MIN_NAME_LIMIT} leaves no room")
        self.runner = runner or CommandRunner()
        self.name_limit = name_limit
        self.supports_arrays = arrays
        self.max_array_size = max_array_size
        self._json: bool | None = None  # None: not tried yet; False: the server has no JSON
        self._history = True  # False: the server keeps no job history (qstat -x refuses)
        self._last_seen: dict[str, ObservedJob] = {}

    @property
    def json_output(self) -> bool | None:
        return self._json

    def task_job_id(self, job_id: str, index: int) -> str:
        return array_task_id(job_id, index)

    def array_batches(self, indices: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
        return array_batches(indices, self.max_array_size)

    async def submit(self, request: JobRequest) -> str:
        os.makedirs(request.log_dir, exist_ok=True)
        argv = ["qsub"]
        if self.name_limit != PBS_NAME_LIMIT:
            # The script is rendered for the default limit; qsub options override directives.
            argv += ["-N", pbs_job_name(request.identity, self.name_limit)]
        _, out, _ = await self.runner.run(argv, stdin=request.script)
        return parse_qsub(out)

    def _listing_argv(self, json_output: bool) -> list[str]:
        argv = ["qstat", "-f"] + (["-F", "json"] if json_output else [])
        return argv + (["-t"] if self.supports_arrays else [])

    async def _list(self) -> dict[str, dict[str, Any]]:
        if self._json is not False:
            rc, out, err = await self.runner.run(self._listing_argv(True), check=False)
            if rc == 0:
                try:
                    records = parse_qstat_json(out)
                    self._json = True
                    return records
                except ValueError as exc:
                    log.warning("qstat printed invalid JSON (%s); parsing `qstat -f` text from "
                                "now on", exc)
                    self._json = False
            elif _UNSUPPORTED_OPTION.search(err) and not out.lstrip().startswith("{"):
                log.info("qstat has no JSON output; parsing `qstat -f` text from now on")
                self._json = False
            else:
                raise BatchSystemError(f"qstat exited {rc}: {err.strip() or out.strip()}")
        rc, out, err = await self.runner.run(self._listing_argv(False), check=False)
        if rc != 0:
            raise BatchSystemError(f"qstat exited {rc}: {err.strip() or out.strip()}")
        return parse_qstat_text(out)

    async def poll(self) -> list[ObservedJob]:
        jobs = await with_departed(observe_all(await self._list()), self._last_seen,
                                   self._departed)
        self._last_seen = {j.job_id: j for j in jobs}
        return jobs

    async def _departed(self, job_ids: list[str]) -> list[ObservedJob]:
        """Jobs the listing no longer shows, from their history records (one call per
        IDS_PER_CALL jobs, text)."""
        records: dict[str, dict[str, str]] = {}
        unknown: set[str] = set()
        why = "no longer reported by qstat"
        for batch in id_batches(job_ids):
            if not self._history:
                break
            try:
                rc, out, err = await self.runner.run(["qstat", "-x", "-f", *batch],
                                                     check=False)
            except BatchSystemError as exc:
                rc, out, err = 1, "", str(exc)
            found = parse_qstat_text(out)
            records.update(found)
            unknown.update(_UNKNOWN_JOB.findall(err))
            if _HISTORY_DISABLED in err:
                log.info("PBS keeps no job history: finished jobs are GONE, exit codes unknown")
                self._history = False
                why = "finished (PBS keeps no job history)"
            elif rc != 0 and not found and not _UNKNOWN_JOB.search(err):
                why = f"no longer reported by qstat; qstat -x failed: {err.strip()}"
        result = []
        for job_id in job_ids:
            identity = self._last_seen[job_id].identity
            attrs = records.get(job_id)
            job = observe(job_id, {**attrs, "Variable_List": {IDENTITY_VARIABLE:
                                                               identity.comment()}}
                          ) if attrs is not None else None
            if job is not None:
                # The history record may lack Variable_List: the identity is the one we knew.
                result.append(ObservedJob(job_id, identity, job.state, job.reason,
                                          job.exit_code, job.extra, job.started_at,
                                          job.ended_at))
            elif job_id in unknown:
                result.append(ObservedJob(job_id, identity, JobState.GONE,
                                          "unknown to qstat (purged from history)",
                                          started_at=self._last_seen[job_id].started_at))
            else:
                result.append(ObservedJob(job_id, identity, JobState.GONE, why,
                                          started_at=self._last_seen[job_id].started_at))
        return result

    async def usage(self, jobs: Sequence[ObservedJob]) -> dict[str, JobAccounting]:
        """Usage records of these jobs in ONE `qstat -x -f ID...` per IDS_PER_CALL jobs
        (text: several ids work in text on every version, not in JSON, see the module
        docstring); without job history, `qstat -f ID...` (finished jobs are then unknown).
        Unknown ids are left out. A failing qstat (the server unreachable) ends the query:
        what earlier calls found is returned, and with nothing found BatchSystemError is
        raised (the collector counts the failure and asks again; not "no record")."""
        found: dict[str, JobAccounting] = {}
        for batch in id_batches([j.job_id for j in jobs]):
            for _ in range(2):
                argv = ["qstat", *(["-x"] if self._history else []), "-f", *batch]
                try:
                    rc, out, err = await self.runner.run(argv, check=False)
                except BatchSystemError as exc:
                    rc, out, err = 1, "", str(exc)
                if _HISTORY_DISABLED in err and self._history:
                    self._history = False
                    continue
                records = parse_qstat_text(out)
                if rc != 0 and not records and not _UNKNOWN_JOB.search(err):
                    if not found:
                        raise BatchSystemError(f"qstat for usage failed: {err.strip()}")
                    log.info("qstat for usage failed part-way: %s", err.strip())
                    return found
                found.update((jid, accounting(jid, records[jid])) for jid in batch
                             if jid in records)
                break
        return found

    async def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        rc, _out, err = await self.runner.run(["qdel", *job_ids], check=False)
        problems = qdel_errors(err)
        if rc != 0 and problems:
            raise BatchSystemError(f"qdel exited {rc}: {' '.join(problems)}")
