"""Summaries, targets and the printed tables of a run (no measuring here).

Tables are Markdown, so that the terminal output can go to the README's Performance
section as it is. Every figure of a repeated measurement is the median, with [min..max].
Targets are reported, never asserted: each says met or missed, the value, the limit and
by how much.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .calls import IdleCalls, ScaleCalls
from .common import SLURM_COMMANDS, ratio, spread
from .ready import ReadyResult
from .systems import EMBEDDED, FLOOR, JOBQUEUE, KOPF, LABELS, SYSTEMS
from .teardown import TeardownResult

TARGET_N = 8
TEARDOWN_N = 16
READY_VS_JOBQUEUE = 1.0
READY_VS_FLOOR = 1.3
SQUEUE_PER_PERIOD = 1.0
SBATCH_PER_SCALE_UP = 1
SIM_TARGET_WORKERS = 50_000


def _median_calls(calls: Sequence[dict[str, int]]) -> dict[str, float]:
    return {c: statistics.median(x.get(c, 0) for x in calls) for c in SLURM_COMMANDS}


def _median(row: dict[str, Any], system: str, key: str) -> float | None:
    return float(row[system][key]["median"]) if system in row else None


def _calls_cell(row: dict[str, Any], system: str) -> str:
    if system not in row:
        return "-"
    calls = row[system]["calls_median"]
    return " ".join(f"{k} {v:g}" for k, v in calls.items() if v) or "none"


def _spread_cell(row: dict[str, Any], system: str, key: str) -> str:
    return _cell(row[system][key]) if system in row else "-"


def summarize_ready(results: list[ReadyResult]) -> dict[str, Any]:
    by_n: dict[str, dict[str, Any]] = {}
    for n in sorted({r.n for r in results}):
        row: dict[str, Any] = {}
        for system in SYSTEMS:
            mine = [r for r in results if r.n == n and r.system == system]
            if not mine:
                continue
            reported = [r.reported_s for r in mine if r.reported_s is not None]
            row[system] = {"ready_s": spread(r.ready_s for r in mine),
                           "address_s": spread(r.address_s for r in mine),
                           "reported_s": spread(reported) if reported else None,
                           "calls_median": _median_calls([r.calls for r in mine])}
        row["ratios"] = {f"{a}/{b}": ratio(_median(row, a, "ready_s"),
                                           _median(row, b, "ready_s"))
                         for a in (EMBEDDED, KOPF) for b in (JOBQUEUE, FLOOR)}
        by_n[str(n)] = row
    return by_n


def summarize_teardown(results: list[TeardownResult]) -> dict[str, Any]:
    by_n: dict[str, dict[str, Any]] = {}
    for n in sorted({r.n for r in results}):
        row: dict[str, Any] = {}
        for system in (EMBEDDED, KOPF, JOBQUEUE):
            mine = [r for r in results if r.n == n and r.system == system]
            if mine:
                row[system] = {"gone_s": spread(r.gone_s for r in mine),
                               "released_s": spread(r.released_s for r in mine),
                               "calls_median": _median_calls([r.calls for r in mine])}
        row["ratios"] = {f"{a}/{JOBQUEUE}": ratio(_median(row, a, "gone_s"),
                                                  _median(row, JOBQUEUE, "gone_s"))
                         for a in (EMBEDDED, KOPF)}
        by_n[str(n)] = row
    return by_n


@dataclass
class Target:
    name: str
    met: bool | None  # None: not measured in this run
    value: float | None
    limit: float
    detail: str


def _ratio_target(name: str, value: float | None, limit: float, why_none: str) -> Target:
    if value is None:
        return Target(name, None, None, limit, why_none)
    met = value <= limit
    change = abs(value / limit - 1) * 100
    return Target(name, met, value, limit,
                  f"{value:.2f}x (limit {limit:.2f}x): {change:.0f}% "
                  f"{'under' if met else 'over'} the limit")


def targets(ready: dict[str, Any], scales: list[ScaleCalls], idles: list[IdleCalls],
            sim: dict[str, Any] | None) -> list[Target]:
    found: list[Target] = []
    row = ready.get(str(TARGET_N), {})
    why = f"no N={TARGET_N} run in this run (--quick measures N=1 only)"
    for system in (EMBEDDED, KOPF):
        ratios = row.get("ratios", {})
        found.append(_ratio_target(f"ready at N={TARGET_N}, {LABELS[system]} <= "
                                   f"{READY_VS_JOBQUEUE:g}x dask-jobqueue",
                                   ratios.get(f"{system}/{JOBQUEUE}"), READY_VS_JOBQUEUE, why))
        found.append(_ratio_target(f"ready at N={TARGET_N}, {LABELS[system]} <= "
                                   f"{READY_VS_FLOOR:g}x floor",
                                   ratios.get(f"{system}/{FLOOR}"), READY_VS_FLOOR, why))
    for idle in idles:
        value = idle.squeue_per_period
        met = value <= SQUEUE_PER_PERIOD
        found.append(Target(f"one squeue per poll period, M={idle.m} idle clusters", met,
                            value, SQUEUE_PER_PERIOD,
                            f"{idle.calls['squeue']} squeue in {idle.periods} periods of "
                            f"{idle.poll_period_s:g} s = {value:.2f} per period (limit "
                            f"{SQUEUE_PER_PERIOD:g})" + ("" if met else
                                                        f": {value - 1:.2f} too many")))
    if not idles:
        found.append(Target("one squeue per poll period whatever M", None, None,
                            SQUEUE_PER_PERIOD, "not measured"))
    op = [s for s in scales if s.system == EMBEDDED]
    if op:
        sbatch = op[0].scale_up["sbatch"]
        met = sbatch <= SBATCH_PER_SCALE_UP
        found.append(Target(f"one sbatch per scale-up (0 -> {op[0].n})", met, sbatch,
                            SBATCH_PER_SCALE_UP,
                            f"{sbatch} sbatch (limit {SBATCH_PER_SCALE_UP})"
                            + ("" if met else f": {sbatch - SBATCH_PER_SCALE_UP} too many")))
    else:
        found.append(Target("one sbatch per scale-up", None, None, SBATCH_PER_SCALE_UP,
                            "not measured"))
    if sim is not None:
        cpu = sim["cycle_cpu_s"]["median"]
        limit = sim["target_cycle_cpu_s"]
        size = sim["simulated_workers"]
        scope = "" if size == SIM_TARGET_WORKERS else \
            f" (simulated {size:,} workers; the target is for {SIM_TARGET_WORKERS:,})"
        met = cpu < limit
        found.append(Target(f"reconcile cycle over {size:,} workers < {limit:g} s CPU", met,
                            cpu, limit,
                            f"{cpu:.3f} s CPU (limit {limit:g} s): "
                            + (f"{limit / cpu:.1f}x under" if met else f"{cpu / limit:.1f}x over")
                            + scope))
    else:
        found.append(Target("reconcile cycle < 1 s CPU", None, None, 1.0, "not measured"))
    return found


# --- tables ------------------------------------------------------------------------------

def _cell(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.2f} s"
    return f"{s['median']:.2f} s [{s['min']:.2f}..{s['max']:.2f}]"


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ready_table(ready: dict[str, Any]) -> str:
    lines = ["| N | " + " | ".join(LABELS[s] for s in SYSTEMS)
             + " | op/jq | op/floor | kopf/jq | kopf/floor |",
             "|---|" + "---|" * (len(SYSTEMS) + 4)]
    for n, row in ready.items():
        cells = [_cell(row[s]["ready_s"]) if s in row else "-" for s in SYSTEMS]
        r = row["ratios"]
        lines.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(
            _r(r.get(k)) for k in (f"{EMBEDDED}/{JOBQUEUE}", f"{EMBEDDED}/{FLOOR}",
                                   f"{KOPF}/{JOBQUEUE}", f"{KOPF}/{FLOOR}")) + " |")
    extra = ["", "| N | address known: operator (up) / (kopf) | status says ready: "
             "operator (up) / (kopf) | batch calls request->ready, median (up / kopf / "
             "jobqueue) |", "|---|---|---|---|"]
    for n, row in ready.items():
        extra.append(f"| {n} | {_spread_cell(row, EMBEDDED, 'address_s')} / "
                     f"{_spread_cell(row, KOPF, 'address_s')} | "
                     f"{_spread_cell(row, EMBEDDED, 'reported_s')} / "
                     f"{_spread_cell(row, KOPF, 'reported_s')} | "
                     f"{_calls_cell(row, EMBEDDED)} / {_calls_cell(row, KOPF)} / "
                     f"{_calls_cell(row, JOBQUEUE)} |")
    return "\n".join(lines + extra)


def teardown_table(teardown: dict[str, Any]) -> str:
    systems = (EMBEDDED, KOPF, JOBQUEUE)
    lines = ["| N | " + " | ".join(LABELS[s] for s in systems) + " | op/jq | kopf/jq | "
             "calls, median (up / kopf / jobqueue) |", "|---|" + "---|" * 6]
    for n, row in teardown.items():
        r = row["ratios"]
        lines.append(f"| {n} | " + " | ".join(
            _cell(row[s]["gone_s"]) if s in row else "-" for s in systems)
            + f" | {_r(r.get(f'{EMBEDDED}/{JOBQUEUE}'))} | {_r(r.get(f'{KOPF}/{JOBQUEUE}'))}"
            + f" | {' / '.join(_calls_cell(row, s) for s in systems)} |")
    return "\n".join(lines)


def calls_table(scales: list[ScaleCalls], idles: list[IdleCalls]) -> str:
    lines = ["| what | sbatch | squeue | scancel | sacct |", "|---|---|---|---|---|"]

    def row(what: str, c: dict[str, Any]) -> None:
        lines.append(f"| {what} | " + " | ".join(f"{c.get(k, 0):g}" for k in SLURM_COMMANDS)
                     + " |")
    for s in scales:
        row(f"{LABELS[s.system]}: scale-up 0 -> {s.n}", s.scale_up)
    for s in scales:
        row(f"{LABELS[s.system]}: teardown of that cluster", s.teardown)
    for i in idles:
        per = {k: v / i.periods for k, v in i.calls.items()}
        row(f"{LABELS[EMBEDDED]}: idle, per {i.poll_period_s:g} s poll period, M={i.m}", per)
    for i in idles:
        row(f"{LABELS[EMBEDDED]}: teardown of the M={i.m} idle clusters", i.teardown)
    if idles:
        lines.append("")
        lines.append("| M idle clusters | Session steps in the window | process CPU per step |")
        lines.append("|---|---|---|")
        lines += [f"| {i.m} | {i.steps} | {i.cpu_ms_per_step:.1f} ms |" for i in idles]
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def reconcile_table(sim: dict[str, Any]) -> str:
    mem = sim["memory"]
    lines = ["| clusters x workers | CPU per steady cycle | per cluster | pure plan + status "
             "| first cycle (submits all) | peak RSS (after imports) | tracemalloc peak in a "
             "cycle |", "|---|---|---|---|---|---|---|",
             f"| {sim['clusters']:,} x {sim['workers_per_cluster']} | "
             f"{sim['cycle_cpu_s']['median']:.3f} s | {sim['cpu_per_cluster_ms']:.2f} ms | "
             f"{sim['core_cycle_cpu_s']['median']:.3f} s | {sim['first_cycle']['cpu_s']:.2f} s "
             f"| {_mib(mem['peak_rss_end_mib'])} ({_mib(mem['peak_rss_after_imports_mib'])}) | "
             f"{mem['tracemalloc_cycle_peak_mib']:.1f} MiB |", "",
             f"Where a cycle's time goes ({sim['profiled']}, own time):", ""]
    lines += [f"- {f['function']}: {f['own_s']:.3f} s own, {f['calls']:,} calls"
              for f in sim["top_own_time"][:6]]
    return "\n".join(lines)


def targets_table(found: list[Target]) -> str:
    lines = ["| target | result | detail |", "|---|---|---|"]
    for t in found:
        result = "not measured" if t.met is None else ("met" if t.met else "MISSED")
        lines.append(f"| {t.name} | {result} | {t.detail} |")
    return "\n".join(lines)


def as_dicts(items: Sequence[Any]) -> list[dict[str, Any]]:
    return [asdict(i) for i in items]
