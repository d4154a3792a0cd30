"""Files that every part reads: which suffixes count as images, and a file's content hash.

Shared by `models` (training data), `evaluation` (test folders) and the scripts; imports nothing of
normserve, so each of them may use it."""

from __future__ import annotations

import hashlib
from pathlib import Path

# The images a folder of training or test data contributes (compared lower-cased with a file's suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of the file's bytes (read in chunks, never whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
