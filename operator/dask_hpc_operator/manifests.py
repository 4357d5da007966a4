"""Reading manifests from files and directories (several YAML documents allowed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .validation import ManifestError


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) \
        if path.is_dir() else [path]
    docs: list[dict[str, Any]] = []
    for file in files:
        try:
            loaded = list(yaml.safe_load_all(file.read_text()))
        except OSError as exc:
            raise ManifestError(str(file), f"cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ManifestError(str(file), f"is not valid YAML: {exc}") from exc
        for doc in loaded:
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ManifestError(str(file), "every YAML document must be a mapping")
            docs.append(doc)
    if not docs:
        raise ManifestError(str(path), "holds no manifest")
    return docs
