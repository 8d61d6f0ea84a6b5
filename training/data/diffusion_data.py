"""CoNSeP crops for the two diffusion models (issue #9): the mask-conditioned renderer and the mask generator.

Scale: random 128x128 crops of the 40x CoNSeP patches (~0.25 um/px) are downsampled 2x to 64x64 (~0.5 um/px,
20x). At that scale a lymphocyte is still ~12-15 px wide (nuclei stay visible) while one 64 px sample covers
32 um of tissue (several nuclei) - native 64 px crops at 40x would show only one or two nuclei. Images are
box-averaged; class and instance maps take the top-left pixel of every 2x2 block (nearest), so labels stay
integer and every instance keeps exactly one class.

Encodings (shared with the serving side through the manifest metadata; see notes/DIFFUSION_CONTRACT.md):
- renderer condition = mask_ops.build_generator_input(class_map, 5, None, instance_edges(instances)):
  float32 [6, H, W] = one-hot background/other/inflammatory/epithelial/spindle, then instance edges, in {0, 1}.
- mask sample = float32 [6, H, W] in [-1, 1]: the 5 one-hot class channels, then the instance boundary channel
  (pixels of a nucleus with a 4-neighbour of another id, background included), each mapped {0, 1} -> {-1, 1}.
- mask condition = float32 [5]: multi-hot of the 4 nuclei types present (>= TYPE_PRESENT_MIN_PIXELS pixels),
  then the null flag (1 only for the unconditional classifier-free-guidance input, whose other entries are 0).

decode_mask turns a generated mask sample back into (class map, instance map) by a rule that is fully specified
below so the numpy serving code can reproduce it exactly (reference vector: tests/fixtures/
diffusion_decode_reference.npz).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from services.core import mask_ops
from services.diffusion.decode import decode_mask_sample
from services.diffusion.spec import DecodeSpec
from training.data.augment import paired_augment
from training.data.shared_layout import Record, Sample, load_sample

CLASS_NAMES: tuple[str, ...] = ("background", "other", "inflammatory", "epithelial", "spindle")
TYPE_NAMES: tuple[str, ...] = CLASS_NAMES[1:]
NUM_CLASSES = len(CLASS_NAMES)
NUM_TYPES = len(TYPE_NAMES)
RENDERER_CONDITION_CHANNELS: tuple[str, ...] = (*CLASS_NAMES, "edges")
MASK_SAMPLE_CHANNELS: tuple[str, ...] = (*CLASS_NAMES, "boundary")
MASK_CONDITION_NAMES: tuple[str, ...] = (*TYPE_NAMES, "null")
# A type counts as present in a crop when it covers at least this many pixels (at the model scale): a sliver of a
# nucleus cut by the crop border is not something the generator can be asked to draw.
TYPE_PRESENT_MIN_PIXELS = 8
# CoNSeP is 40x; HoVer-Net reports ~0.25 um/px for it.
CONSEP_PIXEL_SIZE_UM = 0.25

# Decode rule constants (manifest metadata.decode).
DECODE_THRESHOLD = 0.0
DECODE_MIN_INSTANCE_PIXELS = 4


# ------------------------------------------------------------------------------------------- scale + encodings
def downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 H x W x 3 -> uint8 (H/f) x (W/f) x 3 by box averaging (f x f blocks), rounded half up."""
    if factor == 1:
        return np.ascontiguousarray(image)
    height, width = image.shape[:2]
    if height % factor or width % factor:
        raise ValueError(f"image {image.shape[:2]} is not divisible by factor {factor}")
    blocks = image.reshape(height // factor, factor, width // factor, factor, -1).astype(np.float32)
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def downsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Integer H x W map -> (H/f) x (W/f) by taking the top-left pixel of every f x f block (nearest)."""
    if labels.shape[0] % factor or labels.shape[1] % factor:
        raise ValueError(f"label map {labels.shape} is not divisible by factor {factor}")
    return np.ascontiguousarray(labels[::factor, ::factor])


def renderer_condition(class_map: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """float32 [6, H, W]: one-hot CoNSeP classes + instance edges (the renderer's spatial condition)."""
    return mask_ops.build_generator_input(class_map, NUM_CLASSES, None, mask_ops.instance_edges(instances))


def instance_boundary(instances: np.ndarray) -> np.ndarray:
    """bool H x W: nucleus pixels with a 4-neighbour of a different id (another nucleus or background)."""
    return (mask_ops.instance_edges(instances) != 0) & (np.asarray(instances) > 0)


def mask_sample(class_map: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """float32 [6, H, W] in {-1, 1}: one-hot classes then the instance boundary (the mask generator's x0)."""
    channels = np.concatenate([mask_ops.one_hot(class_map, NUM_CLASSES),
                               instance_boundary(instances).astype(np.float32)[None]], axis=0)
    return channels * 2.0 - 1.0


def types_present(class_map: np.ndarray, min_pixels: int = TYPE_PRESENT_MIN_PIXELS) -> np.ndarray:
    """float32 [4] multi-hot: type k (class id k+1) covers >= min_pixels pixels."""
    counts = np.bincount(np.asarray(class_map).ravel().astype(np.int64), minlength=NUM_CLASSES)[1:NUM_CLASSES]
    return (counts >= min_pixels).astype(np.float32)


def mask_condition(present: np.ndarray | Sequence[float], null: bool = False) -> np.ndarray:
    """float32 [5] = multi-hot types then null flag; the null (CFG unconditional) vector is [0, 0, 0, 0, 1]."""
    if null:
        return np.array([0.0] * NUM_TYPES + [1.0], dtype=np.float32)
    present = np.asarray(present, dtype=np.float32).reshape(NUM_TYPES)
    return np.concatenate([present, np.zeros(1, np.float32)])


# ------------------------------------------------------------------------------------------- decode rule
def decode_mask(sample: np.ndarray, threshold: float = DECODE_THRESHOLD,
                min_instance_pixels: int = DECODE_MIN_INSTANCE_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Generated mask sample [6, H, W] -> (uint8 class map, int32 instance map 0..N).

    The exact rule (the serving decode must match it pixel for pixel):
    1. cls = argmax over channels 0..4 (first maximum wins on ties); foreground = cls > 0.
    2. seeds = foreground & (channel 5 < threshold); label the seeds' 4-connected components 1..M in raster
       order of their first pixel (scipy.ndimage.label with the cross structure).
    3. grow: repeat until nothing changes - every unlabelled foreground pixel with a labelled 4-neighbour takes
       the LARGEST label among its 4-neighbours (labels from the previous sweep; simultaneous update).
       Foreground never reached by a seed stays unlabelled.
    4. drop labels with fewer than min_instance_pixels pixels; renumber the rest 1..N in increasing old label.
    5. class map: every instance gets its majority class among cls over its pixels (ties -> smallest class id);
       pixels without an instance become background (0). So each instance has exactly one class, like CoNSeP.
    """
    sample = np.asarray(sample, dtype=np.float32)
    if sample.ndim != 3 or sample.shape[0] != NUM_CLASSES + 1:
        raise ValueError(f"mask sample must be [{NUM_CLASSES + 1}, H, W], got {sample.shape}")
    # One implementation for training and serving: the rule lives in services.diffusion.decode (which the
    # rendering service runs), so the exported manifest's `decode` and the model card cannot drift apart.
    rule = DecodeSpec(class_channels=NUM_CLASSES, boundary_channel=NUM_CLASSES, threshold=float(threshold),
                      min_instance_pixels=int(min_instance_pixels))
    return decode_mask_sample(sample, rule)


# ------------------------------------------------------------------------------------------- crops
class DiffusionCrops:
    """Random (image, class map, instances) crops at the model scale, a pure function of (seed, epoch, index).

    Each item: a `source_crop` px crop of one record (cycled) with a random flip/rot90, downsampled by `factor`.
    Returns numpy arrays; the torch side (trainer) stacks them. Samples are cached in memory (CoNSeP is 7.6 MiB).
    """

    def __init__(self, records: Sequence[Record], source_crop: int, factor: int, seed: int, length: int,
                 augment: bool = True) -> None:
        if not records:
            raise ValueError("records is empty")
        missing = [str(r.image_path) for r in records if r.instance_path is None]
        if missing:
            raise ValueError(f"diffusion crops need instance maps; {len(missing)} records have none: {missing[0]}")
        if source_crop % factor:
            raise ValueError(f"source_crop {source_crop} is not divisible by factor {factor}")
        self.records = list(records)
        self.source_crop, self.factor = int(source_crop), int(factor)
        self.seed, self.length, self.augment = int(seed), int(length), augment
        self.epoch = 0
        self._samples: dict[int, Sample] = {}

    @property
    def size(self) -> int:
        return self.source_crop // self.factor

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _sample(self, position: int) -> Sample:
        if position not in self._samples:
            self._samples[position] = load_sample(self.records[position])
        return self._samples[position]

    def crop(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint8 image h x w x 3, uint8 class map h x w, int32 instances h x w) at the model scale."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} crops")
        sample = self._sample(index % len(self.records))
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, index])))
        image, class_map, instances = paired_augment(
            [sample.image, sample.class_map, sample.instances.astype(np.int32)], self.source_crop, rng,
            flip=self.augment, rotate=self.augment)
        return (downsample_image(image, self.factor), downsample_labels(class_map, self.factor),
                downsample_labels(instances, self.factor))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image, class_map, instances = self.crop(index)
        return {
            "image": image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0,
            "condition": renderer_condition(class_map, instances),
            "mask": mask_sample(class_map, instances),
            "types": types_present(class_map),
        }


def grid_crops(records: Sequence[Record], source_crop: int, factor: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every non-overlapping source_crop tile of every record (no augmentation), downsampled: the held-back set."""
    out = []
    for record in records:
        sample = load_sample(record)
        height, width = sample.class_map.shape
        for top in range(0, height - source_crop + 1, source_crop):
            for left in range(0, width - source_crop + 1, source_crop):
                window = (slice(top, top + source_crop), slice(left, left + source_crop))
                out.append((downsample_image(sample.image[window], factor),
                            downsample_labels(sample.class_map[window], factor),
                            downsample_labels(sample.instances[window].astype(np.int32), factor)))
    return out
