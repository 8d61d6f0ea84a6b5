"""Diffusion models of a ModelHost as rendering / mask-generation pipelines (numpy + ONNX Runtime).

  * render: class maps (+ instance maps) -> condition (one-hot classes + instance edges, per the
    manifest) -> one engine sample per field (seed + i) -> uint8 RGB, like RenderingPipeline;
  * generate_nuclei_masks: nucleus types (multi-hot) -> mask generator samples -> decode.py ->
    class maps + instance maps, so a client can make a mask and then its image with no input.

One DiffusionEngine per served model version, created on first use over that model's DevicePool,
so every entry point (gRPC, generation, CLI) shares its step-level batching.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.config import ServerConfig
from services.core.errors import InvalidInputError
from services.core.model_store import ManifestError
from services.diffusion.decode import decode_mask_sample
from services.diffusion.engine import DiffusionEngine, EngineConfig, SamplingParams
from services.diffusion.schedulers import SCHEDULERS
from services.diffusion.spec import ROLE_IMAGE_RENDERER, ROLE_MASK_GENERATOR, DiffusionSpec
from services.model_host import ModelHost, ModelRef, ServedModel

DENOISER_KIND = "denoiser"
# Diffusion runs the denoiser steps x (1 + CFG) times per image: bound the work one request can ask for.
MAX_PIXELS_PER_IMAGE = 512 * 512
MAX_PIXELS_PER_REQUEST = 16 * 256 * 256
MAX_MASKS_PER_REQUEST = 64


@dataclass(frozen=True)
class DiffusionOptions:
    """What a caller may choose; None = the model's manifest default."""

    steps: int | None = None
    scheduler: str | None = None
    guidance_scale: float | None = None

    def params(self, spec: DiffusionSpec, seed: int) -> SamplingParams:
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise InvalidInputError(f"scheduler {self.scheduler!r} is unknown; valid: {', '.join(SCHEDULERS)}")
        return SamplingParams(
            steps=spec.default_steps if self.steps is None else self.steps,
            scheduler=spec.default_scheduler if self.scheduler is None else self.scheduler,
            guidance_scale=spec.default_guidance_scale if self.guidance_scale is None else self.guidance_scale,
            seed=seed,
        )


@dataclass(frozen=True)
class DiffusionSettings:
    """Engine policy for every diffusion model of a host (HISTOSYNTH_DIFFUSION_* in ServerConfig)."""

    step_batching: bool = True
    max_rows: int | None = None  # None = each manifest's max_batch_size
    max_active: int = 32
    max_queue: int = 256

    @classmethod
    def from_server_config(cls, config: ServerConfig) -> DiffusionSettings:
        return cls(
            step_batching=config.diffusion_step_batching,
            max_rows=config.diffusion_max_rows,
            max_active=config.diffusion_max_active,
            max_queue=config.max_queue_size,
        )

    def engine_config(self, manifest_max_batch_size: int) -> EngineConfig:
        # The manifest's limit usually reflects device memory: a setting may lower it, never raise it.
        rows = manifest_max_batch_size if self.max_rows is None else min(self.max_rows, manifest_max_batch_size)
        return EngineConfig(self.step_batching, rows, self.max_active, self.max_queue)


@dataclass(frozen=True)
class MaskGenerationResult:
    """uint8 class maps [N, H, W] (ids name ``class_names``), int32 instance maps [N, H, W], the model."""

    class_maps: np.ndarray
    instance_maps: np.ndarray
    model: ModelRef
    class_names: tuple[str, ...]


