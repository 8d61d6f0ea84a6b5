"""The refinement and rendering pipelines on the models shipped in model_store/ (skipped until they exist).

Checks that each shipped manifest's metadata is a usable contract (RendererSpec agrees with the
model's input, refiner sizes pad correctly), that a field larger than the model's tile renders
through tiling, and that batching does not change the bytes (DESIGN convention 5).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from services.core.errors import HistosynthError
from services.core.model_store import ModelStore
from services.mask_refinement.pipeline import RefinementPipeline
from services.mask_rendering.pipeline import RenderingPipeline
from services.model_host import HostSettings, ModelHost

# HISTOSYNTH_SHIPPED_STORE points the same checks at a candidate store before its models are shipped.
SHIPPED_STORE = Path(os.environ.get("HISTOSYNTH_SHIPPED_STORE", Path(__file__).resolve().parents[2] / "model_store"))


def shipped(kind: str) -> list[str]:
    if not SHIPPED_STORE.is_dir():
        return []
    store = ModelStore(SHIPPED_STORE)
    names = []
    for name in store.list_models():
        try:
            if store.get(name).kind == kind:
                names.append(name)
        except HistosynthError:
            continue
    return names


RENDERERS = shipped("renderer")
REFINERS = shipped("refiner")


@pytest.fixture
async def renderers() -> AsyncIterator[ModelHost]:
    async with ModelHost(ModelStore(SHIPPED_STORE), ["renderer"], HostSettings(max_queue_delay_ms=20.0)) as host:
        yield host


@pytest.mark.skipif(not RENDERERS, reason="no trained renderers in model_store/ yet")
@pytest.mark.parametrize("name", RENDERERS)
async def test_shipped_renderer_renders_tiled_field_deterministically(renderers: ModelHost, name: str) -> None:
    pipeline = RenderingPipeline(renderers)
    served = await renderers.get(name)
    spec = pipeline.spec(served)  # raises if the metadata disagrees with the model's input
    size = spec.tile_size + spec.tile_size // 2  # forces tiling
    rng = np.random.default_rng(0)
    classes = np.zeros((2, size, size), np.uint8)
    for field in classes:
        for _ in range(20):
            top, left = rng.integers(0, size - 16, 2)
            field[top:top + 16, left:left + 16] = rng.integers(1, spec.num_classes)
    together = await pipeline.render(classes, model=name, seed=11)
    assert together.images.shape == (2, size, size, 3) and together.tiles_per_image > 1
    alone = await pipeline.render(classes[1], model=name, seed=12)
    np.testing.assert_array_equal(together.images[1], alone.images[0])


@pytest.mark.skipif("renderer-he-nuclei" not in RENDERERS, reason="renderer-he-nuclei is not shipped")
async def test_shipped_nuclei_renderer_has_a_training_split_stain_bank_and_restains(renderers: ModelHost) -> None:
    pipeline = RenderingPipeline(renderers)
    served = await renderers.get("renderer-he-nuclei")
    bank = pipeline.spec(served).stain_bank
    assert bank is not None, "training.export.stain_bank was not run for this version"
    assert set(bank.sources) == {"consep", "monuseg"} and min(len(t) for t in bank.tables.values()) >= 100
    classes = np.zeros((1, 128, 128), np.uint8)
    classes[0, 40:60, 40:60] = 1
    plain = await pipeline.render(classes, model="renderer-he-nuclei", seed=3)
    varied = await pipeline.render(classes, model="renderer-he-nuclei", seed=3, stain_variation=True,
                                   stain_source="monuseg")
    assert varied.images.shape == plain.images.shape and not np.array_equal(varied.images, plain.images)


@pytest.mark.skipif(not REFINERS, reason="no trained refiner in model_store/ yet")
@pytest.mark.parametrize("name", REFINERS)
async def test_shipped_refiner_pads_and_crops(name: str) -> None:
    async with ModelHost(ModelStore(SHIPPED_STORE), ["refiner"]) as host:
        pipeline = RefinementPipeline(host, default_model=name)
        masks = np.zeros((2, 200, 300), np.uint8)  # not multiples of the U-Net's 128 px
        masks[:, 40:160, 60:240] = 1
        result = await pipeline.refine(masks, noise_spacing=15.0, seed=3)
        assert result.fine_masks.shape == (2, 200, 300)
        assert set(np.unique(result.fine_masks)) <= {0, 1}
        # Mask i of a request draws the refiner's noise from seed + i (refiner v2 has a noise input), so mask 1
        # of seed 3 alone is the same request as mask 1 of the batch.
        alone = await pipeline.refine(masks[1], seed=4)
        np.testing.assert_array_equal(result.fine_masks[1], alone.fine_masks[0])
