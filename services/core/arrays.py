"""Array helpers every model-running service shares (refiner, renderer and segmenter pre-processing)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from services.core.errors import InvalidInputError


_T = TypeVar("_T")

# Numpy work on at most this many elements runs on the event loop instead of a worker thread:
# a 256 x 256 refiner input (3 planes, 196608 elements; noise drawn for one) takes 0.3-0.9 ms,
# while the hop to a worker thread and back (two cross-thread wake-ups) measured 0.15-0.35 ms at
# p50 on a 2-core host and several ms in its tail when the cores are busy: below this size the
# hop costs about what it saves the loop. Larger work still goes to a thread so that a big field
# never stalls the loop.
INLINE_MAX_ELEMENTS = 1 << 18


async def run_numpy(work: Callable[[], _T], elements: int) -> _T:
    """``work()`` inline when it touches at most INLINE_MAX_ELEMENTS elements, else in a worker thread."""
    if elements <= INLINE_MAX_ELEMENTS:
        return work()
    return await asyncio.to_thread(work)


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
