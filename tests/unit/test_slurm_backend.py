"""hpc_bridge.backends.slurm: parsing of squeue/sacct output and the backend against fake
sbatch/squeue/scancel/sacct executables (tiny bash scripts first and only on PATH)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpc_bridge.backends.base import IDS_PER_CALL, BatchSystemError, CommandRunner
from hpc_bridge.backends.slurm import (
    SQUEUE_FORMAT,
    STATES,
    SlurmBackend,
    parse_exit_code,
    parse_sacct,
    parse_squeue,
    parse_state,
)
from hpc_bridge.model import JobIdentity, JobRequest, JobState, ObservedJob, Role

C = "dask-hpc:v1:default:c1:uid-1"


def ident(role: Role = Role.WORKER, index: int = 0) -> JobIdentity:
    return JobIdentity("default", "c1", "uid-1", role, "default", index)


# --- parse_state ---------------------------------------------------------------------------

@pytest.mark.parametrize(("word", "state"), [
    ("PENDING", JobState.PENDING),
    ("CONFIGURING", JobState.PENDING),
    ("REQUEUED", JobState.PENDING),
    ("REQUEUE_HOLD", JobState.PENDING),
    ("REQUEUE_FED", JobState.PENDING),
    ("RESV_DEL_HOLD", JobState.PENDING),
    ("RUNNING", JobState.RUNNING),
    ("SUSPENDED", JobState.RUNNING),
    ("STOPPED", JobState.RUNNING),
    ("RESIZING", JobState.RUNNING),
    ("SIGNALING", JobState.RUNNING),
    ("STAGE_OUT", JobState.RUNNING),
    ("COMPLETING", JobState.ENDING),
    ("COMPLETED", JobState.COMPLETED),
    ("CANCELLED", JobState.CANCELLED),
    ("CANCELLED by 1000", JobState.CANCELLED),
    ("REVOKED", JobState.CANCELLED),
    ("PREEMPTED", JobState.CANCELLED),
    ("DEADLINE", JobState.CANCELLED),
    ("FAILED", JobState.FAILED),
    ("TIMEOUT", JobState.FAILED),
    ("NODE_FAIL", JobState.FAILED),
    ("BOOT_FAIL", JobState.FAILED),
    ("OUT_OF_MEMORY", JobState.FAILED),
    ("SPECIAL_EXIT", JobState.FAILED),
])
def test_parse_state(word: str, state: JobState) -> None:
    assert parse_state(word) is state


def test_every_mapped_state_is_tested() -> None:
    for word, state in STATES.items():
        assert parse_state(word) is state


@pytest.mark.parametrize("word", ["SOMETHING_NEW", "", "pending", "RUNNING_SOMEHOW"])
def test_unknown_state_is_running_never_failed(word: str) -> None:
    assert parse_state(word) is JobState.RUNNING


def test_blank_state_is_running() -> None:
    assert parse_state("   ") is JobState.RUNNING


# --- parse_squeue --------------------------------------------------------------------------

T0, T1 = "2024-05-01T12:00:00", "2024-05-01T12:05:00"
NA = "N/A|N/A|0:00"  # %S|%e|%M of a job that has not started
SQUEUE_OUTPUT = "\n".join([
    f"12|PENDING|Priority|N/A|{NA}|12|{C}:worker:default:0",
    f"13|RUNNING|None|N/A|{T0}|2024-05-01T13:00:00|5:00|13|{C}:worker:default:1",
    f"99|RUNNING|None|N/A|{T0}|{T1}|5:00|99|(null)",
    f"14_2|RUNNING|None|2|{T0}|2024-05-01T13:00:00|5:00|17|{C}:worker:default:2",
    f"14_[3-5]|PENDING|JobArrayTaskLimit|3-5%2|{NA}|14|{C}:worker:default:2",
    f"100|PENDING|Resources|N/A|{NA}|100|someone's | comment | with pipes",
    f"15|PENDING|Resources|N/A|2024-05-01T14:00:00|2024-05-01T15:00:00|0:00|15|"
    f"{C}:scheduler:default:0",
    f"16|COMPLETING|None|N/A|{T0}|{T1}|5:00|16|{C}:worker:default:4",
    "garbage line without separators",
    "",
]) + "\n"


def test_parse_squeue() -> None:
    jobs = {j.job_id: j for j in parse_squeue(SQUEUE_OUTPUT)}
    assert sorted(jobs) == ["12", "13", "14_2", "14_3", "14_4", "14_5", "15", "16"]
    assert jobs["12"].state is JobState.PENDING
    assert jobs["12"].reason == "Priority"
    assert jobs["12"].identity == ident(index=0)
    assert jobs["13"].state is JobState.RUNNING
    assert jobs["13"].reason == ""  # squeue's "None" is no reason
    assert jobs["14_2"].identity == ident(index=2)
    # A pending array's tasks share one line; each becomes its own job with its own index.
    assert [jobs[f"14_{i}"].identity.index for i in (3, 4, 5)] == [3, 4, 5]
    assert jobs["14_4"].reason == "JobArrayTaskLimit"
    assert jobs["14_4"].state is JobState.PENDING
    assert jobs["15"].identity.role is Role.SCHEDULER
    assert jobs["16"].state is JobState.ENDING


def test_parse_squeue_comment_with_pipe_keeps_columns() -> None:
    # The comment is the last field and split at most 3 times: a '|' in it cannot shift
    # the other columns; an identity followed by junk is not ours.
    text = (f"20|RUNNING|None|N/A|{NA}|20|{C}:worker:default:0|junk\n"
            f"21|RUNNING|None|N/A|{NA}|21|a|b|c\n")
    assert parse_squeue(text) == []


def test_parse_squeue_strips_padding() -> None:
    jobs = parse_squeue(f"  12 |PENDING |Priority | N/A | N/A | N/A | 0:00 | 12 | "
                        f"{C}:worker:default:0 \n")
    assert [(j.job_id, j.state, j.reason) for j in jobs] == [
        ("12", JobState.PENDING, "Priority")]


# --- parse_sacct / exit codes --------------------------------------------------------------

@pytest.mark.parametrize(("text", "code"), [
    ("0:0", 0), ("3:0", 3), ("0:9", 137), ("0:15", 143), ("1:0", 1), ("", None), ("x:y", None),
])
def test_parse_exit_code(text: str, code: int | None) -> None:
    assert parse_exit_code(text) == code


def test_parse_sacct() -> None:
    text = "\n".join([
        "123|COMPLETED|0:0",
        "123.batch|COMPLETED|0:0",
        "123.extern|COMPLETED|0:0",
        "124|FAILED|3:0",
        "124.batch|FAILED|3:0",
        "125|CANCELLED by 0|0:9",
        "126_1|TIMEOUT|0:0",
        "|FAILED|1:0",
        "short|line",
    ])
    found = parse_sacct(text)
    assert found == {
        "123": (JobState.COMPLETED, 0, "COMPLETED", None, None),
        "124": (JobState.FAILED, 3, "FAILED", None, None),
        "125": (JobState.CANCELLED, 137, "CANCELLED by 0", None, None),
        "126_1": (JobState.FAILED, 0, "TIMEOUT", None, None),
    }


# --- the backend against fake commands -----------------------------------------------------

FAKE = r"""#!{bash}
# Fake SLURM client: log argv, keep stdin of sbatch, print canned output.
name="${{0##*/}}"
d="$FAKE_SLURM_DIR"
(IFS=$'\t'; printf '%s\n' "$name"$'\t'"$*") >> "$d/calls.log"
key="$name"
for a in "$@"; do
  if [ "$a" = "--completion" ]; then key="$name-completion"; fi
