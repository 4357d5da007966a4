"""`dask-hpc report`: one cluster's history as a single, self-contained HTML file.

Self-contained because it is read where the cluster ran: on a login node, mailed to a
colleague, opened from a shared filesystem with no network. So no script, no CDN, no
external font or stylesheet: the charts are SVG written here, their tooltips SVG `<title>`
elements. Every string from the history (task keys, exception text, worker names, code) is
HTML-escaped: it came from user code. The only links are to the cluster's Dask performance
reports (spec.diagnostics.performanceReport), local files kept beside the history, by
absolute file URI so they work wherever the report is written.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable

from .history import ClusterHistory, Computation, cluster_state, hours, seconds, size, when
from .usage import JobUsage

WIDTH = 1000  # SVG user units; the SVG scales to the page width
LABEL_W = 190
ROW_H = 18
MAX_WORKER_ROWS = 60
STATE_COLOURS = {"finished": "#3b82c4", "erred": "#d9480f", "running": "#2f9e44",
                 "interrupted": "#868e96"}
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #212529; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #dee2e6;
         vertical-align: top; }
th { background: #f1f3f5; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #868e96; } svg { width: 100%; height: auto; display: block; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { color: #868e96; } dd { margin: 0; }
pre { white-space: pre-wrap; font-size: 12px; background: #f8f9fa; padding: 6px; }
.erred { color: #d9480f; } .swatch { display: inline-block; width: 10px; height: 10px; }
"""


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _tick_step(span: float) -> float:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400,
                 28800, 86400):
        if span / step <= 10:
            return float(step)
    return 86400.0 * max(1, int(span / 86400 / 10))


def _offset(s: float) -> str:
    if s < 60:
        return f"+{s:.0f}s"
    if s < 3600:
        return f"+{s / 60:.0f}m" if s % 60 == 0 else f"+{int(s // 60)}m{int(s % 60):02d}s"
    return f"+{s / 3600:.1f}h"


class Axis:
    """Seconds since `t0` to SVG x, over [LABEL_W, WIDTH - 30] (room for the last label)."""

    def __init__(self, t0: float, t1: float) -> None:
        self.t0 = t0
        self.span = max(t1 - t0, 1.0)

    def x(self, t: float) -> float:
        return LABEL_W + (WIDTH - 30 - LABEL_W) * (t - self.t0) / self.span

    def ticks(self, top: float, bottom: float) -> list[str]:
        step = _tick_step(self.span)
        out = []
        k = 0
        while k * step <= self.span + 1e-9:
            x = self.x(self.t0 + k * step)
            out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" '
                       'stroke="#e9ecef"/>')
            out.append(f'<text x="{x:.1f}" y="{bottom + 13}" font-size="11" '
                       f'text-anchor="middle" fill="#868e96">{_offset(k * step)}</text>')
            k += 1
        return out


def _bar(axis: Axis, y: float, start: float, end: float, colour: str, tip: str,
         h: float = ROW_H - 5) -> str:
    x0, x1 = axis.x(start), axis.x(max(end, start))
    return (f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0, 2.0):.1f}" height="{h}" '
            f'fill="{colour}" rx="2"><title>{e(tip)}</title></rect>')


def _label(y: float, text: str, cls: str = "") -> str:
    short = text if len(text) <= 28 else text[:27] + "…"
    fill = ' fill="#d9480f"' if cls == "erred" else ""
    return (f'<text x="{LABEL_W - 6}" y="{y + ROW_H - 7:.1f}" font-size="11" '
            f'text-anchor="end"{fill}>{e(short)}<title>{e(text)}</title></text>')


