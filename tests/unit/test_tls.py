"""Per-cluster TLS (dask_hpc_operator.tls): the credentials, the scripts that use them, the
operator's RPC with them, and what validation refuses.

The handshake tests run a real Dask scheduler in this process (distributed's own TLS, over
real sockets); the batch-system side is tests/integration/test_tls_slurm.py.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import errno
import os
import shlex
import ssl
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from distributed import Client, Scheduler
from distributed.security import Security

from dask_hpc_operator import dask_rpc, tls
from dask_hpc_operator.autoscaler_reconcile import AutoscalerReconciler
from dask_hpc_operator.constants import API_VERSION, TLS_VALIDITY_DAYS
from dask_hpc_operator.model import ClusterModel
from dask_hpc_operator.reconcile import ClusterReconciler, Runtime
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import ManifestError, validate
from hpc_bridge.model import (
    JobIdentity,
    JobState,
    JobTemplate,
    ObservedJob,
    Role,
    RunnerCommand,
    TLSFiles,
)
from hpc_bridge.preloads import scaling as scaling_preload
from hpc_bridge.scripts import RenderContext, render_runner, render_scheduler, render_worker

UID = "0f5e5a1c-9f0e-4a8e-8f55-1b2c3d4e5f60"
CONNECT_TIMEOUT = "2s"


def make(staging: Path, name: str = "c1", uid: str = UID) -> TLSFiles:
    return tls.ensure_cluster_credentials(staging, "ns", name, uid)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- the files ---------------------------------------------------------------------------

def test_credentials_are_made_once_with_private_modes(tmp_path: Path) -> None:
    staging = tmp_path / "clusters" / "ns" / "c1-0f5e5a1c"
    files = make(staging)
    assert files == tls.tls_files(staging)
    assert Path(files.ca_file).parent == staging / "tls"
    assert mode(staging / "tls") == 0o700
    for path in (files.ca_file, files.cert_file, files.key_file):
        assert mode(path) == 0o600, path
    first = tls.load_credentials(files)

    # Every later reconcile (or a restarted operator) reuses them, byte for byte.
    assert make(staging) == files
    assert tls.load_credentials(files) == first
    # No temporary directory is left behind.
    assert sorted(p.name for p in staging.iterdir()) == ["tls"]


def test_loosened_modes_are_tightened_on_reuse(tmp_path: Path) -> None:
    files = make(tmp_path)
    os.chmod(files.key_file, 0o644)
    os.chmod(tmp_path / "tls", 0o755)
    make(tmp_path)
    assert mode(files.key_file) == 0o600
    assert mode(tmp_path / "tls") == 0o700


def test_an_incomplete_set_is_replaced_by_a_whole_one(tmp_path: Path) -> None:
    files = make(tmp_path)
    old = tls.load_credentials(files)
    os.unlink(files.key_file)  # removed by hand: the set is unusable
    make(tmp_path)
    new = tls.load_credentials(files)
    assert new.ca_pem != old.ca_pem
    tls.verify_credentials(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls"]


def test_a_filesystem_error_is_not_taken_for_a_missing_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ESTALE (an NFS server's failover) while looking at the files: raised, and the set the
    scheduler runs with is kept, not replaced by a new CA nobody else has. Simulated: no
    NFS server can fail over here (the one thing in this test that is not real)."""
    files = make(tmp_path)
    before = tls.load_credentials(files)
    real_stat = Path.stat

    def stale(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        if self.name == tls.KEY:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stale)
    with pytest.raises(OSError, match="Stale file handle"):
        make(tmp_path)
    monkeypatch.setattr(Path, "stat", real_stat)
    assert make(tmp_path) == files and tls.load_credentials(files) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls"]


