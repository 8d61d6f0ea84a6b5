"""RefinementPipeline on a real (small) conv refiner: encoding, padding/cropping, threshold, noise, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.core import arrays, mask_ops
from services.core.errors import InvalidInputError, ModelNotFoundError
from services.core.model_store import ModelStore
from services.mask_refinement.pipeline import RefinementPipeline, as_mask_batch, reflect_pad
from services.model_host import ModelHost
from tests.fixtures.service_models import REFINER_NAME, REFINER_SIZE_MULTIPLE


@pytest.fixture
async def pipeline(service_store: Path) -> AsyncIterator[RefinementPipeline]:
    async with ModelHost(ModelStore(service_store), ["refiner"]) as host:
        yield RefinementPipeline(host)


def blob_masks(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, height, width), np.uint8)
    for mask in masks:
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        mask[top:top + height // 2, left:left + width // 2] = 1
    return masks


def run_directly(store: Path, version: str, masks: np.ndarray) -> np.ndarray:
    """The same refinement done by hand with ONNX Runtime, as the reference."""
    session = ort.InferenceSession(str(store / REFINER_NAME / version / "model.onnx"))
    encoded = np.where(masks != 0, 1.0, -1.0).astype(np.float32)[:, None]
    padded, height, width = reflect_pad(encoded, REFINER_SIZE_MULTIPLE)
    return (session.run(None, {"coarse": padded})[0][:, 0, :height, :width] > 0).astype(np.uint8)


async def test_refines_batch_to_binary_masks_of_same_size(pipeline: RefinementPipeline, service_store: Path) -> None:
    masks = blob_masks(3, 32, 48)
    result = await pipeline.refine(masks)
    assert result.fine_masks.shape == (3, 32, 48) and result.fine_masks.dtype == np.uint8
    assert set(np.unique(result.fine_masks)) <= {0, 1}
    assert result.noise_labels is None
    assert (result.model.name, result.model.version) == (REFINER_NAME, "2")  # latest
    np.testing.assert_array_equal(result.fine_masks, run_directly(service_store, "2", masks))


async def test_sizes_off_the_stride_are_reflect_padded_and_cropped_back(
    pipeline: RefinementPipeline, service_store: Path
) -> None:
    masks = blob_masks(2, 30, 45, seed=1)  # neither is a multiple of 4
    result = await pipeline.refine(masks, version="1")
    assert result.fine_masks.shape == (2, 30, 45)
    np.testing.assert_array_equal(result.fine_masks, run_directly(service_store, "1", masks))


async def test_small_requests_skip_the_worker_thread_and_large_ones_use_it(
    pipeline: RefinementPipeline, service_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encode and threshold run inline up to INLINE_MAX_ELEMENTS, in a thread above it; same bits either way."""
    offloaded: list[object] = []
    real_to_thread = arrays.asyncio.to_thread

    async def counting_to_thread(work, *args):  # type: ignore[no-untyped-def]
        offloaded.append(work)
        return await real_to_thread(work, *args)

    monkeypatch.setattr(arrays.asyncio, "to_thread", counting_to_thread)
    small = blob_masks(2, 32, 48, seed=5)
    np.testing.assert_array_equal((await pipeline.refine(small)).fine_masks, run_directly(service_store, "2", small))
    assert offloaded == []
    large = blob_masks(2, 300, 480, seed=6)  # 2 x 1 plane x 300 x 480 > INLINE_MAX_ELEMENTS
    assert large.size > arrays.INLINE_MAX_ELEMENTS
    np.testing.assert_array_equal((await pipeline.refine(large)).fine_masks, run_directly(service_store, "2", large))
    assert len(offloaded) == 2  # encode, threshold


async def test_single_2d_mask_and_bool_input(pipeline: RefinementPipeline) -> None:
    mask = blob_masks(1, 16, 16)[0]
    from_2d = await pipeline.refine(mask)
    from_bool = await pipeline.refine(mask.astype(bool)[None])
    assert from_2d.fine_masks.shape == (1, 16, 16)
    np.testing.assert_array_equal(from_2d.fine_masks, from_bool.fine_masks)


async def test_noise_labels_per_sample_from_seed_plus_index(pipeline: RefinementPipeline) -> None:
    result = await pipeline.refine(blob_masks(3, 24, 24), noise_spacing=4.0, seed=10)
    assert result.noise_labels is not None and result.noise_labels.shape == (3, 24, 24)
    for index in range(3):
        np.testing.assert_array_equal(result.noise_labels[index], mask_ops.noise_label((24, 24), 4.0, 10 + index))


