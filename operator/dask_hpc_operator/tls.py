"""Per-cluster TLS (`spec.scheduler.protocol: tls`): a CA and one certificate per cluster.

Dask's TLS is mutual (distributed.security: both ends of every connection use
`ssl.CERT_REQUIRED`; `check_hostname` is off, since peers are reached by IP address and
trust is the cluster's own CA). So the scheduler, each worker and each client present a
certificate the other side checks against the cluster's CA, and a client without one
signed by that CA is refused in the handshake, before any Dask message. One certificate,
used by all three roles, is enough: what it proves is "holds this cluster's key".

Made once per cluster (its staging directory is per uid) and reused by every later
reconcile, by a restarted operator, and by `dask-hpc up`:

    <staging>/tls/        0700
        ca.crt            the cluster's CA certificate            0600
        tls.crt           the certificate (signed by that CA)     0600
        tls.key           its private key (PKCS#8, unencrypted)   0600

The names are the keys of the Kubernetes Secret `<cluster>-dask-tls` (type
kubernetes.io/tls) whose content is read from these files, so the files are the single
source. The directory is written under a temporary name and renamed into place: a crash
never leaves half a key, and a second writer (a racing operator) keeps the first's set.
The CA's private key is never written: nothing is signed after the one certificate, so
keeping it would only be something more to steal.

Keys are ECDSA P-256 (fast to make and to handshake; every OpenSSL that distributed
supports has it); certificates are valid for TLS_VALIDITY_DAYS (one year), from five
minutes before creation so that compute nodes with a slightly late clock accept them.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

from hpc_bridge.model import TLSFiles

from .constants import (
    KIND_CLUSTER,
    LABEL_CLUSTER,
    LABEL_MANAGED_BY,
    MANAGER_NAME,
    TLS_DIR_NAME,
    TLS_SECRET_SUFFIX,
    TLS_VALIDITY_DAYS,
)

log = logging.getLogger(__name__)

PROTOCOL = "tls"
CA_CERT = "ca.crt"
CERT = "tls.crt"
KEY = "tls.key"
FILE_NAMES = (CA_CERT, CERT, KEY)
DIR_MODE = 0o700
FILE_MODE = 0o600
CLOCK_SKEW = dt.timedelta(minutes=5)


class TLSError(Exception):
    """A cluster's credentials are unusable (unreadable, not a chain, expired) or cannot
    be published (a Secret of their name that is not the operator's)."""


@dataclass(frozen=True)
class Credentials:
    """A cluster's credentials in PEM, as the files and the Secret hold them."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def by_name(self) -> dict[str, bytes]:
        return {CA_CERT: self.ca_pem, CERT: self.cert_pem, KEY: self.key_pem}


def needs_tls(protocols: Iterable[str]) -> bool:
    return PROTOCOL in protocols


def tls_dir(staging: Path) -> Path:
    return staging / TLS_DIR_NAME


def tls_files(staging: Path) -> TLSFiles:
    """Where a cluster's credentials are (paths only: nothing is read or made)."""
    d = tls_dir(staging)
    return TLSFiles(ca_file=str(d / CA_CERT), cert_file=str(d / CERT), key_file=str(d / KEY))


def secret_name(cluster: str) -> str:
    return cluster + TLS_SECRET_SUFFIX


# --- making them -------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, MANAGER_NAME),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate(namespace: str, name: str, uid: str,
             now: dt.datetime | None = None) -> Credentials:
    """A fresh CA and one certificate it signs, for the cluster `namespace/name` (`uid`).
    The uid goes into the subjects (a common name is limited to 64 characters, a
    namespace/name pair is not); namespace and name go into the certificate's DNS name."""
    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = now - CLOCK_SKEW, now + dt.timedelta(days=TLS_VALIDITY_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = _name(f"dask-hpc CA {uid}")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"dask-hpc {uid}")).issuer_name(ca_subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        # Both: every holder is a server (scheduler, worker) and a client (worker, client).
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(f"{name}.{namespace}.dask-hpc")]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Credentials(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )


