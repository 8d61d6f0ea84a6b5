"""Scoring pipeline over real ONNX Runtime models in a tmp model store: extractor selection and
preprocessing, streaming accumulation, reservoir, mask/segmentation wrappers, consistency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import pytest_asyncio

from services.core.config import ConfigError, load_settings
from services.core.errors import InvalidInputError, ModelNotFoundError
from services.core.model_store import ModelStore
from services.model_host import ModelHost, ModelRef
from services.scoring import distances, segmentation
from services.scoring.class_maps import score_masks, score_segmentation, tumor_proportions
from services.scoring.consistency import ConsistencyScorer, SegmenterSpec, present_class_miou, to_segmenter_ids
from services.scoring.images import decode_png
from services.scoring.pipeline import (
    MODEL_KINDS,
    DistributionAccumulator,
    DistributionOptions,
    ExtractorInfo,
    FeatureBatch,
    FeatureReservoir,
    ExtractorSpec,
    ScoringPipeline,
    ScoringPreconditionError,
    ScoringSettings,
)
from tests.fixtures.scoring_models import (
    ENCODER_NAME,
    FEATURE_DIM,
    INCEPTION_NAME,
    RENDERER_CLASSES,
    SEGMENTER_NAME,
    write_model,
    build_encoder,
    paint,
    textured_images,
    write_encoder,
    write_scoring_store,
)
from tests.fixtures.service_models import RENDERER_NAME


async def _started(root: Path) -> ModelHost:
    host = ModelHost(ModelStore(root), MODEL_KINDS)
    await host.start()
    return host


@pytest_asyncio.fixture
async def host(tmp_path: Path) -> AsyncIterator[ModelHost]:
    served = await _started(write_scoring_store(tmp_path / "store", inception=True))
    yield served
    await served.stop()


@pytest_asyncio.fixture
async def host_without_inception(tmp_path: Path) -> AsyncIterator[ModelHost]:
    served = await _started(write_scoring_store(tmp_path / "store"))
    yield served
    await served.stop()


def class_maps(count: int, height: int, width: int) -> np.ndarray:
    maps = np.zeros((count, height, width), np.uint8)
    for i in range(count):
        maps[i, 2 + i: height // 2, :] = 1
        maps[i, height // 2 + 1:, width // 3 + i:] = 2
    return maps


# --------------------------------------------------------------------------- reservoir
def test_reservoir_keeps_everything_under_capacity() -> None:
    rows = np.arange(30, dtype=np.float64).reshape(15, 2)
    reservoir = FeatureReservoir(20, seed=0)
    reservoir.add(rows[:7])
    reservoir.add(rows[7:])
    np.testing.assert_array_equal(reservoir.rows, rows)
    growing = FeatureReservoir(1000, seed=0)  # buffer grows 64 -> 128 -> 256 as rows arrive
    many = np.arange(600, dtype=np.float32).reshape(300, 2)
    for start in range(0, 300, 70):
        growing.add(many[start:start + 70])
    np.testing.assert_array_equal(growing.rows, many)


def test_reservoir_is_capped_and_independent_of_batch_cuts() -> None:
    rows = np.arange(200, dtype=np.float64)[:, None]
    whole = FeatureReservoir(16, seed=3)
    whole.add(rows)
    pieces = FeatureReservoir(16, seed=3)
    for start in (0, 5, 17, 60, 61, 150):
        pieces.add(rows[start:{0: 5, 5: 17, 17: 60, 60: 61, 61: 150, 150: 200}[start]])
    assert whole.rows.shape == (16, 1) and whole.seen == 200
    np.testing.assert_array_equal(whole.rows, pieces.rows)
    assert len(np.unique(whole.rows)) == 16


def test_reservoir_is_uniform() -> None:
    kept = np.zeros(100)
    for seed in range(400):
        reservoir = FeatureReservoir(10, seed=seed)
        reservoir.add(np.arange(100, dtype=np.float64)[:, None])
        kept[reservoir.rows[:, 0].astype(int)] += 1
    # Each row is kept with probability 0.1: expected 40 of 400, binomial std 6.
    assert abs(kept[:50].mean() - 40) < 4 and abs(kept[50:].mean() - 40) < 4
    assert kept.min() > 15 and kept.max() < 70


# ------------------------------------------------------------------------ accumulation
def _info() -> ExtractorInfo:
    return ExtractorInfo(ModelRef("m", "1", "0" * 64), False, "encoder", 5, "test")


def test_accumulator_matches_the_distance_functions() -> None:
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 5)), rng.normal(0.5, 1.2, size=(30, 5))
    probs = rng.dirichlet(np.ones(3), size=30)
    options = DistributionOptions(kid_subsets=20, kid_subset_size=25, seed=4)
    acc = DistributionAccumulator(options, capacity=100)
    for start in range(0, 40, 9):
        acc.add("real", FeatureBatch(real[start:start + 9], rng.dirichlet(np.ones(3), size=len(real[start:start + 9]))))
    acc.add("synthetic", FeatureBatch(fake[:11], probs[:11]))
    acc.add("synthetic", FeatureBatch(fake[11:], probs[11:]))
    result = acc.result(_info())
    assert result.fid == pytest.approx(distances.fid_from_features(real, fake), rel=1e-9)
    assert (result.kid_mean, result.kid_std) == distances.kid(real, fake, num_subsets=20, subset_size=25, seed=4)
    pr = distances.precision_recall(real, fake, k=3)
    assert (result.precision, result.recall) == (pr.precision, pr.recall)
    assert result.inception_score == (*distances.inception_score(probs, splits=10), 10)
    assert (result.real_count, result.synthetic_count, result.real_kept, result.fid_ci) == (40, 30, 40, None)
    fast = DistributionAccumulator(DistributionOptions(fast_fid=True), capacity=100)
    fast.add("real", FeatureBatch(real, None))
    fast.add("synthetic", FeatureBatch(fake, None))
    assert fast.result(_info()).fid == pytest.approx(result.fid, rel=1e-6)


def test_accumulator_bootstrap_and_reservoir_cap() -> None:
    rng = np.random.default_rng(1)
    options = DistributionOptions(fid_bootstrap=10, fid_ci_level=0.9, seed=2)
    acc = DistributionAccumulator(options, capacity=12)
    acc.add("real", FeatureBatch(rng.normal(size=(30, 4)), None))
    acc.add("synthetic", FeatureBatch(rng.normal(1.0, 1.0, size=(20, 4)), None))
    result = acc.result(_info())
    assert (result.real_count, result.real_kept, result.synthetic_kept) == (30, 12, 12)
    assert result.fid_ci is not None and result.fid_ci.n_boot == 10 and result.fid_ci.alpha == pytest.approx(0.1)
    assert result.fid_ci.low <= result.fid_ci.high
    assert result.inception_score is None


def test_accumulator_refuses_too_few_images() -> None:
    acc = DistributionAccumulator(DistributionOptions(), capacity=10)
    acc.add("real", FeatureBatch(np.ones((5, 3)) * np.arange(5)[:, None], None))
    acc.add("synthetic", FeatureBatch(np.ones((1, 3)), None))
    with pytest.raises(InvalidInputError, match="synthetic set has 1 image"):
        acc.result(_info())


def test_settings_come_from_the_environment() -> None:
    settings = load_settings(ScoringSettings, prefix="HISTOSYNTH_SCORING_",
                             environ={"HISTOSYNTH_SCORING_MAX_KEPT_FEATURES": "500"})
    assert settings.max_kept_features == 500 and settings.default_extractor == ENCODER_NAME
    with pytest.raises(ConfigError, match="HISTOSYNTH_SCORING_MAX_KEPT_FEATURES='2': must be >= 4"):
        load_settings(ScoringSettings, prefix="HISTOSYNTH_SCORING_", environ={"HISTOSYNTH_SCORING_MAX_KEPT_FEATURES": "2"})
    with pytest.raises(ConfigError, match="max_bootstrap_resamples"):
        ScoringSettings(max_bootstrap_resamples=0)


def test_options_validation() -> None:
    settings = ScoringSettings(max_bootstrap_resamples=5)
    with pytest.raises(InvalidInputError, match="at most 5"):
        DistributionOptions(fid_bootstrap=6).validate(settings)
    with pytest.raises(InvalidInputError, match="fid_ci_level"):
        DistributionOptions(fid_ci_level=1.5).validate(settings)
    assert DistributionOptions.with_defaults(pr_k=0, kid_subsets=7).pr_k == 3
    assert DistributionOptions(max_kept_features=10**9).kept_capacity(settings) == settings.max_kept_features


# -------------------------------------------------------------------------- extraction
async def test_features_equal_a_direct_onnxruntime_run(host: ModelHost) -> None:
    pipeline = ScoringPipeline(host)
    extractor = await pipeline.extractor()
    assert extractor.served.manifest.name == ENCODER_NAME and extractor.has_logits
    images = [textured_images(1, 32, 0)[0], textured_images(1, 24, 1)[0], textured_images(1, 32, 2)[0]]
    batch = await extractor.extract(images)
    session = ort.InferenceSession(str(extractor.served.manifest.path), providers=["CPUExecutionProvider"])
    for image, features in zip(images, batch.features, strict=True):
        x = image.astype(np.float32).transpose(2, 0, 1)[None]
        expected = session.run(["features"], {"image": x})[0][0]
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert batch.probs is not None and np.allclose(batch.probs.sum(axis=1), 1.0)


async def test_default_extractor_scores_name_the_encoder(host: ModelHost) -> None:
    pipeline = ScoringPipeline(host)
    real, synthetic = textured_images(12, 32, 0), textured_images(12, 32, 1, tint=(40, -30, 0))
    result = await pipeline.score_images(real, synthetic, DistributionOptions(kid_subsets=10))
    assert result.extractor.model.name == ENCODER_NAME and not result.extractor.standard_fid
    assert result.extractor.family == "histology-encoder" and "NOT with published" in result.extractor.description
    assert result.extractor.feature_dim == FEATURE_DIM and result.inception_score is not None
    same = await pipeline.score_images(real, real, DistributionOptions(kid_subsets=10))
    assert abs(same.fid) < 1e-6 < result.fid
    assert same.precision == same.recall == 1.0


async def test_inception_alias_picks_the_standard_fid_model(host: ModelHost) -> None:
    pipeline = ScoringPipeline(host)
    images = textured_images(8, 32, 0)
    result = await pipeline.score_images(images, images[::-1], DistributionOptions(extractor="inception-fid"))
    assert result.extractor.model.name == INCEPTION_NAME and result.extractor.standard_fid
    assert result.extractor.family == "inception-fid"
    assert result.inception_score is None  # this model has no logits output


async def test_missing_inception_is_a_precondition_with_instructions(host_without_inception: ModelHost) -> None:
    pipeline = ScoringPipeline(host_without_inception)
    with pytest.raises(ScoringPreconditionError, match="fid_inception") as caught:
        await pipeline.extractor("inception-fid")
    assert caught.value.status == "FAILED_PRECONDITION" and "standard_fid: true" in caught.value.message


async def test_missing_default_extractor_is_a_precondition(tmp_path: Path) -> None:
    root = write_scoring_store(tmp_path / "store")
    host = await _started(root)
    try:
        pipeline = ScoringPipeline(host, ScoringSettings(default_extractor="no-such-encoder"))
        with pytest.raises(ScoringPreconditionError, match="no-such-encoder"):
            await pipeline.extractor("")
    finally:
        await host.stop()


def test_build_hints_name_modules_that_exist_under_the_installed_package() -> None:
    """The commands the scorer tells users to run must work from a wheel install (only `histosynth.*` is
    importable there) as well as from a checkout, so they use the `histosynth.` spelling."""
    import importlib.util
    import re

    from services.scoring import pipeline as pipeline_module

    source = Path(pipeline_module.__file__).read_text()
    modules = re.findall(r"python -m ([\w.]+)", source)
    assert modules, "the scorer's hints name no command"
    for module in modules:
        assert module.startswith("histosynth."), module
        assert importlib.util.find_spec(module) is not None, module


async def test_unknown_and_wrong_kind_extractors(host: ModelHost) -> None:
    pipeline = ScoringPipeline(host)
    with pytest.raises(ModelNotFoundError, match="inception-fid"):
        await pipeline.extractor("resnet-nope")
    with pytest.raises(InvalidInputError, match="segmenter model, not an encoder"):
        await pipeline.extractor(SEGMENTER_NAME)


def test_extractor_spec_reads_the_export_metadata(tmp_path: Path) -> None:
    """Metadata exactly as training/export/scoring_models.py writes it for histology-encoder."""
    version_dir = write_model(tmp_path, ENCODER_NAME, "encoder", build_encoder(), {
        "feature": "pooled", "feature_dim": FEATURE_DIM, "standard_fid": False, "input_range": [0.0, 255.0],
        "input_layout": "NCHW RGB float32", "normalisation_inside_graph": "x / 127.5 - 1",
        "resize": {"size": [128, 128], "method": "bilinear", "align_corners": False, "antialias": False,
                   "inside_graph": True},
    })
    spec = ExtractorSpec.from_manifest(ModelStore(tmp_path).get(ENCODER_NAME))
    assert (spec.feature_output, spec.logits_output, spec.resize_to, spec.min_size) == ("features", "logits", None, 1)
    assert (spec.family, spec.standard_fid, spec.feature_dim, spec.input_range) == (
        "histology-encoder", False, FEATURE_DIM, (0.0, 255.0))
    assert version_dir.is_dir()


async def test_host_side_resize_when_the_graph_does_not_resize(tmp_path: Path) -> None:
    root = write_scoring_store(tmp_path / "store")
    write_encoder(root, "encoder-fixed-16", resize=16)
    host = await _started(root)
    try:
        extractor = await ScoringPipeline(host).extractor("encoder-fixed-16")
        assert extractor.spec.resize_to == (16, 16) and extractor.spec.family == "encoder"
        image = textured_images(1, 40, 5)[0]
        batch = await extractor.extract([image, cv2.resize(image, (16, 16), interpolation=cv2.INTER_LINEAR)])
        np.testing.assert_array_equal(batch.features[0], batch.features[1])
    finally:
        await host.stop()


async def test_too_small_images_are_refused(host: ModelHost) -> None:
    extractor = await ScoringPipeline(host).extractor()
    with pytest.raises(InvalidInputError, match="smaller than the 4 x 4 minimum"):
        await extractor.extract(np.zeros((2, 3, 8, 3), np.uint8))


# ---------------------------------------------------------------------------------- PNG
def test_png_decoding_variants() -> None:
    rgb = textured_images(1, 16, 3)[0]
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(decode_png(encoded.tobytes(), "p"), rgb)
    _, grey = cv2.imencode(".png", rgb[:, :, 0])
    assert decode_png(grey.tobytes(), "p").shape == (16, 16, 3)
    _, rgba = cv2.imencode(".png", np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full((16, 16), 9, np.uint8)]))
    np.testing.assert_array_equal(decode_png(rgba.tobytes(), "p"), rgb)
    _, deep = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(InvalidInputError, match="8-bit"):
        decode_png(deep.tobytes(), "p")
    with pytest.raises(InvalidInputError, match="p: not a PNG"):
        decode_png(b"GIF89a....", "p")
    with pytest.raises(InvalidInputError, match="could not be decoded"):
        decode_png(encoded.tobytes()[:40], "p")


# --------------------------------------------------------------------- masks, segmentation
def test_score_masks_identical_and_different_sets() -> None:
    maps = class_maps(6, 20, 20)
    same = score_masks(maps, maps)
    assert same.class_ids == (1, 2) and same.real_masks == 6  # background 0 is not described by default
    assert all(f.ks_statistic == 0.0 and f.ks_pvalue == 1.0 and f.js_divergence == 0.0 for f in same.features)
    assert score_masks(maps, maps, include_background=True).class_ids == (0, 1, 2)
    shifted = maps.copy()
    shifted[:, :, :6] = 1
    different = score_masks(maps, shifted, class_ids=[1], include_border_objects=True)
    area = next(f for f in different.features if f.name == "image/area_fraction/class_1")
    assert area.ks_statistic == 1.0 and area.js_divergence > 0.5 and area.synthetic_mean > area.real_mean
    with pytest.raises(InvalidInputError, match="connectivity"):
        score_masks(maps, maps, connectivity=6)
    with pytest.raises(InvalidInputError, match="bins"):
        score_masks(maps, maps, bins=0)
    with pytest.raises(InvalidInputError, match="twice"):
        score_masks(maps, maps, class_ids=[1, 1])


def test_score_segmentation_matches_the_metrics_module() -> None:
    reference = class_maps(3, 16, 16)
    predicted = reference.copy()
    predicted[:, :3, :3] = 2
    result = score_segmentation(predicted, reference)
    expected = segmentation.evaluate_segmentation(list(reference), list(predicted), 3)
    assert result.scores == expected and result.predicted_tps == ()
    probs = np.full((3, 3, 16, 16), 1 / 3, np.float32)
    with_probs = score_segmentation(predicted, reference, probs)
    assert with_probs.scores.cross_entropy == pytest.approx(np.log(3), rel=1e-6)
    ignored = reference.copy()
    ignored[:, 0, :] = 255
    assert score_segmentation(predicted, ignored, ignore_index=255).scores.num_classes == 3
    with pytest.raises(InvalidInputError, match="does not match reference shape"):
        score_segmentation(predicted[:, :8], reference)


def test_tumor_proportions() -> None:
    maps = np.zeros((2, 10, 10), np.uint8)
    maps[0, :5] = 1  # 50 positive
    maps[0, 5:7] = 2  # 20 negative
    results = tumor_proportions(maps, positive_id=1, negative_id=2)
    assert results[0].tps == pytest.approx(50 / 70) and results[0].bin == ">=50%"
    assert (results[1].tps, results[1].bin) == (0.0, "<1%")


# --------------------------------------------------------------------------- consistency
async def test_consistency_of_painted_images(host: ModelHost) -> None:
    scorer = ConsistencyScorer(host)
    maps = class_maps(3, 30, 27)  # not multiples of the segmenter's size_multiple: padded and cropped
    result = await scorer.score(paint(maps, noise=8.0), maps, renderer=RENDERER_NAME, min_miou=0.9)
    assert result.segmenter.name == SEGMENTER_NAME
    np.testing.assert_array_equal(result.miou, 1.0)
    assert result.passed.all() and [p.shape for p in result.predictions] == [(30, 27)] * 3
    wrong = maps.copy()
    wrong[0][maps[0] == 1] = 2  # image 0 shows stroma where its mask says nucleus
    mixed = await scorer.score(paint(wrong), maps, segmenter=SEGMENTER_NAME, min_miou=0.9)
    assert mixed.miou[0] < 0.9 and not mixed.passed[0] and mixed.passed[1:].all()


async def test_consistency_protocol_for_generation(host: ModelHost) -> None:
    scorer = ConsistencyScorer(host)
    maps = class_maps(1, 16, 16)
    assert await scorer.consistency(paint(maps)[0], maps[0], RENDERER_CLASSES) == 1.0
    assert await scorer.consistency(paint(maps)[0], maps[0], RENDERER_CLASSES, renderer=RENDERER_NAME) == 1.0
    with pytest.raises(ScoringPreconditionError, match="no segmenter matches"):
        await scorer.consistency(paint(maps)[0], maps[0], ("a", "b"))


async def test_consistency_input_errors(host: ModelHost) -> None:
    scorer = ConsistencyScorer(host)
    maps = class_maps(2, 16, 16)
    with pytest.raises(InvalidInputError, match="2 images but 1 conditioning masks"):
        await scorer.score(paint(maps), maps[:1], renderer=RENDERER_NAME)
    with pytest.raises(InvalidInputError, match="must match its image"):
        await scorer.score(paint(maps), maps[:, :8], renderer=RENDERER_NAME)
    with pytest.raises(ScoringPreconditionError, match="no segmenter in the model store checks renderer"):
        await scorer.score(paint(maps), maps, renderer="renderer-unknown")
    bad = maps.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(InvalidInputError, match="class id 7 has no counterpart"):
        await scorer.score(paint(maps), bad, renderer=RENDERER_NAME)


def test_multi_target_renderer_ids() -> None:
    spec = SegmenterSpec("image", np.dtype(np.float32), "logits", 4, (), 8, (0.0, 255.0), "r",
                         {0: (0,), 1: (1,), 5: (1, 2, 3)})
    mask = np.array([[0, 5, 5, 5], [1, 5, 5, 0]])
    predicted = np.array([[0, 2, 3, 0], [1, 1, 0, 0]])
    target = to_segmenter_ids(mask, predicted, spec, "s/1")
    np.testing.assert_array_equal(target, [[0, 2, 3, 1], [1, 1, 1, 0]])
    # class 0: tp 2, union 4; class 1: tp 2, union 4; classes 2 and 3: perfect.
    assert present_class_miou(target, predicted, 4) == pytest.approx((2 / 4 + 2 / 4 + 1 + 1) / 4)
    assert present_class_miou(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64), 4) == 1.0
