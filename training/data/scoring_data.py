"""Data for the scoring models (histology encoder, tissue segmenters): splits, class schemes, batch sampling.

Numpy + Pillow only. Batches are a pure function of (seed, step): `np.random.default_rng([seed, step])` drives every
choice, so a resumed run draws exactly what an uninterrupted one would have. Decoded images are cached in memory
(the shared set is ~120 MiB decoded), which matters on a 2-core host where PNG decoding would rival the compute.

Splits reuse shared_layout.split_records per dataset with the renderers' fractions and seed, so a segmenter's
test images are exactly the renderer's held-back test images and the encoder never trains on them either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from training.data.augment import paired_augment
from training.data.benchmark_split import held_back_groups
from training.data.derived_labels import tissue_gland_class_map
from training.data.instance_targets import NUCLEUS_BOUNDARY_CLASSES, three_class_target
from training.data.shared_layout import (
    PatchRecord,
    Record,
    Sample,
    load_image,
    load_patch_records,
    load_records,
    load_sample,
    split_records,
)

# ------------------------------------------------------------------------------------------- encoder classes
GLAS_GRADES = ("healthy", "adenomatous", "moderately differentiated", "moderately-to-poorly differentiated",
               "poorly differentiated")
# MoNuSeg organs with >= 6 patients in the shared set get their own class; the rest (2 or fewer patients each, and
# brain, which only the held-out set has) share "other", so no class hinges on one or two slides.
MONUSEG_ORGANS = ("breast", "kidney", "lung", "prostate")
ENCODER_CLASSES: tuple[str, ...] = tuple(f"glas:{g}" for g in GLAS_GRADES) + tuple(
    f"monuseg:{o}" for o in MONUSEG_ORGANS) + ("monuseg:other",)
# Auxiliary "which source / stain" head: keeps IHC and CoNSeP tiles in the encoder's training distribution.
TISSUE_TYPES: tuple[str, ...] = ("glas_he_colon_20x", "monuseg_he_multiorgan_40x", "consep_he_colorectal_40x",
                                 "deepliif_ihc_ki67")
TISSUE_TYPE_OF_DATASET = {"glas": 0, "monuseg": 1, "consep": 2, "deepliif": 3}


def encoder_class_of(record: PatchRecord) -> int:
    """Class id in ENCODER_CLASSES of a patches128 record (weak, image-level label)."""
    if record.dataset == "glas":
        grade = record.labels.get("glas_grade5", "")
        if grade not in GLAS_GRADES:
            raise ValueError(f"patch {record.image_path} x={record.x} y={record.y}: unknown glas grade {grade!r}")
        return ENCODER_CLASSES.index(f"glas:{grade}")
    if record.dataset == "monuseg":
        organ = record.labels.get("monuseg_organ", "")
        name = f"monuseg:{organ}" if organ in MONUSEG_ORGANS else "monuseg:other"
        return ENCODER_CLASSES.index(name)
    raise ValueError(f"patch dataset {record.dataset!r} has no encoder class; valid: glas, monuseg")


# ------------------------------------------------------------------------------------------- splits
def split_per_dataset(records: Sequence[Record] | Sequence[PatchRecord], fractions: Sequence[float],
                      seed: int, held_back: str | Sequence[str] | None = None) -> dict[str, list]:
    """split_records applied to each dataset separately (so every dataset is represented in each split).

    `held_back` ("benchmark" or group names, as a training source's `held_back`) forces those groups to "test"."""
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for dataset in sorted({r.dataset for r in records}):
        forced = held_back_groups({"dataset": dataset, "held_back": held_back}) if held_back is not None else ()
        part = split_records([r for r in records if r.dataset == dataset], tuple(fractions), seed, held_back=forced)
        for name, rows in part.items():
            out[name].extend(rows)
    return out


def group_disjoint_halves(records: Sequence[PatchRecord], seed: int = 1) -> tuple[list[PatchRecord], list[PatchRecord]]:
    """Two halves of `records` with no group (patient) in both, each dataset split 50/50 by groups."""
    halves = split_per_dataset(records, (0.5, 0.5, 0.0), seed)
    return halves["train"], halves["val"]


def groups_of(records: Sequence[Record] | Sequence[PatchRecord]) -> list[str]:
    return sorted({r.group for r in records})


# ------------------------------------------------------------------------------------------- image cache
@dataclass
class ImageCache:
    """Decoded images / samples by path, loaded on first use."""

    images: dict[Path, np.ndarray] = field(default_factory=dict)
    samples: dict[Path, Sample] = field(default_factory=dict)

    def image(self, path: Path) -> np.ndarray:
        if path not in self.images:
            self.images[path] = load_image(path)
        return self.images[path]

    def sample(self, record: Record) -> Sample:
        if record.image_path not in self.samples:
            self.samples[record.image_path] = load_sample(record)
        return self.samples[record.image_path]


def patch_crop(cache: ImageCache, record: PatchRecord, rng: np.random.Generator | None, jitter: int = 0) -> np.ndarray:
    """uint8 size x size x 3 crop of a patch record; with rng, the window moves by up to +-jitter px (clipped to the
    image) and gets a random flip/rot90 (geometric only: colour is what FID must stay sensitive to)."""
    image = cache.image(record.image_path)
    size = record.size
    x, y = record.x, record.y
    if rng is not None and jitter > 0:
        x = int(np.clip(x + rng.integers(-jitter, jitter + 1), 0, image.shape[1] - size))
        y = int(np.clip(y + rng.integers(-jitter, jitter + 1), 0, image.shape[0] - size))
    crop = image[y:y + size, x:x + size]
    if crop.shape[:2] != (size, size):
        raise ValueError(f"patch at x={x} y={y} size={size} exceeds {record.image_path} {image.shape}")
    if rng is None:
        return np.ascontiguousarray(crop)
    return paired_augment([crop], None, rng)[0]


# ------------------------------------------------------------------------------------------- encoder batches
@dataclass
class EncoderBatchSampler:
    """Batches of (images uint8 [B, 128, 128, 3], class ids [B] (-1 = no grade/organ label), tissue types [B]).

    Patch items are drawn class-balanced (class uniformly, then a record of it) so the five GlaS grades and the
    organs weigh alike; `other_records` (CoNSeP / DeepLIIF images) fill `other_fraction` of each batch with random
    crops for the tissue-type head.
    """

    patch_records: Sequence[PatchRecord]
    other_records: Sequence[Record]
    batch_size: int
    seed: int
    other_fraction: float = 0.25
    crop: int = 128
    jitter: int = 32
    cache: ImageCache = field(default_factory=ImageCache)

    def __post_init__(self) -> None:
        if not self.patch_records:
            raise ValueError("EncoderBatchSampler needs at least one patch record")
        self.by_class: dict[int, list[PatchRecord]] = {}
        for record in self.patch_records:
            self.by_class.setdefault(encoder_class_of(record), []).append(record)
        self.classes = sorted(self.by_class)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        n_other = int(round(self.batch_size * self.other_fraction)) if self.other_records else 0
        images, classes, tissues = [], [], []
        for _ in range(self.batch_size - n_other):
            cls = self.classes[int(rng.integers(len(self.classes)))]
            members = self.by_class[cls]
            record = members[int(rng.integers(len(members)))]
            images.append(patch_crop(self.cache, record, rng, self.jitter))
            classes.append(cls)
            tissues.append(TISSUE_TYPE_OF_DATASET[record.dataset])
        for _ in range(n_other):
            record = self.other_records[int(rng.integers(len(self.other_records)))]
            (crop,) = paired_augment([self.cache.sample(record).image], self.crop, rng)
            images.append(crop)
            classes.append(-1)
            tissues.append(TISSUE_TYPE_OF_DATASET[record.dataset])
        return np.stack(images), np.asarray(classes, np.int64), np.asarray(tissues, np.int64)


# ------------------------------------------------------------------------------------------- segmenter schemes
@dataclass(frozen=True)
class SegmentationScheme:
    """How a dataset's records become (image, target class map) pairs for one segmenter.

    `partial_foreground` marks datasets whose masks only say nucleus/background (MoNuSeg): their target is
    1 for "any of the classes in foreground_classes" and 0 for background, and the loss treats it as such.
    """

    name: str
    class_names: tuple[str, ...]
    datasets: tuple[str, ...]
    derive: Callable[[str, Sample], np.ndarray]
    partial_foreground: tuple[str, ...] = ()
    foreground_classes: tuple[int, ...] = ()


def _class_map(dataset: str, sample: Sample) -> np.ndarray:
    return sample.class_map


def _tissue_gland(dataset: str, sample: Sample) -> np.ndarray:
    return tissue_gland_class_map(sample.image, sample.class_map)


def _nucleus_boundary(dataset: str, sample: Sample) -> np.ndarray:
    """The downstream benchmark's 3-class target, from the WHOLE image's instance map (the sampler crops it
    afterwards, so a nucleus cut by the crop keeps the boundary it has with a neighbour outside the crop)."""
    if sample.instances is None:
        raise ValueError(f"scheme nuclei_boundary needs instance maps; a {dataset} record has none")
    return three_class_target(sample.instances)


SEGMENTATION_SCHEMES: dict[str, SegmentationScheme] = {
    # CoNSeP's 5 classes; MoNuSeg nuclei are untyped -> trained as "any of 1..4" (renderer-he-nuclei's class 5).
    "he_nuclei": SegmentationScheme(
        name="he_nuclei",
        class_names=("background", "other", "inflammatory", "epithelial", "spindle"),
        datasets=("consep", "monuseg"), derive=_class_map,
        partial_foreground=("monuseg",), foreground_classes=(1, 2, 3, 4)),
    # Instance boundaries (issue #17): background / interior / inner boundary of each nucleus, as the downstream
    # benchmark's segmenter is trained (instance_targets.three_class_target); both datasets are fully labelled.
    "nuclei_boundary": SegmentationScheme(
        name="nuclei_boundary", class_names=NUCLEUS_BOUNDARY_CLASSES, datasets=("consep", "monuseg"),
        derive=_nucleus_boundary),
    # renderer-he-glands' derived 3-class map (training/data/derived_labels.py).
    "he_glands": SegmentationScheme(
        name="he_glands", class_names=("non-tissue", "stroma", "gland"), datasets=("glas",), derive=_tissue_gland),
    "ihc_ki67": SegmentationScheme(
        name="ihc_ki67", class_names=("background", "ki67_negative", "ki67_positive", "cell_boundary"),
        datasets=("deepliif",), derive=_class_map),
}


def segmentation_scheme(name: str) -> SegmentationScheme:
    if name not in SEGMENTATION_SCHEMES:
        raise ValueError(f"unknown segmentation scheme {name!r}; valid schemes: {sorted(SEGMENTATION_SCHEMES)}")
    return SEGMENTATION_SCHEMES[name]


def load_scheme_records(data_root: Path, scheme: SegmentationScheme) -> list[Record]:
    records: list[Record] = []
    for dataset in scheme.datasets:
        records.extend(load_records(data_root, dataset))
    return records


@dataclass
class SegmenterBatchSampler:
    """Batches of (images uint8 [B, crop, crop, 3], targets uint8 [B, crop, crop], partial flags bool [B]).

    Datasets are drawn with equal probability (CoNSeP's 464 patches vs MoNuSeg's 30 tiles would otherwise be
    decided by record counts), then a record uniformly, then a random crop + flip/rot90 applied to image and map.
    """

    records: Sequence[Record]
    scheme: SegmentationScheme
    batch_size: int
    crop: int
    seed: int
    cache: ImageCache = field(default_factory=ImageCache)
    targets: dict[Path, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.records:
            raise ValueError("SegmenterBatchSampler needs at least one record")
        self.by_dataset: dict[str, list[Record]] = {}
        for record in self.records:
            self.by_dataset.setdefault(record.dataset, []).append(record)
        self.datasets = sorted(self.by_dataset)

    def target(self, record: Record) -> np.ndarray:
        if record.image_path not in self.targets:
            self.targets[record.image_path] = self.scheme.derive(record.dataset, self.cache.sample(record))
        return self.targets[record.image_path]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        images, targets, partial = [], [], []
        for _ in range(self.batch_size):
            members = self.by_dataset[self.datasets[int(rng.integers(len(self.datasets)))]]
            record = members[int(rng.integers(len(members)))]
            image, target = paired_augment([self.cache.sample(record).image, self.target(record)], self.crop, rng)
            images.append(image)
            targets.append(target)
            partial.append(record.dataset in self.scheme.partial_foreground)
        return np.stack(images), np.stack(targets), np.asarray(partial, bool)


def records_by_split_names(splits: Mapping[str, Sequence[Record] | Sequence[PatchRecord]]) -> dict[str, list[str]]:
    """{split: sorted group names}: what checkpoints and manifests record about the split."""
    return {name: groups_of(rows) for name, rows in splits.items()}


__all__ = [
    "ENCODER_CLASSES", "TISSUE_TYPES", "SEGMENTATION_SCHEMES", "EncoderBatchSampler", "ImageCache",
    "SegmentationScheme", "SegmenterBatchSampler", "encoder_class_of", "group_disjoint_halves", "load_patch_records",
    "load_scheme_records", "patch_crop", "records_by_split_names", "segmentation_scheme", "split_per_dataset",
]
