"""Scoring pipeline, numpy domain: image sets -> features (through the batcher) -> distribution scores.

Siblings: class_maps.py (mask KS/KL, segmentation metrics, TPS), consistency.py (segmenter-based
mask-image consistency, the generation quality gate), images.py (PNG decoding, model input).

Feature extraction follows the extractor's manifest metadata (keys read here; defaults in brackets):

  standard_fid     [false]  true = standard InceptionV3 pool3 features (published-FID comparable)
  feature_output   ["features", else the first output]  output holding [batch, d] features
  logits_output    ["logits" when such an output exists]  [batch, classes] logits -> Inception Score;
                   null = the model has none (no IS)
  input_range      [[0, 255]]  uint8 0..255 is mapped linearly onto this range before the model
  resize           [inside_graph: true]  {size: [h, w], inside_graph: bool} (training/export's form): when
                   inside_graph is false, images are resized here (bilinear) to h x w before the model
  min_size         [1]      smallest H and W the graph accepts
  description      [generated]  shown to users next to the scores

Distribution scores are accumulated per set by ``DistributionAccumulator``: every feature
vector updates a ``StreamingFeatureStats`` (FID uses every image, O(d^2) memory), and a
uniform reservoir (Vitter's algorithm R, seeded) keeps at most ``max_kept_features`` vectors
(+ class probabilities) for KID, precision/recall, IS and the FID bootstrap. The unary call
and the stream use the same accumulator, so the same images in the same order give the same
scores (to float rounding of the batch-wise covariance merge).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import scipy.special

from services.core.config import check_settings, setting
from services.core.errors import HistosynthError, InvalidInputError, ModelNotFoundError
from services.core.model_store import ModelManifest
from services.model_host import ModelHost, ModelRef, ServedModel
from services.scoring import distances
from services.scoring.images import as_image_list, groups_by_size, resize_images, to_model_input

MODEL_KINDS: Final = ("encoder", "segmenter")
DEFAULT_EXTRACTOR: Final = "histology-encoder"
INCEPTION_ALIAS: Final = "inception-fid"
INCEPTION_BUILD_HINT: Final = (
    "build it from your own copy of the pytorch-fid InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth) "
    "with `python -m histosynth.training.export.fid_inception --weights <file.pth> --store-root <model store>` "
    "(training/export/fid_inception.py; it marks the published weights standard_fid: true), then retry"
)
Role = Literal["real", "synthetic"]
ROLES: Final = ("real", "synthetic")


class ScoringPreconditionError(HistosynthError):
    """The server lacks what the request needs (e.g. no Inception-FID model); FAILED_PRECONDITION."""

    default_status = "FAILED_PRECONDITION"
    reason = "failed_precondition"

    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class ScoringSettings:
    """Scoring-service settings, env prefix HISTOSYNTH_SCORING_ (e.g. HISTOSYNTH_SCORING_MAX_KEPT_FEATURES)."""

    max_kept_features: int = setting(
        10_000,
        "Largest feature reservoir per image set (KID, precision/recall, IS, bootstrap use it; FID uses "
        "every image). Memory: 2 x this x feature_dim x 8 bytes per open scoring call.",
        lambda value: None if value >= 4 else "must be >= 4",
    )
    max_bootstrap_resamples: int = setting(
        1000, "Most FID bootstrap resamples one request may ask for (each costs one FID).",
        lambda value: None if value >= 1 else "must be >= 1",
    )
    default_extractor: str = setting(
        DEFAULT_EXTRACTOR, "Encoder model used when a request leaves `extractor` empty.",
        lambda value: None if value.strip() else "must not be empty",
    )

    def __post_init__(self) -> None:
        check_settings(self)


# ------------------------------------------------------------------------------- extractor


@dataclass(frozen=True)
class ExtractorSpec:
    """An encoder's pre/post-processing contract, read from its manifest."""

    input_name: str
    input_dtype: np.dtype
    feature_output: str
    logits_output: str | None
    input_range: tuple[float, float]
    standard_fid: bool
    resize_to: tuple[int, int] | None  # (height, width) to resize to before the model; None = the graph does
    min_size: int
    feature_dim: int | None
    family: str
    description: str

    @classmethod
    def from_manifest(cls, manifest: ModelManifest, default_name: str = DEFAULT_EXTRACTOR) -> ExtractorSpec:
        metadata = manifest.metadata
        outputs = {spec.name: spec for spec in manifest.outputs}
        try:
            default_features = "features" if "features" in outputs else manifest.outputs[0].name
            feature_output = str(metadata.get("feature_output") or default_features)
            if "logits_output" in metadata:
                logits_output = None if metadata["logits_output"] is None else str(metadata["logits_output"])
            else:
                logits_output = "logits" if "logits" in outputs else None
            low, high = (float(value) for value in metadata.get("input_range", (0.0, 255.0)))
            standard_fid = bool(metadata.get("standard_fid", False))
            resize = metadata.get("resize") or {}
            resize_to = None
            if not bool(resize.get("inside_graph", True)):
                height, width = (int(value) for value in resize["size"])
                resize_to = (height, width)
            min_size = int(metadata.get("min_size", 1))
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise ScoringPreconditionError(
                f"model {manifest.key}: encoder metadata is invalid ({error}); re-export the model"
            ) from None
        for name in (feature_output, logits_output):
            if name is not None and name not in outputs:
                raise ScoringPreconditionError(
                    f"model {manifest.key}: metadata names output {name!r}, "
                    f"but the model's outputs are {sorted(outputs)}"
                )
        if high <= low or min_size < 1 or (resize_to is not None and min(resize_to) < 1):
            raise ScoringPreconditionError(
                f"model {manifest.key}: encoder metadata needs input_range low < high, min_size >= 1, "
                "resize.size >= 1"
            )
        dim = outputs[feature_output].shape[-1]
        feature_dim = dim if isinstance(dim, int) else None
        if standard_fid:
            family = INCEPTION_ALIAS
        elif manifest.name == default_name or metadata.get("family") == DEFAULT_EXTRACTOR:
            family = DEFAULT_EXTRACTOR
        else:
            family = "encoder"
        description = str(metadata.get("description") or _describe(manifest, family, feature_dim))
        return cls(
            input_name=manifest.inputs[0].name,
            input_dtype=np.dtype(manifest.inputs[0].dtype),
            feature_output=feature_output,
            logits_output=logits_output,
            input_range=(low, high),
            standard_fid=standard_fid,
            resize_to=resize_to,
            min_size=min_size,
            feature_dim=feature_dim,
            family=family,
            description=description,
        )


