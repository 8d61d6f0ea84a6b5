"""Mask operations shared by training and serving (numpy + OpenCV only; no torch, no protobuf).

This module is THE single definition of:

* the tissue mask (PriorPath: grayscale below a stain-specific threshold),
* the coarse mask derived from a fine mask (PriorPath: opening 5x5 then closing 10x10),
* the single-pixel noise label (polygon + noise masks, mean spacing 15 px by default),
* the renderer's input tensor (one-hot classes, then noise, then instance edges).

Training builds its pairs with these functions and serving builds its model inputs with them, so a model
never sees an input at serving time that was defined differently from its training data.
"""

from __future__ import annotations

import cv2
import numpy as np

# PriorPath (Sec. 2.1): grayscale thresholds separating tissue from air/glass, on the 0-255 scale.
TISSUE_THRESHOLDS: dict[str, int] = {"he": 204, "ihc": 235}

# Pixel keys in noise_label carry the pixel index in their low 32 bits.
_MAX_PIXELS_FOR_NOISE = 2**32


# --------------------------------------------------------------------------------------------------------
# Grayscale and tissue mask
# --------------------------------------------------------------------------------------------------------


def to_grayscale(rgb: np.ndarray) -> np.ndarray:
    """uint8 H x W luma of a uint8 H x W x 3 RGB image: ITU-R BT.601 (0.299 R + 0.587 G + 0.114 B).

    Computed by OpenCV's RGB2GRAY (fixed-point, rounded), so every caller gets bit-identical values.
    A 2-D uint8 array is taken to be grayscale already and returned as a copy.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ValueError(f"to_grayscale expects a uint8 image, got dtype {rgb.dtype}")
    if rgb.ndim == 2:
        return rgb.copy()
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"to_grayscale expects H x W x 3 RGB (or H x W gray), got shape {rgb.shape}")
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def tissue_threshold(stain: str) -> int:
    """The PriorPath grayscale threshold of a stain ("he" or "ihc", case-insensitive)."""
    key = stain.lower()
    if key not in TISSUE_THRESHOLDS:
        raise ValueError(f"unknown stain {stain!r}; valid stains: {sorted(TISSUE_THRESHOLDS)}")
    return TISSUE_THRESHOLDS[key]


def tissue_mask(rgb: np.ndarray, stain: str = "he", threshold: int | None = None) -> np.ndarray:
    """bool H x W: True where the grayscale value is strictly below the threshold (tissue), False for air.

    The threshold defaults to the stain's PriorPath value (204 H&E, 235 IHC); an explicit `threshold`
    overrides it (the stain is still validated so a typo never passes silently).
    """
    default = tissue_threshold(stain)
    limit = default if threshold is None else int(threshold)
    if not 0 <= limit <= 256:
        raise ValueError(f"threshold must be in [0, 256], got {threshold}")
    return to_grayscale(rgb) < limit


# --------------------------------------------------------------------------------------------------------
# Coarsening (PriorPath coarse/fine pairs)
# --------------------------------------------------------------------------------------------------------


def _square_kernel(size: int, name: str) -> np.ndarray:
    if int(size) != size or size < 1:
        raise ValueError(f"{name} must be an integer >= 1 (1 = no-op), got {size}")
    return np.ones((int(size), int(size)), dtype=np.uint8)


def _erode(mask01: np.ndarray, size: int) -> np.ndarray:
    """Erosion by the square B = {-a..size-1-a}^2 with a = size // 2 (OpenCV's centre anchor)."""
    a = size // 2
    return cv2.erode(mask01, np.ones((size, size), np.uint8), anchor=(a, a))


def _dilate(mask01: np.ndarray, size: int) -> np.ndarray:
    """Dilation by the same B as `_erode`.

    OpenCV's dilate takes max over src(x + b) - i.e. it dilates by the *reflection* of its kernel - so the
    anchor is mirrored (size - 1 - a) to dilate by B itself. For odd sizes the mirror is a no-op; for even
    sizes (the 10x10 closing) skipping it shifts the result by one pixel: cv2.morphologyEx(MORPH_OPEN) with
    an even kernel is then not anti-extensive (it moves objects), which is why it is not used here.
    """
    a = size - 1 - size // 2
    return cv2.dilate(mask01, np.ones((size, size), np.uint8), anchor=(a, a))


