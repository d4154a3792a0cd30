"""The model repository: finds `<root>/<model>/<version>/`, loads each version, answers lookups.

Server readiness is the readiness of its models. Which versions load is the version policy's
choice (service/versions.py); the newest loaded version serves requests that name no version.

In a server, `serve` starts every ready version (its batcher, service/model.py) and `drain_all`
stops them; from then on `swap` starts each version it adds before any request can find it, so a
version that is found takes requests. With `NORMSERVE_REPOSITORY_POLL_S` set, `service/poller.py`
rescans the folder while the server runs (Triton's poll mode) and uses `plan` and `swap` here to
load new or changed versions and to retire the ones that left; a version that fails to load then
never replaces one that serves.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from normserve.contract import CONFIG_FILE, MODEL_FILE
from normserve.service.cores import CoreLock
from normserve.service.errors import ModelNotFound, ModelNotReady
from normserve.service.model import Fingerprint, ModelState, Runtime, ServedModel
from normserve.service.settings import Settings

log = logging.getLogger("normserve.repository")


def fingerprint(version_dir: Path) -> Fingerprint:
    """Size and mtime of a version's files (-1 for a missing one): cheap to take on every rescan."""
    parts = []
    for name in (MODEL_FILE, CONFIG_FILE):
        try:
            st = (version_dir / name).stat()
            parts.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            parts.append((name, -1, -1))
    return tuple(parts)