def _describe(manifest: ModelManifest, family: str, feature_dim: int | None) -> str:
    dim = "" if feature_dim is None else f"{feature_dim}-d "
    if family == INCEPTION_ALIAS:
        return f"standard InceptionV3 pool3 {dim}features ({manifest.key}); FID comparable with published numbers"
    return (
        f"histosynth {family} {dim}features ({manifest.key}); scores are comparable only with scores from "
        "the same extractor version, NOT with published Inception FID"
    )


@dataclass(frozen=True)
class ExtractorInfo:
    """What produced the features: travels with every distribution score."""

    model: ModelRef
    standard_fid: bool
    family: str
    feature_dim: int
    description: str


@dataclass(frozen=True)
class FeatureBatch:
    features: np.ndarray  # float [n, d] (float32 from a model)
    probs: np.ndarray | None  # float [n, classes] (softmax of the logits) or None


class FeatureExtractor:
    """One encoder model version behind its batcher: uint8 RGB images -> features (+ class probabilities)."""

    def __init__(self, served: ServedModel, spec: ExtractorSpec) -> None:
        self.served = served
        self.spec = spec

    @property
    def has_logits(self) -> bool:
        return self.spec.logits_output is not None

    def info(self, feature_dim: int) -> ExtractorInfo:
        spec = self.spec
        return ExtractorInfo(self.served.ref, spec.standard_fid, spec.family, feature_dim, spec.description)

    async def extract(
        self, images: np.ndarray | Sequence[np.ndarray], deadline: float | None = None, name: str = "images"
    ) -> FeatureBatch:
        """Features of every image, in input order; images of one size run as one batched request."""
        items = as_image_list(images, name)
        spec = self.spec
        if spec.resize_to is not None:
            items = await asyncio.to_thread(resize_images, items, spec.resize_to)
        for index, image in enumerate(items):
            if min(image.shape[:2]) < spec.min_size:
                raise InvalidInputError(
                    f"{name}[{index}]: {image.shape[0]} x {image.shape[1]} is smaller than the "
                    f"{spec.min_size} x {spec.min_size} minimum of extractor {self.served.manifest.key}"
                )
        groups = groups_by_size(items)
        for indices in groups.values():  # refuse what can never fit before converting gigabytes of pixels
            height, width = items[indices[0]].shape[:2]
            self.served.check_row_fits({spec.input_name: ((len(indices), 3, height, width), np.dtype(spec.input_dtype))})

        async def run(indices: list[int]) -> dict[str, np.ndarray]:
            # The float conversion of a large batch takes hundreds of ms: off the event loop, like PNG decoding.
            batch = await asyncio.to_thread(
                to_model_input, [items[i] for i in indices], spec.input_range, spec.input_dtype
            )
            return await self.served.infer({spec.input_name: batch}, deadline)

        results = await asyncio.gather(*(run(indices) for indices in groups.values()))
        order = np.concatenate([np.asarray(indices) for indices in groups.values()])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        # float32 as the model made them: halves reservoir memory; the statistics accumulate in float64.
        features = np.concatenate([np.asarray(out[spec.feature_output], np.float32) for out in results])
        features = features.reshape(features.shape[0], -1)[inverse]
        if not np.isfinite(features).all():
            raise HistosynthError(f"extractor {self.served.manifest.key} produced NaN or infinite features")
        probs = None
        if spec.logits_output is not None:
            logits = np.concatenate([np.asarray(out[spec.logits_output], np.float64) for out in results])
            probs = scipy.special.softmax(logits.reshape(logits.shape[0], -1), axis=1)[inverse].astype(np.float32)
        return FeatureBatch(features, probs)


