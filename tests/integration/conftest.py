"""Integration fixtures: every test's clusters are torn down, even when it fails."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from helpers import Cluster, live_slurm_jobs


@pytest.fixture(autouse=True)
async def _cancel_leftovers() -> AsyncIterator[None]:
    """A failing test must not leave jobs that slow down the next one."""
    yield
    while Cluster.created:
        cluster = Cluster.created.pop()
        if live_slurm_jobs(cluster.body["metadata"]["uid"]):
            await cluster.reconciler.teardown(cluster.body)
