"""Renderers as KServe v2 pipeline models: uint8 class mask in, uint8 RGB out (services.kserve_pipelines).

``<renderer>-pipeline`` for every GAN renderer (kind ``renderer``) and diffusion image renderer
(kind ``denoiser``, role ``image_renderer``) of the host. ``run`` is RenderingPipeline.render, the
call behind the domain Render RPC, so the bytes are Render's for the same masks, seed, options and
model version (tiling, noise label, edges, diffusion sampling and all).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from services.core.errors import HistosynthError
from services.diffusion.pipeline import DENOISER_KIND, DiffusionOptions, check_options
from services.diffusion.schedulers import SCHEDULERS
from services.diffusion.spec import ROLE_IMAGE_RENDERER
from services.kserve_pipelines import (
    PipelineModel,
    PipelineParameter,
    PipelineResult,
    PipelineTensor,
    optional_int,
)
from services.mask_rendering.pipeline import RenderingPipeline

LABEL_SHAPE: Final = (-1, -1, -1)
CLASS_MASKS: Final = PipelineTensor("class_masks", ("UINT8",), LABEL_SHAPE, ranks=(2, 3))
INSTANCE_MAPS: Final = PipelineTensor(
    "instance_maps", ("INT32", "UINT8", "UINT16", "INT64"), LABEL_SHAPE, ranks=(2, 3), optional=True
)
NOISE_LABELS: Final = PipelineTensor("noise_labels", ("UINT8", "BOOL"), LABEL_SHAPE, ranks=(2, 3), optional=True)
IMAGES: Final = PipelineTensor("images", ("UINT8",), (-1, -1, -1, 3))
SEED: Final = PipelineParameter("seed", int, "sample i uses seed + i (noise label or initial noise); default 0")


class RenderPipelineModel(PipelineModel):
    """A GAN renderer: class masks (+ instance maps, + noise labels) -> images, as Render."""

    inputs = (CLASS_MASKS, INSTANCE_MAPS, NOISE_LABELS)
    outputs = (IMAGES,)
    parameters = (
        SEED,
        PipelineParameter("noise_spacing", float, "px between noise-label dots when none is sent; 0 = the model's"),
        PipelineParameter("stain_source", str, "stain variation from the model's stain bank: a source dataset "
                          "(e.g. monuseg) or 'all'; absent = none"),
    )

    def __init__(self, rendering: RenderingPipeline, model: str) -> None:
        super().__init__(rendering.host, model)
        self.rendering = rendering

    async def run(
        self, version: str, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, object],
        deadline: float | None,
    ) -> PipelineResult:
        result = await self.rendering.render(
            inputs["class_masks"], model=self.model, version=version,
            instance_maps=inputs.get("instance_maps"), noise_labels=inputs.get("noise_labels"),
            seed=optional_int(parameters, "seed") or 0,
            noise_spacing=float(parameters.get("noise_spacing", 0.0)),  # type: ignore[arg-type]
            deadline=deadline, diffusion=self.diffusion_options(parameters),
            **stain_options(parameters),
        )
        return PipelineResult({"images": result.images}, result.model)

    def diffusion_options(self, parameters: Mapping[str, object]) -> DiffusionOptions | None:
        return None


def stain_options(parameters: Mapping[str, object]) -> dict[str, object]:
    """The ``stain_source`` parameter as Render's stain_variation / stain_source ('all' = every source)."""
    source = parameters.get("stain_source")
    if source is None:
        return {}
    return {"stain_variation": True, "stain_source": "" if source == "all" else str(source)}


class DiffusionRenderPipelineModel(RenderPipelineModel):
    """A diffusion image renderer: class masks (+ instance maps) -> images, sampled as Render samples them."""

    inputs = (CLASS_MASKS, INSTANCE_MAPS)
    parameters = (
        SEED,
        PipelineParameter("steps", int, "denoising steps, 1-1000; 0 or unset = the model's default"),
        PipelineParameter("guidance_scale", float, "classifier-free guidance scale; unset = the model's default"),
        PipelineParameter("scheduler", str, f"one of {', '.join(SCHEDULERS)}; unset = the model's default"),
    )

    def diffusion_options(self, parameters: Mapping[str, object]) -> DiffusionOptions:
        # The same rules as Render's DiffusionOptions message (servicer_common.diffusion_options).
        steps = optional_int(parameters, "steps") or None
        guidance = parameters.get("guidance_scale")
        check_options(steps, None if guidance is None else float(guidance))  # type: ignore[arg-type]
        scheduler = parameters.get("scheduler") or None
        return DiffusionOptions(
            steps=steps, scheduler=None if scheduler is None else str(scheduler),
            guidance_scale=None if guidance is None else float(guidance),  # type: ignore[arg-type]
        )


class RenderingCatalog:
    """``<renderer>-pipeline`` for each renderer of the rendering pipeline's host (nuclei-mask generators take no
    mask, so they have none)."""

    def __init__(self, rendering: RenderingPipeline) -> None:
        self.rendering = rendering

    def pipelines(self) -> dict[str, PipelineModel]:
        models: dict[str, PipelineModel] = {}
        host = self.rendering.host
        for name in host.model_names():
            try:
                manifest = host.latest_manifest(name)
            except HistosynthError:
                continue  # unreadable: the host reports it in load_errors
            if manifest.kind == DENOISER_KIND:
                if manifest.metadata.get("role") == ROLE_IMAGE_RENDERER:
                    model: PipelineModel = DiffusionRenderPipelineModel(self.rendering, name)
                    models[model.name] = model
            else:
                model = RenderPipelineModel(self.rendering, name)
                models[model.name] = model
        return models