# ------------------------------------------------------------------------------ accumulation


class FeatureReservoir:
    """Uniform sample of at most ``capacity`` rows of a stream (Vitter's algorithm R).

    Row t (0-based) of the stream replaces slot floor(u * (t + 1)) when that is < capacity,
    u ~ U[0, 1) from a seeded generator that draws one double per row past the capacity:
    the kept rows depend on the row order and the seed only, not on how the stream was
    cut into batches.
    """

    def __init__(self, capacity: int, seed: int | np.random.SeedSequence) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._rows: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        filled = min(self.seen, self.capacity)
        direct = min(self.capacity - filled, rows.shape[0])
        self._reserve(filled + direct, rows)
        assert self._rows is not None
        self._rows[filled:filled + direct] = rows[:direct]
        self.seen += direct
        rest = rows[direct:]
        if rest.shape[0]:
            positions = self.seen + np.arange(rest.shape[0])
            slots = np.floor(self._rng.random(rest.shape[0]) * (positions + 1)).astype(np.int64)
            for row, slot in zip(rest[slots < self.capacity], slots[slots < self.capacity], strict=True):
                self._rows[slot] = row
            self.seen += rest.shape[0]

    def _reserve(self, needed: int, like: np.ndarray) -> None:
        """Grow the buffer geometrically up to ``capacity``: small sets never pay for a full reservoir."""
        current = 0 if self._rows is None else self._rows.shape[0]
        if needed <= current:
            return
        size = min(self.capacity, max(needed, 2 * current, 64))
        grown = np.empty((size, like.shape[1]), dtype=like.dtype)
        if self._rows is not None:
            grown[:current] = self._rows
        self._rows = grown

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            return np.empty((0, 0))
        return self._rows[: min(self.seen, self.capacity)]


