"""Per-object mask shape features (hand-computed) and KS / Jensen-Shannon / smoothed KL against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import skimage.measure
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from services.scoring.errors import ScoringInputError
from services.scoring.mask_stats import (
    IMAGE_FEATURES,
    OBJECT_FEATURES,
    STATUS_ABSENT,
    STATUS_COMPARED,
    STATUS_MISSING_IN_SYNTHETIC,
    compare_mask_sets,
    describe_class_ids,
    js_divergence,
    js_divergence_counts,
    kl_smoothed,
    ks_pvalue,
    ks_statistic,
    mask_objects,
    mask_set_features,
    pool_mask_set_features,
    score_mask_sets,
    shared_histograms,
)


def feature(values: np.ndarray, name: str) -> np.ndarray:
    return values[:, OBJECT_FEATURES.index(name)]


def square(size: int, canvas: int = 24, at: int = 3, label: int = 1) -> np.ndarray:
    mask = np.zeros((canvas, canvas), np.uint8)
    mask[at:at + size, at:at + size] = label
    return mask


def disc(radius: int, canvas: int = 24, label: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[:canvas, :canvas] - canvas // 2
    return ((yy**2 + xx**2 <= radius**2) * label).astype(np.uint8)


# ------------------------------------------------------------------------------ features


def test_square_features_by_hand() -> None:
    found = mask_objects(square(7), 1)
    assert (found.objects, found.border_objects, found.values.shape) == (1, 0, (1, len(OBJECT_FEATURES)))
    row = dict(zip(OBJECT_FEATURES, found.values[0], strict=True))
    assert row["area"] == 49
    assert row["equivalent_diameter"] == pytest.approx(math.sqrt(4 * 49 / math.pi))
    assert row["extent"] == 1.0 and row["solidity"] == pytest.approx(1.0)
    assert row["eccentricity"] == pytest.approx(0.0, abs=1e-9) and row["axis_ratio"] == pytest.approx(1.0)
    assert row["holes"] == 0 and row["hole_fraction"] == 0
    assert found.area_fraction == pytest.approx(49 / 576)


def test_disc_and_elongated_rectangle_by_hand() -> None:
    mask = disc(5, canvas=20)
    row = dict(zip(OBJECT_FEATURES, mask_objects(mask, 1).values[0], strict=True))
    area = int(mask.sum())
    assert row["area"] == area and row["extent"] == pytest.approx(area / 11**2)
    assert row["extent"] < 0.8  # a disc does not fill its box (81 of 121 pixels here)
    assert row["eccentricity"] == pytest.approx(0.0, abs=1e-9) and row["solidity"] > 0.9
    rectangle = np.zeros((20, 30), np.uint8)
    rectangle[5:7, 5:25] = 1  # 2 x 20: second moments 1/4 and 399/12 -> axis ratio sqrt(3/399)
    row = dict(zip(OBJECT_FEATURES, mask_objects(rectangle, 1).values[0], strict=True))
    assert row["axis_ratio"] == pytest.approx(math.sqrt((1 / 4) / (399 / 12)), rel=1e-6)
    assert row["eccentricity"] == pytest.approx(math.sqrt(1 - (1 / 4) / (399 / 12)), rel=1e-6)


def test_features_match_skimage_regionprops_on_random_blobs() -> None:
    # Ellipse moments are computed for all objects at once; they must equal regionprops' one-by-one values.
    rng = np.random.default_rng(3)
    mask = (scipy.ndimage.gaussian_filter(rng.normal(size=(64, 64)), 1.5) > 0.1).astype(np.uint8)
    values = mask_objects(mask, 1, include_border_objects=True).values
    regions = skimage.measure.regionprops(scipy.ndimage.label(mask == 1, structure=np.ones((3, 3)))[0])
    assert len(regions) == len(values) > 10
    expected = np.array([[r.area, r.perimeter, r.equivalent_diameter_area, r.eccentricity,
                          r.axis_minor_length / r.axis_major_length if r.axis_major_length else 1.0,
                          r.solidity, r.extent, 1 - r.euler_number] for r in regions])
    np.testing.assert_allclose(values[:, :8], expected, rtol=1e-9, atol=1e-9)


def test_holes_match_scipy_fill_holes() -> None:
    ring = square(9)
    ring[6:9, 6:9] = 0  # one 3x3 hole
    ring[4, 10] = 0  # and a one-pixel hole
    row = dict(zip(OBJECT_FEATURES, mask_objects(ring, 1).values[0], strict=True))
    filled = scipy.ndimage.binary_fill_holes(ring == 1)
    assert row["holes"] == 2 and row["area"] == 81 - 10
    assert row["hole_fraction"] == pytest.approx((filled.sum() - (ring == 1).sum()) / filled.sum())
    # A pixel open to the outside only diagonally: a hole of an 8-connected object (its background is
    # 4-connected, as in binary_fill_holes), not of a 4-connected object (8-connected background).
    diagonal = square(5)  # rows / columns 3..7
    diagonal[3, 3] = 0  # corner gone
    diagonal[4, 4] = 0  # diagonal to the gone corner
    assert feature(mask_objects(diagonal, 1, connectivity=8).values, "holes")[0] == 1
    assert scipy.ndimage.binary_fill_holes(diagonal == 1)[4, 4]
    assert feature(mask_objects(diagonal, 1, connectivity=4).values, "holes")[0] == 0
    notch = square(5)
    notch[3:5, 4] = 0  # open to the outside through an edge: a notch, not a hole
    assert feature(mask_objects(notch, 1, connectivity=8).values, "holes")[0] == 0


def test_border_objects_are_counted_and_excluded_unless_asked() -> None:
    mask = square(4, at=0) + square(3, at=10)  # one square in the corner, one inside
    kept = mask_objects(mask, 1)
    assert (kept.objects, kept.border_objects) == (2, 1) and feature(kept.values, "area").tolist() == [9]
    both = mask_objects(mask, 1, include_border_objects=True)
    assert both.border_objects == 1 and sorted(feature(both.values, "area").tolist()) == [9, 16]


def test_absent_class_has_no_objects_not_zeros() -> None:
    found = mask_objects(np.zeros((8, 8), np.uint8), 2)
    assert found.values.shape == (0, len(OBJECT_FEATURES)) and found.objects == 0 and found.area_fraction == 0


def test_set_features_pool_objects_from_a_generator_and_bad_input() -> None:
    masks = (square(3 + k) + square(2, at=15) for k in range(3))
    features = mask_set_features(masks, [1])
    pooled = features.classes[1]
    assert features.masks == 3 and pooled.kept_objects == 6 and pooled.masks_with_class == 3
    assert sorted(pooled.object_column("area").tolist()) == [4, 4, 4, 9, 16, 25]
    np.testing.assert_array_equal(pooled.image_column("object_count"), [2, 2, 2])
    with pytest.raises(ScoringInputError, match="unknown feature"):
        pooled.object_column("boundary_per_area")
    with pytest.raises(ScoringInputError, match="connectivity"):
        mask_objects(square(3), 1, connectivity=6)
    with pytest.raises(ScoringInputError, match="integer class ids"):
        mask_objects(np.zeros((4, 4), np.float32), 0)
    with pytest.raises(ScoringInputError, match="at least one mask"):
        mask_set_features([], [1])


# ---------------------------------------------------------------------- background choice


def test_binary_masks_describe_the_foreground_only_unless_asked() -> None:
    real = np.stack([square(5 + k) for k in range(4)])
    synthetic = np.stack([disc(3 + k) for k in range(4)])
    assert describe_class_ids({0, 1}) == (1,)
    assert describe_class_ids({0, 1}, include_background=True) == (0, 1)
    assert describe_class_ids({0, 1, 2}, class_ids=[0, 2]) == (0, 2)
    default = score_mask_sets(real, synthetic)
    assert default.class_ids == (1,) and {f.class_id for f in default.features} == {1}
    assert len(default.object_features) == len(OBJECT_FEATURES) and len(default.image_features) == len(IMAGE_FEATURES)
    both = score_mask_sets(real, synthetic, include_background=True)
    assert both.class_ids == (0, 1)
    # The background surrounds the object and touches the border: no background object is measured.
    background = both.classes[0]
    assert background.status == STATUS_ABSENT and background.real_border_objects == 4
    with pytest.raises(ScoringInputError, match="twice"):
        describe_class_ids({1}, class_ids=[1, 1])
    with pytest.raises(ScoringInputError, match="no class to describe"):
        score_mask_sets(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8))


# ------------------------------------------------------------------- squares vs discs, scipy


def test_squares_vs_discs_match_scipy() -> None:
    sizes, radii = [4, 5, 6, 7, 8, 9], [2, 3, 4, 5, 6, 7]
    real = [square(s, canvas=32, at=4) for s in sizes]
    synthetic = [disc(r, canvas=32) for r in radii]
    result = score_mask_sets(real, synthetic, bins=10)
    (c,) = result.classes
    assert c.status == STATUS_COMPARED and (c.real_objects, c.synthetic_objects) == (6, 6)
    by_feature = {f.feature: f for f in c.objects}
    # Independent expectations: squares fill their box, discs do not.
    real_extent = np.ones(len(sizes))
    synthetic_extent = np.array([disc(r, canvas=32).sum() / (2 * r + 1) ** 2 for r in radii])
    extent = by_feature["extent"]
    reference = scipy.stats.ks_2samp(real_extent, synthetic_extent)
    assert extent.ks_statistic == reference.statistic == 1.0
    assert extent.ks_pvalue == pytest.approx(reference.pvalue)
    np.testing.assert_allclose([extent.real_mean, extent.synthetic_mean], [1.0, synthetic_extent.mean()])
    # Areas: KS and JS (log bins over the pooled range) recomputed with scipy / numpy.
    real_area = np.array([s * s for s in sizes], float)
    synthetic_area = np.array([disc(r, canvas=32).sum() for r in radii], float)
    area = by_feature["area"]
    assert area.ks_statistic == pytest.approx(scipy.stats.ks_2samp(real_area, synthetic_area).statistic)
    logs = np.log1p(np.concatenate([real_area, synthetic_area]))
    edges = np.linspace(logs.min(), logs.max(), 11)
    p = np.histogram(np.log1p(real_area), edges)[0]
    q = np.histogram(np.log1p(synthetic_area), edges)[0]
    assert area.js_divergence == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)
    assert (area.real_n, area.synthetic_n) == (6, 6)
    # Identical sets: nothing to see.
    same = score_mask_sets(real, real, bins=10)
    assert all(f.ks_statistic == 0 and f.ks_pvalue == 1 and f.js_divergence == 0 for f in same.features)
    assert same.mean_ks == 0 and same.mean_js == 0
    # Summary numbers are plain means over the object features.
    assert result.mean_ks == pytest.approx(np.mean([f.ks_statistic for f in c.objects]))
    assert result.mean_js == pytest.approx(np.mean([f.js_divergence for f in c.objects]))
    assert 0 < result.mean_js <= 1 and result.real_objects == 6


def test_missing_class_is_reported_with_counts_not_zeros() -> None:
    real = [square(4) + square(3, at=12, label=2) for _ in range(3)]
    synthetic = [square(5) for _ in range(3)]
    result = score_mask_sets(real, synthetic, class_ids=[1, 2, 3])
    status = {c.class_id: c for c in result.classes}
    assert status[1].status == STATUS_COMPARED
    two = status[2]
    assert two.status == STATUS_MISSING_IN_SYNTHETIC and (two.real_objects, two.synthetic_objects) == (3, 0)
    assert two.objects == () and two.mean_ks is None and two.real_masks_with_class == 3
    assert status[3].status == STATUS_ABSENT and status[3].objects == ()
    assert result.missing_classes == (2,) and result.compared_classes == (1,)
    # Means cover the compared class only; the image features still see class 2 vanish.
    assert result.mean_ks == status[1].mean_ks
    area_fraction_2 = next(f for f in two.image if f.feature == "area_fraction")
    assert area_fraction_2.ks_statistic == 1.0 and area_fraction_2.js_divergence == 1.0
    summary = result.as_dict()
    assert summary["missing_classes"] == [2] and summary["classes"]["2"]["mean_js"] is None
    assert summary["classes"]["2"]["real_objects"] == 3 and summary["classes"]["2"]["status"] == "missing_in_synthetic"
    assert not any(name.startswith("object/") and name.endswith("class_2") for name in summary["per_feature"])
    assert summary["per_feature"]["image/area_fraction/class_2"]["ks"] == 1.0


def test_compare_needs_matching_feature_sets() -> None:
    real = mask_set_features([square(4)], [1])
    with pytest.raises(ScoringInputError, match="classes"):
        compare_mask_sets(real, mask_set_features([square(4)], [1, 2]))
    with pytest.raises(ScoringInputError, match="border"):
        compare_mask_sets(real, mask_set_features([square(4)], [1], include_border_objects=True))
    with pytest.raises(ScoringInputError, match="bins"):
        compare_mask_sets(real, real, bins=0)


# ------------------------------------------------------------------------- KS, JS, KL

samples = st.lists(
    st.one_of(st.integers(-5, 5).map(float), st.floats(-1e3, 1e3, allow_nan=False)), min_size=1, max_size=40
)


@pytest.mark.filterwarnings("ignore:ks_2samp. Exact calculation unsuccessful:RuntimeWarning")
@settings(max_examples=60, deadline=None)
@given(a=samples, b=samples)
def test_ks_statistic_and_pvalue_match_scipy(a: list[float], b: list[float]) -> None:
    reference = scipy.stats.ks_2samp(a, b)
    assert ks_statistic(a, b) == pytest.approx(reference.statistic, abs=1e-12)
    assert ks_pvalue(a, b) == pytest.approx(reference.pvalue, rel=1e-12, abs=1e-300)


def test_ks_hand_case() -> None:
    # ECDFs of {1, 2, 3} and {2.5, 4}: at x = 2 they are 2/3 and 0 -> D = 2/3.
    assert ks_statistic([1, 2, 3], [2.5, 4]) == pytest.approx(2 / 3)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), bins=st.integers(1, 30), log=st.booleans())
def test_js_matches_scipy_on_shared_bins(seed: int, bins: int, log: bool) -> None:
    rng = np.random.default_rng(seed)
    real = rng.gamma(2.0, size=rng.integers(1, 80))
    synth = rng.gamma(3.0, scale=1.5, size=rng.integers(1, 80))
    x, y = (np.log1p(real), np.log1p(synth)) if log else (real, synth)
    edges = np.linspace(min(x.min(), y.min()), max(x.max(), y.max()), bins + 1)
    p, q = np.histogram(x, edges)[0], np.histogram(y, edges)[0]
    expected = jensenshannon(p, q, base=2) ** 2
    value = js_divergence(real, synth, bins=bins, log=log)
    assert value == pytest.approx(expected, abs=1e-9) and 0 <= value <= 1
    # Add-one smoothed KL: scipy.stats.entropy of the smoothed counts.
    assert kl_smoothed(real, synth, bins=bins, log=log) == pytest.approx(
        scipy.stats.entropy(p + 1.0, q + 1.0), rel=1e-9, abs=1e-12)


def test_empty_bins_stay_finite() -> None:
    # Disjoint samples: every bin is empty in one histogram. JS is exactly 1 bit (its maximum).
    assert js_divergence([0.0, 0.0], [10.0, 10.0], bins=2) == 1.0
    assert js_divergence_counts([5, 0, 0, 0], [0, 0, 0, 7]) == 1.0
    # Add-one smoothing: counts (2, 0) vs (0, 2) -> (3/4, 1/4) vs (1/4, 3/4): KL = 1/2 ln 3, not ~23 nats a bin.
    assert kl_smoothed([0.0, 0.0], [10.0, 10.0], bins=2) == pytest.approx(0.5 * math.log(3))
    # Many empty bins in both histograms cost nothing: JS only sees where the mass is.
    assert js_divergence([0.0, 100.0], [0.0, 100.0], bins=1000) == 0.0
    assert js_divergence([0.0, 0.0], [0.0, 0.0], bins=5) == 0.0  # one constant value: a single shared bin
    # Histograms share edges spanning the pooled range.
    p, q = shared_histograms([0.0, 1.0], [3.0], bins=3)
    assert p.tolist() == [1, 1, 0] and q.tolist() == [0, 0, 1]  # edges 0, 1, 2, 3
    with pytest.raises(ScoringInputError, match="bins"):
        shared_histograms([0.0], [1.0], bins=0)
    with pytest.raises(ScoringInputError, match="non-empty"):
        js_divergence([], [1.0])


def test_pooled_per_mask_features_equal_the_features_of_the_whole_set() -> None:
    rng = np.random.default_rng(5)
    real = [(scipy.ndimage.gaussian_filter(rng.random((48, 48)), 3) > 0.5).astype(np.uint8) for _ in range(6)]
    other = [(scipy.ndimage.gaussian_filter(rng.random((48, 48)), 2) > 0.5).astype(np.uint8) for _ in range(5)]
    whole = score_mask_sets(real, other, (1,), include_border_objects=True)

    def per_mask(masks: list[np.ndarray]) -> list:
        return [mask_set_features([mask], (1,), include_border_objects=True) for mask in masks]

    pooled = compare_mask_sets(pool_mask_set_features(per_mask(real)), pool_mask_set_features(per_mask(other)))
    assert pooled.as_dict() == whole.as_dict()
    with pytest.raises(ScoringInputError, match="share class ids"):
        pool_mask_set_features([mask_set_features([real[0]], (1,)), mask_set_features([real[0]], (0, 1))])

