"""Morphology features of semantic masks and per-feature real-vs-synthetic comparisons.

PriorPath (coarse-to-fine mask generation) judges synthetic masks by how closely the
distribution of mask properties matches the real masks', with a two-sample
Kolmogorov-Smirnov test and a Kullback-Leibler divergence next to FID. The paper does not
list its features; these are the ones that describe what a mask generator can get wrong:

  area_fraction/class_<c>          pixels of class c / all pixels
  component_count/class_<c>        connected regions of class c
  component_size_mean/class_<c>    mean region size, pixels   (0 when the class is absent)
  component_size_median/class_<c>  median region size, pixels (0 when the class is absent)
  component_size_max/class_<c>     largest region, pixels     (0 when the class is absent)
  boundary_per_area/class_<c>      boundary length / area of class c, 1/pixel (0 when absent)

Connectivity is 8 by default (diagonal neighbours join a region), matching how tissue
fragments look; pass 4 for the strict variant. Boundary length counts 4-neighbour pixel
edges between class c and any other class; edges on the image border are not counted
because a crop border is not a tissue boundary. Sizes are in pixels, so compare masks of
the same resolution.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import scipy.ndimage
import scipy.stats
from numpy.typing import ArrayLike, NDArray

from services.scoring.errors import ScoringInputError

FloatArray = NDArray[np.float64]

FEATURE_KINDS: Final = (
    "area_fraction",
    "component_count",
    "component_size_mean",
    "component_size_median",
    "component_size_max",
    "boundary_per_area",
)
# Added to every bin's probability before renormalising, so KL stays finite when the
# synthetic histogram has an empty bin where the real one has mass. Small enough
# (1e-10 per bin) not to move the divergence of well-populated histograms.
DEFAULT_KL_EPSILON: Final = 1e-10
DEFAULT_KL_BINS: Final = 20

_STRUCTURES: Final = {
    4: scipy.ndimage.generate_binary_structure(2, 1),
    8: scipy.ndimage.generate_binary_structure(2, 2),
}


def feature_names(class_ids: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{kind}/class_{c}" for c in class_ids for kind in FEATURE_KINDS)


def _boundary_edges(is_class: NDArray[np.bool_]) -> int:
    horizontal = np.count_nonzero(is_class[:, 1:] != is_class[:, :-1])
    vertical = np.count_nonzero(is_class[1:, :] != is_class[:-1, :])
    return int(horizontal + vertical)


def mask_features(mask: ArrayLike, class_ids: Sequence[int], connectivity: int = 8) -> dict[str, float]:
    """Feature name -> value for one [H, W] integer class map (names from ``feature_names``)."""
    labels = np.asarray(mask)
    if labels.ndim != 2 or labels.size == 0:
        raise ScoringInputError(f"mask must be a non-empty 2-D class map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise ScoringInputError(f"mask must hold integer class ids, got dtype {labels.dtype}")
    if connectivity not in _STRUCTURES:
        raise ScoringInputError(f"connectivity must be one of {sorted(_STRUCTURES)}, got {connectivity}")
    if len(class_ids) == 0 or len(set(class_ids)) != len(class_ids):
        raise ScoringInputError(f"class_ids must be non-empty and distinct, got {list(class_ids)}")
    features: dict[str, float] = {}
    for c in class_ids:
        is_class = labels == c
        area = int(np.count_nonzero(is_class))
        components, count = scipy.ndimage.label(is_class, structure=_STRUCTURES[connectivity])
        sizes = np.bincount(components.ravel())[1:] if count else np.zeros(0, dtype=np.int64)
        features[f"area_fraction/class_{c}"] = area / labels.size
        features[f"component_count/class_{c}"] = float(count)
        features[f"component_size_mean/class_{c}"] = float(sizes.mean()) if count else 0.0
        features[f"component_size_median/class_{c}"] = float(np.median(sizes)) if count else 0.0
        features[f"component_size_max/class_{c}"] = float(sizes.max()) if count else 0.0
        features[f"boundary_per_area/class_{c}"] = _boundary_edges(is_class) / area if area else 0.0
    return features


@dataclass(frozen=True)
class MaskFeatureTable:
    """Features of a set of masks: one row per mask, one column per feature name."""

    names: tuple[str, ...]
    values: FloatArray  # [n_masks, len(names)]

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != len(self.names):
            raise ScoringInputError(
                f"values shape {self.values.shape} does not match {len(self.names)} feature names"
            )

    def column(self, name: str) -> FloatArray:
        try:
            return self.values[:, self.names.index(name)]
        except ValueError:
            raise ScoringInputError(f"unknown feature {name!r}; valid: {list(self.names)}") from None

    def as_dict(self) -> dict[str, FloatArray]:
        return {name: self.values[:, i] for i, name in enumerate(self.names)}


def mask_feature_table(
    masks: Iterable[ArrayLike], class_ids: Sequence[int], connectivity: int = 8
) -> MaskFeatureTable:
    """Features of every mask; masks may be a generator (one mask in memory at a time)."""
    names = feature_names(class_ids)
    rows = [
        [feats[name] for name in names]
        for feats in (mask_features(m, class_ids, connectivity) for m in masks)
    ]
    if not rows:
        raise ScoringInputError("mask_feature_table needs at least one mask")
    return MaskFeatureTable(names=names, values=np.asarray(rows, dtype=np.float64))


FeatureSet = MaskFeatureTable | Mapping[str, ArrayLike]


def _paired_columns(real: FeatureSet, synth: FeatureSet) -> dict[str, tuple[FloatArray, FloatArray]]:
    real_cols = real.as_dict() if isinstance(real, MaskFeatureTable) else dict(real)
    synth_cols = synth.as_dict() if isinstance(synth, MaskFeatureTable) else dict(synth)
    if set(real_cols) != set(synth_cols):
        raise ScoringInputError(
            f"real and synthetic features differ: only real {sorted(set(real_cols) - set(synth_cols))}, "
            f"only synthetic {sorted(set(synth_cols) - set(real_cols))}"
        )
    paired: dict[str, tuple[FloatArray, FloatArray]] = {}
    for name in real_cols:
        a = np.asarray(real_cols[name], dtype=np.float64).ravel()
        b = np.asarray(synth_cols[name], dtype=np.float64).ravel()
        if a.size == 0 or b.size == 0:
            raise ScoringInputError(f"feature {name!r} has an empty sample (real {a.size}, synthetic {b.size})")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ScoringInputError(f"feature {name!r} contains NaN or infinite values")
        paired[name] = (a, b)
    return paired


# ------------------------------------------------------------------------------------ KS


@dataclass(frozen=True)
class KSResult:
    statistic: float  # sup_x |F_real(x) - F_synth(x)|, in [0, 1]
    pvalue: float  # two-sided, scipy.stats.ks_2samp's 'auto' method (exact for small samples)


def ks_statistic(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sample KS statistic: the largest gap between the two empirical CDFs.

    Both CDFs only jump at sample values, so evaluating them (right-continuous) at every
    pooled value finds the supremum.
    """
    xa = np.sort(np.asarray(a, dtype=np.float64).ravel())
    xb = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if xa.size == 0 or xb.size == 0:
        raise ScoringInputError(f"KS needs two non-empty samples, got sizes {xa.size} and {xb.size}")
    pooled = np.concatenate([xa, xb])
    cdf_a = np.searchsorted(xa, pooled, side="right") / xa.size
    cdf_b = np.searchsorted(xb, pooled, side="right") / xb.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_per_feature(real: FeatureSet, synth: FeatureSet) -> dict[str, KSResult]:
    results: dict[str, KSResult] = {}
    for name, (a, b) in _paired_columns(real, synth).items():
        pvalue = float(scipy.stats.ks_2samp(a, b, alternative="two-sided", method="auto").pvalue)
        results[name] = KSResult(statistic=ks_statistic(a, b), pvalue=pvalue)
    return results


