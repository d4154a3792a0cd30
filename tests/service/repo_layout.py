"""Edit a writable copy of the model repository on disk: tests of repository mechanics (faults,
versions, polling) start from one version per model and add, change or break versions."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def single_version(repository: Path) -> Path:
    """Reduce the repository to one version per model, its newest, renumbered "1": a known layout
    whatever versions have been shipped since."""
    for model_dir in (d for d in repository.iterdir() if d.is_dir()):
        versions = sorted((d for d in model_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
        newest = versions[-1]
        for old in versions[:-1]:
            shutil.rmtree(old)
        if newest.name != "1":
            newest.rename(model_dir / "1")
            edit_config(model_dir / "1", version="1")
    return repository


def edit_config(version_dir: Path, **changes: Any) -> None:
    path = version_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def add_version(
    repository: Path,
    model: str,
    version: str,
    source: str = "1",
    atomic: bool = False,
    edit: Callable[[Path], None] | None = None,
) -> Path:
    """Copy <model>/<source> to <model>/<version> and make its config.json say so; `edit` changes
    the copy further before it is in place. `atomic`: build it in a hidden folder and rename it
    into place, as `normserve export` does, so a server that polls the repository never sees half
    of it."""
    dest = repository / model / version
    build = repository / model / f".{version}.partial" if atomic else dest
    shutil.copytree(repository / model / source, build)
    edit_config(build, version=version)
    if edit is not None:
        edit(build)
    if atomic:
        build.rename(dest)
    return dest


def replace_file(path: Path, data: bytes) -> None:
    """Rewrite a file atomically (write a sibling, rename over), with an mtime that differs from
    the old one even on a coarse-grained file system."""
    old_mtime = path.stat().st_mtime_ns if path.exists() else 0
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(data)
    new_mtime = max(tmp.stat().st_mtime_ns, old_mtime + 1_000_000_000)
    os.utime(tmp, ns=(new_mtime, new_mtime))
    os.replace(tmp, path)
