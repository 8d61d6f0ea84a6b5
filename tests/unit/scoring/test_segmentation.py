"""Equations (1)-(5) on hand-computed confusion cases, Dice, TPS and its clinical bins."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.scoring.errors import ScoringInputError
from services.scoring.segmentation import (
    SegmentationAccumulator,
    confusion_matrix,
    cross_entropy_sum,
    dice_per_class,
    evaluate_segmentation,
    mean_iou,
    scores_from_confusions,
    t_objective,
    tps_bin,
    tumor_proportion_score,
    weighted_iou,
    weighted_precision,
    weighted_recall,
)

# Two images, C = 3 classes.
#
# Image 1 (2 x 3)         true          pred
#                        0 0 1         0 1 1
#                        1 2 2         1 2 0
#   confusion (rows true c, cols pred t):  [[1, 1, 0],
#                                           [0, 2, 0],
#                                           [1, 0, 1]]
#   TP = (1, 2, 1)  FP = col sums - TP = (2-1, 3-2, 1-1) = (1, 1, 0)
#   FN = row sums - TP = (2-1, 2-2, 2-1) = (1, 0, 1)
#   IoU = (1/3, 2/3, 1/2)   precision = (1/2, 2/3, 1)   recall = (1/2, 1, 1/2)
#
# Image 2 (2 x 2)         true          pred
#                        0 0           0 0
#                        0 1           1 1
#   confusion: [[2, 1, 0], [0, 1, 0], [0, 0, 0]]   (class 2 absent from truth and prediction)
#   TP = (2, 1, 0)  FP = (0, 1, 0)  FN = (1, 0, 0)
#   IoU = (2/3, 1/2, 0/0)   precision = (1, 1/2, 0/0)   recall = (2/3, 1, 0/0)
#
# s_c (dataset ground-truth pixels) = (2+3, 2+1, 2+0) = (5, 3, 2);  S = 10;  I C S = 2*3*10 = 60.
TRUE_1 = np.array([[0, 0, 1], [1, 2, 2]])
PRED_1 = np.array([[0, 1, 1], [1, 2, 0]])
TRUE_2 = np.array([[0, 0], [0, 1]])
PRED_2 = np.array([[0, 0], [1, 1]])
CONFUSIONS = np.array(
    [
        [[1, 1, 0], [0, 2, 0], [1, 0, 1]],
        [[2, 1, 0], [0, 1, 0], [0, 0, 0]],
    ]
)


def test_confusion_matrices_of_the_hand_case() -> None:
    np.testing.assert_array_equal(confusion_matrix(TRUE_1, PRED_1, 3), CONFUSIONS[0])
    np.testing.assert_array_equal(confusion_matrix(TRUE_2, PRED_2, 3), CONFUSIONS[1])


def test_miou_eq1() -> None:
    # zero_division = 1: (1/3 + 2/3 + 1/2 + 2/3 + 1/2 + 1) / 6 = (11/3) / 6 = 11/18
    assert mean_iou(CONFUSIONS) == pytest.approx(11 / 18)
    # zero_division = 0: (8/3) / 6 = 4/9
    assert mean_iou(CONFUSIONS, zero_division=0.0) == pytest.approx(4 / 9)


def test_wiou_eq2() -> None:
    # [5 (1/3 + 2/3) + 3 (2/3 + 1/2) + 2 (1/2 + 1)] / 60 = (5 + 3.5 + 3) / 60 = 23/120
    assert weighted_iou(CONFUSIONS) == pytest.approx(23 / 120)
    # class 2, image 2 -> 0: (5 + 3.5 + 1) / 60 = 19/120
    assert weighted_iou(CONFUSIONS, zero_division=0.0) == pytest.approx(19 / 120)


def test_wprecision_eq3() -> None:
    # [5 (1/2 + 1) + 3 (2/3 + 1/2) + 2 (1 + 1)] / 60 = (7.5 + 3.5 + 4) / 60 = 1/4
    assert weighted_precision(CONFUSIONS) == pytest.approx(1 / 4)
    # (7.5 + 3.5 + 2) / 60 = 13/60
    assert weighted_precision(CONFUSIONS, zero_division=0.0) == pytest.approx(13 / 60)


def test_wrecall_eq4() -> None:
    # [5 (1/2 + 2/3) + 3 (1 + 1) + 2 (1/2 + 1)] / 60 = (35/6 + 6 + 3) / 60 = 89/360
    assert weighted_recall(CONFUSIONS) == pytest.approx(89 / 360)
    # (35/6 + 6 + 1) / 60 = 77/360
    assert weighted_recall(CONFUSIONS, zero_division=0.0) == pytest.approx(77 / 360)


def test_dice_and_tobjective_eq5_without_probabilities() -> None:
    # Totals over images: TP = (3, 3, 1), FP = (1, 2, 0), FN = (2, 0, 1)
    # Dice = (6/9, 6/8, 2/3); mean = (2/3 + 3/4 + 2/3) / 3 = 25/36; tObjective = 36/25.
    np.testing.assert_allclose(dice_per_class(CONFUSIONS), [2 / 3, 3 / 4, 2 / 3])
    scores = scores_from_confusions(CONFUSIONS)
    assert scores.mean_dice == pytest.approx(25 / 36)
    assert scores.cross_entropy is None
    assert scores.t_objective == pytest.approx(36 / 25)
    assert scores.class_pixel_counts == (5, 3, 2)
    assert (scores.num_images, scores.num_classes) == (2, 3)


def _half_on_truth(true: np.ndarray) -> np.ndarray:
    # Probability 1/2 on the true class and 1/4 on each other class: every pixel costs ln 2.
    probs = np.full((3, *true.shape), 0.25)
    np.put_along_axis(probs, true[None], 0.5, axis=0)
    return probs


def test_tobjective_eq5_with_probabilities() -> None:
    # CE = ln 2 for every pixel, so mean CE = ln 2; tObjective = 1 / (25/36 + ln 2 / 4).
    scores = evaluate_segmentation(
        [TRUE_1, TRUE_2], [PRED_1, PRED_2], num_classes=3, probs=[_half_on_truth(TRUE_1), _half_on_truth(TRUE_2)]
    )
    assert scores.cross_entropy == pytest.approx(math.log(2))
    assert scores.t_objective == pytest.approx(1 / (25 / 36 + math.log(2) / 4))
    assert scores.miou == pytest.approx(11 / 18)
    assert scores.wiou == pytest.approx(23 / 120)
    assert scores.wprecision == pytest.approx(1 / 4)
    assert scores.wrecall == pytest.approx(89 / 360)


def test_cross_entropy_clips_zero_probability_and_honours_ignore_index() -> None:
    true = np.array([[0, 1]])
    probs = np.array([[[1.0, 1.0]], [[0.0, 0.0]]])  # pixel 2 gives its true class probability 0
    total, pixels = cross_entropy_sum(probs, true)
    assert pixels == 2 and total == pytest.approx(-math.log(1e-12))
    assert cross_entropy_sum(probs, true, ignore_index=1) == (0.0, 1)


def test_t_objective_zero_denominator_is_infinite() -> None:
    assert t_objective(0.0) == math.inf
    assert t_objective(0.5, cross_entropy=2.0) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(
    masks=hnp.arrays(np.int64, st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)), elements=st.integers(0, 3)),
    num_classes=st.integers(4, 6),
)
def test_perfect_prediction_properties(masks: np.ndarray, num_classes: int) -> None:
    # Perfect predictions: every defined ratio is 1, and absent classes take zero_division = 1,
    # so mIoU = 1 and the weighted metrics reach their maximum sum_c s_c / (C S) = 1/C.
    scores = evaluate_segmentation(list(masks), list(masks), num_classes=num_classes)
    assert scores.miou == pytest.approx(1.0)
    for value in (scores.wiou, scores.wprecision, scores.wrecall):
        assert value == pytest.approx(1 / num_classes)
    assert scores.mean_dice == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(
    pair=st.integers(1, 30).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.int64, n, elements=st.integers(0, 3)), hnp.arrays(np.int64, n, elements=st.integers(0, 3))
        )
    )
)
def test_confusion_matrix_matches_a_counting_loop(pair: tuple[np.ndarray, np.ndarray]) -> None:
    true, pred = pair
    expected = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(true, pred, strict=True):
        expected[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(true, pred, 4), expected)


def test_confusion_matrix_ignore_index_and_range_checks() -> None:
    true = np.array([0, 1, 255, 1])
    pred = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(confusion_matrix(true, pred, 2, ignore_index=255), [[1, 0], [1, 1]])
    with pytest.raises(ScoringInputError, match="outside"):
        confusion_matrix(true, pred, 2)
    with pytest.raises(ScoringInputError, match="shapes differ"):
        confusion_matrix(true, pred[:3], 2)


def test_accumulator_requires_probabilities_for_all_images_or_none() -> None:
    acc = SegmentationAccumulator(num_classes=3)
    acc.add(TRUE_1, PRED_1, _half_on_truth(TRUE_1))
    with pytest.raises(ScoringInputError, match="every image or for none"):
        acc.add(TRUE_2, PRED_2)
    with pytest.raises(ScoringInputError, match="no images"):
        SegmentationAccumulator(num_classes=3).result()


# ---------------------------------------------------------------------------------- TPS

POSITIVE, NEGATIVE, OTHER = 1, 2, 3


def test_tps_pixel_mode_known_answer() -> None:
    # 3 positive pixels, 9 negative, the rest background/other: TPS = 3 / 12 = 1/4.
    class_map = np.zeros((4, 6), dtype=np.int64)
    class_map[0, :3] = POSITIVE
    class_map[1:, 3:] = NEGATIVE
    class_map[0, 5] = OTHER
    assert tumor_proportion_score(class_map, POSITIVE, NEGATIVE) == pytest.approx(0.25)


def test_tps_instance_mode_counts_cells_by_majority_vote() -> None:
    class_map = np.array(
        [
            [1, 1, 1, 1, 2, 2, 2, 2],
            [1, 1, 1, 2, 3, 3, 3, 1],
            [1, 2, 1, 2, 0, 0, 0, 1],
        ]
    )
    instances = np.array(
        [
            [10, 10, 20, 20, 30, 30, 30, 30],  # cell 10: 2 pos; cell 20: pos, pos; cell 30: 4 neg
            [10, 10, 20, 20, 40, 40, 40, 0],  # cell 20 gets 1 pos + 1 neg (3 pos, 1 neg -> positive)
            [50, 50, 0, 0, 40, 0, 0, 0],  # cell 40: 3 other + 1 background -> neither; cell 50: 1 pos 1 neg tie
        ]
    )
    # Cells: 10 -> positive (4/4), 20 -> positive (3 of 4), 30 -> negative, 40 -> other (excluded),
    # 50 -> tie between class 1 and class 2, resolved to the smaller id (positive).
    # Pixels outside cells (instance 0) never count, even though three of them are positive.
    # TPS = 3 positive cells / 4 tumour cells = 0.75.
    # Pixel mode instead: 11 positive pixels (4 + 4 + 3 by row), 7 negative (4 + 1 + 2) -> 11/18.
    assert tumor_proportion_score(class_map, POSITIVE, NEGATIVE, instance_map=instances) == pytest.approx(0.75)
    assert tumor_proportion_score(class_map, POSITIVE, NEGATIVE) == pytest.approx(11 / 18)


def test_tps_without_tumour_uses_empty_value() -> None:
    healthy = np.full((3, 3), OTHER)
    assert tumor_proportion_score(healthy, POSITIVE, NEGATIVE) == 0.0
    assert math.isnan(tumor_proportion_score(healthy, POSITIVE, NEGATIVE, empty_value=math.nan))
    assert tumor_proportion_score(healthy, POSITIVE, NEGATIVE, instance_map=np.zeros((3, 3), dtype=np.int32)) == 0.0


@pytest.mark.parametrize(
    ("tps", "expected"),
    [
        (0.0, "<1%"),
        (0.0099999, "<1%"),
        (0.01, "1-49%"),
        (0.25, "1-49%"),
        (0.4999999, "1-49%"),
        (0.5, ">=50%"),
        (1.0, ">=50%"),
    ],
)
def test_tps_bin_boundaries(tps: float, expected: str) -> None:
    assert tps_bin(tps) == expected


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf])
def test_tps_bin_rejects_non_fractions(bad: float) -> None:
    with pytest.raises(ScoringInputError, match="fraction"):
        tps_bin(bad)
