"""Scoring over real gRPC on loopback: every RPC, stream == unary, extractor always named, bad inputs
-> INVALID_ARGUMENT / FAILED_PRECONDITION with clear messages, and the server keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import cv2
import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services._generated.histosynth.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc
from services.scoring import mask_stats
from services.scoring import servicer as scoring
from services.scoring.servicer import SERVICE_NAME
from services.tensor_codec import array_to_tensor, tensor_to_array
from tests.fixtures.scoring_models import (
    ENCODER_NAME,
    FEATURE_DIM,
    SEGMENTER_NAME,
    paint,
    textured_images,
    write_scoring_store,
)
from tests.fixtures.service_models import RENDERER_NAME
from tests.integration.conftest import LiveServer, live_server
from training.experiments.report import mask_scores_to_dict

pytestmark = pytest.mark.asyncio(loop_scope="module")

N = 24  # more images than feature dimensions, so covariances are full rank
REAL = textured_images(N, 32, seed=0)
SYNTHETIC = textured_images(N, 32, seed=1, tint=(35, -25, 10))
OPTIONS = scoring_pb2.DistributionOptions(kid_subsets=20, seed=5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scoring_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveServer]:
    store = write_scoring_store(tmp_path_factory.mktemp("scoring_store") / "model_store")
    async for server in live_server(scoring.start, store):
        yield server


def stub(server: LiveServer) -> scoring_pb2_grpc.ScoringStub:
    return scoring_pb2_grpc.ScoringStub(server.channel)


def tensor_set(images: np.ndarray) -> scoring_pb2.ImageSet:
    return scoring_pb2.ImageSet(images=array_to_tensor(images))


def png_set(images: Iterable[np.ndarray]) -> scoring_pb2.ImageSet:
    return scoring_pb2.ImageSet(
        png_images=[cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes() for image in images]
    )


def class_maps(count: int, height: int, width: int) -> np.ndarray:
    maps = np.zeros((count, height, width), np.uint8)
    for i in range(count):
        maps[i, 2 + i: height // 2, :] = 1
        maps[i, height // 2 + 1:, width // 3 + i:] = 2
    return maps


def assert_names_encoder(scores: scoring_pb2.DistributionScores) -> None:
    extractor = scores.extractor
    assert extractor.model.name == ENCODER_NAME and extractor.model.version == "1" and len(extractor.model.sha256) == 64
    assert not extractor.standard_fid and extractor.family == "histology-encoder"
    assert extractor.feature_dim == FEATURE_DIM and "NOT with published" in extractor.description


async def expect_error(call, code: grpc.StatusCode, *fragments: str) -> str:  # noqa: ANN001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details(), caught.value.details()
    return caught.value.details()


# -------------------------------------------------------------------------------- images
async def test_score_images_tensor_and_png_agree(scoring_server: LiveServer) -> None:
    raw = await stub(scoring_server).ScoreImages(
        scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL), synthetic=tensor_set(SYNTHETIC), options=OPTIONS),
        timeout=30,
    )
    assert_names_encoder(raw)
    assert (raw.real_count, raw.synthetic_count, raw.real_kept, raw.synthetic_kept) == (N, N, N, N)
    assert raw.fid > 0 and 0 <= raw.precision <= 1 and 0 <= raw.recall <= 1
    assert (raw.kid_subsets, raw.kid_subset_size, raw.pr_k) == (20, N, 3)
    assert raw.HasField("inception_score") and raw.inception_score.splits == 10
    assert not raw.HasField("fid_ci")
    png = await stub(scoring_server).ScoreImages(
        scoring_pb2.ScoreImagesRequest(real=png_set(REAL), synthetic=png_set(SYNTHETIC), options=OPTIONS), timeout=30
    )
    assert png == raw  # PNG is lossless: same pixels, same features, same scores


async def test_stream_equals_unary(scoring_server: LiveServer) -> None:
    options = scoring_pb2.DistributionOptions(kid_subsets=20, seed=5, fid_bootstrap=8, max_kept_features=10)
    unary = await stub(scoring_server).ScoreImages(
        scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL), synthetic=tensor_set(SYNTHETIC), options=options),
        timeout=30,
    )

    async def batches() -> AsyncIterator[scoring_pb2.ImageBatch]:
        yield scoring_pb2.ImageBatch(options=options)  # options only
        cuts = [(0, 3), (3, 4), (4, 15), (15, N)]
        for (start, stop), (s_start, s_stop) in zip(cuts, reversed(cuts), strict=True):
            yield scoring_pb2.ImageBatch(role=scoring_pb2.IMAGE_SET_ROLE_REAL, images=tensor_set(REAL[start:stop]))
            yield scoring_pb2.ImageBatch(
                options=options,  # repeating the same options is allowed
                role=scoring_pb2.IMAGE_SET_ROLE_SYNTHETIC, images=png_set(SYNTHETIC[s_start:s_stop]),
            )

    streamed = await stub(scoring_server).ScoreImageStream(batches(), timeout=30)
    assert_names_encoder(streamed)
    assert (streamed.real_count, streamed.real_kept, streamed.synthetic_kept) == (N, 10, 10)
    # Synthetic batches arrive in a different cut order, so compare per set only where order is kept:
    # FID does not depend on order; KID/PR/IS/bootstrap use reservoirs that depend on row order.
    assert streamed.fid == pytest.approx(unary.fid, rel=1e-9, abs=1e-12)
    assert streamed.fid_ci.resamples == 8 and streamed.fid_ci.level == pytest.approx(0.95)


async def test_stream_in_unary_order_gives_identical_scores(scoring_server: LiveServer) -> None:
    options = scoring_pb2.DistributionOptions(kid_subsets=20, seed=9, max_kept_features=9, fid_bootstrap=5)
    unary = await stub(scoring_server).ScoreImages(
        scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL), synthetic=tensor_set(SYNTHETIC), options=options),
        timeout=30,
    )

    async def batches() -> AsyncIterator[scoring_pb2.ImageBatch]:
        for index, start in enumerate(range(0, N, 5)):
            first = {"options": options} if index == 0 else {}
            yield scoring_pb2.ImageBatch(**first, role=scoring_pb2.IMAGE_SET_ROLE_SYNTHETIC,
                                         images=tensor_set(SYNTHETIC[start:start + 5]))
            yield scoring_pb2.ImageBatch(role=scoring_pb2.IMAGE_SET_ROLE_REAL, images=tensor_set(REAL[start:start + 5]))

    streamed = await stub(scoring_server).ScoreImageStream(batches(), timeout=30)
    assert streamed.fid == pytest.approx(unary.fid, rel=1e-9, abs=1e-12)
    same = ("kid_mean", "kid_std", "precision", "recall", "real_kept", "synthetic_kept", "inception_score", "fid_ci")
    for field in same:
        assert getattr(streamed, field) == getattr(unary, field), field
    assert streamed.extractor == unary.extractor


async def test_inception_without_model_is_failed_precondition(scoring_server: LiveServer) -> None:
    request = scoring_pb2.ScoreImagesRequest(
        real=tensor_set(REAL), synthetic=tensor_set(SYNTHETIC),
        options=scoring_pb2.DistributionOptions(extractor="inception-fid"),
    )
    await expect_error(
        stub(scoring_server).ScoreImages(request, timeout=30), grpc.StatusCode.FAILED_PRECONDITION,
        "standard_fid: true", "training/export/fid_inception.py",
    )

    async def one() -> AsyncIterator[scoring_pb2.ImageBatch]:
        yield scoring_pb2.ImageBatch(
            options=request.options, role=scoring_pb2.IMAGE_SET_ROLE_REAL, images=tensor_set(REAL)
        )

    await expect_error(stub(scoring_server).ScoreImageStream(one(), timeout=30), grpc.StatusCode.FAILED_PRECONDITION)
    await expect_error(
        stub(scoring_server).ScoreImages(
            scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL), synthetic=tensor_set(SYNTHETIC),
                                           options=scoring_pb2.DistributionOptions(extractor="resnet-nope")),
            timeout=30,
        ),
        grpc.StatusCode.NOT_FOUND, "resnet-nope", ENCODER_NAME,
    )


async def test_bad_image_requests(scoring_server: LiveServer) -> None:
    s = stub(scoring_server)
    floats = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[2, 8, 8, 3], data=bytes(2 * 8 * 8 * 3 * 4))
    cases = [
        (scoring_pb2.ScoreImagesRequest(real=scoring_pb2.ImageSet(images=floats), synthetic=tensor_set(SYNTHETIC)),
         "real.images: expected uint8"),
        (scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL)), "synthetic: no images"),
        (scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL[:1]), synthetic=tensor_set(SYNTHETIC)),
         "real set has 1 image"),
        (scoring_pb2.ScoreImagesRequest(real=scoring_pb2.ImageSet(png_images=[b"not a png"]),
                                        synthetic=tensor_set(SYNTHETIC)),
         "real.png_images[0]: not a PNG"),
        (scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL[:, :2, :2]), synthetic=tensor_set(SYNTHETIC)),
         "minimum"),
        (scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL[..., :2].copy()), synthetic=tensor_set(SYNTHETIC)),
         "last axis 2"),
    ]
    for request, fragment in cases:
        await expect_error(s.ScoreImages(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, fragment)

    async def unlabeled() -> AsyncIterator[scoring_pb2.ImageBatch]:
        yield scoring_pb2.ImageBatch(images=tensor_set(REAL))

    async def changing() -> AsyncIterator[scoring_pb2.ImageBatch]:
        yield scoring_pb2.ImageBatch(options=OPTIONS, role=scoring_pb2.IMAGE_SET_ROLE_REAL, images=tensor_set(REAL))
        yield scoring_pb2.ImageBatch(options=scoring_pb2.DistributionOptions(seed=1))

    async def empty() -> AsyncIterator[scoring_pb2.ImageBatch]:
        return
        yield  # pragma: no cover

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(s.ScoreImageStream(unlabeled(), timeout=30), invalid, "IMAGE_SET_ROLE_UNSPECIFIED")
    await expect_error(s.ScoreImageStream(changing(), timeout=30), invalid, "message 1: options differ")
    await expect_error(s.ScoreImageStream(empty(), timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "stream was empty")
    # Still serving after all of that.
    ok = await s.ScoreImages(
        scoring_pb2.ScoreImagesRequest(real=tensor_set(REAL), synthetic=tensor_set(SYNTHETIC), options=OPTIONS),
        timeout=30,
    )
    assert_names_encoder(ok)


# ------------------------------------------------------------------------ masks, segmentation
async def test_score_masks(scoring_server: LiveServer) -> None:
    real = class_maps(6, 20, 20)
    synthetic = real.copy()
    synthetic[:, :, :5] = 1
    response = await stub(scoring_server).ScoreMasks(
        scoring_pb2.ScoreMasksRequest(real_masks=array_to_tensor(real), synthetic_masks=array_to_tensor(synthetic)),
        timeout=30,
    )
    # Background 0 is not described by default; every class-1/2 region here touches the border, so no
    # object is measured (status "absent", border objects counted) and only the image features compare.
    assert list(response.class_ids) == [1, 2] and (response.real_count, response.synthetic_count) == (6, 6)
    assert (response.bins, response.connectivity, response.include_border_objects) == (20, 8, False)
    assert [c.status for c in response.classes] == ["absent", "absent"]
    assert response.classes[0].real_border_objects == 6 and not response.classes[0].HasField("mean_ks")
    assert not response.HasField("mean_js") and response.image_mean_ks > 0
    by_name = {feature.name: feature for feature in response.features}
    assert set(by_name) == {f"image/{f}/class_{c}" for f in ("area_fraction", "object_count") for c in (1, 2)}
    area = by_name["image/area_fraction/class_1"]
    assert area.ks_statistic > 0.5 and area.ks_pvalue < 0.05 and 0.5 < area.js_divergence <= 1.0
    assert np.isfinite(area.kl_divergence) and (area.group, area.class_id, area.feature) == ("image", 1, "area_fraction")
    # Measured as cut, the border objects compare too; the deprecated kl_bins still sets the bins.
    cut = await stub(scoring_server).ScoreMasks(
        scoring_pb2.ScoreMasksRequest(real_masks=array_to_tensor(real), synthetic_masks=array_to_tensor(synthetic),
                                      include_border_objects=True, include_background=True, kl_bins=7),
        timeout=30,
    )
    assert list(cut.class_ids) == [0, 1, 2] and cut.bins == 7 and cut.include_border_objects
    assert [c.status for c in cut.classes] == ["compared"] * 3 and cut.HasField("mean_js")
    assert len([f for f in cut.features if f.group == "object"]) == 3 * len(mask_stats.OBJECT_FEATURES)
    await expect_error(
        stub(scoring_server).ScoreMasks(scoring_pb2.ScoreMasksRequest(real_masks=array_to_tensor(real)), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT, "synthetic_masks is required",
    )


async def test_score_masks_shapes_over_grpc_match_the_library(scoring_server: LiveServer) -> None:
    """Squares vs discs away from the border: per-object shape statistics, a class missing in one set."""
    real = np.zeros((4, 32, 32), np.uint8)
    synthetic = np.zeros_like(real)
    yy, xx = np.mgrid[:32, :32] - 16
    for i in range(4):
        real[i, 4:10 + i, 4:10 + i] = 1
        real[i, 20:24, 20:30] = 2  # class 2 exists only in the real set
        synthetic[i][yy**2 + xx**2 <= (3 + i) ** 2] = 1
    response = await stub(scoring_server).ScoreMasks(
        scoring_pb2.ScoreMasksRequest(real_masks=array_to_tensor(real), synthetic_masks=array_to_tensor(synthetic),
                                      bins=10),
        timeout=30,
    )
    expected = mask_stats.score_mask_sets(real, synthetic, bins=10)
    assert list(response.class_ids) == [1, 2] and list(response.missing_class_ids) == [2]
    one, two = response.classes
    assert (one.status, one.real_objects, one.synthetic_objects) == ("compared", 4, 4)
    assert (two.status, two.real_objects, two.synthetic_objects) == ("missing_in_synthetic", 4, 0)
    assert not two.HasField("mean_ks") and two.real_masks_with_class == 4
    assert response.mean_ks == pytest.approx(expected.mean_ks) and response.mean_js == pytest.approx(expected.mean_js)
    assert (response.real_objects, response.synthetic_objects) == (8, 4)
    by_name = {f.name: f for f in response.features}
    assert set(by_name) == {f.name for f in expected.features}
    extent = by_name["object/extent/class_1"]
    assert extent.ks_statistic == 1.0 and extent.real_mean == 1.0 and extent.synthetic_mean < 0.9
    assert (extent.real_n, extent.synthetic_n) == (4, 4)
    assert 0.0 < extent.js_divergence <= 1.0
    # The experiments' dict of the wire message is the library's own summary.
    assert mask_scores_to_dict(response) == expected.as_dict()


async def test_score_segmentation_and_tps(scoring_server: LiveServer) -> None:
    reference = class_maps(3, 16, 16)
    predicted = reference.copy()
    predicted[:, :4, :4] = 2
    response = await stub(scoring_server).ScoreSegmentation(
        scoring_pb2.ScoreSegmentationRequest(
            predicted=array_to_tensor(predicted), reference=array_to_tensor(reference),
            probabilities=array_to_tensor(np.full((3, 3, 16, 16), 1 / 3, np.float32)),
            tps=scoring_pb2.TpsClasses(positive_class_id=1, negative_class_id=2),
        ),
        timeout=30,
    )
    assert response.num_images == 3 and response.num_classes == 3 and 0 < response.miou < 1
    assert len(response.dice_per_class) == 3 and response.has_cross_entropy
    assert response.cross_entropy == pytest.approx(np.log(3), rel=1e-6)
    assert 0 < response.wiou <= 1 / 3 and response.t_objective > 0
    assert len(response.predicted_tps) == len(response.reference_tps) == 3
    assert response.reference_tps[0].bin in ("<1%", "1-49%", ">=50%")
    await expect_error(
        stub(scoring_server).ScoreSegmentation(
            scoring_pb2.ScoreSegmentationRequest(predicted=array_to_tensor(predicted),
                                                 reference=array_to_tensor(reference[:, :8])),
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "does not match reference shape",
    )


async def test_tumor_proportion(scoring_server: LiveServer) -> None:
    maps = np.zeros((2, 10, 10), np.uint8)
    maps[0, :5] = 1
    maps[0, 5:7] = 2
    instances = np.zeros((2, 10, 10), np.int32)
    instances[0, :5, :5], instances[0, :5, 5:], instances[0, 5:7, :] = 1, 2, 3  # 2 positive cells, 1 negative
    response = await stub(scoring_server).TumorProportion(
        scoring_pb2.TumorProportionRequest(
            class_maps=array_to_tensor(maps), classes=scoring_pb2.TpsClasses(positive_class_id=1, negative_class_id=2),
            instance_maps=array_to_tensor(instances),
        ),
        timeout=30,
    )
    assert [(s.tps, s.bin) for s in response.scores] == [(pytest.approx(2 / 3), ">=50%"), (0.0, "<1%")]
    await expect_error(
        stub(scoring_server).TumorProportion(
            scoring_pb2.TumorProportionRequest(
                class_maps=array_to_tensor(maps),
                classes=scoring_pb2.TpsClasses(positive_class_id=1, negative_class_id=1),
            ),
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "must differ",
    )


# ----------------------------------------------------------------------------- consistency
async def test_consistency(scoring_server: LiveServer) -> None:
    maps = class_maps(3, 20, 22)
    shown = maps.copy()
    shown[2][maps[2] == 1] = 2
    response = await stub(scoring_server).Consistency(
        scoring_pb2.ConsistencyRequest(
            images=png_set(paint(shown, noise=6.0)), conditioning_masks=array_to_tensor(maps),
            renderer=RENDERER_NAME, min_miou=0.8, return_predictions=True,
        ),
        timeout=30,
    )
    assert response.segmenter.name == SEGMENTER_NAME
    assert list(response.miou[:2]) == [1.0, 1.0] and response.miou[2] < 0.8
    assert list(response.passed) == [True, True, False]
    assert response.mean_miou == pytest.approx(np.mean(response.miou))
    predictions = tensor_to_array(response.predictions, "predictions")
    np.testing.assert_array_equal(predictions, shown)
    await expect_error(
        stub(scoring_server).Consistency(
            scoring_pb2.ConsistencyRequest(images=tensor_set(paint(maps)), conditioning_masks=array_to_tensor(maps)),
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "name a segmenter",
    )
    await expect_error(
        stub(scoring_server).Consistency(
            scoring_pb2.ConsistencyRequest(images=tensor_set(paint(maps)), conditioning_masks=array_to_tensor(maps),
                                           renderer="renderer-nope"),
            timeout=30,
        ),
        grpc.StatusCode.FAILED_PRECONDITION, "renderer-nope",
    )


# ------------------------------------------------------------------------ infrastructure
async def test_health_reflection_and_kserve(scoring_server: LiveServer) -> None:
    health = health_pb2_grpc.HealthStub(scoring_server.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(scoring_server.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for answer in reflection.ServerReflectionInfo(ask()):
        names = {service.name for service in answer.list_services_response.service}
        assert SERVICE_NAME in names
        break
