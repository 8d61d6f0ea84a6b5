"""The generation pipeline's model seam over the in-process rendering and refinement pipelines.

Generation calls the same RenderingPipeline / RefinementPipeline objects (and so the same
ModelHost batchers) as the MaskRendering / MaskRefinement servicers of the process, so
generated samples and direct Render calls merge into shared batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.generation.pipeline import GenerationUnavailableError, RendererInfo
from services.mask_refinement.pipeline import RefinementPipeline
from services.mask_rendering.pipeline import RenderingPipeline
from services.model_host import ModelRef


@dataclass(frozen=True)
class HostedRenderer:
    pipeline: RenderingPipeline
    info: RendererInfo

    async def render(
        self,
        class_maps: np.ndarray,
        instances: np.ndarray | None,
        noise_labels: np.ndarray | None,
        deadline: float | None,
    ) -> np.ndarray:
        result = await self.pipeline.render(
            class_maps,
            model=self.info.ref.name,
            version=self.info.ref.version,
            instance_maps=instances,
            noise_labels=noise_labels,
            deadline=deadline,
        )
        return result.images


@dataclass(frozen=True)
class HostedRefiner:
    pipeline: RefinementPipeline
    ref: ModelRef

    async def refine(self, coarse_masks: np.ndarray, deadline: float | None) -> np.ndarray:
        result = await self.pipeline.refine(
            coarse_masks, model=self.ref.name, version=self.ref.version, deadline=deadline
        )
        return result.fine_masks


class HostedModels:
    """ModelProvider backed by a RenderingPipeline and (optionally) a RefinementPipeline."""

    def __init__(self, rendering: RenderingPipeline, refinement: RefinementPipeline | None = None) -> None:
        self.rendering = rendering
        self.refinement = refinement

    async def renderer(self, name: str, version: str | None) -> HostedRenderer:
        served = await self.rendering.host.get(name, version or None)
        spec = self.rendering.spec(served)
        class_names = spec.class_names or tuple(f"class_{i}" for i in range(spec.num_classes))
        info = RendererInfo(
            ref=served.ref,
            class_names=class_names,
            noise_spacing=spec.noise_spacing,
            uses_instance_edges=spec.use_instance_edges,
            stain=str(served.metadata.get("stain", "he")),
        )
        return HostedRenderer(self.rendering, info)

    async def refiner(self, name: str, version: str | None) -> HostedRefiner:
        if self.refinement is None:
            raise GenerationUnavailableError(
                "spec.refine needs the mask refiner, which this generation server does not host; "
                "set refine to false or start the server with the refinement models"
            )
        served = await self.refinement.host.get(name, version or None)
        return HostedRefiner(self.refinement, served.ref)