def _complete(directory: Path) -> bool:
    """Whether the set is whole. False only when a file is really not there (or empty);
    any other error (ESTALE from an NFS server's failover, EACCES) is raised: taking a
    filesystem's bad moment for a missing set would replace the CA under a running
    scheduler, and nobody could talk to it any more."""
    try:
        return all((directory / n).stat().st_size > 0 for n in FILE_NAMES)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _write_private(path: Path, data: bytes) -> None:
    """Created with mode 0600 from the start (never readable by others, not even
    briefly), and on disk before the directory is renamed into place."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tighten(directory: Path) -> None:
    """Modes as they must be, even for a set restored by a backup or copied by hand."""
    if stat.S_IMODE(directory.stat().st_mode) != DIR_MODE:
        directory.chmod(DIR_MODE)
    for n in FILE_NAMES:
        if stat.S_IMODE((directory / n).stat().st_mode) != FILE_MODE:
            (directory / n).chmod(FILE_MODE)


def ensure_cluster_credentials(staging: Path, namespace: str, name: str, uid: str,
                               in_use: bool = False) -> TLSFiles:
    """The cluster's credentials, made on the first call and reused afterwards (idempotent:
    every reconcile calls this; a restarted operator finds the files).

    `in_use`: a scheduler job of the cluster runs (the caller's poll says so). It holds the
    set it started with, so a set found missing or incomplete then is not replaced (a new CA
    would lock the operator and every new worker out of it, silently): TLSError says what
    to do. With no scheduler running, an incomplete set (someone removed a file) is
    replaced, with a warning. An error other than a missing file is raised as it is
    (OSError), and nothing is replaced."""
    final = tls_dir(staging)
    files = tls_files(staging)
    if _complete(final):
        _tighten(final)
        return files
    if in_use:
        raise TLSError(
            f"{final} does not hold the cluster's TLS credentials ({', '.join(FILE_NAMES)}) "
            "while its scheduler job runs with them: new ones would lock everyone out of "
            f"it. Restore the files (the Secret {secret_name(name)} holds a copy where the "
            "operator runs in Kubernetes), or delete and re-create the cluster")
    staging.mkdir(parents=True, exist_ok=True)
    if final.exists():
        log.warning("%s is not a complete set of TLS credentials: making new ones", final)
        broken = Path(tempfile.mkdtemp(prefix=".tls-broken-", dir=staging))
        os.replace(final, broken / TLS_DIR_NAME)
        shutil.rmtree(broken, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".tls-", dir=staging))  # mode 0700
    try:
        for n, data in generate(namespace, name, uid).by_name().items():
            _write_private(work / n, data)
        work.chmod(DIR_MODE)
        os.rename(work, final)  # atomic; fails if another writer got there first
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        if _complete(final):
            return files  # the other writer's set, whole
        raise
    with contextlib.suppress(OSError):  # the rename on disk too (best effort)
        fd = os.open(staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return files


def remove_credentials(staging: Path) -> bool:
    """Delete a cluster's credentials (its deletion: keys are secrets, and unlike the
    history they are not kept). False, with an error logged, if they could not be."""
    try:
        shutil.rmtree(tls_dir(staging))
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.error("could not remove the TLS credentials in %s: %s", tls_dir(staging), exc)
        return False
    return True


# --- reading and checking them -----------------------------------------------------------

def load_credentials(files: TLSFiles) -> Credentials:
    try:
        return Credentials(*(Path(p).read_bytes()
                             for p in (files.ca_file, files.cert_file, files.key_file)))
    except OSError as exc:
        raise TLSError(f"cannot read the cluster's TLS credentials: {exc}") from exc


def verify_credentials(creds: Credentials, now: dt.datetime | None = None) -> None:
    """Raise TLSError unless the certificate is signed by the CA, the key is the
    certificate's, and both certificates are valid at `now`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        ca = x509.load_pem_x509_certificate(creds.ca_pem)
        cert = x509.load_pem_x509_certificate(creds.cert_pem)
        key = serialization.load_pem_private_key(creds.key_pem, password=None)
    except ValueError as exc:
        raise TLSError(f"not PEM credentials: {exc}") from exc
    if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
        raise TLSError("ca.crt is not a CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TLSError(f"tls.crt is not signed by ca.crt: {exc}") from exc
    pem = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, pem) != \
            cert.public_key().public_bytes(serialization.Encoding.PEM, pem):
        raise TLSError("tls.key is not the key of tls.crt")
    for what, c in (("ca.crt", ca), ("tls.crt", cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise TLSError(f"{what} is valid from {c.not_valid_before_utc} to "
                           f"{c.not_valid_after_utc}, not now; re-create the cluster")


def check_files(files: TLSFiles, now: dt.datetime | None = None) -> None:
    """Raise TLSError unless the files are a usable set at `now` (verify_credentials).
    Checked before the operator's RPC uses them: an expired certificate is then said in
    the cluster's status, with what to do, not seen as a scheduler that does not answer."""
    verify_credentials(load_credentials(files), now)


# --- using them --------------------------------------------------------------------------

def client_security(files: TLSFiles) -> Security:
    """What a client (the operator's RPC, a user's Client) connects with: the cluster's
    certificate, and no unencrypted fallback."""
    return Security(require_encryption=True, tls_ca_file=files.ca_file,
                    tls_client_cert=files.cert_file, tls_client_key=files.key_file)


def memory_security(creds: Credentials) -> Security:
    """The same from PEM held in memory (read from the Secret): distributed takes PEM text
    in place of a path."""
    return Security(require_encryption=True, tls_ca_file=creds.ca_pem.decode(),
                    tls_client_cert=creds.cert_pem.decode(),
                    tls_client_key=creds.key_pem.decode())


def security_for(files: TLSFiles | None) -> Security | None:
    """The operator's client security for a cluster's RPC: None where it has no TLS."""
    return client_security(files) if files is not None else None


def connection_args(security: Security | None) -> dict[str, Any]:
    """`rpc(..., connection_args=...)` for the client role (empty: plain comms)."""
    return security.get_connection_args("client") if security is not None else {}


def status_of(files: TLSFiles) -> dict[str, str]:
    """status.tls: where the credentials are (the operator adds secretName once the Secret
    exists)."""
    return {"caFile": files.ca_file, "certFile": files.cert_file, "keyFile": files.key_file}


def files_of_status(tls_status: dict[str, Any]) -> TLSFiles | None:
    try:
        return TLSFiles(str(tls_status["caFile"]), str(tls_status["certFile"]),
                        str(tls_status["keyFile"]))
    except (KeyError, TypeError):
        return None


def connect_hint(files: TLSFiles) -> str:
    """One sentence telling a user how to connect (`dask-hpc up` prints it)."""
    return (f"TLS: credentials in {os.path.dirname(files.ca_file)}; connect with "
            f"Client(address, security="
            f"Security(tls_ca_file={files.ca_file!r}, tls_client_cert={files.cert_file!r}, "
            f"tls_client_key={files.key_file!r}, require_encryption=True))")


# --- the Kubernetes Secret ---------------------------------------------------------------

def secret_manifest(cluster: dict[str, Any], creds: Credentials) -> dict[str, Any]:
    """The Secret holding a cluster's credentials, owned by the DaskCluster so that the
    API server's garbage collector removes it with the cluster."""
    meta = cluster["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": secret_name(meta["name"]),
            "namespace": meta.get("namespace") or "default",
            "labels": {LABEL_CLUSTER: meta["name"], LABEL_MANAGED_BY: MANAGER_NAME},
            "ownerReferences": [{
                "apiVersion": cluster["apiVersion"], "kind": KIND_CLUSTER,
                "name": meta["name"], "uid": meta["uid"],
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "data": {n: base64.b64encode(v).decode() for n, v in creds.by_name().items()},
    }


def _pointer(*keys: str) -> str:
    return "".join("/" + k.replace("~", "~0").replace("/", "~1") for k in keys)


def secret_update(secret: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON patch bringing an existing Secret of that name to `secret`'s content, which
    the API server applies only if that Secret is this operator's Secret of this cluster
    (its labels are tested in the same atomic patch): a user's own Secret that happens to
    have the name is refused, never overwritten, and no read permission is needed."""
    meta = secret["metadata"]
    return [
        {"op": "test", "path": _pointer("metadata", "labels", LABEL_MANAGED_BY),
         "value": MANAGER_NAME},
        {"op": "test", "path": _pointer("metadata", "labels", LABEL_CLUSTER),
         "value": meta["labels"][LABEL_CLUSTER]},
        {"op": "replace", "path": "/metadata/ownerReferences", "value": meta["ownerReferences"]},
        {"op": "replace", "path": "/data", "value": secret["data"]},
    ]


def credentials_of_secret(data: dict[str, str]) -> Credentials:
    """The inverse: a Secret's `data` (base64) back to PEM."""
    try:
        ca, cert, key = (base64.b64decode(data[n]) for n in FILE_NAMES)
    except (KeyError, TypeError, ValueError) as exc:
        raise TLSError(f"the Secret lacks {', '.join(FILE_NAMES)}: {exc}") from exc
    return Credentials(ca, cert, key)
