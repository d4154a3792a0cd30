"""What the committed model repository serves: the newest version of each model.

Read from disk, never written into a test, so shipping a newly trained version (a new numbered
folder) changes what the tests expect instead of breaking them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def versions(name: str, repository: Path = REPOSITORY) -> list[str]:
    """The model's version folders (those holding a config.json), oldest first, as the service orders them."""
    found = [d.name for d in (repository / name).iterdir() if d.name.isdigit() and (d / "config.json").is_file()]
    return sorted(found, key=int)


def newest(name: str, repository: Path = REPOSITORY) -> str:
    """The version served when a request names none."""
    return versions(name, repository)[-1]


def config(name: str, version: str | None = None, repository: Path = REPOSITORY) -> dict[str, Any]:
    """A version's config.json as plain JSON (the newest by default)."""
    folder = repository / name / (version or newest(name, repository))
    loaded: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return loaded


GNCNN = newest("gncnn")
DENOISER = newest("in_autoencoder")
