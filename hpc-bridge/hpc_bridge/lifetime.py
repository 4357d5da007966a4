"""How long a worker may live inside its job's walltime, and when to replace it.

One pure rule, used twice: by the job script (the worker's `--lifetime` and
`--lifetime-stagger`) and by the operator's plan (when a running job stops counting toward
its group's replicas, so that its replacement is submitted ahead of the batch system's kill).
Both sides must agree, which is why the rule lives here, in the bridge, and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The batch system's walltime formats our manifests allow (crd_schema.WALLTIME), plus H:MM.
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?$")

MARGIN_FRACTION = 0.10  # of the walltime, kept free at the end of every job
MIN_MARGIN_S = 30.0  # a worker needs this long, at least, to hand its data over and exit
MAX_MARGIN_S = 600.0  # beyond 10 minutes a margin only wastes allocation time
MIN_WALLTIME_S = 60  # below this no margin leaves a useful lifetime: no lifetime at all


@dataclass(frozen=True)
class Lifetime:
    """Seconds, counted from the job's start."""

    walltime_s: int
    margin_s: int  # the end of the walltime that no worker should reach
    lifetime_s: int  # the worker's --lifetime
    stagger_s: int  # the worker's --lifetime-stagger: retirement is lifetime ± stagger
    replace_after_s: int  # from this age on, a running job is replaced (it is "expiring")

    @property
    def earliest_retirement_s(self) -> int:
        return self.lifetime_s - self.stagger_s

    def worker_args(self) -> list[str]:
        return ["--lifetime", f"{self.lifetime_s}s", "--lifetime-stagger", f"{self.stagger_s}s"]

    def worker_env(self) -> list[tuple[str, str]]:
        """The same lifetime as dask configuration, for worker commands without the
        options (`dask cuda worker` has no --lifetime; its Worker reads the config)."""
        return [("DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION", f"{self.lifetime_s}s"),
                ("DASK_DISTRIBUTED__WORKER__LIFETIME__STAGGER", f"{self.stagger_s}s")]


def parse_walltime(text: str) -> int:
    """`HH:MM:SS`, `D-HH:MM:SS` (hours may exceed 24) or `HH:MM` -> seconds."""
    match = _WALLTIME.fullmatch(text.strip())
    if not match:
        raise ValueError(f"walltime {text!r} is not [D-]HH:MM[:SS]")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    if minutes > 59 or seconds > 59:
        raise ValueError(f"walltime {text!r} has minutes or seconds above 59")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def worker_lifetime(walltime: str) -> Lifetime | None:
    """The lifetime rule; None for walltimes too short to hold one (under a minute).

    - margin = 10% of the walltime, clamped to [30 s, 10 min] (and at most a third of it):
      long enough for a worker to move its results to the others and exit, short enough
      not to waste much of the allocation (at most 10%, 30 s on short jobs).
    - lifetime = walltime - margin, stagger = margin / 3. Dask retires a worker at a
      uniformly random time in lifetime ± stagger, so workers of one array (started
      together) do not all leave at once, and every worker starts retiring at least
      2/3 · margin before the batch system kills it.
    - replace after = lifetime - stagger - margin: the replacement is submitted a full
      margin before the earliest possible retirement, so it can queue and start while the
      old worker still serves. On short walltimes that lead would make jobs be replaced
      almost as soon as they start (and replacements of replacements pile up), so the age
      is at least half the earliest retirement: at most about three jobs per replica are
      ever alive at once. In the 10% regime (walltime >= 5 min) the lead wins: a job is
      replaced at ~77% of its walltime and retires at ~90%, about 13% of overlap.
    """
    walltime_s = parse_walltime(walltime)
    if walltime_s < MIN_WALLTIME_S:
        return None
    margin = min(max(MARGIN_FRACTION * walltime_s, MIN_MARGIN_S), MAX_MARGIN_S,
                 walltime_s / 3)
    lifetime = int(walltime_s - margin)
    stagger = int(margin / 3)
    earliest = lifetime - stagger
    replace_after = max(earliest - int(margin), earliest // 2)
    return Lifetime(walltime_s, int(margin), lifetime, stagger, replace_after)
