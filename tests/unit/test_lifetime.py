"""Walltime-aware workers: the lifetime rule (hpc_bridge.lifetime), the worker command it
shapes, the start/end times backends report, and replacement before expiry in the plan."""

from __future__ import annotations

import asyncio
import datetime as dt
import shlex
import time
from pathlib import Path

import pytest

from dask_hpc_operator.model import ClusterModel, GroupModel
from dask_hpc_operator.planning import (
    DaskView,
    WorkerView,
    cluster_status,
    expiring_jobs,
    group_counts,
    plan_cluster,
)
from hpc_bridge.backends.local import LocalBackend
from hpc_bridge.backends.pbs import observe_all, parse_qstat_json, parse_qstat_text, parse_time
from hpc_bridge.backends.slurm import (
    clock_offset,
    parse_elapsed,
    parse_sacct,
    parse_squeue,
    squeue_rows,
)
from hpc_bridge.lifetime import Lifetime, parse_walltime, worker_lifetime
from hpc_bridge.model import JobIdentity, JobRequest, JobState, JobTemplate, ObservedJob, Role
from hpc_bridge.scripts import RenderContext, render_scheduler, render_worker, worker_command_args

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "pbs"

# --- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("00:00:30", 30), ("01:00:00", 3600), ("1-02:00:00", 93600), ("48:00:00", 172800),
    ("0:05:00", 300), ("2:30", 9000), ("1234:00:00", 1234 * 3600),
])
def test_parse_walltime(text: str, seconds: int) -> None:
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["", "60", "1:2:3", "00:60:00", "00:00:75", "1d", "-1:00:00"])
def test_parse_walltime_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_walltime(text)


@pytest.mark.parametrize(("walltime", "expected"), [
    # short: the 30 s floor; replacement at half the earliest retirement
    ("00:01:30", Lifetime(90, 30, 60, 10, 25)),
    # 10% regime: margin 6 min, replacement a margin before the earliest retirement
    ("01:00:00", Lifetime(3600, 360, 3240, 120, 2760)),
    # long: the 10 min cap
    ("1-00:00:00", Lifetime(86400, 600, 85800, 200, 85000)),
    # a minute: the margin is at most a third of the walltime
    ("00:01:00", Lifetime(60, 20, 40, 6, 17)),
])
def test_worker_lifetime(walltime: str, expected: Lifetime) -> None:
    assert worker_lifetime(walltime) == expected


def test_too_short_walltime_has_no_lifetime() -> None:
    assert worker_lifetime("00:00:59") is None


@pytest.mark.parametrize("walltime", ["00:01:00", "00:01:30", "00:02:00", "00:04:59",
                                      "00:10:00", "01:00:00", "12:00:00", "7-00:00:00"])
def test_lifetime_invariants(walltime: str) -> None:
    life = worker_lifetime(walltime)
    assert life is not None
    # Every worker starts retiring at least 2/3 of the margin before the kill ...
    assert life.lifetime_s + life.stagger_s <= life.walltime_s - 2 * life.margin_s // 3
    # ... the replacement is asked for before any worker of the job can retire ...
    assert 0 < life.replace_after_s < life.earliest_retirement_s
    # ... but not so early that replacements pile up (at most ~3 generations per replica).
    assert life.replace_after_s >= life.earliest_retirement_s // 2
    assert life.margin_s >= 30 or life.margin_s == life.walltime_s // 3


# --- the worker command --------------------------------------------------------------------

WORKER = JobIdentity("default", "c1", "uid-1", Role.WORKER, "default", 0)
SCHEDULER = JobIdentity("default", "c1", "uid-1", Role.SCHEDULER, "default", 0)


def ctx(backend: str = "slurm") -> RenderContext:
    return RenderContext(backend=backend, python="/opt/conda/bin/python",
                         scheduler_file="/shared/dask/c1/scheduler.json",
                         log_dir="/shared/dask/c1/logs")


def argv(script: str) -> list[str]:
    return shlex.split([line for line in script.splitlines() if line.strip()][-1])


@pytest.mark.parametrize("backend", ["slurm", "pbs", "local"])
def test_worker_command_has_the_lifetime(backend: str) -> None:
    args = argv(render_worker(ctx(backend), WORKER, JobTemplate(walltime="00:01:30")).script)
    assert args[args.index("--lifetime") + 1] == "60s"
    assert args[args.index("--lifetime-stagger") + 1] == "10s"


