"""GenerationPipeline: spec -> plan -> layout -> (refine) -> noise label -> render -> (gate) -> samples.

numpy and asyncio only (no gRPC): the servicer, the CLI's embedded mode and tests drive
it directly. Models are reached through the small :class:`ModelProvider` seam — in
serving that is the in-process rendering/refinement pipelines, which batch through the
core DynamicBatcher — so concurrent samples of one or several jobs share batches.

Determinism: sample i of a spec is a function of (spec, i, model versions) only. Its
seed is ``derive_seed(spec.seed, i)``; the layout, the noise label and retries use
seeds derived from it; nothing depends on concurrency, batch composition or the
other samples. Provenance names everything needed to regenerate it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.metadata
import json
import subprocess
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import scipy.ndimage

from services.core import mask_ops
from services.core.errors import HistosynthError, InvalidInputError
from services.core.model_info import MaskGeneratorInfo, RendererInfo  # noqa: F401 - part of the seam's API
from services.core.png import encode_png
from services.core.scores import tps_bin_index, tumor_proportion_score
from services.generation.layouts import (
    Layout,
    LayoutError,
    LayoutTargets,
    class_fractions_of,
    generate_layout,
    gland_region_classes,
    layout_from_class_map,
    layout_from_nuclei_maps,
    region_instances,
)
from services.diffusion.pipeline import DiffusionOptions
from services.generation.sink import sink_path
from services.generation.spec import (
    DEFAULT_LIMITS,
    MASK_GENERATOR_FOR_TISSUE,
    REFINER_MODEL,
    RENDERER_FOR_TISSUE,
    GenerationSpec,
    SamplePlan,
    SpecLimits,
    StratumSpec,
    derive_seed,
    plan_samples,
    validate_spec,
)
from services.model_host import ModelRef

# Refinement changes region areas; the layout target is corrected and retried this often.
REFINE_ROUNDS: Final = 4
# A sample failing the quality gate is regenerated (new derived seed) at most this often.
GATE_ATTEMPTS: Final = 3
DEFAULT_NOISE_SPACING: Final = 15.0  # noise-frequency paper's best mean spacing


class GenerationUnavailableError(HistosynthError):
    """A requested feature needs a component this server does not have (e.g. a quality gate scorer)."""

    default_status = "FAILED_PRECONDITION"
    reason = "unavailable_feature"


# ----------------------------------------------------------------------------- seams
class Renderer(Protocol):
    @property
    def info(self) -> RendererInfo: ...

    async def render(
        self,
        class_maps: np.ndarray,
        instances: np.ndarray | None,
        noise_labels: np.ndarray | None,
        deadline: float | None,
        *,
        seed: int = 0,
        diffusion: DiffusionOptions = DiffusionOptions(),
        stain_variation: bool = False,
        stain_source: str = "",
    ) -> np.ndarray:
        """uint8 [N, H, W] class maps (+ uint16 instances, + uint8 noise) -> uint8 [N, H, W, 3] RGB.

        ``seed`` seeds a diffusion renderer's initial noise (sample i: seed + i); GAN renderers get
        their randomness from ``noise_labels`` and ignore it, as they ignore ``diffusion``.
        ``stain_variation`` / ``stain_source``: Render's stain variation (RenderRequest).
        """
        ...


class MaskGenerator(Protocol):
    @property
    def info(self) -> MaskGeneratorInfo: ...

    async def generate(
        self,
        types: Sequence[str],
        seed: int,
        size: tuple[int, int],
        diffusion: DiffusionOptions,
        deadline: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One mask with ``types`` present -> (uint8 class map [H, W], instance ids [H, W])."""
        ...


