"""Fixtures for the evaluation tests: writable copies of the committed models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eval_data import RepoFactory


@pytest.fixture
def model_repo(tmp_path: Path, committed_model_repository: Path) -> RepoFactory:
    """`model_repo("gncnn", labels=[...])`: a repository holding a copy of one committed model
    (newest version), optionally with its config.json labels replaced."""

    def make(name: str, labels: list[str] | None = None) -> Path:
        root = tmp_path / "repo"
        src = max((committed_model_repository / name).iterdir(), key=lambda p: int(p.name))
        dst = root / name / src.name
        shutil.copytree(src, dst)
        if labels is not None:
            cfg = json.loads((dst / "config.json").read_text())
            cfg["labels"] = labels
            (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        return root

    return make