def _open_then_close(foreground: np.ndarray, open_size: int, close_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(opened, closed) bool masks of `foreground`, with the image zero-extended (see coarsen_mask)."""
    pad = max(open_size, close_size)
    canvas = np.pad(foreground.astype(np.uint8), pad, mode="constant", constant_values=0)
    opened = _open01(canvas, open_size)
    closed = _close01(opened, close_size)
    inner = (slice(pad, pad + foreground.shape[0]), slice(pad, pad + foreground.shape[1]))
    return opened[inner] != 0, closed[inner] != 0


def _open01(mask01: np.ndarray, size: int) -> np.ndarray:
    return mask01 if size == 1 else _dilate(_erode(mask01, size), size)


def _close01(mask01: np.ndarray, size: int) -> np.ndarray:
    return mask01 if size == 1 else _erode(_dilate(mask01, size), size)


def coarsen_mask(mask: np.ndarray, open_size: int = 5, close_size: int = 10) -> np.ndarray:
    """PriorPath coarse mask: binary opening with an open_size^2 square, THEN closing with a close_size^2 square.

    Definitions (exact, for any kernel size, odd or even):
      * B_k = the k x k square of offsets {-a .. k-1-a}^2 with a = k // 2 (OpenCV's centre anchor; for k = 10
        that is -5..4). Erosion X (-) B = {x : x + b in X for all b in B}; dilation X (+) B = {x + b}.
      * opening = (X (-) B) (+) B, closing = (X (+) B) (-) B. Because the dilation really uses B (not its
        reflection) these are true morphological opening/closing, and those do not depend on where the anchor
        sits: the anchor choice is explicit but cannot move the result.
      * Image border: the mask is taken to be 0 (background) outside the image, and both operations are the
        exact set operations on that infinite plane, restricted back to the image (computed on a zero-padded
        canvas, so nothing is clipped). An object touching the border survives the opening if a k x k square
        fits inside it; the closing never grows a region out to the border unless it is enclosed there.
        Hence exactly: opening <= X <= closing (pixelwise), both idempotent, both monotone.
        (OpenCV's default "neutral" morphology border is not used: with it the closing of an object a few
        pixels from the edge fills the gap to the edge.)
      * A size of 1 is the identity (use it to disable a stage).

    Input: a binary mask (bool, or an integer/float array whose nonzero pixels share one value); output has
    the same dtype and the same foreground value. For label maps with several classes use `coarsen_class_map`.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"coarsen_mask expects a 2-D mask, got shape {mask.shape}")
    _square_kernel(open_size, "open_size")
    _square_kernel(close_size, "close_size")
    foreground = mask != 0
    if mask.dtype == np.bool_:
        fg_value = True
    else:
        fg_value = mask.max() if foreground.any() else 1
        if not np.all(mask[foreground] == fg_value):
            raise ValueError(
                "coarsen_mask expects a binary mask (one nonzero value); got values "
                f"{np.unique(mask)[:10].tolist()} - use coarsen_class_map for class maps"
            )
    _, result = _open_then_close(foreground, int(open_size), int(close_size))
    if mask.dtype == np.bool_:
        return result
    out = np.zeros_like(mask)
    out[result] = fg_value
    return out


def coarsen_class_map(class_map: np.ndarray, open_size: int = 5, close_size: int = 10) -> np.ndarray:
    """`coarsen_mask` applied to each foreground class (id != 0) of an integer class map; 0 is background.

    Conflict rule (deterministic): opening only removes pixels, so the opened classes are disjoint and a
    pixel kept by its own class's opening keeps that class. Closing can grow a class into background or into
    another class's territory; a pixel added by the closings of several classes (and kept by no opening) gets
    the LOWEST class id among them. Pixels claimed by no class become background (0).
    """
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise ValueError(f"coarsen_class_map expects a 2-D class map, got shape {class_map.shape}")
    if not np.issubdtype(class_map.dtype, np.integer):
        raise ValueError(f"coarsen_class_map expects an integer class map, got dtype {class_map.dtype}")
    _square_kernel(open_size, "open_size")
    _square_kernel(close_size, "close_size")
    classes = [int(c) for c in np.unique(class_map) if c != 0]
    out = np.zeros_like(class_map)
    opened: dict[int, np.ndarray] = {}
    # Descending order so that lower ids overwrite higher ids where closings overlap.
    for cls in sorted(classes, reverse=True):
        opened[cls], closed = _open_then_close(class_map == cls, int(open_size), int(close_size))
        out[closed] = cls
    for cls, region in opened.items():
        out[region] = cls
    return out


