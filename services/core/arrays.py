"""Array helpers every model-running service shares (refiner, renderer and segmenter pre-processing)."""

from __future__ import annotations

import math

import numpy as np

from services.core.errors import InvalidInputError


def ceil_to_multiple(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


def reflect_pad(batch: np.ndarray, multiple: int) -> tuple[np.ndarray, int, int]:
    """Reflect-pad the last two axes of ``batch`` up to multiples of ``multiple``.

    Returns (padded, height, width) with the original size for cropping back. Reflection
    (not zeros) keeps the border looking like tissue/air that continues, which is what a
    convolutional model saw in training.
    """
    height, width = batch.shape[-2:]
    pad_h = ceil_to_multiple(height, multiple) - height
    pad_w = ceil_to_multiple(width, multiple) - width
    if pad_h == 0 and pad_w == 0:
        return batch, height, width
    # numpy's reflect needs a size >= 2 on a padded axis; a 1-pixel axis is edge-extended instead.
    widths = [(0, 0)] * (batch.ndim - 2) + [(0, pad_h), (0, pad_w)]
    mode = "reflect" if min(height, width) > 1 else "edge"
    return np.pad(batch, widths, mode=mode), height, width


def check_seed(seed: int, count: int) -> None:
    """Seeds ``seed .. seed + count - 1`` must fit the uint64 the wire carries."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
    if int(seed) + count - 1 >= 2**64:
        raise InvalidInputError(f"seed {seed} + {count} samples overflows 64 bits; use a smaller seed")
