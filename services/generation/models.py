"""The generation pipeline's model seam over the in-process rendering and refinement pipelines.

Generation calls the same RenderingPipeline / RefinementPipeline objects (and so the same
ModelHost batchers) as the MaskRendering / MaskRefinement servicers of the process, so
generated samples and direct Render calls merge into shared batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.diffusion.pipeline import DENOISER_KIND, DiffusionOptions
from services.diffusion.spec import EDGES_CHANNEL, ROLE_IMAGE_RENDERER, ROLE_MASK_GENERATOR
from services.generation.pipeline import GenerationUnavailableError, MaskGeneratorInfo, RendererInfo
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
        *,
        seed: int = 0,
        diffusion: DiffusionOptions = DiffusionOptions(),
    ) -> np.ndarray:
        result = await self.pipeline.render(
            class_maps,
            model=self.info.ref.name,
            version=self.info.ref.version,
            instance_maps=instances,
            noise_labels=noise_labels,
            seed=seed,
            deadline=deadline,
            diffusion=diffusion,
        )
        return result.images


@dataclass(frozen=True)
class HostedMaskGenerator:
    pipeline: RenderingPipeline
    info: MaskGeneratorInfo

    async def generate(
        self,
        types: Sequence[str],
        seed: int,
        size: tuple[int, int],
        diffusion: DiffusionOptions,
        deadline: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        result = await self.pipeline.diffusion.generate_nuclei_masks(
            model=self.info.ref.name,
            version=self.info.ref.version,
            types=tuple(types),
            count=1,
            seed=seed,
            size=size,
            options=diffusion,
            deadline=deadline,
        )
        return result.class_maps[0], result.instance_maps[0]


@dataclass(frozen=True)
class HostedRefiner:
    pipeline: RefinementPipeline
    ref: ModelRef
    guided: bool = False  # the model has a guide input (mask-refiner v2): generation passes its gland layout

    async def refine(self, coarse_masks: np.ndarray, deadline: float | None, *,
                     guide_masks: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        result = await self.pipeline.refine(
            coarse_masks, model=self.ref.name, version=self.ref.version, deadline=deadline,
            guide_masks=guide_masks if self.guided else None, seed=seed,
        )
        return result.fine_masks


class HostedModels:
    """ModelProvider backed by a RenderingPipeline and (optionally) a RefinementPipeline."""

    def __init__(self, rendering: RenderingPipeline, refinement: RefinementPipeline | None = None) -> None:
        self.rendering = rendering
        self.refinement = refinement

    async def renderer(self, name: str, version: str | None) -> HostedRenderer:
        served = await self.rendering.host.get(name, version or None)
        if served.manifest.kind == DENOISER_KIND:
            _, engine = await self.rendering.diffusion.served(name, served.manifest.version, ROLE_IMAGE_RENDERER)
            info = RendererInfo(
                ref=served.ref,
                class_names=engine.spec.class_names,
                noise_spacing=None,  # diffusion starts from seeded Gaussian noise, not a noise label
                uses_instance_edges=EDGES_CHANNEL in engine.spec.condition_names,
                stain=str(served.metadata.get("stain", "he")),
            )
            return HostedRenderer(self.rendering, info)
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

    async def mask_generator(self, name: str, version: str | None) -> HostedMaskGenerator:
        served, engine = await self.rendering.diffusion.served(name, version or "", ROLE_MASK_GENERATOR)
        info = MaskGeneratorInfo(
            ref=served.ref, class_names=engine.spec.class_names, type_names=engine.spec.condition_names[:-1]
        )
        return HostedMaskGenerator(self.rendering, info)

    async def refiner(self, name: str, version: str | None) -> HostedRefiner:
        if self.refinement is None:
            raise GenerationUnavailableError(
                "spec.refine needs the mask refiner, which this generation server does not host; "
                "set refine to false or start the server with the refinement models"
            )
        served = await self.refinement.host.get(name, version or None)
        guided = "guide" in (served.metadata.get("input_channels") or ())
        return HostedRefiner(self.refinement, served.ref, guided)
