"""dask_hpc_operator.autoscaling: the DaskAutoscaler's decisions as pure functions."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from dask_hpc_operator.autoscaling import (
    AutoscalerSpec,
    Decision,
    Recommendation,
    ScaleState,
    decide,
    idle_expired,
)

SPEC = AutoscalerSpec(minimum=1, maximum=8, scale_down_delay=60)
GPU = ("GPU",)


def rec(target: int, waiting: int = 0, processing: int = 0,
        resources: tuple[str, ...] = ()) -> Recommendation:
    return Recommendation(target, waiting, processing, resources)


@pytest.mark.parametrize(
    ("case", "spec", "current", "recommendation", "state", "now", "replicas", "new_state",
     "reason"),
    [
        ("up at once", SPEC, 0, rec(3, waiting=3, resources=GPU), ScaleState(), 0.0, 3,
         ScaleState(), "3 tasks waiting for GPU workers: 0 -> 3"),
        ("up at once, processing only", SPEC, 2, rec(5, processing=9), ScaleState(), 0.0, 5,
         ScaleState(), "9 tasks processing: 2 -> 5"),
        ("up clamped to maximum", SPEC, 2, rec(50, waiting=200), ScaleState(), 0.0, 8,
         ScaleState(), "200 tasks waiting for workers: 2 -> 8 (adaptive target 50"),
        ("up cancels an open down window", SPEC, 4, rec(6, waiting=1),
         ScaleState(0.0, 2), 30.0, 6, ScaleState(), "1 task waiting for workers: 4 -> 6"),
        ("equal holds", SPEC, 4, rec(4, processing=4), ScaleState(), 0.0, 4, ScaleState(),
         "within [1, 8]: holding at 4"),
        ("at maximum holds", SPEC, 8, rec(20, waiting=50), ScaleState(), 0.0, 8, ScaleState(),
         "holding at 8 (adaptive target 20"),
        ("equal closes an open down window", SPEC, 4, rec(4), ScaleState(0.0, 2), 59.0, 4,
         ScaleState(), "holding at 4"),
        ("below opens a window", SPEC, 4, rec(1), ScaleState(), 100.0, 4,
         ScaleState(100.0, 1), "adaptive target 1 below 4"),
        ("below inside the window holds, tracking its peak", SPEC, 4, rec(2),
         ScaleState(100.0, 3), 159.0, 4, ScaleState(100.0, 3), "holding at 4"),
        ("window over: down to the window's peak", SPEC, 4, rec(1, processing=1),
         ScaleState(100.0, 3), 160.0, 3, ScaleState(), "at most 3 needed for 60 s: 4 -> 3"),
        ("window over, idle all along", SPEC, 4, rec(0), ScaleState(0.0, 1), 60.0, 1,
         ScaleState(), "idle for 60 s: 4 -> 1"),
        ("never below minimum", AutoscalerSpec(2, 8, 0), 4, rec(0), ScaleState(), 5.0, 2,
         ScaleState(), "idle for 0 s: 4 -> 2"),
        ("zero delay scales down on the first call", AutoscalerSpec(0, 8, 0), 3, rec(1),
         ScaleState(), 5.0, 1, ScaleState(), "3 -> 1"),
        ("below minimum is raised at once", SPEC, 0, rec(0), ScaleState(), 0.0, 1,
         ScaleState(), "minimum is 1: 0 -> 1"),
        ("above a lowered maximum is cut at once", AutoscalerSpec(0, 3, 600), 6, rec(6),
         ScaleState(0.0, 5), 1.0, 3, ScaleState(), "maximum is 3: 6 -> 3"),
        ("unreachable holds and drops the window", SPEC, 4, None, ScaleState(0.0, 1), 600.0,
         4, ScaleState(), "scheduler unreachable: holding at 4"),
        ("unreachable still respects the minimum", SPEC, 0, None, ScaleState(), 0.0, 1,
         ScaleState(), "minimum is 1"),
    ],
)
def test_decide(case: str, spec: AutoscalerSpec, current: int,
                recommendation: Recommendation | None, state: ScaleState, now: float,
                replicas: int, new_state: ScaleState, reason: str) -> None:
    decision = decide(spec, current, recommendation, now, state)
    assert decision.replicas == replicas, (case, decision)
    assert decision.state == new_state, (case, decision)
    assert reason in decision.reason, (case, decision.reason)
    assert decision.changed == (replicas != current)
    assert spec.minimum <= decision.replicas <= spec.maximum


def simulate(spec: AutoscalerSpec, start: int, targets: Sequence[int | None],
             period: float = 10.0) -> list[Decision]:
    """One reconcile every `period` seconds, the state round-tripped through JSON as the
    operator keeps it in the DaskAutoscaler's status."""
    replicas, status, decisions = start, json.dumps(ScaleState().to_status()), []
    for i, target in enumerate(targets):
        recommendation = None if target is None else rec(target, processing=target)
        decision = decide(spec, replicas, recommendation, i * period,
                          ScaleState.from_status(json.loads(status)))
        decisions.append(decision)
        replicas, status = decision.replicas, json.dumps(decision.state.to_status())
    return decisions