@dataclass(frozen=True)
class DistributionOptions:
    """Domain form of the request options; 0 / "" fields take the defaults documented in scoring.proto."""

    extractor: str = ""
    extractor_version: str = ""
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    fid_bootstrap: int = 0
    fid_ci_level: float = 0.95
    is_splits: int = 10
    seed: int = 0
    max_kept_features: int = 0  # 0 = server default
    fast_fid: bool = False  # "eigh" instead of the reference "sqrtm" matrix square root

    @classmethod
    def with_defaults(cls, **given: Any) -> DistributionOptions:
        """Build from wire values where 0 means "default"."""
        defaults = cls()
        values = {key: (value if value else getattr(defaults, key)) for key, value in given.items()}
        return cls(**values)

    def validate(self, settings: ScoringSettings) -> None:
        if self.kid_subsets > 10_000:
            raise InvalidInputError(f"kid_subsets={self.kid_subsets}: at most 10000")
        if self.kid_subset_size < 2:
            raise InvalidInputError(f"kid_subset_size={self.kid_subset_size}: must be >= 2")
        if self.pr_k < 1 or self.pr_k > 100:
            raise InvalidInputError(f"pr_k={self.pr_k}: must be in [1, 100]")
        if self.fid_bootstrap > settings.max_bootstrap_resamples:
            raise InvalidInputError(
                f"fid_bootstrap={self.fid_bootstrap}: this server allows at most {settings.max_bootstrap_resamples} "
                "resamples (HISTOSYNTH_SCORING_MAX_BOOTSTRAP_RESAMPLES)"
            )
        if not 0.0 < self.fid_ci_level < 1.0:
            raise InvalidInputError(f"fid_ci_level={self.fid_ci_level}: must be in (0, 1), e.g. 0.95")
        if self.is_splits < 1:
            raise InvalidInputError(f"is_splits={self.is_splits}: must be >= 1")
        if not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"seed={self.seed}: must be in [0, 2**63)")

    def kept_capacity(self, settings: ScoringSettings) -> int:
        if self.max_kept_features <= 0:
            return settings.max_kept_features
        return max(4, min(self.max_kept_features, settings.max_kept_features))


@dataclass(frozen=True)
class DistributionResult:
    extractor: ExtractorInfo
    real_count: int
    synthetic_count: int
    real_kept: int
    synthetic_kept: int
    fid: float
    fid_ci: distances.BootstrapInterval | None
    kid_mean: float
    kid_std: float
    kid_subsets: int
    kid_subset_size: int
    precision: float
    recall: float
    pr_k: int
    inception_score: tuple[float, float, int] | None  # (mean, std, splits) of the synthetic set


