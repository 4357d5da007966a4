"""Where a job's error output lands, and its last lines (for the WorkersFailing condition).

The planner is pure; reading files is I/O, so the reconcile calls this and hands the text to
the status functions. Nothing here may fail a reconcile: a log that cannot be found or read
gives an empty tail.

Names, by backend (all under the cluster's log directory on the shared filesystem):
- slurm: dask-jobqueue writes `#SBATCH -e <log dir>/<job name>-%J.err`. For a batch job %J is
  the job id. An array task runs under the array's job name (`dask.<ns>.<cluster>.<group>.
  array`, see scripts._job), and %J is the task's own job id — not `<array>_<index>`, which
  is why the SLURM backend records it (squeue's %A) as `extra["raw_job_id"]`.
- local: LocalBackend.submit opens `<log dir>/<job name>-<job id>.err` itself.
- pbs: `#PBS -e <log dir>/` makes PBS name the file `<Job_Name>.e<sequence>` (a subjob's
  `<Job_Name>.e<sequence>.<index>`); the name may be shortened (pbs_job_name), so the file is
  found by its suffix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from hpc_bridge.model import ObservedJob

from .staging_files import open_regular

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024  # the end of a log is enough for a tail; logs may be huge


def error_file(backend: str, log_dir: str | Path, job: ObservedJob) -> Path | None:
    """The job's error output file, if it can be found."""
    directory = Path(log_dir)
    name = job.identity.job_name
    if backend == "pbs":
        sequence = job.job_id.split(".", 1)[0]
        if "[" in sequence:  # a subjob: 1234[5]
            base, _, index = sequence.partition("[")
            pattern = f"*.e{base}.{index.rstrip(']')}"
        else:
            pattern = f"*.e{sequence}"
        return _newest(directory.glob(pattern))
    if backend == "slurm" and "_" in job.job_id:
        stem = name.rsplit(".", 1)[0] + ".array"
        raw = job.extra.get("raw_job_id")
        if raw:
            path = directory / f"{stem}-{raw}.err"
            return path if path.exists() else None
        return None
    path = directory / f"{name}-{job.job_id}.err"
    return path if path.exists() else None


def _newest(paths: Iterable[Path]) -> Path | None:
    found = list(paths)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_tail(path: Path, max_bytes: int = READ_BYTES) -> str:
    """The end of a file as text (undecodable bytes replaced); "" unless it is a regular
    file: the log directory may be writable by the job's user (policy stagingGroup), who
    could plant a link to a file only the operator may read and have its tail shown in
    status."""
    f = open_regular(path)
    if f is None:
        return ""
    with f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        return f.read().decode(errors="replace")


def error_tail(backend: str, log_dir: str | Path, job: ObservedJob) -> str:
    """The end of the job's error output, or "" where there is none to read."""
    try:
        path = error_file(backend, log_dir, job)
        return read_tail(path) if path is not None else ""
    except OSError as exc:
        log.info("cannot read the error output of job %s: %s", job.job_id, exc)
        return ""
