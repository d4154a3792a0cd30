"""Helpers for the evaluation tests: tiny data sets in the layouts the evaluator reads, and an
independent ONNX Runtime session to check it against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

RepoFactory = Callable[..., Path]


def version_dir(repo: Path, name: str) -> Path:
    return next((repo / name).iterdir())


def session(repo: Path, name: str) -> ort.InferenceSession:
    """A plain ORT session on the model, independent of the service and evaluation code."""
    return ort.InferenceSession(str(version_dir(repo, name) / "model.onnx"), providers=["CPUExecutionProvider"])


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3): a low-resolution random image upsampled, so JPEG keeps it well."""
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def save(pixels: np.ndarray, path: Path, **params: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **params)  # type: ignore[arg-type]
