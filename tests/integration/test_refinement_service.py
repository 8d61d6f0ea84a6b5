"""MaskRefinement over real gRPC: every RPC, health, reflection, and bad inputs with clear statuses."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services._generated.histosynth.v1 import common_pb2, mask_refinement_pb2, mask_refinement_pb2_grpc
from services.core import mask_ops
from services.kserve_v2 import SERVICE_NAME as KSERVE_SERVICE
from services.mask_refinement.servicer import SERVICE_NAME
from services.tensor_codec import array_to_tensor, tensor_to_array
from tests.integration.conftest import LiveServer

pytestmark = pytest.mark.asyncio(loop_scope="module")


def stub(server: LiveServer) -> mask_refinement_pb2_grpc.MaskRefinementStub:
    return mask_refinement_pb2_grpc.MaskRefinementStub(server.channel)


def square_masks(count: int, size: int) -> np.ndarray:
    masks = np.zeros((count, size, size), np.uint8)
    masks[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return masks


async def test_refine_returns_fine_masks_and_model_ref(refinement_server: LiveServer) -> None:
    request = mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(square_masks(2, 30)), stain="he")
    response = await stub(refinement_server).Refine(request, timeout=30)
    fine = tensor_to_array(response.fine_masks, "fine_masks")
    assert fine.shape == (2, 30, 30) and fine.dtype == np.uint8 and set(np.unique(fine)) <= {0, 1}
    assert not response.HasField("noise_labels")
    assert (response.model.name, response.model.version) == ("mask-refiner", "2")
    assert len(response.model.sha256) == 64


async def test_refine_with_noise_and_pinned_version(refinement_server: LiveServer) -> None:
    request = mask_refinement_pb2.RefineRequest(
        coarse_masks=array_to_tensor(square_masks(1, 16)[0]), model_version="1", noise_spacing=4.0, seed=7
    )
    response = await stub(refinement_server).Refine(request, timeout=30)
    assert response.model.version == "1"
    noise = tensor_to_array(response.noise_labels, "noise_labels")
    np.testing.assert_array_equal(noise[0], mask_ops.noise_label((16, 16), 4.0, 7))


async def test_health_reports_serving_for_domain_and_v2_services(refinement_server: LiveServer) -> None:
    health = health_pb2_grpc.HealthStub(refinement_server.channel)
    for service in ("", SERVICE_NAME, KSERVE_SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_services(refinement_server: LiveServer) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(refinement_server.channel)
    call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for reply in call:
        names |= {service.name for service in reply.list_services_response.service}
    assert {SERVICE_NAME, KSERVE_SERVICE, "grpc.health.v1.Health"} <= names


def raw_tensor(dtype: int, shape: list[int], data: bytes) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


BAD_REQUESTS = [
    pytest.param(
        mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(np.zeros((2, 3), np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, "coarse_masks: expected uint8 or bool [N, H, W] or [H, W], got float32 [2, 3]",
        id="wrong-dtype",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(np.zeros((1, 1, 4, 4), np.uint8))),
        grpc.StatusCode.INVALID_ARGUMENT, "got uint8 [1, 1, 4, 4]", id="wrong-rank",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(coarse_masks=raw_tensor(common_pb2.DATA_TYPE_UINT8, [2, 4, 4], b"\0" * 31)),
        grpc.StatusCode.INVALID_ARGUMENT, "data holds 31 bytes but uint8 [2, 4, 4] needs 32 x 1 = 32 bytes",
        id="data-length-mismatch",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(), grpc.StatusCode.INVALID_ARGUMENT, "coarse_masks is required", id="missing",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(coarse_masks=raw_tensor(common_pb2.DATA_TYPE_UINT8, [0, 4, 4], b"")),
        grpc.StatusCode.INVALID_ARGUMENT, "tensor is empty", id="empty",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(
            coarse_masks=raw_tensor(common_pb2.DATA_TYPE_UINT8, [1, 2**31, 2**31], b"")
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "more than the limit of", id="huge-dims",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(np.full((1, 4, 4), 3, np.uint8))),
        grpc.StatusCode.INVALID_ARGUMENT, "mask values must be 0 (air) or 1 (tissue)", id="values-out-of-range",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(square_masks(1, 8)), model="nope"),
        grpc.StatusCode.NOT_FOUND, "model 'nope' is not loaded; available: ['mask-refiner']", id="unknown-model",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(square_masks(1, 8)), model_version="9"),
        grpc.StatusCode.NOT_FOUND, "available: ['mask-refiner/1', 'mask-refiner/2']", id="unknown-version",
    ),
    pytest.param(
        mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(square_masks(1, 8)), stain="ihc"),
        grpc.StatusCode.INVALID_ARGUMENT, "refines 'he' masks, not 'ihc'", id="wrong-stain",
    ),
]


@pytest.mark.parametrize("request_, code, message", BAD_REQUESTS)
async def test_bad_inputs_get_clear_status_and_server_keeps_serving(
    refinement_server: LiveServer, request_: mask_refinement_pb2.RefineRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub(refinement_server).Refine(request_, timeout=30)
    assert raised.value.code() == code
    assert message in raised.value.details()
    ok = await stub(refinement_server).Refine(
        mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(square_masks(1, 8))), timeout=30
    )
    assert tuple(ok.fine_masks.shape) == (1, 8, 8)


async def test_message_over_the_size_limit_is_resource_exhausted(refinement_server: LiveServer) -> None:
    too_big = square_masks(1, 3000)  # 9 MB > the test server's 8 MiB message limit
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub(refinement_server).Refine(
            mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(too_big)), timeout=30
        )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
