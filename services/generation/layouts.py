"""Procedural coarse layouts: seeded class maps that hit requested class area fractions.

A layout is the semantic "scene" a renderer paints: a uint8 class-id map (ids index the
renderer's ``class_names``) plus, for nucleus tissues, a uint16 instance map. Three
generators, one per tissue (see :data:`LAYOUT_GENERATORS`):

* ``glands``  — region classes (gland, then non-tissue) ranked by their own smooth fields,
  each taking exactly the top ``fraction * H * W`` free pixels, so a larger target grows
  the same regions and the achieved fraction equals the target up to rounding. Glands are
  blobs (sums of random anisotropic Gaussian bumps, edges roughened by noise) kept apart by
  thin seams, with a central non-tissue lumen (renderer-he-glands' rule: grayscale >= 204
  wins over gland); the rest of non-tissue enters from one border and opens small holes in
  the stroma (only the smooth border region in a ``coarse`` layout, the refiner's input).
  The filler class (``stroma`` if present, else class 0) takes what is left. Roles come
  from class names.
* ``nuclei``  — typed nuclei drawn one by one as small ellipses (per-type size and
  elongation taken from CoNSeP statistics), sampled from per-type clustered densities,
  added until each type's area fraction reaches its target.
* ``ihc``     — Ki67-style negative/positive nuclei (+ a ``boundary`` ring class when the
  renderer has one). With ``positive_proportion`` set, the count of positive nuclei is
  chosen so positives / all nuclei equals the target (count based, like a TPS / Ki67
  index); positives are the nuclei in the hottest spots of a smooth field, so they cluster.

Every generator verifies what it produced against its targets (``tolerance``, absolute)
and retries with fresh randomness from the same generator; :class:`LayoutError` says
which class missed by how much when every attempt failed. Same seed -> same layout:
only numpy's PCG64 and deterministic OpenCV drawing are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import cv2
import numpy as np

from services.core.errors import InvalidInputError

# Names that mark roles inside a renderer's class_names (lower-cased, substring match).
_NON_TISSUE_WORDS: Final = ("non-tissue", "non_tissue", "nontissue", "air")
_FILLER_WORDS: Final = ("stroma",)
_POSITIVE_WORDS: Final = ("positive",)
_NEGATIVE_WORDS: Final = ("negative",)
_BOUNDARY_WORDS: Final = ("boundary", "membrane")

MAX_ATTEMPTS: Final = 8


class LayoutError(InvalidInputError):
    """The requested fractions could not be met (impossible combination or every attempt missed)."""


@dataclass(frozen=True)
class NucleusShape:
    """Size of one nucleus type: mean area in px and the major/minor axis ratio."""

    mean_area_px: float
    elongation: float
    area_jitter: float = 0.35  # relative std of the area


# Per-type nucleus shapes at 40x, medians measured on CoNSeP patches (other 70 px,
# inflammatory 178, epithelial 286, spindle 159 and elongated); used by substring match.
NUCLEUS_SHAPES: Final[Mapping[str, NucleusShape]] = {
    "inflammatory": NucleusShape(mean_area_px=170.0, elongation=1.15, area_jitter=0.25),
    "epithelial": NucleusShape(mean_area_px=290.0, elongation=1.4),
    "spindle": NucleusShape(mean_area_px=160.0, elongation=3.2),
    "other": NucleusShape(mean_area_px=90.0, elongation=1.6),
}
# Generic nucleus (MoNuSeg "nucleus", or any unknown type name).
DEFAULT_NUCLEUS_SHAPE: Final = NucleusShape(mean_area_px=200.0, elongation=1.4)
# DeepLIIF Ki67 nuclei at 40x are larger (median connected component ~600 px at 512x512).
IHC_NUCLEUS_SHAPE: Final = NucleusShape(mean_area_px=420.0, elongation=1.3)


@dataclass(frozen=True)
class LayoutTargets:
    """What one layout must achieve.

    ``class_fractions``: area fraction of the whole image per class name (already drawn
    from any range). ``positive_proportion``: IHC only, positive nuclei / all nuclei
    (count based); ``positive_range`` is the closed interval the achieved proportion must
    fall in (a TPS/Ki67 bin) — when None, ``tolerance`` around the target applies.
    ``nuclear_fraction``: with ``positive_proportion``, the area fraction of all nuclei.
    """

    class_fractions: Mapping[str, float]
    tolerance: float
    positive_proportion: float | None = None
    positive_range: tuple[float, float] | None = None
    nuclear_fraction: float | None = None  # IHC with positive_proportion: all nuclei's area fraction


@dataclass(frozen=True)
class Layout:
    """A generated (or client-supplied) layout and what it achieved."""

    class_map: np.ndarray  # uint8 [H, W] class ids
    instances: np.ndarray | None  # uint16 [H, W] instance ids, 0 = none; None for region tissues
    achieved_fractions: dict[str, float]  # area fraction per class name (all classes)
    positive_proportion: float | None = None  # positives / nuclei, count based (IHC)
    nucleus_counts: dict[str, int] = field(default_factory=dict)
    attempts: int = 1


def class_fractions_of(class_map: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Area fraction of every class name in a class-id map."""
    counts = np.bincount(class_map.ravel(), minlength=len(class_names))
    total = float(class_map.size)
    return {name: float(counts[index]) / total for index, name in enumerate(class_names)}


