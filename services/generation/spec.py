"""The generation spec as plain dataclasses, its validation, and the per-sample plan.

``GenerationSpec`` mirrors ``histosynth.v1.GenerationSpec`` (+ the request's version
pins) so the CLI, tests and the data-lake job can drive generation without gRPC. This
module turns a spec into a *plan*: which stratum each sample index belongs to (weights
-> exact counts, interleaved so every prefix of the stream is balanced), the seed of
each sample (a hash of the spec seed and the index, so a sample never depends on which
other samples were generated, nor in which order), and each sample's concrete targets
(ranges drawn with that seed). Validation raises InvalidInputError with messages that
name the field, the bad value and the allowed range.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import numpy as np

from services.core.errors import InvalidInputError
from services.diffusion.pipeline import DiffusionOptions
from services.diffusion.schedulers import SCHEDULERS
from services.generation.layouts import LAYOUT_GENERATORS, LayoutTargets

# Tissue -> renderer model that paints it (model_store names).
RENDERER_FOR_TISSUE: Final[Mapping[str, str]] = {
    "nuclei": "renderer-he-nuclei",
    "glands": "renderer-he-glands",
    "ihc": "renderer-ihc",
    "nuclei-diffusion": "renderer-diffusion-nuclei",
}
# Tissues whose layouts come from a diffusion mask generator instead of a procedural layout generator.
MASK_GENERATOR_FOR_TISSUE: Final[Mapping[str, str]] = {"nuclei-diffusion": "nuclei-mask-generator"}
TISSUES: Final = tuple(sorted(set(LAYOUT_GENERATORS) | set(MASK_GENERATOR_FOR_TISSUE)))
REFINER_MODEL: Final = "mask-refiner"


@dataclass(frozen=True)
class SpecLimits:
    """Edge limits of a spec; the server's generation config can tighten them."""

    max_count: int = 10_000
    min_size: int = 64
    max_size: int = 2048
    # pix2pixHD downsamples 3x (and the U-Net more), so fields must be multiples of 16.
    size_multiple: int = 16
    max_strata: int = 64
    max_tolerance: float = 0.5


DEFAULT_LIMITS: Final = SpecLimits()


@dataclass(frozen=True)
class FractionRange:
    """Closed interval inside [0, 1]; ``low == high`` is a fixed target."""

    low: float
    high: float

    def draw(self, rng: np.random.Generator) -> float:
        return self.low if self.low == self.high else float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class StratumSpec:
    label: str
    weight: float = 1.0
    class_fractions: Mapping[str, float] = field(default_factory=dict)
    class_fraction_ranges: Mapping[str, FractionRange] = field(default_factory=dict)
    positive_proportion: FractionRange | None = None
    nuclear_fraction: FractionRange | None = None
    nuclei_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationSpec:
    """What to generate. Field meanings as in generation.proto."""

    count: int
    tissue: str
    height: int = 256
    width: int = 256
    strata: tuple[StratumSpec, ...] = ()
    tolerance: float = 0.02
    seed: int = 0
    noise_spacing: float = 0.0
    refine: bool = False
    min_consistency: float = 0.0
    coarse_masks: np.ndarray | None = None  # uint8 [N, H, W] class maps
    sink_uri: str = ""
    model_versions: Mapping[str, str] = field(default_factory=dict)
    # Sampling of the tissue's diffusion models; None fields = the model's manifest default.
    diffusion: DiffusionOptions = DiffusionOptions()
    # Render's stain variation (a real training crop's H&E levels per image) and the bank source it draws from.
    stain_variation: bool = False
    stain_source: str = ""

    def parameters(self) -> dict[str, Any]:
        """JSON-ready parameters echoed into every sample's provenance (masks by digest).

        ``count`` and ``sink_uri`` are left out: they do not change any sample (sample i is
        the same in a job of any size, wherever it is written), so records stay identical
        when a dataset is extended or resumed.
        """
        params = asdict(self)
        for key in ("coarse_masks", "count", "sink_uri"):
            params.pop(key)
        params["strata"] = [
            {
                "label": s.label,
                "weight": s.weight,
                "class_fractions": dict(sorted(s.class_fractions.items())),
                "class_fraction_ranges": {k: [r.low, r.high] for k, r in sorted(s.class_fraction_ranges.items())},
                "positive_proportion": None
                if s.positive_proportion is None
                else [s.positive_proportion.low, s.positive_proportion.high],
                "nuclear_fraction": None
                if s.nuclear_fraction is None
                else [s.nuclear_fraction.low, s.nuclear_fraction.high],
                **({"nuclei_types": sorted(s.nuclei_types)} if s.nuclei_types else {}),
            }
            for s in self.effective_strata()
        ]
        params["model_versions"] = dict(sorted(self.model_versions.items()))
        if self.tissue not in MASK_GENERATOR_FOR_TISSUE:
            # Older records stay byte-identical: only diffusion tissues carry sampling options.
            params.pop("diffusion")
        if not self.stain_variation:  # likewise: only stain-varied jobs carry the stain fields
            params.pop("stain_variation")
            params.pop("stain_source")
        if self.coarse_masks is not None:
            digest = hashlib.sha256(np.ascontiguousarray(self.coarse_masks).tobytes())
            params["coarse_masks_sha256"] = digest.hexdigest()
            params["coarse_masks_shape"] = list(self.coarse_masks.shape)
        return params

    def parameters_json(self) -> str:
        return json.dumps(self.parameters(), sort_keys=True, separators=(",", ":"))

    def effective_strata(self) -> tuple[StratumSpec, ...]:
        return self.strata if self.strata else (StratumSpec(label="all"),)


