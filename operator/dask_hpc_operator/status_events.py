"""Which Kubernetes events a status change deserves: a pure function of (old, new) status.

`kubectl describe` and `kubectl get events` are where users and site staff look first when a
cluster is slow to come up. Each event marks one transition worth reading later: the phase
changed, a condition flipped (the scheduler connected, all workers became ready, workers
began failing), or a queued job's reason changed (Priority -> Resources tells a user their
job is next; a new reason is news). Repeats of the same state make no event, so a cluster
that waits an hour in the queue leaves a handful of events, not one per poll.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Event = tuple[str, str, str]  # (type Normal|Warning, reason, message)

# Conditions whose False state is bad news once they had been True (the scheduler lost, a
# worker pool shrinking) and whose True state is good news; WorkersFailing is the reverse.
BAD_WHEN_TRUE = frozenset({"WorkersFailing"})


def _conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type", ""): c for c in status.get("conditions") or []
            if isinstance(c, Mapping)}


def status_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """Events for the step from `old` to `new` status (old is {} on the first reconcile)."""
    events: list[Event] = []
    phase, message = str(new.get("phase", "")), str(new.get("message", ""))
    if phase != old.get("phase"):
        events.append(("Warning" if phase == "Failed" else "Normal", phase, message))
    elif phase == "Pending" and "queued" in message and message != old.get("message"):
        events.append(("Normal", "Queued", message))
    before = _conditions(old)
    for kind, cond in _conditions(new).items():
        prior = before.get(kind)
        if prior is None or prior.get("status") == cond.get("status") or kind == "Accepted":
            continue  # new conditions arrive with the phase event; Accepted has its own
        good = (cond.get("status") == "True") != (kind in BAD_WHEN_TRUE)
        reason = kind if cond.get("status") == "True" else f"Not{kind}"
        events.append(("Normal" if good else "Warning", reason, str(cond.get("message", ""))))
    return events


def emit(sink: Callable[[str, str, str], None], events: Sequence[Event]) -> None:
    for event in events:
        sink(*event)
