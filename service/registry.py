"""Which variants are served, and their health.

At start and on every reload the registry resolves each model's target version (latest complete
one, or the pinned one), reads the artifact, checks its digest and loads those very bytes. A model
that fails (missing or corrupt artifact, ONNX Runtime refusing the file, a cascade stage that won't
load) is reported with its reason while every other model serves; if an older version was
serving, it keeps serving and stays ready (its status names the failed update).

Readiness reflects what serves: with ``strict_readiness`` the server is ready when every model has
a version serving, otherwise when at least one has. Folders in the store that hold no published
version (``lost+found``, a model whose first publish crashed) are not models and are skipped,
unless ``models`` names them.

Runners (session + batcher) are keyed by ``name:version`` and shared: a cascade's stages use the
same runners as the members served on their own. Requests lease the runners they use (see
``variants.leased``); a replaced runner is closed once its last lease is returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from model_store import Kind, Manifest, ModelRef, ModelStore, StoreError

from .batcher import DynamicBatcher
from .config import Settings
from .errors import ModelNotReady, NotFound
from .metrics import ServiceMetrics
from .runtime import load_runtime
from .variants import Cascade, Runner, SingleModel, Variant

log = logging.getLogger("committee.registry")


@dataclass
class ModelStatus:
    name: str
    version: int | None  # the version being served (None: nothing serves yet)
    target: int | None  # the version the store/pins ask for
    ready: bool  # a version of it serves
    reason: str | None = None  # why nothing serves, or why the target version is not the one serving
    kind: str | None = None
    loaded_at: float | None = None


@dataclass(frozen=True)
class ReloadReport:
    loaded: list[str]
    failed: dict[str, str]
    removed: list[str]
    unchanged: list[str]


class Registry:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.store = ModelStore(settings.store)
        self.metrics = metrics
        self._served: dict[str, Variant] = {}
        self._status: dict[str, ModelStatus] = {}
        self._runners: dict[str, Runner] = {}
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task, Runner] = {}

    # ---- lookups (hot path: dict access only) -------------------------------------------------
    def get(self, name: str, version: int | None = None) -> Variant:
        variant = self._served.get(name)
        if variant is None:
            status = self._status.get(name)
            if status is None:
                raise NotFound(f"model {name!r} is not served here; GET /v1/models lists the models")
            raise ModelNotReady(f"model {name!r} is not ready: {status.reason}")
        if version is not None and version != variant.manifest.version:
            raise NotFound(f"model {name!r} version {version} is not served (serving version {variant.manifest.version})")
        return variant

    def statuses(self) -> list[ModelStatus]:
        return [self._status[n] for n in sorted(self._status)]

    def status(self, name: str) -> ModelStatus:
        try:
            return self._status[name]
        except KeyError:
            raise NotFound(f"model {name!r} is not served here; GET /v1/models lists the models") from None

    def served(self) -> list[Variant]:
        return [self._served[n] for n in sorted(self._served)]

    @property
    def ready(self) -> bool:
        serving = [s.ready for s in self._status.values()]
        if self.settings.strict_readiness:
            return bool(serving) and all(serving)
        return any(serving)

    # ---- loading ------------------------------------------------------------------------------
    def _targets(self) -> dict[str, int | None]:
        named = bool(self.settings.models)
        targets: dict[str, int | None] = {}
        for name in self.settings.models or self.store.names():
            versions = self.store.versions(name)
            pinned = self.settings.pins.get(name)
            if not versions and pinned is None and not named:
                log.info("skipping %s in the store: it holds no published version", name)
                continue
            targets[name] = pinned if pinned is not None else (versions[-1] if versions else None)
        return targets

    async def reload(self) -> ReloadReport:
        async with self._lock:
            targets = await asyncio.to_thread(self._targets)
            loaded, failed, unchanged = [], {}, []
            for name, version in targets.items():
                current = self._served.get(name)
                if current is not None and current.manifest.version == version:
                    unchanged.append(name)
                    continue
                try:
                    if version is None:
                        raise StoreError(f"no complete version of {name!r} in the store")
                    variant = await self._load_variant(ModelRef(name=name, version=version))
                except Exception as exc:  # any failure is this model's alone: report it, serve the rest
                    reason = f"version {version} failed to load: {exc}"
                    log.error("model %s %s", name, reason)
                    self.metrics.model_load_failures.labels(name).inc()
                    failed[name] = reason
                    self._set_status(name, current, version, reason)
                    continue
                self._served[name] = variant
                loaded.append(f"{name}:{version}")
                self._set_status(name, variant, version, None)
                if current is not None:
                    self.metrics.model_ready.labels(name, str(current.manifest.version)).set(0)
            removed = [n for n in list(self._status) if n not in targets]
            for name in removed:
                self._served.pop(name, None)
                self._status.pop(name)
            self._retire_unused()
            return ReloadReport(loaded, failed, removed, unchanged)

    def _set_status(self, name: str, variant: Variant | None, target: int | None, reason: str | None) -> None:
        ready = variant is not None
        previous = self._status.get(name)
        self._status[name] = ModelStatus(
            name=name, version=variant.manifest.version if variant else None, target=target, ready=ready,
            reason=reason, kind=variant.manifest.kind.value if variant else None,
            loaded_at=time.time() if ready else (previous.loaded_at if previous else None),
        )
        if variant is not None:
            self.metrics.model_ready.labels(name, str(variant.manifest.version)).set(1)

    async def _load_variant(self, ref: ModelRef) -> Variant:
        manifest = await asyncio.to_thread(self.store.resolve, ref.name, ref.version)
        if manifest.kind is Kind.CASCADE:
            stages = [await self._runner(stage.model) for stage in manifest.composition.stages]
            if {tuple(r.manifest.labels) for r in stages} != {tuple(manifest.labels)}:
                raise StoreError(f"cascade {ref} and its stages disagree on class labels")
            if any(r.manifest.input != manifest.input for r in stages):
                # one request's rows go to every stage: they must all take the same input
                raise StoreError(f"cascade {ref} and its stages disagree on the input spec")
            return Cascade(manifest, stages)
        return SingleModel(await self._runner(ref, manifest))

    async def _runner(self, ref: ModelRef, manifest: Manifest | None = None) -> Runner:
        key = str(ref)
        if key in self._runners:
            return self._runners[key]
        if manifest is None:
            manifest = await asyncio.to_thread(self.store.resolve, ref.name, ref.version)
        if manifest.io is None:
            raise StoreError(f"{ref} has no ONNX graph to run")
        model = await asyncio.to_thread(self.store.read_artifact, manifest)
        runtime = await asyncio.to_thread(load_runtime, model, manifest.io.input_name, manifest.io.output_names, self.settings, key)
        s = self.settings
        batcher = DynamicBatcher(
            runtime.run, max_batch_size=s.max_batch_size, max_queue_delay_s=s.max_queue_delay_ms / 1000,
            max_queue_size=max(s.max_queue_size, s.max_batch_size), max_queue_wait_s=s.max_queue_wait_ms / 1000,
            instances=s.instances, name=key, observer=self.metrics.observer(key),
        )
        spec = manifest.input
        try:
            await batcher.warm_up(np.zeros((1, spec.channels, spec.height, spec.width), np.float32))
        except Exception as exc:
            await batcher.close()
            raise StoreError(f"{ref} failed its warm-up batch of {s.max_batch_size} images: {type(exc).__name__}") from exc
        runner = Runner(manifest, runtime, batcher)
        self._runners[key] = runner
        return runner

    def _retire_unused(self) -> None:
        in_use = {r.key for variant in self._served.values() for r in variant.runners}
        for key in [k for k in self._runners if k not in in_use]:
            runner = self._runners.pop(key)
            task = asyncio.get_running_loop().create_task(self._retire(runner))
            self._retiring[task] = runner
            task.add_done_callback(lambda t: self._retiring.pop(t, None))

    @staticmethod
    async def _retire(runner: Runner) -> None:
        await runner.idle()  # requests that already hold the old runner finish on it
        await runner.batcher.close()
        log.info("retired %s", runner.key)

    async def close(self) -> None:
        """Drain every batcher (queued work finishes), then stop."""
        retiring = list(self._retiring.items())
        for task, _ in retiring:
            task.cancel()
        runners = [*self._runners.values(), *(runner for _, runner in retiring)]
        await asyncio.gather(*(r.batcher.close() for r in runners), return_exceptions=True)
        self._runners.clear()
        self._served.clear()
