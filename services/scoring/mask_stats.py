"""Shape statistics of semantic mask sets and real-vs-synthetic comparisons (PriorPath).

PriorPath (coarse-to-fine mask generation) judges synthetic masks by how closely the
distribution of mask properties matches the real masks', with a two-sample
Kolmogorov-Smirnov test and a divergence next to FID. The paper does not list its features.
Here the unit of comparison is the OBJECT (a connected region of one class), not the mask:
every object of every mask of a set is measured, and per class the pooled object features of
the real set are compared with those of the synthetic set.

Object features (``OBJECT_FEATURES``, per object, skimage.measure.regionprops):

  area                 pixels
  perimeter            regionprops perimeter (4-neighbourhood contour estimate), pixels
  equivalent_diameter  diameter of the disc of the same area, pixels
  eccentricity         of the ellipse with the same second moments, [0, 1) (0 = circle)
  axis_ratio           minor / major axis length of that ellipse, [0, 1] (1 = round; 1 for a single pixel)
  solidity             area / convex hull area, (0, 1]
  extent               area / bounding box area, (0, 1]
  holes                enclosed background regions (Euler number = 1 - holes for one object)
  hole_fraction        hole pixels / (area + hole pixels), [0, 1)

Holes use the complementary connectivity (4-connected background for 8-connected objects and
vice versa), so a hole is what ``scipy.ndimage.binary_fill_holes`` would fill.

Image features (``IMAGE_FEATURES``, one value per mask and class, a separate small group):

  area_fraction        pixels of the class / all pixels (0 is a real value here)
  object_count         connected objects of the class, border-touching ones included

Choices, documented because they change the numbers:

* Background is not double-counted. In a binary mask the background is the complement of the
  foreground, so describing both says everything twice. Classes described by default are the
  foreground ids (everything but ``BACKGROUND_ID`` = 0) present in either set; background only
  when asked (``include_background`` or listing 0 in ``class_ids``).
* Objects touching the crop border are EXCLUDED from the object features by default: their shape
  is the crop's as much as the object's (cut area, straight perimeter, open holes). They are still
  counted (``border_objects``) and still in the image features. Large objects touch the border more
  often, so excluding them biases both sets towards small objects alike; compare sets of equal crop
  size. ``include_border_objects=True`` measures them as cut (useful when objects are large
  relative to the crop, e.g. tissue regions).
* A class with objects in one set and none in the other is reported with status
  ``missing_in_synthetic`` / ``missing_in_real`` and its object counts, never as zeros; it has no
  KS / JS and is left out of the means (the image features still compare it: area fraction 0 in
  every synthetic mask against > 0 in real ones gives KS = 1).
* Divergences use histograms on bins shared by both samples (``numpy.histogram_bin_edges`` over the
  pooled values, ``bins`` equal-width bins). Sizes and counts (``LOG_BINNED``) are binned on
  log(1 + x) because they span orders of magnitude (KS does not care: it is invariant to monotone
  maps). The headline is the Jensen-Shannon divergence in bits, in [0, 1], finite with empty bins
  (equal to ``scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2``). Also reported: KL(real ||
  synthetic) in nats with add-one (Laplace) smoothing of the bin counts, (count + 1) / (n + bins),
  finite and at most log((n_real + bins) * (n_synth + bins)) (its size depends on the sample sizes:
  prefer JS to compare across sets of different size).

Summary numbers: mean KS and mean JS over the object features, per class and over all compared
classes (each class weighs the same), the same for the image features, and object counts.
Sizes are in pixels, so compare masks of one resolution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import scipy.ndimage
import scipy.stats
import skimage.measure
from numpy.typing import ArrayLike, NDArray

from services.scoring.errors import ScoringInputError

FloatArray = NDArray[np.float64]

OBJECT_FEATURES: Final = (
    "area",
    "perimeter",
    "equivalent_diameter",
    "eccentricity",
    "axis_ratio",
    "solidity",
    "extent",
    "holes",
    "hole_fraction",
)
IMAGE_FEATURES: Final = ("area_fraction", "object_count")
# Binned on log(1 + x) for the divergences.
LOG_BINNED: Final = frozenset({"area", "perimeter", "equivalent_diameter", "holes", "object_count"})
BACKGROUND_ID: Final = 0
DEFAULT_BINS: Final = 20
MAX_BINS: Final = 10_000
# Above this many pairs, scipy's exact KS p-value is slow; the asymptotic one is accurate there.
_EXACT_KS_MAX_PAIRS: Final = 250_000

STATUS_COMPARED: Final = "compared"
STATUS_MISSING_IN_SYNTHETIC: Final = "missing_in_synthetic"
STATUS_MISSING_IN_REAL: Final = "missing_in_real"
STATUS_ABSENT: Final = "absent"

_STRUCTURES: Final = {
    4: scipy.ndimage.generate_binary_structure(2, 1),
    8: scipy.ndimage.generate_binary_structure(2, 2),
}
# Holes of an 8-connected object are 4-connected background regions, and vice versa.
_HOLE_STRUCTURES: Final = {4: _STRUCTURES[8], 8: _STRUCTURES[4]}


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in _STRUCTURES:
        raise ScoringInputError(f"connectivity must be one of {sorted(_STRUCTURES)}, got {connectivity}")


def _as_class_map(mask: ArrayLike) -> NDArray[Any]:
    labels = np.asarray(mask)
    if labels.ndim != 2 or labels.size == 0:
        raise ScoringInputError(f"mask must be a non-empty 2-D class map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise ScoringInputError(f"mask must hold integer class ids, got dtype {labels.dtype}")
    return labels


def describe_class_ids(
    present: Iterable[int], class_ids: Sequence[int] = (), include_background: bool = False,
    background_id: int = BACKGROUND_ID,
) -> tuple[int, ...]:
    """The classes to describe: ``class_ids`` as given when not empty, else every id in ``present``
    except the background; ``include_background`` adds the background either way."""
    ids = [int(c) for c in class_ids]
    if len(set(ids)) != len(ids):
        raise ScoringInputError(f"class_ids {ids} lists a class twice")
    if not ids:
        ids = sorted({int(c) for c in present} - {background_id})
    if include_background and background_id not in ids:
        ids = [background_id, *ids]
    return tuple(ids)


# ------------------------------------------------------------------------------ features


def _holes(image: NDArray[np.bool_], connectivity: int) -> tuple[int, int]:
    """(number of holes, hole pixels) of one object given as its bounding-box image."""
    outside = np.pad(~image, 1, constant_values=True)
    regions, count = scipy.ndimage.label(outside, structure=_HOLE_STRUCTURES[connectivity])
    if count <= 1:
        return 0, 0
    hole_pixels = int(np.count_nonzero((regions > 0) & (regions != regions[0, 0])))
    return count - 1, hole_pixels


def _second_moments(components: NDArray[np.int32], count: int) -> tuple[FloatArray, FloatArray]:
    """Per label 1..count: eigenvalues (largest, smallest) of the pixel-coordinate covariance, i.e. of
    regionprops' inertia tensor, for all objects at once (regionprops computes them one object at a time)."""
    rows, cols = np.nonzero(components)
    label = components[rows, cols]
    n = np.bincount(label, minlength=count + 1)[1:].astype(np.float64)

    def mean(values: NDArray[Any]) -> FloatArray:
        return np.bincount(label, weights=values.astype(np.float64), minlength=count + 1)[1:] / n

    # Two passes (centre, then average the products): no cancellation, and symmetric shapes come out exact.
    dr = rows - mean(rows)[label - 1]
    dc = cols - mean(cols)[label - 1]
    var_r, var_c, cov = mean(dr * dr), mean(dc * dc), mean(dr * dc)
    half_trace = 0.5 * (var_r + var_c)
    root = np.sqrt(np.maximum(0.25 * (var_r - var_c) ** 2 + cov**2, 0.0))
    return half_trace + root, np.maximum(half_trace - root, 0.0)


