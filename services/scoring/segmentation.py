"""Segmentation metrics of the noise-frequency pix2pixHD paper (section 3.2, eqs. 1-5), Dice, TPS.

Notation (paper): p_{i,ct} = pixels of true class c predicted as t in image i;
TP_{i,c} = p_{i,cc}; FP_{i,c} = sum_{t != c} p_{i,tc}; FN_{i,c} = sum_{t != c} p_{i,ct}.

  (1) mIoU       = 1/(I C)   sum_i sum_c       TP/(TP+FP+FN)
  (2) wIoU       = 1/(I C S) sum_i sum_c s_c * TP/(TP+FP+FN)
  (3) wPrecision = 1/(I C S) sum_i sum_c s_c * TP/(TP+FP)
  (4) wRecall    = 1/(I C S) sum_i sum_c s_c * TP/(TP+FN)
  (5) tObjective = 1 / ( 1/C sum_c 2TP_c/(2TP_c+FP_c+FN_c)  -  1/4 sum_c y_{o,c} log pr_{o,c} )

How the paper's gaps are filled (each choice is the reading that keeps the formula as
printed; the alternatives are noted so a reader can tell what to change):

* s_c and S carry no image index in the paper: s_c = sum_t p_ct is read as the number of
  ground-truth pixels of class c over the whole dataset, S = sum_c s_c. With that reading
  (1)-(4) are exactly segmentation_models_pytorch's "macro-imagewise" and
  "weighted-imagewise" reductions (class weights s_c / S), the usual companion of a UNet++
  baseline: per-image, per-class ratios, averaged over images, weighted, averaged over C.
* The 1/C in (2)-(4) is kept. Since sum_c s_c / S = 1, the weighted metrics lie in
  [0, 1/C]; C times the value is the familiar frequency-weighted mean in [0, 1]. The
  numbers here are the paper's; multiply by ``num_classes`` before comparing with
  frequency-weighted scores from elsewhere.
* "c iterates over the classes in the image" vs "C is the total number of classes":
  every image iterates all C classes (otherwise 1/(I C) would not normalise). A ratio whose
  denominator is 0 (0/0: e.g. a class absent from both truth and prediction of an image,
  or never predicted for precision) takes ``zero_division``, default 1.0 as in
  segmentation_models_pytorch: correctly predicting "nothing of class c here" counts as
  perfect. Note the consequence for precision: a class present in the truth but never
  predicted in an image has TP + FP = 0 and scores ``zero_division`` there (its recall is 0).
  Pass ``zero_division=0.0`` for the pessimistic convention.
* (5) writes TP_c without an image index: Dice uses dataset totals (the summed confusion
  matrix). The cross-entropy term has a free observation index o; it is read as the
  standard mean over pixels, CE = -mean_o sum_c y_{o,c} log pr_{o,c}, so the denominator is
  mean Dice + CE / 4. Taken literally this makes a *higher* cross-entropy *lower* the
  objective, the same direction as a higher Dice; it is implemented as printed, and both
  terms are reported separately so a caller can combine them differently. Probabilities are
  clipped to [1e-12, 1] before the log (one confidently wrong pixel costs at most ~27.6
  nats instead of infinity). Without probabilities the CE term is omitted (tObjective =
  1 / mean Dice) and ``cross_entropy`` is None. A zero denominator gives +inf.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.core.scores import (  # noqa: F401 - TPS lives in core; re-exported for scoring callers
    TPS_BINS,
    TPS_HIGH_CUTOFF,
    TPS_LOW_CUTOFF,
    ScoringInputError,
    tps_bin,
    tumor_proportion_score,
)

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

DEFAULT_ZERO_DIVISION: Final = 1.0
PROBABILITY_FLOOR: Final = 1e-12


# --------------------------------------------------------------------------- confusion counts


def confusion_matrix(
    true: ArrayLike, pred: ArrayLike, num_classes: int, ignore_index: int | None = None
) -> IntArray:
    """[C, C] int64 counts, rows = true class c, columns = predicted class t (the paper's p_ct).

    Pixels whose true label equals ``ignore_index`` (e.g. unannotated) are left out.
    """
    t = np.asarray(true)
    p = np.asarray(pred)
    if t.shape != p.shape:
        raise ScoringInputError(f"true and pred shapes differ: {t.shape} vs {p.shape}")
    if num_classes < 1:
        raise ScoringInputError(f"num_classes must be >= 1, got {num_classes}")
    for name, arr in (("true", t), ("pred", p)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ScoringInputError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    t = t.ravel().astype(np.int64)
    p = p.ravel().astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    for name, arr in (("true", t), ("pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ScoringInputError(
                f"{name} has class ids in [{arr.min()}, {arr.max()}], outside [0, {num_classes - 1}]"
            )
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _as_confusions(confusions: ArrayLike) -> IntArray:
    m = np.asarray(confusions)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1] != m.shape[2] or m.shape[0] == 0:
        raise ScoringInputError(f"confusions must be [images, C, C] (or one [C, C]), got shape {np.shape(confusions)}")
    if (m < 0).any():
        raise ScoringInputError("confusion counts must be non-negative")
    return m.astype(np.int64)


def _tp_fp_fn(confusions: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """Per-image, per-class counts, each [I, C]."""
    tp = np.diagonal(confusions, axis1=1, axis2=2)
    fp = confusions.sum(axis=1) - tp  # column sums: everything predicted as c
    fn = confusions.sum(axis=2) - tp  # row sums: everything truly c
    return tp, fp, fn


def _ratio(numerator: ArrayLike, denominator: ArrayLike, zero_division: float) -> FloatArray:
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, zero_division, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def class_pixel_counts(confusions: ArrayLike) -> IntArray:
    """s_c: ground-truth pixels of each class over all images (row sums of the summed matrix)."""
    return _as_confusions(confusions).sum(axis=(0, 2))


# ----------------------------------------------------------------------------- eqs. (1)-(4)


def mean_iou(confusions: ArrayLike, zero_division: float = DEFAULT_ZERO_DIVISION) -> float:
    """Eq. (1): mean over all images and all C classes of the per-image IoU."""
    tp, fp, fn = _tp_fp_fn(_as_confusions(confusions))
    return float(_ratio(tp, tp + fp + fn, zero_division).mean())


def _weighted(per_image_class: FloatArray, confusions: IntArray) -> float:
    """1/(I C S) sum_i sum_c s_c x_{i,c} with dataset-level s_c, S (see module docstring)."""
    s = confusions.sum(axis=(0, 2)).astype(np.float64)
    total = s.sum()
    if total == 0:
        raise ScoringInputError("weighted metrics need at least one labelled pixel (S = 0)")
    images, classes = per_image_class.shape
    return float((per_image_class * s[None, :]).sum() / (images * classes * total))


def weighted_iou(confusions: ArrayLike, zero_division: float = DEFAULT_ZERO_DIVISION) -> float:
    """Eq. (2); lies in [0, 1/C] (see module docstring)."""
    m = _as_confusions(confusions)
    tp, fp, fn = _tp_fp_fn(m)
    return _weighted(_ratio(tp, tp + fp + fn, zero_division), m)


def weighted_precision(confusions: ArrayLike, zero_division: float = DEFAULT_ZERO_DIVISION) -> float:
    """Eq. (3); lies in [0, 1/C]."""
    m = _as_confusions(confusions)
    tp, fp, _ = _tp_fp_fn(m)
    return _weighted(_ratio(tp, tp + fp, zero_division), m)


def weighted_recall(confusions: ArrayLike, zero_division: float = DEFAULT_ZERO_DIVISION) -> float:
    """Eq. (4); lies in [0, 1/C]."""
    m = _as_confusions(confusions)
    tp, _, fn = _tp_fp_fn(m)
    return _weighted(_ratio(tp, tp + fn, zero_division), m)


# ------------------------------------------------------------------------ Dice, CE, eq. (5)


def dice_per_class(confusions: ArrayLike, zero_division: float = DEFAULT_ZERO_DIVISION) -> FloatArray:
    """2 TP_c / (2 TP_c + FP_c + FN_c) on the counts summed over images; [C]."""
    tp, fp, fn = _tp_fp_fn(_as_confusions(confusions))
    tp_c, fp_c, fn_c = tp.sum(axis=0), fp.sum(axis=0), fn.sum(axis=0)
    return _ratio(2 * tp_c, 2 * tp_c + fp_c + fn_c, zero_division)


def cross_entropy_sum(
    probs: ArrayLike, true: ArrayLike, ignore_index: int | None = None
) -> tuple[float, int]:
    """(sum over pixels of -log pr[true class], number of pixels) for one image.

    ``probs`` is [C, H, W] (channel-first, as a network's softmax output); ``true`` is [H, W].
    Returned as a sum and a count so images can be accumulated and averaged once.
    """
    pr = np.asarray(probs, dtype=np.float64)
    t = np.asarray(true)
    if pr.ndim != t.ndim + 1 or pr.shape[1:] != t.shape:
        raise ScoringInputError(f"probs must be [C, *true.shape] = [C, {t.shape}], got {pr.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ScoringInputError(f"true must hold integer class ids, got dtype {t.dtype}")
    if not np.isfinite(pr).all() or (pr < 0).any() or (pr > 1 + 1e-6).any():
        raise ScoringInputError("probs must be finite probabilities in [0, 1]")
    labels = t.ravel().astype(np.int64)
    flat = pr.reshape(pr.shape[0], -1)
    keep = np.ones(labels.size, dtype=bool) if ignore_index is None else labels != ignore_index
    labels, columns = labels[keep], np.flatnonzero(keep)
    if labels.size and (labels.min() < 0 or labels.max() >= pr.shape[0]):
        raise ScoringInputError(f"true has class ids outside [0, {pr.shape[0] - 1}]")
    picked = np.clip(flat[labels, columns], PROBABILITY_FLOOR, 1.0)
    return float(-np.log(picked).sum()), int(labels.size)


def t_objective(mean_dice: float, cross_entropy: float | None = None) -> float:
    """Eq. (5) as printed: 1 / (mean Dice + CE / 4); CE omitted when None."""
    denominator = mean_dice + (0.0 if cross_entropy is None else cross_entropy / 4.0)
    return float("inf") if denominator == 0 else 1.0 / denominator


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SegmentationScores:
    num_images: int
    num_classes: int
    miou: float
    wiou: float  # paper's eq. (2), in [0, 1/C]
    wprecision: float  # eq. (3), in [0, 1/C]
    wrecall: float  # eq. (4), in [0, 1/C]
    dice_per_class: tuple[float, ...]
    mean_dice: float
    cross_entropy: float | None  # mean over pixels; None when no probabilities were given
    t_objective: float  # eq. (5); 1 / mean_dice when cross_entropy is None
    class_pixel_counts: tuple[int, ...]  # s_c


def scores_from_confusions(
    confusions: ArrayLike,
    cross_entropy: float | None = None,
    zero_division: float = DEFAULT_ZERO_DIVISION,
) -> SegmentationScores:
    m = _as_confusions(confusions)
    dice = dice_per_class(m, zero_division)
    mean_dice = float(dice.mean())
    return SegmentationScores(
        num_images=int(m.shape[0]),
        num_classes=int(m.shape[1]),
        miou=mean_iou(m, zero_division),
        wiou=weighted_iou(m, zero_division),
        wprecision=weighted_precision(m, zero_division),
        wrecall=weighted_recall(m, zero_division),
        dice_per_class=tuple(float(d) for d in dice),
        mean_dice=mean_dice,
        cross_entropy=cross_entropy,
        t_objective=t_objective(mean_dice, cross_entropy),
        class_pixel_counts=tuple(int(s) for s in m.sum(axis=(0, 2))),
    )


class SegmentationAccumulator:
    """Adds images one at a time; keeps only per-image C x C counts and a running CE sum."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        zero_division: float = DEFAULT_ZERO_DIVISION,
    ) -> None:
        if num_classes < 1:
            raise ScoringInputError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.zero_division = zero_division
        self._confusions: list[IntArray] = []
        self._ce_sum = 0.0
        self._ce_pixels = 0
        self._with_probs: bool | None = None

    def add(self, true: ArrayLike, pred: ArrayLike, probs: ArrayLike | None = None) -> None:
        """One image: true and pred [H, W] class ids, optional probs [C, H, W]."""
        has_probs = probs is not None
        if self._with_probs is not None and has_probs != self._with_probs:
            raise ScoringInputError(
                "give probabilities for every image or for none: the cross-entropy term of "
                "tObjective averages over all pixels"
            )
        self._confusions.append(confusion_matrix(true, pred, self.num_classes, self.ignore_index))
        if probs is not None:
            if np.shape(probs)[0] != self.num_classes:
                raise ScoringInputError(f"probs has {np.shape(probs)[0]} channels, expected {self.num_classes}")
            ce, pixels = cross_entropy_sum(probs, true, self.ignore_index)
            self._ce_sum += ce
            self._ce_pixels += pixels
        self._with_probs = has_probs

    def result(self) -> SegmentationScores:
        if not self._confusions:
            raise ScoringInputError("no images added; call add() before result()")
        cross_entropy = None
        if self._with_probs:
            cross_entropy = self._ce_sum / self._ce_pixels if self._ce_pixels else 0.0
        return scores_from_confusions(np.stack(self._confusions), cross_entropy, self.zero_division)


def evaluate_segmentation(
    true_masks: Iterable[ArrayLike],
    pred_masks: Iterable[ArrayLike],
    num_classes: int,
    probs: Iterable[ArrayLike] | None = None,
    ignore_index: int | None = None,
    zero_division: float = DEFAULT_ZERO_DIVISION,
) -> SegmentationScores:
    """Scores for paired iterables of [H, W] masks (and optionally [C, H, W] probabilities)."""
    acc = SegmentationAccumulator(num_classes, ignore_index, zero_division)
    trues, preds = list(true_masks), list(pred_masks)
    if len(trues) != len(preds):
        raise ScoringInputError(f"{len(trues)} true masks but {len(preds)} predicted masks")
    prob_list = [None] * len(trues) if probs is None else list(probs)
    if len(prob_list) != len(trues):
        raise ScoringInputError(f"{len(trues)} masks but {len(prob_list)} probability maps")
    for t, p, pr in zip(trues, preds, prob_list, strict=True):
        acc.add(t, p, pr)
    return acc.result()


# ---------------------------------------------------------------------------------- TPS
# Defined in services/core/scores.py (generation scores its samples with the same definition).