done
if [ "$name" = sbatch ]; then {cat} > "$d/sbatch.stdin"; fi
if [ -f "$d/$key.out" ]; then {cat} "$d/$key.out"; fi
if [ -f "$d/$key.err" ]; then {cat} "$d/$key.err" >&2; fi
if [ -f "$d/$key.rc" ]; then exit "$(< "$d/$key.rc")"; fi
exit 0
"""


class FakeSlurm:
    def __init__(self, root: Path) -> None:
        self.dir = root

    def set(self, key: str, out: str = "", err: str = "", rc: int = 0) -> None:
        (self.dir / f"{key}.out").write_text(out)
        (self.dir / f"{key}.err").write_text(err)
        (self.dir / f"{key}.rc").write_text(str(rc))

    def calls(self, name: str | None = None) -> list[list[str]]:
        log = self.dir / "calls.log"
        if not log.exists():
            return []
        rows = [[a for a in line.split("\t") if a] for line in log.read_text().splitlines()]
        return [r for r in rows if name is None or r[0] == name]

    def remove(self, command: str) -> None:
        (self.dir / "bin" / command).unlink()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    bash, cat = shutil.which("bash"), shutil.which("cat")
    assert bash and cat
    bindir = tmp_path / "fake-slurm" / "bin"
    bindir.mkdir(parents=True)
    for command in ("sbatch", "squeue", "scancel", "sacct"):
        path = bindir / command
        path.write_text(FAKE.format(bash=bash, cat=cat))
        path.chmod(0o755)
    # Only the fakes are on PATH, so a real SLURM on this machine is never reached.
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("FAKE_SLURM_DIR", str(bindir.parent))
    return FakeSlurm(bindir.parent)


def squeue_lines(*rows: tuple[str, str, str, int]) -> str:
    return "".join(f"{jid}|{state}|{reason}|N/A|{NA}|{jid}|{C}:worker:default:{i}\n"
                   for jid, state, reason, i in rows)


async def test_poll_is_one_squeue_call(fake: FakeSlurm) -> None:
    fake.set("squeue", SQUEUE_OUTPUT)
    backend = SlurmBackend()
    jobs = await backend.poll()
    assert len(jobs) == 8  # the pending array line is three tasks
    calls = fake.calls()
    assert calls == [["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}",
                      "--me"]]
    assert backend.runner.calls["squeue"] == 1
    await backend.poll()
    assert len(fake.calls("squeue")) == 2
    assert fake.calls("sacct") == []


async def test_poll_all_users_omits_me(fake: FakeSlurm) -> None:
    fake.set("squeue", "")
    await SlurmBackend(all_users=True).poll()
    assert "--me" not in fake.calls("squeue")[0]


async def test_poll_failure_raises(fake: FakeSlurm) -> None:
    fake.set("squeue", err="squeue: error: Unable to contact slurm controller", rc=1)
    with pytest.raises(BatchSystemError, match="Unable to contact slurm controller"):
        await SlurmBackend().poll()


async def test_submit_sends_script_on_stdin(fake: FakeSlurm, tmp_path: Path) -> None:
    fake.set("sbatch", "4242;cluster\n")
    log_dir = tmp_path / "logs" / "c1"
    script = "#!/bin/bash\n#SBATCH -J x\necho 'hello; $(id)'\n"
    job_id = await SlurmBackend().submit(JobRequest(ident(), script, str(log_dir)))
    assert job_id == "4242"
    assert fake.calls() == [["sbatch", "--parsable", f"--chdir={log_dir}"]]
    assert (fake.dir / "sbatch.stdin").read_text() == script
    assert log_dir.is_dir()


async def test_submit_plain_job_id(fake: FakeSlurm, tmp_path: Path) -> None:
    fake.set("sbatch", "17\n")
    assert await SlurmBackend().submit(JobRequest(ident(), "true\n", str(tmp_path))) == "17"


async def test_submit_without_job_id_fails(fake: FakeSlurm, tmp_path: Path) -> None:
    fake.set("sbatch", "\n")
    with pytest.raises(BatchSystemError, match="no job id"):
        await SlurmBackend().submit(JobRequest(ident(), "true\n", str(tmp_path)))


async def test_submit_error_carries_stderr(fake: FakeSlurm, tmp_path: Path) -> None:
    fake.set("sbatch", err="sbatch: error: invalid partition specified: nope", rc=1)
    with pytest.raises(BatchSystemError, match="invalid partition specified"):
        await SlurmBackend().submit(JobRequest(ident(), "true\n", str(tmp_path)))


async def test_cancel_is_one_call(fake: FakeSlurm) -> None:
    backend = SlurmBackend()
    await backend.cancel(["12", "13", "14_2"])
    assert fake.calls() == [["scancel", "12", "13", "14_2"]]
    await backend.cancel([])
    assert len(fake.calls()) == 1


@pytest.mark.parametrize("err", [
    "scancel: error: Kill job error on job id 12: Invalid job id specified",
    "scancel: error: Kill job error on job id 12: Job/step already completing or completed",
])
async def test_cancel_of_finished_jobs_is_not_an_error(fake: FakeSlurm, err: str) -> None:
    fake.set("scancel", err=err, rc=1)
    await SlurmBackend().cancel(["12"])


async def test_cancel_other_error_raises(fake: FakeSlurm) -> None:
    fake.set("scancel", err="scancel: error: Access/permission denied", rc=1)
    with pytest.raises(BatchSystemError, match="permission denied"):
        await SlurmBackend().cancel(["12"])


async def test_departed_jobs_asked_of_sacct_once(fake: FakeSlurm) -> None:
    backend = SlurmBackend()
    fake.set("squeue", squeue_lines(("12", "PENDING", "Priority", 0),
                                    ("13", "RUNNING", "None", 1),
                                    ("14", "RUNNING", "None", 2)))
    assert len(await backend.poll()) == 3
    fake.set("squeue", squeue_lines(("14", "RUNNING", "None", 2)))
    fake.set("sacct", "12|CANCELLED by 0|0:0\n13|FAILED|3:0\n13.batch|FAILED|3:0\n")
    jobs = {j.job_id: j for j in await backend.poll()}
    sacct = fake.calls("sacct")
    assert len(sacct) == 1
    assert sacct[0] == ["sacct", "--noheader", "--parsable2",
                        "--format=JobID,State,ExitCode,Start,End", "--jobs=12,13"]
    assert jobs["12"].state is JobState.CANCELLED
    assert jobs["13"].state is JobState.FAILED
    assert jobs["13"].exit_code == 3
    assert jobs["13"].reason == "FAILED"
    assert jobs["13"].identity == ident(index=1)
    assert jobs["14"].state is JobState.RUNNING
    # Settled jobs are reported once; the next poll asks sacct nothing.
    jobs = {j.job_id: j for j in await backend.poll()}
    assert sorted(jobs) == ["14"]
    assert len(fake.calls("sacct")) == 1
    assert len(fake.calls("squeue")) == 3


async def test_departed_job_unknown_to_sacct_is_gone(fake: FakeSlurm) -> None:
    backend = SlurmBackend()
    fake.set("squeue", squeue_lines(("12", "RUNNING", "None", 0)))
    await backend.poll()
    fake.set("squeue", "")
    fake.set("sacct", "")
    (job,) = await backend.poll()
    assert job.state is JobState.GONE
    assert job.exit_code is None


async def test_departed_after_terminal_state_not_asked(fake: FakeSlurm) -> None:
    backend = SlurmBackend()
    fake.set("squeue", squeue_lines(("12", "COMPLETED", "None", 0)))
    await backend.poll()
    fake.set("squeue", "")
    assert await backend.poll() == []
    assert fake.calls("sacct") == []


async def test_accounting_disabled_falls_back_to_completion_log(fake: FakeSlurm) -> None:
    backend = SlurmBackend()
    fake.set("sacct", err="sacct: error: Slurm accounting storage is disabled\n", rc=1)
    fake.set("sacct-completion", "12|COMPLETED|0:0\n")
    fake.set("squeue", squeue_lines(("12", "RUNNING", "None", 0), ("13", "RUNNING", "None", 1)))
    await backend.poll()
    fake.set("squeue", squeue_lines(("13", "RUNNING", "None", 1)))
    jobs = {j.job_id: j for j in await backend.poll()}
    assert jobs["12"].state is JobState.COMPLETED
    assert jobs["12"].exit_code == 0
    sacct = fake.calls("sacct")
    assert len(sacct) == 2
    assert "--completion" not in sacct[0]
    assert sacct[1][:2] == ["sacct", "--completion"]
    # remembered: the next departure goes straight to the completion log
    fake.set("squeue", "")
    fake.set("sacct-completion", "13|FAILED|1:0\n")
    jobs = {j.job_id: j for j in await backend.poll()}
    assert jobs["13"].state is JobState.FAILED
    assert jobs["13"].exit_code == 1
    sacct = fake.calls("sacct")
    assert len(sacct) == 3
    assert sacct[2][:2] == ["sacct", "--completion"]
    assert sacct[2][-1] == "--jobs=13"


async def test_sacct_unusable_gives_gone_and_is_not_retried(fake: FakeSlurm) -> None:
    backend = SlurmBackend()
    fake.set("sacct", err="sacct: error: Slurm accounting storage is disabled\n", rc=1)
    fake.set("sacct-completion", err="sacct: error: Slurm job completion is disabled\n", rc=1)
    fake.set("squeue", squeue_lines(("12", "RUNNING", "None", 0), ("13", "RUNNING", "None", 1)))
    await backend.poll()
    fake.set("squeue", squeue_lines(("13", "RUNNING", "None", 1)))
    jobs = {j.job_id: j for j in await backend.poll()}
    assert jobs["12"].state is JobState.GONE
    assert len(fake.calls("sacct")) == 2
    fake.set("squeue", "")
    (job,) = await backend.poll()
    assert job.job_id == "13"
    assert job.state is JobState.GONE
    assert len(fake.calls("sacct")) == 2  # not asked again


USAGE_LINE = ("101|COMPLETED|2026-05-28T10:00:00|2026-05-28T10:00:00|2026-05-28T10:02:00|"
              "2026-05-28T11:02:00|16|cpu=16|3600\n")


async def test_a_passing_sacct_failure_is_asked_again(fake: FakeSlurm) -> None:
    """slurmdbd restarting is this time's failure, not the site's: raised (the collector
    counts a failed query, not "no record"), and the next query asks sacct again (not the
    completion log, and not never again)."""
    job = ObservedJob("101", ident(), JobState.RUNNING)
    backend = SlurmBackend()
    fake.set("sacct", err="sacct: error: Problem talking to the database: Connection "
             "refused\n", rc=1)
    with pytest.raises(BatchSystemError, match="Problem talking to the database"):
        await backend.usage([job])
    fake.set("sacct", USAGE_LINE)
    found = await backend.usage([job])
    assert found["101"].final and found["101"].cores == 16
    assert [c[:2] for c in fake.calls("sacct")] == [["sacct", "--noheader"]] * 2


async def test_sacct_asks_for_many_jobs_in_batches(fake: FakeSlurm) -> None:
    """20,000 jobs (400 clusters of 50 workers): one --jobs argument with every id is past
    the kernel's 128 KiB limit for one argument (E2BIG); asked IDS_PER_CALL at a time,
    every id is asked once and the answers are merged."""
    jobs = [ObservedJob(str(100 + i), ident(index=i), JobState.RUNNING) for i in range(20_000)]
    fake.set("sacct", USAGE_LINE)
    found = await SlurmBackend().usage(jobs)
    assert list(found) == ["101"]
    calls = fake.calls("sacct")
    assert len(calls) == 20_000 // IDS_PER_CALL
    asked = [a.removeprefix("--jobs=").split(",") for c in calls for a in c
             if a.startswith("--jobs=")]
    assert all(len(batch) == IDS_PER_CALL for batch in asked)
    assert [i for batch in asked for i in batch] == [j.job_id for j in jobs]


async def test_sacct_missing_gives_gone(fake: FakeSlurm) -> None:
    backend = SlurmBackend()
    fake.remove("sacct")
    fake.set("squeue", squeue_lines(("12", "RUNNING", "None", 0)))
    await backend.poll()
    fake.set("squeue", "")
    (job,) = await backend.poll()
    assert job.state is JobState.GONE


async def test_missing_command_is_a_batch_system_error(fake: FakeSlurm) -> None:
    fake.remove("squeue")
    runner = CommandRunner()
    with pytest.raises(BatchSystemError, match="command not found"):
        await SlurmBackend(runner).poll()
    assert runner.errors["squeue"] == 1


async def test_runner_prefix_and_ssh_quoting(fake: FakeSlurm) -> None:
    runner = CommandRunner(prefix=["ssh", "login1"])
    assert runner._argv(["squeue", "--format=%i|%T"]) == ["ssh", "login1", "squeue",
                                                           "'--format=%i|%T'"]
    assert CommandRunner(prefix=["sudo", "-u", "alice"])._argv(["scancel", "1"]) == [
        "sudo", "-u", "alice", "scancel", "1"]


# --- usage records (hpc_bridge.accounting asks; tests/unit/test_usage.py parses) -----------

async def test_usage_is_one_sacct_call_and_asks_the_completion_log_by_own_ids(
        fake: FakeSlurm) -> None:
    """With slurmdbd: ids as squeue prints them. Without (the completion log): an array
    task by the id squeue showed for it while it ran (%A), never `<array>_<index>`, which
    the log would answer with another task's record; a task never seen running is left
    out. One sacct per query either way, and the mode is remembered."""
    def job(job_id: str, raw: str | None = None) -> ObservedJob:
        return ObservedJob(job_id, ident(), JobState.RUNNING,
                           extra={"raw_job_id": raw} if raw else {})
    jobs = [job("40"), job("41_0", "42"), job("41_1")]
    fake.set("sacct", err="sacct: error: Slurm accounting storage is disabled\n", rc=1)
    fake.set("sacct-completion",
             "40|COMPLETED|2026-05-28T10:00:00|2026-05-28T10:00:00|2026-05-28T10:00:05|"
             "2026-05-28T10:10:05|4||600\n"
             "42|CANCELLED by 0|2026-05-28T10:00:00|2026-05-28T10:00:00|2026-05-28T10:00:06|"
             "2026-05-28T10:05:06|2||300\n")
    backend = SlurmBackend()
    found = await backend.usage(jobs)
    assert sorted(found) == ["40", "41_0"]  # keyed by our ids
    assert (found["41_0"].job_id, found["41_0"].cores, found["41_0"].elapsed) == (
        "41_0", 2, 300.0)
    assert found["40"].source == "sacct-completion" and found["40"].gpus is None
    first, second = fake.calls("sacct")
    assert "--completion" not in first and first[-1] == "--jobs=40,41_0,41_1"
    assert second[:2] == ["sacct", "--completion"] and "--allocations" in second
    assert second[-1] == "--jobs=40,42"
    await backend.usage(jobs)
    assert len(fake.calls("sacct")) == 3  # straight to the completion log now
    assert await backend.usage([job("41_1")]) == {}  # nothing to ask: no call
    assert len(fake.calls("sacct")) == 3