def _object_row(region: Any, largest: float, smallest: float, connectivity: int) -> list[float]:
    area = float(region.area)
    holes, hole_pixels = _holes(region.image, connectivity)
    top, left, bottom, right = region.bbox
    return [
        area,
        float(region.perimeter),
        math.sqrt(4.0 * area / math.pi),
        math.sqrt(1.0 - smallest / largest) if largest > 0.0 else 0.0,
        math.sqrt(smallest / largest) if largest > 0.0 else 1.0,
        float(region.solidity),
        area / ((bottom - top) * (right - left)),
        float(holes),
        hole_pixels / (area + hole_pixels),
    ]


@dataclass(frozen=True)
class MaskObjects:
    """The objects of one class in one mask."""

    values: FloatArray  # [kept objects, len(OBJECT_FEATURES)]
    objects: int  # connected objects of the class, border-touching ones included
    border_objects: int  # of those, touching the mask border
    area_fraction: float


def mask_objects(
    mask: ArrayLike, class_id: int, connectivity: int = 8, include_border_objects: bool = False
) -> MaskObjects:
    """Object features (columns ``OBJECT_FEATURES``) of every object of ``class_id`` in one [H, W] map."""
    labels = _as_class_map(mask)
    _check_connectivity(connectivity)
    is_class = labels == class_id
    components, count = scipy.ndimage.label(is_class, structure=_STRUCTURES[connectivity])
    height, width = labels.shape
    rows: list[list[float]] = []
    border = 0
    if count:
        largest, smallest = _second_moments(components, count)
    for index, region in enumerate(skimage.measure.regionprops(components)):
        top, left, bottom, right = region.bbox
        if top == 0 or left == 0 or bottom == height or right == width:
            border += 1
            if not include_border_objects:
                continue
        rows.append(_object_row(region, float(largest[index]), float(smallest[index]), connectivity))
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(OBJECT_FEATURES))
    return MaskObjects(values, int(count), border, float(np.count_nonzero(is_class)) / labels.size)


