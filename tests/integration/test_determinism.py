"""DESIGN convention 5: same request + seed + model version -> the same bytes, whatever batch it lands in.

Measured on this machine kind (ONNX Runtime 1.32, CPU EP, 1 and 2 intra-op threads) with
torch-exported pix2pixHD-style and U-Net generators at 64 and 256 px: batch 1 vs batch 2, 4
and 8 gave bit-identical float32 outputs (max |diff| = 0). ORT's CPU convolutions run per
image, so the batch size does not change any summation order; the CPU path therefore keeps
true batching and needs no sample-by-sample fallback. These tests pin that property end to
end, so a runtime upgrade that breaks it fails here. (GPU kernels may choose algorithms by
batch size; tests/gpu is where that must be checked.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytest_asyncio

from services._generated.histosynth.v1 import (
    mask_refinement_pb2,
    mask_refinement_pb2_grpc,
    mask_rendering_pb2,
    mask_rendering_pb2_grpc,
)
from services.core.metrics import REGISTRY
from services.mask_refinement import servicer as refinement
from services.mask_rendering import servicer as rendering
from services.tensor_codec import array_to_tensor
from tests.fixtures.service_models import REFINER_NAME, RENDERER_NAME
from tests.integration.conftest import LiveServer, live_server

pytestmark = pytest.mark.asyncio(loop_scope="module")
CLIENTS = 8
# Long enough that concurrent calls reliably meet in one batch on a busy 2-core machine.
BATCHING_DELAY_MS = 40.0
# Concurrent rounds tried until one shares a batch (a loaded host can spread 8 calls over more than the delay).
MERGE_ATTEMPTS = 5


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def batching_renderer(module_store: Path) -> AsyncIterator[LiveServer]:
    async for server in live_server(rendering.start, module_store, max_queue_delay_ms=BATCHING_DELAY_MS):
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def batching_refiner(module_store: Path) -> AsyncIterator[LiveServer]:
    async for server in live_server(refinement.start, module_store, max_queue_delay_ms=BATCHING_DELAY_MS):
        yield server


def batch_stats(model: str, version: str) -> tuple[float, float]:
    """(batches, samples) the batcher has sent to the runtime for this model so far."""
    labels = {"model": model, "version": version}
    count = REGISTRY.get_sample_value("histosynth_model_batch_size_samples_count", labels) or 0.0
    total = REGISTRY.get_sample_value("histosynth_model_batch_size_samples_sum", labels) or 0.0
    return count, total


async def rounds_until_merged(model: str, version: str, one_round: Callable[[], Awaitable[None]]) -> None:
    """Run ``one_round`` (CLIENTS concurrent calls, each checked bit for bit against solo calls) until a round's
    calls shared a batch (fewer batches than calls); on a busy host calls may arrive too far apart to meet,
    and a round that never merged would prove nothing."""
    for _ in range(MERGE_ATTEMPTS):
        batches_before = batch_stats(model, version)[0]
        await one_round()
        if batch_stats(model, version)[0] - batches_before < CLIENTS:
            return
    pytest.fail(f"concurrent requests were never merged in {MERGE_ATTEMPTS} rounds; the test proved nothing")


def class_map(seed: int, height: int = 32, width: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes = np.zeros((height, width), np.uint8)
    for _ in range(12):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(classes, centre, int(rng.integers(2, 7)), int(rng.integers(1, 3)), -1)
    return classes


async def test_concurrent_renders_equal_solo_renders(batching_renderer: LiveServer) -> None:
    stub = mask_rendering_pb2_grpc.MaskRenderingStub(batching_renderer.channel)
    requests = [
        mask_rendering_pb2.RenderRequest(model=RENDERER_NAME, class_masks=array_to_tensor(class_map(i)), seed=1000 + i)
        for i in range(CLIENTS)
    ]
    solo = [(await stub.Render(request, timeout=60)).images.data for request in requests]

    async def one_round() -> None:
        samples_before = batch_stats(RENDERER_NAME, "1")[1]
        together = await asyncio.gather(*(stub.Render(request, timeout=60) for request in requests))
        # 32 x 48 fields with 32 px tiles (overlap 8): 2 tiles per request, batches of up to 4 samples,
        # so fewer batches than requests means tiles of different requests shared a batch.
        assert batch_stats(RENDERER_NAME, "1")[1] - samples_before == CLIENTS * 2
        assert [response.images.data for response in together] == solo

    await rounds_until_merged(RENDERER_NAME, "1", one_round)


async def test_distinct_seeds_give_distinct_images_and_repeat_exactly(batching_renderer: LiveServer) -> None:
    stub = mask_rendering_pb2_grpc.MaskRenderingStub(batching_renderer.channel)
    classes = array_to_tensor(class_map(0))
    first = await asyncio.gather(*(
        stub.Render(mask_rendering_pb2.RenderRequest(model=RENDERER_NAME, class_masks=classes, seed=s), timeout=60)
        for s in range(4)
    ))
    again = await asyncio.gather(*(
        stub.Render(mask_rendering_pb2.RenderRequest(model=RENDERER_NAME, class_masks=classes, seed=s), timeout=60)
        for s in reversed(range(4))
    ))
    images = [response.images.data for response in first]
    assert len(set(images)) == 4  # the seed drives the noise label, so each seed renders differently
    assert [response.images.data for response in reversed(again)] == images


async def test_concurrent_refinements_equal_solo_refinements(batching_refiner: LiveServer) -> None:
    stub = mask_refinement_pb2_grpc.MaskRefinementStub(batching_refiner.channel)
    rng = np.random.default_rng(3)
    requests = [
        mask_refinement_pb2.RefineRequest(
            coarse_masks=array_to_tensor((rng.random((1, 32, 32)) > 0.5).astype(np.uint8)),
            noise_spacing=5.0, seed=i,
        )
        for i in range(CLIENTS)
    ]
    solo = [await stub.Refine(request, timeout=60) for request in requests]

    async def one_round() -> None:
        together = await asyncio.gather(*(stub.Refine(request, timeout=60) for request in requests))
        for alone, merged in zip(solo, together, strict=True):
            assert alone.fine_masks.data == merged.fine_masks.data
            assert alone.noise_labels.data == merged.noise_labels.data

    await rounds_until_merged(REFINER_NAME, "2", one_round)