def timeline(h: ClusterHistory) -> str:
    """Scheduler runs, one row per worker, one row per computation (errors as red ticks)."""
    now = time.time()
    start = h.start
    if start is None:
        return '<p class="muted">No scheduler ever started.</p>'
    end = h.end or now
    axis = Axis(start, end)
    parts: list[str] = []
    y = 6.0
    for run in h.runs:
        parts.append(_bar(axis, y, run.start, run.until if run.state != "running" else now,
                          "#495057", f"scheduler {run.address or ''} on {run.host or '?'} "
                          f"(job {run.job_id or '-'}): {run.state}, {when(run.start)} - "
                          f"{when(run.end or run.last_seen)}"))
    parts.append(_label(y, "scheduler"))
    y += ROW_H
    workers = h.workers[:MAX_WORKER_ROWS]
    for w in workers:
        left = w.left if w.left is not None else now
        parts.append(_bar(axis, y, w.joined, left, "#adb5bd",
                          f"{w.name} ({w.address}): joined {when(w.joined)}, left "
                          f"{when(w.left)}; peak memory {size(w.memory_peak)}"))
        parts.append(_label(y, w.name))
        y += ROW_H
    if len(h.workers) > len(workers):
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + 11}" font-size="11" '
                     f'text-anchor="end" fill="#868e96">… {len(h.workers) - len(workers)} '
                     "more workers</text>")
        y += ROW_H
    for c in h.computations:
        colour = STATE_COLOURS.get(c.state, "#868e96")
        parts.append(_bar(axis, y, c.start, c.end or now, colour,
                          f"#{c.seq} {c.label}: {c.state}, {c.tasks_done} tasks, "
                          f"{seconds(c.duration)}"))
        for err in (x for x in h.errors if x.computation == c.id):
            ex = axis.x(err.time)
            parts.append(f'<rect x="{ex - 1:.1f}" y="{y - 2:.1f}" width="3" '
                         f'height="{ROW_H - 1}" fill="#c92a2a"><title>{e(err.key)}: '
                         f"{e(err.exception)}</title></rect>")
        parts.append(_label(y, f"#{c.seq} {c.label}", "erred" if c.tasks_erred else ""))
        y += ROW_H
    height = y + 20
    grid = axis.ticks(2, y + 2)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.0f}" '
            f'role="img" aria-label="timeline">{"".join(grid)}{"".join(parts)}</svg>')


def activity(h: ClusterHistory) -> str:
    """Tasks processing and total worker memory over time, from the scheduler's samples."""
    samples = h.samples
    if len(samples) < 2 or h.start is None:
        return ""
    axis = Axis(h.start, h.end or samples[-1].time)
    charts = []
    series: list[tuple[str, Callable[[int], str], list[tuple[float, float]]]] = [
        ("tasks processing", str, [(s.time, float(s.processing)) for s in samples]),
        ("worker memory", size, [(s.time, float(s.memory)) for s in samples]),
    ]
    for title, fmt, points in series:
        top = max((v for _, v in points), default=0.0) or 1.0
        coords = " ".join(f"{axis.x(t):.1f},{70 - 60 * v / top:.1f}" for t, v in points)
        charts.append(
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} 92" role="img" '
            f'aria-label="{e(title)}">{"".join(axis.ticks(8, 72))}'
            f'<text x="{LABEL_W - 6}" y="40" font-size="11" text-anchor="end">{e(title)}'
            f'</text><text x="{LABEL_W - 6}" y="54" font-size="11" text-anchor="end" '
            f'fill="#868e96">max {e(fmt(int(top)))}</text>'
            f'<polyline points="{coords}" fill="none" stroke="#3b82c4" stroke-width="1.5"/>'
            "</svg>")
    return "".join(charts)


def prefix_bars(h: ClusterHistory, top: int = 15) -> str:
    prefixes = [p for p in h.prefix_totals() if p.compute_seconds > 0][:top]
    if not prefixes:
        return ""
    longest = prefixes[0].compute_seconds
    bars = []
    for i, p in enumerate(prefixes):
        y = 4 + i * ROW_H
        w = (WIDTH - 10 - LABEL_W - 80) * p.compute_seconds / longest
        bars.append(
            f'<rect x="{LABEL_W}" y="{y}" width="{max(w, 1.0):.1f}" height="{ROW_H - 5}" '
            f'fill="#3b82c4"><title>{e(p.prefix)}: {p.tasks} tasks, '
            f"{e(seconds(p.compute_seconds))}</title></rect>"
            f'<text x="{LABEL_W + w + 6:.1f}" y="{y + ROW_H - 7}" font-size="11">'
            f"{e(seconds(p.compute_seconds))}</text>" + _label(y, p.prefix))
    height = 8 + len(prefixes) * ROW_H
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
            f'role="img" aria-label="task time by prefix">{"".join(bars)}</svg>')


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric: set[int]) -> str:
    head = "".join(f'<th class="n">{e(x)}</th>' if i in numeric else f"<th>{e(x)}</th>"
                   for i, x in enumerate(header))
    body = "".join("<tr>" + "".join(
        f'<td class="n">{x}</td>' if i in numeric else f"<td>{x}</td>"
        for i, x in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


QUEUE_COLOUR, RUN_COLOUR = "#ffd8a8", "#5c7cfa"
MAX_JOB_ROWS = 80


def queue_chart(h: ClusterHistory) -> str:
    """One row per batch job: waiting in the queue (submit to start), then running (start to
    end, or to the latest accounting for a running job), on the jobs' own time axis."""
    jobs = sorted((u for u in h.usage if u.submitted_at or u.started_at),
                  key=lambda u: (u.submitted_at or u.started_at or 0.0, u.job_id))
    if not jobs:
        return ""
    shown = jobs[:MAX_JOB_ROWS]
    as_of = h.usage_as_of or time.time()

    def run_end(u: JobUsage) -> float:
        start = u.started_at or 0.0
        return u.ended_at or start + u.run_seconds or as_of

    t0 = min(u.submitted_at or u.started_at or as_of for u in shown)
    t1 = max(max(run_end(u), u.submitted_at or 0.0) for u in shown)
    axis = Axis(t0, t1)
    parts: list[str] = []
    y = 6.0
    for u in shown:
        submitted = u.submitted_at or u.started_at or t0
        waited_until = u.started_at or u.ended_at or as_of
        parts.append(_bar(axis, y, submitted, waited_until, QUEUE_COLOUR,
                          f"job {u.job_id} ({u.group}): queued {seconds(u.queue_wait_seconds)}"))
        if u.started_at is not None:
            parts.append(_bar(axis, y, u.started_at, run_end(u), RUN_COLOUR,
                              f"job {u.job_id} ({u.group}): ran {seconds(u.run_seconds)} on "
                              f"{u.cores} cores, {u.gpus} GPUs; {u.state}"))
        parts.append(_label(y, f"{u.group} {u.job_id}"))
        y += ROW_H
    if len(jobs) > len(shown):
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + 11}" font-size="11" '
                     f'text-anchor="end" fill="#868e96">… {len(jobs) - len(shown)} more jobs'
                     "</text>")
        y += ROW_H
    height = y + 20
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.0f}" '
            f'role="img" aria-label="batch jobs">{"".join(axis.ticks(2, y + 2))}'
            f'{"".join(parts)}</svg>'
            f'<p class="muted"><span class="swatch" style="background:{QUEUE_COLOUR}"></span> '
            f'waiting in the queue &nbsp; <span class="swatch" style="background:{RUN_COLOUR}">'
            "</span> running</p>")


