"""hpc_bridge.backends.pbs and the PBS job scripts.

No PBS server runs here: rendering is checked line by line, and the parsers and the backend
are run against real qsub/qstat/qdel outputs kept in tests/fixtures/pbs (each file names its
source and PBS version, and what was adapted). The backend talks to fake qsub/qstat/qdel
executables that replay those transcripts; they are the only entries on PATH, so no real
batch client can be reached.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dask.config
import pytest

from dask_hpc_operator.constants import API_VERSION
from dask_hpc_operator.model import ClusterModel
from dask_hpc_operator.planning import DEFAULT_FAILURE_POLICY, plan_cluster
from dask_hpc_operator.reconcile import ClusterReconciler, Runtime
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import validate
from hpc_bridge.backends.base import IDS_PER_CALL, BatchSystemError
from hpc_bridge.backends.pbs import (
    EXEC_CODES,
    PBS_NAME_LIMIT,
    PbsBackend,
    array_directive,
    array_task_id,
    finished_state,
    observe,
    observe_all,
    parse_qstat_json,
    parse_qstat_text,
    parse_qsub,
    pbs_job_name,
    qdel_errors,
    split_variable_list,
)
from hpc_bridge.model import JobIdentity, JobRequest, JobState, JobTemplate, ObservedJob, Role
from hpc_bridge.scripts import (
    RenderContext,
    pbs_memory,
    pbs_walltime,
    render,
    render_scheduler,
    render_worker,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "pbs"
UID = "6f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"  # the uid the adapted fixtures carry
PYTHON = "/opt/conda/bin/python"
LOGS = "/scratch/ab12/dask/c1/logs"
NOW_S = 1_700_000_000.0  # the reconcile's clock in plans: after every recorded transcript


def ident(role: Role = Role.WORKER, index: int = 0, uid: str = UID) -> JobIdentity:
    return JobIdentity("default", "c1", uid, role, "default", index)


# --- transcripts -----------------------------------------------------------------------------

@dataclass
class Transcript:
    stdout: str
    stderr: str
    rc: int
    header: str

    def retarget(self, old: str, new: str) -> Transcript:
        """The same output about another job id (for a test that follows one job)."""
        return Transcript(self.stdout.replace(old, new), self.stderr.replace(old, new),
                          self.rc, self.header)


def transcript(name: str) -> Transcript:
    sections: dict[str, list[str]] = {"stdout": [], "stderr": []}
    header: list[str] = []
    current = None
    rc = 0
    for line in (FIXTURES / name).read_text().splitlines(keepends=True):
        if current is None and line.startswith("#"):
            header.append(line)
            match = re.match(r"# Exit status: (\d+)", line)
            if match:
                rc = int(match.group(1))
            continue
        if line.rstrip("\n") in ("--- stdout", "--- stderr"):
            current = line.rstrip("\n")[4:]
            continue
        sections[current or "stdout"].append(line)
    return Transcript("".join(sections["stdout"]), "".join(sections["stderr"]), rc,
                      "".join(header))


def all_fixtures() -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.txt"))


@pytest.mark.parametrize("name", all_fixtures())
def test_every_fixture_names_its_source(name: str) -> None:
    t = transcript(name)
    assert "Source" in t.header or "NOT a captured transcript" in t.header
    assert "Command:" in t.header
    assert t.stdout or t.stderr


# --- rendering ---------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_site_pbs_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # dask-jobqueue falls back to $PBS_ACCOUNT for `-A`; the operator's host may have it.
    monkeypatch.delenv("PBS_ACCOUNT", raising=False)


def ctx(**kw: object) -> RenderContext:
    return RenderContext(backend="pbs", python=PYTHON,
                         scheduler_file="/scratch/ab12/dask/c1/scheduler.json",
                         log_dir=LOGS, **kw)  # type: ignore[arg-type]


def pbs_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#PBS")]


WORKER_ID = "dask-hpc:v1:default:c1:" + UID + ":worker:default:0"
SCHED_ID = "dask-hpc:v1:default:c1:" + UID + ":scheduler:default:0"


def test_cpu_worker_script_exactly() -> None:
    template = JobTemplate(cores=8, memory="16GiB", walltime="02:30:00", queue="normal",
                           account="ab12")
    script = render_worker(ctx(), ident(), template).script
    assert script == "\n".join([
        "#!/usr/bin/env bash",
        "",
        f"#PBS -N {pbs_job_name(ident())}",
        "#PBS -q normal",
        "#PBS -l select=1:ncpus=8:mem=16gb",
        "#PBS -l walltime=02:30:00",
        f"#PBS -e {LOGS}/",
        f"#PBS -o {LOGS}/",
        "#PBS -P ab12",
        f"#PBS -v DASK_HPC_IDENTITY={WORKER_ID}",
        f"export DASK_HPC_IDENTITY={WORKER_ID}",
        f"{PYTHON} -m distributed.cli.dask_worker --scheduler-file "
        "/scratch/ab12/dask/c1/scheduler.json --name dask.default.c1.default.0 --nthreads 8 "
        "--memory-limit 16.00GiB --nanny --death-timeout 900 --lifetime 8400s "
        "--lifetime-stagger 200s",
        "",
    ])


def test_scheduler_script_exactly() -> None:
    template = JobTemplate(cores=2, memory="8GiB", walltime="1-00:00:00", queue="express",
                           account="ab12")
    script = render_scheduler(ctx(), ident(Role.SCHEDULER), template).script
    assert script == "\n".join([
        "#!/usr/bin/env bash",
        "",
        f"#PBS -N {pbs_job_name(ident(Role.SCHEDULER))}",
        "#PBS -q express",
        "#PBS -l select=1:ncpus=2:mem=8gb",
        "#PBS -l walltime=24:00:00",
        f"#PBS -e {LOGS}/",
        f"#PBS -o {LOGS}/",
        "#PBS -P ab12",
        f"#PBS -v DASK_HPC_IDENTITY={SCHED_ID}",
        f"export DASK_HPC_IDENTITY={SCHED_ID}",
        f"{PYTHON} -m distributed.cli.dask_scheduler --scheduler-file "
        "/scratch/ab12/dask/c1/scheduler.json --port 0 --dashboard-address :0",
        "",
    ])


def test_high_memory_worker_header() -> None:
    template = JobTemplate(cores=48, memory="1470GiB", walltime="48:00:00", queue="megamem",
                           account="ab12", extra_directives=("-l jobfs=400GB",
                                                             "-l storage=gdata/ab12"))
    assert pbs_lines(render_worker(ctx(), ident(), template).script) == [
        f"#PBS -N {pbs_job_name(ident())}",
        "#PBS -q megamem",
        "#PBS -l select=1:ncpus=48:mem=1470gb",
        "#PBS -l walltime=48:00:00",
        f"#PBS -e {LOGS}/",
        f"#PBS -o {LOGS}/",
        "#PBS -P ab12",
        f"#PBS -v DASK_HPC_IDENTITY={WORKER_ID}",
        "#PBS -l jobfs=400GB",
        "#PBS -l storage=gdata/ab12",
    ]


def test_gpu_worker_header_asks_ngpus_and_place() -> None:
    template = JobTemplate(cores=12, memory="96GiB", gpus=1, queue="gpuvolta", account="ab12",
                           extra_directives=("-l place=excl",))
    assert pbs_lines(render_worker(ctx(), ident(), template).script) == [
        f"#PBS -N {pbs_job_name(ident())}",
        "#PBS -q gpuvolta",
        "#PBS -l select=1:ncpus=12:ngpus=1:mem=96gb",
        "#PBS -l walltime=01:00:00",
        f"#PBS -e {LOGS}/",
        f"#PBS -o {LOGS}/",
        "#PBS -P ab12",
        f"#PBS -v DASK_HPC_IDENTITY={WORKER_ID}",
        "#PBS -l place=excl",
    ]


def test_minimal_template_has_no_queue_or_project() -> None:
    lines = pbs_lines(render_worker(ctx(), ident(), JobTemplate()).script)
    assert not any(line.startswith(("#PBS -q", "#PBS -P", "#PBS -A")) for line in lines)
    assert "#PBS -l select=1:ncpus=1:mem=4gb" in lines


def test_project_is_p_never_a(monkeypatch: pytest.MonkeyPatch) -> None:
    script = render_worker(ctx(), ident(), JobTemplate(account="ab12")).script
    assert "#PBS -P ab12" in script and "#PBS -A" not in script
    assert "#SBATCH" not in script and "--comment" not in script


def test_site_directives_skip_drops_generated_lines_but_never_the_identity() -> None:
    # A site whose PBS rejects a generated line lists it in jobqueue.yaml, as for
    # dask-jobqueue's own lines; the identity cannot be skipped (adoption needs it).
    skip = ["-P", "walltime", "DASK_HPC_IDENTITY", "-N"]
    with dask.config.set({"jobqueue.pbs.job-directives-skip": skip}):
        lines = pbs_lines(render_worker(ctx(), ident(), JobTemplate(account="ab12")).script)
    assert lines == [
        "#PBS -l select=1:ncpus=1:mem=4gb",
        f"#PBS -e {LOGS}/",
        f"#PBS -o {LOGS}/",
        f"#PBS -v DASK_HPC_IDENTITY={WORKER_ID}",
    ]


def test_worker_array_uses_j_and_the_array_index() -> None:
    request = render_worker(ctx(), ident(index=4), JobTemplate(), array=(4, 5, 6, 7))
    lines = pbs_lines(request.script)
    assert "#PBS -J 4-7" in lines
    assert not any("--array" in line for line in lines)
    assert "--name dask.default.c1.default.${PBS_ARRAY_INDEX}" in request.script
    assert request.array == (4, 5, 6, 7)


@pytest.mark.parametrize(("indices", "directive"), [
    ((0, 1, 2, 3), "-J 0-3"), ((3, 1, 2), "-J 1-3"), ((0, 2, 4), "-J 0-4:2"), ((7,), "-J 7-7"),
])
def test_array_directive(indices: tuple[int, ...], directive: str) -> None:
    assert array_directive(indices) == directive


@pytest.mark.parametrize("indices", [(0, 1, 3), (0, 2, 3), ()])
def test_array_directive_refuses_what_pbs_cannot_say(indices: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        array_directive(indices)


def test_array_task_id() -> None:
    assert array_task_id("9[].djoko", 3) == "9[3].djoko"  # qsub-array-submitted.txt's id
    assert PbsBackend().task_job_id("1234[].pbs", 0) == "1234[0].pbs"
    with pytest.raises(ValueError):
        array_task_id("1234.pbs", 0)


@pytest.mark.parametrize(("memory", "pbs"), [
    ("16GiB", "16gb"), ("190GiB", "190gb"), ("4GiB", "4gb"), ("512MiB", "512mb"),
    ("1.5GiB", "1536mb"), ("2TiB", "2tb"), ("16GB", "15259mb"),
])
def test_memory_in_pbs_units(memory: str, pbs: str) -> None:
    assert pbs_memory(memory) == pbs


@pytest.mark.parametrize(("walltime", "pbs"), [
    ("01:00:00", "01:00:00"), ("48:00:00", "48:00:00"), ("1-02:30:00", "26:30:00"),
])
def test_walltime_in_pbs_form(walltime: str, pbs: str) -> None:
    assert pbs_walltime(walltime) == pbs


def test_job_name_is_short_deterministic_and_starts_with_a_letter() -> None:
    names = {pbs_job_name(ident(index=i)) for i in range(50)}
    assert len(names) == 50
    for name in names:
        assert len(name) <= PBS_NAME_LIMIT and name[0].isalpha() and " " not in name
    assert pbs_job_name(ident()) == pbs_job_name(ident())
    assert pbs_job_name(ident(uid="other")) != pbs_job_name(ident())
    assert pbs_job_name(ident(Role.SCHEDULER)).startswith("dasks0-")
    assert pbs_job_name(ident()).startswith("daskw0-")
    # Where the server allows long names, the readable one is kept.
    assert pbs_job_name(ident(), limit=236) == "dask.default.c1.default.0"
    with pytest.raises(ValueError):
        pbs_job_name(ident(), limit=5)
    with pytest.raises(ValueError):
        PbsBackend(name_limit=7)


def test_render_dispatches_on_role() -> None:
    assert "dask_scheduler" in render(ctx(), ident(Role.SCHEDULER), JobTemplate()).script
    assert "dask_worker" in render(ctx(), ident(), JobTemplate()).script


# --- parsing -----------------------------------------------------------------------------------

def test_parse_qsub() -> None:
    assert parse_qsub(transcript("qsub-submitted.txt").stdout) == "0.pbspro"
    assert parse_qsub(transcript("qsub-array-submitted.txt").stdout) == "9[].djoko"
    for junk in ["", "\n", "qsub: Unknown queue\n", "hello world\n"]:
        with pytest.raises(BatchSystemError, match="no job id"):
            parse_qsub(junk)


def test_json_listing_keeps_only_jobs_with_an_identity() -> None:
    records = parse_qstat_json(transcript("qstat-json-listing-openpbs20.txt").stdout)
    assert sorted(records) == ["1006.qot-calc0", "1007.qot-calc0"]
    (job,) = observe_all(records)
    assert job.job_id == "1006.qot-calc0"
    assert job.identity == ident()
    assert job.state is JobState.RUNNING
    assert job.extra == {"pbs_state": "R"}


def test_json_running_with_numeric_variables() -> None:
    (job,) = observe_all(parse_qstat_json(
        transcript("qstat-json-running-metacentrum.txt").stdout))
    assert job.job_id == "12860476.meta-pbs.metacentrum.cz"
    assert job.identity == ident(Role.SCHEDULER)
    assert job.state is JobState.RUNNING


def test_json_held_job_is_pending_not_failed() -> None:
    (job,) = observe_all(parse_qstat_json(transcript("qstat-json-held-buildtest.txt").stdout))
    assert (job.job_id, job.state, job.reason) == ("157.pbs", JobState.PENDING, "held")
    assert job.identity == ident(index=1)


@pytest.mark.parametrize("name", ["qstat-json-empty-2024.txt", "qstat-json-unknown-job.txt"])
def test_json_without_jobs_member_is_empty(name: str) -> None:
    assert parse_qstat_json(transcript(name).stdout) == {}


def test_invalid_json_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_qstat_json(transcript("qstat-json-invalid-number.txt").stdout)


def test_text_queued_then_running_reassembles_the_wrapped_identity() -> None:
    queued = parse_qstat_text(transcript("qstat-text-queued.txt").stdout)
    record = queued["171390152.mycluster"]
    # Wrapped values are joined back exactly, including a break inside a token.
    assert record["Resource_List.select"] == (
        "1:ncpus=1:mpiprocs=1:mem=524288000:job_tags=normal:jobfs=104857600")
    assert split_variable_list(record["Variable_List"])["DASK_HPC_IDENTITY"] == WORKER_ID
    (job,) = observe_all(queued)
    assert (job.state, job.reason, job.identity) == (JobState.PENDING, "queued", ident())
    (job,) = observe_all(parse_qstat_text(transcript("qstat-text-running.txt").stdout))
    assert (job.job_id, job.state) == ("171390152.mycluster", JobState.RUNNING)


def test_text_history_records() -> None:
    (done,) = observe_all(parse_qstat_text(
        transcript("qstat-text-history-finished.txt").stdout))
    assert (done.state, done.exit_code, done.reason) == (JobState.COMPLETED, 0, "Exit_status 0")
    (failed,) = observe_all(parse_qstat_text(
        transcript("qstat-text-history-failed.txt").stdout))
    assert (failed.state, failed.exit_code) == (JobState.FAILED, 127)
    assert failed.reason == "Exit_status 127"


def test_text_with_a_multiline_bash_function_parses_on() -> None:
    records = parse_qstat_text(transcript("qstat-text-multiline-func.txt").stdout)
    record = records["171389798.mycluster"]
    assert record["project"] == "proj"
    assert record["etime"] == "Wed Jun 17 04:50:46 2026"
    variables = split_variable_list(record["Variable_List"])
    assert variables["_"] == "/opt/pbs/default/bin/qsub"
    assert variables["PBS_O_QUEUE"] == "normal"
    assert observe_all(records) == []


def test_text_listing_of_other_users() -> None:
    records = parse_qstat_text(transcript("qstat-text-listing-pbspro2013.txt").stdout)
    assert [(jid, r["job_state"]) for jid, r in records.items()] == [
        ("68350.mycluster", "Q"), ("68351.mycluster", "Q"), ("69301.mycluster", "R"),
        ("69302.mycluster", "H"), ("74164.mycluster", "R"), ("74165.mycluster", "H")]
    assert records["68350.mycluster"]["Error_Path"] == (
        "mycluster.cluster:/home/usernum1/scratch/cptest/scaletest/PTOscaletest/testjob.err")
    assert records["69301.mycluster"]["exec_vnode"] == (
        "(b141:ncpus=16)+(b142:ncpus=16)+(b143:ncpus=16)+(b144:ncpus=16)")
    assert records["74164.mycluster"]["etime"] == "Mon Apr 22 07:17:34 2013"
    assert observe_all(records) == []


def test_split_variable_list_honours_escaped_commas() -> None:
    assert split_variable_list(r"A=1,B=x\,y,C=,D") == {"A": "1", "B": "x,y", "C": ""}


def attrs(state: str, **more: object) -> dict[str, object]:
    return {"job_state": state, "Variable_List": {"DASK_HPC_IDENTITY": WORKER_ID}, **more}


@pytest.mark.parametrize(("letter", "state"), [
    ("Q", JobState.PENDING), ("H", JobState.PENDING), ("W", JobState.PENDING),
    ("T", JobState.PENDING), ("R", JobState.RUNNING), ("S", JobState.RUNNING),
    ("U", JobState.RUNNING), ("B", JobState.RUNNING), ("E", JobState.ENDING),
    ("M", JobState.GONE), ("Z", JobState.RUNNING), ("", JobState.RUNNING),
])
def test_state_letters(letter: str, state: JobState) -> None:
    job = observe("1.srv", attrs(letter))
    assert job is not None and job.state is state


def test_pending_reason_is_the_schedulers_comment() -> None:
    job = observe("1.srv", attrs("Q", comment="Not Running: Insufficient amount of resource: "
                                              "ncpus"))
    assert job is not None and job.reason.startswith("Not Running: Insufficient")


@pytest.mark.parametrize(("more", "state", "code", "reason"), [
    ({"Exit_status": 0}, JobState.COMPLETED, 0, "Exit_status 0"),
    ({"Exit_status": 1}, JobState.FAILED, 1, "Exit_status 1"),
    ({"Exit_status": "271"}, JobState.FAILED, 143, "killed by signal 15 (Exit_status 271)"),
    ({"Exit_status": -29}, JobState.FAILED, -29, EXEC_CODES[-29]),
    ({"Exit_status": -99}, JobState.FAILED, -99, "Exit_status -99"),
    ({}, JobState.CANCELLED, None, "finished without an exit status (deleted before it ran)"),
    ({"Exit_status": 271, "substate": 91}, JobState.CANCELLED, 271, "deleted (Exit_status 271)"),
    ({"substate": "91"}, JobState.CANCELLED, None, "deleted"),
    ({"exit_status": "0"}, JobState.COMPLETED, 0, "Exit_status 0"),  # TORQUE's spelling
])
def test_finished_states(more: dict[str, object], state: JobState, code: int | None,
                         reason: str) -> None:
    assert finished_state(more) == (state, code, reason)
    for letter in "FXC":
        job = observe("1.srv", attrs(letter, **more))
        assert job is not None and (job.state, job.exit_code) == (state, code)


def test_subjobs_take_their_array_index_and_parents_are_skipped() -> None:
    records = {"9[].djoko": attrs("B"), "9[3].djoko": attrs("R"), "9[4].djoko": attrs("X"),
               "9[5].djoko": attrs("Q")}
    jobs = {j.job_id: j for j in observe_all(records)}
    assert sorted(jobs) == ["9[3].djoko", "9[4].djoko", "9[5].djoko"]
    assert [jobs[k].identity.index for k in sorted(jobs)] == [3, 4, 5]
    assert jobs["9[4].djoko"].state is JobState.CANCELLED  # X without an exit status


def test_foreign_and_malformed_identities_are_not_ours() -> None:
    assert observe("1.srv", {"job_state": "R", "Variable_List": {"X": "1"}}) is None
    assert observe("1.srv", {"job_state": "R"}) is None
    assert observe("1.srv", {"job_state": "R", "Variable_List": {
        "DASK_HPC_IDENTITY": "dask-hpc:v1:not:enough"}}) is None
    text = f"PBS_O_HOME=/home/u,DASK_HPC_IDENTITY={WORKER_ID}"
    job = observe("1.srv", {"job_state": "R", "Variable_List": text})
    assert job is not None and job.identity == ident()


def test_qdel_errors() -> None:
    assert qdel_errors(transcript("qdel-unknown-jobs.txt").stderr) == []
    assert qdel_errors(transcript("qdel-finished.txt").stderr) == []
    assert qdel_errors(transcript("qdel-unauthorized.txt").stderr) == [
        "qdel: Unauthorized Request 3000.pbspro"]


# --- the backend against fake commands -----------------------------------------------------

FAKE = r"""#!{bash}
# Fake PBS client: log argv, keep qsub's stdin, replay the canned transcript for this call.
name="${{0##*/}}"
d="$FAKE_PBS_DIR"
(IFS=$'\t'; printf '%s\n' "$name"$'\t'"$*") >> "$d/calls.log"
key="$name"
if [ "$name" = qstat ]; then
  key=qstat-text
  for a in "$@"; do
    if [ "$a" = "-x" ]; then key=qstat-history; break; fi
    if [ "$a" = "json" ]; then key=qstat-json; fi
  done
