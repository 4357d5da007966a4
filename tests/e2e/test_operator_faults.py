"""The operator process killed with SIGKILL during create, scale and delete, then restarted.

The operator runs as it does in production, `dask-hpc operator` in a process of its own,
against the Kubernetes API emulator (kmock over real HTTP, served in this test's event loop)
through a kubeconfig, and against the real SLURM. SIGKILL is real: no handler, no clean-up,
kopf's finalizer left on the object, a reconcile cut anywhere.

Where it is killed. Deterministic points come from wrappers named `sbatch` and `scancel`
first on the operator's PATH (only its own): armed for one call, a wrapper stops there and
waits until the operator is dead, so the kill lands exactly
- between the scheduler's submission and the workers' (create),
- after sbatch accepted a job but before the operator read its id (scale-up: the job
  exists and nothing in the operator knows it — the case that would make duplicates),
- before scancel ran (delete: the restarted operator must finish the deletion);
and one point is a seeded random delay after a request (scale-down, where workers are
retired through Dask before their jobs are cancelled). The seed is printed; set
DASK_HPC_FAULT_SEED to replay it. After each restart: the status converges and squeue holds
exactly one scheduler and N worker jobs of the cluster (no duplicate); after the delete,
the object is gone and squeue holds none (no orphan).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kube_emulator import StampingEmulator, custom_objects, kube

from dask_hpc_operator.constants import API_VERSION, GROUP, VERSION
from helpers import wait_until
from hpc_bridge.backends.slurm import SQUEUE_FORMAT, parse_squeue
from hpc_bridge.model import JobIdentity, Role

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]
__all__ = ["kube"]  # the emulator fixture, re-exported for pytest

ARGS = (GROUP, VERSION, "default", "daskclusters")
DASK_HPC = Path(sys.executable).with_name("dask-hpc")
REAL = {name: shutil.which(name) or name for name in ("sbatch", "scancel", "squeue")}
CONVERGE_S = 120

# The wrapper: `arm.<cmd>.before` (holding K) lets K calls through, then stops the next
# one before the real command runs; `arm.<cmd>.after` lets the real command run but keeps
# its output from the operator. The arm file is claimed with one atomic mv (and put back,
# counted down, while calls are let through), so exactly one call stops. A stopped call
# marks `paused` and exits once its parent (the operator) is gone, never reaching SLURM.
WRAPPER = """#!/bin/sh
ctl={ctl}
hold() {{
    touch "$ctl/paused"
    while kill -0 "$PPID" 2>/dev/null; do sleep 0.05; done
    exit 1
}}
for when in before after; do
    claimed="$ctl/claimed.$$.$when"
    mv "$ctl/arm.{name}.$when" "$claimed" 2>/dev/null || continue
    left=$(cat "$claimed")
    if [ "${{left:-0}}" -gt 0 ]; then
        echo $((left - 1)) > "$claimed" && mv "$claimed" "$ctl/arm.{name}.$when"
        break
    fi
    if [ "$when" = before ]; then hold; fi
    {real} "$@" > "$ctl/{name}.unread-output"
    hold
