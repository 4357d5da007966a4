"""Hostile manifests (tests/fixtures/hostile/corpus.yaml) are refused three times over, and
refusing them runs nothing.

For every entry of the corpus:
  1. `validation.validate` raises a ManifestError naming the expected field;
  2. the shipped CRD (crds/*.yaml, through a plain JSON-schema validator as in
     test_crd_refusals.py) refuses it too, or the entry says why only the API server's own
     rules (CEL, list-map keys) or only the operator can (`crd:` in the corpus);
  3. the real reconcilers (cluster, worker group, DaskJob, autoscaler; backend slurm, and pbs
     for a subset), and for a sample `dask-hpc up -f` / `dask-hpc render -f` as subprocesses,
     answer with a refusal that names the field, and neither submit a job nor run a command.

What stands in for the batch system is the one thing faked: a PATH directory holding
executables named like every command the operator could run (sbatch, squeue, qsub, srun,
ssh, sudo, ...). Each appends its argv to a canary log; sbatch and qsub also keep the script
they were given. They are first and only on PATH, so the real SLURM on this machine is never
reached, and a positive control shows that a valid manifest does reach them. Payloads that
would run a command write `touch <canary>/pwned-<id>`; no such file may ever appear.

Values that are accepted although they look hostile (`$(...)` in an environment value, shell
syntax in a DaskJob's argv, directive-like lines in its Python script) are data, not code:
the rendered runner script is executed by bash and they arrive verbatim.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dask_hpc_operator import crd_schema
from dask_hpc_operator.autoscaler_reconcile import AutoscalerReconciler
from dask_hpc_operator.constants import (
    KIND_AUTOSCALER,
    KIND_CLUSTER,
    KIND_JOB,
    KIND_WORKER_GROUP,
    NAMES,
)
from dask_hpc_operator.embedded import EmbeddedStore, Resource
from dask_hpc_operator.job_planning import JobModel
from dask_hpc_operator.job_reconcile import JobReconciler
from dask_hpc_operator.reconcile import ClusterReconciler, GroupReconciler, Runtime
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import ManifestError, validate

ROOT = Path(__file__).resolve().parents[2]
CORPUS_FILE = ROOT / "tests" / "fixtures" / "hostile" / "corpus.yaml"
CORPUS: dict[str, Any] = yaml.safe_load(CORPUS_FILE.read_text())
BASES: dict[str, dict[str, Any]] = CORPUS["bases"]
KIND_OF_BASE = {"cluster": KIND_CLUSTER, "group": KIND_WORKER_GROUP, "job": KIND_JOB,
                "autoscaler": KIND_AUTOSCALER}
# Everything the operator (or a submit prefix) could ever run.
FAKE_COMMANDS = ("sbatch", "squeue", "scancel", "sacct", "scontrol", "qsub", "qstat", "qdel",
                 "srun", "mpiexec", "ssh", "sudo")
MAX_MESSAGE = 2000  # a refusal quotes the value, cut short: no megabyte status messages


@dataclass(frozen=True)
class Entry:
    id: str
    base: str
    field: str
    crd: Any
    set: dict[str, Any]
    unset: tuple[str, ...]
    long: dict[str, Any] | None
    pbs: bool
    up: bool
    render: bool

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Entry:
        return cls(raw["id"], raw["base"], raw["field"], raw["crd"], raw.get("set") or {},
                   tuple(raw.get("unset") or ()), raw.get("long"), bool(raw.get("pbs")),
                   bool(raw.get("up")), bool(raw.get("render")))

    @property
    def kind(self) -> str:
        return KIND_OF_BASE[self.base]

    def manifest(self, canary: Path) -> dict[str, Any]:
        """The base with this entry's fields set; `{pwn}` becomes a command that would leave
        a file in the canary directory if anything ever ran it."""
        doc = copy.deepcopy(BASES[self.base])
        payload = f"touch {canary}/pwned-{self.id}"
        for path, value in self.set.items():
            _put(doc, path, _expand(value, payload))
        for path in self.unset:
            *parents, last = path.split(".")
            _walk(doc, parents).pop(last)
        if self.long:
            text = str(self.long.get("text", "a"))
            length = int(self.long["length"])
            _put(doc, self.long["path"], (text * (length // len(text) + 1))[:length])
        return doc


def _expand(value: Any, payload: str) -> Any:
    if isinstance(value, str):
        return value.replace("{pwn}", payload)
    if isinstance(value, list):
        return [_expand(v, payload) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, payload) for k, v in value.items()}
    return value


def _walk(doc: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    for key in keys:
        doc = doc.setdefault(key, {})
    return doc


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    _walk(doc, parents)[last] = value


ENTRIES = [Entry.of(raw) for raw in CORPUS["entries"]]
IDS = [e.id for e in ENTRIES]


def _dotted(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _related(a: str, b: str) -> bool:
    """One path is the other or lies inside it (a `required` error is reported at the
    object that lacks the field)."""
    short, long_ = sorted((a, b), key=len)
    return long_ == short or long_.startswith((short + ".", short + "["))


@cache
def crd_text(kind: str) -> str:
    return (ROOT / "crds" / f"{NAMES[kind][0]}.yaml").read_text()


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(crd_text(kind))
    return jsonschema.Draft7Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


# --- the fake batch system ------------------------------------------------------------------------

@dataclass(frozen=True)
class Fakes:
    bin: Path
    canary: Path

    @property
    def log(self) -> Path:
        return self.canary / "commands.log"

    def commands(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def pwned(self) -> list[str]:
        return sorted(p.name for p in self.canary.glob("pwned-*"))

    def submitted(self) -> list[str]:
        return [p.read_text() for p in sorted(self.canary.glob("submitted-*.sh"))]

    def assert_nothing_ran(self) -> None:
        assert not self.log.exists(), f"commands ran: {self.commands()}"
        assert self.pwned() == []


def make_fakes(root: Path) -> Fakes:
    """Executables that record their argv (and sbatch/qsub their script) and answer like
    an empty batch system that accepts submissions. They set their own PATH for `cat`, so
    the operator's PATH can be the fakes alone."""
    bindir, canary = root / "fake-bin", root / "canary"
    bindir.mkdir()
    canary.mkdir()
    log = shlex.quote(str(canary / "commands.log"))
    keep_script = f'cat > {shlex.quote(str(canary))}/submitted-$$.sh\n'
    answers = {
        "sbatch": keep_script + "echo 4242\n",
        "qsub": keep_script + "echo 4242.fakeserver\n",
        "qstat": "echo '{\"Jobs\": {}}'\n",
    }
    for name in FAKE_COMMANDS:
        path = bindir / name
        path.write_text("#!/bin/bash\nexport PATH=/usr/bin:/bin\n"
                        f'printf "%s\\n" "{name} $*" >> {log}\n' + answers.get(name, ""))
        path.chmod(0o755)
    return Fakes(bindir, canary)


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    made = make_fakes(tmp_path)
    monkeypatch.setenv("PATH", str(made.bin))  # only the fakes: real SLURM is never reached
    return made