class Refiner(Protocol):
    @property
    def ref(self) -> ModelRef: ...

    async def refine(self, coarse_masks: np.ndarray, deadline: float | None, *,
                     guide_masks: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        """uint8 [N, H, W] binary coarse masks (+ optional {0, 1} region layout) -> uint8 binary fine masks.

        ``seed`` picks the refiner's noise (refiners with a noise input); refiners without a guide input
        ignore ``guide_masks``."""
        ...


class ModelProvider(Protocol):
    """Resolves model names (and optional version pins) to loaded models; raises ModelNotFoundError."""

    async def renderer(self, name: str, version: str | None) -> Renderer: ...

    async def refiner(self, name: str, version: str | None) -> Refiner: ...

    async def mask_generator(self, name: str, version: str | None) -> MaskGenerator: ...


class ConsistencyScorer(Protocol):
    """Mask-image consistency in [0, 1]: mIoU of a segmenter's output against the conditioning mask.

    services.scoring.consistency.ConsistencyScorer implements it over segmenter models.
    """

    async def segmenter(self, name: str = "", version: str = "", renderer: str = "") -> Any:
        """The segmenter that checks ``renderer``'s images; raises (FAILED_PRECONDITION) when none exists."""
        ...

    async def consistency(
        self, image: np.ndarray, class_map: np.ndarray, class_names: Sequence[str], renderer: str = ""
    ) -> float: ...


# ---------------------------------------------------------------------------- output
@dataclass(frozen=True)
class Provenance:
    models: tuple[ModelRef, ...]
    seed: int
    code_version: str
    parameters_json: str
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [m.__dict__.copy() for m in self.models],
            "seed": self.seed,
            "code_version": self.code_version,
            "parameters": json.loads(self.parameters_json),
            "backend": self.backend,
        }


@dataclass(frozen=True)
class GeneratedSample:
    index: int
    stratum: str
    image: np.ndarray  # uint8 [H, W, 3] RGB
    class_map: np.ndarray  # uint8 [H, W]
    instances: np.ndarray | None  # uint16 [H, W]
    class_names: tuple[str, ...]
    scores: dict[str, float]
    provenance: Provenance
    # The image's PNG, encoded once per sample (in a worker thread, by GenerationPipeline) and shared
    # by the stream and the sink; None until then.
    png: bytes | None = field(default=None, repr=False, compare=False)

    def image_png(self) -> bytes:
        return self.png if self.png is not None else encode_png(self.image)


