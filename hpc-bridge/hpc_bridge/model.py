"""What the bridge submits and what it observes: plain values, no I/O.

The bridge knows nothing of Kubernetes. A job is described by a `JobIdentity` (who owns it,
which role it plays) and a `JobTemplate` (what it asks the batch system for); a poll returns
`ObservedJob`s. The identity is written into every job (name and comment), which is what
lets a restarted operator adopt jobs instead of submitting them again.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, field


class JobState(str, enum.Enum):
    PENDING = "PENDING"  # queued, held, requeued, preempted-and-requeued: waiting, not failed
    RUNNING = "RUNNING"
    ENDING = "ENDING"  # completing / being cancelled: not live, not yet settled
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    GONE = "GONE"  # no longer reported by the batch system; outcome unknown

    @property
    def live(self) -> bool:
        """A live job counts towards a group's replicas."""
        return self in (JobState.PENDING, JobState.RUNNING)

    @property
    def terminal(self) -> bool:
        return not self.live and self is not JobState.ENDING


class Role(str, enum.Enum):
    SCHEDULER = "scheduler"
    WORKER = "worker"
    RUNNER = "runner"  # a DaskJob's client script, next to its cluster
    ALLOCATION = "allocation"  # one MPI allocation: scheduler, workers (and a client) inside


COMMENT_PREFIX = "dask-hpc:v1:"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_UID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class IdentityError(ValueError):
    pass


@dataclass(frozen=True, order=True)
class JobIdentity:
    """Who a job belongs to. Every part is a DNS label or a UUID, so it is safe verbatim in a
    job name, a directive and a path component."""

    namespace: str
    cluster: str
    owner_uid: str  # uid of the resource that owns the job (cluster or worker group)
    role: Role
    group: str
    index: int

    def __post_init__(self) -> None:
        for label, value in (("namespace", self.namespace), ("cluster", self.cluster),
                             ("group", self.group)):
            if not _NAME_RE.fullmatch(value) or len(value) > 63:
                raise IdentityError(f"{label} {value!r} is not a DNS label")
        if not _UID_RE.fullmatch(self.owner_uid):
            raise IdentityError(f"owner uid {self.owner_uid!r} is not a uid")
        if self.index < 0:
            raise IdentityError("index must be >= 0")

    @functools.cached_property
    def job_name(self) -> str:
        """Deterministic; also the Dask worker name, so a worker maps back to its job.
        Cached: the reconcile asks it of every job several times per cycle."""
        if self.role is Role.WORKER:
            return f"dask.{self.namespace}.{self.cluster}.{self.group}.{self.index}"
        return f"dask.{self.namespace}.{self.cluster}.{self.role.value}.{self.index}"

    def comment(self) -> str:
        return COMMENT_PREFIX + ":".join((self.namespace, self.cluster, self.owner_uid,
                                          self.role.value, self.group, str(self.index)))

    @classmethod
    def parse(cls, comment: str) -> JobIdentity | None:
        """The identity in a job comment, or None for jobs that are not ours."""
        if not comment.startswith(COMMENT_PREFIX):
            return None
        parts = comment[len(COMMENT_PREFIX):].strip().split(":")
        if len(parts) != 6:
            return None
        namespace, cluster, uid, role, group, index = parts
        try:
            return cls(namespace, cluster, uid, Role(role), group, int(index))
        except (ValueError, IdentityError):
            return None

    def owns_worker_name(self, worker_name: str) -> bool:
        """A job with processes > 1 runs workers named `<job name>-<i>`."""
        return worker_name == self.job_name or worker_name.startswith(self.job_name + "-")


@dataclass(frozen=True)
class JobTemplate:
    """What one batch job asks for. Values are already validated by the caller."""

    cores: int = 1
    memory: str = "4GiB"
    processes: int = 1
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    gpus: int = 0
    env: tuple[tuple[str, str], ...] = ()
    prologue: tuple[str, ...] = ()
    extra_directives: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    resources: tuple[tuple[str, float], ...] = ()
    # GPU workers: `dask cuda worker`, one Dask worker per GPU.
    cuda: bool = False
    rmm_pool_size: str | None = None
    device_memory_limit: str | None = None
    protocol: str | None = None  # the workers' protocol; None = the scheduler's first