@pytest.mark.parametrize(
    ("case", "start", "targets", "replicas"),
    [
        # A recommendation dipping below and coming back never lets a window complete.
        ("dips below and back", 4, [2, 4] * 10, [4] * 20),
        ("bursts above then dips", 4, [6, 2] * 10, [6] * 20),
        # Persistently below but noisy: one step down, to the highest value of the window.
        ("noisy below", 6, [2, 3, 1, 3, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1],
         [6, 6, 6, 6, 6, 6, 3, 3, 3, 3, 3, 3, 3, 1]),
        # Unreachable scheduler in the middle of a window: the window restarts after it.
        ("unreachable resets", 4, [1, 1, 1, None, 1, 1, 1, 1, 1, 1, 1],
         [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1]),
    ],
)
def test_no_flapping(case: str, start: int, targets: list[int | None],
                     replicas: list[int]) -> None:
    spec = AutoscalerSpec(minimum=1, maximum=8, scale_down_delay=60)
    got = [d.replicas for d in simulate(spec, start, targets)]
    assert got == replicas, case
    changes = sum(1 for d in simulate(spec, start, targets) if d.changed)
    assert changes <= 2, case


def test_state_survives_json_and_ignores_garbage() -> None:
    state = ScaleState(12.5, 3)
    assert ScaleState.from_status(json.loads(json.dumps(state.to_status()))) == state
    for bad in (None, {}, {"belowSince": "x", "windowMax": 1}, {"belowSince": 1.0},
                {"belowSince": True, "windowMax": 1}, {"belowSince": 1.0, "windowMax": -1}):
        assert ScaleState.from_status(bad) == ScaleState()


@pytest.mark.parametrize(
    ("answer", "processes", "expected"),
    [
        ({"target": 5, "queued": 2, "unrunnable": 1, "processing": 4}, 1, rec(5, 3, 4)),
        ({"target": 5}, 2, rec(3)),  # 5 workers of 2 processes each: 3 jobs
        ({"target": 4}, 2, rec(2)),
        ({"target": 0}, 4, rec(0)),
    ],
)
def test_recommendation_from_response(answer: dict[str, int], processes: int,
                                      expected: Recommendation) -> None:
    assert Recommendation.from_response(answer, processes) == expected


def test_spec_from_manifest_and_validation() -> None:
    assert AutoscalerSpec.from_spec({"cluster": "c1", "maximum": 4}) == AutoscalerSpec(0, 4, 60)
    assert AutoscalerSpec.from_spec({"minimum": 1, "maximum": 2, "scaleDownDelay": 5}) == \
        AutoscalerSpec(1, 2, 5)
    with pytest.raises(ValueError):
        AutoscalerSpec(3, 2)


@pytest.mark.parametrize(
    ("timeout", "idle_since", "now", "expired"),
    [
        (0, 0.0, 1e9, False),  # 0 = never
        (60, None, 1e9, False),  # busy
        (60, 100.0, 159.9, False),
        (60, 100.0, 160.0, True),
        (60, 100.0, 50.0, False),  # clocks disagree: not idle long enough
    ],
)
def test_idle_expired(timeout: float, idle_since: float | None, now: float,
                      expired: bool) -> None:
    assert idle_expired(timeout, idle_since, now) is expired