def test_scheduler_has_no_lifetime() -> None:
    script = render_scheduler(ctx(), SCHEDULER, JobTemplate(walltime="00:01:30")).script
    assert "--lifetime" not in script


@pytest.mark.parametrize("args", [("--lifetime", "1h"), ("--lifetime=1h",)])
def test_users_lifetime_wins(args: tuple[str, ...]) -> None:
    assert worker_command_args(JobTemplate(worker_args=args)) == list(args)


def test_users_stagger_is_kept() -> None:
    got = worker_command_args(JobTemplate(walltime="00:01:30",
                                          worker_args=("--lifetime-stagger", "1s")))
    assert got == ["--lifetime-stagger", "1s", "--lifetime", "60s"]


def test_short_walltime_gives_no_lifetime() -> None:
    assert worker_command_args(JobTemplate(walltime="00:00:30")) == []


def test_cuda_worker_gets_the_lifetime_as_config() -> None:
    """`dask cuda worker` has no --lifetime option (it would be a usage error)."""
    template = JobTemplate(walltime="00:01:30", cuda=True, gpus=1)
    script = render_worker(ctx(), WORKER, template).script
    assert "--lifetime" not in argv(script)
    assert "export DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION=60s" in script.splitlines()
    assert "export DASK_DISTRIBUTED__WORKER__LIFETIME__STAGGER=10s" in script.splitlines()


# --- start and end times from the backends -------------------------------------------------

C = "dask-hpc:v1:default:c1:uid-1"


def epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()  # SLURM prints local time


def test_squeue_start_and_end_times() -> None:
    text = "\n".join([
        # pending: "N/A", or an estimate that must not read as a start
        f"1|PENDING|Priority|N/A|N/A|N/A|0:00|1|{C}:worker:default:0",
        f"2|PENDING|Resources|N/A|2024-05-01T14:00:00|2024-05-01T15:00:00|0:00|2|"
        f"{C}:worker:default:1",
        # running: a start; %e is the time limit's end, not an end
        f"3|RUNNING|None|N/A|2024-05-01T12:00:00|2024-05-01T13:00:00|5:00|3|"
        f"{C}:worker:default:2",
        # ended: both
        f"4|FAILED|NonZeroExitCode|N/A|2024-05-01T12:00:00|2024-05-01T12:00:04|0:04|4|"
        f"{C}:worker:default:3",
        f"5|COMPLETING|None|N/A|2024-05-01T12:00:00|2024-05-01T12:30:00|30:00|5|"
        f"{C}:worker:default:4",
        # requeued after a preemption: pending again, its old start forgotten
        f"6|PENDING|BeginTime|N/A|Unknown|Unknown|0:00|6|{C}:worker:default:5",
        f"7|CANCELLED|None|N/A|None|2024-05-01T12:00:00|0:00|7|{C}:worker:default:6",
        # an array task that ran carries its own job id for its log file
        f"8_2|FAILED|NonZeroExitCode|2|2024-05-01T12:00:00|2024-05-01T12:00:01|0:01|11|"
        f"{C}:worker:default:7",
    ])
    jobs = {j.job_id: j for j in parse_squeue(text)}
    assert (jobs["1"].started_at, jobs["1"].ended_at) == (None, None)
    assert (jobs["2"].started_at, jobs["2"].ended_at) == (None, None)
    assert (jobs["3"].started_at, jobs["3"].ended_at) == (epoch("2024-05-01T12:00:00"), None)
    assert jobs["4"].state is JobState.FAILED
    assert (jobs["4"].started_at, jobs["4"].ended_at) == (epoch("2024-05-01T12:00:00"),
                                                          epoch("2024-05-01T12:00:04"))
    assert jobs["5"].ended_at == epoch("2024-05-01T12:30:00")
    assert (jobs["6"].started_at, jobs["6"].ended_at) == (None, None)
    assert (jobs["7"].started_at, jobs["7"].ended_at) == (None, epoch("2024-05-01T12:00:00"))
    assert jobs["8_2"].extra == {"raw_job_id": "11"}
    assert jobs["8_2"].identity.index == 2
    # squeue run with SLURM_TIME_FORMAT=%s prints epoch seconds
    (job,) = parse_squeue(f"9|FAILED|None|N/A|1714564800|1714564804|0:04|9|"
                          f"{C}:worker:default:8\n")
    assert (job.started_at, job.ended_at) == (1714564800.0, 1714564804.0)


@pytest.mark.parametrize(("text", "seconds"), [
    ("0:00", 0), ("0:07", 7), ("5:00", 300), ("1:02:03", 3723), ("2-01:00:00", 176400),
    ("INVALID", None), ("", None)])