class DiffusionPipeline:
    def __init__(self, host: ModelHost, settings: DiffusionSettings = DiffusionSettings()) -> None:
        self.host = host
        self.settings = settings
        self._engines: dict[tuple[str, str], tuple[ServedModel, DiffusionEngine]] = {}

    async def engine(self, served: ServedModel) -> DiffusionEngine:
        """The engine of ``served`` (created on first use; replaced if the model was reloaded)."""
        key = (served.manifest.name, served.manifest.version)
        entry = self._engines.get(key)
        if entry is not None and entry[0] is served:
            return entry[1]
        try:
            spec = DiffusionSpec.from_manifest(served.manifest)
        except ValueError as error:
            raise ManifestError(str(error)) from None
        engine = DiffusionEngine(
            spec,
            served.pool.infer,
            self.settings.engine_config(served.manifest.max_batch_size),
            model=served.manifest.name,
            version=served.manifest.version,
            memory=served.memory,
            budget=served.budget,
        )
        self._engines[key] = (served, engine)
        return engine

    async def served(self, model: str, version: str, role: str) -> tuple[ServedModel, DiffusionEngine]:
        served = await self.host.get(model, version or None)
        if served.manifest.kind != DENOISER_KIND:
            raise InvalidInputError(f"model {served.manifest.key} is a {served.manifest.kind}, not a diffusion model")
        engine = await self.engine(served)
        if engine.spec.role != role:
            raise InvalidInputError(
                f"model {served.manifest.key} is a diffusion {engine.spec.role}; this call needs role {role} "
                f"(available: {self.models_with_role(role)})"
            )
        return served, engine

    def models_with_role(self, role: str) -> list[str]:
        return [
            key[0] for key, (_, engine) in sorted(self._engines.items()) if engine.spec.role == role
        ] or ["(none loaded yet)"]

    async def close(self) -> None:
        engines, self._engines = [engine for _, engine in self._engines.values()], {}
        await asyncio.gather(*(engine.close() for engine in engines))

    # ------------------------------------------------------------------ render
    async def render(
        self,
        classes: np.ndarray,
        *,
        model: str,
        version: str = "",
        instances: np.ndarray | None = None,
        seed: int = 0,
        options: DiffusionOptions = DiffusionOptions(),
        deadline: float | None = None,
    ) -> tuple[np.ndarray, ModelRef]:
        """Class maps [N, H, W] (checked by the caller) -> (uint8 RGB [N, H, W, 3], model ref)."""
        count, height, width = classes.shape
        if height * width > MAX_PIXELS_PER_IMAGE or count * height * width > MAX_PIXELS_PER_REQUEST:
            raise InvalidInputError(
                f"class_masks: {count} fields of {height} x {width} exceed the diffusion limits of "
                f"{MAX_PIXELS_PER_IMAGE} pixels per field and {MAX_PIXELS_PER_REQUEST} per request; "
                "send smaller or fewer fields"
            )
        served, engine = await self.served(model, version, ROLE_IMAGE_RENDERER)
        spec = engine.spec
        engine.check_size((height, width))  # size, trained size and memory rules before any input is built
        low, high = int(classes.min()), int(classes.max())
        if low < 0 or high >= spec.num_classes:
            names = ", ".join(f"{index}={name}" for index, name in enumerate(spec.class_names))
            raise InvalidInputError(
                f"class_masks: class id {high if high >= spec.num_classes else low} is outside "
                f"[0, {spec.num_classes - 1}] for model "
                f"{served.manifest.key} ({names})"
            )
        params = [options.params(spec, seed + index) for index in range(count)]
        conditions = await asyncio.to_thread(
            lambda: [
                spec.class_map_condition(classes[index], None if instances is None else instances[index])
                for index in range(count)
            ]
        )
        for param, condition in zip(params, conditions, strict=True):
            engine.check(condition, param, (height, width))  # all fields fail fast, before any runs
        samples = await asyncio.gather(
            *(engine.sample(condition, param, deadline) for condition, param in zip(conditions, params, strict=True))
        )
        images = await asyncio.to_thread(_to_uint8_rgb, np.stack(samples), spec.output_range)
        return images, served.ref

    # ------------------------------------------------------- nuclei masks
    async def generate_nuclei_masks(
        self,
        *,
        model: str,
        version: str = "",
        types: Sequence[str] = (),
        count: int = 1,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        options: DiffusionOptions = DiffusionOptions(),
        deadline: float | None = None,
    ) -> MaskGenerationResult:
        """``count`` masks with the nucleus ``types`` present (multi-hot); sample i uses seed + i."""
        if not 1 <= count <= MAX_MASKS_PER_REQUEST:
            raise InvalidInputError(f"count must be in 1..{MAX_MASKS_PER_REQUEST}, got {count}")
        served, engine = await self.served(model, version, ROLE_MASK_GENERATOR)
        spec = engine.spec
        assert spec.decode is not None
        height, width = spec.sample_size if size is None else size
        if height * width > MAX_PIXELS_PER_IMAGE or count * height * width > MAX_PIXELS_PER_REQUEST:
            raise InvalidInputError(
                f"{count} masks of {height} x {width} exceed the diffusion limits of {MAX_PIXELS_PER_IMAGE} pixels "
                f"per mask and {MAX_PIXELS_PER_REQUEST} per request; ask for smaller or fewer masks"
            )
        engine.check_size((height, width))
        valid = spec.condition_names[:-1]
        unknown = [name for name in types if name not in valid]
        if unknown or len(set(types)) != len(types):
            raise InvalidInputError(
                f"types: {unknown or list(types)} {'unknown' if unknown else 'repeated'}; "
                f"model {served.manifest.key} knows {list(valid)}"
            )
        condition = spec.multi_hot_condition(tuple(types))
        params = [options.params(spec, seed + index) for index in range(count)]
        for param in params:
            engine.check(condition, param, (height, width))
        samples = await asyncio.gather(
            *(engine.sample(condition, param, deadline, size=(height, width)) for param in params)
        )
        decoded = await asyncio.to_thread(lambda: [decode_mask_sample(sample, spec.decode) for sample in samples])
        return MaskGenerationResult(
            class_maps=np.stack([classes for classes, _ in decoded]),
            instance_maps=np.stack([instances for _, instances in decoded]),
            model=served.ref,
            class_names=spec.class_names,
        )


_SHARED: weakref.WeakKeyDictionary[ModelHost, DiffusionPipeline] = weakref.WeakKeyDictionary()


def shared_pipeline(host: ModelHost, settings: DiffusionSettings | None = None) -> DiffusionPipeline:
    """The one DiffusionPipeline of ``host``, so every entry point over a host (gRPC Render, generation,
    CLI) shares its engines and their step-level batches. The first caller's ``settings`` win."""
    pipeline = _SHARED.get(host)
    if pipeline is None:
        pipeline = DiffusionPipeline(host, settings or DiffusionSettings())
        _SHARED[host] = pipeline
    return pipeline


def _to_uint8_rgb(samples: np.ndarray, output_range: tuple[float, float]) -> np.ndarray:
    """float [N, 3, H, W] in ``output_range`` -> uint8 [N, H, W, 3] (rounded, clipped)."""
    low, high = output_range
    scaled = (samples.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def check_options(steps: int | None, guidance_scale: float | None) -> None:
    """Wire-level checks shared by the servicer (the engine re-checks against the model)."""
    if steps is not None and not 1 <= steps <= 1000:
        raise InvalidInputError(f"steps must be in 1..1000 (0 = the model's default), got {steps}")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise InvalidInputError(f"guidance_scale must be a finite number, got {guidance_scale}")
