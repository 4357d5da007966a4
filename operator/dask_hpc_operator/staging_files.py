"""Writing and reading files in staging directories that a job user may write too.

Under a policy with stagingGroup (policy.py), a cluster's staging directory is mode 2770:
the jobs, running as the namespace's user, write their scheduler file, logs and history
there, and so may plant a symbolic link (or a FIFO) under any name the operator is about
to write or read. The operator therefore never opens an existing path there for writing
and never follows a link there: it replaces files through a new file of a random name,
and reads only regular files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


def replace_file(path: Path, data: bytes | BinaryIO, mode: int = 0o644) -> None:
    """Replace `path` atomically (a reader never sees half a file; a crash leaves the old
    one) and safely in a directory a job user may write: the data goes to a new file of a
    random name (mkstemp: created exclusively, never a planted file or link), written
    through its descriptor, then renamed over `path`, which replaces a link there instead
    of writing through it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if isinstance(data, bytes):
                f.write(data)
            else:
                shutil.copyfileobj(data, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_regular(path: Path, dir_fd: int | None = None) -> BinaryIO | None:
    """`path` opened for reading if it is a regular file; None if it is missing, a symbolic
    link (never followed: a job user could point one at the operator's secrets), a FIFO
    (never waited on) or anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return os.fdopen(fd, "rb")
    os.close(fd)
    return None