# ------------------------------------------------------------------------------------ KL


def kl_divergence_histogram(
    real: ArrayLike,
    synth: ArrayLike,
    bins: int | str | ArrayLike = DEFAULT_KL_BINS,
    epsilon: float = DEFAULT_KL_EPSILON,
) -> float:
    """KL(real || synth) in nats between histograms on shared bins.

    Bin edges come from ``numpy.histogram_bin_edges`` over the pooled values (``bins`` is
    passed through: a count, a numpy rule name such as "fd", or explicit edges), so both
    histograms use the same support. Each histogram is turned into probabilities, then
    smoothed as p_i <- (p_i + epsilon) / (1 + n_bins * epsilon); equivalently
    ``scipy.stats.entropy(p + epsilon, q + epsilon)``.
    """
    a = np.asarray(real, dtype=np.float64).ravel()
    b = np.asarray(synth, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ScoringInputError(f"KL needs two non-empty samples, got sizes {a.size} and {b.size}")
    if epsilon <= 0.0:
        raise ScoringInputError(f"epsilon must be > 0 to keep KL finite, got {epsilon}")
    edges = np.histogram_bin_edges(np.concatenate([a, b]), bins=bins)
    p = np.histogram(a, bins=edges)[0] / a.size
    q = np.histogram(b, bins=edges)[0] / b.size
    n_bins = p.size
    p = (p + epsilon) / (1.0 + n_bins * epsilon)
    q = (q + epsilon) / (1.0 + n_bins * epsilon)
    return float(np.sum(p * np.log(p / q)))


def kl_per_feature(
    real: FeatureSet,
    synth: FeatureSet,
    bins: int | str | ArrayLike = DEFAULT_KL_BINS,
    epsilon: float = DEFAULT_KL_EPSILON,
) -> dict[str, float]:
    """KL(real || synth) per feature; each feature gets its own shared bin edges."""
    return {
        name: kl_divergence_histogram(a, b, bins=bins, epsilon=epsilon)
        for name, (a, b) in _paired_columns(real, synth).items()
    }
