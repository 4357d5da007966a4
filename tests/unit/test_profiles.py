"""dask_hpc_operator.profiles: named site profiles (spec.profile). Loading and checking them
from the site configuration, the merge rules (pure), the refusal of an unknown profile, the
policy seeing (and blaming) a profile's values, and the job scripts `dask-hpc render` writes
with a profile's lines in them exactly once and in order. No batch system is needed: the
reconcile paths that admit a manifest are the ones render and `up` run."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from distributed import Client

from dask_hpc_operator.cli import main
from dask_hpc_operator.embedded import prepare
from dask_hpc_operator.hpc_cluster import HPCCluster, HPCClusterError
from dask_hpc_operator.job_reconcile import JobReconciler
from dask_hpc_operator.policy import PolicyError, admit
from dask_hpc_operator.profiles import apply, apply_profile, profile_fields
from dask_hpc_operator.reconcile import GroupReconciler, Runtime
from dask_hpc_operator.site_config import ConfigError, SiteConfig
from dask_hpc_operator.validation import ManifestError, validate

API = "hpc.dask.org/v1alpha1"
NS = "physics"
A100 = {
    "worker": {"queue": "gpu", "account": "gpu01",
               "extraDirectives": ["--constraint=a100", "--qos=gpu"],
               "prologue": ["module load cuda/12.2", "module load nccl"],
               "env": [{"name": "UCX_TLS", "value": "rc,cuda_copy"},
                       {"name": "OMP_NUM_THREADS", "value": "1"}]},
    "scheduler": {"queue": "debug", "prologue": ["module load tools"]},
    "job": {"queue": "debug", "env": [{"name": "RUNNER", "value": "yes"}]},
}
SITE = SiteConfig.from_mapping({"backend": "slurm", "profiles": {"a100": A100, "cpu": {}}})


def cluster(name: str = "c1", namespace: str = NS, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskCluster",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
            "spec": {"backend": "slurm", "worker": {"replicas": 2, **spec.pop("worker", {})},
                     **spec}}


def group(name: str = "g1", of: str = "c1", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskWorkerGroup",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
            "spec": {"cluster": of, "worker": {"replicas": 1, **spec.pop("worker", {})},
                     **spec}}


def daskjob(mode: str = "cluster", **cluster_spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DaskJob",
            "metadata": {"name": "j1", "namespace": NS, "uid": "uid-j1"},
            "spec": {"mode": mode, "job": {"command": ["python", "-c", "1"]},
                     "cluster": {"backend": "slurm", "worker": {"replicas": 2},
                                 **cluster_spec}}}


def load(profiles: Any, **more: Any) -> SiteConfig:
    return SiteConfig.from_mapping({"backend": "slurm", "profiles": profiles, **more})


# --- loading -------------------------------------------------------------------------------

def test_what_a_profile_may_set_is_what_the_crd_leaves_undefaulted() -> None:
    """Pinned: a default added to one of these in crd_schema takes it out of profiles
    (the API server would fill it in, and the profile could never apply); this says so."""
    assert profile_fields("worker") == ("queue", "account", "env", "prologue",
                                        "extraDirectives")
    assert profile_fields("scheduler") == ("queue", "account", "env", "prologue",
                                           "extraDirectives")
    assert profile_fields("job") == ("queue", "account", "env")  # the runner's fields


def test_profiles_load_checked_and_defaulted() -> None:
    site = load({"a100": A100, "empty": None, "cpu.large": {"worker": {"account": "p1"}}})
    assert sorted(site.profiles) == ["a100", "cpu.large", "empty"]
    assert site.profiles["empty"].targets == {}
    assert site.profiles["a100"].targets["worker"]["extraDirectives"] == ["--constraint=a100",
                                                                          "--qos=gpu"]
    # env values default to "" as in a manifest; the YAML given is not changed.
    site = load({"p": {"worker": {"env": [{"name": "X"}]}}})
    assert site.profiles["p"].targets["worker"]["env"] == [{"name": "X", "value": ""}]
    assert SiteConfig.from_mapping({}).profiles == {}


@pytest.mark.parametrize("profiles, named", [
    ([], "profiles must be a mapping"),
    ({"a b": {}}, "profiles: 'a b' cannot be named by spec.profile"),
    ({"-x": {}}, "profiles: '-x'"),
    ({"gpu": [1]}, "profiles.gpu must be a mapping"),
    ({"gpu": {"workers": {}}}, "profiles.gpu.workers: unknown target"),
    ({"gpu": {"worker": "gpu"}}, "profiles.gpu.worker must be a mapping"),
    ({"gpu": {"worker": {"cores": 4}}}, "profiles.gpu.worker.cores: a profile cannot set cores"),
    ({"gpu": {"scheduler": {"walltime": "01:00:00"}}},
     "profiles.gpu.scheduler.walltime: a profile cannot set walltime"),
    ({"gpu": {"worker": {"workerArgs": ["--nanny"]}}}, "profiles.gpu.worker.workerArgs: a "
                                                       "profile sets batch placement only"),
    ({"gpu": {"worker": {"bogus": 1}}}, "profiles.gpu.worker.bogus: unknown field"),
    ({"gpu": {"job": {"prologue": ["module load x"]}}},
     "profiles.gpu.job.prologue: unknown field; a profile's job may set queue, account, env"),
    ({"gpu": {"worker": {"queue": "gpu;reboot"}}}, "profiles.gpu.worker.queue: 'gpu;reboot'"),
    ({"gpu": {"worker": {"queue": 5}}}, "profiles.gpu.worker.queue: 5 is not of type string"),
    ({"gpu": {"worker": {"extraDirectives": ["--constraint=a100", "--uid=0"]}}},
     "profiles.gpu.worker.extraDirectives[1]: '--uid=0' is not allowed"),
    ({"gpu": {"worker": {"extraDirectives": ["--qos=a\n#SBATCH --uid=0"]}}},
     "profiles.gpu.worker.extraDirectives[0]"),
    ({"gpu": {"scheduler": {"prologue": ["module load x; rm -rf /"]}}},
     "profiles.gpu.scheduler.prologue[0]"),
    ({"gpu": {"worker": {"prologue": "module load x"}}},
     "profiles.gpu.worker.prologue: 'module load x' is not of type array"),
    ({"gpu": {"scheduler": {"env": [{"name": "1X", "value": "y"}]}}},
     "profiles.gpu.scheduler.env[0].name"),
    ({"gpu": {"worker": {"env": [{"name": "X"}, {"name": "X", "value": "2"}]}}},
     "profiles.gpu.worker.env[1].name: X is set twice"),
    ({"gpu": {"worker": {"env": [{"value": "2"}]}}}, "profiles.gpu.worker.env[0].name: is "
                                                     "required"),
])
def test_bad_profiles_are_refused_at_load_naming_the_field(profiles: Any, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(profiles)
    assert str(info.value).startswith("site config: ")
    assert named in str(info.value)


def test_a_defaulted_field_is_refused_with_the_reason_and_the_alternative() -> None:
    with pytest.raises(ConfigError) as info:
        load({"big": {"worker": {"memory": "64GiB"}}})
    message = str(info.value)
    assert "defaults it (to '4GiB')" in message and "API server" in message
    assert "namespaces:" in message  # limit sizes with the policy instead
    assert "queue, account, env, prologue, extraDirectives" in message


def test_profiles_load_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"backend": "slurm", "profiles": {"a100": A100}}))
    assert SiteConfig.load(path).profiles["a100"].targets["scheduler"] == A100["scheduler"]


# --- merging ---------------------------------------------------------------------------------

def test_no_profile_changes_nothing() -> None:
    valid = validate(cluster())
    assert apply_profile(valid, SITE) is valid
    autoscaler = validate({"apiVersion": API, "kind": "DaskAutoscaler",
                           "metadata": {"name": "a", "namespace": NS},
                           "spec": {"cluster": "c1", "maximum": 3}})
    assert apply_profile(autoscaler, SITE) is autoscaler


def test_merge_rules() -> None:
    valid = validate(cluster(profile="a100", worker={
        "queue": "mine", "prologue": ["source /opt/env.sh"],
        "extraDirectives": ["--qos=low"],
        "env": [{"name": "OMP_NUM_THREADS", "value": "4"}, {"name": "MINE", "value": "x"}]}))
    kept = copy.deepcopy(valid)
    out = apply_profile(valid, SITE)
    assert valid == kept  # pure: the input is not changed
    worker, scheduler = out["spec"]["worker"], out["spec"]["scheduler"]
    assert worker["queue"] == "mine"  # set by the manifest: the manifest's
    assert worker["account"] == "gpu01"  # unset: the profile's
    assert worker["prologue"] == ["module load cuda/12.2", "module load nccl",
                                  "source /opt/env.sh"]
    assert worker["extraDirectives"] == ["--constraint=a100", "--qos=gpu", "--qos=low"]
    assert worker["env"] == [{"name": "UCX_TLS", "value": "rc,cuda_copy"},
                             {"name": "OMP_NUM_THREADS", "value": "4"},
                             {"name": "MINE", "value": "x"}]
    assert scheduler["queue"] == "debug" and scheduler["prologue"] == ["module load tools"]
    assert "account" not in scheduler and "extraDirectives" not in scheduler
    # Defaulted fields are the CRD's, untouched.
    assert (worker["cores"], worker["memory"], worker["walltime"]) == (1, "4GiB", "01:00:00")
    # Which values are the profile's (what a policy refusal is blamed on).
    filled = apply(valid, SITE).filled
    assert {"spec.worker.account", "spec.worker.prologue[0]", "spec.worker.prologue[1]",
            "spec.worker.extraDirectives[1]", "spec.scheduler.queue"} <= filled
    assert not {"spec.worker.queue", "spec.worker.prologue[2]",
                "spec.worker.extraDirectives[2]"} & filled
    # Idempotent: a DaskJob's effective cluster spec is admitted again as its DaskCluster.
    assert apply_profile(out, SITE) == out
    assert apply_profile(validate(out), SITE) == out


def test_an_empty_profile_or_target_adds_nothing() -> None:
    valid = validate(cluster(profile="cpu"))
    assert apply_profile(valid, SITE) == valid
    only_scheduler = load({"s": {"scheduler": {"queue": "debug"}}})
    out = apply_profile(validate(cluster(profile="s")), only_scheduler)
    assert out["spec"]["scheduler"]["queue"] == "debug" and "queue" not in out["spec"]["worker"]


def test_a_group_uses_its_own_profile_else_its_clusters() -> None:
    parent = cluster(profile="a100")
    inherited = apply_profile(validate(group()), SITE, cluster=parent)
    assert inherited["spec"]["worker"]["queue"] == "gpu"
    assert inherited["spec"]["worker"]["extraDirectives"] == ["--constraint=a100", "--qos=gpu"]
    own = apply_profile(validate(group(profile="cpu")), SITE, cluster=parent)
    assert "queue" not in own["spec"]["worker"]  # its own profile (empty) wins
    # No cluster known (yet), or a cluster without a profile: nothing to take.
    assert "queue" not in apply_profile(validate(group()), SITE)["spec"]["worker"]
    assert "queue" not in apply_profile(validate(group()), SITE,
                                        cluster=cluster())["spec"]["worker"]
    # An invalid cluster's profile is its own reconcile's problem, not taken here.
    assert "queue" not in apply_profile(validate(group()), SITE,
                                        cluster=cluster(profile="a b"))["spec"]["worker"]


def test_a_daskjob_profiles_its_cluster_and_its_runner() -> None:
    out = apply_profile(validate(daskjob(profile="a100")), SITE)
    spec = out["spec"]
    assert spec["job"]["queue"] == "debug"
    assert spec["job"]["env"] == [{"name": "RUNNER", "value": "yes"}]
    assert spec["cluster"]["worker"]["queue"] == "gpu"
    assert spec["cluster"]["scheduler"]["prologue"] == ["module load tools"]
    assert "profile" not in spec["cluster"]  # its DaskCluster gets the effective spec
    assert apply_profile(out, SITE) == out
    allocation = apply_profile(validate(daskjob("allocation", profile="a100")), SITE)
    assert allocation["spec"]["cluster"]["worker"]["prologue"][:1] == ["module load cuda/12.2"]


def test_a_daskjobs_cluster_is_a_snapshot_of_the_profile(tmp_path: Path) -> None:
    """The DaskCluster a DaskJob creates carries the effective spec, so an administrator's
    later change to the profile neither adds to nor changes its workers' lines."""
    site = SiteConfig(**{**SITE.__dict__, "staging_dir": str(tmp_path)})
    [child], _ = JobReconciler(Runtime(site)).render(daskjob(profile="a100"))
    changed = load({"a100": {"worker": {"prologue": ["module load cuda/12.4"],
                                        "queue": "h100"}}})
    worker = admit(child, changed)["spec"]["worker"]
    assert worker["prologue"] == ["module load cuda/12.2", "module load nccl"]
    assert worker["queue"] == "gpu"