def _fraction_problem(value: float) -> bool:
    return not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0)


def validate_spec(
    spec: GenerationSpec, class_names: Sequence[str] | None, limits: SpecLimits = DEFAULT_LIMITS
) -> None:
    """Every edge check a spec must pass before any work starts (INVALID_ARGUMENT on failure).

    ``class_names`` (the renderer's) enable the class checks; None skips them, so the checks
    that need no model can run before one is loaded.
    """
    if spec.tissue not in TISSUES:
        raise InvalidInputError(f"spec.tissue: unknown tissue {spec.tissue!r}; valid: {list(TISSUES)}")
    _validate_diffusion(spec)
    if not 1 <= spec.count <= limits.max_count:
        raise InvalidInputError(
            f"spec.count: {spec.count} is outside [1, {limits.max_count}]; split larger batches into several jobs"
        )
    for name, value in (("height", spec.height), ("width", spec.width)):
        if not limits.min_size <= value <= limits.max_size or value % limits.size_multiple:
            raise InvalidInputError(
                f"spec.{name}: {value} px is not allowed; use a multiple of {limits.size_multiple} in "
                f"[{limits.min_size}, {limits.max_size}] (e.g. 256)"
            )
    if not (math.isfinite(spec.tolerance) and 0.0 < spec.tolerance <= limits.max_tolerance):
        raise InvalidInputError(
            f"spec.tolerance: {spec.tolerance} must be in (0, {limits.max_tolerance}] (absolute area-fraction error)"
        )
    if not (math.isfinite(spec.noise_spacing) and (spec.noise_spacing == 0 or 2.0 <= spec.noise_spacing <= 256.0)):
        raise InvalidInputError(
            f"spec.noise_spacing: {spec.noise_spacing} must be 0 (the renderer's trained spacing) or in [2, 256] px"
        )
    if spec.stain_source and not spec.stain_variation:
        raise InvalidInputError(f"spec.stain_source {spec.stain_source!r} is set but spec.stain_variation is not; "
                                "set both, or neither")
    if not (math.isfinite(spec.min_consistency) and 0.0 <= spec.min_consistency <= 1.0):
        raise InvalidInputError(f"spec.min_consistency: {spec.min_consistency} must be in [0, 1] (0 disables the gate)")
    if not 0 <= spec.seed < 2**64:
        raise InvalidInputError(f"spec.seed: {spec.seed} must be in [0, 2**64)")
    if len(spec.strata) > limits.max_strata:
        raise InvalidInputError(f"spec.strata: {len(spec.strata)} strata exceed the limit of {limits.max_strata}")
    labels = [s.label for s in spec.strata]
    if len(set(labels)) != len(labels):
        raise InvalidInputError(f"spec.strata: labels must be unique, got {labels}")
    for position, stratum in enumerate(spec.strata):
        where = f"spec.strata[{position}] ({stratum.label!r})"
        if not stratum.label:
            raise InvalidInputError(
                f"spec.strata[{position}].label: must be non-empty (it names the stratum in outputs)"
            )
        if not (math.isfinite(stratum.weight) and stratum.weight > 0):
            raise InvalidInputError(f"{where}.weight: {stratum.weight} must be > 0")
        if spec.tissue in MASK_GENERATOR_FOR_TISSUE:
            targeted = [name for name, value in (
                ("class_fractions", stratum.class_fractions), ("class_fraction_ranges", stratum.class_fraction_ranges),
                ("positive_proportion", stratum.positive_proportion), ("nuclear_fraction", stratum.nuclear_fraction),
            ) if value]
            if targeted:
                raise InvalidInputError(
                    f"{where}: {targeted} cannot be targeted for tissue {spec.tissue!r}: its masks come from the "
                    f"{MASK_GENERATOR_FOR_TISSUE[spec.tissue]} diffusion model; choose nucleus types with nuclei_types"
                )
            if len(set(stratum.nuclei_types)) != len(stratum.nuclei_types):
                raise InvalidInputError(f"{where}.nuclei_types: {list(stratum.nuclei_types)} repeats a type")
        elif stratum.nuclei_types:
            raise InvalidInputError(
                f"{where}.nuclei_types: only for tissues {sorted(MASK_GENERATOR_FOR_TISSUE)} (diffusion mask "
                f"generator), not {spec.tissue!r}; target areas with class_fractions instead"
            )
        both = sorted(set(stratum.class_fractions) & set(stratum.class_fraction_ranges))
        if both:
            raise InvalidInputError(
                f"{where}: class(es) {both} appear in both class_fractions and class_fraction_ranges; keep one"
            )
        for name in [*stratum.class_fractions, *stratum.class_fraction_ranges]:
            if class_names is not None and name not in class_names:
                raise InvalidInputError(
                    f"{where}: unknown class {name!r} for tissue {spec.tissue!r}; valid: {list(class_names)}"
                )
        for name, value in stratum.class_fractions.items():
            if _fraction_problem(value):
                raise InvalidInputError(f"{where}.class_fractions[{name!r}]: {value} is outside [0, 1]")
        ranges = dict(stratum.class_fraction_ranges)
        targeted = sorted([*stratum.class_fractions, *stratum.class_fraction_ranges])
        if stratum.positive_proportion is not None:
            ranges["positive_proportion"] = stratum.positive_proportion
            if spec.tissue != "ihc":
                raise InvalidInputError(
                    f"{where}.positive_proportion: only valid for tissue 'ihc', not {spec.tissue!r}"
                )
            if targeted:
                raise InvalidInputError(
                    f"{where}: with positive_proportion the classes {targeted} cannot be targeted; "
                    "set the nuclear area with nuclear_fraction instead"
                )
        if stratum.nuclear_fraction is not None:
            ranges["nuclear_fraction"] = stratum.nuclear_fraction
            if spec.tissue not in ("nuclei", "ihc"):
                raise InvalidInputError(f"{where}.nuclear_fraction: only valid for tissues 'nuclei' and 'ihc'")
            if targeted:
                raise InvalidInputError(
                    f"{where}: nuclear_fraction and per-class fractions {targeted} exclude each other; use one"
                )
            if stratum.nuclear_fraction.high > 0.6:
                raise InvalidInputError(
                    f"{where}.nuclear_fraction: max {stratum.nuclear_fraction.high} is above 0.6; "
                    "separate nuclei cannot cover more of the image"
                )
        for name, span in ranges.items():
            if _fraction_problem(span.low) or _fraction_problem(span.high) or span.low > span.high:
                raise InvalidInputError(
                    f"{where}: range for {name!r} is [{span.low}, {span.high}]; need 0 <= min <= max <= 1"
                )
        lowest_sum = sum(stratum.class_fractions.values()) + sum(r.low for r in stratum.class_fraction_ranges.values())
        if lowest_sum > 1.0 + 1e-9:
            raise InvalidInputError(f"{where}: class fractions sum to {lowest_sum:.3f} > 1; lower them")
    if spec.coarse_masks is not None:
        masks = spec.coarse_masks
        if masks.ndim != 3 or masks.shape[1:] != (spec.height, spec.width) or masks.shape[0] < 1:
            raise InvalidInputError(
                f"spec.coarse_masks: expected uint8 [N, {spec.height}, {spec.width}] (N >= 1, matching height/width), "
                f"got {masks.dtype} {list(masks.shape)}"
            )
        if class_names is not None and masks.size and int(masks.max()) >= len(class_names):
            raise InvalidInputError(
                f"spec.coarse_masks: class id {int(masks.max())} is not a class of tissue {spec.tissue!r}; "
                f"ids are 0..{len(class_names) - 1} for {list(class_names)}"
            )
    for model, version in spec.model_versions.items():
        if not (isinstance(version, str) and version.isdigit() and int(version) > 0):
            raise InvalidInputError(
                f"model_versions[{model!r}]: {version!r} must be a positive integer string like '1'"
            )


