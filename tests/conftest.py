"""Fixtures shared by every test package: where the repository and its committed model repository
are, and a tiny CIFAR-10-like zip to train on."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "ship"]
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "ship": (30, 30, 200)}


@pytest.fixture(autouse=True)
def _no_grpc_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps built inside the test process leave gRPC off (it would listen on 8001); servers that
    tests/service/servers.py starts run it on a free port."""
    monkeypatch.setenv("NORMSERVE_GRPC", "false")


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


@pytest.fixture(scope="session")
def cifar_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zip of train/<class>/*.jpg and test/<class>/*.jpg: solid colours with a little noise."""
    path = tmp_path_factory.mktemp("cifar") / "c.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for cls in CLASSES:
                for i in range(4):
                    pixels = np.clip(np.asarray(COLOURS[cls]) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
                    buf = io.BytesIO()
                    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG")
                    zf.writestr(f"{split}/{cls}/{i:04d}.jpg", buf.getvalue())
    return path


@pytest.fixture(scope="session")
def cifar_zip_classes() -> list[str]:
    """The class folders of `cifar_zip`, sorted as the loader orders them."""
    return sorted(CLASSES)
