"""Repository polling: new, rewritten and removed model versions are picked up while the server
runs (Triton's `--model-control-mode=poll`), every `NORMSERVE_REPOSITORY_POLL_S` seconds.

Each rescan, per model (`ModelRepository.plan`): the version policy chooses among the versions on
disk; new versions, and loaded ones whose `model.onnx` or `config.json` changed (size or mtime),
load and warm up off the event loop while the old ones keep serving. Then, in one step on the
event loop (`ModelRepository.swap`), the new set serves: each new version is started (its
batcher) before any request can find it, and a version that left (its folder removed, or pushed
out of `latest:N`) stops taking requests, runs what it had queued, and unloads.

A version that fails to load never replaces one that serves: it is listed in
`POST /v2/repository/index` as UNAVAILABLE with the reason, does not count for readiness, and is
tried again when its files change. `normserve export` builds a version in a hidden folder and
renames it into place, so a rescan never sees half of one.

Every worker process polls on its own, so workers agree within one interval.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi.concurrency import run_in_threadpool

from normserve.service.metrics import Metrics
from normserve.service.model import ServedModel
from normserve.service.repository import ModelRepository, Plan, scan
from normserve.service.settings import Settings

log = logging.getLogger("normserve.poller")


class RepositoryPoller:
    def __init__(self, repository: ModelRepository, metrics: Metrics, settings: Settings) -> None:
        self.repository = repository
        self.metrics = metrics
        self.settings = settings
        self.polls = 0  # completed rescans (tests wait on it)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.poll()
            except Exception:  # a rescan must never end the polling, nor the server
                log.exception("repository poll failed")

    async def poll(self) -> None:
        """One rescan: load what is new or rewritten, then swap each model's served set."""
        repo = self.repository
        on_disk = await run_in_threadpool(scan, repo.root)
        for name in sorted(set(on_disk) | set(repo.models)):
            versions = on_disk.get(name, {})
            plan = repo.plan(name, versions)
            loaded: dict[str, ServedModel] = {}
            # Each round loads every pending version or records its failure (after which the plan
            # no longer asks for it, and may fall back to another version), so the loop ends.
            while pending := [v for v in plan.to_load if v not in loaded]:
                for version in pending:
                    model = repo.new_model(name, version, versions[version])
                    log.info("%s: loading (new or changed on disk)", model.key)
                    await run_in_threadpool(repo.load, model)
                    if model.ready:
                        loaded[version] = model
                    else:
                        repo.failed[name, version] = (versions[version], model.reason)
                        log.error("%s: not served: %s", model.key, model.reason)
                plan = repo.plan(name, versions)
            plan.loaded = {v: m for v, m in loaded.items() if v in plan.wanted}
            for version, model in loaded.items():
                if version not in plan.wanted:
                    model.stop()  # loaded, but a failure meanwhile changed what the policy serves
            await self._swap(plan)
        self.polls += 1

    async def _swap(self, plan: Plan) -> None:
        added, retired = self.repository.swap(plan)  # the added versions are started: they take requests
        for m in added:
            self.metrics.model_ready.labels(m.name, m.version, m.provider or "none").set(1)
        for m in retired:
            if m.key not in {a.key for a in added}:  # not replaced by a reload of the same version
                self.metrics.model_ready.labels(m.name, m.version, m.provider or "none").set(0)
        if added or retired:
            log.info(
                "%s: now serving %s (loaded %s, retired %s)",
                plan.name,
                list(self.repository.models.get(plan.name, {})),
                [m.version for m in added],
                [m.version for m in retired],
            )
        # Run what each had queued; shielded, so a shutdown that cancels the poller does not cancel that.
        await asyncio.shield(asyncio.gather(*(m.drain() for m in retired)))
        for m in retired:
            m.stop()