# --------------------------------------------------------------------------------------------------------
# Single-pixel noise label (polygon + noise masks)
# --------------------------------------------------------------------------------------------------------


def noise_pixel_count(shape: tuple[int, int], mean_spacing: float) -> int:
    """Number of noise pixels noise_label puts in `shape`: round(H * W / mean_spacing^2)."""
    height, width = int(shape[0]), int(shape[1])
    return min(height * width, int(round(height * width / float(mean_spacing) ** 2)))


# Below count <= n_pixels / 4 noise_label samples in O(count); above, in O(n_pixels). Part of the definition
# of the noise (the two samplers consume the stream differently): changing it changes every seed's noise.
_SPARSE_NOISE_FACTOR = 4


def _sample_sparse(bit_generator: np.random.PCG64, n_pixels: int, count: int) -> np.ndarray:
    """The first `count` distinct pixel indices in the stream, each index = raw & (2^b - 1) with values
    >= n_pixels rejected (exactly uniform). Sequential draws skipping repeats = sampling without replacement.
    The result depends only on the stream, not on the batch sizes used to read it."""
    mask = np.uint64((1 << max(1, (n_pixels - 1).bit_length())) - 1)
    found: list[np.ndarray] = []
    seen = np.zeros(0, dtype=np.uint64)
    while seen.size < count:
        # Acceptance is > 1/2 and repeats are rare at <= 1/4 density: ~2.7x the still missing count suffices.
        batch = bit_generator.random_raw(int(2.7 * (count - seen.size)) + 64).astype(np.uint64) & mask
        batch = batch[batch < np.uint64(n_pixels)]
        unique, first = np.unique(batch, return_index=True)
        fresh = ~np.isin(unique, seen)
        in_order = unique[fresh][np.argsort(first[fresh], kind="stable")]
        found.append(in_order)
        seen = np.concatenate([seen, in_order])
    return np.concatenate(found)[:count].astype(np.intp)


def _sample_dense(bit_generator: np.random.PCG64, n_pixels: int, count: int) -> np.ndarray:
    """The `count` pixels with the smallest random keys (high 32 bits of one raw draw per pixel; low 32 bits =
    pixel index, so keys are unique and the chosen set does not depend on the partition algorithm)."""
    if count == n_pixels:
        return np.arange(n_pixels)
    raw = bit_generator.random_raw(n_pixels).astype(np.uint64)
    keys = (raw & np.uint64(0xFFFF_FFFF_0000_0000)) | np.arange(n_pixels, dtype=np.uint64)
    return np.argpartition(keys, count - 1)[:count]