def test_too_many_lines_together_are_refused_at_the_manifests_field() -> None:
    site = load({"many": {"worker": {"prologue": [f"module load m{i}" for i in range(40)]}}})
    valid = validate(cluster(profile="many",
                             worker={"prologue": [f"echo {i}" for i in range(30)]}))
    with pytest.raises(ManifestError) as info:
        apply_profile(valid, site)
    assert info.value.field == "spec.worker.prologue"
    assert "70 entries with the 40 of profile 'many'" in str(info.value)


# --- unknown profiles ------------------------------------------------------------------------

def test_unknown_profile_is_refused_at_spec_profile_listing_the_known_ones() -> None:
    with pytest.raises(ManifestError) as info:
        admit(cluster(profile="h100"), SITE)
    assert info.value.field == "spec.profile"
    assert "'h100' is not a profile of this site" in info.value.message
    assert "use one of a100, cpu" in info.value.fix and "administrator" in info.value.fix
    with pytest.raises(ManifestError) as info:
        admit(daskjob(profile="h100"), SITE)
    assert info.value.field == "spec.cluster.profile"
    with pytest.raises(ManifestError) as info:
        admit(cluster(profile="a100"), SiteConfig(backend="slurm"))
    assert "this site defines no profiles" in info.value.fix
    # A group taking its cluster's unknown profile says where the name came from.
    with pytest.raises(ManifestError) as info:
        admit(group(), SITE, cluster=cluster(profile="h100"))
    assert info.value.field == "spec.profile"
    assert "DaskCluster c1's profile 'h100'" in info.value.message
    assert "use one of a100, cpu here" in info.value.fix


