"""dask_hpc_operator.site_config: the administrator's YAML, checked at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_hpc_operator.site_config import ConfigError, SiteConfig


def test_defaults() -> None:
    config = SiteConfig.from_mapping({})
    assert config.backend == "local"
    assert config.staging_dir.startswith("/")
    assert config.poll_interval >= config.min_poll_interval > 0
    assert SiteConfig.from_mapping(None) == config  # type: ignore[arg-type]


def test_camel_case_keys() -> None:
    config = SiteConfig.from_mapping({
        "backend": "slurm",
        "stagingDir": "/shared/dask-hpc",
        "python": "/opt/conda/bin/python3.11",
        "prologue": ["module load python/3.11", "source /opt/env.sh"],
        "submitPrefix": ["ssh", "login1"],
        "pollInterval": 10,
        "minPollInterval": 3,
        "commandTimeout": 30,
        "workerDeathTimeout": 600,
        "schedulerTimeout": 120,
        "squeueAllUsers": True,
    })
    assert config.backend == "slurm"
    assert config.staging_dir == "/shared/dask-hpc"
    assert config.python == "/opt/conda/bin/python3.11"
    assert config.prologue == ("module load python/3.11", "source /opt/env.sh")
    assert config.submit_prefix == ("ssh", "login1")
    assert config.poll_interval == 10
    assert config.min_poll_interval == 3
    assert config.command_timeout == 30
    assert config.worker_death_timeout == 600
    assert config.scheduler_timeout == 120
    assert config.squeue_all_users is True


def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(ConfigError) as info:
        SiteConfig.from_mapping({"stagingDirectory": "/x"})
    message = str(info.value)
    assert "'stagingDirectory'" in message
    for known in ("stagingDir", "submitPrefix", "pollInterval", "minPollInterval",
                  "squeueAllUsers", "python", "backend"):
        assert known in message


@pytest.mark.parametrize("key", [1, True, None, 2.5])
def test_a_key_that_is_not_a_name_is_a_config_error(tmp_path: Path, key: object) -> None:
    """YAML reads `1:`, `true:` or `~:` as a number, a bool or null, not a name."""
    with pytest.raises(ConfigError, match=f"site config: key {key!r} is not a name"):
        SiteConfig.from_mapping({key: "x"})  # type: ignore[dict-item]
    path = tmp_path / "site.yaml"
    path.write_text("backend: slurm\ntrue: 1\n")
    with pytest.raises(ConfigError, match="key True is not a name"):
        SiteConfig.load(path)


@pytest.mark.parametrize("python", ["python3", "/usr/bin/python 3", "/opt/py;rm -rf /",
                                    "/opt/$(id)/python", "/opt/`id`", "~/bin/python",
                                    "/usr/bin/python\n#SBATCH --uid=0", ""])
def test_bad_python_path(python: str) -> None:
    with pytest.raises(ConfigError, match="python"):
        SiteConfig.from_mapping({"python": python})


@pytest.mark.parametrize("staging", ["relative/dir", "/shared/my dir", "/a;b"])
def test_bad_staging_dir(staging: str) -> None:
    with pytest.raises(ConfigError, match="stagingDir"):
        SiteConfig.from_mapping({"stagingDir": staging})


@pytest.mark.parametrize(("data", "match"), [
    ({"backend": "lsf"}, "backend"),
    ({"prologue": "module load x"}, "prologue must be a list of strings"),
    ({"prologue": ["ok", 3]}, "prologue must be a list of strings"),
    ({"prologue": ["echo $(id)"]}, "not a simple command"),
    ({"submitPrefix": "ssh login1"}, "submitPrefix must be a list of strings"),
    ({"pollInterval": 1, "minPollInterval": 2}, "pollInterval"),
    ({"minPollInterval": 0}, "pollInterval"),
])
def test_bad_values(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SiteConfig.from_mapping(data)


def test_load_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("backend: slurm\nstagingDir: /shared/x\n")
    assert SiteConfig.load(path).backend == "slurm"
    monkeypatch.setenv("DASK_HPC_CONFIG", str(path))
    assert SiteConfig.load(None).staging_dir == "/shared/x"
    monkeypatch.delenv("DASK_HPC_CONFIG")
    assert SiteConfig.load(None).backend == "local"


@pytest.mark.parametrize(("text", "match"), [
    ("- a\n- b\n", "mapping"),
    ("backend: [unclosed\n", "site config"),
])
def test_load_bad_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        SiteConfig.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SiteConfig.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("data", [{"workerDeathTimeout": "15m"}, {"pollInterval": "5s"},
                                  {"commandTimeout": "1m"}])
def test_numeric_keys_are_type_checked(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(data))):
        SiteConfig.from_mapping(data)
