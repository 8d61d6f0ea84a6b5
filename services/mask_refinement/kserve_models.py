"""Refiners as KServe v2 pipeline models: uint8 coarse mask in, uint8 fine mask out (services.kserve_pipelines).

``<refiner>-pipeline`` for every refiner of the host; ``run`` is RefinementPipeline.refine, the call
behind the domain Refine RPC, so the bytes are Refine's for the same masks, guide, seed, noise
spacing and model version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from services.core.errors import InvalidInputError
from services.kserve_pipelines import (
    PipelineModel,
    PipelineParameter,
    PipelineResult,
    PipelineTensor,
    optional_int,
)
from services.mask_refinement.pipeline import RefinementPipeline

MASK_SHAPE: Final = (-1, -1, -1)


class RefinePipelineModel(PipelineModel):
    """Coarse masks (+ guide masks) -> fine masks (+ noise labels with noise_spacing > 0), as Refine."""

    inputs = (
        PipelineTensor("coarse_masks", ("UINT8", "BOOL"), MASK_SHAPE, ranks=(2, 3)),
        PipelineTensor("guide_masks", ("UINT8", "BOOL"), MASK_SHAPE, ranks=(2, 3), optional=True),
    )
    outputs = (
        PipelineTensor("fine_masks", ("UINT8",), MASK_SHAPE),
        PipelineTensor("noise_labels", ("UINT8",), MASK_SHAPE),
    )
    parameters = (
        PipelineParameter("seed", int, "mask i uses seed + i (noise channel, noise label); default 0"),
        PipelineParameter("noise_spacing", float, "> 0 also returns noise labels at this spacing in px; default 0"),
        PipelineParameter("stain", str, "he or ihc, checked against the refiner's; unset = the model's"),
    )

    def __init__(self, refinement: RefinementPipeline, model: str) -> None:
        super().__init__(refinement.host, model)
        self.refinement = refinement

    async def run(
        self, version: str, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, object],
        deadline: float | None,
    ) -> PipelineResult:
        result = await self.refinement.refine(
            inputs["coarse_masks"], guide_masks=inputs.get("guide_masks"),
            stain=str(parameters.get("stain", "")), model=self.model, version=version,
            noise_spacing=float(parameters.get("noise_spacing", 0.0)),  # type: ignore[arg-type]
            seed=optional_int(parameters, "seed") or 0, deadline=deadline,
        )
        outputs = {"fine_masks": result.fine_masks}
        if result.noise_labels is not None:
            outputs["noise_labels"] = result.noise_labels
        return PipelineResult(outputs, result.model)

    def check_outputs(self, requested: list[str], parameters: Mapping[str, object]) -> None:
        super().check_outputs(requested, parameters)
        # Without a spacing Refine makes no noise label: say how to get one instead of returning nothing.
        if "noise_labels" in requested and not float(parameters.get("noise_spacing", 0.0)) > 0:  # type: ignore[arg-type]
            raise InvalidInputError(
                f"output 'noise_labels' of model {self.name} needs parameter noise_spacing > 0 (dot spacing in px)"
            )


class RefinementCatalog:
    """``<refiner>-pipeline`` for each refiner of the refinement pipeline's host."""

    def __init__(self, refinement: RefinementPipeline) -> None:
        self.refinement = refinement

    def pipelines(self) -> dict[str, PipelineModel]:
        models = [RefinePipelineModel(self.refinement, name) for name in self.refinement.host.model_names()]
        return {model.name: model for model in models}
