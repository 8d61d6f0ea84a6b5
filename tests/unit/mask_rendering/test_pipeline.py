"""RenderingPipeline on a real (small) conv renderer: input definition, tiling without seams, noise, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from services.core import mask_ops
from services.core.config import ConfigError
from services.core.errors import InvalidInputError, ModelNotFoundError
from services.core.model_store import ModelStore
from services.mask_rendering.pipeline import RenderingPipeline, encode_png, to_uint8_rgb
from services.mask_rendering.servicer import RenderingSettings
from services.mask_rendering.tiling import tile_starts
from services.model_host import HostSettings, ModelHost
from services.core.stain import rgb_to_hed, stain_levels
from tests.fixtures.service_models import (
    FIXTURE_STAIN_BANK,
    RENDERER_CLASSES,
    RENDERER_NAME,
    RENDERER_NOISE_SPACING,
    RENDERER_TILE_SIZE,
    write_renderer,
)

WHOLE_FIELD_RENDERER = "renderer-whole"  # same weights, tile_size large enough to never tile


@pytest.fixture
async def host(service_store: Path) -> AsyncIterator[ModelHost]:
    write_renderer(service_store, name=WHOLE_FIELD_RENDERER, tile_size=1024)
    async with ModelHost(ModelStore(service_store), ["renderer"]) as model_host:
        yield model_host


@pytest.fixture
def pipeline(host: ModelHost) -> RenderingPipeline:
    return RenderingPipeline(host, tile_overlap=8)


def blob_classes(height: int, width: int, seed: int = 0, blobs: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes = np.zeros((height, width), np.uint8)
    for _ in range(blobs):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(classes, centre, int(rng.integers(3, 9)), int(rng.integers(1, len(RENDERER_CLASSES))), -1)
    return classes


def render_directly(store: Path, classes: np.ndarray, seed: int) -> np.ndarray:
    """Reference for a field that fits one tile: mask_ops input -> ONNX Runtime -> uint8."""
    session = ort.InferenceSession(str(store / RENDERER_NAME / "1" / "model.onnx"))
    noise = mask_ops.noise_label(classes.shape, RENDERER_NOISE_SPACING, seed)
    label = mask_ops.build_generator_input(classes, len(RENDERER_CLASSES), noise, mask_ops.instance_edges(classes))
    return to_uint8_rgb(session.run(None, {"label": label[None]})[0][0], (-1.0, 1.0))


async def test_small_field_bypasses_tiling_and_matches_reference(
    pipeline: RenderingPipeline, service_store: Path
) -> None:
    classes = blob_classes(32, 24)
    result = await pipeline.render(classes, model=RENDERER_NAME, seed=5)
    assert result.tiles_per_image == 1
    assert result.images.shape == (1, 32, 24, 3) and result.images.dtype == np.uint8
    np.testing.assert_array_equal(result.images[0], render_directly(service_store, classes, 5))


async def test_odd_sizes_are_padded_and_cropped(pipeline: RenderingPipeline) -> None:
    result = await pipeline.render(blob_classes(31, 17), model=RENDERER_NAME)
    assert result.images.shape == (1, 31, 17, 3)


def column_gradients(image: np.ndarray) -> np.ndarray:
    """Mean |difference| between neighbouring columns, one value per column boundary x | x+1."""
    return np.abs(np.diff(image.astype(np.float64), axis=1)).mean(axis=(0, 2))


def border_columns(width: int, tile: int, overlap: int) -> list[int]:
    """Column boundaries where a tile starts or ends (x | x+1 with x the last column before the cut)."""
    starts = tile_starts(width, tile, overlap)
    return sorted({start - 1 for start in starts[1:]} | {start + tile - 1 for start in starts[:-1]})


async def test_tiled_field_has_no_seams(host: ModelHost) -> None:
    """Tiles blended with a raised-cosine window leave no step at tile borders.

    Two measures on a 128 x 128 field cut into 32 px tiles:
      * the image's mean |gradient| across tile borders is not larger than elsewhere;
      * the tiled render minus the one-piece render (same weights) changes no faster across
        tile borders than inside tiles. Hard-cut tiles (no overlap, no blending) fail this
        second check, which shows the measure detects seams.
    """
    classes = blob_classes(128, 128, seed=2, blobs=40)
    whole = (await RenderingPipeline(host).render(classes, model=WHOLE_FIELD_RENDERER, seed=3)).images[0]

    def seam_ratios(image: np.ndarray, overlap: int) -> tuple[float, float]:
        borders = border_columns(128, RENDERER_TILE_SIZE, overlap)
        inner = [column for column in range(127) if column not in borders]
        image_gradient = column_gradients(image)
        error_gradient = column_gradients(image.astype(np.float64) - whole)
        return (
            image_gradient[borders].mean() / image_gradient[inner].mean(),
            error_gradient[borders].mean() / error_gradient[inner].mean(),
        )

    blended = await RenderingPipeline(host, tile_overlap=8).render(classes, model=RENDERER_NAME, seed=3)
    assert blended.tiles_per_image == 25
    image_ratio, error_ratio = seam_ratios(blended.images[0], 8)
    assert image_ratio <= 1.1
    assert error_ratio <= 1.15

    hard_cut = await RenderingPipeline(host, tile_overlap=0).render(classes, model=RENDERER_NAME, seed=3)
    _, hard_error_ratio = seam_ratios(hard_cut.images[0], 0)
    assert hard_error_ratio > 1.4


async def test_noise_is_generated_once_for_the_whole_field(pipeline: RenderingPipeline) -> None:
    classes = blob_classes(80, 72, seed=4)
    generated = await pipeline.render(classes, model=RENDERER_NAME, seed=9)
    given = await pipeline.render(
        classes, model=RENDERER_NAME, noise_labels=mask_ops.noise_label(classes.shape, RENDERER_NOISE_SPACING, 9)
    )
    assert generated.tiles_per_image > 1
    np.testing.assert_array_equal(generated.images, given.images)


async def test_sample_i_uses_seed_plus_i(pipeline: RenderingPipeline) -> None:
    classes = np.stack([blob_classes(40, 40, seed=s) for s in range(3)])
    batch = await pipeline.render(classes, model=RENDERER_NAME, seed=20)
    for index in range(3):
        solo = await pipeline.render(classes[index], model=RENDERER_NAME, seed=20 + index)
        np.testing.assert_array_equal(batch.images[index], solo.images[0])


async def test_noise_spacing_override_changes_the_noise(pipeline: RenderingPipeline) -> None:
    classes = blob_classes(32, 32)
    default = await pipeline.render(classes, model=RENDERER_NAME, seed=1)
    explicit = await pipeline.render(classes, model=RENDERER_NAME, seed=1, noise_spacing=RENDERER_NOISE_SPACING)
    sparse = await pipeline.render(classes, model=RENDERER_NAME, seed=1, noise_spacing=20.0)
    np.testing.assert_array_equal(default.images, explicit.images)
    assert not np.array_equal(default.images, sparse.images)


async def test_instance_maps_draw_edges_inside_a_class_region(pipeline: RenderingPipeline) -> None:
    classes = np.zeros((32, 32), np.uint8)
    classes[8:24, 4:28] = 1
    instances = np.zeros((32, 32), np.int32)
    instances[8:24, 4:16] = 1
    instances[8:24, 16:28] = 2  # two touching nuclei: an edge the class map alone does not have
    without = await pipeline.render(classes, model=RENDERER_NAME, seed=0)
    with_instances = await pipeline.render(classes, model=RENDERER_NAME, seed=0, instance_maps=instances)
    assert not np.array_equal(without.images, with_instances.images)


async def test_png_encoding_is_lossless(pipeline: RenderingPipeline) -> None:
    image = (await pipeline.render(blob_classes(24, 24), model=RENDERER_NAME)).images[0]
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(encode_png(image), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, image)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"model": "renderer-none"}, ModelNotFoundError, r"'renderer-none' is not loaded; available: \["),
        ({"model": ""}, InvalidInputError, r"model: name a renderer; available: \["),
        ({"model": "mask-refiner"}, ModelNotFoundError, "is not loaded"),  # a refiner is not a renderer
        ({"model": RENDERER_NAME, "instance_maps": np.zeros((1, 8, 9), np.int32)}, InvalidInputError,
         r"instance_maps: shape \[1, 8, 9\] does not match class_masks shape \[1, 8, 8\]"),
        ({"model": RENDERER_NAME, "noise_spacing": float("nan")}, InvalidInputError, "noise_spacing must be >= 0"),
    ],
)
async def test_bad_requests(pipeline: RenderingPipeline, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        await pipeline.render(np.zeros((8, 8), np.uint8), **kwargs)


async def test_class_id_out_of_range_names_the_classes(pipeline: RenderingPipeline) -> None:
    classes = np.zeros((8, 8), np.uint8)
    classes[2, 2] = 7
    with pytest.raises(InvalidInputError, match=r"class id 7 is outside \[0, 2\] for model renderer-test/1 "
                                                 r"\(0=background, 1=nucleus, 2=stroma\)"):
        await pipeline.render(classes, model=RENDERER_NAME)


async def test_oversized_fields_are_refused_before_inference(pipeline: RenderingPipeline) -> None:
    with pytest.raises(InvalidInputError, match="exceed the limits of 16777216 pixels per field"):
        await pipeline.render(np.zeros((4097, 4096), np.uint8), model=RENDERER_NAME)
    with pytest.raises(InvalidInputError, match="33554432 per request"):
        await pipeline.render(np.zeros((3, 4096, 4096), np.uint8), model=RENDERER_NAME)


async def test_tiles_beyond_one_batch_go_in_waves(service_store: Path) -> None:
    """More tiles than max_batch_size x instances render in several waves, with the same bytes as one wave."""
    write_renderer(service_store, name="renderer-big-batch", max_batch_size=64)  # same weights (same seed)
    settings = HostSettings(max_batch_size=64)
    async with ModelHost(ModelStore(service_store), ["renderer"], settings) as wide_host:
        classes = blob_classes(160, 160, seed=6)
        pipeline = RenderingPipeline(wide_host, tile_overlap=8)
        waves = await pipeline.render(classes, model=RENDERER_NAME, seed=2)  # max_batch_size 4
        one_wave = await pipeline.render(classes, model="renderer-big-batch", seed=2)
    assert waves.tiles_per_image == one_wave.tiles_per_image == 49  # 7 x 7 tiles
    np.testing.assert_array_equal(waves.images, one_wave.images)


async def test_manifest_channel_mismatch_is_reported_naming_the_model(service_store: Path) -> None:
    """Metadata that disagrees with the model's declared input (e.g. a missing use_instance_edges) is named."""
    version_dir = write_renderer(service_store, name="renderer-bad-meta")
    manifest_path = version_dir / "manifest.yaml"
    manifest_path.write_text(manifest_path.read_text().replace("use_instance_edges: true", "use_instance_edges: false"))
    async with ModelHost(ModelStore(service_store), ["renderer"]) as bad_host:
        with pytest.raises(ValueError, match=r"renderer-bad-meta/1: metadata implies 4 input channels .* takes 5"):
            await RenderingPipeline(bad_host).render(np.zeros((8, 8), np.uint8), model="renderer-bad-meta")