class DistributionAccumulator:
    """Running statistics + reservoirs of the real and synthetic feature sets."""

    def __init__(self, options: DistributionOptions, capacity: int) -> None:
        self.options = options
        self.capacity = capacity
        self._stats: dict[str, distances.StreamingFeatureStats] = {}
        self._reservoirs = {
            role: FeatureReservoir(capacity, np.random.SeedSequence([options.seed, index]))
            for index, role in enumerate(ROLES)
        }
        self._dim: int | None = None
        self._prob_columns: int | None = None

    def count(self, role: Role) -> int:
        stats = self._stats.get(role)
        return 0 if stats is None else stats.count

    def add(self, role: Role, batch: FeatureBatch) -> None:
        if role not in ROLES:
            raise InvalidInputError(f"role {role!r}: valid roles are {list(ROLES)}")
        features = batch.features
        dim = features.shape[1]
        if self._dim is None:
            self._dim = dim
            self._prob_columns = None if batch.probs is None else batch.probs.shape[1]
        elif dim != self._dim:
            raise InvalidInputError(f"feature dimension changed from {self._dim} to {dim} within one scoring call")
        self._stats.setdefault(role, distances.StreamingFeatureStats(dim)).update(features)
        rows = features if batch.probs is None else np.concatenate([features, batch.probs], axis=1)
        self._reservoirs[role].add(rows)

    def _kept(self, role: Role) -> tuple[np.ndarray, np.ndarray | None]:
        assert self._dim is not None
        rows = self._reservoirs[role].rows
        probs = rows[:, self._dim:] if self._prob_columns else None
        return rows[:, : self._dim], probs

    def result(self, extractor: ExtractorInfo) -> DistributionResult:
        """Compute every score (CPU heavy for large sets: call it in a worker thread)."""
        options = self.options
        counts = {role: self.count(role) for role in ROLES}
        for role in ROLES:
            if counts[role] < 2:
                raise InvalidInputError(
                    f"the {role} set has {counts[role]} image(s); FID/KID need at least 2 per set "
                    f"(precision/recall with pr_k={options.pr_k} needs more than {options.pr_k})"
                )
        real, _ = self._kept("real")
        synthetic, synthetic_probs = self._kept("synthetic")
        if min(real.shape[0], synthetic.shape[0]) <= options.pr_k:
            raise InvalidInputError(
                f"precision/recall with pr_k={options.pr_k} needs more than {options.pr_k} images per set; "
                f"got real {real.shape[0]}, synthetic {synthetic.shape[0]}; send more images or lower pr_k"
            )
        fid = distances.frechet_distance_from_stats(
            self._stats["real"], self._stats["synthetic"], method="eigh" if options.fast_fid else "sqrtm"
        )
        fid_ci = None
        if options.fid_bootstrap > 0:
            fid_ci = distances.bootstrap_ci(
                lambda a, b: distances.fid_from_features(a, b, method="eigh"),
                real, synthetic, n_boot=options.fid_bootstrap, alpha=1.0 - options.fid_ci_level, seed=options.seed,
            )
        subset_size = min(options.kid_subset_size, real.shape[0], synthetic.shape[0])
        kid_mean, kid_std = distances.kid(
            real, synthetic, num_subsets=options.kid_subsets, subset_size=subset_size, seed=options.seed
        )
        pr = distances.precision_recall(real, synthetic, k=options.pr_k)
        inception = None
        if synthetic_probs is not None:
            splits = min(options.is_splits, synthetic_probs.shape[0])
            mean, std = distances.inception_score(synthetic_probs, splits=splits)
            inception = (mean, std, splits)
        return DistributionResult(
            extractor=extractor,
            real_count=counts["real"],
            synthetic_count=counts["synthetic"],
            real_kept=real.shape[0],
            synthetic_kept=synthetic.shape[0],
            fid=fid,
            fid_ci=fid_ci,
            kid_mean=kid_mean,
            kid_std=kid_std,
            kid_subsets=options.kid_subsets,
            kid_subset_size=subset_size,
            precision=pr.precision,
            recall=pr.recall,
            pr_k=options.pr_k,
            inception_score=inception,
        )


class ImageScoringSession:
    """One streaming scoring call: add image batches per set, then ``result()``."""

    def __init__(self, extractor: FeatureExtractor, options: DistributionOptions, capacity: int) -> None:
        self.extractor = extractor
        self.options = options
        self.accumulator = DistributionAccumulator(options, capacity)
        self._dim: int | None = None

    async def add(self, role: Role, images: np.ndarray | Sequence[np.ndarray], deadline: float | None = None) -> None:
        if role not in ROLES:
            raise InvalidInputError(f"role {role!r}: valid roles are {list(ROLES)}")
        items = as_image_list(images, f"{role} images", allow_empty=True)
        if not items:
            return
        batch = await self.extractor.extract(items, deadline, name=f"{role} images")
        self._dim = batch.features.shape[1]
        self.accumulator.add(role, batch)

    async def result(self) -> DistributionResult:
        dim = self._dim or self.extractor.spec.feature_dim or 0
        info = self.extractor.info(dim)
        return await asyncio.to_thread(self.accumulator.result, info)


# -------------------------------------------------------------------------------- pipeline