def runtime(tmp_path: Path, backend: str) -> Runtime:
    return Runtime(SiteConfig(backend=backend, staging_dir=str(tmp_path / "staging"),
                              python=sys.executable, min_poll_interval=0.1,
                              poll_interval=0.1))


async def reconcile(kind: str, manifest: dict[str, Any], rt: Runtime,
                    events: list[tuple[str, str, str]]) -> dict[str, Any]:
    """The reconcile the operator's handlers (and `dask-hpc up`) run for this kind."""
    def sink(type_: str, reason: str, message: str) -> None:
        events.append((type_, reason, message))

    cluster = copy.deepcopy(BASES["cluster"])
    if kind == KIND_CLUSTER:
        return await ClusterReconciler(rt).reconcile(manifest, {}, sink)
    if kind == KIND_WORKER_GROUP:
        return await GroupReconciler(rt).reconcile_group(manifest, {}, cluster, sink)
    if kind == KIND_JOB:
        return await JobReconciler(rt).reconcile(manifest, {}, EmbeddedStore([]), sink)
    store = EmbeddedStore([Resource(cluster)])
    return await AutoscalerReconciler(rt).reconcile(manifest, {}, store, sink)


# --- the corpus itself ----------------------------------------------------------------------------

def test_the_corpus_covers_what_it_must() -> None:
    assert len(ENTRIES) >= 60
    assert len(set(IDS)) == len(IDS), "duplicate ids"
    assert {e.base for e in ENTRIES} == set(KIND_OF_BASE)
    for entry in ENTRIES:
        crd = entry.crd
        assert crd == "refused" or (isinstance(crd, dict) and len(crd) == 1 and (
            crd.get("server") or crd.get("operator-only"))), entry.id
    assert sum(e.pbs for e in ENTRIES) >= 10
    assert 3 <= sum(e.up for e in ENTRIES) <= 6
    assert 2 <= sum(e.render for e in ENTRIES) <= 4
    covered = " ".join(e.field for e in ENTRIES)
    for field in ("metadata.name", "metadata.namespace", ".queue", ".account", ".memory",
                  ".walltime", ".replicas", ".cores", ".gpus", ".env[", ".prologue[",
                  ".extraDirectives[", ".workerArgs[", ".resources.", ".cuda.", "spec.cluster",
                  "spec.job.command", "spec.job.script", "spec.job.workingDir", "spec.minimum",
                  "spec.maximum", "spec.workerGroup", "spec.scheduler.", "spec.backend"):
        assert field in covered, f"no hostile entry for {field}"