@dataclass
class ClassFeatures:
    """One class over a set of masks: pooled object features and per-mask image features."""

    class_id: int
    objects: FloatArray  # [kept objects over all masks, len(OBJECT_FEATURES)]
    image: FloatArray  # [masks, len(IMAGE_FEATURES)]
    total_objects: int  # all objects, border-touching included
    border_objects: int
    masks_with_class: int

    @property
    def kept_objects(self) -> int:
        return int(self.objects.shape[0])

    def object_column(self, feature: str) -> FloatArray:
        return self.objects[:, _index(OBJECT_FEATURES, feature)]

    def image_column(self, feature: str) -> FloatArray:
        return self.image[:, _index(IMAGE_FEATURES, feature)]


def _index(names: Sequence[str], feature: str) -> int:
    try:
        return list(names).index(feature)
    except ValueError:
        raise ScoringInputError(f"unknown feature {feature!r}; valid: {list(names)}") from None


@dataclass
class MaskSetFeatures:
    """Features of a set of masks, per described class."""

    classes: dict[int, ClassFeatures]
    masks: int
    connectivity: int
    include_border_objects: bool

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(self.classes)


def mask_set_features(
    masks: Iterable[ArrayLike], class_ids: Sequence[int], connectivity: int = 8,
    include_border_objects: bool = False,
) -> MaskSetFeatures:
    """Features of every mask, pooled per class; masks may be a generator (one in memory at a time).

    ``class_ids`` are described as given (see ``describe_class_ids`` for the default choice).
    """
    _check_connectivity(connectivity)
    if len(class_ids) == 0 or len({int(c) for c in class_ids}) != len(class_ids):
        raise ScoringInputError(f"class_ids must be non-empty and distinct, got {list(class_ids)}")
    ids = [int(c) for c in class_ids]
    objects: dict[int, list[FloatArray]] = {c: [] for c in ids}
    image: dict[int, list[tuple[float, float]]] = {c: [] for c in ids}
    totals = {c: [0, 0, 0] for c in ids}  # objects, border objects, masks with the class
    count = 0
    for mask in masks:
        count += 1
        for c in ids:
            found = mask_objects(mask, c, connectivity, include_border_objects)
            objects[c].append(found.values)
            image[c].append((found.area_fraction, float(found.objects)))
            totals[c][0] += found.objects
            totals[c][1] += found.border_objects
            totals[c][2] += int(found.objects > 0)
    if count == 0:
        raise ScoringInputError("mask_set_features needs at least one mask")
    classes = {
        c: ClassFeatures(
            class_id=c,
            objects=np.concatenate(objects[c]) if objects[c] else np.zeros((0, len(OBJECT_FEATURES))),
            image=np.asarray(image[c], dtype=np.float64),
            total_objects=totals[c][0],
            border_objects=totals[c][1],
            masks_with_class=totals[c][2],
        )
        for c in ids
    }
    return MaskSetFeatures(classes, count, connectivity, include_border_objects)