async def test_version_pin_selects_that_model(pipeline: RefinementPipeline) -> None:
    masks = blob_masks(2, 32, 32, seed=3)
    v1 = await pipeline.refine(masks, version="1")
    v2 = await pipeline.refine(masks, model=REFINER_NAME, version="2")
    assert v1.model.version == "1" and v2.model.version == "2"
    assert v1.model.sha256 != v2.model.sha256


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"model": "no-such-refiner"}, ModelNotFoundError, r"'no-such-refiner' is not loaded; available: \['mask-refiner'\]"),
        ({"version": "7"}, ModelNotFoundError, r"'mask-refiner/7' is not loaded; available: \['mask-refiner/1', 'mask-refiner/2'\]"),
        ({"stain": "ihc"}, InvalidInputError, r"refines 'he' masks, not 'ihc'"),
        ({"stain": "pas"}, InvalidInputError, r"unknown stain 'pas'; valid stains: \['he', 'ihc'\]"),
        ({"noise_spacing": -1.0}, InvalidInputError, "noise_spacing must be >= 0"),
        ({"seed": -1}, InvalidInputError, "seed must be a non-negative integer"),
        ({"seed": 2**64 - 1}, InvalidInputError, "overflows 64 bits"),
    ],
)
async def test_bad_requests_raise_clear_errors(
    pipeline: RefinementPipeline, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        await pipeline.refine(blob_masks(2, 8, 8), **kwargs)


@pytest.mark.parametrize(
    "masks, message",
    [
        (np.full((1, 4, 4), 2, np.uint8), r"values must be 0 \(air\) or 1 \(tissue\), found values in \[2, 2\]"),
        (np.zeros((1, 4, 4), np.float32), "expected uint8 or bool masks, got float32"),
        (np.zeros((1, 1, 4, 4), np.uint8), r"expected \[N, H, W\] or \[H, W\], got shape \[1, 1, 4, 4\]"),
        (np.zeros((0, 4, 4), np.uint8), "empty masks"),
    ],
)
def test_mask_batch_validation(masks: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        as_mask_batch(masks)


def test_reflect_pad_handles_one_pixel_axes() -> None:
    padded, height, width = reflect_pad(np.ones((1, 1, 1, 3), np.float32), 4)
    assert padded.shape == (1, 1, 4, 4) and (height, width) == (1, 3)


async def test_oversized_requests_are_refused_before_inference(pipeline: RefinementPipeline) -> None:
    with pytest.raises(InvalidInputError, match="exceed the limits of 16777216 pixels per mask"):
        await pipeline.refine(np.zeros((1, 4097, 4096), np.uint8))
    with pytest.raises(InvalidInputError, match="16777216 per request"):
        await pipeline.refine(np.zeros((5, 2048, 2048), np.uint8))


# ------------------------------------------------------------------ refiner v2: guide and noise channels

V2_CHANNELS = ["coarse", "guide", "noise"]


@pytest.fixture
async def guided_pipeline(tmp_path: Path) -> AsyncIterator[RefinementPipeline]:
    from tests.fixtures.service_models import write_refiner

    write_refiner(tmp_path, "1", seed=3, input_channels=V2_CHANNELS)
    async with ModelHost(ModelStore(tmp_path), ["refiner"]) as host:
        yield RefinementPipeline(host)


def test_encode_input_follows_the_manifest_channel_order() -> None:
    from services.mask_refinement.pipeline import encode_input

    masks = blob_masks(2, 8, 8)
    guides = 1 - masks
    encoded = encode_input(V2_CHANNELS, masks, guides, seed=4)
    assert encoded.shape == (2, 3, 8, 8) and encoded.dtype == np.float32
    assert np.array_equal(encoded[:, 0], np.where(masks != 0, 1.0, -1.0))
    assert np.array_equal(encoded[:, 1], np.where(guides != 0, 1.0, -1.0))
    # mask i's noise depends only on seed + i: sample 1 of seed 4 is sample 0 of seed 5
    assert np.array_equal(encode_input(V2_CHANNELS, masks[1:], None, seed=5)[0, 2], encoded[1, 2])
    # no guide = "unknown" = 0, as in training's guide dropout
    assert not encode_input(V2_CHANNELS, masks, None, seed=4)[:, 1].any()


async def test_guided_refiner_matches_onnx_runtime_by_hand(guided_pipeline: RefinementPipeline,
                                                           tmp_path: Path) -> None:
    from services.mask_refinement.pipeline import encode_input

    masks, guides = blob_masks(2, 32, 48), blob_masks(2, 32, 48, seed=9)
    result = await guided_pipeline.refine(masks, guide_masks=guides, seed=11)
    session = ort.InferenceSession(str(tmp_path / REFINER_NAME / "1" / "model.onnx"))
    padded, height, width = reflect_pad(encode_input(V2_CHANNELS, masks, guides, 11), REFINER_SIZE_MULTIPLE)
    expected = (session.run(None, {"coarse": padded})[0][:, 0, :height, :width] > 0).astype(np.uint8)
    assert np.array_equal(result.fine_masks, expected)


async def test_guided_refiner_is_seeded_and_stochastic(guided_pipeline: RefinementPipeline) -> None:
    masks = blob_masks(1, 64, 64)
    first = (await guided_pipeline.refine(masks, seed=1)).fine_masks
    again = (await guided_pipeline.refine(masks, seed=1)).fine_masks
    other = (await guided_pipeline.refine(masks, seed=2)).fine_masks
    assert np.array_equal(first, again) and not np.array_equal(first, other)


async def test_guide_is_refused_by_a_refiner_without_a_guide_input(pipeline: RefinementPipeline) -> None:
    with pytest.raises(InvalidInputError, match="takes no guide_masks"):
        await pipeline.refine(blob_masks(1, 8, 8), guide_masks=blob_masks(1, 8, 8))


async def test_guide_shape_must_match(guided_pipeline: RefinementPipeline) -> None:
    with pytest.raises(InvalidInputError, match="guide_masks: shape \\[1, 8, 9\\] differs"):
        await guided_pipeline.refine(blob_masks(1, 8, 8), guide_masks=np.zeros((1, 8, 9), np.uint8))
