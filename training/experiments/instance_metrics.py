"""Nuclei segmentation scores for the downstream benchmark: pixel Dice, object F1 at IoU >= 0.5, AJI.

A segmenter predicts 3 classes (background, nucleus interior, nucleus boundary); instances are the connected
interior regions grown back over the predicted nucleus pixels, which separates touching nuclei the way
boundary-aware U-Nets (e.g. the MoNuSeg baselines) do. Counts are returned per image so that callers can
aggregate over a dataset, an organ or a tile subset without re-running the prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import expand_labels

# The target's definition lives with the data code, which the frozen boundary segmenter and the renderer's
# boundary-consistency loss share; re-exported here for the benchmark's callers.
from training.data.instance_targets import BACKGROUND, BOUNDARY, INTERIOR, three_class_target

MIN_OBJECT_PIXELS = 16  # smaller predicted fragments are noise at 40x (a nucleus is ~100-600 px)
GROW_PIXELS = 3  # boundary class is 1-2 px wide; interiors are grown this far, inside the predicted nucleus


def instances_from_prediction(prediction: np.ndarray) -> np.ndarray:
    """int32 instance labels from a 3-class prediction (interior seeds grown over predicted nucleus pixels)."""
    seeds, _ = ndimage.label(prediction == INTERIOR)
    grown = expand_labels(seeds, distance=GROW_PIXELS)
    grown[prediction == BACKGROUND] = 0
    sizes = np.bincount(grown.ravel())
    small = sizes < MIN_OBJECT_PIXELS
    small[0] = False
    grown[small[grown]] = 0
    return grown.astype(np.int32)


@dataclass(frozen=True)
class ImageCounts:
    """Sufficient statistics of one image: pixel overlap, matched objects and AJI sums."""

    pixels_intersection: int
    pixels_predicted: int
    pixels_true: int
    objects_matched: int  # pairs with IoU >= 0.5 (one-to-one by construction)
    objects_predicted: int
    objects_true: int
    aji_intersection: int
    aji_union: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..n (0 stays background)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lookup = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int64)
    lookup[ids] = np.arange(1, len(ids) + 1)
    return lookup[labels]


def image_counts(true_instances: np.ndarray, predicted_instances: np.ndarray) -> ImageCounts:
    """Counts for one image; both inputs are instance label maps of the same shape (0 = background)."""
    if true_instances.shape != predicted_instances.shape:
        raise ValueError(f"shape mismatch: truth {true_instances.shape}, prediction {predicted_instances.shape}")
    truth, pred = _relabel(true_instances), _relabel(predicted_instances)
    n_true, n_pred = int(truth.max()), int(pred.max())
    true_area = np.bincount(truth.ravel(), minlength=n_true + 1)
    pred_area = np.bincount(pred.ravel(), minlength=n_pred + 1)
    both = (truth > 0) & (pred > 0)
    # Intersections of every overlapping (true, predicted) pair, from one bincount over pair codes.
    codes = truth[both] * (n_pred + 1) + pred[both]
    pair_codes, pair_inter = np.unique(codes, return_counts=True)
    pair_true, pair_pred = pair_codes // (n_pred + 1), pair_codes % (n_pred + 1)
    pair_union = true_area[pair_true] + pred_area[pair_pred] - pair_inter
    pair_iou = pair_inter / np.maximum(pair_union, 1)
    matched = int(np.count_nonzero(pair_iou > 0.5))  # IoU > 0.5 pairs are unique per object on both sides

    # AJI (Kumar et al. 2017): each true nucleus takes its best-IoU predicted nucleus; unused predictions add
    # their area to the union.
    aji_i = aji_u = 0
    used = np.zeros(n_pred + 1, bool)
    order = np.lexsort((-pair_iou, pair_true))  # by true id, best IoU first
    best_for_true: dict[int, int] = {}
    for index in order:
        best_for_true.setdefault(int(pair_true[index]), int(index))
    for t in range(1, n_true + 1):
        index = best_for_true.get(t)
        if index is None:
            aji_u += int(true_area[t])
            continue
        aji_i += int(pair_inter[index])
        aji_u += int(pair_union[index])
        used[pair_pred[index]] = True
    aji_u += int(pred_area[1:][~used[1:]].sum())

    return ImageCounts(
        pixels_intersection=int(np.count_nonzero(both)), pixels_predicted=int(np.count_nonzero(pred > 0)),
        pixels_true=int(np.count_nonzero(truth > 0)), objects_matched=matched, objects_predicted=n_pred,
        objects_true=n_true, aji_intersection=aji_i, aji_union=aji_u)


def scores(counts: list[ImageCounts] | list[dict[str, int]]) -> dict[str, float]:
    """Pixel Dice and object F1 pooled over the images; AJI averaged over images (as in MoNuSeg)."""
    rows = [c if isinstance(c, dict) else c.as_dict() for c in counts]
    if not rows:
        raise ValueError("no images to score")
    total = {key: sum(row[key] for row in rows) for key in rows[0]}
    dice = 2 * total["pixels_intersection"] / max(1, total["pixels_predicted"] + total["pixels_true"])
    f1 = 2 * total["objects_matched"] / max(1, total["objects_predicted"] + total["objects_true"])
    aji = float(np.mean([row["aji_intersection"] / max(1, row["aji_union"]) for row in rows]))
    return {"pixel_dice": float(dice), "object_f1": float(f1), "aji": aji}


__all__ = ["BACKGROUND", "BOUNDARY", "GROW_PIXELS", "INTERIOR", "MIN_OBJECT_PIXELS", "ImageCounts", "image_counts",
           "instances_from_prediction", "scores", "three_class_target"]