def pool_mask_set_features(parts: Sequence[MaskSetFeatures]) -> MaskSetFeatures:
    """Features of the union of mask sets (per-mask features pooled as mask_set_features pools them): a bootstrap
    over masks resamples per-mask features instead of measuring every object again."""
    if not parts:
        raise ScoringInputError("pool_mask_set_features needs at least one feature set")
    first = parts[0]
    for part in parts[1:]:
        if (part.class_ids, part.connectivity, part.include_border_objects) != (
                first.class_ids, first.connectivity, first.include_border_objects):
            raise ScoringInputError("pooled feature sets must share class ids, connectivity and border handling")
    classes = {
        c: ClassFeatures(
            class_id=c,
            objects=np.concatenate([part.classes[c].objects for part in parts]),
            image=np.concatenate([part.classes[c].image for part in parts]),
            total_objects=sum(part.classes[c].total_objects for part in parts),
            border_objects=sum(part.classes[c].border_objects for part in parts),
            masks_with_class=sum(part.classes[c].masks_with_class for part in parts),
        )
        for c in first.class_ids
    }
    return MaskSetFeatures(classes, sum(part.masks for part in parts), first.connectivity,
                           first.include_border_objects)


# --------------------------------------------------------------------------- two samples


def _samples(a: ArrayLike, b: ArrayLike, what: str) -> tuple[FloatArray, FloatArray]:
    xa = np.asarray(a, dtype=np.float64).ravel()
    xb = np.asarray(b, dtype=np.float64).ravel()
    if xa.size == 0 or xb.size == 0:
        raise ScoringInputError(f"{what} needs two non-empty samples, got sizes {xa.size} and {xb.size}")
    if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        raise ScoringInputError(f"{what}: samples contain NaN or infinite values")
    return xa, xb


