"""MaskRendering gRPC service: Render (RenderingPipeline, GAN or diffusion renderers) and
GenerateNucleiMasks (diffusion mask generators), plus server assembly.

Protobuf stops here: tensors are decoded by services.tensor_codec, the pipeline works on
numpy arrays, and domain errors become gRPC statuses in the core's ServingInterceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from services._generated.histosynth.v1 import common_pb2, mask_rendering_pb2, mask_rendering_pb2_grpc
from services.core.config import ServerConfig, check_settings, load_settings, setting
from services.core.errors import InvalidInputError
from services.core.grpc_server import RunningServer, ServiceRegistration
from services.core.model_store import ModelStore
from services.kserve_v2 import KServeV2Servicer, kserve_registration
from services.diffusion.pipeline import DiffusionSettings, shared_pipeline
from services.diffusion.spec import ROLE_IMAGE_RENDERER, ROLE_MASK_GENERATOR
from services.core.png import encode_png
from services.mask_rendering.kserve_models import RenderingCatalog
from services.mask_rendering.pipeline import RenderingPipeline
from services.model_host import ModelHost
from services import servicer_common
from services.servicer_common import (
    deadline_of,
    description_to_proto,
    diffusion_options,
    model_ref_to_proto,
    require_field,
)
from services.tensor_codec import array_to_tensor, tensor_to_array

SERVICE_NAME = mask_rendering_pb2.DESCRIPTOR.services_by_name["MaskRendering"].full_name
# GAN renderers, and diffusion models (renderers and nuclei-mask generators, told apart by metadata.role).
MODEL_KINDS = ("renderer", "denoiser")
LAYOUTS = ("[N, H, W]", "[H, W]")
CLASS_DTYPES = (np.dtype(np.uint8),)
INSTANCE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int32), np.dtype(np.int64))
NOISE_DTYPES = (np.dtype(np.uint8), np.dtype(np.bool_))
ENCODINGS = {
    mask_rendering_pb2.IMAGE_ENCODING_UNSPECIFIED: "raw",
    mask_rendering_pb2.IMAGE_ENCODING_RAW: "raw",
    mask_rendering_pb2.IMAGE_ENCODING_PNG: "png",
}
class MaskRenderingServicer(mask_rendering_pb2_grpc.MaskRenderingServicer):
    def __init__(self, pipeline: RenderingPipeline) -> None:
        self.pipeline = pipeline

    async def Render(
        self, request: mask_rendering_pb2.RenderRequest, context: grpc.aio.ServicerContext
    ) -> mask_rendering_pb2.RenderResponse:
        encoding = ENCODINGS.get(request.encoding)
        if encoding is None:
            raise InvalidInputError(
                f"encoding: unknown value {request.encoding}; valid: "
                f"{[mask_rendering_pb2.ImageEncoding.Name(value) for value in ENCODINGS]}"
            )
        require_field(request, "class_masks", "uint8 class-id maps [N, H, W]")
        classes = tensor_to_array(
            request.class_masks, "class_masks", allowed_dtypes=CLASS_DTYPES, allowed_ranks=(2, 3), layouts=LAYOUTS
        )
        instances = None
        if request.HasField("instance_maps"):
            instances = tensor_to_array(
                request.instance_maps, "instance_maps",
                allowed_dtypes=INSTANCE_DTYPES, allowed_ranks=(2, 3), layouts=LAYOUTS,
            )
        noise = None
        if request.HasField("noise_labels"):
            noise = tensor_to_array(
                request.noise_labels, "noise_labels",
                allowed_dtypes=NOISE_DTYPES, allowed_ranks=(2, 3), layouts=LAYOUTS,
            )
        result = await self.pipeline.render(
            classes,
            model=request.model,
            version=request.model_version,
            instance_maps=instances,
            noise_labels=noise,
            seed=int(request.seed),
            noise_spacing=float(request.noise_spacing),
            deadline=deadline_of(context),
            diffusion=diffusion_options(request.diffusion),
            stain_variation=bool(request.stain_variation),
            stain_source=request.stain_source,
        )
        response = mask_rendering_pb2.RenderResponse(model=model_ref_to_proto(result.model))
        if encoding == "png":
            # PNG compression of large images takes a while: keep it off the event loop.
            pngs = await asyncio.to_thread(lambda: [encode_png(image) for image in result.images])
            response.png_images.extend(pngs)
        else:
            response.images.CopyFrom(array_to_tensor(result.images))
        return response

    async def GenerateNucleiMasks(
        self, request: mask_rendering_pb2.GenerateNucleiMasksRequest, context: grpc.aio.ServicerContext
    ) -> mask_rendering_pb2.GenerateNucleiMasksResponse:
        if not request.model:
            raise InvalidInputError(
                "model: name a nuclei mask generator (e.g. 'nuclei-mask-generator'); "
                f"models hosted here: {self.pipeline.host.model_names()}"
            )
        if (request.height == 0) != (request.width == 0):
            raise InvalidInputError(
                f"height and width: set both or neither (0 = the model's trained size), got "
                f"{request.height} x {request.width}"
            )
        size = (int(request.height), int(request.width)) if request.height else None
        result = await self.pipeline.diffusion.generate_nuclei_masks(
            model=request.model,
            version=request.model_version,
            types=list(request.types),
            count=int(request.count) or 1,
            seed=int(request.seed),
            size=size,
            options=diffusion_options(request.diffusion),
            deadline=deadline_of(context),
        )
        return mask_rendering_pb2.GenerateNucleiMasksResponse(
            class_maps=array_to_tensor(result.class_maps),
            instance_maps=array_to_tensor(result.instance_maps),
            model=model_ref_to_proto(result.model),
            class_names=list(result.class_names),
        )

    async def DescribeModel(  # noqa: N802 - gRPC method name
        self, request: common_pb2.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelDescription:
        if not request.model:
            raise InvalidInputError(
                f"model: name a renderer or mask generator; models hosted here: {self.pipeline.host.model_names()}"
            )
        served = await self.pipeline.host.get(request.model, request.model_version or None)
        kind = served.manifest.kind
        if kind == "denoiser" and served.metadata.get("role") == ROLE_MASK_GENERATOR:
            info = await self.pipeline.describe_mask_generator(request.model, served.manifest.version)
            return description_to_proto(info, kind, ROLE_MASK_GENERATOR)
        renderer = await self.pipeline.describe_renderer(request.model, served.manifest.version)
        return description_to_proto(renderer, kind, ROLE_IMAGE_RENDERER if renderer.diffusion else "")


@dataclass(frozen=True)
class RenderingSettings:
    """Rendering-service settings, read from HISTOSYNTH_RENDER_* variables (e.g. HISTOSYNTH_RENDER_TILE_SIZE)."""

    tile_size: int | None = setting(
        None,
        "Tile edge in px for fields larger than it (a multiple of each model's size_multiple); "
        "unset = each model's trained tile_size. Larger tiles: faster, closer to a one-piece render, more memory.",
        lambda value: None if value is None or value >= 1 else "must be >= 1",
    )
    tile_overlap: int | None = setting(
        None, "Overlap between neighbouring tiles in px; unset = a quarter of the tile.",
        lambda value: None if value is None or value >= 0 else "must be >= 0",
    )

    def __post_init__(self) -> None:
        check_settings(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RenderingSettings:
        return load_settings(cls, prefix=SETTINGS_PREFIX, environ=environ)


SETTINGS_PREFIX = "HISTOSYNTH_RENDER_"


def registrations(
    host: ModelHost,
    settings: RenderingSettings | None = None,
    diffusion: DiffusionSettings | None = None,
) -> list[ServiceRegistration]:
    """The domain service and the KServe v2 endpoint over the same host (same batchers).

    ``diffusion``: engine policy of the diffusion models (default: step-level batching on).
    """
    settings = RenderingSettings() if settings is None else settings
    pipeline = RenderingPipeline(
        host, tile_overlap=settings.tile_overlap, tile_size=settings.tile_size,
        diffusion=shared_pipeline(host, diffusion),
    )
    return [
        ServiceRegistration(
            mask_rendering_pb2_grpc.add_MaskRenderingServicer_to_server,
            MaskRenderingServicer(pipeline),
            SERVICE_NAME,
        ),
        # ModelInfer on a GAN renderer is tiled like Render (same tile plan, blending and admission).
        # ModelInfer on a GAN renderer is tiled like Render (same tile plan, blending and admission);
        # <renderer>-pipeline models take uint8 class masks and return Render's uint8 RGB.
        kserve_registration(KServeV2Servicer(
            [host], runners={"renderer": pipeline.infer_tensor}, pipelines=[RenderingCatalog(pipeline)],
        )),
    ]


def create_host(config: ServerConfig, store: ModelStore | None = None) -> ModelHost:
    return servicer_common.create_host(config, store, MODEL_KINDS)


async def start(
    config: ServerConfig, store: ModelStore | None = None, settings: RenderingSettings | None = None
) -> tuple[RunningServer, ModelHost]:
    """Load the renderers and start serving; the host is stopped when the server stops."""
    host = create_host(config, store)
    await host.start()
    diffusion = DiffusionSettings.from_server_config(config)
    return await servicer_common.start_with_host(host, registrations(host, settings, diffusion), config)