def test_up_refuses_an_unknown_profile_before_anything_runs() -> None:
    with pytest.raises(ManifestError, match=r"spec\.profile: 'h100' is not a profile"):
        prepare([cluster(profile="h100")], None, SITE)
    assert len(prepare([cluster(profile="a100"), group()], None, SITE)) == 2


# --- policy sees the effective values --------------------------------------------------------

def policed(**policy: Any) -> SiteConfig:
    return load({"a100": A100, "cpu": {}}, namespaces={NS: policy})


def test_policy_refuses_a_profiles_queue_naming_the_profile() -> None:
    site = policed(queues=["debug", "cpu"])
    with pytest.raises(PolicyError) as info:
        admit(cluster(profile="a100"), site)
    exc = info.value
    assert exc.field == "spec.profile" and exc.rule == "queues"
    assert "queue 'gpu' is not allowed by policy queues" in exc.message
    assert "spec.worker.queue is set by profile 'a100'" in exc.message
    assert exc.fix.startswith("set spec.worker.queue yourself")
    assert "use one of debug, cpu" in exc.fix
    # Doing what the fix says: the manifest's queue wins, and the policy allows it.
    admitted = admit(cluster(profile="a100", worker={"queue": "cpu"}), site)
    assert admitted["spec"]["worker"]["queue"] == "cpu"
    assert admitted["spec"]["worker"]["prologue"][0] == "module load cuda/12.2"
    # The manifest's own refused value is blamed on the manifest's field, as ever.
    with pytest.raises(PolicyError) as info:
        admit(cluster(profile="a100", worker={"queue": "bigmem"}), site)
    assert info.value.field == "spec.worker.queue"


