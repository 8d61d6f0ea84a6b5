"""A denoiser model's serving contract, read from its manifest (notes/DIFFUSION_CONTRACT.md).

Everything the engine and the pipelines need to know about a diffusion model lives in its
manifest metadata: role (image_renderer / mask_generator), the noise schedule, sampling
defaults, sample shape, and how the condition and its classifier-free-guidance "null" are
encoded. Parsing it once here means a malformed manifest fails at the first request with a
message naming the model and the key, never deep inside a sampling loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from services.core import mask_ops
from services.core.model_store import ModelManifest
from services.diffusion.schedulers import DDIM, SCHEDULERS, NoiseSchedule

ROLE_IMAGE_RENDERER: Final = "image_renderer"
ROLE_MASK_GENERATOR: Final = "mask_generator"
ROLES: Final = (ROLE_IMAGE_RENDERER, ROLE_MASK_GENERATOR)
CONDITION_CLASS_MAP: Final = "class_map"
CONDITION_MULTI_HOT: Final = "multi_hot"
EDGES_CHANNEL: Final = "edges"
NULL_FLAG_NAME: Final = "null"
# Contract tensor names of every exported denoiser.
SAMPLE_INPUT: Final = "sample"
TIMESTEP_INPUT: Final = "timestep"
CONDITION_INPUT: Final = "condition"
MODEL_OUTPUT: Final = "model_output"


@dataclass(frozen=True)
class DecodeSpec:
    """How a mask generator's sample becomes class and instance maps (contract ``decode``)."""

    class_channels: int
    boundary_channel: int
    threshold: float
    min_instance_pixels: int