def test_an_incomplete_set_is_not_replaced_under_a_running_scheduler(tmp_path: Path) -> None:
    """The running scheduler holds the old CA: a new one would lock the operator and every
    new worker out of it. Refused with what to do; nothing is touched."""
    files = make(tmp_path)
    ca = Path(files.ca_file).read_bytes()
    os.unlink(files.key_file)
    with pytest.raises(tls.TLSError, match=r"c1-dask-tls holds a copy.*re-create the cluster"):
        tls.ensure_cluster_credentials(tmp_path, "ns", "c1", UID, in_use=True)
    assert Path(files.ca_file).read_bytes() == ca and not Path(files.key_file).exists()


def _scheduler_job(state: JobState) -> ObservedJob:
    return ObservedJob("101", JobIdentity("ns", "c1", UID, Role.SCHEDULER, "default", 0), state)


def test_the_reconcile_reports_unusable_credentials_instead_of_using_them(
        tmp_path: Path) -> None:
    """ClusterReconciler._ensure_tls, the gate before any job is rendered or the scheduler
    asked anything: each problem is a status message that says what to do."""
    reconciler = ClusterReconciler(Runtime(SiteConfig(staging_dir=str(tmp_path))))
    model = ClusterModel.from_manifest(validate(cluster_manifest(protocol="tls")),
                                       reconciler.runtime.site)
    ctx = reconciler._context(model)
    assert ctx.tls is not None
    running, gone = [_scheduler_job(JobState.RUNNING)], [_scheduler_job(JobState.FAILED)]
    assert reconciler._ensure_tls(model, ctx, []) == ""  # made
    os.unlink(ctx.tls.key_file)
    problem = reconciler._ensure_tls(model, ctx, running)
    assert "while its scheduler job runs" in problem and "re-create the cluster" in problem
    assert not Path(ctx.tls.key_file).exists()
    assert reconciler._ensure_tls(model, ctx, gone) == ""  # no scheduler to lock out: remade
    # Expired (a cluster older than TLS_VALIDITY_DAYS): said, not a silent "no answer".
    old = tls.generate("ns", "c1", UID, now=dt.datetime.now(dt.timezone.utc)
                       - dt.timedelta(days=TLS_VALIDITY_DAYS + 1))
    for path, data in zip((ctx.tls.ca_file, ctx.tls.cert_file, ctx.tls.key_file),
                          (old.ca_pem, old.cert_pem, old.key_pem), strict=True):
        Path(path).write_bytes(data)
    problem = reconciler._ensure_tls(model, ctx, running)
    assert problem.startswith("the cluster's TLS credentials cannot be used: ca.crt is "
                              "valid from") and problem.endswith("re-create the cluster")


