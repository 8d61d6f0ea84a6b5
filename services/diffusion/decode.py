"""A nuclei-mask generator's sample -> class map + instance map (contract ``decode``).

The generator samples K + 2 channels in [-1, 1]: one-hot classes (background + K nucleus types)
then an instance-boundary map. The rule is the training helper's (training/data/diffusion_data.py
decode_mask), re-implemented here because serving must not import training; test_decode.py checks
pixel equality against its reference vectors (tests/fixtures/diffusion_decode_reference.npz):

  1. cls = argmax over the class channels (first maximum wins on ties); foreground = cls > 0;
  2. seeds = foreground & (boundary < threshold), labelled as 4-connected components 1..M in raster
     order of their first pixel;
  3. grow until nothing changes: every unlabelled foreground pixel with a labelled 4-neighbour takes
     the largest label among its 4-neighbours (simultaneous update); unreached foreground stays 0;
  4. drop labels with fewer than ``min_instance_pixels`` pixels; renumber the rest 1..N by old label;
  5. class map: each instance gets its majority class of cls (ties -> smallest id); other pixels 0,
     so every instance has exactly one class, as in CoNSeP.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from services.diffusion.spec import DecodeSpec

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def decode_mask_sample(sample: np.ndarray, decode: DecodeSpec) -> tuple[np.ndarray, np.ndarray]:
    """float [C, H, W] generator output -> (uint8 class map [H, W], int32 instance map [H, W])."""
    sample = np.asarray(sample, dtype=np.float32)
    if sample.ndim != 3 or sample.shape[0] <= max(decode.class_channels - 1, decode.boundary_channel):
        raise ValueError(
            f"mask sample of shape {list(sample.shape)} lacks the class channels 0..{decode.class_channels - 1} "
            f"or the boundary channel {decode.boundary_channel}"
        )
    cls = np.argmax(sample[: decode.class_channels], axis=0)
    foreground = cls > 0
    seeds = foreground & (sample[decode.boundary_channel] < np.float32(decode.threshold))
    labels = ndimage.label(seeds, structure=_FOUR_CONNECTED)[0].astype(np.int32)
    labels = _grow(labels, foreground)
    sizes = np.bincount(labels.ravel(), minlength=1)
    keep = np.flatnonzero(sizes >= decode.min_instance_pixels)
    keep = keep[keep > 0]
    renumber = np.zeros(sizes.shape[0], np.int32)
    renumber[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    instances = renumber[labels]
    class_map = np.zeros(cls.shape, np.uint8)
    if keep.size:
        votes = np.zeros((keep.size + 1, decode.class_channels), np.int64)
        np.add.at(votes, (instances.ravel(), cls.ravel()), 1)
        majority = np.argmax(votes, axis=1).astype(np.uint8)  # first maximum: the smallest class id on ties
        majority[0] = 0
        class_map = majority[instances]
    return class_map, instances


def _grow(labels: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Grow labels into ``allowed`` pixels, 4-neighbour maximum, simultaneous sweeps until stable."""
    while True:
        padded = np.pad(labels, 1)
        neighbour_max = np.maximum.reduce(
            [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        grow = allowed & (labels == 0) & (neighbour_max > 0)
        if not grow.any():
            return labels
        labels = np.where(grow, neighbour_max, labels)
