"""Fixtures shared by every test package: where the repository and its committed model repository are."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder (holds pyproject.toml and model_repository/)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def committed_model_repository(repo_root: Path) -> Path:
    """The model_repository/ committed with the code: read it, never write to it (copy it first)."""
    path = repo_root / "model_repository"
    assert path.is_dir(), f"{path} is missing: the service tests serve the committed models"
    return path
