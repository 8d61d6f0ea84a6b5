"""Label maps derived from a record's image as well as its mask (helper D1's addition beside datasets.py).

`tissue_gland` turns GlaS's 2-class gland mask into 3 classes so the gland renderer can take the mask
refiner's output (a PriorPath tissue mask) as its non-tissue/tissue layer:
    0 non-tissue  = mask_ops.tissue_mask(image, "he") is False (grayscale >= 204: glass, gland lumen, air)
    1 stroma      = tissue outside the GlaS gland mask
    2 gland       = tissue inside the GlaS gland mask (gland epithelium)
Non-tissue wins over gland: GlaS gland annotations include the white lumen, and a renderer trained with
lumen = gland paints lumens as epithelium (seen in a first run); with this rule the white areas come from the
tissue mask alone, which is exactly what the refiner produces.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from services.core import mask_ops
from training.data.datasets import MaskToImageDataset
from training.data.shared_layout import Sample

TISSUE_GLAND_CLASSES = ("non-tissue", "stroma", "gland")


def class_map_from_tissue(tissue: np.ndarray, gland_mask: np.ndarray) -> np.ndarray:
    """renderer-he-glands' class rule from any fine tissue mask (real, or refined from a layout):
    0 = non-tissue (wins over gland: lumens), 2 = tissue inside a gland, 1 = other tissue (stroma)."""
    out = np.where(np.asarray(gland_mask) != 0, 2, 1).astype(np.uint8)
    out[~np.asarray(tissue, bool)] = 0
    return out


def tissue_gland_class_map(image: np.ndarray, gland_mask: np.ndarray, stain: str = "he") -> np.ndarray:
    return class_map_from_tissue(mask_ops.tissue_mask(image, stain), gland_mask)


class TissueGlandDataset(MaskToImageDataset):
    """MaskToImageDataset whose class map is tissue_gland_class_map(image, gland mask) (3 classes)."""

    def _sample(self, index: int) -> Sample:
        sample = super()._sample(index)
        return dataclasses.replace(sample, class_map=tissue_gland_class_map(sample.image, sample.class_map))