def noise_label(shape: tuple[int, int], mean_spacing: float = 15.0, seed: int = 0) -> np.ndarray:
    """uint8 H x W in {0, 1}: isolated single noise pixels at uniformly random positions.

    Definition of `mean_spacing` s: the density is 1 / s^2 noise pixels per pixel, i.e. s is the pitch of the
    regular square grid with the same number of points. Exactly round(H * W / s^2) distinct positions are drawn
    (without replacement), so counts and densities are tight rather than Poisson-distributed. For a Poisson
    field of that density the mean nearest-neighbour distance is 1 / (2 sqrt(density)) = 0.5 * s (about 7.5 px
    for the default s = 15, the best value in the noise-frequency paper); this field is the lattice analogue.

    Reproducibility "forever": positions come only from the raw 64-bit stream of PCG64(seed) - a stream NumPy
    guarantees stable across versions - never from Generator distribution methods (which may change). Sparse
    fields (count <= H*W/4, every realistic spacing >= 2) take the first `count` distinct uniform pixel indices
    of the stream (O(count)); denser ones take the pixels with the smallest random keys (O(H*W)). Both are
    exact uniform samples without replacement; tests pin golden positions.
    """
    height, width = int(shape[0]), int(shape[1])
    if height < 0 or width < 0:
        raise ValueError(f"shape must be non-negative, got {shape}")
    if not np.isfinite(mean_spacing) or mean_spacing <= 0:
        raise ValueError(f"mean_spacing must be a positive finite number, got {mean_spacing}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    n_pixels = height * width
    if n_pixels >= _MAX_PIXELS_FOR_NOISE:
        raise ValueError(f"noise_label supports fewer than 2**32 pixels, got shape {shape}")
    out = np.zeros((height, width), dtype=np.uint8)
    count = noise_pixel_count((height, width), mean_spacing)
    if count == 0:
        return out
    bit_generator = np.random.PCG64(int(seed))
    if count * _SPARSE_NOISE_FACTOR <= n_pixels:
        chosen = _sample_sparse(bit_generator, n_pixels, count)
    else:
        chosen = _sample_dense(bit_generator, n_pixels, count)
    out.reshape(-1)[chosen] = 1
    return out


# --------------------------------------------------------------------------------------------------------
# Renderer input tensor
# --------------------------------------------------------------------------------------------------------


def one_hot(class_map: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [num_classes, H, W] one-hot encoding of an integer class map (ids 0 .. num_classes-1)."""
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise ValueError(f"one_hot expects a 2-D class map, got shape {class_map.shape}")
    if not np.issubdtype(class_map.dtype, np.integer):
        raise ValueError(f"one_hot expects an integer class map, got dtype {class_map.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_map.size:
        low, high = int(class_map.min()), int(class_map.max())
        if low < 0 or high >= num_classes:
            bad = high if high >= num_classes else low
            raise ValueError(f"class id {bad} outside [0, {num_classes - 1}] for num_classes={num_classes}")
    ids = np.arange(num_classes, dtype=class_map.dtype).reshape(-1, 1, 1)
    return (class_map[None, :, :] == ids).astype(np.float32)


def instance_edges(instances: np.ndarray) -> np.ndarray:
    """uint8 H x W in {0, 1}: 1 where a pixel's instance id differs from one of its 4-neighbours.

    The pix2pixHD boundary map: both pixels of a differing pair are marked, and background (0) next to an
    instance counts as a difference, so every instance is outlined on both sides of its border.
    """
    instances = np.asarray(instances)
    if instances.ndim != 2:
        raise ValueError(f"instance_edges expects a 2-D instance map, got shape {instances.shape}")
    edges = np.zeros(instances.shape, dtype=bool)
    horizontal = instances[:, 1:] != instances[:, :-1]
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    vertical = instances[1:, :] != instances[:-1, :]
    edges[1:, :] |= vertical
    edges[:-1, :] |= vertical
    return edges.astype(np.uint8)


def generator_input_channels(num_classes: int, use_noise: bool, use_edges: bool) -> int:
    """Channel count of build_generator_input's output (for sizing the renderer's first layer)."""
    return int(num_classes) + int(bool(use_noise)) + int(bool(use_edges))


def build_generator_input(
    class_map: np.ndarray,
    num_classes: int,
    noise: np.ndarray | None,
    edges: np.ndarray | None,
) -> np.ndarray:
    """THE renderer input: float32 [C (+1) (+1), H, W] = one-hot classes, then noise, then edges.

    `noise` (e.g. noise_label) and `edges` (e.g. instance_edges) are optional H x W maps whose nonzero pixels
    become 1.0; a None drops that channel. Training and serving both call this, so the channel order and
    value encoding are defined only here.
    """
    class_map = np.asarray(class_map)
    channels = [one_hot(class_map, num_classes)]
    for name, extra in (("noise", noise), ("edges", edges)):
        if extra is None:
            continue
        extra = np.asarray(extra)
        if extra.shape != class_map.shape:
            raise ValueError(f"{name} shape {extra.shape} does not match class_map shape {class_map.shape}")
        channels.append((extra != 0).astype(np.float32)[None, :, :])
    return np.concatenate(channels, axis=0) if len(channels) > 1 else channels[0]