def usage_section(h: ClusterHistory) -> list[str]:
    """What the cluster's batch jobs were given, waited and ran: per group and per job."""
    if not h.usage:
        return ['<p class="muted">No usage recorded (the cluster predates usage accounting, '
                "or no job ran).</p>"]
    summary = h.usage_summary()
    t = summary.total
    note = "" if summary.final else (" Some jobs had no final accounting record when last "
                                     "asked: their figures are provisional.")
    parts = [f"<p>{t.jobs} batch jobs: <b>{e(hours(t.core_hours))} core-hours</b>, "
             f"<b>{e(hours(t.gpu_hours))} GPU-hours</b>, run time {e(seconds(t.run_seconds))}, "
             f"queue wait {e(seconds(t.queue_wait_seconds))} in all (mean "
             f"{e(seconds(t.mean_queue_wait_seconds))}). "
             f'<span class="muted">Source: {e(summary.source)}; GPUs: '
             f"{e(summary.gpu_source)}; as of {e(when(h.usage_as_of))}.{e(note)}</span></p>",
             queue_chart(h)]
    parts.append(_table(
        ["group", "jobs", "core-hours", "GPU-hours", "run time", "queue wait", "mean wait"],
        [[e(g), str(x.jobs), e(hours(x.core_hours)), e(hours(x.gpu_hours)),
          e(seconds(x.run_seconds)), e(seconds(x.queue_wait_seconds)),
          e(seconds(x.mean_queue_wait_seconds))] for g, x in summary.by_group.items()],
        {1, 2, 3, 4, 5, 6}))
    parts.append("<details><summary>Every batch job</summary>" + _table(
        ["job", "group", "state", "cores", "GPUs", "submitted", "queue wait", "run time",
         "core-hours", "GPU-hours", "source"],
        [[e(u.job_id), e(u.group), e(u.state), str(u.cores),
          f"{u.gpus}" + ("" if u.gpu_source == u.source or not u.gpus
                         else f" ({e(u.gpu_source)})"),
          e(when(u.submitted_at)), e(seconds(u.queue_wait_seconds)),
          e(seconds(u.run_seconds)), e(hours(u.core_hours)), e(hours(u.gpu_hours)),
          e(u.source) + ("" if u.final else " (provisional)")]
         for u in sorted(h.usage, key=lambda u: (u.submitted_at or 0.0, u.job_id))],
        {3, 4, 6, 7, 8, 9}) + "</details>")
    return parts


def _computation_row(c: Computation, report: str | None = None) -> list[str]:
    colour = STATE_COLOURS.get(c.state, "#868e96")
    return [str(c.seq), e(when(c.start)), e(seconds(c.duration)),
            f'<span class="swatch" style="background:{colour}"></span> {e(c.state)}',
            f"{c.tasks_done}/{c.tasks_submitted}",
            f'<span class="erred">{c.tasks_erred}</span>' if c.tasks_erred else "0",
            e(seconds(c.compute_seconds)), e(size(c.bytes_transferred)),
            e(size(c.worker_memory_peak)),
            e(c.label) + (f'<br><span class="muted">{e(c.code_location)}</span>'
                          if c.code_location else "")
            + (f'<br><a href="{e(report)}">Dask performance report</a>' if report else "")]