def test_a_failed_write_leaves_no_half_set(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk while writing the key, simulated (the one thing here that is not real).
    real = tls._write_private

    def failing(path: Path, data: bytes) -> None:
        if path.name == tls.KEY:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(tls, "_write_private", failing)
    with pytest.raises(OSError, match="No space"):
        make(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither tls/ nor a temporary directory
    monkeypatch.setattr(tls, "_write_private", real)
    tls.verify_credentials(tls.load_credentials(make(tmp_path)))


def test_a_racing_writer_keeps_the_first_whole_set(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two operators reconciling the same new cluster: the one renaming second keeps the
    first's files (a scheduler may already have been started with them)."""
    real = tls.generate
    winner: list[bytes] = []

    def generate_while_another_writes(*args: Any, **kwargs: Any) -> tls.Credentials:
        monkeypatch.setattr(tls, "generate", real)
        winner.append(tls.load_credentials(make(tmp_path)).key_pem)  # the other writer
        return real(*args, **kwargs)

    monkeypatch.setattr(tls, "generate", generate_while_another_writes)
    files = make(tmp_path)
    assert tls.load_credentials(files).key_pem == winner[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls"]


def test_remove_credentials(tmp_path: Path) -> None:
    make(tmp_path)
    (tmp_path / "history.sqlite").write_text("kept")
    assert tls.remove_credentials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.sqlite"]
    assert tls.remove_credentials(tmp_path)  # nothing left to remove is fine


# --- the chain ---------------------------------------------------------------------------

def test_the_certificate_chains_to_the_cluster_ca(tmp_path: Path) -> None:
    files = make(tmp_path)
    creds = tls.load_credentials(files)
    tls.verify_credentials(creds)
    # OpenSSL agrees: the chain loads into a context requiring certificates.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files.ca_file)
    ctx.load_cert_chain(files.cert_file, files.key_file)

    other = tls.load_credentials(make(tmp_path / "other", "c2", str(uuid.uuid4())))
    with pytest.raises(tls.TLSError, match=r"not signed by ca\.crt"):
        tls.verify_credentials(tls.Credentials(other.ca_pem, creds.cert_pem, creds.key_pem))
    with pytest.raises(tls.TLSError, match=r"not the key of tls\.crt"):
        tls.verify_credentials(tls.Credentials(creds.ca_pem, creds.cert_pem, other.key_pem))
    with pytest.raises(tls.TLSError, match="not a CA"):
        tls.verify_credentials(tls.Credentials(creds.cert_pem, creds.cert_pem, creds.key_pem))
    with pytest.raises(tls.TLSError, match="not PEM"):
        tls.verify_credentials(tls.Credentials(b"junk", creds.cert_pem, creds.key_pem))


def test_validity_is_documented_year_with_clock_skew() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    creds = tls.generate("ns", "c1", UID, now=now)
    tls.verify_credentials(creds, now=now - dt.timedelta(minutes=4))  # a late node clock
    tls.verify_credentials(creds, now=now + dt.timedelta(days=TLS_VALIDITY_DAYS - 1))
    with pytest.raises(tls.TLSError, match="re-create the cluster"):
        tls.verify_credentials(creds, now=now + dt.timedelta(days=TLS_VALIDITY_DAYS + 1))


def test_long_names_fit_in_the_certificate() -> None:
    """A common name is limited to 64 characters; namespace and name are 63 each."""
    tls.verify_credentials(tls.generate("n" * 63, "c" * 63, UID))


# --- the Secret --------------------------------------------------------------------------

def test_secret_manifest_round_trips_and_is_owned_by_the_cluster(tmp_path: Path) -> None:
    creds = tls.load_credentials(make(tmp_path))
    cluster = {"apiVersion": API_VERSION, "kind": "DaskCluster",
               "metadata": {"name": "c1", "namespace": "ns", "uid": UID}}
    secret = tls.secret_manifest(cluster, creds)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == "c1-dask-tls"
    assert secret["metadata"]["namespace"] == "ns"
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("DaskCluster", "c1", UID)
    assert sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    assert base64.b64decode(secret["data"]["tls.key"]) == creds.key_pem
    assert tls.credentials_of_secret(secret["data"]) == creds
    # Updating an existing one: only if the API server finds the operator's labels on it.
    tests = [(op["path"], op["value"]) for op in tls.secret_update(secret) if op["op"] == "test"]
    assert tests == [("/metadata/labels/app.kubernetes.io~1managed-by", "dask-hpc-operator"),
                     ("/metadata/labels/hpc.dask.org~1cluster", "c1")]
    with pytest.raises(tls.TLSError, match="lacks"):
        tls.credentials_of_secret({"ca.crt": secret["data"]["ca.crt"]})


# --- the scripts -------------------------------------------------------------------------

FILES = TLSFiles("/shared/my dask/c1/tls/ca.crt", "/shared/my dask/c1/tls/tls.crt",
                 "/shared/my dask/c1/tls/tls.key")
WORKER = JobIdentity("ns", "c1", UID, Role.WORKER, "default", 0)
SCHEDULER = JobIdentity("ns", "c1", UID, Role.SCHEDULER, "default", 0)
RUNNER = JobIdentity("ns", "j1", UID, Role.RUNNER, "runner", 0)


def context(files: TLSFiles | None, protocol: str = "tls") -> RenderContext:
    return RenderContext(backend="slurm", python="/usr/bin/python3",
                         scheduler_file="/shared/my dask/c1/scheduler.json",
                         log_dir="/shared/my dask/c1/logs", protocols=(protocol,), tls=files)


def command_line(script: str, word: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if word in line]
    return shlex.split(line)


def test_scheduler_and_workers_get_the_tls_options_quoted() -> None:
    expected = ["--tls-ca-file", FILES.ca_file, "--tls-cert", FILES.cert_file,
                "--tls-key", FILES.key_file]
    sched = command_line(render_scheduler(context(FILES), SCHEDULER, JobTemplate()).script,
                         "distributed.cli.dask_scheduler")
    assert sched[sched.index("--protocol") + 1] == "tls"
    i = sched.index("--tls-ca-file")
    assert sched[i:i + 6] == expected
    for template in (JobTemplate(), JobTemplate(cuda=True, gpus=2)):
        argv = command_line(render_worker(context(FILES), WORKER, template).script,
                            "--scheduler-file")
        assert argv[argv.index("--protocol") + 1] == "tls"
        i = argv.index("--tls-ca-file")
        assert argv[i:i + 6] == expected, template
    assert "cuda" in argv  # `dask cuda worker` takes the same three options


def test_no_tls_options_without_tls() -> None:
    for script in (render_scheduler(context(None, "tcp"), SCHEDULER, JobTemplate()).script,
                   render_worker(context(None, "tcp"), WORKER, JobTemplate()).script):
        assert "--tls" not in script
        assert "tls://" not in script


def test_runner_gets_the_client_credentials_as_dask_config() -> None:
    command = RunnerCommand(argv=("python", "main.py"), output_file="/o", exit_code_file="/e")
    script = render_runner(context(FILES), RUNNER, JobTemplate(), command,
                           "tls://10.0.0.1:8786").script
    exports = dict(shlex.split(line)[1].split("=", 1) for line in script.splitlines()
                   if line.startswith("export DASK_DISTRIBUTED"))
    assert exports == {
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": FILES.ca_file,
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": FILES.cert_file,
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": FILES.key_file,
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
    }
    plain = render_runner(context(None, "tcp"), RUNNER, JobTemplate(), command,
                          "tcp://10.0.0.1:8786").script
    assert "DASK_DISTRIBUTED" not in plain


def test_client_env_is_what_distributed_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable names are distributed's configuration keys: a Security() built from the
    environment alone carries the files and requires encryption."""
    import dask.config

    for name, value in FILES.client_env().items():
        monkeypatch.setenv(name, value)
    dask.config.refresh()
    try:
        sec = Security()
        assert sec.require_encryption is True
        assert sec.get_tls_config_for_role("client") | {"ciphers": None} == {
            "ca_file": FILES.ca_file, "cert": FILES.cert_file, "key": FILES.key_file,
            "ciphers": None}
    finally:
        monkeypatch.undo()
        dask.config.refresh()


def cluster_manifest(**scheduler: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "DaskCluster",
            "metadata": {"name": "c1", "namespace": "ns", "uid": UID},
            "spec": {"backend": "slurm", "scheduler": scheduler,
                     "worker": {"replicas": 2}}}


def test_reconciler_renders_tls_only_for_tls_clusters(tmp_path: Path) -> None:
    reconciler = ClusterReconciler(Runtime(SiteConfig(staging_dir=str(tmp_path))))
    requests = reconciler.render_all(cluster_manifest(protocol="tls"))
    staging = reconciler.runtime.staging_dir("ns", "c1", UID)
    for request in requests:
        assert f"--tls-key {staging}/tls/tls.key" in request.script, request.identity
    for request in reconciler.render_all(cluster_manifest(protocol="tcp")):
        assert "--tls" not in request.script
    assert not (staging / "tls").exists()  # rendering makes no credentials


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("spec,field", [
    ({"mode": "allocation", "scheduler": {"protocol": "tls"}}, "spec.scheduler.protocol"),
    ({"scheduler": {"protocol": "tls", "extraProtocols": ["tcp"]}},
     "spec.scheduler.extraProtocols"),
    ({"scheduler": {"protocol": "tls", "extraProtocols": ["ucx"]}},
     "spec.scheduler.extraProtocols"),
    ({"scheduler": {"protocol": "tcp", "extraProtocols": ["tls"]}},
     "spec.scheduler.extraProtocols"),
    ({"scheduler": {"protocol": "tls"},
      "worker": {"gpus": 1, "cuda": {"enabled": True, "protocol": "ucx"}}},
     "spec.worker.cuda.protocol"),
])
def test_tls_combinations_that_cannot_work_are_refused(spec: dict[str, Any],
                                                      field: str) -> None:
    manifest = cluster_manifest()
    manifest["spec"] = {**manifest["spec"], **spec}
    with pytest.raises(ManifestError) as err:
        validate(manifest)
    assert err.value.field == field
    assert "tls" in str(err.value).lower()


def test_tls_in_a_daskjob_allocation_is_refused_at_its_field() -> None:
    job = {"apiVersion": API_VERSION, "kind": "DaskJob",
           "metadata": {"name": "j1", "namespace": "ns"},
           "spec": {"mode": "allocation", "job": {"command": ["python", "x.py"]},
                    "cluster": {"scheduler": {"protocol": "tls"}}}}
    with pytest.raises(ManifestError) as err:
        validate(job)
    assert err.value.field == "spec.cluster.scheduler.protocol"


def test_tls_with_gpu_workers_on_the_scheduler_protocol_is_accepted() -> None:
    manifest = cluster_manifest(protocol="tls")
    manifest["spec"]["worker"] = {"gpus": 1, "cuda": {"enabled": True}}
    validate(manifest)


# --- a real TLS handshake ----------------------------------------------------------------

def serve(files: TLSFiles, scheduler_file: Path) -> Scheduler:
    """A real scheduler with a cluster's credentials, as `dask scheduler --tls-*` starts it."""
    security = Security(tls_ca_file=files.ca_file, tls_scheduler_cert=files.cert_file,
                        tls_scheduler_key=files.key_file, require_encryption=True)
    return Scheduler(protocol="tls", host="127.0.0.1", port=0, dashboard=False,
                     security=security, scheduler_file=str(scheduler_file))


@pytest.fixture
async def tls_scheduler(tmp_path: Path) -> AsyncIterator[tuple[Scheduler, TLSFiles, Path]]:
    files = make(tmp_path / "staging")
    scheduler_file = tmp_path / "scheduler.json"
    async with serve(files, scheduler_file) as s:
        yield s, files, scheduler_file


async def test_autoscaler_asks_a_tls_scheduler_with_its_credentials(tmp_path: Path) -> None:
    """The DaskAutoscaler's advice comes over the cluster's TLS (the scheduler runs the
    scaling preload's handler, as the scheduler job does)."""
    runtime = Runtime(SiteConfig(staging_dir=str(tmp_path)))
    manifest = cluster_manifest(protocol="tls")
    cmodel = ClusterModel.from_manifest(validate(manifest), runtime.site)
    files = make(runtime.staging_dir("ns", "c1", UID))
    async with serve(files, tmp_path / "scheduler.json") as scheduler:
        scaling_preload.dask_setup(scheduler)
        autoscaler = AutoscalerReconciler(runtime)
        advice = await autoscaler._recommend(cmodel, cmodel.groups[0],
                                             {"schedulerAddress": scheduler.address})
        assert advice is not None
        # The same cluster without TLS in its spec: the operator has no credentials to
        # offer and gets no advice (the scheduler refuses), rather than an error.
        plain = ClusterModel.from_manifest(validate(cluster_manifest()), runtime.site)
        assert await autoscaler._recommend(plain, plain.groups[0],
                                           {"schedulerAddress": scheduler.address}) is None


async def test_operator_rpc_uses_the_cluster_credentials(
        tls_scheduler: tuple[Scheduler, TLSFiles, Path], tmp_path: Path) -> None:
    scheduler, files, scheduler_file = tls_scheduler
    assert scheduler.address.startswith("tls://")
    view = await dask_rpc.observe(str(scheduler_file), security=tls.security_for(files))
    assert view is not None and view.address == scheduler.address
    assert await dask_rpc.retire(scheduler.address, [], tls.security_for(files)) == set()
    # Without them, or with another cluster's, the operator sees no scheduler (and logs
    # why) rather than failing the reconcile.
    assert await dask_rpc.observe(str(scheduler_file)) is None
    stranger = tls.client_security(make(tmp_path / "stranger", "c2", str(uuid.uuid4())))
    assert await dask_rpc.observe(str(scheduler_file), security=stranger) is None


async def test_clients_without_the_credentials_are_refused(
        tls_scheduler: tuple[Scheduler, TLSFiles, Path], tmp_path: Path) -> None:
    scheduler, files, _ = tls_scheduler
    async with Client(scheduler.address, security=tls.client_security(files),
                      asynchronous=True, timeout=CONNECT_TIMEOUT) as client:
        assert (await client.scheduler.identity())["address"] == scheduler.address
    # The Secret's content in memory works the same.
    secret = tls.secret_manifest({"apiVersion": API_VERSION, "metadata": {
        "name": "c1", "namespace": "ns", "uid": UID}}, tls.load_credentials(files))
    memory = tls.memory_security(tls.credentials_of_secret(secret["data"]))
    async with Client(scheduler.address, security=memory, asynchronous=True,
                      timeout=CONNECT_TIMEOUT) as client:
        assert (await client.scheduler.identity())["address"] == scheduler.address

    # No credentials: distributed will not even try a tls:// address without a TLS context.
    with pytest.raises(TypeError, match="ssl_context"):
        await Client(scheduler.address, asynchronous=True, timeout=CONNECT_TIMEOUT)
    # A client that trusts the cluster's CA but presents no certificate: the scheduler
    # ends the handshake (mutual TLS, CERT_REQUIRED on the listening side too).
    url = urlsplit(scheduler.address)
    anonymous = ssl.create_default_context(cafile=files.ca_file)
    anonymous.check_hostname = False
    reader, writer = await asyncio.open_connection(url.hostname, url.port, ssl=anonymous)
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        await asyncio.wait_for(reader.read(1), 5)
    writer.close()
    # Certificates from another CA: ours for another cluster, or distributed's own
    # self-signed temporary ones.
    stranger = tls.client_security(make(tmp_path / "stranger", "c2", str(uuid.uuid4())))
    for other in (stranger, Security.temporary()):
        with pytest.raises(OSError, match="certificate"):
            await Client(scheduler.address, security=other, asynchronous=True,
                         timeout=CONNECT_TIMEOUT)
    plain = scheduler.address.replace("tls://", "tcp://")
    with pytest.raises(OSError):  # plain TCP to the TLS port
        await Client(plain, asynchronous=True, timeout=CONNECT_TIMEOUT)


async def test_tls_is_refused_where_jobs_run_as_another_user(tmp_path: Path) -> None:
    """Under a namespace policy's submitAs the jobs could not read the operator's 0600
    keys: refused up front with the field and the fix, nothing made or submitted."""
    site = SiteConfig.from_mapping({"stagingDir": str(tmp_path), "namespaces": {
        "ns": {"submitAs": ["sudo", "-n", "-u", "phys"]}}})
    reconciler = ClusterReconciler(Runtime(site))
    status = await reconciler.reconcile(cluster_manifest(protocol="tls"), {})
    assert status["phase"] == "Failed"
    assert "spec.scheduler.protocol" in status["message"]
    assert "use protocol: tcp here" in status["message"]
    assert not reconciler.runtime.backends  # no batch system was asked anything
    assert list(tmp_path.iterdir()) == []
