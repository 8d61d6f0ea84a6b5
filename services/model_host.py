"""Models of one kind, each served through its own DevicePool behind a DynamicBatcher.

The serving core provides the parts (ModelStore, runtimes, DevicePool, DynamicBatcher);
this module wires them per model version so that every entry point of a service
(domain RPCs, the KServe v2 endpoint, in-process pipelines used by generation or the
CLI) shares one batcher per model: requests from all of them merge into the same
batches and obey the same queue limits.

A ModelHost serves the models of the kinds it is given (the refinement service hosts
"refiner" models, the rendering service "renderer" models). Latest versions are loaded
at start-up so readiness means "can answer now"; an older version asked for by number
is loaded on first use. Unknown names, versions or kinds raise ModelNotFoundError listing
what the host can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.core import metrics
from services.core.config import ServerConfig
from services.core.device_pool import DevicePool
from services.core.dynamic_batcher import BatcherConfig, DynamicBatcher
from services.core.errors import HistosynthError, ModelNotFoundError, UnavailableError
from services.core.memory import MemoryBudget, MemoryBudgetExceededError, MemoryModel, budget_from_setting, memory_model_for, spatial_size
from services.core.model_store import MANIFEST_FILE, ManifestError, ModelManifest, ModelStore, parse_manifest
from services.core.runtimes.base import RuntimeOptions
from services.core.runtimes.registry import create_runtime
from services.core.runtimes.selection import RuntimeSelection, require_precision_check

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostSettings:
    """How each hosted model is run; see ServerConfig for what each field means."""

    devices: tuple[str, ...] = ("cpu",)
    instances_per_device: int = 1
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256
    # Send a request at once when its model computes nothing (HISTOSYNTH_DISPATCH_WHEN_IDLE).
    dispatch_when_idle: bool = True
    runtime_options: RuntimeOptions = RuntimeOptions()
    # A runtime call slower than this marks its instance unhealthy (DevicePool); None = never.
    instance_timeout_s: float | None = 120.0
    # Per-process memory budget for request working memory (HISTOSYNTH_MEMORY_BUDGET); None = the default.
    memory_budget: str | None = None
    # A model that cannot serve as configured makes the server NOT_SERVING (HISTOSYNTH_STRICT_MODELS).
    strict_models: bool = True
    # Engine and precision per model (HISTOSYNTH_RUNTIME / HISTOSYNTH_PRECISION, manifest metadata.serving).
    selection: RuntimeSelection = RuntimeSelection()
    # Refuse a reduced precision without a passing check (selection.py). Only the precision check tool,
    # which produces those checks, turns this off.
    require_precision_checks: bool = True

    @classmethod
    def from_server_config(cls, config: ServerConfig) -> HostSettings:
        return cls(
            devices=config.devices,
            instances_per_device=config.instances_per_device,
            max_batch_size=config.max_batch_size,
            max_queue_delay_ms=config.max_queue_delay_ms,
            max_queue_size=config.max_queue_size,
            dispatch_when_idle=config.dispatch_when_idle,
            runtime_options=config.runtime_options(),
            memory_budget=config.memory_budget,
            strict_models=config.strict_models,
            selection=RuntimeSelection.from_settings(config.runtime, config.precision),
        )


@dataclass(frozen=True)
class ModelRef:
    """Which exact model produced an output (travels into provenance)."""

    name: str
    version: str
    sha256: str


class ServedModel:
    """One model version: its manifest, its runtime instances and its batcher."""

    def __init__(
        self,
        manifest: ModelManifest,
        pool: DevicePool,
        batcher: DynamicBatcher,
        memory: MemoryModel | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.manifest = manifest
        self.pool = pool
        self.batcher = batcher
        self.memory = memory_model_for(manifest) if memory is None else memory
        self.budget = MemoryBudget() if budget is None else budget

    def estimate(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Estimated working memory of running ``feeds``: the model's memory model plus the tensors themselves."""
        rows = _batch_rows(feeds)
        height, width = max((spatial_size(array.shape) for array in feeds.values()), key=lambda hw: hw[0] * hw[1])
        tensors = sum(array.nbytes for array in feeds.values())
        return self.memory.estimate(rows, height, width) + 2 * tensors

    def check_row_fits(self, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """RESOURCE_EXHAUSTED when one row of inputs of these shapes ([N, ...] each) could never fit the memory
        budget, judged from shapes alone: callers check before they build large input tensors, not after."""
        one_row = {name: np.broadcast_to(np.zeros((), dtype), (1, *shape[1:])) for name, (shape, dtype) in shapes.items()}
        self.budget.check(self.estimate(one_row), self.describe_call(one_row))

    def describe_call(self, feeds: Mapping[str, np.ndarray]) -> str:
        rows = _batch_rows(feeds)
        height, width = max((spatial_size(array.shape) for array in feeds.values()), key=lambda hw: hw[0] * hw[1])
        return f"model {self.manifest.key} on {rows} row(s) of {height} x {width}"

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.manifest.name, self.manifest.version, self.manifest.sha256)

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self.manifest.metadata

    @property
    def max_batch_size(self) -> int:
        return self.batcher.config.max_batch_size

    async def infer(self, feeds: Mapping[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        """Run ``feeds`` (batch on axis 0) through the batcher; outputs keep the input's row order.

        More rows than the batcher's max_batch_size are sent as several requests at once and
        joined again; runtimes here give the same bits for a sample whatever batch it is in
        (see tests/integration/test_determinism.py), so splitting never changes results.
        ``deadline`` is absolute ``time.monotonic()`` seconds, or None.
        """
        rows = _batch_rows(feeds)
        # Admission: a call's estimated working memory is held against the process budget while it waits
        # and runs. Rows that do not fit together run in consecutive groups that do; a call whose single
        # row does not fit, or that does not fit beside the calls in flight, is RESOURCE_EXHAUSTED.
        group = rows
        if rows > 1 and self.estimate(feeds) > self.budget.limit:
            one_row = {name: array[:1] for name, array in feeds.items()}
            group = max(1, int(self.budget.limit // max(1, self.estimate(one_row))))
        if group >= rows:
            return await self._admitted(feeds, deadline)
        parts = [
            await self._admitted({name: array[start:start + group] for name, array in feeds.items()}, deadline)
            for start in range(0, rows, group)
        ]
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}

    async def _admitted(self, feeds: Mapping[str, np.ndarray], deadline: float | None) -> dict[str, np.ndarray]:
        try:
            reservation = self.budget.reserve(self.estimate(feeds), self.describe_call(feeds))
            reservation.__enter__()
        except MemoryBudgetExceededError:
            metrics.MEMORY_REFUSED.labels(self.manifest.name).inc()
            raise
        with contextlib.ExitStack() as held:
            held.push(reservation)
            rows = _batch_rows(feeds)
            limit = self.max_batch_size
            if rows <= limit:
                return await self.batcher.submit(feeds, deadline=deadline)
            chunks = [
                {name: array[start:start + limit] for name, array in feeds.items()}
                for start in range(0, rows, limit)
            ]
            parts = await asyncio.gather(*(self.batcher.submit(chunk, deadline=deadline) for chunk in chunks))
            return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}

    async def close(self, drain: bool = True) -> None:
        await self.batcher.stop(drain=drain)
        await asyncio.to_thread(self.pool.close)


def _device_kind(device: str) -> str:
    return device.split(":", 1)[0].lower()


def _batch_rows(feeds: Mapping[str, np.ndarray]) -> int:
    sizes = {array.shape[0] for array in feeds.values() if array.ndim > 0}
    return max(sizes) if sizes else 0


class ModelHost:
    """Loads, batches and serves the models of ``kinds`` found in ``store``.

    Use ``await host.start()`` (loads every latest version) and ``await host.stop()``.
    """

    def __init__(
        self,
        store: ModelStore,
        kinds: Collection[str],
        settings: HostSettings = HostSettings(),
        *,
        names: Collection[str] | None = None,
    ) -> None:
        if not kinds:
            raise ValueError("kinds must name at least one model kind")
        self.store = store
        self.kinds = frozenset(kinds)
        self.settings = settings
        self._only_names = None if names is None else frozenset(names)
        self._models: dict[tuple[str, str], ServedModel] = {}
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}
        self._hosted: list[str] | None = None  # cached model_names(); refreshed on a miss
        # "name/version" -> why it failed to load; such a model is UNAVAILABLE, the others still serve.
        self.load_errors: dict[str, str] = {}
        # "name/version" -> why it does not serve as configured (checksum, load failure, device fallback).
        self.readiness_problems: dict[str, str] = {}
        self.memory = budget_from_setting(settings.memory_budget)
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------- catalogue
    def model_names(self, refresh: bool = False) -> list[str]:
        """Names of the store's models whose latest manifest has one of this host's kinds.

        Cached after the first scan; ``refresh`` rescans the store (done on a lookup miss,
        so a model copied into the store later is found without a restart).
        """
        if self._hosted is not None and not refresh:
            return list(self._hosted)
        names = []
        for name in self.store.list_models():
            if self._only_names is not None and name not in self._only_names:
                continue
            try:
                manifest = self._latest_manifest(name)
            except HistosynthError as error:
                # Unreadable manifest: its kind is unknown, so no host can serve it; say so once.
                if self.load_errors.get(name) != error.message:
                    _log.error("skipping model %r: %s", name, error.message)
                self.load_errors[name] = error.message
                continue
            self.load_errors.pop(name, None)
            if manifest.kind in self.kinds:
                names.append(name)
        self._hosted = names
        return list(names)

    def latest_manifest(self, name: str) -> ModelManifest:
        """The latest version's manifest of a model in the store (what it is, before it is loaded)."""
        return self._latest_manifest(name)

    def _latest_manifest(self, name: str) -> ModelManifest:
        """The latest version's manifest, parsed but not checksummed (that happens at load)."""
        latest = self.store.versions(name)[-1]
        loaded = self._models.get((name, latest))
        if loaded is not None:
            return loaded.manifest
        return parse_manifest(self.store.root / name / latest / MANIFEST_FILE)

    def versions(self, name: str) -> list[str]:
        """Versions of a hosted model, ascending; ModelNotFoundError when it is not hosted here."""
        if name not in self.model_names() and name not in self.model_names(refresh=True):
            raise ModelNotFoundError(name, None, self.model_names())
        return self.store.versions(name)

    def loaded(self) -> list[ServedModel]:
        """Models loaded right now, sorted by name then version."""
        return [self._models[key] for key in sorted(self._models, key=lambda key: (key[0], int(key[1])))]

    def is_ready(self, name: str, version: str | None = None) -> bool:
        try:
            version = version or self.store.versions(name)[-1]
        except HistosynthError:
            return False
        return (name, version) in self._models

    # ------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load the latest version of every hosted model (blocking loads run in a thread).

        A model that fails to load (bad file, checksum, runtime) is logged and recorded in
        ``load_errors``; it stays unavailable while the others serve (as in Triton). Requests
        for it retry the load and fail with the load error until it is fixed.
        """
        if self._started:
            raise RuntimeError("ModelHost is already started")
        self._started = True
        for name in self.model_names(refresh=True):
            try:
                await self.get(name)
            except HistosynthError as error:
                _log.error("model %r failed to load and is unavailable: %s", name, error.message)
                reason = getattr(error, "reason", "load_failed")
                self._not_serving(name, "checksum_mismatch" if reason == "checksum_mismatch" else "load_failed",
                                  error.message)
        # Manifests no host could even parse are the operator's problem too.
        for name, message in list(self.load_errors.items()):
            if "/" not in name and name not in self.readiness_problems:
                self._not_serving(name, "load_failed", message)
        for model in self.loaded():
            fallen = [info for info in model.pool.instances if _device_kind(info.device) != _device_kind(info.requested_device)]
            if fallen:
                self._not_serving(
                    model.manifest.key, "device_fallback",
                    "; ".join(f"requested {info.requested_device}, running on {info.device} ({info.provider})"
                              for info in fallen),
                )
        _log.info("model host ready: %s", [model.manifest.key for model in self.loaded()])

    def _not_serving(self, key: str, reason: str, message: str) -> None:
        self.readiness_problems[key] = f"{reason}: {message}"
        metrics.MODEL_NOT_SERVING.labels(key.split("/")[0], reason).inc()
        _log.error(
            "model %s cannot serve as configured (%s): %s%s",
            key, reason, message,
            "" if self.settings.strict_models else "; serving anyway (HISTOSYNTH_STRICT_MODELS=0)",
            extra={"model": key, "reason": reason},
        )

    @property
    def serving(self) -> bool:
        """False when a model cannot serve as configured and the operator did not opt out (strict_models)."""
        return not (self.settings.strict_models and self.readiness_problems)

    async def stop(self, drain: bool = True) -> None:
        """Stop every batcher (draining accepted work when ``drain``) and close the runtimes."""
        self._stopped = True
        models, self._models = list(self._models.values()), {}
        await asyncio.gather(*(model.close(drain=drain) for model in models), return_exceptions=True)

    async def __aenter__(self) -> ModelHost:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -------------------------------------------------------------------- lookup
    async def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name`` at ``version`` (latest when None or empty), loading it if needed."""
        if self._stopped:
            raise UnavailableError("the model host is shutting down; retry against another replica")
        if name not in self.model_names() and name not in self.model_names(refresh=True):
            raise ModelNotFoundError(name, version or None, self.model_names())
        versions = self.store.versions(name)
        chosen = version or versions[-1]
        if chosen not in versions:
            raise ModelNotFoundError(name, chosen, [f"{name}/{known}" for known in versions])
        key = (name, chosen)
        model = self._models.get(key)
        if model is not None:
            return model
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            model = self._models.get(key)
            if model is None:
                try:
                    model = await self._load(name, chosen)
                except HistosynthError as error:
                    self.load_errors[f"{name}/{chosen}"] = error.message
                    raise
                self.load_errors.pop(f"{name}/{chosen}", None)
                self._models[key] = model
        return model

    async def _load(self, name: str, version: str) -> ServedModel:
        manifest = await asyncio.to_thread(self.store.get, name, version)
        if manifest.kind not in self.kinds:
            raise ModelNotFoundError(name, version, self.model_names())
        settings = self.settings
        engine, precision = settings.selection.resolve(manifest)
        if settings.require_precision_checks:
            require_precision_check(manifest, engine, precision)
        options = dataclasses.replace(settings.runtime_options, runtime=engine, precision=precision) \
            if manifest.format == "onnx" else dataclasses.replace(settings.runtime_options, precision=precision)

        def factory(device: str):  # noqa: ANN202 - DevicePool's RuntimeFactory
            return create_runtime(manifest, device, options)

        pool = await asyncio.to_thread(
            DevicePool,
            factory,
            settings.devices,
            settings.instances_per_device,
            instance_timeout_s=settings.instance_timeout_s,
            model_name=manifest.name,
            model_version=manifest.version,
        )
        batcher = DynamicBatcher(
            pool.infer,
            BatcherConfig(
                max_batch_size=max(1, min(settings.max_batch_size, manifest.max_batch_size)),
                max_queue_delay_ms=settings.max_queue_delay_ms,
                max_queue_size=settings.max_queue_size,
                max_concurrent_batches=pool.instance_count,
                dispatch_when_idle=settings.dispatch_when_idle,
            ),
            manifest.name,
            manifest.version,
        )
        await batcher.start()
        _log.info(
            "loaded model %s on %s",
            manifest.key,
            ", ".join(f"{info.device}({info.provider})" for info in pool.instances),
        )
        try:
            memory = memory_model_for(manifest)
        except ValueError as error:
            await batcher.stop(drain=False)
            await asyncio.to_thread(pool.close)
            raise ManifestError(str(error)) from None
        return ServedModel(manifest, pool, batcher, memory, self.memory)


def required_multiple(value: Any, default: int) -> int:
    """A positive int from manifest metadata (e.g. ``size_multiple``), or ``default`` when absent."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def ceil_to_multiple(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)
