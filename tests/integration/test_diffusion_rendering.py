"""Diffusion rendering and nuclei-mask generation over real gRPC on loopback.

A rendering server hosts the fixture diffusion renderer and mask generator (tests/fixtures/
diffusion_models.py) next to a GAN renderer; the shipped diffusion models are exercised too when
model_store/ has them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from clients.client import HistosynthClient
from services._generated.histosynth.v1 import mask_rendering_pb2, mask_rendering_pb2_grpc
from services.core.grpc_server import start_server
from services.core.metrics import render_exposition
from services.core.model_store import ModelStore
from services.diffusion.pipeline import shared_pipeline
from services.mask_rendering import servicer as rendering
from services.model_host import ModelHost
from services.tensor_codec import array_to_tensor, tensor_to_array
from tests.fixtures.diffusion_models import MASK_GENERATOR_NAME, RENDERER_NAME, write_diffusion_store
from tests.fixtures.service_models import RENDERER_NAME as GAN_RENDERER, write_renderer
from tests.integration.conftest import LiveServer, live_server, server_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

SHIPPED_STORE = Path(__file__).resolve().parents[2] / "model_store"
SHIPPED_RENDERER = "renderer-diffusion-nuclei"
SHIPPED_MASK_GENERATOR = "nuclei-mask-generator"


@pytest.fixture(scope="module")
def diffusion_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_diffusion_store(tmp_path_factory.mktemp("diffusion_store"))
    write_renderer(root)
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(diffusion_store: Path) -> AsyncIterator[LiveServer]:
    async for live in live_server(rendering.start, diffusion_store):
        yield live


def stub(live: LiveServer) -> mask_rendering_pb2_grpc.MaskRenderingStub:
    return mask_rendering_pb2_grpc.MaskRenderingStub(live.channel)


def class_maps(count: int, height: int = 16, width: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = np.zeros((count, height, width), np.uint8)
    for index in range(count):
        for _ in range(4):
            y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
            maps[index, y:y + 4, x:x + 4] = rng.integers(1, 5)
    return maps


def render_request(maps: np.ndarray, model: str = RENDERER_NAME, **options: object) -> mask_rendering_pb2.RenderRequest:
    seed = options.pop("seed", 0)
    encoding = options.pop("encoding", mask_rendering_pb2.IMAGE_ENCODING_RAW)
    return mask_rendering_pb2.RenderRequest(
        model=model, class_masks=array_to_tensor(maps), seed=seed, encoding=encoding,
        diffusion=mask_rendering_pb2.DiffusionOptions(**options),
    )


async def render(live: LiveServer, maps: np.ndarray, **options: object) -> np.ndarray:
    response = await stub(live).Render(render_request(maps, **options), timeout=30)
    return tensor_to_array(response.images, "images")


async def test_render_is_seeded_per_sample(server: LiveServer) -> None:
    maps = np.concatenate([class_maps(1), class_maps(1)])
    images = await render(server, maps, seed=10, steps=8)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])  # same mask, seeds 10 and 11
    again = await render(server, maps[1:], seed=11, steps=8)
    np.testing.assert_array_equal(again[0], images[1])


async def test_scheduler_steps_and_guidance_change_the_image(server: LiveServer) -> None:
    maps = class_maps(1)
    base = await render(server, maps, seed=1, steps=10)
    for options in (
        dict(steps=20),
        dict(steps=10, scheduler=mask_rendering_pb2.DIFFUSION_SCHEDULER_DPM_SOLVER_PP),
        dict(steps=10, guidance_scale=1.0),
    ):
        assert not np.array_equal(await render(server, maps, seed=1, **options), base), options
    default_steps = await render(server, maps, seed=1)  # fixture default: ddim, 10 steps, guidance 2
    np.testing.assert_array_equal(default_steps, base)


async def test_png_matches_raw(server: LiveServer) -> None:
    import cv2

    maps = class_maps(1)
    raw = await render(server, maps, seed=4, steps=5)
    response = await stub(server).Render(
        render_request(maps, seed=4, steps=5, encoding=mask_rendering_pb2.IMAGE_ENCODING_PNG), timeout=30
    )
    decoded = cv2.imdecode(np.frombuffer(response.png_images[0], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), raw[0])


async def test_same_seed_same_image_under_concurrent_grpc_traffic(server: LiveServer) -> None:
    probe = class_maps(1, seed=9)
    alone = await render(server, probe, seed=77, steps=12)
    calls = []
    for index in range(8):
        maps = probe if index == 5 else class_maps(1, seed=index)
        seed, steps = (77, 12) if index == 5 else (index, 8 + 2 * index)
        calls.append(asyncio.create_task(render(server, maps, seed=seed, steps=steps)))
        await asyncio.sleep(0.01)  # staggered arrivals: requests are at different steps in each call
    results = await asyncio.gather(*calls)
    np.testing.assert_array_equal(results[5], alone)


async def test_generate_nuclei_masks_then_render_them_with_the_client(server: LiveServer) -> None:
    def use_client() -> tuple[object, object]:
        with HistosynthClient(server.address, timeout=30) as client:
            masks = client.generate_nuclei_masks(["inflammatory", "epithelial"], 3, model=MASK_GENERATOR_NAME, seed=5)
            images = client.render(
                masks.class_maps, instance_maps=masks.instance_maps, model=RENDERER_NAME, seed=5,
                steps=6, scheduler="dpmsolver++", guidance_scale=1.5,
            )
            return masks, images

    masks, images = await asyncio.to_thread(use_client)
    assert masks.class_maps.shape == (3, 16, 16) and masks.class_maps.dtype == np.uint8
    assert masks.instance_maps.shape == (3, 16, 16) and masks.instance_maps.dtype == np.int32
    assert masks.class_names == ("background", "other", "inflammatory", "epithelial", "spindle")
    assert masks.class_maps.max() < 5 and ((masks.instance_maps > 0) == (masks.class_maps > 0)).all()
    assert images.images.shape == (3, 16, 16, 3) and images.model.name == RENDERER_NAME
    async def masks_for(**fields: object) -> tuple[np.ndarray, np.ndarray]:
        request = mask_rendering_pb2.GenerateNucleiMasksRequest(
            model=MASK_GENERATOR_NAME, types=["inflammatory", "epithelial"], **fields
        )
        response = await stub(server).GenerateNucleiMasks(request, timeout=30)
        return tensor_to_array(response.class_maps, "c"), tensor_to_array(response.instance_maps, "i")

    single_classes, single_instances = await masks_for(count=1, seed=6)  # mask 1 of the batch above: seed 5 + 1
    np.testing.assert_array_equal(single_classes[0], masks.class_maps[1])
    np.testing.assert_array_equal(single_instances[0], masks.instance_maps[1])
    assert (await masks_for(seed=6, height=8, width=24))[0].shape == (1, 8, 24)


async def test_gan_renderer_still_served_next_to_diffusion(server: LiveServer) -> None:
    response = await stub(server).Render(
        mask_rendering_pb2.RenderRequest(model=GAN_RENDERER, class_masks=array_to_tensor(class_maps(1) % 3)),
        timeout=30,
    )
    assert tensor_to_array(response.images, "images").shape == (1, 16, 16, 3)


@pytest.mark.parametrize(
    ("request_factory", "message"),
    [
        (lambda: render_request(class_maps(1), steps=5000), r"steps must be in 1\.\.1000"),
        (lambda: render_request(class_maps(1), scheduler=7), r"diffusion\.scheduler: unknown value 7"),
        (lambda: render_request(class_maps(1, 15, 16)), r"not a positive multiple of 2"),
        (lambda: render_request(np.zeros((1, 600, 600), np.uint8)), r"exceed the diffusion limits"),
        (lambda: render_request(class_maps(1) + 5), r"class id \d+ is outside \[0, 4\]"),
        (lambda: render_request(class_maps(1), model=MASK_GENERATOR_NAME), r"needs role image_renderer"),
        (lambda: render_request(class_maps(1), guidance_scale=float("inf")), r"guidance_scale"),
    ],
)
async def test_bad_render_requests_are_invalid_argument(server: LiveServer, request_factory, message: str) -> None:  # noqa: ANN001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).Render(request_factory(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert pytest.importorskip("re").search(message, caught.value.details()), caught.value.details()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(types=["mitotic"]), r"\['mitotic'\] unknown; model .* knows \['other', 'inflammatory'"),
        (dict(count=100), r"count must be in 1\.\.64"),
        (dict(height=8), r"set both or neither"),
        (dict(model=RENDERER_NAME), r"needs role mask_generator"),
        (dict(model=""), r"name a nuclei mask generator"),
    ],
)
async def test_bad_mask_requests_are_invalid_argument(server: LiveServer, fields: dict, message: str) -> None:
    request = mask_rendering_pb2.GenerateNucleiMasksRequest(**{"model": MASK_GENERATOR_NAME, **fields})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).GenerateNucleiMasks(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert pytest.importorskip("re").search(message, caught.value.details()), caught.value.details()


async def test_deadline_exceeded_and_server_keeps_serving(server: LiveServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).Render(render_request(class_maps(1, 128, 128), steps=1000), timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await render(server, class_maps(1), steps=3)).shape == (1, 16, 16, 3)


async def test_client_cancel_removes_the_request_from_the_engine(server: LiveServer) -> None:
    engine = await shared_pipeline(server.host).engine(await server.host.get(RENDERER_NAME))
    call = stub(server).Render(render_request(class_maps(1, 128, 128), steps=1000), timeout=30)
    while engine.in_flight == 0:
        await asyncio.sleep(0.01)
    call.cancel()
    for _ in range(200):
        if engine.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.in_flight == 0 and engine.queued == 0
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_metrics_expose_steps_and_in_flight(server: LiveServer) -> None:
    await render(server, class_maps(1), steps=4)
    text = render_exposition().decode()
    assert f'histosynth_model_denoising_steps_total{{model="{RENDERER_NAME}",version="1"}}' in text
    assert "histosynth_model_diffusion_in_flight_samples" in text and "histosynth_model_denoiser_call_samples_bucket" in text


@pytest.mark.skipif(
    not (SHIPPED_STORE / SHIPPED_RENDERER / "1").is_dir() or not (SHIPPED_STORE / SHIPPED_MASK_GENERATOR / "1").is_dir(),
    reason="shipped diffusion models not in model_store yet",
)
async def test_shipped_models_make_a_mask_and_its_image() -> None:
    host = ModelHost(ModelStore(SHIPPED_STORE), ["denoiser"], names=[SHIPPED_RENDERER, SHIPPED_MASK_GENERATOR])
    await host.start()
    running = await start_server(rendering.registrations(host), server_config(SHIPPED_STORE), shutdown_hooks=[host.stop])
    channel = grpc.aio.insecure_channel(running.address)
    try:
        shipped = mask_rendering_pb2_grpc.MaskRenderingStub(channel)
        masks = await shipped.GenerateNucleiMasks(
            mask_rendering_pb2.GenerateNucleiMasksRequest(
                model=SHIPPED_MASK_GENERATOR, types=["inflammatory", "epithelial"], count=2, seed=1,
                diffusion=mask_rendering_pb2.DiffusionOptions(steps=10),
            ),
            timeout=120,
        )
        classes = tensor_to_array(masks.class_maps, "class_maps")
        instances = tensor_to_array(masks.instance_maps, "instance_maps")
        request = mask_rendering_pb2.RenderRequest(
            model=SHIPPED_RENDERER, class_masks=array_to_tensor(classes), instance_maps=array_to_tensor(instances),
            seed=1, diffusion=mask_rendering_pb2.DiffusionOptions(steps=10),
        )
        first = tensor_to_array((await shipped.Render(request, timeout=120)).images, "images")
        assert first.shape == (*classes.shape, 3) and first.std() > 5
        # The same request again, now co-batched with 3 others arriving at other steps: same bits.
        calls = []
        for index in range(4):
            other = mask_rendering_pb2.RenderRequest(
                model=SHIPPED_RENDERER, class_masks=array_to_tensor(classes[index % 2]), seed=100 + index,
                diffusion=mask_rendering_pb2.DiffusionOptions(steps=10 + index),
            )
            calls.append(asyncio.ensure_future(shipped.Render(request if index == 2 else other, timeout=120)))
            await asyncio.sleep(0.05)
        again = tensor_to_array((await asyncio.gather(*calls))[2].images, "images")
        np.testing.assert_array_equal(again, first)
        served = await host.get(SHIPPED_RENDERER)
        rng = np.random.default_rng(0)
        height, width = classes.shape[1:]
        feeds = {
            "sample": rng.standard_normal((8, 3, height, width), dtype=np.float32),
            "timestep": rng.integers(0, 1000, 8).astype(np.float32),
            "condition": (rng.random((8, 6, height, width)) > 0.5).astype(np.float32),
        }
        full = (await served.pool.infer(feeds))["model_output"]
        for start, stop in ((0, 1), (2, 5), (7, 8)):
            part = (await served.pool.infer({k: v[start:stop] for k, v in feeds.items()}))["model_output"]
            np.testing.assert_array_equal(part, full[start:stop])  # ORT rows are batch invariant
    finally:
        await channel.close()
        await running.stop(grace=0.5)