def _validate_diffusion(spec: GenerationSpec) -> None:
    sampling = spec.diffusion
    if spec.tissue not in MASK_GENERATOR_FOR_TISSUE:
        if sampling != DiffusionOptions():
            raise InvalidInputError(
                f"spec.diffusion: tissue {spec.tissue!r} uses no diffusion model; leave it unset or use one of "
                f"{sorted(MASK_GENERATOR_FOR_TISSUE)}"
            )
        return
    if sampling.steps is not None and not 1 <= sampling.steps <= 1000:
        raise InvalidInputError(f"spec.diffusion.steps: {sampling.steps} must be in 1..1000 (unset = the model's default)")
    if sampling.scheduler is not None and sampling.scheduler not in SCHEDULERS:
        raise InvalidInputError(
            f"spec.diffusion.scheduler: {sampling.scheduler!r} is unknown; valid: {list(SCHEDULERS)} "
            "(unset = the model's default)"
        )
    if sampling.guidance_scale is not None and not (
        math.isfinite(sampling.guidance_scale) and 0.0 <= sampling.guidance_scale <= 30.0
    ):
        raise InvalidInputError(f"spec.diffusion.guidance_scale: {sampling.guidance_scale} must be in [0, 30]")
    if spec.noise_spacing or spec.refine or spec.stain_variation:
        raise InvalidInputError(
            f"tissue {spec.tissue!r} is rendered by a diffusion model: noise_spacing, refine and stain_variation "
            "do not apply; leave them unset"
        )


