"""hpc_bridge.model: job identity (names, comments) and job states."""

from __future__ import annotations

import pytest

from hpc_bridge.model import COMMENT_PREFIX, IdentityError, JobIdentity, JobState, Role


def ident(role: Role = Role.WORKER, group: str = "default", index: int = 0,
          cluster: str = "c1", namespace: str = "default",
          uid: str = "0b5c3d3e-1111-4e2a-9c1a-aaaaaaaaaaaa") -> JobIdentity:
    return JobIdentity(namespace, cluster, uid, role, group, index)


# --- comment round trip ------------------------------------------------------------------

@pytest.mark.parametrize("identity", [
    ident(),
    ident(Role.SCHEDULER, index=3),
    ident(Role.RUNNER, group="runner", index=0),
    ident(group="gpu-a100", index=12345, cluster="my-cluster-2", namespace="team-a"),
    ident(uid="uid-1"),
])
def test_comment_round_trip(identity: JobIdentity) -> None:
    comment = identity.comment()
    assert comment.startswith(COMMENT_PREFIX)
    assert JobIdentity.parse(comment) == identity


def test_comment_exact_text() -> None:
    assert ident(uid="uid-1").comment() == "dask-hpc:v1:default:c1:uid-1:worker:default:0"
    assert ident(Role.SCHEDULER, uid="uid-1").comment() == \
        "dask-hpc:v1:default:c1:uid-1:scheduler:default:0"


def test_parse_tolerates_surrounding_whitespace_after_prefix() -> None:
    assert JobIdentity.parse("dask-hpc:v1:default:c1:uid-1:worker:default:0  ") == \
        ident(uid="uid-1")


@pytest.mark.parametrize("comment", [
    "",
    "(null)",
    "my own comment",
    "dask-hpc:v2:default:c1:uid-1:worker:default:0",  # other version
    "xdask-hpc:v1:default:c1:uid-1:worker:default:0",
    "dask-hpc:v1:",
    "dask-hpc:v1:default:c1:uid-1:worker:default",  # 5 parts
    "dask-hpc:v1:default:c1:uid-1:worker:default:0:extra",  # 7 parts
    "dask-hpc:v1:default:c1:uid-1:janitor:default:0",  # unknown role
    "dask-hpc:v1:default:c1:uid-1:worker:default:x",  # index not a number
    "dask-hpc:v1:default:c1:uid-1:worker:default:-1",  # negative index
    "dask-hpc:v1:Default:c1:uid-1:worker:default:0",  # not a DNS label
    "dask-hpc:v1:default:c_1:uid-1:worker:default:0",
    "dask-hpc:v1:default:c1:uid 1:worker:default:0",  # uid with a space
    "dask-hpc:v1:default:c1::worker:default:0",  # empty uid
    "dask-hpc:v1:default::uid-1:worker:default:0",  # empty cluster
    "dask-hpc:v1:default:c1:uid-1:worker:default:0|x",  # squeue field separator
    "dask-hpc:v1:default:" + "c" * 64 + ":uid-1:worker:default:0",  # label too long
])
def test_parse_foreign_or_malformed_returns_none(comment: str) -> None:
    assert JobIdentity.parse(comment) is None


@pytest.mark.parametrize("kwargs", [
    {"namespace": "Default"},
    {"namespace": ""},
    {"cluster": "-c1"},
    {"cluster": "c1-"},
    {"cluster": "c.1"},
    {"cluster": "c" * 64},
    {"group": "my_group"},
    {"uid": "uid;rm"},
    {"uid": "u" * 65},
    {"index": -1},
])
def test_identity_rejects_unsafe_parts(kwargs: dict[str, object]) -> None:
    with pytest.raises(IdentityError):
        ident(**kwargs)  # type: ignore[arg-type]


def test_identity_rejects_trailing_newline() -> None:
    with pytest.raises(IdentityError):
        ident(cluster="c1\n")


# --- job names ---------------------------------------------------------------------------

def test_job_names() -> None:
    assert ident(index=7).job_name == "dask.default.c1.default.7"
    assert ident(group="gpu", index=0).job_name == "dask.default.c1.gpu.0"
    assert ident(Role.SCHEDULER).job_name == "dask.default.c1.scheduler.0"
    assert ident(Role.RUNNER, index=2).job_name == "dask.default.c1.runner.2"


def test_job_names_are_deterministic_and_distinct() -> None:
    assert ident(index=1).job_name == ident(index=1).job_name
    names = {ident(index=i).job_name for i in range(20)}
    assert len(names) == 20


def test_owns_worker_name() -> None:
    one = ident(index=1)
    assert one.owns_worker_name("dask.default.c1.default.1")
    assert one.owns_worker_name("dask.default.c1.default.1-0")  # processes > 1
    assert one.owns_worker_name("dask.default.c1.default.1-15")
    # index 1 must not claim the workers of index 10 or 11 (prefix confusion)
    assert not one.owns_worker_name("dask.default.c1.default.10")
    assert not one.owns_worker_name("dask.default.c1.default.10-0")
    assert not one.owns_worker_name("dask.default.c1.default.11")
    # nor index 0 those of a `name-0` style worker of index 0's neighbours
    zero = ident(index=0)
    assert zero.owns_worker_name("dask.default.c1.default.0-0")
    assert not zero.owns_worker_name("dask.default.c1.default.0.1")
    assert not zero.owns_worker_name("dask.default.c1.default.01")
    # other groups, clusters, namespaces
    assert not one.owns_worker_name("dask.default.c1.default-x.1")
    assert not one.owns_worker_name("dask.default.c2.default.1")
    assert not one.owns_worker_name("dask.other.c1.default.1")
    assert not one.owns_worker_name("tcp://10.0.0.1:1234")
    assert not one.owns_worker_name("")


def test_identity_is_hashable_and_ordered() -> None:
    ids = {ident(index=2), ident(index=1), ident(index=2)}
    assert len(ids) == 2
    assert sorted(ids)[0].index == 1


# --- states ------------------------------------------------------------------------------

@pytest.mark.parametrize(("state", "live", "terminal"), [
    (JobState.PENDING, True, False),
    (JobState.RUNNING, True, False),
    (JobState.ENDING, False, False),
    (JobState.COMPLETED, False, True),
    (JobState.FAILED, False, True),
    (JobState.CANCELLED, False, True),
    (JobState.GONE, False, True),
])
def test_state_live_terminal(state: JobState, live: bool, terminal: bool) -> None:
    assert state.live is live
    assert state.terminal is terminal


def test_every_state_is_classified() -> None:
    for state in JobState:
        assert not (state.live and state.terminal)
