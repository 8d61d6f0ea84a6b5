"""Paired agreement of a predicted binary mask with its reference: tissue IoU and boundary F-score.

The boundary F-score (Csurka et al. 2013, "BF score"; also the DAVIS contour measure) asks whether the outlines
are in the right places, which IoU barely notices on large tissue regions: a refiner that draws the small
lumens and gaps of a real tissue mask in the right places raises it, one that smooths them away lowers it.

  boundary(m)  = pixels of m or of its complement with a 4-neighbour of the other value (both sides of every
                 edge), image border excluded (a crop border is not a tissue boundary);
  precision    = share of predicted boundary pixels within ``tolerance`` px (Euclidean) of a reference one;
  recall       = share of reference boundary pixels within ``tolerance`` px of a predicted one;
  F            = 2 P R / (P + R); 1 when neither mask has a boundary, 0 when exactly one has.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import scipy.ndimage

DEFAULT_TOLERANCE_PX: Final = 2.0


def boundary(mask: np.ndarray) -> np.ndarray:
    """bool H x W: pixels on either side of a 4-neighbour edge between the two values of ``mask``."""
    m = np.asarray(mask, bool)
    out = np.zeros(m.shape, bool)
    horizontal = m[:, 1:] != m[:, :-1]
    vertical = m[1:, :] != m[:-1, :]
    out[:, 1:] |= horizontal
    out[:, :-1] |= horizontal
    out[1:, :] |= vertical
    out[:-1, :] |= vertical
    return out


def boundary_f_score(predicted: np.ndarray, reference: np.ndarray,
                     tolerance: float = DEFAULT_TOLERANCE_PX) -> dict[str, float]:
    """Boundary precision, recall and F of ``predicted`` against ``reference`` (same H x W, binary)."""
    if np.shape(predicted) != np.shape(reference):
        raise ValueError(f"shapes differ: {np.shape(predicted)} vs {np.shape(reference)}")
    bp, br = boundary(predicted), boundary(reference)
    if not bp.any() and not br.any():
        return {"precision": 1.0, "recall": 1.0, "f": 1.0}
    if not bp.any() or not br.any():
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    # Distance of every pixel to the nearest boundary pixel of the other mask.
    to_reference = scipy.ndimage.distance_transform_edt(~br)
    to_predicted = scipy.ndimage.distance_transform_edt(~bp)
    precision = float(np.mean(to_reference[bp] <= tolerance))
    recall = float(np.mean(to_predicted[br] <= tolerance))
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f": f}


def tissue_iou(predicted: np.ndarray, reference: np.ndarray) -> float:
    p, r = np.asarray(predicted, bool), np.asarray(reference, bool)
    union = np.logical_or(p, r).sum()
    return float(np.logical_and(p, r).sum() / union) if union else 1.0


def paired_agreement(predicted: np.ndarray, reference: np.ndarray,
                     tolerance: float = DEFAULT_TOLERANCE_PX) -> dict[str, float]:
    """IoU, pixel agreement and boundary P/R/F of one predicted mask against its own reference."""
    bf = boundary_f_score(predicted, reference, tolerance)
    return {
        "tissue_iou": tissue_iou(predicted, reference),
        "pixel_agreement": float(np.mean(np.asarray(predicted, bool) == np.asarray(reference, bool))),
        "boundary_precision": bf["precision"],
        "boundary_recall": bf["recall"],
        "boundary_f": bf["f"],
    }
