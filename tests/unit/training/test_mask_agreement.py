"""Boundary F-score and IoU of refined masks against their own real fine masks (hand-checked cases)."""

from __future__ import annotations

import numpy as np

from training.experiments.mask_agreement import boundary, boundary_f_score, paired_agreement


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_identical_masks_score_one() -> None:
    mask = _square(32, 8, 8, 10)
    scores = paired_agreement(mask, mask)
    assert scores["boundary_f"] == 1.0 and scores["tissue_iou"] == 1.0


def test_boundary_marks_both_sides_of_an_edge() -> None:
    mask = np.zeros((4, 6), bool)
    mask[:, 3:] = True
    assert boundary(mask).sum() == 8 and boundary(mask)[:, 2:4].all()


def test_shift_within_tolerance_is_forgiven_beyond_it_is_not() -> None:
    reference = _square(64, 20, 20, 20)
    assert boundary_f_score(_square(64, 22, 20, 20), reference, tolerance=2)["f"] > 0.99
    far = boundary_f_score(_square(64, 26, 20, 20), reference, tolerance=2)
    # Only the vertical sides (and their overlap) still match: well below 1, above 0.
    assert 0.2 < far["f"] < 0.8


def test_missing_holes_cost_recall_not_precision() -> None:
    reference = _square(64, 0, 0, 64)
    reference[30:34, 30:34] = False  # a small lumen the prediction does not draw
    predicted = np.ones((64, 64), bool)
    scores = boundary_f_score(predicted, reference)
    assert scores["f"] == 0.0  # the prediction has no boundary at all
    predicted[0:8, 0:8] = False  # some boundary, in the wrong place
    scores = boundary_f_score(predicted, reference)
    assert scores["recall"] == 0.0 and scores["precision"] == 0.0
