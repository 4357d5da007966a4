"""Shared fixtures: real SLURM detection, site configs in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dask_hpc_operator.site_config import SiteConfig
from helpers import slurm_problem

IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="session")
def slurm() -> None:
    problem = slurm_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"CI must run the SLURM tests, but {problem}")
        pytest.skip(problem)


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def site(staging: Path) -> SiteConfig:
    return SiteConfig(staging_dir=str(staging), min_poll_interval=0.5, poll_interval=1.0)
