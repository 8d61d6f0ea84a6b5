"""MaskRefinement gRPC service: RefineRequest <-> RefinementPipeline, plus server assembly.

Protobuf stops here: the request's tensors are decoded by services.tensor_codec, the
pipeline works on numpy arrays, and domain errors raised anywhere below become gRPC
statuses in the core's ServingInterceptor.
"""

from __future__ import annotations

import grpc
import numpy as np

from services._generated.histosynth.v1 import common_pb2, mask_refinement_pb2, mask_refinement_pb2_grpc
from services.core.config import ServerConfig
from services.core.grpc_server import RunningServer, ServiceRegistration
from services.core.model_store import ModelStore
from services.kserve_v2 import KServeV2Servicer, kserve_registration
from services.mask_refinement.kserve_models import RefinementCatalog
from services.mask_refinement.pipeline import RefinementPipeline
from services.model_host import ModelHost
from services import servicer_common
from services.servicer_common import deadline_of, description_to_proto, model_ref_to_proto, require_field
from services.tensor_codec import array_to_tensor, tensor_to_array

SERVICE_NAME = mask_refinement_pb2.DESCRIPTOR.services_by_name["MaskRefinement"].full_name
MODEL_KINDS = ("refiner",)
MASK_DTYPES = (np.dtype(np.uint8), np.dtype(np.bool_))
MASK_LAYOUTS = ("[N, H, W]", "[H, W]")


def decode_masks(tensor: common_pb2.Tensor, name: str) -> np.ndarray:
    """A [N, H, W] or [H, W] mask tensor of the wire -> numpy (coarse and guide masks share the rules)."""
    return tensor_to_array(tensor, name, allowed_dtypes=MASK_DTYPES, allowed_ranks=(2, 3), layouts=MASK_LAYOUTS)


class MaskRefinementServicer(mask_refinement_pb2_grpc.MaskRefinementServicer):
    def __init__(self, pipeline: RefinementPipeline) -> None:
        self.pipeline = pipeline

    async def Refine(
        self, request: mask_refinement_pb2.RefineRequest, context: grpc.aio.ServicerContext
    ) -> mask_refinement_pb2.RefineResponse:
        require_field(request, "coarse_masks", "uint8 coarse masks [N, H, W] with values 0 (air) / 1 (tissue)")
        masks = decode_masks(request.coarse_masks, "coarse_masks")
        guides = None
        if request.HasField("guide_masks") and request.guide_masks.shape:
            guides = decode_masks(request.guide_masks, "guide_masks")
        result = await self.pipeline.refine(
            masks,
            guide_masks=guides,
            stain=request.stain,
            model=request.model,
            version=request.model_version,
            noise_spacing=float(request.noise_spacing),
            seed=int(request.seed),
            deadline=deadline_of(context),
        )
        response = mask_refinement_pb2.RefineResponse(
            fine_masks=array_to_tensor(result.fine_masks), model=model_ref_to_proto(result.model)
        )
        if result.noise_labels is not None:
            response.noise_labels.CopyFrom(array_to_tensor(result.noise_labels))
        return response

    async def DescribeModel(  # noqa: N802 - gRPC method name
        self, request: common_pb2.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelDescription:
        info = await self.pipeline.describe_refiner(request.model, request.model_version or None)
        served = await self.pipeline.host.get(info.ref.name, info.ref.version)
        message = description_to_proto(info, "refiner")
        message.stain = str(served.metadata.get("stain", ""))
        return message


def registrations(host: ModelHost) -> list[ServiceRegistration]:
    """The domain service and the KServe v2 endpoint over the same host (same batchers)."""
    pipeline = RefinementPipeline(host)
    return [
        ServiceRegistration(
            mask_refinement_pb2_grpc.add_MaskRefinementServicer_to_server,
            MaskRefinementServicer(pipeline),
            SERVICE_NAME,
        ),
        # <refiner>-pipeline models take uint8 coarse masks and return Refine's uint8 fine masks.
        kserve_registration(KServeV2Servicer([host], pipelines=[RefinementCatalog(pipeline)])),
    ]


def create_host(config: ServerConfig, store: ModelStore | None = None) -> ModelHost:
    return servicer_common.create_host(config, store, MODEL_KINDS)


async def start(config: ServerConfig, store: ModelStore | None = None) -> tuple[RunningServer, ModelHost]:
    """Load the refiners and start serving; the host is stopped when the server stops."""
    host = create_host(config, store)
    await host.start()
    return await servicer_common.start_with_host(host, registrations(host), config)