@dataclass(frozen=True)
class RunnerCommand:
    """A user's client program (a DaskJob's runner): what runs, where, and where its
    output and exit status land, on the shared filesystem so the operator can read them
    whatever the batch system keeps."""

    argv: tuple[str, ...]  # quoted when rendered; DASK_SCHEDULER_ADDRESS is set for it
    output_file: str  # stdout and stderr, appended
    exit_code_file: str  # the command's exit status, written atomically when it ends
    working_dir: str | None = None


# distributed's configuration keys, as environment variables (dask.config reads them in
# every process): what a client program needs to reach a TLS cluster with no code change.
TLS_CLIENT_ENV = {
    "ca_file": "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    "cert_file": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
    "key_file": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
}
REQUIRE_ENCRYPTION_ENV = "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"


@dataclass(frozen=True)
class TLSFiles:
    """A cluster's TLS credentials on the shared filesystem (`protocol: tls`): the CA
    certificate, and the one certificate and key that the scheduler, its workers and its
    clients all present (Dask's TLS is mutual: every side verifies the other's certificate
    against the CA). Paths only; the operator writes the files (dask_hpc_operator.tls)."""

    ca_file: str
    cert_file: str
    key_file: str

    def cli_args(self) -> list[str]:
        """The options `dask scheduler`, `dask worker` and `dask cuda worker` share."""
        return ["--tls-ca-file", self.ca_file, "--tls-cert", self.cert_file,
                "--tls-key", self.key_file]

    def client_env(self) -> dict[str, str]:
        """Environment for a client process: its `Client(address)` then uses TLS with
        these credentials, and refuses to talk without encryption."""
        env = {name: getattr(self, attr) for attr, name in TLS_CLIENT_ENV.items()}
        env[REQUIRE_ENCRYPTION_ENV] = "True"
        return env


@dataclass(frozen=True)
class JobRequest:
    """A rendered job, ready for a backend's submit.

    With `array`, one submission carries one task per index (a SLURM job array); `identity`
    is the first task's, and each task's worker takes its index from the batch system.
    """

    identity: JobIdentity
    script: str
    log_dir: str
    array: tuple[int, ...] = ()

    def task_identities(self) -> list[JobIdentity]:
        if not self.array:
            return [self.identity]
        i = self.identity
        return [JobIdentity(i.namespace, i.cluster, i.owner_uid, i.role, i.group, n)
                for n in self.array]


def compress_ranges(indices: tuple[int, ...] | list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (SLURM's --array syntax)."""
    out: list[str] = []
    ordered = sorted(set(indices))
    start = prev = ordered[0]
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)


def expand_ranges(text: str) -> list[int]:
    """SLURM's array task list ("3,5-6%2") -> [3, 5, 6]; the throttle after % is dropped."""
    result: list[int] = []
    for part in text.split("%")[0].split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        step = 1
        if ":" in high:
            high, _, step_text = high.partition(":")
            step = int(step_text)
        result.extend(range(int(low), int(high or low) + 1, step))
    return result


@dataclass(frozen=True)
class ObservedJob:
    job_id: str
    identity: JobIdentity
    state: JobState
    reason: str = ""  # the batch system's word for why it waits or ended
    exit_code: int | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    # Epoch seconds where the batch system says (None where it does not, or not yet): the
    # start drives replacement before the walltime, the end the back-off after failures.
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class JobAccounting:
    """What the batch system's own records say one job was given and when (sacct, qstat -x,
    the local backend's job directory): the raw facts usage accounting is computed from.

    None where the record does not say: a SLURM without slurmdbd (`sacct -c`, the job
    completion log) records no GPUs, the local backend no cores. `final` means the job has
    ended and the batch system will not change the record again, so it need not be asked
    twice.
    """

    job_id: str
    source: str  # sacct | sacct-completion | qstat | local
    state: str  # the batch system's own word (RUNNING, CANCELLED by 0, F, ...)
    final: bool
    submitted_at: float | None = None
    eligible_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    cores: int | None = None
    gpus: int | None = None
    elapsed: float | None = None  # run seconds as the batch system counted them
