"""`dask-hpc render` of the examples, compared byte for byte with reviewed scripts.

The batch system reads every line of these scripts, so they are checked whole: CPU,
high-memory and GPU groups and an MPI allocation, for PBS (no PBS server can run here: this
is how its scripts are tested) and for SLURM. The site configuration fixes the compute
nodes' Python and the staging directory, so the output does not depend on this machine.

After an intended change, regenerate and review the diff:
    DASK_HPC_UPDATE_RENDERED=1 .venv/bin/python -m pytest tests/unit/test_render_exact.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dask_hpc_operator.cli import main

ROOT = Path(__file__).resolve().parents[2]
RENDERED = ROOT / "tests" / "fixtures" / "render"
SITES = {
    # A PBS Professional site that allows job arrays, laid out like NCI Gadi's file systems.
    "pbs": "backend: pbs\npython: /apps/dask/2026.8/bin/python3\n"
           "stagingDir: /scratch/ab12/dask-hpc\n",
    # NCI Gadi itself: no job arrays, so one qsub per worker.
    "pbs-no-arrays": "backend: pbs\npython: /apps/dask/2026.8/bin/python3\n"
                     "stagingDir: /scratch/ab12/dask-hpc\npbsArrays: false\n",
    "slurm": "backend: slurm\npython: /opt/dask/bin/python3\nstagingDir: /shared/dask-hpc\n",
}
CASES = [
    ("cluster-pbs.yaml", "pbs"),
    ("cluster-pbs.yaml", "pbs-no-arrays"),
    ("job-allocation-pbs.yaml", "pbs"),
    ("heterogeneous.yaml", "slurm"),
    ("job-allocation-slurm.yaml", "slurm"),
]


@pytest.mark.parametrize(("example", "site"), CASES)
def test_rendered_scripts_are_exactly_the_reviewed_ones(
        example: str, site: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(SITES[site])
    assert main(["render", "-f", str(ROOT / "examples" / example), "--config",
                 str(config)]) == 0
    out = capsys.readouterr().out
    expected = RENDERED / f"{Path(example).stem}.{site}.txt"
    if os.environ.get("DASK_HPC_UPDATE_RENDERED"):
        expected.write_text(out)
    assert expected.exists(), f"{expected} missing: see this module's docstring"
    assert out == expected.read_text(), f"{example} on {site} renders differently"


def test_every_pbs_example_is_rendered_here() -> None:
    pbs = {p.name for p in (ROOT / "examples").glob("*pbs*.yaml")}
    assert pbs <= {example for example, _ in CASES}