# ------------------------------------------------------------------------------ plan
def stratum_sequence(weights: Sequence[float], count: int) -> list[int]:
    """Stratum index of samples 0..count-1: a weighted round-robin that is balanced at every prefix.

    Tijdeman's "chairman assignment": with k strata and c = 1 / (2k - 2), sample t goes,
    among the strata at least c behind their share at t + 1 samples, to the one whose next
    slot is due first (smallest (assigned + 1 - c) / share; ties: the earlier stratum).
    Every prefix of n samples then holds share * n +- (1 - c) samples of each stratum, so
    any count is as balanced as integers allow. The sequence does not depend on ``count``:
    sample i belongs to the same stratum in a job of 10 or of 10,000, so a dataset can be
    extended or resumed with another count and every finished sample stays valid.
    """
    total = float(sum(weights))
    shares = [w / total for w in weights]
    k = len(weights)
    slack = 1.0 / (2 * k - 2) if k > 1 else 0.0
    assigned = [0] * k
    sequence: list[int] = []
    for t in range(count):
        candidates = [s for s in range(k) if shares[s] * (t + 1) - assigned[s] >= slack - 1e-9]
        chosen = min(candidates, key=lambda s: ((assigned[s] + 1 - slack) / shares[s], s))
        assigned[chosen] += 1
        sequence.append(chosen)
    return sequence