def test_policy_checks_a_profiles_lines_and_blames_the_profile() -> None:
    site = policed(allowedDirectives=["--qos=.*"])
    with pytest.raises(PolicyError) as info:
        admit(cluster(profile="a100"), site)
    exc = info.value
    assert exc.field == "spec.profile" and exc.rule == "allowedDirectives"
    assert "spec.worker.extraDirectives[0] is set by profile 'a100'" in exc.message
    assert "choose another profile (cpu) or none" in exc.fix
    # Past the profile's lines, the manifest's own: blamed where the user wrote them.
    site = policed(allowedDirectives=["--qos=.*", "--constraint=.*"])
    with pytest.raises(PolicyError) as info:
        admit(cluster(profile="a100", worker={"extraDirectives": ["--nice=5"]}), site)
    assert info.value.field == "spec.worker.extraDirectives[2]"
    site = policed(allowedPrologue=["module load (cuda/.*|tools)"])
    with pytest.raises(PolicyError) as info:
        admit(cluster(profile="a100"), site)
    assert info.value.field == "spec.profile" and info.value.rule == "allowedPrologue"
    assert "'module load nccl' is not allowed" in info.value.message
    assert "spec.worker.prologue[1] is set by profile" in info.value.message


def test_policy_blames_a_groups_inherited_profile_and_a_jobs_runner() -> None:
    site = policed(queues=["debug"])
    with pytest.raises(PolicyError) as info:
        admit(group(), site, cluster=cluster(profile="a100", worker={"queue": "debug"}))
    assert info.value.field == "spec.profile"
    assert "DaskCluster c1's; this group sets no spec.profile" in info.value.message
    with pytest.raises(PolicyError) as info:
        admit(daskjob(profile="a100"), site)
    assert info.value.field == "spec.cluster.profile"
    assert "spec.cluster.worker.queue is set by profile" in info.value.message
    site = policed(queues=["gpu"])
    with pytest.raises(PolicyError) as info:  # the runner's queue is the profile's debug
        admit(daskjob(profile="a100", scheduler={"queue": "gpu"}), site)
    assert "spec.job.queue is set by profile" in info.value.message