@pytest.mark.parametrize("base", sorted(BASES))
def test_the_bases_are_valid_in_both_checks(base: str) -> None:
    """A refusal is the hostile field's doing, not a broken base."""
    assert validate(BASES[base])["kind"] == KIND_OF_BASE[base]
    assert not list(crd_validator(KIND_OF_BASE[base]).iter_errors(BASES[base]))


# --- 1. the operator's own validation -------------------------------------------------------------

@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_refused_by_the_operator(entry: Entry, tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as refused:
        validate(entry.manifest(tmp_path))
    assert refused.value.field == entry.field
    assert str(refused.value).startswith(entry.field + ": ")
    assert len(str(refused.value)) < MAX_MESSAGE


# --- 2. the CRD, as the API server applies it -----------------------------------------------------

@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_refused_by_the_crd(entry: Entry, tmp_path: Path) -> None:
    errors = list(crd_validator(entry.kind).iter_errors(entry.manifest(tmp_path)))
    if entry.crd == "refused":
        paths = [_dotted(e.absolute_path) for e in errors]
        assert any(_related(p, entry.field) for p in paths), \
            f"the CRD did not refuse {entry.field} (errors at {paths})"
        return
    # Listed as beyond JSON Schema: keep the list honest (if JSON Schema refuses it, the
    # entry belongs under `refused`).
    assert not errors, f"the CRD refuses it after all: list it as refused ({errors[0].message})"
    if "server" in entry.crd:
        assert entry.crd["server"] in crd_text(entry.kind), \
            "the API-server rule this entry relies on is not in the CRD"


def test_the_directive_denylist_is_a_crd_rule() -> None:
    """The API server refuses identity- and output-changing directives itself (`not`
    pattern beside the item's pattern, valid in a structural schema), in every kind that
    carries directives."""
    for kind in (KIND_CLUSTER, KIND_WORKER_GROUP, KIND_JOB):
        crd = yaml.safe_load(crd_text(kind))
        text = json.dumps(crd)
        assert json.dumps(crd_schema.DENIED_DIRECTIVE) in text, kind


@pytest.mark.parametrize(("directive", "allowed"), [
    ("--constraint=haswell", True), ("-C a100", True), ("--qos=high", True),
    ("--reservation=maint", True), ("--exclusive", True), ("--gres=gpu:2", True),
    ("--partition debug", True), ("-l storage=scratch/ab12+gdata/ab12", True),
    ("--wait-all-nodes=1", True), ("--open-mode=append", True), ("--nice=-5", True),
    ("--uid=0", False), ("--u=0", False), ("--output=x", False), ("--outp=x", False),
    ("-o x", False), ("-ox", False), ("--chdir=/", False), ("--ch=/", False),
    ("--export=NONE", False), ("--export-file=/x", False), ("--exp=ALL", False),
    ("--comment=x", False), ("--job-name=x", False), ("-J x", False), ("--array=1", False),
    ("--wait", False), ("-W block=true", False), ("--wrap=id", False), ("-v A=1", False),
    ("--nice -o/x", False), ("-H -ox", False),
    ("--clusters=b", False), ("--cl=b", False), ("--cluster-constraint=x", False),
    ("-q gpu@server2", False), ("-q gpu", True), ("-M me@example.org", True),
])
def test_directive_rules(directive: str, allowed: bool) -> None:
    manifest = copy.deepcopy(BASES["cluster"])
    manifest["spec"]["worker"]["extraDirectives"] = [directive]
    crd_errors = list(crd_validator(KIND_CLUSTER).iter_errors(manifest))
    try:
        validate(manifest)
        operator_allows = True
    except ManifestError as exc:
        assert exc.field == "spec.worker.extraDirectives[0]"
        operator_allows = False
    assert operator_allows is allowed
    assert (not crd_errors) is allowed


# --- 3. end to end: the reconcilers refuse and run nothing ----------------------------------------

RECONCILE_CASES = [pytest.param(e, "slurm", id=f"{e.id}-slurm") for e in ENTRIES] + [
    pytest.param(e, "pbs", id=f"{e.id}-pbs") for e in ENTRIES if e.pbs]


@pytest.mark.parametrize(("entry", "backend"), RECONCILE_CASES)
async def test_the_reconcile_refuses_and_runs_nothing(entry: Entry, backend: str,
                                                      fakes: Fakes, tmp_path: Path) -> None:
    events: list[tuple[str, str, str]] = []
    rt = runtime(tmp_path, backend)
    status = await reconcile(entry.kind, entry.manifest(fakes.canary), rt, events)
    assert status["phase"] == "Failed"
    assert status["message"].startswith(entry.field + ": ")
    assert len(status["message"]) < MAX_MESSAGE
    accepted = [c for c in status["conditions"] if c["type"] == "Accepted"]
    assert accepted and accepted[0]["status"] == "False"
    assert all(len(message) < MAX_MESSAGE for _, _, message in events)
    fakes.assert_nothing_ran()
    assert not rt.pollers, "a refused manifest must not even poll the batch system"
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").rglob("*"))


@pytest.mark.parametrize(("base", "backend"), [
    ("cluster", "slurm"), ("cluster", "pbs"), ("group", "slurm"), ("job", "slurm"),
    ("autoscaler", "slurm")])
async def test_a_valid_manifest_does_reach_the_fakes(base: str, backend: str, fakes: Fakes,
                                                     tmp_path: Path) -> None:
    """The positive control: the same reconcile, the same PATH, a valid manifest: the fake
    batch system is asked (so an empty canary above means nothing was run)."""
    events: list[tuple[str, str, str]] = []
    status = await reconcile(KIND_OF_BASE[base], copy.deepcopy(BASES[base]),
                             runtime(tmp_path, backend), events)
    assert status.get("phase") != "Failed", status
    commands = [line.split()[0] for line in fakes.commands()]
    expected = {("cluster", "slurm"): {"squeue", "sbatch"}, ("cluster", "pbs"): {"qstat", "qsub"},
                ("group", "slurm"): {"squeue", "sbatch"}, ("job", "slurm"): {"squeue"},
                ("autoscaler", "slurm"): set()}[(base, backend)]
    assert expected <= set(commands), commands
    assert fakes.pwned() == []


# --- what is accepted is data, not code -----------------------------------------------------------

def _inert_values(pwn: str) -> list[str]:
    """Shell syntax that an environment value or an argv element may legitimately hold."""
    return [f"$({pwn})", f"`{pwn}`", f"'; {pwn}; '", f'"; {pwn}; "', f"\\'$({pwn})",
            "$HOME", "${PATH}", "*", "~", "!!", "-o", "--uid=0", "#SBATCH --uid=0",
            "a b", "", "é ü 中"]


async def test_metacharacters_in_env_values_and_argv_arrive_verbatim(
        fakes: Fakes, tmp_path: Path) -> None:
    """`$` in an env value is allowed and literal: values are exported single-quoted
    (documented in docs/admin-guide.md). A DaskJob's command is argv, each element quoted.
    The rendered runner script is run by bash, as the batch system would run it."""
    values = _inert_values(f"touch {fakes.canary}/pwned-inert")
    out = tmp_path / "seen.json"
    code = ("import json, os, sys; json.dump({'argv': sys.argv[2:], 'env': [os.environ['V%d' "
            "% i] for i in range(len(sys.argv) - 2)], 'cwd': os.getcwd()}, open(sys.argv[1], "
            "'w'))")
    workdir = tmp_path / "work@dir%+=-x"
    workdir.mkdir()
    manifest = copy.deepcopy(BASES["job"])
    manifest["spec"]["job"].update(
        command=[sys.executable, "-c", code, str(out), *values], workingDir=str(workdir),
        env=[{"name": f"V{i}", "value": v} for i, v in enumerate(values)])
    valid = validate(manifest)
    assert not list(crd_validator(KIND_JOB).iter_errors(manifest))
    rt = runtime(tmp_path, "slurm")
    reconciler = JobReconciler(rt)
    model = JobModel.from_manifest(valid, rt.site)
    request = reconciler.render_request(model, "tcp://127.0.0.1:1")
    for value in values:
        assert shlex.quote(value) in request.script
    assert not [line for line in request.script.splitlines()
                if line.startswith("#SBATCH") and "--uid" in line]
    reconciler.paths(model).staging.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "runner.sh"
    script.write_text(request.script)
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(out.read_text())
    assert seen == {"argv": values, "env": values, "cwd": str(workdir)}
    fakes.assert_nothing_ran()


async def test_a_job_script_is_written_to_a_file_never_into_the_batch_script(
        fakes: Fakes, tmp_path: Path) -> None:
    """`spec.job.script` is the user's Python program: any text, written to the staging
    directory and run by path. Directive-looking lines in it never reach the batch script."""
    pwn = f"touch {fakes.canary}/pwned-script"
    source = (f"#SBATCH --uid=0\n#PBS -u root\n'''\n$({pwn})\n`{pwn}`\n'''\n"
              "print('hello')  # \u2028 \x85 are fine in a program\n")
    manifest = copy.deepcopy(BASES["job"])
    manifest["spec"]["mode"] = "allocation"
    manifest["spec"]["job"] = {"script": source, "walltime": "00:10:00"}
    rt = runtime(tmp_path, "slurm")
    status = await JobReconciler(rt).reconcile(manifest, {}, EmbeddedStore([]))
    assert status["phase"] == "Pending" and status["jobId"] == "4242", status
    (batch,) = fakes.submitted()
    assert source not in batch
    directives = [line for line in batch.splitlines() if line.startswith("#SBATCH")]
    assert directives and not any("--uid" in d or "-u root" in d for d in directives)
    # The batch script is exactly what a harmless program would have had: the program is
    # referenced by its path, never spliced in.
    harmless = copy.deepcopy(manifest)
    harmless["spec"]["job"]["script"] = "print(1)"
    model = JobModel.from_manifest(validate(harmless), rt.site)
    assert batch == JobReconciler(rt).render_request(model).script
    staged = JobReconciler(rt).paths(model)
    assert staged.script.read_text() == source
    assert shlex.quote(str(staged.script)) in batch
    assert fakes.pwned() == []
    assert [line.split()[0] for line in fakes.commands()] == ["squeue", "sbatch"]


# --- `dask-hpc up` and `dask-hpc render`, as a user runs them -------------------------------------

def _cli(fakes: Fakes, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({"backend": "slurm", "stagingDir": str(tmp_path / "st"),
                                      "python": sys.executable}))
    exe = Path(sys.executable).with_name("dask-hpc")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "dask_hpc_operator.cli"]
    env = {**os.environ, "PATH": str(fakes.bin)}
    env.pop("DASK_HPC_CONFIG", None)
    return subprocess.run([*argv, *args, "--config", str(config)], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)


