"""Coarse tissue masks -> fine tissue masks with the PriorPath refiner (pix2pix U-Net); numpy only.

Steps, each defined by the refiner's manifest metadata (written by training/export):
  1. coarse {0, 1} masks -> float32 [N, C, H, W] in the channel order of ``input_channels``
     (v1: [coarse]; v2: [coarse, guide, noise]): coarse tissue = +1, air = -1; guide (a region
     layout, e.g. glands) +1 / -1, or 0 when the caller has none; noise N(0, 1) per pixel,
     mask i drawn from ``seed + i`` (so the same seed gives the same fine mask);
  2. reflect-pad H and W up to a multiple of ``size_multiple`` (the U-Net halves the size
     ``num_downs`` times), so any size is accepted, then crop the output back;
  3. one batched call through the model's DynamicBatcher;
  4. fine mask = output > ``threshold`` (0 for a tanh output), uint8 {0, 1}.
Optionally a single-pixel noise label (mask_ops.noise_label) per mask, sample i seeded
with ``seed + i``, for the renderer that usually follows.

No protobuf here: the servicer, the generation service and the CLI all call
:meth:`RefinementPipeline.refine` with numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.core import mask_ops
from services.core.arrays import ceil_to_multiple, check_seed, reflect_pad, run_numpy  # noqa: F401 - shared with rendering and scoring
from services.core.errors import InvalidInputError
from services.core.model_info import RefinerInfo
from services.model_host import ModelHost, ModelRef, ServedModel, required_multiple

DEFAULT_REFINER = "mask-refiner"
# pix2pix U-Net 256 has 8 stride-2 levels; used only when a manifest has no size_multiple.
DEFAULT_REFINER_SIZE_MULTIPLE = 256
# Masks bigger than this are refused (INVALID_ARGUMENT): the U-Net holds whole feature maps in
# memory (about 2.5 GB for one 4096 x 4096 mask), and all masks of a request run at once.
MAX_PIXELS_PER_MASK = 4096 * 4096
MAX_PIXELS_PER_REQUEST = 4096 * 4096


@dataclass(frozen=True)
class RefineResult:
    """uint8 [N, H, W] fine masks in {0, 1}; noise labels likewise when asked for."""

    fine_masks: np.ndarray
    noise_labels: np.ndarray | None
    model: ModelRef


def as_mask_batch(masks: np.ndarray, name: str = "coarse_masks") -> np.ndarray:
    """[H, W] or [N, H, W] binary masks (bool or integer {0, 1}) -> uint8 [N, H, W]; raises naming ``name``."""
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise InvalidInputError(f"{name}: expected [N, H, W] or [H, W], got shape {list(masks.shape)}")
    if masks.dtype != np.bool_ and not np.issubdtype(masks.dtype, np.integer):
        raise InvalidInputError(f"{name}: expected uint8 or bool masks, got {masks.dtype}")
    if 0 in masks.shape:
        raise InvalidInputError(f"{name}: empty masks (shape {list(masks.shape)}); send at least one 1 x 1 mask")
    if masks.dtype != np.bool_:
        low, high = int(masks.min()), int(masks.max())
        if low < 0 or high > 1:
            raise InvalidInputError(
                f"{name}: mask values must be 0 (air) or 1 (tissue), found values in [{low}, {high}]"
            )
    return masks.astype(np.uint8, copy=False)


class RefinementPipeline:
    """Runs refiner models hosted by a ModelHost (one batcher per model version)."""

    def __init__(self, host: ModelHost, default_model: str = DEFAULT_REFINER) -> None:
        self.host = host
        self.default_model = default_model

    async def describe_refiner(self, model: str = "", version: str | None = None) -> RefinerInfo:
        """The refiner's identity and whether it takes a guide (region layout) input, from its manifest."""
        served = await self.host.get(model or self.default_model, version or None)
        return RefinerInfo(ref=served.ref, guided="guide" in input_channels(served))

    async def refine(
        self,
        coarse_masks: np.ndarray,
        *,
        stain: str = "",
        model: str = "",
        version: str = "",
        noise_spacing: float = 0.0,
        seed: int = 0,
        guide_masks: np.ndarray | None = None,
        deadline: float | None = None,
    ) -> RefineResult:
        """Refine ``coarse_masks`` ([N, H, W] or [H, W], {0, 1}) into fine uint8 [N, H, W] masks.

        ``stain`` ("he", "ihc"; empty = the model's) is checked against the refiner's stain.
        ``noise_spacing`` > 0 also returns noise labels; sample i uses ``seed + i``.
        ``guide_masks`` (same shape, {0, 1}) is the region layout for refiners with a guide input.
        ``deadline`` is absolute ``time.monotonic()`` seconds, or None.
        """
        masks = as_mask_batch(coarse_masks)
        guides = None
        if guide_masks is not None:
            guides = as_mask_batch(guide_masks, "guide_masks")
            if guides.shape != masks.shape:
                raise InvalidInputError(
                    f"guide_masks: shape {list(guides.shape)} differs from coarse_masks {list(masks.shape)}; "
                    "send one guide per coarse mask, same height and width"
                )
        count, height, width = masks.shape
        if height * width > MAX_PIXELS_PER_MASK or count * height * width > MAX_PIXELS_PER_REQUEST:
            raise InvalidInputError(
                f"coarse_masks: {count} masks of {height} x {width} exceed the limits of {MAX_PIXELS_PER_MASK} "
                f"pixels per mask and {MAX_PIXELS_PER_REQUEST} per request; send smaller or fewer masks"
            )
        if not np.isfinite(noise_spacing) or noise_spacing < 0:
            raise InvalidInputError(f"noise_spacing must be >= 0 (0 = no noise label), got {noise_spacing}")
        check_seed(seed, masks.shape[0])
        served = await self.host.get(model or self.default_model, version or None)
        check_stain(served, stain)
        channels = input_channels(served)
        if guides is not None and "guide" not in channels:
            raise InvalidInputError(
                f"model {served.manifest.key} takes no guide_masks (its inputs are {channels}); "
                "leave guide_masks unset or pick a refiner with a guide input (mask-refiner v2+)"
            )

        fine = await self.run_model(served, masks, deadline, guides=guides, seed=seed)
        noise = None
        if noise_spacing > 0:
            noise = await run_numpy(lambda: noise_labels(masks.shape, noise_spacing, seed), masks.size)
        return RefineResult(fine_masks=fine, noise_labels=noise, model=served.ref)

    @staticmethod
    async def run_model(
        served: ServedModel,
        masks: np.ndarray,
        deadline: float | None = None,
        *,
        guides: np.ndarray | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """uint8 [N, H, W] {0, 1} masks -> uint8 [N, H, W] {0, 1} refined masks through ``served``."""
        metadata = served.metadata
        channels = input_channels(served)
        multiple = required_multiple(metadata.get("size_multiple"), DEFAULT_REFINER_SIZE_MULTIPLE)
        threshold = float(metadata.get("threshold", 0.0))
        input_spec, output_spec = served.manifest.inputs[0], served.manifest.outputs[0]
        height, width = masks.shape[1:]

        def encode() -> np.ndarray:
            encoded = encode_input(channels, masks, guides, seed)
            return reflect_pad(encoded, multiple)[0].astype(input_spec.numpy_dtype, copy=False)

        # numpy work on large masks runs in worker threads so that it never stalls the event loop; a small
        # request's (one 256 x 256 mask: 0.3-1 ms, mostly the noise plane) runs inline, saving the two
        # thread hops (four cross-thread wake-ups) that cost about as much (services.core.arrays.run_numpy).
        padded = ceil_to_multiple(height, multiple) * ceil_to_multiple(width, multiple)
        model_input = await run_numpy(encode, masks.shape[0] * len(channels) * padded)
        outputs = await served.infer({input_spec.name: model_input}, deadline)
        fine = outputs[output_spec.name][:, 0, :height, :width]
        return await run_numpy(lambda: (fine > threshold).astype(np.uint8), fine.size)


def input_channels(served: ServedModel) -> list[str]:
    """The refiner's input channel names from its manifest (v1 manifests predate the field: [coarse])."""
    channels = [str(c) for c in served.metadata.get("input_channels") or ["coarse"]]
    unknown = sorted(set(channels) - set(INPUT_CHANNELS))
    if unknown or channels[0] != "coarse":
        raise InvalidInputError(f"model {served.manifest.key} declares input channels {channels}, which this "
                                f"server cannot build (known: {list(INPUT_CHANNELS)}, coarse first)")
    return channels


INPUT_CHANNELS = ("coarse", "guide", "noise")


def encode_input(channels: list[str], masks: np.ndarray, guides: np.ndarray | None, seed: int) -> np.ndarray:
    """float32 [N, C, H, W] refiner input in ``channels`` order (the training encoding, see module doc).

    The noise channel is padded with the rest (reflect): the padded border then carries the same
    statistics, and mask i's noise depends only on ``seed + i`` and its size. Planes are written into
    one preallocated array (no per-plane temporaries or stack copy: this runs on every Refine call).
    """
    count, height, width = masks.shape
    encoded = np.empty((count, len(channels), height, width), np.float32)
    for position, channel in enumerate(channels):
        plane = encoded[:, position]
        if channel == "coarse":
            _signed(masks, plane)
        elif channel == "guide":
            if guides is None:
                plane.fill(0.0)
            else:
                _signed(guides, plane)
        else:
            for index in range(count):
                # (seed + i, 1): a stream of its own, independent of the noise label drawn from seed + i
                np.random.default_rng((seed + index, 1)).standard_normal(dtype=np.float32, out=plane[index])
    return encoded


def _signed(masks: np.ndarray, out: np.ndarray) -> None:
    """{0, nonzero} -> {-1.0, +1.0} written into ``out``."""
    np.not_equal(masks, 0, out=out, casting="unsafe")
    out *= 2.0
    out -= 1.0


def noise_labels(shape: tuple[int, int, int], spacing: float, seed: int) -> np.ndarray:
    """uint8 [N, H, W] noise labels; sample i from ``seed + i`` (mask_ops.noise_label)."""
    count, height, width = shape
    return np.stack([mask_ops.noise_label((height, width), spacing, seed + index) for index in range(count)])


def check_stain(served: ServedModel, stain: str) -> None:
    """Refuse a known stain the model was not trained for; refuse unknown stain names."""
    if not stain:
        return
    key = stain.lower()
    if key not in mask_ops.TISSUE_THRESHOLDS:
        raise InvalidInputError(f"unknown stain {stain!r}; valid stains: {sorted(mask_ops.TISSUE_THRESHOLDS)}")
    model_stain = served.metadata.get("stain")
    if model_stain and str(model_stain).lower() != key:
        raise InvalidInputError(
            f"model {served.manifest.key} refines {model_stain!r} masks, not {stain!r}; "
            f"pick a refiner trained for {stain!r} or leave stain empty"
        )
