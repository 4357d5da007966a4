"""Per-namespace policy and submitting identity against the real one-node SLURM.

(a) A manifest breaking its namespace's policy is refused with the rule and the field named
    (condition and Warning event); no batch command runs at all — the namespace's identity
    is a wrapper that appends every command it is asked to run to a canary file — and no
    job of its uid reaches squeue. An accepted cluster of the same namespace proves that
    the canary does record (sbatch and squeue go through it), and a refused edit of it
    leaves its running jobs alone.
(b) A namespace whose policy says `submitAs: [runuser, -u, <user>, --]` runs its cluster as
    that system user: squeue shows the jobs owned by it, the scheduler (running as it)
    writes its file into the staging directory the operator shares with it through
    `stagingGroup`, a real Dask computation runs, and deletion leaves no job behind.

What this machine needs for (b), made here: a system user (`useradd --system`, root only)
and a Python it can run. The operator's virtualenv interpreter lives under /root, which
other users cannot enter (mode 0700), so the fixture builds a virtualenv from the system's
python3.11 that reads the operator's site-packages (same CPython minor version) — what a
site does with a shared software stack. The staging root is under /tmp, mode 0755.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from dask_hpc_operator.reconcile import Runtime
from dask_hpc_operator.site_config import SiteConfig
from helpers import Cluster, live_slurm_jobs, manifest

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]

JOB_USER = "dhpc-policy-it"
SYSTEM_PYTHON = "/usr/bin/python3.11"


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A staging root every user can enter (pytest's tmp_path is under a 0700 directory)."""
    root = Path(tempfile.mkdtemp(prefix="dask-hpc-policy-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def in_namespace(body: dict[str, Any], namespace: str) -> dict[str, Any]:
    body["metadata"]["namespace"] = namespace
    return body


def events_into(log: list[tuple[str, str, str]]) -> Any:
    return lambda *event: log.append(event)


def accepted(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Accepted")


def canary_lines(canary: Path) -> list[str]:
    return canary.read_text().splitlines() if canary.exists() else []


async def test_refused_manifest_runs_no_command(shared_root: Path) -> None:
    canary = shared_root / "canary.log"
    wrapper = shared_root / "as-physics"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {canary}\nexec "$@"\n')
    wrapper.chmod(0o755)
    site = SiteConfig.from_mapping({
        "backend": "slurm", "stagingDir": str(shared_root / "staging"),
        "python": sys.executable, "minPollInterval": 0.5, "pollInterval": 1.0,
        "namespaces": {"physics": {"maxWalltime": "01:00:00", "queues": ["debug"],
                                   "submitAs": [str(wrapper)]}}})
    runtime = Runtime(site)

    # A queue the namespace may not use, on a fresh cluster: refused before any command.
    events: list[tuple[str, str, str]] = []
    refused = Cluster(runtime, in_namespace(manifest("pol-queue", 1, queue="highmem",
                                                     walltime="00:10:00"), "physics"))
    status = await refused.reconciler.reconcile(refused.body, {}, events_into(events))
    assert status["phase"] == "Failed"
    cond = accepted(status)
    assert (cond["status"], cond["reason"]) == ("False", "PolicyViolation")
    assert cond["message"].startswith("spec.worker.queue: queue 'highmem' is not allowed by "
                                      'policy queues of namespace "physics"')
    assert events == [("Warning", "PolicyViolation", cond["message"])]
    assert canary_lines(canary) == [], "a refused manifest ran a batch command"
    assert live_slurm_jobs(refused.body["metadata"]["uid"]) == []

    # An accepted cluster of the namespace: its commands do go through the identity.
    cluster = Cluster(runtime, in_namespace(manifest("pol-ok", 1, queue="debug",
                                                     walltime="00:10:00"), "physics"))
    await cluster.step()
    commands = [line.split()[0] for line in canary_lines(canary)]
    assert "squeue" in commands and "sbatch" in commands, commands
    uid = cluster.body["metadata"]["uid"]
    jobs = sorted(live_slurm_jobs(uid))
    assert jobs

    # Editing it past maxWalltime: refused, nothing run, its jobs untouched.
    seen = len(canary_lines(canary))
    cluster.body["spec"]["worker"]["walltime"] = "02:00:00"
    cluster.body["metadata"]["generation"] += 1
    events.clear()
    status = await cluster.reconciler.reconcile(cluster.body, cluster.status,
                                                events_into(events))
    assert accepted(status)["reason"] == "PolicyViolation"
    assert status["message"].startswith("spec.worker.walltime: 02:00:00 exceeds policy "
                                        'maxWalltime of namespace "physics" (01:00:00)')
    assert "lower it to 01:00:00" in status["message"]
    assert [e[:2] for e in events] == [("Warning", "PolicyViolation")]
    assert len(canary_lines(canary)) == seen, canary_lines(canary)[seen:]
    assert sorted(live_slurm_jobs(uid)) == jobs

    await cluster.delete()  # cancelled as the namespace's identity too
    assert any(line.startswith("scancel") for line in canary_lines(canary)[seen:])


@pytest.fixture(scope="module")
def job_user() -> str:
    """A system user to submit as (created once, left for later runs: harmless, and
    deleting a user with jobs still ending would fail)."""
    try:
        pwd.getpwnam(JOB_USER)
    except KeyError:
        if os.geteuid() != 0:
            _unavailable(f"no user {JOB_USER} and not root to create it")
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", JOB_USER], check=True)
    grp.getgrnam(JOB_USER)  # its own group: the staging group of the test
    return JOB_USER


def _unavailable(reason: str) -> None:
    """Skips on a developer's machine; in CI the identity test must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def _readable_by(user: str, *paths: Path) -> bool:
    return all(subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(p)],
                              check=False).returncode == 0 for p in paths)


@pytest.fixture(scope="module")
def user_python(job_user: str) -> Iterator[str]:
    """A Python the job user can run, reading the operator's site-packages."""
    if not os.path.exists(SYSTEM_PYTHON):
        _unavailable(f"{SYSTEM_PYTHON} is needed to give the job user a Python")
    if sys.version_info[:2] != (3, 11):
        _unavailable("the system Python's minor version must match the operator's")
    root = Path(tempfile.mkdtemp(prefix="dask-hpc-user-python-", dir="/tmp"))
    root.chmod(0o755)
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True)
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    source = Path(__file__).resolve().parents[2]
    dirs = [site_packages]
    if not _readable_by(job_user, Path(site_packages) / "dask" / "__init__.py",
                        source / "operator" / "dask_hpc_operator" / "__init__.py"):
        # A checkout under a private home (/root is 0700): the job user gets copies.
        copied = root / "site-packages"
        shutil.copytree(site_packages, copied, symlinks=True,
                        ignore=shutil.ignore_patterns("__editable__*", "__pycache__"))
        for part in ("operator", "hpc-bridge"):
            shutil.copytree(source / part, root / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
        dirs = [str(copied), str(root / "operator"), str(root / "hpc-bridge")]
    (root / "venv/lib/python3.11/site-packages/operator-venv.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH
                   | (stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0))
    yield str(root / "venv/bin/python")
    shutil.rmtree(root, ignore_errors=True)


def owners(uid: str) -> set[str]:
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%u|%k"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split("|", 1)[0] for line in out.splitlines() if uid in line}


# The job user's Python is the system's 3.11.2, the client's 3.11.7: a patch release apart.
@pytest.mark.filterwarnings("ignore::distributed.versions.VersionMismatchWarning")
async def test_cluster_runs_as_the_namespace_identity(shared_root: Path, job_user: str,
                                                      user_python: str) -> None:
    probe = subprocess.run(["runuser", "-u", job_user, "--", user_python, "-c",
                            "import distributed, hpc_bridge"], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    site = SiteConfig.from_mapping({
        "backend": "slurm", "stagingDir": str(shared_root / "staging"), "python": user_python,
        "minPollInterval": 0.5, "pollInterval": 1.0,
        "namespaces": {"alice": {"submitAs": ["runuser", "-u", job_user, "--"],
                                 "stagingGroup": job_user}}})
    runtime = Runtime(site)
    cluster = Cluster(runtime, in_namespace(manifest(f"ident-{uuid.uuid4().hex[:6]}", 1),
                                            "alice"))
    uid = cluster.body["metadata"]["uid"]
    status = await cluster.until("Running", 1, timeout=120)
    assert owners(uid) == {job_user}, "jobs must run as the namespace's identity"
    # Listed through the identity's own poller: `squeue --me` as that user.
    assert runtime.pollers == {}, "the site's own identity listed nothing here"
    poller = runtime.poller("slurm", "alice")
    assert poller.backend.runner.prefix == ["runuser", "-u", job_user, "--"]  # type: ignore[attr-defined]
    assert len(poller.snapshot.owned_by(uid)) == 2  # scheduler + worker
    scheduler_file = Path(status["stagingDirectory"]) / "scheduler.json"
    assert pwd.getpwuid(scheduler_file.stat().st_uid).pw_name == job_user
    staging = Path(status["stagingDirectory"]).stat()
    assert grp.getgrgid(staging.st_gid).gr_name == job_user
    assert stat.S_IMODE(staging.st_mode) == 0o2770

    async with Client(status["schedulerAddress"], asynchronous=True) as client:
        assert await client.submit(sum, range(10)) == 45
        whoami = await client.run(lambda: __import__("getpass").getuser())
        assert set(whoami.values()) == {job_user}

    await cluster.delete()  # asserts no live job of the uid is left
    assert owners(uid) <= {job_user}
    assert not Path(status["stagingDirectory"]).exists()
