"""MaskRendering over real gRPC: RAW and PNG output, optional maps, tiling, bad inputs with clear statuses."""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services._generated.histosynth.v1 import common_pb2, mask_rendering_pb2, mask_rendering_pb2_grpc
from services.core import mask_ops
from services.kserve_v2 import SERVICE_NAME as KSERVE_SERVICE
from services.mask_rendering.servicer import SERVICE_NAME
from services.tensor_codec import array_to_tensor, tensor_to_array
from tests.fixtures.service_models import RENDERER_NAME, RENDERER_NOISE_SPACING
from tests.integration.conftest import LiveServer

pytestmark = pytest.mark.asyncio(loop_scope="module")


def stub(server: LiveServer) -> mask_rendering_pb2_grpc.MaskRenderingStub:
    return mask_rendering_pb2_grpc.MaskRenderingStub(server.channel)


def classes(count: int, height: int, width: int) -> np.ndarray:
    maps = np.zeros((count, height, width), np.uint8)
    maps[:, height // 4: height // 2, :] = 1
    maps[:, height // 2:, width // 3:] = 2
    return maps


def render_request(maps: np.ndarray, **fields: object) -> mask_rendering_pb2.RenderRequest:
    return mask_rendering_pb2.RenderRequest(model=RENDERER_NAME, class_masks=array_to_tensor(maps), **fields)


async def test_render_raw(rendering_server: LiveServer) -> None:
    response = await stub(rendering_server).Render(render_request(classes(2, 24, 20), seed=3), timeout=30)
    images = tensor_to_array(response.images, "images")
    assert images.shape == (2, 24, 20, 3) and images.dtype == np.uint8
    assert (response.model.name, response.model.version) == (RENDERER_NAME, "1")
    assert not response.png_images


async def test_render_png_matches_raw(rendering_server: LiveServer) -> None:
    maps = classes(2, 24, 24)
    raw = await stub(rendering_server).Render(render_request(maps, seed=1), timeout=30)
    png = await stub(rendering_server).Render(
        render_request(maps, seed=1, encoding=mask_rendering_pb2.IMAGE_ENCODING_PNG), timeout=30
    )
    assert not png.HasField("images") and len(png.png_images) == 2
    images = tensor_to_array(raw.images, "images")
    for index, encoded in enumerate(png.png_images):
        decoded = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), images[index])


async def test_render_with_given_noise_and_instances(rendering_server: LiveServer) -> None:
    maps = classes(1, 16, 16)
    instances = np.zeros((1, 16, 16), np.int32)
    instances[0, 4:8, :8] = 1
    instances[0, 4:8, 8:] = 2
    noise = mask_ops.noise_label((16, 16), RENDERER_NOISE_SPACING, 4)[None]
    given = await stub(rendering_server).Render(
        render_request(maps, instance_maps=array_to_tensor(instances), noise_labels=array_to_tensor(noise)), timeout=30
    )
    generated = await stub(rendering_server).Render(
        render_request(maps, instance_maps=array_to_tensor(instances), seed=4), timeout=30
    )
    assert given.images.data == generated.images.data


