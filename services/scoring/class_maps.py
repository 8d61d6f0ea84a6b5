"""Class-map scoring, numpy domain: mask-set shape statistics (KS/JS), segmentation metrics, TPS.

Thin, validating wrappers over mask_stats.py and segmentation.py that take [N, H, W] batches the
way the servicer and the CLI hold them, and name the offending field in every error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from services.core.errors import InvalidInputError
from services.scoring import mask_stats, segmentation

# ----------------------------------------------------------------------------------- masks


def as_map_batch(array: np.ndarray, name: str) -> np.ndarray:
    """[H, W] or [N, H, W] integer maps -> [N, H, W]."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or 0 in array.shape:
        raise InvalidInputError(
            f"{name}: expected non-empty integer maps [N, H, W] or [H, W], got shape {list(array.shape)}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{name}: expected integer class ids, got {array.dtype}")
    return array


MAX_MASK_CLASSES: Final = 64


def score_masks(
    real: np.ndarray,
    synthetic: np.ndarray,
    class_ids: Sequence[int] = (),
    connectivity: int = 8,
    bins: int = mask_stats.DEFAULT_BINS,
    include_background: bool = False,
    include_border_objects: bool = False,
) -> mask_stats.MaskSetComparison:
    """PriorPath shape statistics of two mask sets: per class, KS / Jensen-Shannon (+ smoothed KL) of the
    pooled per-object features and of the per-mask image features (services/scoring/mask_stats.py)."""
    real = as_map_batch(real, "real_masks")
    synthetic = as_map_batch(synthetic, "synthetic_masks")
    if connectivity not in (4, 8):
        raise InvalidInputError(f"connectivity={connectivity}: must be 4 or 8")
    if not 1 <= bins <= mask_stats.MAX_BINS:
        raise InvalidInputError(f"bins={bins}: must be in [1, {mask_stats.MAX_BINS}]")
    if len({int(c) for c in class_ids}) != len(class_ids):
        raise InvalidInputError(f"class_ids {list(class_ids)} lists a class twice")
    present = set(np.unique(real).tolist()) | set(np.unique(synthetic).tolist())
    ids = mask_stats.describe_class_ids(present, class_ids, include_background)
    if not ids:
        raise InvalidInputError(
            f"no class to describe: both mask sets hold only the background ({mask_stats.BACKGROUND_ID}); "
            "list class_ids or set include_background"
        )
    if len(ids) > MAX_MASK_CLASSES:
        raise InvalidInputError(
            f"{len(ids)} classes to describe (more than {MAX_MASK_CLASSES}); list the ones you need in class_ids"
        )
    real_features = mask_stats.mask_set_features(real, ids, connectivity, include_border_objects)
    synthetic_features = mask_stats.mask_set_features(synthetic, ids, connectivity, include_border_objects)
    return mask_stats.compare_mask_sets(real_features, synthetic_features, bins)


# ---------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class TpsResult:
    tps: float
    bin: str


@dataclass(frozen=True)
class SegmentationResult:
    scores: segmentation.SegmentationScores
    predicted_tps: tuple[TpsResult, ...] = ()
    reference_tps: tuple[TpsResult, ...] = ()


def tumor_proportions(
    class_maps: np.ndarray,
    positive_id: int,
    negative_id: int,
    instance_maps: np.ndarray | None = None,
    name: str = "class_maps",
) -> tuple[TpsResult, ...]:
    """TPS and clinical bin of every map (cell counts with instance maps, else pixel areas)."""
    maps = as_map_batch(class_maps, name)
    if instance_maps is not None:
        instance_maps = as_map_batch(instance_maps, "instance_maps")
        if instance_maps.shape != maps.shape:
            raise InvalidInputError(
                f"instance_maps shape {list(instance_maps.shape)} does not match {name} shape {list(maps.shape)}"
            )
    results = []
    for index in range(maps.shape[0]):
        tps = segmentation.tumor_proportion_score(
            maps[index], positive_id, negative_id, None if instance_maps is None else instance_maps[index]
        )
        results.append(TpsResult(float(tps), segmentation.tps_bin(tps)))
    return tuple(results)


def score_segmentation(
    predicted: np.ndarray,
    reference: np.ndarray,
    probabilities: np.ndarray | None = None,
    num_classes: int = 0,
    ignore_index: int | None = None,
    tps_classes: tuple[int, int] | None = None,
    instance_maps: np.ndarray | None = None,
) -> SegmentationResult:
    """Paper metrics (mIoU, wIoU, wPrecision, wRecall, Dice, tObjective) of predicted vs reference maps."""
    pred = as_map_batch(predicted, "predicted")
    ref = as_map_batch(reference, "reference")
    if pred.shape != ref.shape:
        raise InvalidInputError(f"predicted shape {list(pred.shape)} does not match reference shape {list(ref.shape)}")
    if probabilities is not None:
        probabilities = np.asarray(probabilities)
        if probabilities.ndim == 3:
            probabilities = probabilities[None]
        if probabilities.ndim != 4 or (probabilities.shape[0], *probabilities.shape[2:]) != pred.shape:
            raise InvalidInputError(
                f"probabilities: expected float32 [N, C, H, W] with N, H, W = {list(pred.shape)}, "
                f"got shape {list(probabilities.shape)}"
            )
    if num_classes <= 0:
        kept_ref = ref if ignore_index is None else ref[ref != ignore_index]
        highest = max(int(pred.max()), int(kept_ref.max()) if kept_ref.size else 0)
        num_classes = probabilities.shape[1] if probabilities is not None else highest + 1
    if num_classes > 1024:
        raise InvalidInputError(f"num_classes={num_classes}: at most 1024")
    if probabilities is not None and probabilities.shape[1] != num_classes:
        raise InvalidInputError(f"probabilities has {probabilities.shape[1]} channels but num_classes is {num_classes}")
    accumulator = segmentation.SegmentationAccumulator(num_classes, ignore_index)
    for index in range(pred.shape[0]):
        accumulator.add(ref[index], pred[index], None if probabilities is None else probabilities[index])
    scores = accumulator.result()
    if tps_classes is None:
        return SegmentationResult(scores)
    positive, negative = tps_classes
    return SegmentationResult(
        scores,
        predicted_tps=tumor_proportions(pred, positive, negative, instance_maps, "predicted"),
        reference_tps=tumor_proportions(ref, positive, negative, instance_maps, "reference"),
    )

