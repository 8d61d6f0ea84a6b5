"""Refiner v2 training pairs: coarse masks that really lack the fine structure, at several levels."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.coarsening import SKETCH, TRAINING_MIX, Coarsening, coarsen, lowres_coarsen


def _tissue_with_holes(size: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.ones((size, size), bool)
    mask[:, : size // 4] = False  # air along one border
    for _ in range(40):  # small lumens / gaps, 2-5 px
        y, x = rng.integers(8, size - 8, 2)
        r = int(rng.integers(2, 6))
        mask[y - r:y + r, x - r:x + r] = False
    return mask


def test_sketch_removes_small_holes_but_keeps_large_regions() -> None:
    fine = _tissue_with_holes()
    coarse = coarsen(fine, SKETCH)
    assert coarse.shape == fine.shape and coarse.dtype == bool
    # The air band (64 px wide) survives, within a few pixels of its edge.
    assert not coarse[:, :56].any() and coarse[:, 72:].mean() > 0.97
    # The 4-10 px holes are gone: the coarse mask has far more tissue than the fine one in the tissue band.
    assert coarse[:, 72:].mean() > fine[:, 72:].mean() + 0.02


def test_priorpath_level_keeps_more_structure_than_sketches() -> None:
    fine = _tissue_with_holes(seed=1)
    changed = {recipe.label: float(np.mean(coarsen(fine, recipe) != fine)) for recipe in TRAINING_MIX}
    assert changed["priorpath"] < changed["lowres-8"] <= changed["lowres-16"] + 0.01


def test_coarsening_is_pure_and_handles_odd_sizes() -> None:
    fine = _tissue_with_holes(size=256)[:201, :133]
    a, b = lowres_coarsen(fine, 8, 2), lowres_coarsen(fine, 8, 2)
    assert a.shape == (201, 133) and np.array_equal(a, b)


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown coarsening level"):
        Coarsening("blur")