async def test_stain_variation_is_deterministic_and_changes_the_stain(rendering_server: LiveServer) -> None:
    maps = classes(2, 24, 24)
    plain = await stub(rendering_server).Render(render_request(maps, seed=2), timeout=30)
    varied = await stub(rendering_server).Render(render_request(maps, seed=2, stain_variation=True), timeout=30)
    again = await stub(rendering_server).Render(render_request(maps, seed=2, stain_variation=True), timeout=30)
    assert varied.images.data == again.images.data and varied.images.data != plain.images.data
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(rendering_server).Render(render_request(maps, stain_variation=True, stain_source="lab9"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "it has dark, pale" in caught.value.details()


async def test_large_field_is_tiled(rendering_server: LiveServer) -> None:
    response = await stub(rendering_server).Render(render_request(classes(1, 100, 90)), timeout=30)
    assert tuple(response.images.shape) == (1, 100, 90, 3)


async def test_health_and_reflection(rendering_server: LiveServer) -> None:
    health = health_pb2_grpc.HealthStub(rendering_server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(rendering_server.channel)
    names = set()
    async for answer in reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names |= {service.name for service in answer.list_services_response.service}
    assert {SERVICE_NAME, KSERVE_SERVICE} <= names


def out_of_range_classes() -> np.ndarray:
    maps = classes(1, 8, 8)
    maps[0, 0, 0] = 9
    return maps


BAD_REQUESTS = [
    pytest.param(render_request(classes(1, 8, 8).astype(np.int32)), grpc.StatusCode.INVALID_ARGUMENT,
                 "class_masks: expected uint8 [N, H, W] or [H, W], got int32 [1, 8, 8]", id="wrong-dtype"),
    pytest.param(render_request(np.zeros((8,), np.uint8)), grpc.StatusCode.INVALID_ARGUMENT,
                 "got uint8 [8]", id="wrong-rank"),
    pytest.param(
        mask_rendering_pb2.RenderRequest(
            model=RENDERER_NAME,
            class_masks=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[1, 8, 8], data=b"\0" * 60),
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "data holds 60 bytes but uint8 [1, 8, 8] needs 64", id="length-mismatch",
    ),
    pytest.param(mask_rendering_pb2.RenderRequest(model=RENDERER_NAME), grpc.StatusCode.INVALID_ARGUMENT,
                 "class_masks is required", id="missing"),
    pytest.param(
        mask_rendering_pb2.RenderRequest(
            model=RENDERER_NAME,
            class_masks=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[1, 0, 8], data=b""),
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "tensor is empty", id="empty",
    ),
    pytest.param(
        mask_rendering_pb2.RenderRequest(
            model=RENDERER_NAME,
            class_masks=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[1, 1 << 20, 1 << 20], data=b""),
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "more than the limit of", id="huge-dims",
    ),
    pytest.param(render_request(out_of_range_classes()), grpc.StatusCode.INVALID_ARGUMENT,
                 "class id 9 is outside [0, 2] for model renderer-test/1", id="class-id-out-of-range"),
    pytest.param(
        render_request(classes(1, 8, 8), instance_maps=array_to_tensor(np.zeros((1, 8, 7), np.int32))),
        grpc.StatusCode.INVALID_ARGUMENT, "instance_maps: shape [1, 8, 7] does not match", id="instance-shape",
    ),
    pytest.param(
        render_request(classes(1, 8, 8), noise_labels=array_to_tensor(np.zeros((1, 8, 8), np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, "noise_labels: expected uint8 or bool", id="noise-dtype",
    ),
    pytest.param(render_request(classes(1, 8, 8), encoding=42), grpc.StatusCode.INVALID_ARGUMENT,
                 "encoding: unknown value 42", id="bad-encoding"),
    pytest.param(
        mask_rendering_pb2.RenderRequest(model="renderer-nope", class_masks=array_to_tensor(classes(1, 8, 8))),
        grpc.StatusCode.NOT_FOUND, "model 'renderer-nope' is not loaded; available: ['renderer-test']",
        id="unknown-model",
    ),
    pytest.param(
        mask_rendering_pb2.RenderRequest(model="mask-refiner", class_masks=array_to_tensor(classes(1, 8, 8))),
        grpc.StatusCode.NOT_FOUND, "available: ['renderer-test']", id="model-of-another-service",
    ),
]


@pytest.mark.parametrize("request_, code, message", BAD_REQUESTS)
async def test_bad_inputs_get_clear_status_and_server_keeps_serving(
    rendering_server: LiveServer, request_: mask_rendering_pb2.RenderRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub(rendering_server).Render(request_, timeout=30)
    assert raised.value.code() == code
    assert message in raised.value.details()
    ok = await stub(rendering_server).Render(render_request(classes(1, 8, 8)), timeout=30)
    assert tuple(ok.images.shape) == (1, 8, 8, 3)
