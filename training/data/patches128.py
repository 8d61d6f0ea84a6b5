"""Class-labelled 128x128 H&E crops from `patches128/index.csv` (see shared/data/DATA.md, section patches128).

Each index row points at a crop `image[y:y+128, x:x+128]` of a staged glas or monuseg image and carries the
image-level (weak) labels of its source image.

Class scheme `grade5_organ` (one label set over both datasets):
    glas rows    -> "glas:<grade5>"    healthy, adenomatous, moderately / moderately-to-poorly / poorly differentiated
    monuseg rows -> "monuseg:<organ>"  breast, kidney, lung, prostate, ... (organ of the TCGA slide)
A class is kept only if it has at least `min_source_images` distinct source images (default 3). Why: the labels
are per source image, so a class with one or two source images is really one or two tissue samples, and a grouped
split cannot hold out an unseen image for it while still training on more than one. On the shared set this keeps
the 5 GlaS grades (6-20 source images, 138-338 crops each) and the 4 large MoNuSeg organs (breast, kidney, lung,
prostate: 6-7 source images, 277-343 crops each) and drops colon, bladder (2 images) and liver, stomach (1 image).
Scheme `grade5_organ_all` keeps every class (min_source_images is ignored) and `benign_malignant_organ` replaces
the five grades with glas:benign / glas:malignant.

Class ids are fixed by order, not by the data: GlaS classes in grade order, then MoNuSeg organs in the order of
patches128/classes.json, with dropped classes removed. The split is grouped by source image (no source image in
two splits) and stratified by class; which images are held out depends only on the seed and the image names.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

PATCH_SIZE = 128
INDEX_RELATIVE_PATH = Path("patches128") / "index.csv"
CLASSES_RELATIVE_PATH = Path("patches128") / "classes.json"
SPLITS = ("train", "val")

# scheme name -> (glas label column, monuseg label column, honours min_source_images)
LABEL_SCHEMES: dict[str, tuple[str, str, bool]] = {
    "grade5_organ": ("glas_grade5", "monuseg_organ", True),
    "grade5_organ_all": ("glas_grade5", "monuseg_organ", False),
    "benign_malignant_organ": ("glas_benign_malignant", "monuseg_organ", True),
}
_DATASET_LABEL_COLUMN_INDEX = {"glas": 0, "monuseg": 1}


@dataclass(frozen=True)
class PatchRecord:
    """One crop: where it lives and which class it belongs to."""

    image: str  # path relative to the data root, e.g. "glas/images/testA_1.png"
    x: int
    y: int
    source_image: str
    class_name: str  # "glas:healthy", "monuseg:breast", ...


@dataclass(frozen=True)
class PatchIndex:
    """The class list and the train/val records of one (data root, scheme, seed) choice."""

    class_names: tuple[str, ...]
    splits: dict[str, tuple[PatchRecord, ...]]
    dropped_classes: dict[str, int]  # class name -> number of source images (below min_source_images)

    def class_id(self, class_name: str) -> int:
        try:
            return self.class_names.index(class_name)
        except ValueError:
            raise KeyError(f"unknown class {class_name!r}; valid: {list(self.class_names)}") from None

    def counts(self, split: str) -> dict[str, int]:
        """Crops per class in `split`, in class-id order."""
        per_class = Counter(r.class_name for r in self.records(split))
        return {name: per_class.get(name, 0) for name in self.class_names}

    def source_image_counts(self, split: str) -> dict[str, int]:
        per_class = Counter(c for _, c in {(r.source_image, r.class_name) for r in self.records(split)})
        return {name: per_class.get(name, 0) for name in self.class_names}

    def records(self, split: str) -> tuple[PatchRecord, ...]:
        """The crops of `split` ("train" or "val")."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; valid: {list(self.splits)}")
        return self.splits[split]