CLI_CASES = [pytest.param(e, "up", id=f"{e.id}-up") for e in ENTRIES if e.up] + [
    pytest.param(e, "render", id=f"{e.id}-render") for e in ENTRIES if e.render]


@pytest.mark.parametrize(("entry", "command"), CLI_CASES)
def test_the_cli_refuses_and_runs_nothing(entry: Entry, command: str, fakes: Fakes,
                                          tmp_path: Path) -> None:
    manifest_file = tmp_path / "hostile.yaml"
    manifest_file.write_text(yaml.safe_dump(entry.manifest(fakes.canary)))
    proc = _cli(fakes, tmp_path, command, "-f", str(manifest_file))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"invalid manifest: {entry.field}: " in proc.stderr
    assert proc.stdout == ""  # render printed no script
    fakes.assert_nothing_ran()
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").rglob("*"))


def test_up_reads_yaml_safely(fakes: Fakes, tmp_path: Path) -> None:
    """A YAML tag that would construct a Python object (and run a command) is an error."""
    manifest_file = tmp_path / "hostile.yaml"
    manifest_file.write_text(
        f"!!python/object/apply:os.system [\"touch {fakes.canary}/pwned-yaml-tag\"]\n")
    proc = _cli(fakes, tmp_path, "up", "-f", str(manifest_file))
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr, proc.stderr
    fakes.assert_nothing_ran()