def _model_dirs(root: Path) -> list[Path]:
    """The model folders: hidden ones, such as those `normserve export` builds a version in before
    renaming it into place, are skipped."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(root: Path) -> dict[str, dict[str, Fingerprint]]:
    """name -> version -> fingerprint of every numeric version folder."""
    found: dict[str, dict[str, Fingerprint]] = {}
    for model_dir in _model_dirs(root):
        versions = sorted(
            (v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()), key=lambda v: int(v.name)
        )
        if versions:
            found[model_dir.name] = {v.name: fingerprint(v) for v in versions}
    return found


@dataclass
class Plan:
    """What one model needs after a rescan: the versions to serve and which of them to load first."""

    name: str
    on_disk: dict[str, Fingerprint]
    wanted: list[str]  # versions to serve, ascending
    to_load: list[str]  # of those, new or rewritten since they were loaded
    loaded: dict[str, ServedModel] = field(default_factory=dict)  # filled by the poller as loads succeed


class ModelRepository:
    def __init__(self, root: Path, settings: Settings, cores: CoreLock | None = None) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"model repository {root.resolve()} does not exist (NORMSERVE_MODEL_REPOSITORY)")
        self.root = root
        self.settings = settings
        self.cores = cores  # the server's lock around runs on the CPU (service/cores.py); None: no wide runs
        # name -> version -> model, the versions the policy loads, in ascending order
        self.models: dict[str, dict[str, ServedModel]] = {}
        self.left_out: dict[str, list[str]] = {}  # name -> versions on disk that are not loaded
        # (name, version) -> (fingerprint, reason) of a version that failed to load while polling;
        # it is not served, and is tried again once its files change
        self.failed: dict[tuple[str, str], tuple[Fingerprint, str]] = {}
        self.runtime: Runtime | None = None  # set by `serve`: the versions it adds take requests
        found = scan(root)
        for model_dir in _model_dirs(root):
            if model_dir.name not in found:
                log.warning("%s has no numeric version folders; skipped", model_dir)
        for name, on_disk in found.items():
            policy = settings.policy_for(name)
            try:
                served = policy.select(list(on_disk))
            except ValueError as err:
                raise ValueError(f"model {name!r}: {err} (NORMSERVE_VERSION_POLICY/_POLICIES)") from None
            self.models[name] = {v: self.new_model(name, v, on_disk[v]) for v in served}
            self.left_out[name] = [v for v in on_disk if v not in served]
            if self.left_out[name]:
                log.info("%s: version policy %s loads %s, leaves out %s", name, policy, served, self.left_out[name])
        for route, name in (("/classify, /features", settings.classifier), ("/reconstruct", settings.denoiser)):
            if name not in self.models:
                log.warning("%s: model %r is not in %s; those routes answer 404", route, name, root)
        unknown = sorted(set(settings.version_policies) - set(self.models))
        if unknown:
            raise ValueError(
                f"NORMSERVE_VERSION_POLICIES names models {unknown} that are not in {root} (models: {sorted(self.models)})"
            )

    def new_model(self, name: str, version: str, files: Fingerprint) -> ServedModel:
        """A version found on disk with these files, not loaded yet."""
        model = ServedModel(self.root / name / version, name, version)
        model.fingerprint = files
        return model

    def load_all(self) -> None:
        for model in self.all():
            self.load(model)

    def load(self, model: ServedModel) -> None:
        """Load one version (blocking); a failure leaves it UNAVAILABLE with the reason."""
        if not (model.directory / MODEL_FILE).exists():
            model.state = ModelState.UNAVAILABLE
            model.reason = f"no {MODEL_FILE} in {model.key}"  # not the server's path: answered to anyone
            log.error("%s: no %s in %s", model.key, MODEL_FILE, model.directory)
            return
        model.load(self.settings, self.cores)

    def serve(self, runtime: Runtime) -> None:
        """Start every ready version (its batcher); versions `swap` adds from now on start too."""
        self.runtime = runtime
        for model in self.all():
            model.start(runtime)

    async def drain_all(self) -> None:
        """Every version runs what it has queued, and takes no more requests."""
        await asyncio.gather(*(m.drain() for m in self.all()))

    def stop_all(self) -> None:
        for model in self.all():
            model.stop()

    def all(self) -> list[ServedModel]:
        return [m for name in sorted(self.models) for m in self.models[name].values()]

    # -- polling (service/poller.py) -------------------------------------------------------------
    def plan(self, name: str, on_disk: dict[str, Fingerprint]) -> Plan:
        """The versions of `name` to serve given what is on disk: the policy's choice among the
        versions that are loaded or may load. A version whose current files already failed to
        load is no candidate, unless it is loaded (its older files keep serving)."""
        current = self.models.get(name, {})

        def failed_now(v: str) -> bool:
            failure = self.failed.get((name, v))
            return failure is not None and failure[0] == on_disk[v]

        candidates = [v for v in on_disk if (v in current and current[v].ready) or not failed_now(v)]
        wanted = self.settings.policy_for(name).select(candidates, strict=False)
        to_load = [
            v for v in wanted if not failed_now(v) and (v not in current or current[v].fingerprint != on_disk[v])
        ]
        return Plan(name, on_disk, wanted, to_load)

    def swap(self, plan: Plan) -> tuple[list[ServedModel], list[ServedModel]]:
        """Serve `plan.wanted` from now on: the versions loaded for the plan replace or join the
        current ones. Returns (models now served that were not before, models no longer served).
        Runs on the event loop with no await inside, so a request sees the old set or the new one;
        after `serve`, each added version is started first. The retired ones are left to the caller
        to drain and stop."""
        name, current = plan.name, self.models.get(plan.name, {})
        served: dict[str, ServedModel] = {}
        for v in plan.wanted:
            if v in plan.loaded:
                served[v] = plan.loaded[v]
                self.failed.pop((name, v), None)
            elif v in current:
                served[v] = current[v]
        added = [m for v, m in served.items() if current.get(v) is not m]
        retired = [m for v, m in current.items() if served.get(v) is not m]
        if self.runtime is not None:
            for model in added:
                model.start(self.runtime)
        if served or plan.on_disk:
            self.models[name] = served
            self.left_out[name] = [v for v in plan.on_disk if v not in served]
        else:
            self.models.pop(name, None)
            self.left_out.pop(name, None)
        for key in [k for k in self.failed if k[0] == name and k[1] not in plan.on_disk]:
            del self.failed[key]  # its folder is gone
        return added, retired

    # -- lookups ---------------------------------------------------------------------------------
    def index(self) -> list[tuple[str, str, ServedModel | None, str]]:
        """Every version on disk, by model name and version number: (name, version, the loaded
        model or None, why it is not loaded)."""
        rows: list[tuple[str, str, ServedModel | None, str]] = []
        for name in sorted(self.models):
            versions = self.models[name]
            for v in sorted([*versions, *self.left_out.get(name, [])], key=int):
                model = versions.get(v)
                rows.append((name, v, model, "" if model is not None else self._not_loaded(name, v)))
        return rows

    def _not_loaded(self, name: str, version: str) -> str:
        failure = self.failed.get((name, version))
        if failure is not None:
            return f"not loaded: {failure[1]}"
        return f"not loaded: version policy {self.settings.policy_for(name)}"

    def ready(self) -> bool:
        """Every loaded version is ready (strict readiness, Triton's default), or at least one is;
        either way each model behind the image routes (NORMSERVE_CLASSIFIER, _DENOISER) that is in
        the repository has a ready version, so a ready server answers every route it serves."""
        models = self.all()
        if not models:
            return False
        if self.settings.strict_readiness:
            return all(m.ready for m in models)
        routed = [n for n in (self.settings.classifier, self.settings.denoiser) if n in self.models]
        return any(m.ready for m in models) and all(self.serving(n) for n in routed)

    def serving(self, name: str) -> bool:
        """Some version of `name` is ready."""
        return any(m.ready for m in self.models.get(name, {}).values())

    def find(self, name: str, version: str | None = None) -> ServedModel:
        """The model version, ready or not; 404 when there is no such model or version."""
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFound(
                f"model {name!r} not found; available: {sorted(n for n, v in self.models.items() if v)}"
            )
        if version is None:  # the newest ready version; none ready: the newest (get() says why)
            ready = [v for v, m in versions.items() if m.ready]
            return versions[max(ready or versions, key=int)]
        model = versions.get(version)
        if model is not None:
            return model
        if version in self.left_out.get(name, []):
            raise ModelNotFound(
                f"model {name!r} version {version!r} is in the repository but {self._not_loaded(name, version)}; "
                f"loaded: {list(versions)}"
            )
        raise ModelNotFound(f"model {name!r} has no version {version!r}; available: {list(versions)}")

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """A ready model version; 503 with the reason when it is not ready."""
        model = self.find(name, version)
        if not model.ready:
            raise ModelNotReady(f"model {model.key} is not ready: {model.reason or model.state.value}")
        return model