async def test_tile_size_override(host: ModelHost) -> None:
    classes = blob_classes(64, 64, seed=7)
    one_piece = await RenderingPipeline(host, tile_size=64).render(classes, model=RENDERER_NAME, seed=1)
    reference = await RenderingPipeline(host).render(classes, model=WHOLE_FIELD_RENDERER, seed=1)
    assert one_piece.tiles_per_image == 1
    np.testing.assert_array_equal(one_piece.images, reference.images)
    with pytest.raises(ValueError, match="tile_size 33 is not a multiple of model renderer-test/1's size_multiple 2"):
        await RenderingPipeline(host, tile_size=33).render(classes, model=RENDERER_NAME)


def test_rendering_settings_from_env() -> None:
    assert RenderingSettings.from_env({}) == RenderingSettings(tile_size=None, tile_overlap=None)
    assert RenderingSettings.from_env({"HISTOSYNTH_RENDER_TILE_SIZE": "512"}).tile_size == 512
    with pytest.raises(ConfigError, match="HISTOSYNTH_RENDER_TILE_OVERLAP='-3': must be >= 0"):
        RenderingSettings.from_env({"HISTOSYNTH_RENDER_TILE_OVERLAP": "-3"})


async def test_stain_variation_restains_each_sample_to_its_seeds_bank_row(pipeline: RenderingPipeline) -> None:
    classes = np.stack([blob_classes(48, 48, seed=i) for i in range(3)])
    plain = await pipeline.render(classes, model=RENDERER_NAME, seed=10)
    varied = await pipeline.render(classes, model=RENDERER_NAME, seed=10, stain_variation=True)
    assert not np.array_equal(plain.images, varied.images)
    again = await pipeline.render(classes[1:2], model=RENDERER_NAME, seed=11, stain_variation=True)
    np.testing.assert_array_equal(again.images[0], varied.images[1])  # sample i: seed + i, whatever the batch
    bank = pipeline.spec(await pipeline.host.get(RENDERER_NAME)).stain_bank
    assert bank is not None and {name: rows.tolist() for name, rows in bank.tables.items()} == FIXTURE_STAIN_BANK
    for index, image in enumerate(varied.images):
        levels = stain_levels(rgb_to_hed(image), classes[index] != 0)
        assert levels[0] == pytest.approx(bank.draw(10 + index)[0], abs=3e-3)  # H background level
    dark = await pipeline.render(classes, model=RENDERER_NAME, seed=10, stain_variation=True, stain_source="dark")
    for index, image in enumerate(dark.images):  # one row in that source: every sample gets it
        levels = stain_levels(rgb_to_hed(image), classes[index] != 0)
        assert levels[0] == pytest.approx(FIXTURE_STAIN_BANK["dark"][0][0], abs=3e-3)


async def test_stain_variation_needs_a_stain_bank_and_a_known_source(pipeline: RenderingPipeline) -> None:
    field = blob_classes(16, 16)[None]
    with pytest.raises(InvalidInputError, match="renderer-whole/1 has no stain bank"):
        await pipeline.render(field, model=WHOLE_FIELD_RENDERER, stain_variation=True)
    with pytest.raises(InvalidInputError, match="has no source 'lab9'; it has dark, pale"):
        await pipeline.render(field, model=RENDERER_NAME, stain_variation=True, stain_source="lab9")
    with pytest.raises(InvalidInputError, match="stain_source 'dark' is set but stain_variation is not"):
        await pipeline.render(field, model=RENDERER_NAME, stain_source="dark")