def ks_statistic(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sample KS statistic: the largest gap between the two empirical CDFs.

    Both CDFs only jump at sample values, so evaluating them (right-continuous) at every
    pooled value finds the supremum.
    """
    xa, xb = _samples(a, b, "KS")
    xa, xb = np.sort(xa), np.sort(xb)
    pooled = np.concatenate([xa, xb])
    cdf_a = np.searchsorted(xa, pooled, side="right") / xa.size
    cdf_b = np.searchsorted(xb, pooled, side="right") / xb.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_pvalue(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sided p-value of scipy.stats.ks_2samp (exact for small samples, asymptotic for large)."""
    xa, xb = _samples(a, b, "KS")
    method = "auto" if xa.size * xb.size <= _EXACT_KS_MAX_PAIRS else "asymp"
    return float(scipy.stats.ks_2samp(xa, xb, alternative="two-sided", method=method).pvalue)


def shared_histograms(
    a: ArrayLike, b: ArrayLike, bins: int = DEFAULT_BINS, log: bool = False
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Bin counts of both samples on ``bins`` equal-width bins over the pooled range (of log(1 + x)
    when ``log``; values must then be >= 0)."""
    xa, xb = _samples(a, b, "a histogram comparison")
    if not 1 <= int(bins) <= MAX_BINS:
        raise ScoringInputError(f"bins must be in [1, {MAX_BINS}], got {bins}")
    if log:
        if min(xa.min(), xb.min()) < 0.0:
            raise ScoringInputError("log binning needs values >= 0")
        xa, xb = np.log1p(xa), np.log1p(xb)
    edges = np.histogram_bin_edges(np.concatenate([xa, xb]), bins=int(bins))
    return np.histogram(xa, bins=edges)[0], np.histogram(xb, bins=edges)[0]


def js_divergence_counts(p_counts: ArrayLike, q_counts: ArrayLike) -> float:
    """Jensen-Shannon divergence in bits of two histograms (counts), in [0, 1]; empty bins cost nothing
    extra (0 log 0 = 0)."""
    p = np.asarray(p_counts, dtype=np.float64)
    q = np.asarray(q_counts, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl_to_m(x: FloatArray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return float(min(max(0.5 * kl_to_m(p) + 0.5 * kl_to_m(q), 0.0), 1.0))


def kl_smoothed_counts(p_counts: ArrayLike, q_counts: ArrayLike) -> float:
    """KL(p || q) in nats after add-one (Laplace) smoothing of both count histograms."""
    p = np.asarray(p_counts, dtype=np.float64) + 1.0
    q = np.asarray(q_counts, dtype=np.float64) + 1.0
    p, q = p / p.sum(), q / q.sum()
    return float(max(np.sum(p * np.log(p / q)), 0.0))


def js_divergence(a: ArrayLike, b: ArrayLike, bins: int = DEFAULT_BINS, log: bool = False) -> float:
    """JS divergence (bits, [0, 1]) of two samples on shared bins (``shared_histograms``)."""
    return js_divergence_counts(*shared_histograms(a, b, bins, log))


def kl_smoothed(a: ArrayLike, b: ArrayLike, bins: int = DEFAULT_BINS, log: bool = False) -> float:
    """Add-one smoothed KL(a || b) in nats of two samples on shared bins."""
    return kl_smoothed_counts(*shared_histograms(a, b, bins, log))


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class FeatureComparison:
    group: str  # "object" (pooled objects) or "image" (one value per mask)
    class_id: int
    feature: str
    ks_statistic: float  # sup |F_real - F_synth|, [0, 1]
    ks_pvalue: float
    js_divergence: float  # bits, [0, 1] (headline divergence)
    kl_smoothed: float  # KL(real || synthetic), nats, add-one smoothed counts
    real_n: int
    synthetic_n: int
    real_mean: float
    synthetic_mean: float

    @property
    def name(self) -> str:
        return f"{self.group}/{self.feature}/class_{self.class_id}"


def compare_feature(
    group: str, class_id: int, feature: str, real: ArrayLike, synthetic: ArrayLike, bins: int = DEFAULT_BINS
) -> FeatureComparison:
    a, b = _samples(real, synthetic, f"{group}/{feature}/class_{class_id}")
    p, q = shared_histograms(a, b, bins, log=feature in LOG_BINNED)
    return FeatureComparison(
        group=group, class_id=class_id, feature=feature,
        ks_statistic=ks_statistic(a, b), ks_pvalue=ks_pvalue(a, b),
        js_divergence=js_divergence_counts(p, q), kl_smoothed=kl_smoothed_counts(p, q),
        real_n=int(a.size), synthetic_n=int(b.size), real_mean=float(a.mean()), synthetic_mean=float(b.mean()),
    )


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class ClassComparison:
    class_id: int
    status: str  # STATUS_*: compared | missing_in_synthetic | missing_in_real | absent (no kept objects in either)
    real_objects: int  # kept objects (the object features' sample size)
    synthetic_objects: int
    real_border_objects: int  # touching the border (excluded unless include_border_objects)
    synthetic_border_objects: int
    real_masks_with_class: int
    synthetic_masks_with_class: int
    objects: tuple[FeatureComparison, ...]  # empty unless status == compared
    image: tuple[FeatureComparison, ...]

    @property
    def mean_ks(self) -> float | None:
        return _mean(f.ks_statistic for f in self.objects)

    @property
    def mean_js(self) -> float | None:
        return _mean(f.js_divergence for f in self.objects)

    @property
    def image_mean_ks(self) -> float | None:
        return _mean(f.ks_statistic for f in self.image)

    @property
    def image_mean_js(self) -> float | None:
        return _mean(f.js_divergence for f in self.image)


def _status(real_objects: int, synthetic_objects: int) -> str:
    if real_objects and synthetic_objects:
        return STATUS_COMPARED
    if real_objects:
        return STATUS_MISSING_IN_SYNTHETIC
    if synthetic_objects:
        return STATUS_MISSING_IN_REAL
    return STATUS_ABSENT


@dataclass(frozen=True)
class MaskSetComparison:
    classes: tuple[ClassComparison, ...]
    real_masks: int
    synthetic_masks: int
    bins: int
    connectivity: int
    include_border_objects: bool
    background_id: int = BACKGROUND_ID

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(c.class_id for c in self.classes)

    @property
    def object_features(self) -> tuple[FeatureComparison, ...]:
        return tuple(f for c in self.classes for f in c.objects)

    @property
    def image_features(self) -> tuple[FeatureComparison, ...]:
        return tuple(f for c in self.classes for f in c.image)

    @property
    def features(self) -> tuple[FeatureComparison, ...]:
        return self.object_features + self.image_features

    @property
    def compared_classes(self) -> tuple[int, ...]:
        return tuple(c.class_id for c in self.classes if c.status == STATUS_COMPARED)

    @property
    def missing_classes(self) -> tuple[int, ...]:
        return tuple(c.class_id for c in self.classes
                     if c.status in (STATUS_MISSING_IN_SYNTHETIC, STATUS_MISSING_IN_REAL))

    @property
    def mean_ks(self) -> float | None:
        """Mean KS over the object features of the compared classes (None when none is compared)."""
        return _mean(f.ks_statistic for f in self.object_features)

    @property
    def mean_js(self) -> float | None:
        return _mean(f.js_divergence for f in self.object_features)

    @property
    def image_mean_ks(self) -> float | None:
        return _mean(f.ks_statistic for f in self.image_features)

    @property
    def image_mean_js(self) -> float | None:
        return _mean(f.js_divergence for f in self.image_features)

    @property
    def real_objects(self) -> int:
        return sum(c.real_objects for c in self.classes)

    @property
    def synthetic_objects(self) -> int:
        return sum(c.synthetic_objects for c in self.classes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary numbers, per class status / counts / means, and every comparison by
        name under ``per_feature`` (None, never NaN, for a mean over nothing)."""
        return {
            "mean_ks": self.mean_ks, "mean_js": self.mean_js,
            "image_mean_ks": self.image_mean_ks, "image_mean_js": self.image_mean_js,
            "real_count": self.real_masks, "synthetic_count": self.synthetic_masks,
            "real_objects": self.real_objects, "synthetic_objects": self.synthetic_objects,
            "compared_classes": list(self.compared_classes), "missing_classes": list(self.missing_classes),
            "features_ks_p_below_0.05": int(sum(f.ks_pvalue < 0.05 for f in self.object_features)),
            "bins": self.bins, "connectivity": self.connectivity,
            "include_border_objects": self.include_border_objects,
            "classes": {
                str(c.class_id): {
                    "status": c.status, "real_objects": c.real_objects, "synthetic_objects": c.synthetic_objects,
                    "real_border_objects": c.real_border_objects,
                    "synthetic_border_objects": c.synthetic_border_objects,
                    "real_masks_with_class": c.real_masks_with_class,
                    "synthetic_masks_with_class": c.synthetic_masks_with_class,
                    "mean_ks": c.mean_ks, "mean_js": c.mean_js,
                    "image_mean_ks": c.image_mean_ks, "image_mean_js": c.image_mean_js,
                }
                for c in self.classes
            },
            "per_feature": {
                f.name: {"group": f.group, "class_id": f.class_id, "feature": f.feature, "ks": f.ks_statistic,
                         "ks_p": f.ks_pvalue, "js": f.js_divergence, "kl_smoothed": f.kl_smoothed,
                         "real_n": f.real_n, "synthetic_n": f.synthetic_n, "real_mean": f.real_mean,
                         "synthetic_mean": f.synthetic_mean}
                for f in self.features
            },
        }


def compare_mask_sets(real: MaskSetFeatures, synthetic: MaskSetFeatures, bins: int = DEFAULT_BINS) -> MaskSetComparison:
    """Per class: KS / JS / smoothed KL of the pooled object features and of the image features."""
    if real.class_ids != synthetic.class_ids:
        raise ScoringInputError(f"real classes {list(real.class_ids)} differ from synthetic {list(synthetic.class_ids)}")
    if (real.connectivity, real.include_border_objects) != (synthetic.connectivity, synthetic.include_border_objects):
        raise ScoringInputError("real and synthetic features were measured with different connectivity / border rules")
    if not 1 <= int(bins) <= MAX_BINS:
        raise ScoringInputError(f"bins must be in [1, {MAX_BINS}], got {bins}")
    classes = []
    for c in real.class_ids:
        r, s = real.classes[c], synthetic.classes[c]
        status = _status(r.kept_objects, s.kept_objects)
        objects = tuple(
            compare_feature("object", c, name, r.object_column(name), s.object_column(name), bins)
            for name in OBJECT_FEATURES
        ) if status == STATUS_COMPARED else ()
        image = tuple(
            compare_feature("image", c, name, r.image_column(name), s.image_column(name), bins)
            for name in IMAGE_FEATURES
        )
        classes.append(ClassComparison(
            class_id=c, status=status, real_objects=r.kept_objects, synthetic_objects=s.kept_objects,
            real_border_objects=r.border_objects, synthetic_border_objects=s.border_objects,
            real_masks_with_class=r.masks_with_class, synthetic_masks_with_class=s.masks_with_class,
            objects=objects, image=image,
        ))
    return MaskSetComparison(tuple(classes), real.masks, synthetic.masks, int(bins), real.connectivity,
                             real.include_border_objects)


def score_mask_sets(
    real: Iterable[ArrayLike],
    synthetic: Iterable[ArrayLike],
    class_ids: Sequence[int] = (),
    *,
    connectivity: int = 8,
    include_background: bool = False,
    include_border_objects: bool = False,
    bins: int = DEFAULT_BINS,
) -> MaskSetComparison:
    """Everything at once for in-memory mask lists / [N, H, W] arrays; see the module docstring."""
    real_list, synthetic_list = list(real), list(synthetic)
    present: set[int] = set()
    for mask in (*real_list, *synthetic_list):
        present.update(np.unique(_as_class_map(mask)).tolist())
    ids = describe_class_ids(present, class_ids, include_background)
    if not ids:
        raise ScoringInputError(
            f"no class to describe: both sets hold only the background ({BACKGROUND_ID}); "
            "pass class_ids or include_background"
        )
    real_features = mask_set_features(real_list, ids, connectivity, include_border_objects)
    synthetic_features = mask_set_features(synthetic_list, ids, connectivity, include_border_objects)
    return compare_mask_sets(real_features, synthetic_features, bins)
