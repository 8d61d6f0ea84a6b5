"""Coarse tissue masks that genuinely lack the fine structure (refiner v2 training pairs and evaluation inputs).

PriorPath's own pairs (opening 5x5 then closing 10x10 at full resolution) remove only holes and islands a few
pixels wide: on GlaS the coarse mask still carries almost every lumen and gap of the fine mask, so a refiner
trained on them learns the identity (v1 changed 0.3 % of pixels). A person sketching tissue regions draws at a
much lower resolution. These coarsenings imitate that, at several levels:

* ``priorpath``  -- the paper's pairs, kept as the lightest level.
* ``lowres``     -- the fine mask is block-averaged at 1/factor resolution, smoothed there, thresholded at 0.5,
                    cleaned of regions/holes under ``min_region`` low-res pixels and brought back with bilinear
                    interpolation of the smoothed field: smooth outlines, nothing smaller than ~factor px.

All functions are pure: the same mask, level and parameters give the same coarse mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import scipy.ndimage

from services.core import mask_ops

LEVELS: Final = ("priorpath", "lowres")


@dataclass(frozen=True)
class Coarsening:
    """One coarsening recipe. ``factor`` and ``min_region`` are used by ``lowres`` only."""

    level: str = "lowres"
    factor: int = 8
    min_region: int = 2

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown coarsening level {self.level!r}; valid: {list(LEVELS)}")
        if self.factor < 1 or self.min_region < 0:
            raise ValueError(f"factor must be >= 1 and min_region >= 0, got {self.factor}, {self.min_region}")

    @property
    def label(self) -> str:
        return "priorpath" if self.level == "priorpath" else f"lowres-{self.factor}"


# The evaluation input of the refiner report: a sketch at 1/8 resolution (~8 px detail at GlaS 20x).
SKETCH: Final = Coarsening("lowres", factor=8, min_region=2)
# What training draws from, uniformly per sample: the paper's level plus three sketch resolutions.
TRAINING_MIX: Final = (Coarsening("priorpath"), Coarsening("lowres", 4, 2), SKETCH, Coarsening("lowres", 16, 1))


def _remove_small(binary: np.ndarray, min_size: int) -> np.ndarray:
    """Drops regions and fills holes smaller than ``min_size`` pixels (8-connected regions)."""
    if min_size <= 0:
        return binary
    structure = np.ones((3, 3), bool)
    out = binary.copy()
    for value in (True, False):
        labels, count = scipy.ndimage.label(out == value, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        out[small[labels]] = not value
    return out


def lowres_coarsen(fine: np.ndarray, factor: int, min_region: int) -> np.ndarray:
    """bool H x W: the fine mask as seen at 1/factor resolution, with smooth full-resolution outlines."""
    mask = np.asarray(fine, bool)
    h, w = mask.shape
    if factor == 1:
        return _remove_small(mask, min_region)
    ph, pw = -h % factor, -w % factor
    padded = np.pad(mask.astype(np.float32), ((0, ph), (0, pw)), mode="edge")
    low = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).mean(axis=(1, 3))
    low = scipy.ndimage.gaussian_filter(low, sigma=0.7, mode="nearest")
    keep = _remove_small(low >= 0.5, min_region)
    # Bilinear upsampling of a field that is positive inside `keep`: smooth outlines at full resolution.
    field = np.where(keep, np.maximum(low, 0.5 + 1e-3), np.minimum(low, 0.5 - 1e-3)) - 0.5
    up = scipy.ndimage.zoom(field, factor, order=1, mode="nearest", grid_mode=True)
    return np.ascontiguousarray(up[:h, :w] > 0.0)


def coarsen(fine: np.ndarray, recipe: Coarsening) -> np.ndarray:
    """bool H x W coarse mask of a bool fine tissue mask."""
    if recipe.level == "priorpath":
        return mask_ops.coarsen_mask(np.asarray(fine, bool), 5, 10)
    return lowres_coarsen(fine, recipe.factor, recipe.min_region)