def test_parse_elapsed(text: str, seconds: float | None) -> None:
    assert parse_elapsed(text) == seconds


@pytest.mark.parametrize("zone_hours", [0, 2, -5, 5.5])
def test_squeue_times_in_another_time_zone(zone_hours: float) -> None:
    """squeue over ssh prints the login node's local time: a running job's time used, which
    knows no time zone, corrects every time of the listing (else every job could look
    hours old, and be replaced at once)."""
    now = epoch("2024-05-01T12:10:03")  # a few seconds after squeue ran
    shifted = dt.datetime.fromtimestamp(epoch("2024-05-01T12:00:00") + zone_hours * 3600)
    ended = dt.datetime.fromtimestamp(epoch("2024-05-01T12:09:00") + zone_hours * 3600)
    text = "\n".join([
        f"3|RUNNING|None|N/A|{shifted.isoformat()}|N/A|10:00|3|{C}:worker:default:2",
        f"4|FAILED|None|N/A|{shifted.isoformat()}|{ended.isoformat()}|9:00|4|"
        f"{C}:worker:default:3",
    ])
    jobs = {j.job_id: j for j in parse_squeue(text, now)}
    assert jobs["3"].started_at == epoch("2024-05-01T12:00:00")
    assert jobs["4"].ended_at == epoch("2024-05-01T12:09:00")
    assert clock_offset(squeue_rows(text), now) == -zone_hours * 3600


def test_sacct_start_and_end() -> None:
    found = parse_sacct("\n".join([
        "12|FAILED|3:0|2024-05-01T12:00:00|2024-05-01T12:00:03",
        "13|CANCELLED by 0|0:0|Unknown|2024-05-01T12:00:00",
        "14|COMPLETED|0:0|None|Unknown",
    ]))
    assert found["12"] == (JobState.FAILED, 3, "FAILED", epoch("2024-05-01T12:00:00"),
                           epoch("2024-05-01T12:00:03"))
    assert found["13"][3:] == (None, epoch("2024-05-01T12:00:00"))
    assert found["14"][3:] == (None, None)


def _fixture_stdout(name: str) -> str:
    text = (FIXTURES / name).read_text()
    return text.split("--- stdout\n", 1)[1].split("--- stderr", 1)[0]


def test_pbs_times_from_recorded_qstat() -> None:
    (running,) = [j for j in observe_all(parse_qstat_json(
        _fixture_stdout("qstat-json-running-metacentrum.txt")))]
    assert running.state is JobState.RUNNING
    assert running.started_at == parse_time("Tue Oct  4 21:23:33 2022")
    assert running.ended_at is None
    (failed,) = observe_all(parse_qstat_text(_fixture_stdout("qstat-text-history-failed.txt")))
    assert failed.state is JobState.FAILED
    # stime, and (no obittime recorded) mtime as the end
    assert failed.started_at == failed.ended_at == parse_time("Wed Oct 18 09:08:22 2017")
    (queued,) = observe_all(parse_qstat_text(_fixture_stdout("qstat-text-queued.txt")))
    assert (queued.started_at, queued.ended_at) == (None, None)


def test_pbs_parse_time() -> None:
    assert parse_time("Wed Apr 14 23:21:57 2021") == time.mktime(
        time.struct_time((2021, 4, 14, 23, 21, 57, 2, 104, -1)))
    assert parse_time(1700000000) == 1700000000.0
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("") is None and parse_time(None) is None and parse_time(True) is None


async def test_local_backend_times(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "state")
    before = time.time()
    job_id = await backend.submit(JobRequest(WORKER, "exit 3\n", str(tmp_path / "logs")))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    job = None
    while loop.time() < deadline:
        job = {j.job_id: j for j in await backend.poll()}.get(job_id)
        if job is not None and job.state.terminal:
            break
        await asyncio.sleep(0.02)
    assert job is not None and job.state is JobState.FAILED
    assert job.started_at is not None and job.ended_at is not None
    assert before - 1 <= job.started_at <= job.ended_at <= time.time() + 1


# --- replacement before expiry -------------------------------------------------------------

NS, NAME, UID = "default", "c1", "uid-1"
NOW = 1_704_067_200.0
REPLACE_AFTER = 2760  # a 1 h walltime's (test_worker_lifetime pins it)


def model(replicas: int = 2, walltime: str = "01:00:00") -> ClusterModel:
    return ClusterModel(NS, NAME, UID, "slurm", ("tcp",), JobTemplate(),
                        (GroupModel("default", UID, replicas, JobTemplate(walltime=walltime)),))


