"""Polygon-style region masks derived from nuclei class maps (noise-frequency paper, "Polygons" masks).

A pathologist's region annotation does not outline nuclei: it draws a few polygons around areas dominated by
one cell type (tumour / inflammation / stroma) and leaves the rest as "other". We imitate that from a typed
nuclei class map (CoNSeP: 0 background, 1 other, 2 inflammatory, 3 epithelial, 4 spindle):

1. per nuclei class c >= 1, the local nuclear-area fraction d_c = GaussianBlur(class_map == c, sigma);
2. pixels whose total nuclear fraction sum_c d_c >= `density_threshold` join the region of the dominant class
   argmax_c d_c; the others stay 0 (nucleus-poor tissue: stroma matrix, lumen, glass);
3. each class region is traced (outer contours), simplified with cv2.approxPolyDP (`epsilon` px, the
   coarseness of a hand-drawn polygon), regions below `min_area` px are dropped, and the polygons are filled,
   largest class first so that smaller islands stay visible on top.

The result has the same ids as the input, but every id now means "region dominated by that nucleus type"; the
single cells are gone, which is exactly the information the paper's noise label is meant to stand in for.
Numpy + OpenCV only (no torch), so it can run anywhere the masks are made.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PolygonSettings:
    """How coarse the derived regions are. Defaults suit 40x CoNSeP (nuclei ~ 6-15 px across)."""

    # Chosen by eye on CoNSeP patches: smaller sigma / min_area leave nucleus-sized blobs (still single-cell
    # information), larger ones merge whole 256 px patches into one region.
    sigma: float = 14.0              # px; Gaussian scale of the nuclear density (a few nuclei across)
    density_threshold: float = 0.06  # min local nuclear-area fraction for a pixel to belong to a cell region
    epsilon: float = 4.0             # px; approxPolyDP tolerance (vertex spacing of a hand-drawn polygon)
    min_area: float = 300.0          # px^2; smaller polygons are not drawn (nobody annotates a single nucleus)

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not 0.0 < self.density_threshold <= 1.0:
            raise ValueError(f"density_threshold must be in (0, 1], got {self.density_threshold}")
        if self.epsilon < 0 or self.min_area < 0:
            raise ValueError(f"epsilon and min_area must be >= 0, got {self.epsilon}, {self.min_area}")


def class_densities(class_map: np.ndarray, num_classes: int, sigma: float) -> np.ndarray:
    """float32 [num_classes - 1, H, W]: Gaussian-weighted local area fraction of each nuclei class 1..C-1.

    Reflect borders, so a patch edge does not read as "no nuclei beyond here".
    """
    class_map = _check_class_map(class_map, num_classes)
    densities = np.empty((num_classes - 1, *class_map.shape), np.float32)
    for c in range(1, num_classes):
        densities[c - 1] = cv2.GaussianBlur((class_map == c).astype(np.float32), (0, 0), sigmaX=float(sigma),
                                            sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT)
    return densities


def dominant_regions(class_map: np.ndarray, num_classes: int, sigma: float, density_threshold: float) -> np.ndarray:
    """uint8 H x W: the dominant nuclei class where nuclei are dense enough, else 0 (before polygon tracing)."""
    densities = class_densities(class_map, num_classes, sigma)
    dense = densities.sum(axis=0) >= density_threshold
    return np.where(dense, densities.argmax(axis=0) + 1, 0).astype(np.uint8)


def trace_polygons(regions: np.ndarray, num_classes: int, epsilon: float,
                   min_area: float) -> dict[int, list[np.ndarray]]:
    """class id -> simplified outer polygons (int32 [K, 1, 2] x/y vertices) of each class region."""
    polygons: dict[int, list[np.ndarray]] = {}
    for c in range(1, num_classes):
        mask = (regions == c).astype(np.uint8)
        if not mask.any():
            continue
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        kept = []
        for contour in contours:
            simplified = cv2.approxPolyDP(contour, float(epsilon), closed=True)
            if len(simplified) >= 3 and cv2.contourArea(simplified) >= min_area:
                kept.append(simplified.astype(np.int32))
        if kept:
            polygons[c] = kept
    return polygons


def fill_polygons(shape: tuple[int, int], polygons: dict[int, list[np.ndarray]]) -> np.ndarray:
    """uint8 H x W: polygons filled with their class id on 0, largest total area first (small ones on top)."""
    out = np.zeros(shape, np.uint8)
    area = {c: sum(cv2.contourArea(p) for p in polys) for c, polys in polygons.items()}
    for c in sorted(polygons, key=lambda k: (-area[k], k)):
        cv2.fillPoly(out, polygons[c], color=int(c))
    return out


def polygon_mask(class_map: np.ndarray, num_classes: int = 5,
                 settings: PolygonSettings = PolygonSettings()) -> np.ndarray:
    """uint8 H x W region mask ("Polygons" in the noise-frequency paper) derived from a nuclei class map."""
    regions = dominant_regions(class_map, num_classes, settings.sigma, settings.density_threshold)
    polygons = trace_polygons(regions, num_classes, settings.epsilon, settings.min_area)
    return fill_polygons(regions.shape, polygons)


def _check_class_map(class_map: np.ndarray, num_classes: int) -> np.ndarray:
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise ValueError(f"class map must be 2-D, got shape {class_map.shape}")
    if not np.issubdtype(class_map.dtype, np.integer):
        raise ValueError(f"class map must be integer, got dtype {class_map.dtype}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one nuclei class), got {num_classes}")
    if class_map.size and (class_map.min() < 0 or class_map.max() >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes - 1}], got {class_map.min()}..{class_map.max()}")
    return class_map