done
exec {real} "$@"
"""


def squeue_jobs(uid: str) -> dict[str, JobIdentity]:
    """The cluster's unfinished jobs, by id (an array's tasks one by one, a pending range
    included), with their identity (role, index), read by the real squeue."""
    out = subprocess.run([REAL["squeue"], "--noheader", "--states=all",
                          f"--format={SQUEUE_FORMAT}"],
                         capture_output=True, text=True, check=True).stdout
    return {j.job_id: j.identity for j in parse_squeue(out)
            if j.identity.owner_uid == uid and not j.state.terminal}


class Operator:
    """`dask-hpc operator` as a process: started, SIGKILLed, started again."""

    def __init__(self, workdir: Path, url: str) -> None:
        self.workdir = workdir
        self.ctl = workdir / "ctl"
        self.bin = workdir / "bin"
        for d in (self.ctl, self.bin):
            d.mkdir()
        for name in ("sbatch", "scancel"):
            script = self.bin / name
            script.write_text(WRAPPER.format(ctl=shlex.quote(str(self.ctl)), name=name,
                                             real=shlex.quote(REAL[name])))
            script.chmod(0o755)
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": url}}],
            "users": [{"name": "test", "user": {"token": "unused"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test",
                                                       "namespace": "default"}}],
        }
        (workdir / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        staging = workdir / "staging"
        staging.mkdir()
        site = {"backend": "slurm", "stagingDir": str(staging), "pollInterval": 1.0,
                "minPollInterval": 0.5, "sweepInterval": 0.0, "metricsPort": 0}
        (workdir / "site.yaml").write_text(yaml.safe_dump(site))
        self.log = workdir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None
        # Unbuffered: a SIGKILL must not take the operator's last log lines with it.
        env = {**os.environ, "KUBECONFIG": str(self.workdir / "kubeconfig"),
               "PYTHONUNBUFFERED": "1",
               "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"==== start {self.starts}\n".encode())
            self.proc = subprocess.Popen(
                [str(DASK_HPC), "operator", "--config", str(self.workdir / "site.yaml"),
                 "--metrics-port", "0"], env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def kill(self, why: str) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.tail()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        print(f"SIGKILL {why}")

    def arm(self, command: str, when: str, let_through: int = 0) -> None:
        """Stop the operator's call of `command` after `let_through` calls."""
        (self.ctl / "paused").unlink(missing_ok=True)
        (self.ctl / f"arm.{command}.{when}").write_text(f"{let_through}\n")

    async def paused(self) -> None:
        async def check() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            return (self.ctl / "paused").exists()
        await wait_until(check, 60, "the operator to reach the armed call", interval=0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def reconciled(self) -> bool:
        """The running process has reconciled at least once (its timer logged), so what
        is checked next is its doing, not only its predecessor's."""
        text = self.log.read_text(errors="replace")
        return "Timer 'poll' succeeded" in text.rsplit(f"==== start {self.starts}\n", 1)[-1]

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
async def operator(kube: StampingEmulator, tmp_path: Path) -> AsyncIterator[Operator]:
    op = Operator(tmp_path, str(kube.url).rstrip("/"))
    try:
        yield op
    finally:
        op.stop()


def seed() -> int:
    value = int(os.environ.get("DASK_HPC_FAULT_SEED") or random.SystemRandom().randrange(2**31))
    print(f"DASK_HPC_FAULT_SEED={value}")
    return value


async def test_sigkill_during_create_scale_and_delete(kube: StampingEmulator,
                                                      operator: Operator) -> None:
    api = custom_objects(str(kube.url).rstrip("/"))
    call = asyncio.to_thread  # the sync client must not block the loop serving kmock
    rng = random.Random(seed())

    async def obj() -> dict[str, Any] | None:
        try:
            return dict(await call(api.get_namespaced_custom_object, *ARGS, "faults"))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def converged(replicas: int, what: str) -> dict[str, Any]:
        """Running with `replicas` ready workers, and in squeue exactly 1 scheduler and
        `replicas` worker jobs of the cluster."""
        last: list[Any] = []

        async def check() -> dict[str, Any] | None:
            if not operator.reconciled():
                return None
            found = await obj()
            status = (found or {}).get("status") or {}
            assert status.get("phase") != "Failed", status
            jobs = squeue_jobs(uid)
            last[:] = [status.get("phase"), status.get("message"), sorted(
                (i.role.value, i.index) for i in jobs.values())]
            counts = collections.Counter(i.role for i in jobs.values())
            ok = (status.get("phase") == "Running"
                  and (status.get("workers") or {}).get("ready") == replicas
                  and counts == {Role.SCHEDULER: 1, Role.WORKER: replicas})
            return status if ok else None
        try:
            status = await wait_until(check, CONVERGE_S, what)
        except AssertionError:
            print(operator.tail())
            raise
        print(f"converged: {what}: jobs {last[2]}")
        return status

    async def patch_replicas(replicas: int) -> None:
        # `kubectl scale` through the scale subresource; kmock has none, so the field.
        await call(api.patch_namespaced_custom_object, *ARGS, "faults",
                   {"spec": {"worker": {"replicas": replicas}}})

    body = {"apiVersion": API_VERSION, "kind": "DaskCluster",
            "metadata": {"name": "faults", "namespace": "default"},
            "spec": {"backend": "slurm", "scheduler": {"memory": "512MiB"},
                     "worker": {"replicas": 2, "cores": 1, "memory": "512MiB"}}}
    uid = ""
    try:
        # 1. create: killed between the scheduler's sbatch and the workers'.
        operator.arm("sbatch", "before", let_through=1)  # the scheduler's; then the workers'
        operator.start()
        await call(api.create_namespaced_custom_object, *ARGS, body)
        uid = str((await obj() or {})["metadata"]["uid"])

        async def scheduler_submitted() -> bool:
            return any(i.role is Role.SCHEDULER for i in squeue_jobs(uid).values())
        await wait_until(scheduler_submitted, 60, "the scheduler job in squeue", interval=0.05)
        await operator.paused()
        assert collections.Counter(i.role for i in squeue_jobs(uid).values()) == {
            Role.SCHEDULER: 1}
        operator.kill("between the scheduler's submission and the workers'")
        operator.start()
        first = await converged(2, "create, after a kill before the workers' submission")
        scheduler_job = first["schedulerJobId"]

        # 2. scale-up: sbatch accepted the new worker, the operator never read its id.
        operator.arm("sbatch", "after")
        await patch_replicas(3)
        await operator.paused()
        unread = (operator.ctl / "sbatch.unread-output").read_text().strip()
        assert unread in squeue_jobs(uid), "the job the operator never heard of exists"
        operator.kill(f"after sbatch accepted job {unread}, before the operator read it")
        operator.start()
        status = await converged(3, "scale-up, after a kill with an unread job id")
        assert unread in squeue_jobs(uid), "the unread job was adopted, not replaced"
        assert status["schedulerJobId"] == scheduler_job

        # 3. scale-down (workers retired through Dask, then cancelled): a random moment.
        delay = rng.uniform(0.0, 4.0)
        await patch_replicas(1)
        await asyncio.sleep(delay)
        operator.kill(f"{delay:.2f} s after the scale-down to 1")
        operator.start()
        status = await converged(1, f"scale-down, after a kill at +{delay:.2f} s")
        assert status["schedulerJobId"] == scheduler_job

        # 4. delete: killed before scancel ran; kopf's finalizer is left on the object.
        operator.arm("scancel", "before")
        await call(api.delete_namespaced_custom_object, *ARGS, "faults")
        await operator.paused()
        operator.kill("in the deletion, before scancel")
        left = await obj()
        assert left is not None and left["metadata"].get("finalizers"), left
        assert squeue_jobs(uid), "nothing was cancelled before the kill"
        operator.start()

        async def deleted() -> bool:
            return await obj() is None and not squeue_jobs(uid)
        try:
            await wait_until(deleted, 60, "the restarted operator to finish the deletion")
        except AssertionError:
            print(operator.tail())
            raise
    finally:
        operator.stop()
        if uid and (leftovers := squeue_jobs(uid)):
            subprocess.run(["scancel", *leftovers], check=False)
