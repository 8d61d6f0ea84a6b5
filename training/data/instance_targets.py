"""The 3-class nucleus target of boundary-aware segmenters: background / nucleus interior / inner boundary.

One definition shared by the downstream benchmark's segmenter (training/experiments/instance_metrics.py), the
frozen `nuclei_boundary` segmenter (training/data/scoring_data.py) and the renderer's boundary-consistency loss
(training/losses.py boundary_consistency_loss, whose target the pix2pixHD trainer builds from the instance-edge
channel: services/core/mask_ops.instance_edges restricted to nucleus pixels is exactly the inner boundary below).
Numpy + scikit-image only.
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
NUCLEUS_BOUNDARY_CLASSES: tuple[str, str, str] = ("background", "interior", "boundary")


def three_class_target(instances: np.ndarray) -> np.ndarray:
    """uint8 H x W: 0 background, 1 nucleus interior, 2 the inner boundary of each instance.

    Inner boundary = nucleus pixels with a 4-neighbour of another id (background or another nucleus), so two
    touching nuclei are separated by 2 px (1 px of each) and a lone nucleus gets a 1 px rim. Pixels on the image
    border are compared with themselves (reflection), so a nucleus cut by the border has no rim there.
    """
    target = (instances > 0).astype(np.uint8)
    target[find_boundaries(instances, mode="inner") & (instances > 0)] = BOUNDARY
    return target


__all__ = ["BACKGROUND", "BOUNDARY", "INTERIOR", "NUCLEUS_BOUNDARY_CLASSES", "three_class_target"]
