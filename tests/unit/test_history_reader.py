"""Reading histories after the fact: finding them (live and kept), teardown keeping them,
`dask-hpc history` / `dask-hpc report`, and the report in a real browser.

The files here are written by the preload's own writer (HistoryWriter) with fixed times,
so outputs are exact; test_history_preload.py covers what a real scheduler records.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from dask_hpc_operator import history, usage
from dask_hpc_operator.cli import main
from dask_hpc_operator.history_report import render
from dask_hpc_operator.reconcile import (
    PERFORMANCE_PRELOAD_NAME,
    SCHEDULER_PRELOADS,
    ClusterReconciler,
    Runtime,
)
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.usage import JobUsage
from helpers import CHROMIUM, png_detail, png_dimensions, screenshot
from hpc_bridge.preloads.history import Batch, HistoryWriter

T0 = 1_780_000_000.0  # 2026-05-28 20:26:40Z
EVIL = "<script>alert('x')</script>"


def write_history(root: Path, name: str = "etl", uid: str = "1234abcd-5678",
                  namespace: str = "team", t0: float = T0, ended: bool = True,
                  archived: bool = False) -> Path:
    """A history of two computations (the second with an error), one worker, one run."""
    leaf = f"{name}-{uid[:8]}"
    path = (history.archive_path(root, namespace, name, uid) if archived
            else root / "clusters" / namespace / leaf / "history.sqlite")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = HistoryWriter(str(path))
    writer.open({"namespace": namespace, "name": name, "uid": uid}, t0, "tcp://10.0.0.1:8786",
                "4242")
    c1, c2 = f"{name}-c1", f"{name}-c2"
    writer.write(Batch(
        last_seen=t0 + 100, end=t0 + 100 if ended else None,
        computations=[
            (c1, 1, 1, t0 + 10, t0 + 40, "finished", 30, 30, 0, 55.5, 1.0, 3 * 2**20, 2**20,
             2**30, 2**31, None, None),
            (c2, 1, 2, t0 + 50, t0 + 52 if ended else None, "erred" if ended else "running",
             13, 12, 1, 2.0, 0.0, 0, 100, 2**29, 2**29, "y.compute()", "/home/u/job.py:7")],
        prefixes=[(c1, "squares", 30, 0, 55.5, 3.5, 1.0, 3 * 2**20, 2**20),
                  (c2, "increments", 12, 0, 1.5, 0.2, 0.0, 0, 100),
                  (c2, EVIL, 0, 1, 0.5, 0.5, 0.0, 0, 0)],
        errors=[(c2, t0 + 51, f"{EVIL}-0", EVIL, "tcp://10.0.0.2:1234",
                 f"ValueError('{EVIL}')", "  File \"job.py\", line 3\n")],
        workers=[(1, "tcp://10.0.0.2:1234", "dask.team.etl.default.0", "node1", 4, 2**32,
                  t0 + 5, t0 + 99 if ended else None, 2**30)],
        events=[(1, t0 + 5, "worker-join", "dask.team.etl.default.0", "tcp://10.0.0.2:1234")],
        samples=[(1, t0 + 10 * i, 1, 4, i % 4, 0, 2**28 * (i % 3)) for i in range(10)]))
    writer.close()
    return path


def usage_row(job_id: str, group: str, cores: int, submitted: float, waited: float,
              ran: float, gpus: int = 0, source: str = "sacct-completion",
              namespace: str = "team", cluster: str = "etl") -> JobUsage:
    return JobUsage(job_id, namespace, cluster, group,
                    "scheduler" if group == "scheduler" else "worker", "COMPLETED", submitted,
                    submitted + waited, submitted + waited + ran, cores, gpus, ran, waited,
                    source, "requested" if gpus else source, final=True)


# A scheduler job and two workers (one with 2 GPUs, from the request): 780 core-seconds
# (0.217 core-hours), 180 GPU-seconds (0.050 GPU-hours), 35 s of queue wait.
ETL_USAGE = [usage_row("101", "scheduler", 1, T0 - 10, 5, 100),
             usage_row("102", "default", 4, T0 - 8, 10, 90, gpus=2),
             usage_row("103", "default", 4, T0 - 5, 20, 80)]


def write_usage(history_file: Path, rows: list[JobUsage]) -> Path:
    """The usage file beside a history (the ledger's file, or its archived copy)."""
    archived = history_file.parent.parent.name == "history"
    target = (history_file.with_name(history_file.stem + ".usage.json") if archived
              else history_file.parent / history.USAGE_FILE)
    history.write_json(target, usage.document("team", "etl", "1234abcd-5678", rows, T0 + 200))
    return target


def test_find_lists_live_and_kept_histories_live_first(tmp_path: Path) -> None:
    write_history(tmp_path, "etl", archived=True)
    write_history(tmp_path, "etl", ended=False)  # same cluster: its copy and its live file
    write_history(tmp_path, "etl", uid="99999999-0000", archived=True)  # a namesake, deleted
    write_history(tmp_path, "web", namespace="other")
    found = {f.key: f for f in history.find(tmp_path)}
    assert sorted(found) == ["other/web-1234abcd", "team/etl-1234abcd", "team/etl-99999999"]
    assert not found["team/etl-1234abcd"].archived
    assert found["team/etl-99999999"].archived
    assert [f.key for f in history.find(tmp_path, "other")] == ["other/web-1234abcd"]
    assert history.find(tmp_path / "missing") == []


def test_a_cluster_whose_scheduler_never_started_is_found_by_its_usage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No history.sqlite (the scheduler job never ran), but a usage file: its queued and
    cancelled jobs used core-hours, so it is listed, live and once deleted, with no
    computations."""
    staging = tmp_path / "clusters" / "team" / "etl-1234abcd"
    staging.mkdir(parents=True)
    rows = [usage_row("101", "scheduler", 1, T0, 5, 0), usage_row("102", "default", 16, T0, 5,
                                                                   3600)]
    write_usage(staging / history.FILE_NAME, rows)
    (live,) = history.find(tmp_path)
    assert (live.key, live.archived) == ("team/etl-1234abcd", False)
    loaded = history.load(live)
    assert (loaded.uid, loaded.runs, loaded.computations) == ("1234abcd-5678", [], [])
    assert loaded.usage_summary().total.core_hours == 16.0
    history.keep(staging, history.archive_path(tmp_path, "team", "etl", "1234abcd-5678"))
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    (kept,) = history.find(tmp_path)
    assert (kept.key, kept.archived) == ("team/etl-1234abcd", True) and not kept.path.exists()
    code, out, _ = run_cli(capsys, "history", "--staging-dir", str(tmp_path))
    assert code == 0
    line = out.splitlines()[1].split()
    assert line[:4] == ["team", "etl", "1234abcd", "empty,"] and line[-5:] == [
        "0", "0", "0", "16.00", "0.00"]
    assert "namespace team: 1 clusters, 2 batch jobs, 16.00 core-hours" in out
    code, out, _ = run_cli(capsys, "history", "etl", "--staging-dir", str(tmp_path))
    assert code == 0 and "no history: the scheduler never started" in out
    assert "usage: 2 batch jobs, 16.00 core-hours" in out


def test_load_reads_everything_and_judges_the_run(tmp_path: Path) -> None:
    f = history.HistoryFile("team", "etl", "1234abcd",
                            write_history(tmp_path, ended=False), archived=False)
    running = history.load(f, now=T0 + 101)
    assert running.state == "running" and running.end is None
    assert running.computations[1].state == "running"
    killed = history.load(f, now=T0 + 100 + history.STALE_AFTER_S + 1)
    assert killed.state == "killed" and killed.end == T0 + 100
    assert killed.computations[1].state == "interrupted"
    assert killed.computations[1].end == T0 + 100
    assert killed.workers[0].left == T0 + 100
    assert (killed.uid, killed.tasks, killed.erred) == ("1234abcd-5678", 42, 1)
    assert [p.prefix for p in killed.prefix_totals()] == ["squares", "increments", EVIL]
    assert killed.computations[0].label == "squares"
    assert killed.computations[1].label == "y.compute()"
    assert json.loads(history.dumps(killed.to_json()))["computations"][0]["tasks_done"] == 30


def test_select_takes_the_newest_namesake(tmp_path: Path) -> None:
    write_history(tmp_path, "etl", uid="aaaaaaaa-1", t0=T0, archived=True)
    write_history(tmp_path, "etl", uid="bbbbbbbb-2", t0=T0 + 3600, archived=True)
    files = history.find(tmp_path)
    chosen, others = history.select(files, "etl")
    assert chosen.uid8 == "bbbbbbbb" and [o.uid8 for o in others] == ["aaaaaaaa"]
    assert history.select(files, "etl-aaaaaaaa")[0].uid8 == "aaaaaaaa"
    with pytest.raises(LookupError):
        history.select(files, "nope")


def test_archive_copies_a_self_contained_file_and_never_raises(tmp_path: Path) -> None:
    source = write_history(tmp_path, ended=False)
    target = history.archive_path(tmp_path, "team", "etl", "1234abcd-5678")
    assert history.archive(source, target)
    with sqlite3.connect(target) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("SELECT COUNT(*) FROM computations").fetchone()[0] == 2
    assert not history.archive(tmp_path / "nothing.sqlite", target)  # nothing to keep
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_text("not a database" * 100)
    assert not history.archive(garbage, tmp_path / "kept.sqlite")
    assert not (tmp_path / "kept.sqlite.tmp").exists()


def test_every_cluster_scheduler_gets_both_preloads(tmp_path: Path) -> None:
    """Scaling and history always; Dask's performance reports only where the spec asks
    (spec.diagnostics.performanceReport)."""
    site = SiteConfig(staging_dir=str(tmp_path))
    reconciler = ClusterReconciler(Runtime(site))
    manifest: dict[str, Any] = {
        "apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
        "metadata": {"name": "p", "namespace": "team", "uid": "1234abcd-1"},
        "spec": {"backend": "slurm", "worker": {"replicas": 1}}}
    (scheduler, *_) = reconciler.render_all(manifest)
    assert set(SCHEDULER_PRELOADS) == {"dask_hpc_scaling.py", "dask_hpc_history.py",
                                       PERFORMANCE_PRELOAD_NAME}
    for name in ("dask_hpc_scaling.py", "dask_hpc_history.py"):
        assert f"--preload {tmp_path}/clusters/team/p-1234abcd/{name}" in scheduler.script
    assert PERFORMANCE_PRELOAD_NAME not in scheduler.script
    manifest["spec"]["diagnostics"] = {"performanceReport": True}
    (scheduler, *_) = reconciler.render_all(manifest)
    assert (f"--preload {tmp_path}/clusters/team/p-1234abcd/{PERFORMANCE_PRELOAD_NAME}"
            in scheduler.script)


async def test_deleting_a_cluster_keeps_its_history(tmp_path: Path) -> None:
    """ClusterReconciler.teardown(whole_cluster) copies the history out before it removes
    the staging directory; a repeated teardown (finalizer retry) keeps the copy."""
    runtime = Runtime(SiteConfig(staging_dir=str(tmp_path)))

    async def nothing_left(*_args: Any) -> list[str]:
        return []
    runtime.end_jobs = nothing_left  # type: ignore[method-assign]
    live = write_history(tmp_path, ended=False)
    write_usage(live, ETL_USAGE)  # final rows: teardown has nothing to ask the batch system
    (live.parent / "reports").mkdir()
    (live.parent / "reports" / "etl-c1.html").write_text("<html>dask</html>")
    manifest = {"metadata": {"name": "etl", "namespace": "team", "uid": "1234abcd-5678"},
                "spec": {"backend": "slurm"}}
    reconciler = ClusterReconciler(runtime)
    assert await reconciler.teardown(manifest, whole_cluster=True) == []
    assert not live.parent.exists()
    (kept,) = history.find(tmp_path)
    assert kept.archived and kept.path == tmp_path / "history/team/etl-1234abcd.sqlite"
    assert await reconciler.teardown(manifest, whole_cluster=True) == []
    h = history.load(kept)
    assert (h.state, len(h.computations)) == ("killed", 2)  # no end, and it is gone
    assert kept.usage_path == tmp_path / "history/team/etl-1234abcd.usage.json"
    assert [u.job_id for u in h.usage] == ["101", "102", "103"]
    assert h.reports == [tmp_path / "history/team/etl-1234abcd.reports/etl-c1.html"]
    assert h.report_of("etl-c1") == h.reports[0] and h.report_of("etl-c2") is None


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_history_lists_clusters_and_one_clusters_computations(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_usage(write_history(tmp_path, "etl", archived=True), ETL_USAGE)
    write_history(tmp_path, "web", uid="77777777-0", namespace="other", t0=T0 + 7200)
    code, out, _ = run_cli(capsys, "history", "--staging-dir", str(tmp_path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "UID", "STATE", "START", "END",
                                "DURATION", "COMPUTATIONS", "TASKS", "ERRED", "CORE-H",
                                "GPU-H"]
    assert lines[1].split() == ["team", "etl", "1234abcd", "stopped,", "deleted",
                                "2026-05-28", "20:26:40Z", "2026-05-28", "20:28:20Z",
                                "1m40s", "2", "42", "1", "0.217", "0.050"]
    assert lines[2].split()[:4] == ["other", "web", "77777777", "stopped"]
    assert lines[2].split()[-2:] == ["-", "-"]  # no usage file: not zero, unknown
    # One line per namespace with usage (a deleted cluster's included).
    assert lines[4] == ("namespace team: 1 clusters, 3 batch jobs, 0.217 core-hours, "
                        "0.050 GPU-hours, queue wait 35.0s in all (mean 11.7s)")
    assert len(lines) == 5

    code, out, _ = run_cli(capsys, "history", "etl", "--staging-dir", str(tmp_path))
    assert code == 0
    assert out.startswith("DaskCluster team/etl (uid 1234abcd-5678): stopped, deleted")
    rows = [line.split() for line in out.splitlines()[2:4]]
    assert rows[0][:8] == ["1", "2026-05-28", "20:26:50Z", "30.0s", "finished", "30/30", "0",
                           "55.5s"]
    assert rows[0][-3:] == ["1.0", "GiB", "squares"]
    assert rows[1][4:7] == ["erred", "12/13", "1"] and rows[1][-1] == "y.compute()"
    assert "1 error(s); first:" in out and EVIL in out  # plain text: printed as is
    usage_lines = out[out.index("usage: "):].splitlines()
    assert usage_lines[0].startswith(
        "usage: 3 batch jobs, 0.217 core-hours, 0.050 GPU-hours, run 4m30s, queue wait 35.0s "
        "in all (mean 11.7s); source sacct-completion, GPUs requested; as of 2026-05-28")
    groups = {line.split()[0]: line.split()[1:] for line in usage_lines[2:4]}
    assert groups == {"default": ["2", "0.189", "0.050", "2m50s", "30.0s", "15.0s"],
                      "scheduler": ["1", "0.028", "0.00", "1m40s", "5.0s", "5.0s"]}
    job = next(line.split() for line in usage_lines if line.startswith("102 "))
    assert job[1:6] == ["default", "COMPLETED", "4", "2", "(requested)"]
    assert job[-4:] == ["1m30s", "0.100", "0.050", "sacct-completion"]

    code, out, _ = run_cli(capsys, "history", "--json", "-n", "other", "--staging-dir",
                           str(tmp_path))
    (only,) = json.loads(out)
    assert (only["name"], only["computations"], only["tasks"]) == ("web", 2, 42)
    assert only["usage_totals"]["jobs"] == 0

    code, _, err = run_cli(capsys, "history", "nope", "--staging-dir", str(tmp_path))
    assert code == 1 and "no history of a cluster named 'nope'" in err
    code, out, _ = run_cli(capsys, "history", "--staging-dir", str(tmp_path / "empty"))
    assert code == 0 and out.startswith("no cluster history under")


def test_report_is_self_contained_and_escapes_what_users_wrote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kept = write_history(tmp_path, "etl", archived=True)
    write_usage(kept, ETL_USAGE)
    out = tmp_path / "r.html"
    code, said, _ = run_cli(capsys, "report", "etl", "-o", str(out), "--staging-dir",
                            str(tmp_path))
    assert code == 0 and said.startswith(f"wrote {out} (2 computations, 42 tasks)")
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # timeline, tasks and memory over time, prefixes, batch jobs' queue waits and runs
    assert page.count("<svg") == 5
    for text in ("DaskCluster team/etl", "dask.team.etl.default.0", "squares", "increments",
                 "y.compute()", "/home/u/job.py:7", "Errors (1)", "55.5s", "stopped, deleted",
                 "0.217 core-hours", "0.050 GPU-hours", "job 103 (default): queued 20.0s",
                 "job 102 (default): ran 1m30s on 4 cores, 2 GPUs"):
        assert text in page, text
    assert EVIL not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    # Nothing to fetch: no script, no link, no src, no url(); only the SVG namespace.
    assert not re.search(r"<script|<link|\bsrc=|\bhref=|url\(|@import", page)
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}

    # With Dask performance reports kept beside it, links to them, and only to them.
    reports = kept.with_name(kept.stem + ".reports")
    reports.mkdir()
    (reports / "etl-c1.html").write_text("<html>performance</html>")
    assert run_cli(capsys, "report", "etl", "-o", str(out), "--staging-dir",
                   str(tmp_path))[0] == 0
    page = out.read_text(encoding="utf-8")
    links = re.findall(r'href="([^"]+)"', page)
    assert links == [(reports / "etl-c1.html").as_uri()] * 2  # its computation, the list
    assert "Dask performance reports (1)" in page
    # The slowest prefix gets the longest bar.
    bars = dict(re.findall(r'<rect x="190" y="\d+" width="([\d.]+)"[^>]*><title>([^:<]+):',
                           page))
    assert float(max(bars, key=float)) == float(next(w for w, p in bars.items()
                                                     if p == "squares"))


def test_report_of_a_cluster_that_never_computed(tmp_path: Path) -> None:
    path = tmp_path / "clusters/team/idle-00000000/history.sqlite"
    path.parent.mkdir(parents=True)
    writer = HistoryWriter(str(path))
    writer.open({"namespace": "team", "name": "idle", "uid": "00000000"}, T0, "tcp://x:1",
                None)
    writer.close()
    page = render(history.load(history.find(tmp_path)[0]))
    assert "No computation recorded." in page and "No task failed." in page


# CI installs chromium (scripts/test.sh), so there the test must run, never skip.
@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                    reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The report as a browser draws it (the screenshot of a real cluster's report is taken
    on real SLURM: tests/integration/test_history.py)."""
    write_usage(write_history(tmp_path, "etl", archived=True), ETL_USAGE)
    report = tmp_path / "report.html"
    report.write_text(render(history.load(history.find(tmp_path)[0])), encoding="utf-8")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    assert png_detail(screenshot(blank, tmp_path / "blank.png", 1200, 1400)) < 16
    shot = screenshot(report, tmp_path / "report.png", 1200, 1400)
    assert png_dimensions(shot) == (1200, 1400) and png_detail(shot) > 100
