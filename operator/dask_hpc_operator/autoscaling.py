"""What a DaskAutoscaler decides, without I/O.

The Dask scheduler says how many workers a group could use right now (the `dask_hpc_scaling`
handler of `hpc_bridge.preloads.scaling`); that number jumps with every burst of tasks, while
a batch job takes minutes to queue and start. So the decision here adds what the scheduler
cannot know: the bounds the user set, and hysteresis. Growing is cheap to undo and late
growth costs the user time, so it happens at once; shrinking throws away workers that may
be wanted again a moment later (and their place in the queue), so it waits until the
recommendation has stayed below the current size for `scaleDownDelay` seconds, and then only
goes as low as the highest recommendation of that window.

The state that makes this work across reconciles (and operator restarts) lives in the
DaskAutoscaler's status, as JSON: see `ScaleState.to_status`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AutoscalerSpec:
    """Bounds are in worker jobs (the group's replicas), as in the CRD."""

    minimum: int = 0
    maximum: int = 0
    scale_down_delay: float = 60.0

    def __post_init__(self) -> None:
        if self.minimum < 0 or self.maximum < self.minimum:
            raise ValueError(f"need 0 <= minimum <= maximum, got [{self.minimum}, "
                             f"{self.maximum}]")
        if self.scale_down_delay < 0:
            raise ValueError("scaleDownDelay must not be negative")

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> AutoscalerSpec:
        """From a DaskAutoscaler's validated `spec` (the CRD's defaults where absent)."""
        return cls(int(spec.get("minimum", 0)), int(spec["maximum"]),
                   float(spec.get("scaleDownDelay", 60)))

    def clamp(self, replicas: int) -> int:
        return max(self.minimum, min(self.maximum, replicas))


@dataclass(frozen=True)
class Recommendation:
    """The scheduler's advice for one group, converted to worker jobs."""

    target: int  # jobs the scheduler's adaptive logic wants
    waiting: int = 0  # the group's tasks queued or unrunnable (for the reason)
    processing: int = 0
    resources: tuple[str, ...] = ()  # what the group's workers provide (for the reason)

    @classmethod
    def from_response(cls, group: Mapping[str, Any], processes: int = 1,
                      resources: tuple[str, ...] = ()) -> Recommendation:
        """From one entry of the handler's `groups`; its target counts Dask workers, and a
        job with `processes` > 1 runs that many of them, so round up to whole jobs."""
        workers = max(0, int(group.get("target", 0)))
        return cls(target=math.ceil(workers / max(1, processes)),
                   waiting=int(group.get("queued", 0)) + int(group.get("unrunnable", 0)),
                   processing=int(group.get("processing", 0)),
                   resources=tuple(resources))


@dataclass(frozen=True)
class ScaleState:
    """A scale-down window in progress: since when the (clamped) recommendation has been
    below the replicas, and the highest value it took meanwhile. Empty when none is open."""

    below_since: float | None = None
    window_max: int | None = None

    def to_status(self) -> dict[str, Any]:
        """Fields for the DaskAutoscaler's status (unknown fields there are preserved)."""
        return {"belowSince": self.below_since, "windowMax": self.window_max}

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> ScaleState:
        """Tolerates a missing or hand-edited status: anything unusable means no window, so
        the worst case is waiting one more scaleDownDelay, never an early scale-down."""
        status = status or {}
        since, peak = status.get("belowSince"), status.get("windowMax")
        if (isinstance(since, (int, float)) and not isinstance(since, bool)
                and isinstance(peak, int) and not isinstance(peak, bool) and peak >= 0):
            return cls(float(since), peak)
        return cls()


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    state: ScaleState = field(default_factory=ScaleState)
    current: int = 0

    @property
    def changed(self) -> bool:
        return self.replicas != self.current


def _workers(resources: tuple[str, ...]) -> str:
    return f"{'/'.join(resources)} workers" if resources else "workers"


def _tasks(n: int) -> str:
    return f"{n} task{'' if n == 1 else 's'}"


def _seconds(s: float) -> str:
    return f"{s:.0f} s"


def _bound_reason(spec: AutoscalerSpec, current: int, new: int) -> str:
    if new > current:
        return f"minimum is {spec.minimum}: {current} -> {new}"
    if new < current:
        return f"maximum is {spec.maximum}: {current} -> {new}"
    return ""


def decide(spec: AutoscalerSpec, current: int, recommendation: Recommendation | None,
           now: float, state: ScaleState | None = None) -> Decision:
    """The group's new replicas, why, and the state to keep for the next call.

    `recommendation` is None when the scheduler could not be asked: nothing is known about
    the work, so the size holds (brought inside the bounds, which are the user's, not the
    scheduler's) and any scale-down window is dropped rather than counted as evidence.
    """
    state = state or ScaleState()
    bounds = f"[{spec.minimum}, {spec.maximum}]"
    if recommendation is None:
        held = spec.clamp(current)
        return Decision(held, _bound_reason(spec, current, held)
                        or f"scheduler unreachable: holding at {current}", ScaleState(), current)

    wanted = spec.clamp(recommendation.target)
    if wanted > current:
        if recommendation.target < wanted:  # only the minimum asks for more
            why = _bound_reason(spec, current, wanted)
        else:
            clamped = "" if wanted == recommendation.target else (
                f" (adaptive target {recommendation.target}, bounds {bounds})")
            why = (f"{_tasks(recommendation.waiting)} waiting for "
                   f"{_workers(recommendation.resources)}" if recommendation.waiting
                   else f"{_tasks(recommendation.processing)} processing")
            why = f"{why}: {current} -> {wanted}{clamped}"
        return Decision(wanted, why, ScaleState(), current)
    if current > spec.maximum:
        # The user lowered the maximum: honour it now; shrinking further waits as usual.
        return Decision(spec.maximum, _bound_reason(spec, current, spec.maximum), ScaleState(),
                        current)
    clamped = "" if wanted == recommendation.target else (
        f" (adaptive target {recommendation.target})")
    if wanted == current:
        return Decision(current, f"within {bounds}: holding at {current}{clamped}", ScaleState(),
                        current)

    # Below: open a window, or widen it; act only once it has lasted scaleDownDelay.
    if state.below_since is not None and state.window_max is not None:
        since, peak = state.below_since, max(wanted, state.window_max)
    else:
        since, peak = now, wanted
    waited = max(0.0, now - since)
    if waited < spec.scale_down_delay:
        return Decision(current, f"adaptive target {recommendation.target} below {current} for "
                        f"{_seconds(waited)} of {_seconds(spec.scale_down_delay)}: holding at "
                        f"{current}", ScaleState(since, peak), current)
    new = min(peak, current)
    if new == current:  # replicas fell to the window's peak meanwhile: nothing to remove
        return Decision(current, f"within {bounds}: holding at {current}", ScaleState(),
                        current)
    idle = not (recommendation.waiting or recommendation.processing)
    # "idle" only when nothing in the window asked for more than what is left.
    why = (f"idle for {_seconds(waited)}" if idle and peak == wanted
           else f"at most {peak} needed for {_seconds(waited)}")
    return Decision(new, f"{why}: {current} -> {new}", ScaleState(), current)


def idle_expired(idle_timeout_s: float, idle_since: float | None, now: float) -> bool:
    """Whether a cluster has been without tasks for its spec.idleTimeout (0 = never).

    `idle_since` and `now` must come from the same clock: pass the handler's `idle_since`
    and `time`, both the scheduler's, since the operator's host clock may differ from the
    compute node's by more than a short timeout."""
    if idle_timeout_s <= 0 or idle_since is None:
        return False
    return now - idle_since >= idle_timeout_s
