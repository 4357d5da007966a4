"""status_events: which transitions of a status become Kubernetes events."""

from __future__ import annotations

from typing import Any

from dask_hpc_operator.status_events import status_events


def cond(kind: str, ok: bool, message: str = "") -> dict[str, str]:
    return {"type": kind, "status": "True" if ok else "False", "message": message}


def status(phase: str, message: str, *conditions: dict[str, str]) -> dict[str, Any]:
    return {"phase": phase, "message": message, "conditions": list(conditions)}


def test_first_reconcile_is_one_phase_event() -> None:
    new = status("Pending", "submitting the scheduler job", cond("SchedulerReady", False))
    assert status_events({}, new) == [("Normal", "Pending", "submitting the scheduler job")]


def test_queue_reason_changes_are_events_repeats_are_not() -> None:
    a = status("Pending", "scheduler job 7 is queued (Priority)")
    b = status("Pending", "scheduler job 7 is queued (Resources)")
    assert status_events(a, b) == [("Normal", "Queued", "scheduler job 7 is queued (Resources)")]
    assert status_events(b, b) == []


def test_scheduler_connected_and_workers_ready() -> None:
    old = status("Pending", "scheduler job 7 is starting", cond("SchedulerReady", False),
                 cond("WorkersReady", False, "0/2"))
    new = status("Running", "2/2 workers ready", cond("SchedulerReady", True, "scheduler at x"),
                 cond("WorkersReady", True, "2/2 workers connected"))
    assert status_events(old, new) == [
        ("Normal", "Running", "2/2 workers ready"),
        ("Normal", "SchedulerReady", "scheduler at x"),
        ("Normal", "WorkersReady", "2/2 workers connected")]


def test_losses_and_failures_are_warnings() -> None:
    old = status("Running", "2/2", cond("SchedulerReady", True), cond("WorkersFailing", False))
    new = status("Failed", "scheduler job 7 ended (TIMEOUT)", cond("SchedulerReady", False, "gone"),
                 cond("WorkersFailing", True, "3 failed in a row"))
    assert status_events(old, new) == [
        ("Warning", "Failed", "scheduler job 7 ended (TIMEOUT)"),
        ("Warning", "NotSchedulerReady", "gone"),
        ("Warning", "WorkersFailing", "3 failed in a row")]
    back = status("Running", "2/2", cond("SchedulerReady", True), cond("WorkersFailing", False))
    assert ("Normal", "NotWorkersFailing", "") in status_events(new, back)
