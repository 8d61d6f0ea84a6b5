"""Paired geometric augmentation: one random crop / flip / rot90 applied identically to several arrays."""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD_MODES = ("reflect", "zero")


def _pad_to(array: np.ndarray, crop: int, mode: str) -> np.ndarray:
    height, width = array.shape[:2]
    pad_h, pad_w = max(0, crop - height), max(0, crop - width)
    if pad_h == 0 and pad_w == 0:
        return array
    # Pad symmetrically (odd remainder at the bottom/right) so the content stays centred.
    widths = [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)] + [(0, 0)] * (array.ndim - 2)
    if mode == "zero" or min(height, width) < 2:
        return np.pad(array, widths, mode="constant", constant_values=0)
    # numpy's reflect mode reflects repeatedly when the pad exceeds the array, so any size works.
    return np.pad(array, widths, mode="reflect")


def paired_augment(
    arrays: Sequence[np.ndarray],
    crop: int | None,
    rng: np.random.Generator,
    *,
    pad_mode: str | Sequence[str] = "reflect",
    flip: bool = True,
    rotate: bool = True,
) -> list[np.ndarray]:
    """Apply the SAME random crop, horizontal flip and rot90 to every array (each H x W or H x W x C).

    Order: pad (only if smaller than `crop`) -> crop (uniform offset) -> flip -> rot90 by k*90 degrees. Flip +
    rot90 together reach all 8 symmetries of the square. `crop=None` keeps the full size. `pad_mode` is one
    mode for all arrays or one per array ("reflect" keeps image and derived masks consistent; "zero" pads
    with 0 = background/no instance). Outputs are contiguous copies.
    """
    if not arrays:
        return []
    arrays = [np.asarray(a) for a in arrays]
    shape = arrays[0].shape[:2]
    for i, array in enumerate(arrays):
        if array.ndim not in (2, 3):
            raise ValueError(f"array {i} must be H x W or H x W x C, got shape {array.shape}")
        if array.shape[:2] != shape:
            raise ValueError(f"array {i} has H x W {array.shape[:2]}, array 0 has {shape}")
    modes = [pad_mode] * len(arrays) if isinstance(pad_mode, str) else list(pad_mode)
    if len(modes) != len(arrays):
        raise ValueError(f"got {len(modes)} pad modes for {len(arrays)} arrays")
    for mode in modes:
        if mode not in PAD_MODES:
            raise ValueError(f"unknown pad mode {mode!r}; valid pad modes: {list(PAD_MODES)}")

    if crop is not None:
        if crop < 1:
            raise ValueError(f"crop must be >= 1 or None, got {crop}")
        arrays = [_pad_to(a, crop, m) for a, m in zip(arrays, modes)]
        height, width = arrays[0].shape[:2]
        top = int(rng.integers(0, height - crop + 1))
        left = int(rng.integers(0, width - crop + 1))
        arrays = [a[top : top + crop, left : left + crop] for a in arrays]
    do_flip = bool(rng.integers(0, 2)) if flip else False
    turns = int(rng.integers(0, 4)) if rotate else 0
    if do_flip:
        arrays = [a[:, ::-1] for a in arrays]
    if turns:
        arrays = [np.rot90(a, k=turns, axes=(0, 1)) for a in arrays]
    return [np.ascontiguousarray(a) for a in arrays]