def allocate_counts(weights: Sequence[float], count: int) -> list[int]:
    """Samples per stratum for a job of ``count`` (each within one of its exact share)."""
    counts = [0] * len(weights)
    for stratum in stratum_sequence(weights, count):
        counts[stratum] += 1
    return counts


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts (spec seed, sample index, purpose, attempt), by BLAKE2b.

    Hashing (not ``seed + index``) keeps neighbouring samples and purposes uncorrelated and
    makes every sample's randomness independent of the batch it is generated in.
    """
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


# Default targets per tissue when a stratum targets nothing (drawn per sample).
DEFAULT_GLAND_FRACTION: Final = FractionRange(0.2, 0.5)
# GlaS under renderer-he-glands' rule (gray >= 204, gland lumens included): 7 % (10th percentile)
# to 15 % (median) of an image.
DEFAULT_NON_TISSUE_FRACTION: Final = FractionRange(0.07, 0.18)
DEFAULT_NUCLEAR_FRACTION: Final = FractionRange(0.1, 0.25)
DEFAULT_POSITIVE_PROPORTION: Final = FractionRange(0.0, 1.0)


@dataclass(frozen=True)
class SamplePlan:
    index: int
    stratum: str
    seed: int
    targets: LayoutTargets


def sample_targets(
    spec: GenerationSpec, stratum: StratumSpec, class_names: Sequence[str], rng: np.random.Generator
) -> LayoutTargets:
    """Concrete targets of one sample: ranges drawn, tissue defaults filled in."""
    fractions = dict(stratum.class_fractions)
    for name, span in sorted(stratum.class_fraction_ranges.items()):
        fractions[name] = span.draw(rng)
    positive: float | None = None
    positive_range: tuple[float, float] | None = None
    nuclear: float | None = None
    if spec.tissue == "ihc":
        span = stratum.positive_proportion
        if span is None and not fractions:
            span = DEFAULT_POSITIVE_PROPORTION
        if span is not None:
            positive, positive_range = span.draw(rng), (span.low, span.high)
            nuclear = (stratum.nuclear_fraction or DEFAULT_NUCLEAR_FRACTION).draw(rng)
    elif spec.tissue == "glands":
        gland = next((n for n in class_names if "gland" in n.lower()), None)
        non_tissue = next((n for n in class_names if n.lower() in ("non-tissue", "non_tissue", "air")), None)
        if gland is not None and gland not in fractions and not fractions:
            fractions[gland] = DEFAULT_GLAND_FRACTION.draw(rng)
        if non_tissue is not None and non_tissue not in fractions:
            fractions[non_tissue] = DEFAULT_NON_TISSUE_FRACTION.draw(rng)
    elif not fractions and spec.tissue == "nuclei":
        # MoNuSeg's untyped nuclei stay out of the default mix; target them by name to get them.
        types = [name for name in class_names[1:] if "untyped" not in name.lower()]
        mix = rng.dirichlet(np.full(len(types), 2.0))
        total = (stratum.nuclear_fraction or DEFAULT_NUCLEAR_FRACTION).draw(rng)
        fractions = {name: float(total * share) for name, share in zip(types, mix)}
    return LayoutTargets(
        class_fractions=fractions,
        tolerance=spec.tolerance,
        positive_proportion=positive,
        positive_range=positive_range,
        nuclear_fraction=nuclear,
    )


def plan_samples(spec: GenerationSpec, class_names: Sequence[str]) -> list[SamplePlan]:
    """The whole job's plan; sample i's entry depends only on (spec, i)."""
    strata = spec.effective_strata()
    sequence = stratum_sequence([s.weight for s in strata], spec.count)
    plans = []
    for index, stratum_index in enumerate(sequence):
        stratum = strata[stratum_index]
        seed = derive_seed(spec.seed, index)
        rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "targets")))
        plans.append(SamplePlan(index, stratum.label, seed, sample_targets(spec, stratum, class_names, rng)))
    return plans