def load_patch_index(
    data_root: str | Path,
    *,
    label_scheme: str = "grade5_organ",
    min_source_images: int = 3,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> PatchIndex:
    """Read patches128/index.csv under `data_root`, assign classes and split grouped by source image."""
    if label_scheme not in LABEL_SCHEMES:
        raise KeyError(f"unknown label_scheme {label_scheme!r}; valid: {sorted(LABEL_SCHEMES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(data_root)
    index_path = root / INDEX_RELATIVE_PATH
    if not index_path.is_file():
        raise FileNotFoundError(f"patch index not found: {index_path} (is --data-root {root} right?)")
    label_columns = LABEL_SCHEMES[label_scheme]
    honour_minimum = label_columns[2]

    records: list[PatchRecord] = []
    with index_path.open(newline="") as f:
        for row in csv.DictReader(f):
            dataset = row["dataset"]
            if dataset not in _DATASET_LABEL_COLUMN_INDEX:
                raise ValueError(f"{index_path}: unknown dataset {dataset!r}; valid: {list(_DATASET_LABEL_COLUMN_INDEX)}")
            if int(row["size"]) != PATCH_SIZE:
                raise ValueError(f"{index_path}: crop size {row['size']} != {PATCH_SIZE} for {row['image']}")
            label = row[label_columns[_DATASET_LABEL_COLUMN_INDEX[dataset]]]
            if not label:
                raise ValueError(f"{index_path}: empty label for {row['image']} at ({row['x']}, {row['y']})")
            records.append(
                PatchRecord(row["image"], int(row["x"]), int(row["y"]), row["source_image"], f"{dataset}:{label}")
            )

    ordered = _ordered_class_names(root, label_columns, {r.class_name for r in records})
    sources_per_class: dict[str, set[str]] = {name: set() for name in ordered}
    for r in records:
        sources_per_class[r.class_name].add(r.source_image)
    minimum = min_source_images if honour_minimum else 1
    dropped = {name: len(s) for name, s in sources_per_class.items() if len(s) < minimum}
    class_names = tuple(name for name in ordered if name not in dropped)
    if not class_names:
        raise ValueError(f"no class in {index_path} has >= {minimum} source images (scheme {label_scheme!r})")

    val_sources: set[str] = set()
    for name in class_names:
        sources = sorted(sources_per_class[name], key=lambda s: _stable_hash(f"{seed}:{s}"))
        # Hold out at least one image when the class can spare it (>= 2 left for training).
        n_val = max(1, math.floor(val_fraction * len(sources) + 0.5)) if val_fraction > 0 and len(sources) >= 3 else 0
        val_sources.update(sources[:n_val])
    kept = [r for r in records if r.class_name in class_names]
    splits = {
        "train": tuple(r for r in kept if r.source_image not in val_sources),
        "val": tuple(r for r in kept if r.source_image in val_sources),
    }
    return PatchIndex(class_names=class_names, splits=splits, dropped_classes=dropped)


def _ordered_class_names(root: Path, label_columns: tuple[str, str, bool], present: set[str]) -> list[str]:
    """GlaS classes then MoNuSeg classes, each in the label-set order of classes.json (fixed ids)."""
    classes_path = root / CLASSES_RELATIVE_PATH
    label_sets: dict[str, list[str]] = json.loads(classes_path.read_text())["label_sets"] if classes_path.is_file() else {}
    ordered: list[str] = []
    for dataset, column in zip(("glas", "monuseg"), label_columns[:2]):
        ordered += [f"{dataset}:{label}" for label in label_sets.get(column, [])]
    # Labels missing from classes.json (or no classes.json, as in small fixtures) follow in sorted order.
    ordered = [name for name in ordered if name in present]
    return ordered + sorted(present - set(ordered))


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_crops(data_root: str | Path, records: tuple[PatchRecord, ...]) -> np.ndarray:
    """uint8 [N, 128, 128, 3] crops; each source image is decoded once."""
    root = Path(data_root)
    crops = np.empty((len(records), PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    decoded: dict[str, np.ndarray] = {}
    for i, r in enumerate(records):
        if r.image not in decoded:
            decoded[r.image] = np.asarray(Image.open(root / r.image).convert("RGB"))
        crop = decoded[r.image][r.y : r.y + PATCH_SIZE, r.x : r.x + PATCH_SIZE]
        if crop.shape != (PATCH_SIZE, PATCH_SIZE, 3):
            raise ValueError(f"crop ({r.x}, {r.y}) of {r.image} is {crop.shape[:2]}, outside the image")
        crops[i] = crop
    return crops


class Patch128Dataset(Dataset):
    """(image float32 [3, 128, 128] in [-1, 1], class id int) with random dihedral augmentation.

    All crops are decoded into memory once (the shared set is ~130 MB as uint8). Augmentation draws from the
    dataset's own torch.Generator (reseed with `reseed`) so a resumed run can continue deterministically;
    use it with num_workers=0.
    """

    def __init__(
        self,
        data_root: str | Path,
        index: PatchIndex,
        split: str = "train",
        *,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        self.records = index.records(split)
        if not self.records:
            raise ValueError(f"split {split!r} is empty under {data_root}")
        self.class_names = index.class_names
        self.class_ids = torch.tensor([index.class_id(r.class_name) for r in self.records], dtype=torch.int64)
        self.crops = torch.from_numpy(load_crops(data_root, self.records)).permute(0, 3, 1, 2).contiguous()
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def set_class_ids(self, class_ids: list[int] | torch.Tensor) -> None:
        """Replace the per-crop class ids (e.g. by finer condition ids such as MEP prompts), same crop order."""
        ids = torch.as_tensor(class_ids, dtype=torch.int64)
        if ids.shape != (len(self.records),):
            raise ValueError(f"need one class id per crop ({len(self.records)}), got shape {tuple(ids.shape)}")
        self.class_ids = ids

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.crops[i]
        if self.augment:
            # One of the 8 symmetries of the square: tissue has no canonical orientation.
            quarter_turns, flip = torch.randint(0, 4, (2,), generator=self.generator).tolist()
            image = torch.rot90(image, quarter_turns, dims=(1, 2))
            if flip % 2:
                image = torch.flip(image, dims=(2,))
        return image.float().div(127.5).sub(1.0), int(self.class_ids[i])


def class_balanced_weights(class_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample weight 1 / (crops of its class): every class is drawn equally often in expectation."""
    counts = torch.bincount(class_ids)
    return 1.0 / counts[class_ids].double()

