"""The orphan sweep on a real SLURM: a job whose resource is gone is cancelled, a job whose
resource exists is left alone (the operator calls `sweep` every `sweepInterval`)."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import replace

import pytest

from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.sweep import sweep
from helpers import live_slurm_jobs, slurm_runtime, wait_until
from hpc_bridge.model import JobIdentity, JobTemplate, Role
from hpc_bridge.scripts import RenderContext, render_worker

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]


async def test_sweep_cancels_orphans_and_only_them(site: SiteConfig) -> None:
    site = replace(site, backend="slurm")  # what a fresh operator sweeps: the site default
    runtime, runner = slurm_runtime(site)
    backend = runtime.backend("slurm")
    ctx = RenderContext("slurm", site.python, f"{site.staging_dir}/none/scheduler.json",
                        f"{site.staging_dir}/sweep-logs", death_timeout=120)
    template = JobTemplate(cores=1, memory="256MiB", walltime="00:05:00", queue="debug")
    orphan_uid, live_uid = f"orphan-{uuid.uuid4()}", f"alive-{uuid.uuid4()}"
    # A namespace of its own: the sweep treats every other uid in it as an orphan, so a
    # shared one would cancel the jobs of tests running beside this one.
    namespace = f"sweep-{uuid.uuid4().hex[:8]}"
    # Workers waiting for a scheduler that will never come: live jobs, as orphans are.
    for uid in (orphan_uid, live_uid):
        identity = JobIdentity(namespace, "sweep", uid, Role.WORKER, "default", 0)
        await backend.submit(render_worker(ctx, identity, template))
    try:
        assert live_slurm_jobs(orphan_uid) and live_slurm_jobs(live_uid)

        async def only_the_live_one() -> set[str]:
            return {live_uid}

        cancelled = await sweep(runtime, only_the_live_one, [namespace])
        assert len(cancelled) == 1
        await wait_until(lambda: _none_left(orphan_uid), 30, "the orphan's job to end")
        assert live_slurm_jobs(live_uid), "a job whose resource exists was cancelled"
        assert runner.calls["scancel"] == 1
    finally:
        for uid in (orphan_uid, live_uid):
            if live_slurm_jobs(uid):
                subprocess.run(["scancel", *live_slurm_jobs(uid)], check=False)


async def _none_left(uid: str) -> bool:
    return not live_slurm_jobs(uid)