fi
if [ "$name" = qsub ]; then
  {cat} > "$d/qsub.stdin"
  # With qsub.ids, the n-th qsub prints its n-th line (a server numbering its jobs).
  n=0; while IFS= read -r l; do [[ $l == qsub* ]] && n=$((n+1)); done < "$d/calls.log"
  {cat} "$d/qsub.stdin" > "$d/qsub.stdin.$n"
  if [ -f "$d/qsub.ids" ]; then
    mapfile -t ids < "$d/qsub.ids"; printf '%s\n' "${{ids[$((n-1))]}}"; exit 0
  fi
fi
if [ -f "$d/$key.out" ]; then {cat} "$d/$key.out"; fi
if [ -f "$d/$key.err" ]; then {cat} "$d/$key.err" >&2; fi
if [ -f "$d/$key.rc" ]; then exit "$(< "$d/$key.rc")"; fi
exit 0
"""


class FakePbs:
    def __init__(self, root: Path) -> None:
        self.dir = root

    def set(self, key: str, out: str = "", err: str = "", rc: int = 0) -> None:
        (self.dir / f"{key}.out").write_text(out)
        (self.dir / f"{key}.err").write_text(err)
        (self.dir / f"{key}.rc").write_text(str(rc))

    def replay(self, key: str, t: Transcript, rc: int | None = None) -> None:
        self.set(key, t.stdout, t.stderr, t.rc if rc is None else rc)

    def calls(self, name: str | None = None) -> list[list[str]]:
        log = self.dir / "calls.log"
        if not log.exists():
            return []
        rows = [[a for a in line.split("\t") if a] for line in log.read_text().splitlines()]
        return [r for r in rows if name is None or r[0] == name]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePbs:
    bash, cat = shutil.which("bash"), shutil.which("cat")
    assert bash and cat
    bindir = tmp_path / "fake-pbs" / "bin"
    bindir.mkdir(parents=True)
    for command in ("qsub", "qstat", "qdel"):
        path = bindir / command
        path.write_text(FAKE.format(bash=bash, cat=cat))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))  # only the fakes: no real PBS client is reached
    monkeypatch.setenv("FAKE_PBS_DIR", str(bindir.parent))
    return FakePbs(bindir.parent)


def request(tmp_path: Path, identity: JobIdentity | None = None) -> JobRequest:
    identity = identity or ident()
    script = render_worker(ctx(), identity, JobTemplate(account="ab12")).script
    return JobRequest(identity, script, str(tmp_path / "logs" / "c1"))


# An empty server answers the listing with the JSON prologue alone; this is the stdout of
# qstat-json-empty-2024.txt, which PBS printed (exit 35) for a finished job's id.
EMPTY_JSON = transcript("qstat-json-empty-2024.txt").stdout


async def test_submit_sends_the_script_on_stdin(fake: FakePbs, tmp_path: Path) -> None:
    fake.replay("qsub", transcript("qsub-submitted.txt"))
    req = request(tmp_path)
    assert await PbsBackend().submit(req) == "0.pbspro"
    assert fake.calls() == [["qsub"]]
    assert (fake.dir / "qsub.stdin").read_text() == req.script
    assert Path(req.log_dir).is_dir()


async def test_submit_with_a_longer_name_limit_names_the_job_on_the_command_line(
        fake: FakePbs, tmp_path: Path) -> None:
    fake.replay("qsub", transcript("qsub-submitted.txt"))
    await PbsBackend(name_limit=236).submit(request(tmp_path))
    assert fake.calls() == [["qsub", "-N", "dask.default.c1.default.0"]]


@pytest.mark.parametrize(("name", "message"), [
    ("qsub-unknown-queue.txt", "qsub: Unknown queue"),
    ("qsub-resource-limits.txt", "qsub: Job violates queue and/or server resource limits"),
])
async def test_submit_error_reply_is_a_batch_system_error(fake: FakePbs, tmp_path: Path,
                                                          name: str, message: str) -> None:
    fake.replay("qsub", transcript(name))
    with pytest.raises(BatchSystemError, match=re.escape(message)):
        await PbsBackend().submit(request(tmp_path))


async def test_lifecycle_in_json_submit_running_finished(fake: FakePbs, tmp_path: Path) -> None:
    backend = PbsBackend()
    job_id = "1006.qot-calc0"  # the job of the JSON listing; qsub prints ids like this
    fake.set("qsub", job_id + "\n")
    assert await backend.submit(request(tmp_path)) == job_id

    fake.replay("qstat-json", transcript("qstat-json-listing-openpbs20.txt"))
    (job,) = await backend.poll()
    assert (job.job_id, job.state, job.identity) == (job_id, JobState.RUNNING, ident())
    assert backend.json_output is True

    fake.set("qstat-json", EMPTY_JSON)  # the job left the listing
    fake.replay("qstat-history", transcript("qstat-text-history-finished.txt").retarget(
        "171390152.mycluster", job_id))
    (job,) = await backend.poll()
    assert (job.job_id, job.state, job.exit_code) == (job_id, JobState.COMPLETED, 0)
    assert fake.calls("qstat")[-1] == ["qstat", "-x", "-f", job_id]

    assert await backend.poll() == []  # settled: reported once, not asked again
    assert [c[1:] for c in fake.calls("qstat")] == [
        ["-f", "-F", "json"], ["-f", "-F", "json"], ["-x", "-f", job_id], ["-f", "-F", "json"]]


async def test_lifecycle_in_text_queued_running_failed(fake: FakePbs) -> None:
    """A server without JSON output: detected on the first poll, remembered after."""
    backend = PbsBackend()
    job_id = "171390152.mycluster"
    fake.replay("qstat-json", transcript("qstat-json-unsupported-torque.txt"))
    fake.replay("qstat-text", transcript("qstat-text-queued.txt"))
    (job,) = await backend.poll()
    assert (job.job_id, job.state, job.reason) == (job_id, JobState.PENDING, "queued")
    assert backend.json_output is False
    assert [c[1:] for c in fake.calls("qstat")] == [["-f", "-F", "json"], ["-f"]]

    fake.replay("qstat-text", transcript("qstat-text-running.txt"))
    (job,) = await backend.poll()
    assert job.state is JobState.RUNNING
    assert [c[1:] for c in fake.calls("qstat")][2:] == [["-f"]]  # one call per poll

    fake.set("qstat-text", "")
    fake.replay("qstat-history", transcript("qstat-text-history-failed.txt"))
    (job,) = await backend.poll()
    assert (job.state, job.exit_code, job.reason) == (JobState.FAILED, 127, "Exit_status 127")
    assert job.identity == ident()


async def test_pbspro12_usage_error_also_means_no_json(fake: FakePbs) -> None:
    backend = PbsBackend()
    fake.replay("qstat-json", transcript("qstat-json-unsupported-pbspro12.txt"))
    fake.replay("qstat-text", transcript("qstat-text-listing-pbspro2013.txt"))
    assert await backend.poll() == []
    assert backend.json_output is False


async def test_invalid_json_switches_to_text_for_good(fake: FakePbs) -> None:
    backend = PbsBackend()
    fake.replay("qstat-json", transcript("qstat-json-invalid-number.txt"))
    fake.replay("qstat-text", transcript("qstat-text-running.txt"))
    (job,) = await backend.poll()
    assert job.job_id == "171390152.mycluster"
    await backend.poll()
    assert [c[1:] for c in fake.calls("qstat")] == [["-f", "-F", "json"], ["-f"], ["-f"]]


async def test_purged_job_is_gone(fake: FakePbs) -> None:
    backend = PbsBackend()
    job_id = "171390152.mycluster"
    fake.replay("qstat-json", transcript("qstat-json-unsupported-torque.txt"))
    fake.replay("qstat-text", transcript("qstat-text-running.txt"))
    await backend.poll()
    fake.set("qstat-text", "")
    fake.replay("qstat-history", transcript("qstat-unknown-job.txt").retarget(
        "256.sod-pbs", job_id))
    (job,) = await backend.poll()
    assert (job.state, job.exit_code) == (JobState.GONE, None)
    assert "purged" in job.reason
    assert job.identity == ident()


async def test_server_without_history_gives_gone_and_is_not_asked_again(fake: FakePbs) -> None:
    backend = PbsBackend()
    fake.replay("qstat-json", transcript("qstat-json-listing-openpbs20.txt"))
    await backend.poll()
    fake.set("qstat-json", EMPTY_JSON)
    fake.replay("qstat-history", transcript("qstat-history-disabled.txt"))
    (job,) = await backend.poll()
    assert job.state is JobState.GONE and "no job history" in job.reason
    fake.replay("qstat-json", transcript("qstat-json-listing-openpbs20.txt"))
    await backend.poll()
    fake.set("qstat-json", EMPTY_JSON)
    (job,) = await backend.poll()
    assert job.state is JobState.GONE
    assert len(fake.calls("qstat")) == 5  # four listings, one history query


async def test_poll_is_one_qstat_call(fake: FakePbs) -> None:
    backend = PbsBackend()
    fake.replay("qstat-json", transcript("qstat-json-listing-openpbs20.txt"))
    for _ in range(3):
        assert len(await backend.poll()) == 1
    assert fake.calls() == [["qstat", "-f", "-F", "json"]] * 3
    assert backend.runner.calls["qstat"] == 3


async def test_arrays_poll_subjobs(fake: FakePbs) -> None:
    fake.set("qstat-json", EMPTY_JSON)
    await PbsBackend(arrays=True).poll()
    assert fake.calls() == [["qstat", "-f", "-F", "json", "-t"]]


async def test_qstat_failure_raises(fake: FakePbs) -> None:
    # The message format is qstat.c's "cannot connect to server %s (errno=%d)".
    fake.set("qstat-json", err="qstat: cannot connect to server pbspl1 (errno=111)\n", rc=1)
    with pytest.raises(BatchSystemError, match="cannot connect to server"):
        await PbsBackend().poll()


async def test_cancel_is_one_qdel(fake: FakePbs) -> None:
    backend = PbsBackend()
    await backend.cancel(["3000", "3001", "9[3].djoko"])
    await backend.cancel([])
    assert fake.calls() == [["qdel", "3000", "3001", "9[3].djoko"]]


@pytest.mark.parametrize("name", ["qdel-unknown-jobs.txt", "qdel-finished.txt"])
async def test_cancel_of_gone_or_finished_jobs_is_not_an_error(fake: FakePbs,
                                                              name: str) -> None:
    fake.replay("qdel", transcript(name))
    await PbsBackend().cancel(["3000", "3001"])


async def test_cancel_refused_raises(fake: FakePbs) -> None:
    fake.replay("qdel", transcript("qdel-unauthorized.txt"))
    with pytest.raises(BatchSystemError, match="Unauthorized Request"):
        await PbsBackend().cancel(["3000"])


# --- reconcile decisions on what the transcripts say ----------------------------------------

def cluster(replicas: int = 2) -> ClusterModel:
    manifest = {
        "apiVersion": API_VERSION, "kind": "DaskCluster",
        "metadata": {"name": "c1", "namespace": "default", "uid": UID},
        "spec": {"backend": "pbs", "worker": {"replicas": replicas, "queue": "normal",
                                              "account": "ab12"}},
    }
    return ClusterModel.from_manifest(validate(manifest), SiteConfig(backend="pbs"))


def test_runtime_creates_the_pbs_backend(tmp_path: Path) -> None:
    runtime = Runtime(SiteConfig(backend="pbs", staging_dir=str(tmp_path)))
    backend = runtime.backend("pbs")
    assert isinstance(backend, PbsBackend) and backend.kind == "pbs"
    assert backend.supports_arrays is True  # -J arrays; tasks are named by task_job_id
    assert (backend.name_limit, backend.max_array_size) == (PBS_NAME_LIMIT, 0)


def test_site_config_sets_the_pbs_server_s_limits(tmp_path: Path) -> None:
    """NCI Gadi: no job arrays; a PBS Pro 13+ server: long job names."""
    site = SiteConfig.from_mapping({"backend": "pbs", "stagingDir": str(tmp_path),
                                    "pbsArrays": False, "pbsJobNameLimit": 236,
                                    "pbsMaxArraySize": 10})
    backend = Runtime(site).backend("pbs")
    assert isinstance(backend, PbsBackend)
    assert (backend.supports_arrays, backend.name_limit, backend.max_array_size) == (
        False, 236, 10)
    with pytest.raises(ValueError, match="pbsJobNameLimit must be at least 8"):
        SiteConfig.from_mapping({"pbsJobNameLimit": 4})


def test_plan_submits_nothing_while_jobs_queue_or_run() -> None:
    sched = observe_all(parse_qstat_json(
        transcript("qstat-json-running-metacentrum.txt").stdout))
    queued = observe_all(parse_qstat_text(transcript("qstat-text-queued.txt").stdout))
    held = observe_all(parse_qstat_json(transcript("qstat-json-held-buildtest.txt").stdout))
    jobs = sched + queued + held  # scheduler R, worker 0 Q, worker 1 H
    assert [j.state for j in jobs] == [JobState.RUNNING, JobState.PENDING, JobState.PENDING]
    plan = plan_cluster(cluster(), jobs, None, now=NOW_S)
    assert plan.empty and not plan.failed


def test_plan_replaces_a_worker_that_failed() -> None:
    sched = observe_all(parse_qstat_json(
        transcript("qstat-json-running-metacentrum.txt").stdout))
    failed = observe_all(parse_qstat_text(transcript("qstat-text-history-failed.txt").stdout))
    held = observe_all(parse_qstat_json(transcript("qstat-json-held-buildtest.txt").stdout))
    assert [j.state for j in failed] == [JobState.FAILED]
    plan = plan_cluster(cluster(), sched + failed + held, None, now=NOW_S)
    assert plan.submit == [ident(index=2)]  # worker 0 failed: a new index replaces it
    assert not plan.cancel and not plan.failed


def test_plan_stops_resubmitting_after_repeated_failures() -> None:
    (record,) = parse_qstat_text(transcript("qstat-text-history-failed.txt").stdout).values()
    failures = [observe(f"{n}.mycluster", {**record, "Variable_List": {
        "DASK_HPC_IDENTITY": ident(index=n).comment()}})
        for n in range(DEFAULT_FAILURE_POLICY.limit)]
    sched = observe_all(parse_qstat_json(
        transcript("qstat-json-running-metacentrum.txt").stdout))
    jobs = sched + [j for j in failures if j is not None]
    plan = plan_cluster(cluster(), jobs, None, now=NOW_S)
    assert plan.submit == [] and "failed in a row" in plan.notes[0]


def test_plan_after_a_purged_scheduler_fails_the_cluster() -> None:
    gone = ObservedJob("12860476.meta-pbs.metacentrum.cz", ident(Role.SCHEDULER),
                       JobState.GONE, "unknown to qstat (purged from history)")
    plan = plan_cluster(cluster(), [gone], None, now=NOW_S)
    assert "scheduler job 12860476.meta-pbs.metacentrum.cz ended (gone" in plan.failed


# --- the whole reconcile against the fake commands ------------------------------------------

def _listing(records: dict[str, tuple[str, JobIdentity]]) -> str:
    """A `qstat -f -F json` listing whose jobs are real records from the transcripts (held
    or running, by name) under the ids qsub gave, each carrying the identity it must. A
    running job's `stime` is moved to a minute ago: started in 2021, it would be past its
    walltime, and the reconcile would (rightly) submit its replacement early."""
    sources = {"held": "qstat-json-held-buildtest.txt", "running":
               "qstat-json-running-metacentrum.txt"}
    jobs = {}
    for job_id, (kind, identity) in records.items():
        (record,) = parse_qstat_json(transcript(sources[kind]).stdout).values()
        record = copy.deepcopy(record)
        record["Variable_List"]["DASK_HPC_IDENTITY"] = identity.comment()
        if "stime" in record:
            record["stime"] = time.ctime(time.time() - 60)
        jobs[job_id] = record
    return json.dumps({"pbs_version": "19.0.0", "Jobs": jobs})


async def test_reconcile_through_qsub_qstat_qdel(fake: FakePbs, tmp_path: Path) -> None:
    """A DaskCluster on PBS from submission to deletion, the operator's reconcile talking
    to the fake commands: submit (scheduler + one -J array) -> held -> running -> a worker
    fails (its history record) and is replaced by a plain job -> delete is one qdel."""
    site = SiteConfig(backend="pbs", staging_dir=str(tmp_path / "staging"),
                      min_poll_interval=0.001, poll_interval=0.001)
    runtime = Runtime(site)
    reconciler = ClusterReconciler(runtime)
    body = {"apiVersion": API_VERSION, "kind": "DaskCluster",
            "metadata": {"name": "c1", "namespace": "default", "uid": UID},
            "spec": {"backend": "pbs", "worker": {"replicas": 2, "queue": "normal",
                                                  "account": "ab12"}}}
    (fake.dir / "qsub.ids").write_text("4001.pbs01\n4002[].pbs01\n4003.pbs01\n")
    fake.set("qstat-json", EMPTY_JSON)

    async def step(status: dict[str, object]) -> dict[str, object]:
        runtime.poller("pbs").snapshot.taken_at = 0.0  # due: every step polls
        return await reconciler.reconcile(body, status)

    status = await step({})
    assert fake.calls("qsub") == [["qsub"], ["qsub"]]
    array_script = (fake.dir / "qsub.stdin.2").read_text()
    assert "#PBS -J 0-1" in array_script and "#PBS -r y" in array_script
    assert "#PBS -P ab12" in array_script and "#PBS -q normal" in array_script
    assert status["phase"] == "Pending" and status["schedulerJobId"] == "4001.pbs01"

    fake.set("qstat-json", _listing({
        "4001.pbs01": ("held", ident(Role.SCHEDULER)),
        "4002[0].pbs01": ("held", ident(index=0)), "4002[1].pbs01": ("held", ident(index=1))}))
    status = await step(status)
    assert status["phase"] == "Pending"
    assert status["workers"] == {"desired": 2, "pending": 2, "running": 0, "ready": 0}
    assert len(fake.calls("qsub")) == 2  # queue wait is never failure

    running = {"4001.pbs01": ("running", ident(Role.SCHEDULER)),
               "4002[0].pbs01": ("running", ident(index=0)),
               "4002[1].pbs01": ("running", ident(index=1))}
    fake.set("qstat-json", _listing(running))
    status = await step(status)
    assert status["workers"]["running"] == 2 and len(fake.calls("qsub")) == 2

    # Worker 1 leaves the listing; its history record says Exit_status 127.
    del running["4002[1].pbs01"]
    fake.set("qstat-json", _listing(running))
    fake.replay("qstat-history", transcript("qstat-text-history-failed.txt").retarget(
        "171390152.mycluster", "4002[1].pbs01"))
    status = await step(status)
    assert ["qstat", "-x", "-f", "4002[1].pbs01"] in fake.calls("qstat")
    assert len(fake.calls("qsub")) == 3
    replacement = (fake.dir / "qsub.stdin.3").read_text()
    assert "#PBS -J" not in replacement  # one new worker: a plain job, not a 1-task array
    assert f"DASK_HPC_IDENTITY={ident(index=2).comment()}" in replacement

    running["4003.pbs01"] = ("held", ident(index=2))
    fake.set("qstat-json", _listing(running))
    left = await reconciler.teardown(body)
    (qdel,) = fake.calls("qdel")
    assert sorted(qdel[1:]) == ["4001.pbs01", "4002[0].pbs01", "4003.pbs01"]
    assert left  # still listed as running until PBS reports them gone


async def test_reconcile_reports_a_qsub_error_and_records_nothing(fake: FakePbs,
                                                                  tmp_path: Path) -> None:
    runtime = Runtime(SiteConfig(backend="pbs", staging_dir=str(tmp_path)))
    fake.replay("qsub", transcript("qsub-unknown-queue.txt"))
    fake.set("qstat-json", EMPTY_JSON)
    events: list[tuple[str, str, str]] = []
    body = {"apiVersion": API_VERSION, "kind": "DaskCluster",
            "metadata": {"name": "c1", "namespace": "default", "uid": UID},
            "spec": {"backend": "pbs", "worker": {"replicas": 1, "queue": "nosuchq"}}}
    status = await ClusterReconciler(runtime).reconcile(
        body, {}, lambda *e: events.append(e))
    assert "qsub: Unknown queue" in str(status["message"])
    assert ("Warning", "SubmitFailed") in [(e[0], e[1]) for e in events]
    assert runtime.poller("pbs").snapshot.owned_by(UID) == []


# --- usage records (hpc_bridge.accounting asks; tests/unit/test_usage.py reads them) -------

async def test_usage_is_one_qstat_history_call_in_text(fake: FakePbs) -> None:
    """All ids in one `qstat -x -f` (text: several ids work there on every version, JSON
    returns only the first on OpenPBS after 23.06); a purged id is simply left out."""
    finished = transcript("qstat-text-history-finished.txt")
    purged = transcript("qstat-unknown-job.txt").retarget("256.sod-pbs", "9.mycluster")
    fake.set("qstat-history", finished.stdout, purged.stderr, 153)
    jobs = [ObservedJob(i, ident(), JobState.RUNNING)
            for i in ("171390152.mycluster", "9.mycluster")]
    found = await PbsBackend().usage(jobs)
    assert fake.calls("qstat") == [["qstat", "-x", "-f", "171390152.mycluster", "9.mycluster"]]
    (record,) = found.values()
    assert (record.job_id, record.source, record.final, record.cores, record.elapsed) == (
        "171390152.mycluster", "qstat", True, 1, 2.0)


async def test_usage_asks_for_many_jobs_in_batches(fake: FakePbs) -> None:
    """Thousands of ids are not one command line (past the kernel's argument limit at 1,000
    clusters of 50 workers): IDS_PER_CALL per qstat, every id once, answers merged."""
    finished = transcript("qstat-text-history-finished.txt")
    fake.set("qstat-history", finished.stdout)
    ids = [f"{n}.mycluster" for n in range(2 * IDS_PER_CALL)] + ["171390152.mycluster"]
    found = await PbsBackend().usage([ObservedJob(i, ident(), JobState.RUNNING) for i in ids])
    calls = fake.calls("qstat")
    assert [len(c) - 3 for c in calls] == [IDS_PER_CALL, IDS_PER_CALL, 1]
    assert [i for c in calls for i in c[3:]] == ids
    assert list(found) == ["171390152.mycluster"] and found["171390152.mycluster"].final


async def test_usage_of_an_unreachable_server_is_a_failure_not_no_record(
        fake: FakePbs) -> None:
    """qstat cannot reach the server: raised, so the usage ledger does not count the query
    as one that found no record (it gives up on such jobs after a few)."""
    fake.set("qstat-history", err="Connection refused\nqstat: cannot connect to server "
             "pbs1 (errno=111)\n", rc=15010)
    with pytest.raises(BatchSystemError, match="cannot connect to server"):
        await PbsBackend().usage([ObservedJob("9.pbs1", ident(), JobState.RUNNING)])


async def test_usage_without_job_history_asks_the_listing(fake: FakePbs) -> None:
    fake.replay("qstat-history", transcript("qstat-history-disabled.txt"))
    fake.replay("qstat-text", transcript("qstat-text-running.txt"))
    backend = PbsBackend()
    job_id = next(iter(parse_qstat_text(transcript("qstat-text-running.txt").stdout)))
    found = await backend.usage([ObservedJob(job_id, ident(), JobState.RUNNING)])
    assert [c[:3] for c in fake.calls("qstat")] == [["qstat", "-x", "-f"], ["qstat", "-f",
                                                                           job_id]]
    assert found[job_id].final is False and found[job_id].started_at is not None
    await backend.usage([ObservedJob(job_id, ident(), JobState.RUNNING)])
    assert fake.calls("qstat")[-1] == ["qstat", "-f", job_id]  # remembered
