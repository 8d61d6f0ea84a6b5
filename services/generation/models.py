"""The generation pipeline's model seam, in process: the embedded default (``make run``, ``serve --all``).

Generation reaches renderers, mask generators and refiners through :class:`ModelProvider`
(services.generation.pipeline). Two providers implement it:

* :class:`InProcessModels` (here): calls the rendering and refinement pipeline objects of the same
  process, so generated samples and direct Render/Refine calls merge into shared batches. It takes
  those objects as arguments and imports neither service: the composition root
  (services/all_in_one.py) builds them.
* ``RemoteModels`` (services/generation/remote.py): the same calls over the wire, to separately
  deployed MaskRendering / MaskRefinement servers (HISTOSYNTH_GENERATION_RENDERING_ADDRESS, ...).

Both give byte-identical samples for the same spec and model versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from services.core.model_info import MaskGeneratorInfo, RefinerInfo, RendererInfo
from services.diffusion.pipeline import DiffusionOptions
from services.generation.pipeline import GenerationUnavailableError
from services.model_host import ModelRef


class RenderingSide(Protocol):
    """What InProcessModels uses of services.mask_rendering.pipeline.RenderingPipeline."""

    diffusion: Any  # services.diffusion.pipeline.DiffusionPipeline (generate_nuclei_masks)

    async def describe_renderer(self, model: str, version: str | None = None) -> RendererInfo: ...

    async def describe_mask_generator(self, model: str, version: str | None = None) -> MaskGeneratorInfo: ...

    async def render(self, class_maps: np.ndarray, **kwargs: Any) -> Any: ...


class RefinementSide(Protocol):
    """What InProcessModels uses of services.mask_refinement.pipeline.RefinementPipeline."""

    async def describe_refiner(self, model: str = "", version: str | None = None) -> RefinerInfo: ...

    async def refine(self, coarse_masks: np.ndarray, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class InProcessRenderer:
    pipeline: RenderingSide
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
        stain_variation: bool = False,
        stain_source: str = "",
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
            stain_variation=stain_variation,
            stain_source=stain_source,
        )
        return result.images


@dataclass(frozen=True)
class InProcessMaskGenerator:
    pipeline: RenderingSide
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
class InProcessRefiner:
    pipeline: RefinementSide
    info: RefinerInfo

    @property
    def ref(self) -> ModelRef:
        return self.info.ref

    async def refine(self, coarse_masks: np.ndarray, deadline: float | None, *,
                     guide_masks: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        result = await self.pipeline.refine(
            coarse_masks, model=self.ref.name, version=self.ref.version, deadline=deadline,
            guide_masks=guide_masks if self.info.guided else None, seed=seed,
        )
        return result.fine_masks


class InProcessModels:
    """ModelProvider over a rendering pipeline and (optionally) a refinement pipeline of this process."""

    def __init__(self, rendering: RenderingSide, refinement: RefinementSide | None = None) -> None:
        self.rendering = rendering
        self.refinement = refinement

    async def renderer(self, name: str, version: str | None) -> InProcessRenderer:
        return InProcessRenderer(self.rendering, await self.rendering.describe_renderer(name, version or None))

    async def mask_generator(self, name: str, version: str | None) -> InProcessMaskGenerator:
        info = await self.rendering.describe_mask_generator(name, version or None)
        return InProcessMaskGenerator(self.rendering, info)

    async def refiner(self, name: str, version: str | None) -> InProcessRefiner:
        if self.refinement is None:
            raise GenerationUnavailableError(
                "spec.refine needs the mask refiner, which this generation server does not reach; "
                "set refine to false, or point HISTOSYNTH_GENERATION_REFINEMENT_ADDRESS at a MaskRefinement server"
            )
        return InProcessRefiner(self.refinement, await self.refinement.describe_refiner(name, version or None))


# The names before the in-process/remote split.
HostedModels = InProcessModels