@functools.cache
def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the installed package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=root, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        if described:
            return f"git:{described}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"histosynth=={importlib.metadata.version('histosynth')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- scoring
def layout_scores(layout: Layout, targets: LayoutTargets | None, class_names: Sequence[str]) -> dict[str, float]:
    scores: dict[str, float] = {f"fraction/{name}": value for name, value in layout.achieved_fractions.items()}
    if targets is not None:
        errors = []
        for name, target in targets.class_fractions.items():
            scores[f"target/{name}"] = float(target)
            errors.append(abs(layout.achieved_fractions[name] - target))
        if targets.positive_proportion is not None:
            scores["target/positive_proportion"] = float(targets.positive_proportion)
        if targets.nuclear_fraction is not None:
            nuclear = sum(
                v for n, v in layout.achieved_fractions.items() if "positive" in n.lower() or "negative" in n.lower()
            )
            scores["target/nuclear_fraction"] = float(targets.nuclear_fraction)
            scores["fraction/nuclei"] = float(nuclear)
            errors.append(abs(nuclear - targets.nuclear_fraction))
        if errors:
            scores["fraction_error_max"] = float(max(errors))
    for name, count in layout.nucleus_counts.items():
        scores[f"count/{name}"] = float(count)
    if layout.positive_proportion is not None:
        # Count based (instances): positive nuclei / all nuclei, scored by the scoring service's definition.
        positive = next(i for i, n in enumerate(class_names) if "positive" in n.lower())
        negative = next(i for i, n in enumerate(class_names) if "negative" in n.lower())
        tps = tumor_proportion_score(layout.class_map, positive, negative, layout.instances)
        scores["positive_proportion"] = float(layout.positive_proportion)
        scores["tps"] = float(tps)
        scores["tps_bin"] = float(tps_bin_index(tps))
    scores["layout_attempts"] = float(layout.attempts)
    return scores


# -------------------------------------------------------------------------- pipeline
def _check_stain_variation(spec: GenerationSpec, info: RendererInfo) -> None:
    """Refuse stain variation before any sample when the renderer has no stain bank or not the named source."""
    if not spec.stain_variation:
        return
    if not info.stain_sources:
        raise InvalidInputError(f"spec.stain_variation: the {spec.tissue!r} renderer {info.ref.name}/"
                                f"{info.ref.version} has no stain bank; leave stain_variation unset")
    if spec.stain_source and spec.stain_source not in info.stain_sources:
        raise InvalidInputError(f"spec.stain_source: {spec.stain_source!r} is not in {info.ref.name}/"
                                f"{info.ref.version}'s stain bank; it has {', '.join(info.stain_sources)} (empty = all)")


def _check_mask_generator(spec: GenerationSpec, generator: MaskGeneratorInfo, renderer: RendererInfo) -> None:
    """The generated class ids must mean what the renderer reads; requested types must exist."""
    if generator.class_names != renderer.class_names:
        raise GenerationUnavailableError(
            f"mask generator {generator.ref.name}/{generator.ref.version} makes classes {list(generator.class_names)} "
            f"but renderer {renderer.ref.name}/{renderer.ref.version} reads {list(renderer.class_names)}; "
            "pin versions trained on one label set (model_versions)"
        )
    for position, stratum in enumerate(spec.strata):
        unknown = [t for t in stratum.nuclei_types if t not in generator.type_names]
        if unknown:
            raise InvalidInputError(
                f"spec.strata[{position}] ({stratum.label!r}).nuclei_types: {unknown} unknown; "
                f"{generator.ref.name} knows {list(generator.type_names)}"
            )


def _non_tissue_class(class_names: Sequence[str]) -> int | None:
    return next((i for i, n in enumerate(class_names) if n.lower() in ("non-tissue", "non_tissue", "air")), None)


@dataclass(frozen=True)
class PreparedJob:
    """A validated spec with its models resolved and every sample planned."""

    spec: GenerationSpec
    renderer: Renderer
    refiner: Refiner | None
    plans: tuple[SamplePlan, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    mask_generator: MaskGenerator | None = None

    def stratum(self, label: str) -> StratumSpec:
        return next(s for s in self.spec.effective_strata() if s.label == label)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.renderer.info.class_names

    def strata_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for plan in self.plans:
            counts[plan.stratum] = counts.get(plan.stratum, 0) + 1
        return counts


@dataclass
class JobCounters:
    """Live progress of one job: ``completed`` is kept by the job registry (a sample counts once
    it is streamed and, with a sink, written); ``rejected`` by the pipeline's quality gate."""

    completed: int = 0
    rejected: int = 0


class GenerationPipeline:
    """Turns specs into streams of :class:`GeneratedSample`.

    ``concurrency`` samples of one job are in flight at once (so their render calls can
    share batches); samples are still yielded in index order. At most
    ``max_samples_in_flight`` samples of all jobs together are being generated at once.
    """

    def __init__(
        self,
        models: ModelProvider,
        *,
        limits: SpecLimits = DEFAULT_LIMITS,
        concurrency: int = 4,
        max_samples_in_flight: int = 32,
        backend: str = "onnxruntime:cpu",
        consistency_scorer: ConsistencyScorer | None = None,
    ) -> None:
        if concurrency < 1 or max_samples_in_flight < 1:
            raise ValueError(
                f"concurrency and max_samples_in_flight must be >= 1, got {concurrency}, {max_samples_in_flight}"
            )
        self._models = models
        self._limits = limits
        self._concurrency = concurrency
        # Across all jobs: many concurrent jobs queue here instead of overflowing the model
        # batchers' bounded queues (which would fail them with RESOURCE_EXHAUSTED).
        self._in_flight = asyncio.Semaphore(max_samples_in_flight)
        self._backend = backend
        self._scorer = consistency_scorer

    @property
    def limits(self) -> SpecLimits:
        return self._limits

    async def prepare(self, spec: GenerationSpec) -> PreparedJob:
        """Validate, resolve models and plan; raises before any work when anything is wrong."""
        if spec.tissue not in RENDERER_FOR_TISSUE:
            raise InvalidInputError(
                f"spec.tissue: unknown tissue {spec.tissue!r}; valid: {sorted(RENDERER_FOR_TISSUE)}"
            )
        renderer_name = RENDERER_FOR_TISSUE[spec.tissue]
        generator_name = MASK_GENERATOR_FOR_TISSUE.get(spec.tissue)
        known_models = {renderer_name, REFINER_MODEL} | ({generator_name} if generator_name else set())
        stray = sorted(set(spec.model_versions) - known_models)
        if stray:
            raise InvalidInputError(
                f"model_versions: {stray} not used by tissue {spec.tissue!r}; pin only {sorted(known_models)}"
            )
        validate_spec(spec, None, self._limits)  # everything that needs no model, before loading one
        renderer = await self._models.renderer(renderer_name, spec.model_versions.get(renderer_name))
        class_names = renderer.info.class_names
        validate_spec(spec, class_names, self._limits)
        _check_stain_variation(spec, renderer.info)
        if spec.sink_uri:
            sink_path(spec.sink_uri)  # refuses unsupported URIs before any work starts
        if spec.min_consistency > 0:
            if self._scorer is None:
                raise GenerationUnavailableError(
                    f"spec.min_consistency={spec.min_consistency}: the quality gate is not available on this server "
                    "(no mask-image consistency scorer is configured); set min_consistency to 0"
                )
            await self._scorer.segmenter(renderer=renderer_name)  # FAILED_PRECONDITION when none checks it
        refiner = None
        if spec.refine:
            if _non_tissue_class(class_names) is None:
                raise InvalidInputError(
                    f"spec.refine: the mask refiner refines the tissue / non-tissue layer, and the {spec.tissue!r} "
                    f"renderer has no non-tissue class (classes {list(class_names)}); set refine to false "
                    "(tissue 'glands' supports it)"
                )
            refiner = await self._models.refiner(REFINER_MODEL, spec.model_versions.get(REFINER_MODEL))
        mask_generator = None
        if generator_name is not None:
            mask_generator = await self._models.mask_generator(generator_name, spec.model_versions.get(generator_name))
            _check_mask_generator(spec, mask_generator.info, renderer.info)
        plans = tuple(await asyncio.to_thread(plan_samples, spec, class_names))
        return PreparedJob(spec=spec, renderer=renderer, refiner=refiner, plans=plans, parameters=spec.parameters(),
                           mask_generator=mask_generator)

    async def run(
        self,
        job: PreparedJob,
        *,
        indices: Collection[int] | None = None,
        deadline: float | None = None,
        counters: JobCounters | None = None,
    ) -> AsyncIterator[GeneratedSample]:
        """Yields the job's samples (only ``indices`` when given) in index order.

        Closing the iterator (consumer gone, job cancelled) cancels every sample in flight.
        """
        counters = counters if counters is not None else JobCounters()
        wanted = None if indices is None else set(indices)
        todo = [p for p in job.plans if wanted is None or p.index in wanted]
        if indices is not None:
            bad = sorted(set(indices) - {p.index for p in job.plans})
            if bad:
                raise InvalidInputError(f"indices {bad[:10]} are outside the job's 0..{len(job.plans) - 1}")
        window: list[asyncio.Task[GeneratedSample | None]] = []
        position = 0
        try:
            while position < len(todo) or window:
                while position < len(todo) and len(window) < self._concurrency:
                    plan = todo[position]
                    window.append(asyncio.create_task(self.generate_sample(job, plan, deadline, counters),
                                                      name=f"sample-{plan.index}"))
                    position += 1
                sample = await window.pop(0)
                if sample is not None:
                    yield sample
        finally:
            for task in window:
                task.cancel()
            if window:
                await asyncio.gather(*window, return_exceptions=True)

    async def generate_sample(
        self, job: PreparedJob, plan: SamplePlan, deadline: float | None = None, counters: JobCounters | None = None
    ) -> GeneratedSample | None:
        """One sample, or None when every attempt failed the quality gate."""
        async with self._in_flight:
            sample = await self._gated_sample(job, plan, deadline, counters)
            if sample is None:
                return None
            # Once per sample and off the event loop: the stream and the sink both use these bytes.
            return dataclasses.replace(sample, png=await asyncio.to_thread(encode_png, sample.image))

    async def _gated_sample(
        self, job: PreparedJob, plan: SamplePlan, deadline: float | None, counters: JobCounters | None
    ) -> GeneratedSample | None:
        for attempt in range(GATE_ATTEMPTS if self._scorer is not None and job.spec.min_consistency > 0 else 1):
            seed = plan.seed if attempt == 0 else derive_seed(plan.seed, "gate", attempt)
            sample = await self._attempt(job, plan, seed, deadline)
            if self._scorer is None or job.spec.min_consistency <= 0:
                return sample
            consistency = await self._scorer.consistency(
                sample.image, sample.class_map, sample.class_names, renderer=job.renderer.info.ref.name
            )
            sample.scores["consistency"] = float(consistency)
            if consistency >= job.spec.min_consistency:
                return sample
            if counters is not None:
                counters.rejected += 1
        return None

    async def _attempt(self, job: PreparedJob, plan: SamplePlan, seed: int, deadline: float | None) -> GeneratedSample:
        spec = job.spec
        info = job.renderer.info
        layout, targets = await self._layout(job, plan, seed, deadline)
        noise = None
        if info.noise_spacing is not None:
            spacing = spec.noise_spacing or info.noise_spacing or DEFAULT_NOISE_SPACING
            # Off the event loop: a large field's noise label takes tens of milliseconds.
            noise = await asyncio.to_thread(
                mask_ops.noise_label, layout.class_map.shape, spacing, derive_seed(seed, "noise")
            )
        instances = layout.instances if info.uses_instance_edges else None
        images = await job.renderer.render(
            layout.class_map[None],
            None if instances is None else instances[None],
            None if noise is None else noise[None],
            deadline,
            seed=derive_seed(seed, "render"),
            diffusion=spec.diffusion,
            stain_variation=spec.stain_variation,
            stain_source=spec.stain_source,
        )
        # Scores hold no timings: same spec + seed + models must give byte-identical records.
        scores = layout_scores(layout, targets, info.class_names)
        models = [info.ref] + ([job.refiner.ref] if job.refiner is not None else [])
        if job.mask_generator is not None:
            models.append(job.mask_generator.info.ref)
            # 1 when the mask holds at least one nucleus of a type the stratum asked for, so a client can
            # check (and count) that the request was honoured.
            for name in job.stratum(plan.stratum).nuclei_types:
                scores[f"present/{name}"] = 1.0 if layout.nucleus_counts.get(name, 0) > 0 else 0.0
        parameters = dict(job.parameters)
        parameters["sample"] = {"index": plan.index, "stratum": plan.stratum, "seed": seed}
        provenance = Provenance(
            models=tuple(models),
            seed=seed,
            code_version=code_version(),
            parameters_json=json.dumps(parameters, sort_keys=True, separators=(",", ":")),
            backend=self._backend,
        )
        return GeneratedSample(
            index=plan.index,
            stratum=plan.stratum,
            image=np.ascontiguousarray(images[0], dtype=np.uint8),
            class_map=layout.class_map,
            instances=layout.instances,
            class_names=info.class_names,
            scores=scores,
            provenance=provenance,
        )

    async def _layout(
        self, job: PreparedJob, plan: SamplePlan, seed: int, deadline: float | None
    ) -> tuple[Layout, LayoutTargets | None]:
        spec = job.spec
        class_names = job.class_names
        if spec.coarse_masks is not None:
            class_map = spec.coarse_masks[plan.index % spec.coarse_masks.shape[0]]
            layout = layout_from_class_map(spec.tissue, class_map, class_names)
            if job.refiner is not None:
                layout = await self._refine_regions(job, layout, derive_seed(seed, "refine"), deadline)
            return layout, None
        targets = plan.targets
        if job.mask_generator is not None:
            class_map, instances = await job.mask_generator.generate(
                job.stratum(plan.stratum).nuclei_types, derive_seed(seed, "mask"), (spec.height, spec.width),
                spec.diffusion, deadline,
            )
            return layout_from_nuclei_maps(class_map, instances, class_names), None
        if job.refiner is None:
            layout = await asyncio.to_thread(
                generate_layout, spec.tissue, class_names, spec.height, spec.width, targets, derive_seed(seed, "layout")
            )
            return layout, targets
        return await self._refined_layout(job, targets, seed, deadline), targets

    async def _refined_layout(
        self, job: PreparedJob, targets: LayoutTargets, seed: int, deadline: float | None
    ) -> Layout:
        """Coarse layout -> refiner, correcting the coarse target until the refined fractions hit it.

        The refiner grows or shrinks regions by a roughly constant amount for a given
        layout style, so feeding back (target - achieved) converges in 1-3 rounds.
        """
        spec = job.spec
        corrected = dict(targets.class_fractions)
        best: tuple[float, Layout] | None = None
        for round_index in range(REFINE_ROUNDS):
            coarse_targets = LayoutTargets(
                {k: float(np.clip(v, 0.0, 0.95)) for k, v in corrected.items()}, targets.tolerance,
                targets.positive_proportion, targets.positive_range,
            )
            try:
                coarse = await asyncio.to_thread(
                    functools.partial(generate_layout, coarse=True),
                    spec.tissue, job.class_names, spec.height, spec.width, coarse_targets, derive_seed(seed, "layout"),
                )
            except LayoutError:
                if best is not None:
                    break
                raise
            refined = await self._refine_regions(job, coarse, derive_seed(seed, "refine"), deadline)
            errors = {k: refined.achieved_fractions[k] - v for k, v in targets.class_fractions.items()}
            worst = max((abs(e) for e in errors.values()), default=0.0)
            refined = Layout(refined.class_map, refined.instances, refined.achieved_fractions, attempts=round_index + 1)
            if best is None or worst < best[0]:
                best = (worst, refined)
            if worst <= targets.tolerance:
                break
            for name, error in errors.items():
                corrected[name] -= error
        assert best is not None
        return best[1]

    async def _refine_regions(self, job: PreparedJob, layout: Layout, seed: int, deadline: float | None) -> Layout:
        """PriorPath step: the coarse tissue mask (everything but non-tissue) and the gland layout (the
        region classes with their lumens filled, the refiner's guide) -> the refiner -> fine tissue.

        Then renderer-he-glands' class rule: non-tissue where the fine mask says so (it wins
        over gland), gland where tissue lies inside a gland region (the gland blobs with their
        lumens filled), stroma elsewhere.
        """
        assert job.refiner is not None
        class_names = job.class_names
        non_tissue = _non_tissue_class(class_names)
        assert non_tissue is not None  # checked in prepare
        filler = next((i for i, n in enumerate(class_names) if "stroma" in n.lower()), 0)
        tissue = (layout.class_map != non_tissue).astype(np.uint8)

        def regions() -> list[tuple[int, np.ndarray]]:
            return [(region_class, scipy.ndimage.binary_fill_holes(layout.class_map == region_class))
                    for region_class in gland_region_classes(class_names)]

        filled = await asyncio.to_thread(regions)
        guide = np.zeros(tissue.shape, np.uint8)
        for _, region in filled:
            guide |= region.astype(np.uint8)
        fine = (await job.refiner.refine(tissue[None], deadline, guide_masks=guide[None], seed=seed))[0]
        fine = fine.astype(bool)

        def rebuild() -> np.ndarray:
            class_map = np.where(fine, filler, non_tissue).astype(np.uint8)
            for region_class, region in filled:
                class_map[region & fine] = region_class
            return class_map

        class_map = await asyncio.to_thread(rebuild)
        instances = region_instances(class_map, gland_region_classes(class_names))
        return Layout(class_map, instances, class_fractions_of(class_map, class_names), attempts=layout.attempts)