def sched() -> ObservedJob:
    return ObservedJob("s0", JobIdentity(NS, NAME, UID, Role.SCHEDULER, "default", 0),
                       JobState.RUNNING, started_at=NOW - 100)


def worker(index: int, age: float | None, state: JobState = JobState.RUNNING) -> ObservedJob:
    return ObservedJob(f"w{index}", JobIdentity(NS, NAME, UID, Role.WORKER, "default", index),
                       state, started_at=None if age is None else NOW - age)


def view(*jobs: ObservedJob) -> DaskView:
    return DaskView("tcp://10.0.0.1:8786", "http://10.0.0.1:8787/status",
                    tuple(WorkerView(j.identity.job_name, f"tcp://10.0.0.2:{4000 + i}")
                          for i, j in enumerate(jobs)))


def test_expiring_job_gets_a_replacement() -> None:
    jobs = [sched(), worker(0, REPLACE_AFTER + 1), worker(1, 10)]
    plan = plan_cluster(model(), jobs, view(*jobs[1:]), now=NOW)
    assert [i.index for i in plan.submit] == [2]
    assert plan.cancel == [] and plan.retire == []  # the old one retires on its own
    assert plan.expiring == {"w0"}
    assert "1 worker job(s) near the end of their walltime" in plan.notes[0]


def test_young_jobs_and_unknown_starts_do_not_expire() -> None:
    jobs = [sched(), worker(0, REPLACE_AFTER - 1), worker(1, None)]
    plan = plan_cluster(model(), jobs, view(*jobs[1:]), now=NOW)
    assert plan.empty and plan.expiring == set()


def test_pending_jobs_never_expire() -> None:
    group = model().groups[0]
    old_pending = worker(0, 10 * 3600, JobState.PENDING)  # a requeued job, say
    assert expiring_jobs(group, [old_pending], NOW) == []


def test_replacement_is_planned_once() -> None:
    """Once the replacement is visible, the plan is idempotent: nothing more is submitted."""
    jobs = [sched(), worker(0, REPLACE_AFTER + 1), worker(1, 10),
            worker(2, None, JobState.PENDING)]
    plan = plan_cluster(model(), jobs, view(*jobs[1:3]), now=NOW)
    assert plan.empty, plan


def test_expiring_jobs_are_not_chosen_for_scale_down() -> None:
    old = worker(0, REPLACE_AFTER + 1)
    jobs = [sched(), old, worker(1, 10), worker(2, 20), worker(3, 30)]
    plan = plan_cluster(model(2), jobs, view(*jobs[1:]), now=NOW)
    retired = {r.job_id for r in plan.retire} | set(plan.cancel)
    assert len(retired) == 1 and "w0" not in retired


def test_scale_to_zero_takes_expiring_jobs_too() -> None:
    jobs = [sched(), worker(0, REPLACE_AFTER + 1), worker(1, 10)]
    plan = plan_cluster(model(0), jobs, view(*jobs[1:]), now=NOW)
    assert {r.job_id for r in plan.retire} == {"w0", "w1"}


def test_short_walltime_expires_sooner() -> None:
    jobs = [sched(), worker(0, 30), worker(1, 5)]
    plan = plan_cluster(model(2, "00:01:30"), jobs, view(*jobs[1:]), now=NOW)
    assert plan.expiring == {"w0"}  # 30 s >= 25 s
    assert [i.index for i in plan.submit] == [2]


def test_status_counts_the_replacement_not_the_expiring_job() -> None:
    """During a rollover the group has its replicas (one of them still queued) and stays
    Running: the expiring worker stands in for its replacement until that one connects."""
    old, young = worker(0, REPLACE_AFTER + 1), worker(1, 10)
    replacement = worker(2, None, JobState.PENDING)
    jobs = [sched(), old, young, replacement]
    plan = plan_cluster(model(), jobs, view(old, young), now=NOW)
    status = cluster_status(model(), jobs, view(old, young), plan, (), "t")
    assert status["workers"] == {"desired": 2, "pending": 1, "running": 1, "ready": 2}
    assert status["replicas"] == 2
    assert status["phase"] == "Running"
    # once the replacement connects, the expiring worker no longer adds to ready
    started = worker(2, 5)
    counts = group_counts(model().groups[0], [sched(), old, young, started],
                          view(old, young, started), {"w0"})
    assert (counts.pending, counts.running, counts.ready) == (0, 2, 2)
