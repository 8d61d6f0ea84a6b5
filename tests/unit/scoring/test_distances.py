"""FID / streaming stats / KID / precision-recall / IS / bootstrap against independent references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scoring.distances import (
    BootstrapInterval,
    StreamingFeatureStats,
    bootstrap_ci,
    fid_from_features,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    kid,
    precision_recall,
)
from services.scoring.errors import ScoringInputError


def _random_gaussian(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) / math.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def _fid_direct_sqrtm(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(c1 @ c2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * root))


def _fid_symmetric_eigen(a: np.ndarray, b: np.ndarray) -> float:
    # Tr sqrt(C1 C2) = sum sqrt(eig(C1^1/2 C2 C1^1/2)), a symmetric PSD matrix: no sqrtm at all.
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(c1)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(half @ c2 @ half)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


# ----------------------------------------------------------------------------------- FID


def test_fid_matches_direct_sqrtm_and_eigen_references() -> None:
    rng = np.random.default_rng(1)
    a = _random_gaussian(rng, 600, 16)
    b = _random_gaussian(rng, 500, 16, shift=0.3)
    ours = fid_from_features(a, b)
    assert ours == pytest.approx(_fid_direct_sqrtm(a, b), rel=1e-9)
    assert ours == pytest.approx(_fid_symmetric_eigen(a, b), rel=1e-7)


@pytest.mark.parametrize("shape", [(600, 16), (12, 16)])  # full-rank and singular covariances
def test_fid_eigh_method_agrees_with_sqrtm(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(15)
    a, b = _random_gaussian(rng, *shape), _random_gaussian(rng, *shape, shift=0.2)
    assert fid_from_features(a, b, method="eigh") == pytest.approx(fid_from_features(a, b), rel=1e-6)
    with pytest.raises(ScoringInputError, match="unknown Frechet method"):
        fid_from_features(a, b, method="newton")


def test_fid_closed_form_for_one_dimensional_gaussians() -> None:
    # d = 1: FID = (m1 - m2)^2 + (s1 - s2)^2 = (1 - 4)^2 + (2 - 3)^2 = 9 + 1 = 10.
    assert frechet_distance([1.0], [[4.0]], [4.0], [[9.0]]) == pytest.approx(10.0, abs=1e-12)


def test_fid_closed_form_for_diagonal_covariances() -> None:
    # Commuting diagonal covariances: FID = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    # = (1 + 4) + ((1 - 2)^2 + (3 - 1)^2) = 5 + 5 = 10.
    for method in ("sqrtm", "eigh"):
        value = frechet_distance([0.0, 0.0], np.diag([1.0, 9.0]), [1.0, 2.0], np.diag([4.0, 1.0]), method=method)
        assert value == pytest.approx(10.0, abs=1e-10)


def test_fid_of_identical_sets_is_zero() -> None:
    a = _random_gaussian(np.random.default_rng(2), 300, 12)
    assert abs(fid_from_features(a, a.copy())) < 1e-8


def test_fid_increases_monotonically_with_shift() -> None:
    rng = np.random.default_rng(3)
    base = _random_gaussian(rng, 400, 8)
    other = _random_gaussian(rng, 400, 8)
    values = [fid_from_features(base, other + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(later > earlier for earlier, later in itertools.pairwise(values))


def test_fid_with_singular_covariances_stays_finite() -> None:
    # Fewer samples than dimensions: both covariances are rank-deficient.
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))
    value = fid_from_features(a, b)
    assert math.isfinite(value)
    assert value > 0


def test_fid_rejects_non_psd_covariances() -> None:
    # sqrt(-I) is purely imaginary: these are not covariances.
    with pytest.raises(ScoringInputError, match="imaginary"):
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ScoringInputError, match="not positive semi-definite"):
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3), method="eigh")


def test_fid_rejects_mismatched_shapes() -> None:
    with pytest.raises(ScoringInputError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------ streaming stats


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=57), max_size=6),
    offset=st.sampled_from([0.0, 1e3, 1e6]),
)
def test_streaming_stats_match_numpy_on_the_concatenation(cuts: list[int], offset: float) -> None:
    rows = np.random.default_rng(5).normal(size=(57, 5)) + offset
    bounds = [0, *sorted(cuts), 57]
    stats = StreamingFeatureStats(5)
    for lo, hi in itertools.pairwise(bounds):
        stats.update(rows[lo:hi])  # empty batches included
    assert stats.count == 57
    np.testing.assert_allclose(stats.mean, rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(rows, rowvar=False), rtol=1e-7, atol=1e-9)


def test_merge_equals_single_pass_and_round_trips_through_arrays() -> None:
    rows = np.random.default_rng(6).normal(size=(90, 4))
    left = StreamingFeatureStats(4).update(rows[:20]).update(rows[20:45])
    right = StreamingFeatureStats(4).update(rows[45:])
    left.merge(right).merge(StreamingFeatureStats(4))  # merging an empty one is a no-op
    np.testing.assert_allclose(left.cov, np.cov(rows, rowvar=False), rtol=1e-12)
    restored = StreamingFeatureStats.from_arrays(**left.to_arrays())
    np.testing.assert_array_equal(restored.cov, left.cov)
    assert restored.count == 90
    assert frechet_distance_from_stats(restored, left) == pytest.approx(0.0, abs=1e-9)


def test_streaming_stats_reject_bad_input() -> None:
    stats = StreamingFeatureStats(3)
    with pytest.raises(ScoringInputError, match="dimension 2, expected 3"):
        stats.update(np.zeros((4, 2)))
    with pytest.raises(ScoringInputError, match="at least 2 samples"):
        _ = stats.update(np.zeros((1, 3))).cov
    with pytest.raises(ScoringInputError, match="NaN"):
        stats.update(np.full((2, 3), np.nan))


# ----------------------------------------------------------------------------------- KID


def _naive_unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    def k(u: np.ndarray, v: np.ndarray) -> float:
        return float((gamma * float(u @ v) + coef0) ** degree)

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_definition_on_one_full_subset() -> None:
    # subset_size = n draws a permutation of every row; MMD^2 does not depend on row order.
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.4
    mean, std = kid(x, y, num_subsets=1, subset_size=12)
    assert mean == pytest.approx(_naive_unbiased_mmd2(x, y, 3, 1 / 5, 1.0), rel=1e-10)
    assert std == 0.0


def test_kid_is_unbiased_for_equal_distributions_and_positive_for_shifted() -> None:
    per_seed = []
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        per_seed.append(kid(rng.normal(size=(150, 6)), rng.normal(size=(150, 6)), num_subsets=5, subset_size=100, seed=seed)[0])
    mean = float(np.mean(per_seed))
    standard_error = float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed)))
    assert abs(mean) < 3 * standard_error
    # The same data with a shift is far from 0 compared with that noise.
    rng = np.random.default_rng(99)
    shifted, _ = kid(rng.normal(size=(150, 6)), rng.normal(size=(150, 6)) + 0.5, num_subsets=5, subset_size=100)
    assert shifted > 20 * standard_error


def test_kid_clips_subset_size_and_is_seeded() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(40, 4)), rng.normal(size=(25, 4))
    first = kid(a, b, num_subsets=7, subset_size=1000, seed=3)
    assert first == kid(a, b, num_subsets=7, subset_size=1000, seed=3)
    assert first != kid(a, b, num_subsets=7, subset_size=1000, seed=4)


# ---------------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets_are_perfect() -> None:
    a = np.random.default_rng(9).normal(size=(80, 6))
    result = precision_recall(a, a.copy(), k=3)
    assert (result.precision, result.recall) == (1.0, 1.0)


def test_precision_recall_far_disjoint_sets_are_zero() -> None:
    rng = np.random.default_rng(10)
    result = precision_recall(rng.normal(size=(50, 6)), rng.normal(size=(60, 6)) + 100.0, k=3)
    assert (result.precision, result.recall) == (0.0, 0.0)


def test_precision_recall_hand_case() -> None:
    # 1-D, k = 1. Real {0, 1, 2, 3}: every nearest-neighbour radius is 1.
    # Fake {0.5, 10}: 0.5 is within 1 of 0 -> inside; 10 is 7 from 3 -> outside: precision 1/2.
    # Fake radii: each fake's nearest other fake is 9.5 away; every real point is within
    # 9.5 of 0.5: recall 4/4.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    result = precision_recall(real, fake, k=1)
    assert (result.precision, result.recall) == (0.5, 1.0)


@pytest.mark.parametrize("block", [1, 7, 64, 10**9])
def test_precision_recall_blocks_match_brute_force(block: int) -> None:
    rng = np.random.default_rng(11)
    real, fake = rng.normal(size=(45, 3)), rng.normal(size=(38, 3)) + 1.5
    k = 3

    def brute(ref: np.ndarray, query: np.ndarray) -> float:
        radii = np.sort(scipy.spatial.distance.cdist(ref, ref), axis=1)[:, k]
        return float(np.mean((scipy.spatial.distance.cdist(query, ref) <= radii[None, :]).any(axis=1)))

    result = precision_recall(real, fake, k=k, max_block_elements=block)
    assert result.precision == pytest.approx(brute(real, fake))
    assert result.recall == pytest.approx(brute(fake, real))
    assert 0.0 < result.precision < 1.0 and 0.0 < result.recall < 1.0


def test_precision_recall_needs_more_than_k_points() -> None:
    with pytest.raises(ScoringInputError, match="more than k points"):
        precision_recall(np.zeros((3, 2)), np.ones((10, 2)), k=3)


# ---------------------------------------------------------------------------------- IS


def test_inception_score_uniform_predictions_is_one() -> None:
    mean, std = inception_score(np.full((200, 10), 0.1), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_balanced_one_hot_is_number_of_classes() -> None:
    # Each split of 10 rows holds every class once: KL(one-hot || uniform) = log 10 per row.
    probs = np.eye(10)[np.tile(np.arange(10), 10)]
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)
    # A single repeated class has no diversity: IS = 1.
    assert inception_score(np.eye(10)[np.zeros(50, dtype=int)], splits=5)[0] == pytest.approx(1.0)


def test_inception_score_matches_scipy_entropy_and_drops_the_remainder() -> None:
    probs = np.random.default_rng(12).dirichlet(np.full(7, 0.3), size=103)  # 3 rows dropped
    expected = []
    for s in range(4):
        part = probs[s * 25 : (s + 1) * 25]
        marginal = part.mean(axis=0)
        expected.append(math.exp(np.mean([scipy.stats.entropy(row, marginal) for row in part])))
    mean, std = inception_score(probs, splits=4)
    assert mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert std == pytest.approx(np.std(expected), rel=1e-8)


def test_inception_score_rejects_non_probabilities() -> None:
    with pytest.raises(ScoringInputError, match="sum to 1"):
        inception_score(np.ones((20, 4)), splits=2)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_of_mean_difference_matches_normal_approximation() -> None:
    rng = np.random.default_rng(13)
    a, b = rng.normal(size=(400, 1)), rng.normal(size=(400, 1)) + 1.0

    def mean_difference(x: np.ndarray, y: np.ndarray) -> float:
        return float(y.mean() - x.mean())

    ci = bootstrap_ci(mean_difference, a, b, n_boot=400, alpha=0.05, seed=1)
    assert isinstance(ci, BootstrapInterval)
    assert ci.estimate == pytest.approx(mean_difference(a, b))
    half_width = 1.96 * math.sqrt(a.var(ddof=1) / 400 + b.var(ddof=1) / 400)
    assert ci.low < ci.estimate < ci.high
    assert (ci.high - ci.low) / 2 == pytest.approx(half_width, rel=0.2)
    assert ci == bootstrap_ci(mean_difference, a, b, n_boot=400, alpha=0.05, seed=1)


def test_bootstrap_ci_works_with_fid() -> None:
    rng = np.random.default_rng(14)
    a, b = _random_gaussian(rng, 200, 4), _random_gaussian(rng, 200, 4, shift=0.5)
    ci = bootstrap_ci(fid_from_features, a, b, n_boot=30, seed=0)
    assert 0.0 < ci.low <= ci.high
    assert ci.n_boot == 30
