"""What one service needs to know about another service's model to compose with it (no protobuf).

Generation asks the rendering side for a renderer's (or mask generator's) description and the
refinement side for the refiner's, in process or over the wire (MaskRendering.DescribeModel,
MaskRefinement.DescribeModel): both answer from the model's manifest with these records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.model_host import ModelRef


@dataclass(frozen=True)
class RendererInfo:
    """A renderer (GAN or diffusion): which class ids it reads and which extra inputs it takes."""

    ref: ModelRef
    class_names: tuple[str, ...]
    noise_spacing: float | None  # trained noise-label spacing; None = the model takes no noise channel
    uses_instance_edges: bool
    stain: str = "he"
    diffusion: bool = False  # a diffusion renderer (seeded Gaussian noise, DiffusionOptions apply)
    stain_sources: tuple[str, ...] = ()  # sources of its stain bank (Render's stain_variation); () = no bank


@dataclass(frozen=True)
class MaskGeneratorInfo:
    """A diffusion nuclei-mask generator: the class ids it writes and the types a request may ask for."""

    ref: ModelRef
    class_names: tuple[str, ...]
    type_names: tuple[str, ...]


@dataclass(frozen=True)
class RefinerInfo:
    """A mask refiner; ``guided`` = it has a guide input (mask-refiner v2 takes a gland layout)."""

    ref: ModelRef
    guided: bool = False
