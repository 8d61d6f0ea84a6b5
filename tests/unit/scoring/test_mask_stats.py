"""Mask morphology features (hand-computed) and KS / KL against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scoring.errors import ScoringInputError
from services.scoring.mask_stats import (
    FEATURE_KINDS,
    KSResult,
    MaskFeatureTable,
    feature_names,
    kl_divergence_histogram,
    kl_per_feature,
    ks_per_feature,
    ks_statistic,
    mask_feature_table,
    mask_features,
)


def _two_blob_mask() -> np.ndarray:
    # 20 x 30 = 600 pixels; class 1 = a 3x3 square (9 px) and a 5x10 rectangle (50 px).
    mask = np.zeros((20, 30), dtype=np.int64)
    mask[2:5, 2:5] = 1
    mask[10:15, 10:20] = 1
    return mask


def test_features_of_a_hand_drawn_mask() -> None:
    feats = mask_features(_two_blob_mask(), class_ids=[0, 1])
    # Class 1: area 59 / 600; two regions of 9 and 50 px: mean 29.5, median 29.5, max 50.
    # Boundary edges: square perimeter 4*3 = 12, rectangle 2*(5+10) = 30 -> 42 / 59 px.
    assert feats["area_fraction/class_1"] == pytest.approx(59 / 600)
    assert feats["component_count/class_1"] == 2
    assert feats["component_size_mean/class_1"] == pytest.approx(29.5)
    assert feats["component_size_median/class_1"] == pytest.approx(29.5)
    assert feats["component_size_max/class_1"] == 50
    assert feats["boundary_per_area/class_1"] == pytest.approx(42 / 59)
    # Class 0 is the single surrounding region; it shares the same 42 edges; the image
    # border does not count as boundary.
    assert feats["area_fraction/class_0"] == pytest.approx(541 / 600)
    assert feats["component_count/class_0"] == 1
    assert feats["component_size_max/class_0"] == 541
    assert feats["boundary_per_area/class_0"] == pytest.approx(42 / 541)
    assert tuple(feats) == feature_names([0, 1])


def test_connectivity_decides_whether_diagonal_pixels_join() -> None:
    diagonal = np.eye(4, dtype=np.int64)  # four pixels touching only at corners
    assert mask_features(diagonal, [1], connectivity=8)["component_count/class_1"] == 1
    four = mask_features(diagonal, [1], connectivity=4)
    assert four["component_count/class_1"] == 4
    assert four["component_size_mean/class_1"] == 1
    # Each pixel has 4 edges to class 0 except where it touches the border:
    # (0,0): right+down = 2, (1,1): 4, (2,2): 4, (3,3): up+left = 2 -> 12 edges / 4 px.
    assert four["boundary_per_area/class_1"] == pytest.approx(3.0)


def test_absent_class_gives_zeros() -> None:
    feats = mask_features(np.zeros((8, 8), dtype=np.uint8), [0, 2])
    assert all(feats[f"{kind}/class_2"] == 0.0 for kind in FEATURE_KINDS)
    assert feats["area_fraction/class_0"] == 1.0
    assert feats["boundary_per_area/class_0"] == 0.0


def test_feature_table_from_generator_and_bad_input() -> None:
    masks = (np.roll(_two_blob_mask(), shift, axis=1) for shift in range(3))
    table = mask_feature_table(masks, class_ids=[1])
    assert table.values.shape == (3, len(FEATURE_KINDS))
    np.testing.assert_allclose(table.column("area_fraction/class_1"), 59 / 600)
    with pytest.raises(ScoringInputError, match="unknown feature"):
        table.column("area/class_1")
    with pytest.raises(ScoringInputError, match="connectivity"):
        mask_features(_two_blob_mask(), [1], connectivity=6)
    with pytest.raises(ScoringInputError, match="integer class ids"):
        mask_features(np.zeros((4, 4), dtype=np.float32), [0])


# ------------------------------------------------------------------------------------ KS

samples = st.lists(
    st.one_of(st.integers(-5, 5).map(float), st.floats(-1e3, 1e3, allow_nan=False)), min_size=1, max_size=40
)


@pytest.mark.filterwarnings("ignore:ks_2samp. Exact calculation unsuccessful:RuntimeWarning")
@settings(max_examples=100, deadline=None)
@given(a=samples, b=samples)
def test_ks_statistic_and_pvalue_match_scipy(a: list[float], b: list[float]) -> None:
    reference = scipy.stats.ks_2samp(a, b)
    assert ks_statistic(a, b) == pytest.approx(reference.statistic, abs=1e-12)
    result = ks_per_feature({"f": a}, {"f": b})["f"]
    assert isinstance(result, KSResult)
    assert result.statistic == pytest.approx(reference.statistic, abs=1e-12)
    assert result.pvalue == pytest.approx(reference.pvalue, rel=1e-12, abs=1e-300)


def test_ks_hand_case() -> None:
    # ECDFs of {1, 2, 3} and {2.5, 4}: at x = 2 they are 2/3 and 0 -> D = 2/3.
    assert ks_statistic([1, 2, 3], [2.5, 4]) == pytest.approx(2 / 3)


def test_ks_per_feature_on_tables_requires_matching_names() -> None:
    rng = np.random.default_rng(0)
    real = MaskFeatureTable(("a", "b"), rng.normal(size=(50, 2)))
    synth = MaskFeatureTable(("a", "b"), rng.normal(size=(40, 2)) + [0.0, 3.0])
    results = ks_per_feature(real, synth)
    assert results["b"].statistic > 0.8 and results["b"].pvalue < 1e-10
    assert results["a"].pvalue > 1e-3
    with pytest.raises(ScoringInputError, match="only real"):
        ks_per_feature(real, {"a": [1.0]})


# ------------------------------------------------------------------------------------ KL


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    bins=st.integers(1, 30),
    epsilon=st.sampled_from([1e-10, 1e-6, 1e-3]),
)
def test_kl_matches_scipy_entropy_on_shared_bins(seed: int, bins: int, epsilon: float) -> None:
    rng = np.random.default_rng(seed)
    real = rng.normal(size=rng.integers(1, 80))
    synth = rng.normal(loc=0.5, scale=1.5, size=rng.integers(1, 80))
    # Independent reference: shared edges over the pooled data, probabilities + epsilon,
    # scipy.stats.entropy renormalises and computes sum p log(p / q).
    edges = np.linspace(min(real.min(), synth.min()), max(real.max(), synth.max()), bins + 1)
    if edges[0] == edges[-1]:
        edges = np.linspace(edges[0] - 0.5, edges[0] + 0.5, bins + 1)
    p = np.histogram(real, edges)[0] / real.size
    q = np.histogram(synth, edges)[0] / synth.size
    expected = scipy.stats.entropy(p + epsilon, q + epsilon)
    assert kl_divergence_histogram(real, synth, bins=bins, epsilon=epsilon) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_kl_hand_case_identity_and_asymmetry() -> None:
    # Two bins [0, 0.5), [0.5, 1]: real 3/4 vs 1/4, synth 1/4 vs 3/4 (epsilon negligible):
    # KL = 3/4 ln 3 + 1/4 ln(1/3) = 1/2 ln 3.
    real, synth = [0.0, 0.1, 0.2, 1.0], [0.0, 0.9, 0.95, 1.0]
    assert kl_divergence_histogram(real, synth, bins=2) == pytest.approx(0.5 * np.log(3), rel=1e-8)
    assert kl_divergence_histogram(real, real, bins=7) == 0.0
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p||q) = 1/2 ln(4/3), KL(q||p) = 1/4 ln(1/2) + 3/4 ln(3/2).
    even, skewed = [0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]
    assert kl_divergence_histogram(even, skewed, bins=2) == pytest.approx(0.5 * np.log(4 / 3), rel=1e-8)
    assert kl_divergence_histogram(skewed, even, bins=2) == pytest.approx(0.25 * np.log(0.5) + 0.75 * np.log(1.5), rel=1e-8)


def test_kl_stays_finite_when_synthetic_misses_a_bin() -> None:
    value = kl_divergence_histogram([0.0, 10.0], [0.0, 0.0], bins=2, epsilon=1e-10)
    # Half the real mass sits where synth has only epsilon: ~ 1/2 ln(1/2 / 1e-10).
    assert np.isfinite(value) and value == pytest.approx(0.5 * np.log(0.5 / 1e-10) + 0.5 * np.log(0.5), rel=1e-6)
    with pytest.raises(ScoringInputError, match="epsilon"):
        kl_divergence_histogram([0.0], [1.0], epsilon=0.0)


def test_kl_per_feature_constant_feature_is_zero() -> None:
    result = kl_per_feature({"const": [2.0, 2.0], "x": [0.0, 1.0]}, {"const": [2.0], "x": [0.0, 1.0]}, bins=4)
    assert result == {"const": 0.0, "x": 0.0}