@dataclass(frozen=True)
class DiffusionSpec:
    """One denoiser's contract. ``condition_names``: renderer channels or mask-generator vector entries."""

    model_key: str
    role: str
    schedule: NoiseSchedule
    default_steps: int
    default_scheduler: str
    default_guidance_scale: float
    sample_channels: int
    sample_size: tuple[int, int]
    size_multiple: int
    output_range: tuple[float, float]
    condition_kind: str
    condition_names: tuple[str, ...]
    num_classes: int
    class_names: tuple[str, ...]
    decode: DecodeSpec | None
    # Largest H x W the model serves (metadata max_sample_size); None = not declared (see DiffusionEngine).
    max_sample_size: tuple[int, int] | None = None

    @classmethod
    def from_manifest(cls, manifest: ModelManifest) -> DiffusionSpec:
        key = manifest.key
        try:
            spec = cls._parse(key, manifest.metadata)
        except (KeyError, TypeError, ValueError) as error:
            problem = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"model {key}: diffusion metadata is incomplete or invalid: {problem}") from None
        names = {spec.name for spec in manifest.inputs}
        if names != {SAMPLE_INPUT, TIMESTEP_INPUT, CONDITION_INPUT} or manifest.outputs[0].name != MODEL_OUTPUT:
            raise ValueError(
                f"model {key}: a denoiser takes inputs {SAMPLE_INPUT}, {TIMESTEP_INPUT}, {CONDITION_INPUT} and "
                f"returns {MODEL_OUTPUT}; its manifest declares {sorted(names)} -> {manifest.outputs[0].name}"
            )
        return spec

    @classmethod
    def _parse(cls, key: str, metadata: Mapping[str, Any]) -> DiffusionSpec:
        role = str(metadata["role"])
        if role not in ROLES:
            raise ValueError(f"role {role!r}; valid: {', '.join(ROLES)}")
        diffusion = metadata["diffusion"]
        schedule = NoiseSchedule.from_metadata(diffusion)
        default_scheduler = str(diffusion.get("default_scheduler", DDIM))
        if default_scheduler not in SCHEDULERS:
            raise ValueError(f"default_scheduler {default_scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        default_steps = int(diffusion.get("default_steps", 20))
        schedule.check_steps(default_steps)
        condition = metadata["condition"]
        kind = str(condition["kind"])
        if kind == CONDITION_CLASS_MAP:
            names = tuple(str(name) for name in condition["channels"])
            class_names = tuple(str(name) for name in condition.get("class_names") or names[: int(condition["num_classes"])])
            num_classes = int(condition["num_classes"])
            if len(names) != num_classes + int(EDGES_CHANNEL in names):
                raise ValueError(f"condition.channels {list(names)} must be {num_classes} classes (+ {EDGES_CHANNEL!r})")
        elif kind == CONDITION_MULTI_HOT:
            names = tuple(str(name) for name in condition["names"])
            if not names or names[-1] != NULL_FLAG_NAME:
                raise ValueError(f"condition.names {list(names)} must end with the {NULL_FLAG_NAME!r} flag")
            class_names = ("background",) + names[:-1]
            num_classes = len(class_names)
        else:
            raise ValueError(f"condition.kind {kind!r}; valid: {CONDITION_CLASS_MAP}, {CONDITION_MULTI_HOT}")
        decode = None
        if role == ROLE_MASK_GENERATOR:
            raw = metadata["decode"]
            decode = DecodeSpec(
                class_channels=int(raw["class_channels"]),
                boundary_channel=int(raw["boundary_channel"]),
                threshold=float(raw.get("threshold", 0.0)),
                min_instance_pixels=int(raw.get("min_instance_pixels", 1)),
            )
        height, width = (int(value) for value in metadata["sample_size"])
        low, high = (float(value) for value in metadata.get("output_range", (-1.0, 1.0)))
        multiple = int(metadata.get("size_multiple", 8))
        if height % multiple or width % multiple or multiple < 1 or high <= low:
            raise ValueError(f"sample_size {[height, width]} must be multiples of size_multiple {multiple}")
        max_size = metadata.get("max_sample_size")
        if max_size is not None:
            max_size = tuple(int(value) for value in max_size)
            if len(max_size) != 2 or min(max_size) < multiple:
                raise ValueError(f"max_sample_size {list(max_size)} must be [height, width], each >= {multiple}")
        return cls(
            max_sample_size=max_size,
            model_key=key,
            role=role,
            schedule=schedule,
            default_steps=default_steps,
            default_scheduler=default_scheduler,
            default_guidance_scale=float(diffusion.get("default_guidance_scale", 1.0)),
            sample_channels=int(metadata["sample_channels"]),
            sample_size=(height, width),
            size_multiple=multiple,
            output_range=(low, high),
            condition_kind=kind,
            condition_names=names,
            num_classes=num_classes,
            class_names=class_names,
            decode=decode,
        )

    # ------------------------------------------------------------------ conditions
    @property
    def spatial_condition(self) -> bool:
        return self.condition_kind == CONDITION_CLASS_MAP

    def condition_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Per-sample shape of the ``condition`` input for an H x W sample."""
        if self.spatial_condition:
            return (len(self.condition_names), height, width)
        return (len(self.condition_names),)

    def null_condition(self, shape: tuple[int, ...]) -> np.ndarray:
        """The unconditional (CFG) input: zeros, plus the null flag for a multi-hot vector."""
        null = np.zeros(shape, np.float32)
        if not self.spatial_condition:
            null[-1] = 1.0
        return null

    def class_map_condition(self, classes: np.ndarray, instances: np.ndarray | None) -> np.ndarray:
        """float32 [Cc, H, W]: one-hot classes, then instance edges (of ``instances``, else of ``classes``)."""
        edges = None
        if EDGES_CHANNEL in self.condition_names:
            edges = mask_ops.instance_edges(classes if instances is None else instances)
        return mask_ops.build_generator_input(classes, self.num_classes, None, edges)

    def multi_hot_condition(self, types: tuple[str, ...]) -> np.ndarray:
        """float32 [K + 1]: 1 for each named nucleus type present, null flag 0."""
        vector = np.zeros(len(self.condition_names), np.float32)
        valid = self.condition_names[:-1]
        for name in types:
            if name not in valid:
                raise KeyError(name)
            vector[valid.index(name)] = 1.0
        return vector
