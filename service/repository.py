"""The model repository: finds `<root>/<model>/<version>/`, loads each version, answers lookups.

Server readiness is the readiness of its models. The newest version of a model serves requests
that name no version.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.cores import CoreLock
from service.errors import ModelNotFound, ModelNotReady
from service.model import ModelState, ServedModel
from service.model_config import MODEL_FILE
from service.settings import Settings

log = logging.getLogger("normserve.repository")


class ModelRepository:
    def __init__(self, root: Path, settings: Settings, cores: CoreLock | None = None) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"model repository {root.resolve()} does not exist (NORMSERVE_MODEL_REPOSITORY)")
        self.root = root
        self.settings = settings
        self.cores = cores  # the server's lock around runs on the CPU (service/cores.py); None: no wide runs
        # name -> version -> model, versions in ascending order
        self.models: dict[str, dict[str, ServedModel]] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = sorted(
                (v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()), key=lambda v: int(v.name)
            )
            if not versions:
                log.warning("%s has no numeric version folders; skipped", model_dir)
                continue
            self.models[model_dir.name] = {v.name: ServedModel(v, model_dir.name, v.name) for v in versions}

    def load_all(self) -> None:
        for model in self.all():
            if not (model.directory / MODEL_FILE).exists():
                model.state = ModelState.UNAVAILABLE
                model.reason = f"no {MODEL_FILE} in {model.directory}"
                log.error("%s: %s", model.key, model.reason)
                continue
            model.load(self.settings, self.cores)

    def stop_all(self) -> None:
        for model in self.all():
            model.stop()

    def all(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def ready(self) -> bool:
        models = self.all()
        if not models:
            return False
        return all(m.ready for m in models) if self.settings.strict_readiness else any(m.ready for m in models)

    def find(self, name: str, version: str | None = None) -> ServedModel:
        """The model version, ready or not; 404 when there is no such model or version."""
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} not found; available: {sorted(self.models)}")
        if version is None:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; available: {sorted(versions, key=int)}")
        return versions[version]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """A ready model version; 503 with the reason when it is not ready."""
        model = self.find(name, version)
        if not model.ready:
            raise ModelNotReady(f"model {model.key} is not ready: {model.reason or model.state.value}")
        return model
