"""Counting the batch-system commands every measured system runs, the same way for all.

The operator counts its own calls (CommandRunner.calls), dask-jobqueue does not, and a
count taken inside one of them would not see the other's. So the count is taken outside
both: a directory of wrapper scripts named `sbatch`, `squeue`, `scancel` and `sacct` goes
first on this process's PATH; each appends its name to a counter file, then `exec`s the
real binary (resolved by absolute path before the wrappers existed). Every subprocess the
operator, its kopf thread and dask-jobqueue start after `install()` finds the wrappers;
the bench's own squeue calls (bench.common) use the real binary and are not counted.

With `hold()`, the `sbatch` wrapper adds `--hold`: the job is accepted and queued but
never started (state PENDING, reason JobHeldUser), which is what lets section 2 keep 50
idle clusters on a 2-core machine (see bench.calls). Outside `hold()` the wrapper changes
nothing but adds a fork/exec of /bin/sh (about a millisecond) to each call of every
system alike.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

from .common import REAL_BINARIES, SLURM_COMMANDS

HOLD_ENV = "DASK_HPC_BENCH_HOLD"


class CallCounter:
    def __init__(self, workdir: Path) -> None:
        self.bin = workdir / "counting-bin"
        self.log = workdir / "calls.log"
        self._old_path: str | None = None

    def install(self) -> None:
        self.bin.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        for name in SLURM_COMMANDS:
            real = REAL_BINARIES.get(name)
            if real is None:
                continue
            hold = (f'[ -n "${HOLD_ENV}" ] && exec {shlex.quote(real)} --hold "$@"\n'
                    if name == "sbatch" else "")
            script = self.bin / name
            script.write_text(f"#!/bin/sh\necho {name} >> {shlex.quote(str(self.log))}\n"
                              f'{hold}exec {shlex.quote(real)} "$@"\n')
            script.chmod(0o755)
        self._old_path = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{self.bin}{os.pathsep}{self._old_path}"

    def uninstall(self) -> None:
        if self._old_path is not None:
            os.environ["PATH"] = self._old_path
            self._old_path = None

    def read(self) -> collections.Counter[str]:
        """Calls so far, per command."""
        try:
            return collections.Counter(self.log.read_text().split())
        except FileNotFoundError:
            return collections.Counter()

    def since(self, before: collections.Counter[str]) -> dict[str, int]:
        """Calls since `before` (a read()), every command named, zeros included."""
        now = self.read()
        return {name: now[name] - before[name] for name in SLURM_COMMANDS}

    @staticmethod
    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        """Every sbatch in this block submits held jobs."""
        os.environ[HOLD_ENV] = "1"
        try:
            yield
        finally:
            os.environ.pop(HOLD_ENV, None)
