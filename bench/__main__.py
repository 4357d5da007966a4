"""`python -m bench`: the operator against its baselines, four sections in one run.

1. time to ready, N = 1, 8, 16: the operator (as `dask-hpc up` runs it, and under kopf
   against a Kubernetes API), dask-jobqueue's SLURMCluster, and a floor of plain `dask
   worker` processes; 3 repetitions, medians, ratios (bench.ready).
2. control-plane calls: sbatch/squeue/scancel for a scale-up 0 -> N, a teardown, and per
   poll period with M = 1, 10, 50 idle clusters (bench.calls).
3. reconcile at scale: CPU and memory of one reconcile cycle over 1,000 simulated
   clusters of 50 workers (bench.reconcile_scale, in a subprocess of its own).
4. teardown, delete -> no job left, measured on section 1's clusters (bench.teardown).

Prints Markdown tables and each target as met or missed, and writes everything, raw
values included, to bench/results/bench.json (bench-quick.json for --quick; an
interrupted or failed run writes nothing). Run from the repository root, with the
one-node SLURM of scripts/slurm-up.sh up:

    .venv/bin/python -m bench            # the full run (about 8 minutes on 2 cores)
    .venv/bin/python -m bench --quick    # smoke run: N=1, 1 repetition, M=1, 100 clusters

Every SLURM job of the run carries the run's tag (namespace `bench-<id>` in operator job
comments, `bench-<id>-` in dask-jobqueue job names); whatever of it is still queued or
running at the end, after an error, Ctrl-C or SIGTERM too, is cancelled, and the run says
whether squeue still shows any of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from dask_hpc_operator.reconcile import Runtime

from . import calls as calls_section
from . import kube, report
from . import ready as ready_section
from .common import (
    FAST_MIN_POLL_S,
    FAST_POLL_S,
    PARTITION,
    REPO,
    RESULTS,
    SCHEDULER_SPEC,
    WALLTIME,
    WORKER_CORES,
    WORKER_MEMORY,
    RunTag,
    cancel_run_jobs,
    site_config,
    slurm_problem,
    slurm_version,
    wait_run_jobs_gone,
)
from .counting import CallCounter
from .systems import KOPF, SYSTEMS

SECTIONS = ("ready", "calls", "reconcile")
BUDGET_S = 15 * 60
RECONCILE_TIMEOUT_S = 420.0


@dataclass
class Collected:
    ready: list[ready_section.ReadyResult] = field(default_factory=list)
    teardown: list[Any] = field(default_factory=list)
    scales: list[calls_section.ScaleCalls] = field(default_factory=list)
    idles: list[calls_section.IdleCalls] = field(default_factory=list)
    sim: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def say(text: str) -> None:
    print(text, flush=True)


async def section_ready(args: argparse.Namespace, tag: RunTag, workdir: Path,
                        counter: CallCounter, out: Collected) -> None:
    site = site_config(workdir)
    async with contextlib.AsyncExitStack() as stack:
        api = None
        if KOPF in args.systems:
            url = await stack.enter_async_context(kube.emulator())
            operator = kube.KopfOperator(url, Runtime(site))
            await operator.start()

            async def stop_kopf() -> None:
                out.failures.extend(await operator.stop())
            stack.push_async_callback(stop_kopf)
            api = kube.custom_objects(url)
        ctx = ready_section.ReadyContext(tag, workdir, counter, site, api, say)
        ready, teardown, failures = await ready_section.run_section(
            ctx, args.systems, args.sizes, args.reps)
    out.ready, out.teardown = ready, teardown
    out.failures += failures


async def section_calls(args: argparse.Namespace, tag: RunTag, workdir: Path,
                        counter: CallCounter, out: Collected) -> None:
    scales, idles, failures = await calls_section.run_section(
        tag, workdir, counter, args.scale_n, args.idle, args.periods, say)
    out.scales, out.idles = scales, idles
    out.failures += failures


async def section_reconcile(args: argparse.Namespace, workdir: Path, out: Collected) -> None:
    """In a fresh interpreter, so that its peak RSS is its own."""
    path = workdir / "reconcile.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.reconcile_scale", "--clusters", str(args.sim_clusters),
        "--workers", str(args.sim_workers), "--cycles", str(args.sim_cycles),
        "--json", str(path), cwd=str(REPO))
    try:
        code = await asyncio.wait_for(proc.wait(), RECONCILE_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        out.failures.append(f"reconcile at scale: no result within {RECONCILE_TIMEOUT_S:.0f} s")
        return
    if code != 0:
        out.failures.append(f"reconcile at scale: exited {code}")
        return
    out.sim = json.loads(path.read_text())
    sim = out.sim
    say(f"  {sim['clusters']} clusters x {sim['workers_per_cluster']} workers: "
        f"{sim['cycle_cpu_s']['median']:.3f} s CPU per cycle (pure core "
        f"{sim['core_cycle_cpu_s']['median']:.3f} s), peak RSS "
        f"{sim['memory']['peak_rss_end_mib']} MiB")


async def run(args: argparse.Namespace, tag: RunTag, workdir: Path, counter: CallCounter,
              out: Collected) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    steps = (("ready", "1+4. time to ready and teardown",
              lambda: section_ready(args, tag, workdir, counter, out)),
             ("calls", "2. control-plane calls (held jobs)",
              lambda: section_calls(args, tag, workdir, counter, out)),
             ("reconcile", "3. reconcile at scale (simulated)",
              lambda: section_reconcile(args, workdir, out)))
    for key, title, step in steps:
        if key not in args.sections:
            continue
        say(f"== {title} (load {os.getloadavg()[0]:.2f})")
        started = time.monotonic()
        await step()
        out.seconds[key] = round(time.monotonic() - started, 1)


def tables(out: Collected, ready: dict[str, Any], teardown: dict[str, Any],
           found: list[report.Target]) -> str:
    parts = []
    if ready:
        parts += ["### 1. Time to ready (request -> N workers connected), median [min..max]",
                  "", report.ready_table(ready), ""]
    if out.scales or out.idles:
        parts += ["### 2. Control-plane calls (held jobs; default periods)", "",
                  report.calls_table(out.scales, out.idles), ""]
    if out.sim:
        parts += ["### 3. Reconcile at scale (simulated backend and schedulers)", "",
                  report.reconcile_table(out.sim), ""]
    if teardown:
        parts += ["### 4. Teardown (delete -> squeue shows no job of the cluster)", "",
                  report.teardown_table(teardown), ""]
    parts += ["### Targets", "", report.targets_table(found)]
    return "\n".join(parts)


def parse(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m bench", description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=1, 1 repetition, M=1, 100 simulated clusters")
    parser.add_argument("--reps", type=int, help="repetitions of section 1 (default 3)")
    parser.add_argument("--sizes", help="N of section 1, comma-separated (default 1,8,16)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"section 1's systems (default {','.join(SYSTEMS)})")
    parser.add_argument("--idle", help="M of section 2, comma-separated (default 1,10,50)")
    parser.add_argument("--periods", type=int, help="poll periods observed per M (default 5)")
    parser.add_argument("--scale-n", type=int, help="N of section 2's scale-up (default 16)")
    parser.add_argument("--sim-clusters", type=int, help="section 3 (default 1000)")
    parser.add_argument("--sim-workers", type=int, default=50, help="section 3 (default 50)")
    parser.add_argument("--sim-cycles", type=int, help="section 3 steady cycles (default 3)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which sections (default {','.join(SECTIONS)})")
    parser.add_argument("--output", type=Path, help="JSON results (default "
                        "bench/results/bench.json, bench-quick.json with --quick)")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' logs")
    args = parser.parse_args(argv)
    quick = args.quick
    args.reps = args.reps or (1 if quick else 3)
    args.sizes = [int(x) for x in (args.sizes or ("1" if quick else "1,8,16")).split(",")]
    args.idle = [int(x) for x in (args.idle or ("1" if quick else "1,10,50")).split(",")]
    args.periods = args.periods or (2 if quick else 5)
    args.scale_n = args.scale_n or (1 if quick else 16)
    args.sim_clusters = args.sim_clusters or (100 if quick else 1000)
    args.sim_cycles = args.sim_cycles or (1 if quick else 3)
    args.systems = [s for s in args.systems.split(",") if s]
    args.sections = [s for s in args.sections.split(",") if s]
    for s in args.systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    for s in args.sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}; known: {', '.join(SECTIONS)}")
    if args.reps < 1 or min(args.sizes + args.idle) < 1 or args.periods < 1:
        parser.error("--reps, --sizes, --idle and --periods must be at least 1")
    args.output = args.output or RESULTS / ("bench-quick.json" if quick else "bench.json")
    return args


def quiet(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not verbose:
        for name in ("distributed", "dask_jobqueue", "dask_hpc_operator", "hpc_bridge",
                     "asyncio", "aiohttp", "kmock"):
            # Closing clusters logs the cancelled comms of departing workers as errors.
            logging.getLogger(name).setLevel(logging.CRITICAL)
        kube.quiet_kopf()


def document(args: argparse.Namespace, tag: RunTag, date: str, total: float, out: Collected,
             ready: dict[str, Any], teardown: dict[str, Any],
             found: list[report.Target]) -> dict[str, Any]:
    return {
        "benchmark": "bench (issue 9)", "host": socket.gethostname(), "date": date,
        "command": "python -m bench" + (" --quick" if args.quick else ""),
        "run_id": tag.run_id, "total_s": round(total, 1), "section_s": out.seconds,
        "cpus": os.cpu_count(),
        "config": {
            "sections": args.sections, "systems": args.systems, "sizes": args.sizes,
            "reps": args.reps, "idle_m": args.idle, "periods": args.periods,
            "scale_n": args.scale_n, "sim_clusters": args.sim_clusters,
            "sim_workers": args.sim_workers, "sim_cycles": args.sim_cycles,
            "worker": {"cores": WORKER_CORES, "memory": WORKER_MEMORY,
                       "partition": PARTITION, "walltime": WALLTIME},
            "scheduler": SCHEDULER_SPEC,
            "operator_periods_section_1": {"step_s": 0.5, "min_poll_interval_s":
                                           FAST_MIN_POLL_S, "poll_interval_s": FAST_POLL_S,
                                           "kopf_timer_s": kube.KOPF_TIMER_S},
            "operator_periods_section_2": {"step_s": 0.5, "min_poll_interval_s": 2.0,
                                           "poll_interval_s": 5.0},
        },
        "versions": {"python": platform.python_version(),
                     "distributed": version("distributed"),
                     "dask_jobqueue": version("dask-jobqueue"), "kopf": version("kopf"),
                     "kmock": version("kmock"), "slurm": slurm_version()},
        "targets": report.as_dicts(found),
        "ready": ready, "teardown": teardown,
        "calls": {"scale": report.as_dicts(out.scales), "idle": report.as_dicts(out.idles)},
        "reconcile": out.sim,
        "failures": out.failures,
        "raw": {"ready": report.as_dicts(out.ready), "teardown": report.as_dicts(out.teardown)},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    quiet(args.verbose)
    # dask_jobqueue makes SIGINT a bare sys.exit() at import, which would skip the cleanup
    # below: give Ctrl-C back to asyncio, which cancels the run.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if set(args.sections) & {"ready", "calls"}:
        problem = slurm_problem()
        if problem:
            print(f"cannot run: {problem}", file=sys.stderr)
            return 2
    tag = RunTag.new()
    workdir = Path(tempfile.mkdtemp(prefix=f"dask-hpc-bench-{tag.run_id}-"))
    counter = CallCounter(workdir)
    out = Collected()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.monotonic()
    say(f"run {tag.run_id}: sections {','.join(args.sections)}; N={args.sizes} x "
        f"{args.reps} rep(s), M={args.idle}, {args.sim_clusters} simulated clusters")
    code = 0
    left: list[str] = []
    counter.install()
    try:
        asyncio.run(run(args, tag, workdir, counter, out))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: cleaning up", file=sys.stderr)
        code = 130
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        counter.uninstall()
        if set(args.sections) & {"ready", "calls"}:
            cancelled = cancel_run_jobs(tag)
            if cancelled:
                print(f"cancelled leftover jobs: {' '.join(cancelled)}", file=sys.stderr)
            left = wait_run_jobs_gone(tag, 60.0)
            if left:
                print(f"WARNING: SLURM jobs of this run still live: {' '.join(left)}",
                      file=sys.stderr)
                code = code or 1
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started

    ready = report.summarize_ready(out.ready)
    teardown = report.summarize_teardown(out.teardown)
    found = report.targets(ready, out.scales, out.idles, out.sim)
    if code == 0:  # written first: a complete run's results must not depend on stdout
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(document(args, tag, date, total, out, ready,
                                                   teardown, found), indent=2) + "\n")
    print()
    print(tables(out, ready, teardown, found))
    print()
    for failure in out.failures:
        print(f"FAILURE: {failure}")
    over = f" (over the {BUDGET_S // 60}-minute budget)" if total > BUDGET_S else ""
    print(f"total {total:.0f} s{over}; no SLURM job of this run left: {not left}")
    if code != 0:
        print(f"incomplete run: {args.output} not written")
        return code
    print(f"results: {args.output}")
    return 1 if out.failures else 0


if __name__ == "__main__":
    sys.exit(main())