async def test_the_reconcile_refuses_through_the_same_path(tmp_path: Path) -> None:
    """The cluster reconcile's refusal (condition and event) carries the profile's blame;
    nothing is staged. No batch system: a refused manifest never reaches the backend."""
    site = SiteConfig(**{**policed(queues=["debug"]).__dict__, "staging_dir": str(tmp_path)})
    events: list[tuple[str, str, str]] = []
    status = await GroupReconciler(Runtime(site)).reconcile(
        cluster(profile="a100"), {}, lambda *e: events.append(e))
    assert status["phase"] == "Failed"
    assert status["message"].startswith("spec.profile: queue 'gpu' is not allowed")
    assert events == [("Warning", "PolicyViolation", status["message"])]
    assert not list(tmp_path.iterdir())


# --- rendered scripts ------------------------------------------------------------------------

def scripts(out: str) -> dict[str, list[str]]:
    """`dask-hpc render` output: job name -> its script's lines."""
    found: dict[str, list[str]] = {}
    for block in out.split("# ---- ")[1:]:
        head, _, body = block.partition("\n")
        name = re.search(r"job (\S+)", head)
        assert name is not None, head
        found[name.group(1)] = body.splitlines()
    return found


def in_order(lines: list[str], expected: list[str]) -> None:
    """Each expected line exactly once, in this order (others may come between)."""
    for line in expected:
        assert lines.count(line) == 1, (line, lines)
    positions = [lines.index(line) for line in expected]
    assert positions == sorted(positions), (expected, lines)


