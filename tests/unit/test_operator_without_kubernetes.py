"""`dask-hpc operator` where there is no Kubernetes API: a sentence, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_hpc_operator.cli import main


def test_operator_without_kubeconfig_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    assert main(["operator", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no Kubernetes API to talk to" in err and "dask-hpc up -f FILE" in err