async def hosted_manifests(host: ModelHost, kind: str) -> list[ModelManifest]:
    """Latest manifests of the models of ``kind`` that ``host`` serves (rescanning the store for new ones).

    Models come from ``host.get``, so loaded ones cost no file I/O; a model that fails to load
    (bad checksum, broken file) is left out here and reports its own error when asked for by name.
    """
    names = host.model_names(refresh=True)
    served = await asyncio.gather(*(host.get(name) for name in names), return_exceptions=True)
    return [
        model.manifest for model in served
        if isinstance(model, ServedModel) and model.manifest.kind == kind
    ]


class ScoringPipeline:
    """Distribution scores over encoder models hosted by ``host`` (kinds encoder and segmenter)."""

    def __init__(self, host: ModelHost, settings: ScoringSettings = ScoringSettings()) -> None:
        self.host = host
        self.settings = settings

    async def _encoders(self) -> list[ModelManifest]:
        """Manifests of the hosted encoders (latest versions; loaded models answer without file I/O)."""
        return await hosted_manifests(self.host, "encoder")

    async def extractor_names(self) -> list[str]:
        return [manifest.name for manifest in await self._encoders()]

    async def extractor(self, name: str = "", version: str = "") -> FeatureExtractor:
        """Resolve ``name`` ("" = default encoder, "inception-fid" = a standard_fid encoder, or a model name)."""
        if name == INCEPTION_ALIAS:
            model_name = await self._inception_model()
        elif not name:
            model_name = self.settings.default_extractor
            if model_name not in self.host.model_names() and model_name not in self.host.model_names(refresh=True):
                raise ScoringPreconditionError(
                    f"the default feature extractor {model_name!r} is not in the model store "
                    f"({self.host.store.root}); export it with `python -m histosynth.training.export.scoring_models "
                    "--config training/configs/histology-encoder.yaml ...`, or name an encoder in "
                    f"options.extractor; available encoders: {await self.extractor_names()}"
                )
        else:
            model_name = name
        try:
            served = await self.host.get(model_name, version or None)
        except ModelNotFoundError:
            raise ModelNotFoundError(
                model_name, version or None, [*await self.extractor_names(), INCEPTION_ALIAS]
            ) from None
        if served.manifest.kind != "encoder":
            raise InvalidInputError(
                f"extractor {served.manifest.key} is a {served.manifest.kind} model, not an encoder; "
                f"valid extractors: {['', INCEPTION_ALIAS, *await self.extractor_names()]}"
            )
        return FeatureExtractor(served, ExtractorSpec.from_manifest(served.manifest, self.settings.default_extractor))

    async def _inception_model(self) -> str:
        candidates = [m.name for m in await self._encoders() if bool(m.metadata.get("standard_fid", False))]
        if not candidates:
            raise ScoringPreconditionError(
                f"extractor {INCEPTION_ALIAS!r} needs a standard InceptionV3 model in the model store "
                f"({self.host.store.root}) and none has metadata standard_fid: true; {INCEPTION_BUILD_HINT}. "
                f"Available encoders: {await self.extractor_names()} (use \"\" for the histology encoder)"
            )
        return INCEPTION_ALIAS if INCEPTION_ALIAS in candidates else sorted(candidates)[0]

    async def open_session(self, options: DistributionOptions) -> ImageScoringSession:
        options.validate(self.settings)
        extractor = await self.extractor(options.extractor, options.extractor_version)
        return ImageScoringSession(extractor, options, options.kept_capacity(self.settings))

    async def score_images(
        self,
        real: np.ndarray | Sequence[np.ndarray],
        synthetic: np.ndarray | Sequence[np.ndarray],
        options: DistributionOptions = DistributionOptions(),
        deadline: float | None = None,
    ) -> DistributionResult:
        """FID, KID, precision/recall (+ IS, + FID interval) of two in-memory image sets."""
        real_items = as_image_list(real, "real images")
        synthetic_items = as_image_list(synthetic, "synthetic images")
        session = await self.open_session(options)
        await session.add("real", real_items, deadline)
        await session.add("synthetic", synthetic_items, deadline)
        return await session.result()
