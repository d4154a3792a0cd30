"""The model repository: finds `<root>/<model>/<version>/`, loads each version, answers lookups.

Server readiness is the readiness of its models. Which versions load is the version policy's
choice (service/versions.py); the newest loaded version serves requests that name no version.
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
        # name -> version -> model, the versions the policy loads, in ascending order
        self.models: dict[str, dict[str, ServedModel]] = {}
        self.left_out: dict[str, list[str]] = {}  # name -> versions on disk that the policy does not load
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            on_disk = [v.name for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()]
            if not on_disk:
                log.warning("%s has no numeric version folders; skipped", model_dir)
                continue
            policy = settings.policy_for(model_dir.name)
            try:
                served = policy.select(on_disk)
            except ValueError as err:
                raise ValueError(f"model {model_dir.name!r}: {err} (NORMSERVE_VERSION_POLICY/_POLICIES)") from None
            self.models[model_dir.name] = {v: ServedModel(model_dir / v, model_dir.name, v) for v in served}
            self.left_out[model_dir.name] = sorted(set(on_disk) - set(served), key=int)
            if self.left_out[model_dir.name]:
                log.info(
                    "%s: version policy %s loads %s, leaves out %s",
                    model_dir.name,
                    policy,
                    served,
                    self.left_out[model_dir.name],
                )
        unknown = sorted(set(settings.version_policies) - set(self.models))
        if unknown:
            raise ValueError(
                f"NORMSERVE_VERSION_POLICIES names models {unknown} that are not in {root} (models: {sorted(self.models)})"
            )

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

    def index(self) -> list[tuple[str, str, ServedModel | None]]:
        """Every version on disk, by model name and version number: (name, version, the loaded
        model, or None when the version policy left it out)."""
        rows: list[tuple[str, str, ServedModel | None]] = []
        for name, versions in self.models.items():
            on_disk = sorted([*versions, *self.left_out[name]], key=int)
            rows += [(name, v, versions.get(v)) for v in on_disk]
        return rows

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
        if version in self.left_out[name]:
            raise ModelNotFound(
                f"model {name!r} version {version!r} is in the repository but not loaded: the version policy "
                f"{self.settings.policy_for(name)} loads {list(versions)}"
            )
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; available: {list(versions)}")
        return versions[version]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """A ready model version; 503 with the reason when it is not ready."""
        model = self.find(name, version)
        if not model.ready:
            raise ModelNotReady(f"model {model.key} is not ready: {model.reason or model.state.value}")
        return model