def test_render_shows_the_profiles_lines_once_and_in_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({
        "backend": "slurm", "stagingDir": str(tmp_path / "staging"),
        "prologue": ["module load dask/2026.8"], "profiles": {"a100": A100}}))
    manifests = tmp_path / "m.yaml"
    manifests.write_text(yaml.safe_dump_all([
        cluster(profile="a100", worker={"replicas": 1, "prologue": ["source /opt/env.sh"],
                                        "extraDirectives": ["--qos=low"]}),
        group("gpus"),  # takes the cluster's profile
        daskjob(profile="a100", worker={"replicas": 1}),
    ]))
    assert main(["render", "-f", str(manifests), "--config", str(config)]) == 0
    jobs = scripts(capsys.readouterr().out)
    worker_lines = ["#SBATCH -p gpu", "#SBATCH -A gpu01", "#SBATCH --constraint=a100",
                    "#SBATCH --qos=gpu", "export UCX_TLS=rc,cuda_copy",
                    "export OMP_NUM_THREADS=1", "module load dask/2026.8",
                    "module load cuda/12.2", "module load nccl"]
    in_order(jobs["dask.physics.c1.default.0"],
             [*worker_lines[:4], "#SBATCH --qos=low", *worker_lines[4:], "source /opt/env.sh"])
    in_order(jobs["dask.physics.c1.scheduler.0"],
             ["#SBATCH -p debug", "module load dask/2026.8", "module load tools"])
    assert not any("cuda" in line or "a100" in line
                   for line in jobs["dask.physics.c1.scheduler.0"])
    in_order(jobs["dask.physics.c1.gpus.0"], worker_lines)
    # The DaskJob: its cluster (admitted twice: as the job's spec.cluster, then as the
    # DaskCluster it creates) has the profile's lines once; its runner the job target's.
    in_order(jobs["dask.physics.j1.default.0"], worker_lines)
    in_order(jobs["dask.physics.j1.scheduler.0"], ["#SBATCH -p debug", "module load tools"])
    in_order(jobs["dask.physics.j1.runner.0"], ["#SBATCH -p debug", "export RUNNER=yes"])


def test_render_all_of_a_profiled_cluster(tmp_path: Path) -> None:
    """The reconciler's own rendering (what the operator submits), without the CLI."""
    site = SiteConfig(**{**SITE.__dict__, "staging_dir": str(tmp_path)})
    requests = GroupReconciler(Runtime(site)).render_all(cluster(profile="a100"))
    worker = next(r for r in requests if r.identity.role.value == "worker").script
    lines = worker.splitlines()
    in_order(lines, ["#SBATCH -p gpu", "#SBATCH --constraint=a100", "#SBATCH --qos=gpu",
                     "module load cuda/12.2", "module load nccl"])


# --- HPCCluster (standalone: the embedded operator, local backend, real Dask) ----------------

def test_hpccluster_refuses_an_unknown_profile(tmp_path: Path) -> None:
    site = SiteConfig.from_mapping({"backend": "local", "stagingDir": str(tmp_path),
                                    "profiles": {"cpu": {}}})
    with pytest.raises(HPCClusterError, match=r"spec\.profile: 'h100' is not a profile of "
                                              r"this site \(use one of cpu"):
        HPCCluster("p1", profile="h100", site_config=site, timeout=60, quiet=True)


def test_hpccluster_workers_run_with_the_profiles_env_and_prologue(tmp_path: Path) -> None:
    """One real local worker (a few seconds): the profile reaches the process, not only the
    script text."""
    site = SiteConfig.from_mapping({"backend": "local", "stagingDir": str(tmp_path),
                                    "profiles": {"p": {"worker": {
                                        "env": [{"name": "PROFILE_ENV", "value": "a b"}],
                                        "prologue": ["export PROFILE_LINE=ran"]}}}})
    with HPCCluster("p2", profile="p", replicas=1, site_config=site, timeout=120,
                    quiet=True) as hpc, Client(hpc) as client:
        client.wait_for_workers(1, timeout=120)
        seen = client.run(lambda: (os.environ.get("PROFILE_ENV"),
                                   os.environ.get("PROFILE_LINE")))
    assert list(seen.values()) == [("a b", "ran")]