def _find_class(class_names: Sequence[str], words: Sequence[str]) -> int | None:
    for index, name in enumerate(class_names):
        lowered = name.lower()
        if any(word in lowered for word in words):
            return index
    return None


def _find_classes(class_names: Sequence[str], words: Sequence[str]) -> list[int]:
    return [i for i, n in enumerate(class_names) if any(w in n.lower() for w in words)]


def _check_known(class_fractions: Mapping[str, float], class_names: Sequence[str]) -> None:
    unknown = sorted(set(class_fractions) - set(class_names))
    if unknown:
        raise LayoutError(f"unknown class name(s) {unknown}; this renderer's classes are {list(class_names)}")


# --------------------------------------------------------------------------- fields
def smooth_field(rng: np.random.Generator, height: int, width: int, scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std random field whose features are about ``scale_px`` wide.

    White noise on a coarse grid upsampled with bicubic interpolation: far cheaper than
    blurring full-resolution noise with a wide kernel, and deterministic.
    """
    grid_h = max(2, int(math.ceil(height / scale_px)) + 1)
    grid_w = max(2, int(math.ceil(width / scale_px)) + 1)
    coarse = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
    fine = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    fine -= fine.mean()
    std = float(fine.std())
    return fine / std if std > 0 else fine


def blob_field(
    rng: np.random.Generator, height: int, width: int, count: int, size_px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(field, seams, centrality): a sum of ``count`` random anisotropic Gaussian bumps roughened
    by smooth noise; the 2-3 px seams where the strongest bump changes; and the strongest
    bump's unit-peak profile (1 at every blob centre), which places lumens.

    Thresholding the field at a growing level yields elliptical blobs that grow with the
    requested area; keeping the seams out keeps neighbouring glands apart, as GlaS glands
    are separated by thin stroma, instead of merging into one sheet.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    total = np.zeros((height, width), np.float32)
    strongest = np.zeros((height, width), np.float32)
    owner = np.zeros((height, width), np.int32)
    for index in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma_major = size_px * rng.uniform(0.6, 1.4)
        sigma_minor = sigma_major * rng.uniform(0.45, 0.9)
        angle = rng.uniform(0, math.pi)
        cos, sin = math.cos(angle), math.sin(angle)
        du, dv = (xx - cx) * cos + (yy - cy) * sin, -(xx - cx) * sin + (yy - cy) * cos
        profile = np.exp(-0.5 * ((du / sigma_major) ** 2 + (dv / sigma_minor) ** 2))
        total += profile * rng.uniform(0.7, 1.0)
        stronger = profile > strongest
        owner[stronger] = index
        strongest[stronger] = profile[stronger]
    seams = np.zeros((height, width), np.uint8)
    seams[:, 1:] |= (owner[:, 1:] != owner[:, :-1]).astype(np.uint8)
    seams[1:, :] |= (owner[1:, :] != owner[:-1, :]).astype(np.uint8)
    seams = cv2.dilate(seams, np.ones((2, 2), np.uint8)).astype(bool)
    # Multiplicative noise roughens blob edges without seeding specks far from any blob.
    return total * np.exp(0.15 * smooth_field(rng, height, width, size_px / 1.5)), seams, strongest


def take_top(field_values: np.ndarray, eligible: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` eligible pixels with the highest field values."""
    chosen = np.zeros(field_values.shape, bool)
    flat_eligible = np.flatnonzero(eligible)
    if count <= 0 or flat_eligible.size == 0:
        return chosen
    count = min(count, flat_eligible.size)
    values = field_values.ravel()[flat_eligible]
    # argpartition is exact and deterministic: the achieved pixel count equals `count`.
    top = flat_eligible[np.argpartition(-values, count - 1)[:count]]
    chosen.ravel()[top] = True
    return chosen


# --------------------------------------------------------------------------- glands
def glands_layout(
    class_names: Sequence[str],
    height: int,
    width: int,
    targets: LayoutTargets,
    rng: np.random.Generator,
    *,
    coarse: bool = False,
) -> Layout:
    """Region layout: gland (and any other region class), then non-tissue, then filler (stroma).

    Follows renderer-he-glands' class rule (non-tissue = grayscale >= 204, winning over
    gland): glands are blobs of epithelium around a central lumen of non-tissue, kept apart
    by thin stroma seams. The rest of the non-tissue target (glass, air, white gaps) enters
    from one border and, unless ``coarse``, also opens small holes through the stroma; a
    ``coarse`` layout keeps only the smooth region, like the refiner's training input.
    """
    _check_known(targets.class_fractions, class_names)
    filler = _find_class(class_names, _FILLER_WORDS)
    filler = 0 if filler is None else filler
    non_tissue = set(_find_classes(class_names, _NON_TISSUE_WORDS)) - {filler}
    region_classes = [i for i in range(len(class_names)) if i != filler]
    # Glands first (solid, GlaS-style), then non-tissue in what is left, so holes open in stroma only.
    region_classes.sort(key=lambda i: (i in non_tissue, i))
    total = height * width
    filler_target = targets.class_fractions.get(class_names[filler])
    wanted = dict(targets.class_fractions)
    region_sum = sum(wanted.get(class_names[i], 0.0) for i in region_classes)
    if region_sum + (filler_target or 0.0) > 1.0 + 1e-9:
        raise LayoutError(f"class fractions sum to {region_sum + (filler_target or 0.0):.3f} > 1 in {wanted}")
    if filler_target is not None:
        # A filler target fixes what the first untargeted tissue class gets (e.g. only
        # {"background": 0.6} with [background, gland] means gland 0.4).
        open_classes = [i for i in region_classes if class_names[i] not in wanted and i not in non_tissue]
        if open_classes:
            wanted[class_names[open_classes[0]]] = max(0.0, 1.0 - filler_target - region_sum)

    lumen_class = min(non_tissue) if non_tissue else None
    gland_classes = {i for i in region_classes if "gland" in class_names[i].lower()}
    last_error = ""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        class_map = np.full((height, width), filler, np.uint8)
        free = np.ones((height, width), bool)
        # Lumens are non-tissue inside glands, so they spend the non-tissue budget first.
        lumen_budget = 0 if lumen_class is None else int(round(wanted.get(class_names[lumen_class], 0.0) * total))
        for index in region_classes:
            fraction = wanted.get(class_names[index], 0.0)
            pixels = int(round(fraction * total))
            if index == lumen_class:
                pixels = max(0, pixels - int(np.count_nonzero(class_map == lumen_class)))
            if pixels == 0:
                continue
            if index in non_tissue:
                # Air enters from a border: a low-frequency field plus a ramp from one edge.
                ramp_axis = rng.integers(0, 4)
                ramp = np.linspace(1.0, -1.0, width if ramp_axis < 2 else height, dtype=np.float32)
                ramp = ramp if ramp_axis % 2 == 0 else ramp[::-1]
                ramp2d = ramp[None, :] if ramp_axis < 2 else ramp[:, None]
                values = 1.5 * ramp2d + smooth_field(rng, height, width, min(height, width) / 2.5)
                if not coarse:
                    values = values + 0.7 * smooth_field(rng, height, width, 6.0)
            else:
                size = math.sqrt(total) * rng.uniform(0.07, 0.12)
                count = max(3, int(round(1.3 * total * max(fraction, 0.15) / (math.pi * (1.6 * size) ** 2))) + 1)
                values, seams, centrality = blob_field(rng, height, width, count, size)
                # Seams stay stroma unless the target needs more pixels than the rest offers.
                if pixels <= int((free & ~seams).sum()):
                    values = np.where(seams, np.float32(-np.inf), values)
                if index in gland_classes and lumen_class is not None and lumen_budget > 0:
                    # GlaS glands hold a white lumen (median 12 % of the gland region), which the
                    # renderer's class rule labels non-tissue: blobs of pixels / (1 - share), the
                    # most central pixels of each blob becoming lumen.
                    share = min(float(rng.uniform(0.05, 0.25)), lumen_budget / (pixels + lumen_budget))
                    outer = take_top(values, free, int(round(pixels / (1.0 - share))))
                    lumens = take_top(centrality, outer, int(outer.sum()) - pixels)
                    class_map[outer] = index
                    class_map[lumens] = lumen_class
                    lumen_budget -= int(lumens.sum())
                    free &= ~outer
                    continue
            chosen = take_top(values, free, pixels)
            class_map[chosen] = index
            free &= ~chosen
        achieved = class_fractions_of(class_map, class_names)
        errors = {name: abs(achieved[name] - target) for name, target in wanted.items()}
        worst = max(errors.items(), key=lambda kv: kv[1], default=("", 0.0))
        if worst[1] <= targets.tolerance:
            instances = region_instances(class_map, [i for i in region_classes if i not in non_tissue])
            return Layout(class_map=class_map, instances=instances, achieved_fractions=achieved, attempts=attempt)
        last_error = (
            f"class {worst[0]!r}: achieved {achieved[worst[0]]:.4f} vs target "
            f"{wanted[worst[0]]:.4f} (tolerance {targets.tolerance})"
        )
    raise LayoutError(f"glands layout missed its targets after {MAX_ATTEMPTS} attempts: {last_error}")


def region_instances(class_map: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """uint16 instance map: 8-connected components of each listed class (GlaS's gland instances)."""
    instances = np.zeros(class_map.shape, np.uint16)
    next_id = 1
    for cls in class_ids:
        count, labels = cv2.connectedComponents((class_map == cls).astype(np.uint8), connectivity=8)
        if count > 1:
            body = labels > 0
            instances[body] = (labels[body] + next_id - 1).astype(np.uint16)
            next_id += count - 1
    return instances


def gland_region_classes(class_names: Sequence[str]) -> list[int]:
    """Region classes of a glands layout that form instances (not the filler, not non-tissue)."""
    filler = _find_class(class_names, _FILLER_WORDS)
    filler = 0 if filler is None else filler
    non_tissue = set(_find_classes(class_names, _NON_TISSUE_WORDS))
    return [i for i in range(len(class_names)) if i != filler and i not in non_tissue]


# --------------------------------------------------------------------------- nuclei
def _shape_for(name: str, default: NucleusShape) -> NucleusShape:
    lowered = name.lower()
    for word, shape in NUCLEUS_SHAPES.items():
        if word in lowered:
            return shape
    return default


def _density_sampler(
    rng: np.random.Generator, height: int, width: int, clustering: float
) -> Callable[[int], np.ndarray]:
    """Returns a function drawing (y, x) centres from a clustered density.

    The density is exp(clustering * smooth field) on an 8-px grid: clustering 0 gives
    uniform placement, ~2 gives tight groups (epithelium), which looks like tissue.
    """
    cell = 8
    grid_h, grid_w = max(1, height // cell), max(1, width // cell)
    log_density = clustering * smooth_field(rng, grid_h, grid_w, max(2.0, min(grid_h, grid_w) / 3.0))
    density = np.exp(log_density - log_density.max()).ravel().astype(np.float64)
    probabilities = density / density.sum()

    def draw(n: int) -> np.ndarray:
        cells = rng.choice(probabilities.size, size=n, p=probabilities)
        ys = (cells // grid_w) * (height / grid_h) + rng.uniform(0, height / grid_h, n)
        xs = (cells % grid_w) * (width / grid_w) + rng.uniform(0, width / grid_w, n)
        return np.stack([ys, xs], axis=1)

    return draw


def _place_nuclei(
    rng: np.random.Generator,
    height: int,
    width: int,
    area_targets: Mapping[int, float],
    shapes: Mapping[int, NucleusShape],
    clustering: Mapping[int, float],
    instances: np.ndarray,
    class_map: np.ndarray,
    allowed: np.ndarray | None = None,
) -> None:
    """Adds ellipse nuclei per class until each class's area (px) reaches its target.

    A nucleus may overlap existing ones by at most 15% of its area; overlapping pixels
    keep their first owner, so instance and class maps stay consistent. Classes take
    turns by largest remaining deficit so mixed types interleave spatially.
    """
    remaining = {c: float(a) for c, a in area_targets.items() if a > 0}
    samplers = {c: _density_sampler(rng, height, width, clustering[c]) for c in remaining}
    pending_centres: dict[int, list[np.ndarray]] = {c: [] for c in remaining}
    next_id = int(instances.max()) + 1
    failures = 0
    while remaining and failures < 400:
        cls = max(remaining, key=lambda c: remaining[c] / shapes[c].mean_area_px)
        shape = shapes[cls]
        if remaining[cls] < 0.5 * shape.mean_area_px:
            del remaining[cls]
            continue
        if not pending_centres[cls]:
            pending_centres[cls] = list(samplers[cls](64))
        cy, cx = pending_centres[cls].pop()
        area = shape.mean_area_px * float(np.clip(1.0 + shape.area_jitter * rng.standard_normal(), 0.4, 1.8))
        # Never overshoot by more than half a nucleus: shrink the last one to fit.
        area = min(area, max(remaining[cls], 0.6 * shape.mean_area_px))
        minor = math.sqrt(area / (math.pi * shape.elongation))
        major = minor * shape.elongation
        angle = float(rng.uniform(0, 180))
        reach = int(math.ceil(major)) + 2
        y0, y1 = max(0, int(cy) - reach), min(height, int(cy) + reach + 1)
        x0, x1 = max(0, int(cx) - reach), min(width, int(cx) + reach + 1)
        if y1 <= y0 or x1 <= x0:
            failures += 1
            continue
        patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.ellipse(
            patch,
            (int(round(cx)) - x0, int(round(cy)) - y0),
            (max(1, int(round(major))), max(1, int(round(minor)))),
            angle, 0, 360, 1, -1,
        )
        body = patch.astype(bool)
        drawn = int(body.sum())
        if drawn == 0:
            failures += 1
            continue
        free = instances[y0:y1, x0:x1] == 0
        if allowed is not None:
            free &= allowed[y0:y1, x0:x1]
        new_pixels = body & free
        if new_pixels.sum() < 0.85 * drawn:
            failures += 1
            continue
        instances[y0:y1, x0:x1][new_pixels] = next_id
        class_map[y0:y1, x0:x1][new_pixels] = cls
        next_id += 1
        remaining[cls] -= float(new_pixels.sum())
        failures = 0
        if next_id >= np.iinfo(np.uint16).max:
            raise LayoutError("more than 65534 nuclei requested; use a smaller size or lower fractions")


def _clustering_for(name: str) -> float:
    lowered = name.lower()
    if "epithel" in lowered:
        return 2.2
    if "inflamm" in lowered:
        return 1.4
    return 0.8


def nuclei_layout(
    class_names: Sequence[str],
    height: int,
    width: int,
    targets: LayoutTargets,
    rng: np.random.Generator,
    *,
    coarse: bool = False,  # nuclei are drawn at full detail either way
) -> Layout:
    """Typed nuclei (every non-background class is a nucleus type) hitting per-type area fractions."""
    _check_known(targets.class_fractions, class_names)
    type_ids = {i: n for i, n in enumerate(class_names) if i != 0}
    total_fraction = sum(targets.class_fractions.get(n, 0.0) for n in type_ids.values())
    if total_fraction > 0.7:
        raise LayoutError(
            f"nuclear area fractions sum to {total_fraction:.3f}; at most 0.7 can be packed as separate nuclei"
        )
    area_targets = {i: targets.class_fractions.get(n, 0.0) * height * width for i, n in type_ids.items()}
    shapes = {i: _shape_for(n, DEFAULT_NUCLEUS_SHAPE) for i, n in type_ids.items()}
    clustering = {i: _clustering_for(n) for i, n in type_ids.items()}
    last_error = ""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        instances = np.zeros((height, width), np.uint16)
        class_map = np.zeros((height, width), np.uint8)
        _place_nuclei(rng, height, width, area_targets, shapes, clustering, instances, class_map)
        achieved = class_fractions_of(class_map, class_names)
        miss = _worst_miss(achieved, targets.class_fractions)
        if miss is None or miss[1] <= targets.tolerance:
            counts = _count_nuclei(instances, class_map, class_names)
            return Layout(class_map, instances, achieved, None, counts, attempt)
        last_error = _describe_miss(miss, achieved, targets)
    raise LayoutError(f"nuclei layout missed its targets after {MAX_ATTEMPTS} attempts: {last_error}")


def _worst_miss(achieved: Mapping[str, float], wanted: Mapping[str, float]) -> tuple[str, float] | None:
    errors = [(name, abs(achieved[name] - target)) for name, target in wanted.items()]
    return max(errors, key=lambda kv: kv[1]) if errors else None


def _describe_miss(miss: tuple[str, float], achieved: Mapping[str, float], targets: LayoutTargets) -> str:
    name = miss[0]
    return (
        f"class {name!r}: achieved {achieved[name]:.4f} vs target {targets.class_fractions[name]:.4f} "
        f"(tolerance {targets.tolerance})"
    )


def _count_nuclei(instances: np.ndarray, class_map: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    ids, first = np.unique(instances, return_index=True)
    classes = class_map.ravel()[first[ids > 0]]
    counts = np.bincount(classes, minlength=len(class_names))
    return {class_names[i]: int(counts[i]) for i in range(1, len(class_names)) if counts[i] > 0}


# ------------------------------------------------------------------------------ ihc
def _positive_count(total: int, proportion: float, bounds: tuple[float, float] | None) -> int:
    """Number of positives out of ``total`` closest to ``proportion`` that stays inside ``bounds``."""
    count = int(round(proportion * total))
    if bounds is not None and total > 0:
        low, high = bounds
        candidates = [k for k in range(total + 1) if low - 1e-12 <= k / total <= high + 1e-12]
        if candidates:
            count = min(candidates, key=lambda k: abs(k - proportion * total))
    return max(0, min(total, count))


def ihc_layout(
    class_names: Sequence[str],
    height: int,
    width: int,
    targets: LayoutTargets,
    rng: np.random.Generator,
    *,
    coarse: bool = False,  # nuclei are drawn at full detail either way
) -> Layout:
    """Ki67/PD-L1-style negative and positive nuclei, optionally ringed by a boundary class.

    Without ``positive_proportion`` it behaves like the nuclei layout on the negative and
    positive classes (area targets). With it, ``nuclear_fraction`` sets the total nuclear
    area (default 0.25; class_fractions must then be empty), and the positive count is
    chosen so positives / nuclei hits the proportion (inside ``positive_range``).
    """
    _check_known(targets.class_fractions, class_names)
    positive = _find_class(class_names, _POSITIVE_WORDS)
    negative = _find_class(class_names, _NEGATIVE_WORDS)
    if positive is None or negative is None:
        raise LayoutError(
            "the ihc layout needs a '...negative...' and a '...positive...' class; "
            f"renderer classes are {list(class_names)}"
        )
    boundary = _find_class(class_names, _BOUNDARY_WORDS)
    for name in targets.class_fractions:
        if class_names.index(name) not in (positive, negative):
            raise LayoutError(
                f"class {name!r} cannot be targeted in an ihc layout; target {class_names[negative]!r} "
                f"and/or {class_names[positive]!r} (boundary rings follow the nuclei)"
            )
    ring_px = max(1, int(round(min(height, width) / 170)))  # DeepLIIF rings are ~3 px at 512
    if targets.positive_proportion is None:
        area_targets = {
            c: targets.class_fractions.get(class_names[c], 0.0) * height * width for c in (negative, positive)
        }
    else:
        if targets.class_fractions:
            raise LayoutError(
                f"with positive_proportion, set the nuclear area with nuclear_fraction, not class fractions "
                f"{dict(targets.class_fractions)}"
            )
        nuclear = 0.25 if targets.nuclear_fraction is None else targets.nuclear_fraction
        area_targets = {negative: nuclear * height * width}
    if sum(area_targets.values()) > 0.6 * height * width:
        raise LayoutError("ihc nuclear area fraction above 0.6 cannot be packed as separate ringed nuclei")
    shapes = {c: IHC_NUCLEUS_SHAPE for c in (negative, positive)}
    clustering = {negative: 0.8, positive: 1.8}
    last_error = ""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        instances = np.zeros((height, width), np.uint16)
        class_map = np.zeros((height, width), np.uint8)
        _place_nuclei(rng, height, width, area_targets, shapes, clustering, instances, class_map)
        achieved_proportion: float | None = None
        if targets.positive_proportion is not None:
            ids = np.unique(instances)
            ids = ids[ids > 0]
            k = _positive_count(ids.size, targets.positive_proportion, targets.positive_range)
            hot = smooth_field(rng, height, width, min(height, width) / 3.0)
            centres = _instance_centres(instances, ids)
            heat = hot[centres[:, 0], centres[:, 1]] if ids.size else np.zeros(0)
            positive_ids = ids[np.argsort(-heat, kind="stable")[:k]]
            class_map[np.isin(instances, positive_ids)] = positive
            achieved_proportion = (k / ids.size) if ids.size else 0.0
        else:
            counts = _count_nuclei(instances, class_map, class_names)
            n_pos, n_neg = counts.get(class_names[positive], 0), counts.get(class_names[negative], 0)
            achieved_proportion = n_pos / (n_pos + n_neg) if n_pos + n_neg else 0.0
        if boundary is not None:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_px + 1, 2 * ring_px + 1))
            grown = cv2.dilate((instances > 0).astype(np.uint8), kernel).astype(bool)
            class_map[grown & (instances == 0)] = boundary
        achieved = class_fractions_of(class_map, class_names)
        ok, last_error = _ihc_ok(achieved, achieved_proportion, targets, class_names, negative, positive)
        if ok:
            return Layout(
                class_map, instances, achieved, achieved_proportion,
                _count_nuclei(instances, class_map, class_names), attempt,
            )
    raise LayoutError(f"ihc layout missed its targets after {MAX_ATTEMPTS} attempts: {last_error}")


def _instance_centres(instances: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if ids.size == 0:
        return np.zeros((0, 2), np.int64)
    flat = instances.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_ids = flat[order]
    starts = np.searchsorted(sorted_ids, ids, side="left")
    ends = np.searchsorted(sorted_ids, ids, side="right")
    mids = order[(starts + ends) // 2]  # a pixel of the instance; its median index is inside it
    return np.stack(np.unravel_index(mids, instances.shape), axis=1)


def _ihc_ok(
    achieved: Mapping[str, float],
    proportion: float | None,
    targets: LayoutTargets,
    class_names: Sequence[str],
    negative: int,
    positive: int,
) -> tuple[bool, str]:
    if targets.positive_proportion is None:
        miss = _worst_miss(achieved, targets.class_fractions)
        if miss is not None and miss[1] > targets.tolerance:
            return False, _describe_miss(miss, achieved, targets)
        return True, ""
    nuclear = achieved[class_names[negative]] + achieved[class_names[positive]]
    nuclear_target = targets.nuclear_fraction
    if nuclear_target is not None and abs(nuclear - nuclear_target) > targets.tolerance:
        return False, f"nuclear area {nuclear:.4f} vs target {nuclear_target:.4f} (tolerance {targets.tolerance})"
    assert proportion is not None
    if targets.positive_range is not None:
        low, high = targets.positive_range
        if not low - 1e-12 <= proportion <= high + 1e-12:
            return False, (
                f"positive proportion {proportion:.4f} outside [{low}, {high}]: the layout holds too few nuclei "
                "to express that proportion; raise nuclear_fraction or the field size (height/width)"
            )
    elif abs(proportion - targets.positive_proportion) > targets.tolerance:
        return False, f"positive proportion {proportion:.4f} vs target {targets.positive_proportion:.4f}"
    return True, ""


# ------------------------------------------------------------------------- registry
LayoutGenerator = Callable[..., Layout]  # (class_names, height, width, targets, rng, *, coarse) -> Layout

LAYOUT_GENERATORS: Final[Mapping[str, LayoutGenerator]] = {
    "glands": glands_layout,
    "nuclei": nuclei_layout,
    "ihc": ihc_layout,
}


def layout_generator(tissue: str) -> LayoutGenerator:
    """The generator for a tissue name; unknown names raise listing the valid ones."""
    try:
        return LAYOUT_GENERATORS[tissue]
    except KeyError:
        raise InvalidInputError(f"unknown tissue {tissue!r}; valid: {sorted(LAYOUT_GENERATORS)}") from None


def generate_layout(
    tissue: str,
    class_names: Sequence[str],
    height: int,
    width: int,
    targets: LayoutTargets,
    seed: int,
    *,
    coarse: bool = False,
) -> Layout:
    """One seeded layout; same arguments -> byte-identical class and instance maps.

    ``coarse``: region blobs without fine detail (gland lumens), as input for the refiner.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    return layout_generator(tissue)(class_names, height, width, targets, rng, coarse=coarse)


def layout_from_class_map(tissue: str, class_map: np.ndarray, class_names: Sequence[str]) -> Layout:
    """Wraps a client-supplied class map; nucleus tissues get connected-component instances."""
    if class_map.ndim != 2:
        raise InvalidInputError(f"a coarse mask must be 2-D [H, W], got shape {class_map.shape}")
    if class_map.size and int(class_map.max()) >= len(class_names):
        raise InvalidInputError(
            f"coarse mask holds class id {int(class_map.max())} but the renderer has {len(class_names)} classes "
            f"{list(class_names)} (ids 0..{len(class_names) - 1})"
        )
    class_map = np.ascontiguousarray(class_map, dtype=np.uint8)
    achieved = class_fractions_of(class_map, class_names)
    if tissue == "glands":
        return Layout(class_map, region_instances(class_map, gland_region_classes(class_names)), achieved)
    instances = np.zeros(class_map.shape, np.uint16)
    next_id = 1
    for cls in range(1, len(class_names)):
        if tissue == "ihc" and cls == _find_class(class_names, _BOUNDARY_WORDS):
            continue
        count, labels = cv2.connectedComponents((class_map == cls).astype(np.uint8), connectivity=4)
        if count > 1:
            body = labels > 0
            instances[body] = (labels[body] + next_id - 1).astype(np.uint16)
            next_id += count - 1
    counts = _count_nuclei(instances, class_map, class_names)
    proportion = None
    if tissue == "ihc":
        pos, neg = _find_class(class_names, _POSITIVE_WORDS), _find_class(class_names, _NEGATIVE_WORDS)
        if pos is not None and neg is not None:
            n_pos, n_neg = counts.get(class_names[pos], 0), counts.get(class_names[neg], 0)
            proportion = n_pos / (n_pos + n_neg) if n_pos + n_neg else 0.0
    return Layout(class_map, instances, achieved, proportion, counts)


def layout_from_nuclei_maps(class_map: np.ndarray, instances: np.ndarray, class_names: Sequence[str]) -> Layout:
    """Wraps a generated nuclei mask (class ids + its own instance ids, e.g. from a diffusion mask generator)."""
    class_map = np.ascontiguousarray(class_map, dtype=np.uint8)
    instances = np.ascontiguousarray(instances, dtype=np.uint16)
    return Layout(class_map, instances, class_fractions_of(class_map, class_names),
                  nucleus_counts=_count_nuclei(instances, class_map, class_names))