def _report_link(h: ClusterHistory, computation: str) -> str | None:
    """The file URI of a computation's performance report: absolute, so the link works
    wherever this page is written (`-o`)."""
    path = h.report_of(computation)
    return path.resolve().as_uri() if path is not None else None


def render(h: ClusterHistory) -> str:
    """The whole report (a str: write it with UTF-8)."""
    title = f"DaskCluster {h.namespace}/{h.name}"
    runs = ", ".join(f"job {r.job_id or '-'} on {r.host or '?'} ({r.state})" for r in h.runs)
    summary = [("uid", h.uid), ("state", cluster_state(h)), ("start", when(h.start)),
               ("end", when(h.end)),
               ("duration", seconds(((h.end or time.time()) - h.start) if h.start else None)),
               ("scheduler", runs or "-"), ("computations", str(len(h.computations))),
               ("tasks", f"{h.tasks} done, {h.erred} erred"), ("workers", str(len(h.workers))),
               ("history file", str(h.file.path))]
    if h.usage:
        used = h.usage_summary().total
        summary.insert(7, ("usage", f"{hours(used.core_hours)} core-hours, "
                                    f"{hours(used.gpu_hours)} GPU-hours in {used.jobs} batch "
                                    f"jobs; mean queue wait "
                                    f"{seconds(used.mean_queue_wait_seconds)}"))
    parts = [f"<h1>{e(title)}</h1>",
             "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in summary) + "</dl>",
             "<h2>Timeline</h2>", timeline(h), activity(h),
             "<h2>Computations</h2>"]
    if h.computations:
        parts.append(_table(["#", "start", "duration", "state", "tasks", "erred", "task time",
                             "transferred", "worker memory peak", "what"],
                            [_computation_row(c, _report_link(h, c.id))
                             for c in h.computations], {0, 4, 5, 6, 7, 8}))
    else:
        parts.append('<p class="muted">No computation recorded.</p>')
    prefixes = h.prefix_totals()
    parts.append("<h2>Slowest task prefixes</h2>")
    if prefixes:
        parts.append(prefix_bars(h))
        parts.append(_table(
            ["prefix", "tasks", "erred", "task time", "mean", "longest", "transfer time",
             "transferred", "results"],
            [[e(p.prefix), str(p.tasks), str(p.erred), e(seconds(p.compute_seconds)),
              e(seconds(p.compute_seconds / max(p.tasks + p.erred, 1))),
              e(seconds(p.max_seconds)), e(seconds(p.transfer_seconds)),
              e(size(p.bytes_transferred)), e(size(p.output_bytes))]
             for p in prefixes[:50]], {1, 2, 3, 4, 5, 6, 7, 8}))
    else:
        parts.append('<p class="muted">No task ran.</p>')
    parts.append("<h2>Batch jobs: queue waits and usage</h2>")
    parts += usage_section(h)
    if h.reports:
        parts.append(f"<h2>Dask performance reports ({len(h.reports)})</h2>")
        parts.append("<p>" + ", ".join(f'<a href="{e(p.resolve().as_uri())}">{e(p.name)}</a>'
                                       for p in h.reports) + "</p>")
    parts.append(f"<h2>Errors ({len(h.errors)})</h2>")
    if h.errors:
        seq = {c.id: c.seq for c in h.computations}
        parts.append(_table(
            ["#", "time", "task", "worker", "exception"],
            [[str(seq.get(x.computation or "", "-")), e(when(x.time)), e(x.key),
              e(x.worker or "-"),
              f"<details><summary>{e(x.exception)}</summary><pre>{e(x.traceback)}</pre>"
              "</details>"] for x in h.errors], {0}))
    else:
        parts.append('<p class="muted">No task failed.</p>')
    parts.append("<h2>Workers</h2>")
    parts.append(_table(
        ["name", "host", "threads", "memory limit", "memory peak", "joined", "left"],
        [[e(w.name), e(w.host or "-"), str(w.nthreads), e(size(w.memory_limit)),
          e(size(w.memory_peak)), e(when(w.joined)), e(when(w.left))] for w in h.workers],
        {2, 3, 4}) if h.workers else '<p class="muted">No worker joined.</p>')
    parts.append(f'<p class="muted">Written by dask-hpc report at {e(when(time.time()))}. '
                 "Times are UTC; task time is the workers' compute time; bytes transferred "
                 "are the scheduler's estimate.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