# --- no shell anywhere in the operator or the bridge ----------------------------------------------

SHELL_FUNCTIONS = {"system", "popen", "create_subprocess_shell", "getoutput",
                   "getstatusoutput", "spawnl", "spawnlp", "spawnv", "spawnvp"}
# `bash -c PROGRAM` with a constant PROGRAM and the variable parts as positional arguments
# ("$1", "$2") is not shell injection: the local backend's wrapper that records a job's
# exit status is the one such use.
ALLOWED_SHELL_PROGRAMS = {("hpc-bridge/hpc_bridge/backends/local.py", "_WRAPPER")}


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def test_no_shell_in_the_source() -> None:
    offences, shell_programs = [], set()
    files = sorted([*(ROOT / "operator").rglob("*.py"), *(ROOT / "hpc-bridge").rglob("*.py")])
    assert len(files) > 20
    for path in files:
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=where)):
            if isinstance(node, ast.Call):
                if _name(node.func) in SHELL_FUNCTIONS:
                    offences.append(f"{where}:{node.lineno}: {_name(node.func)}()")
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant)
                                                  and kw.value.value is False):
                        offences.append(f"{where}:{node.lineno}: shell=")
            if isinstance(node, ast.List) and len(node.elts) >= 3:
                head = [e.value for e in node.elts[:2] if isinstance(e, ast.Constant)]
                if len(head) == 2 and Path(str(head[0])).name in ("sh", "bash") \
                        and head[1] == "-c":
                    program = node.elts[2]
                    shell_programs.add((where, _name(program) or ast.unparse(program)))
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess") \
                    and any(a.name in SHELL_FUNCTIONS for a in node.names):
                offences.append(f"{where}:{node.lineno}: imports a shell function")
    assert offences == []
    assert shell_programs == ALLOWED_SHELL_PROGRAMS
    # ...and that one program takes nothing from its caller but positional arguments.
    from hpc_bridge.backends import local
    assert "{" not in local._WRAPPER and "$1" in local._WRAPPER
