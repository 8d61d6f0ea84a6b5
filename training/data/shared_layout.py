"""Reader for the shared data layout (<root>/<dataset>/manifest.csv + images/ masks/ instances/ coarse_masks/).

Numpy + Pillow only (no torch), so scripts and tests can read records without the training extra.
The layout is documented in shared/data/DATA.md; tests/fixtures/data/ is a small sample of it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetLayout:
    """How one dataset's manifest maps onto Record: the grouping column and the image-level label columns."""

    group_column: str
    label_columns: tuple[str, ...]
    has_instances: bool
    has_coarse: bool


# group_column is the unit of splitting: a patient where the source records one, else the source image
# (CoNSeP patches of one tile, DeepLIIF crops) so that no tissue appears in two splits.
LAYOUTS: dict[str, DatasetLayout] = {
    "monuseg": DatasetLayout(
        group_column="patient",
        label_columns=("organ", "source_image", "original_split", "instance_source", "magnification"),
        has_instances=True,
        has_coarse=False,
    ),
    "consep": DatasetLayout(
        group_column="source_image",
        label_columns=("source_image", "original_split", "magnification"),
        has_instances=True,
        has_coarse=False,
    ),
    "glas": DatasetLayout(
        group_column="patient",
        label_columns=("grade_glas", "grade5", "source_image", "original_split", "magnification"),
        has_instances=True,
        has_coarse=True,
    ),
    "deepliif": DatasetLayout(
        group_column="source_image",
        label_columns=("stain", "kind", "source_image"),
        has_instances=False,
        has_coarse=False,
    ),
}


def dataset_layout(dataset: str) -> DatasetLayout:
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {sorted(LAYOUTS)}")
    return LAYOUTS[dataset]


@dataclass(frozen=True)
class Record:
    """One image with its masks. Paths are absolute; `group` is the unit of splitting ("<dataset>:<id>")."""

    dataset: str
    image_path: Path
    mask_path: Path
    instance_path: Path | None
    coarse_path: Path | None
    group: str
    # Image-level labels as written in the manifest (empty values dropped). Excluded from hashing (dicts are
    # unhashable) but included in equality.
    labels: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, eq=False)
class Sample:
    """Decoded arrays of one Record. class_map/instances/coarse share the image's H x W."""

    image: np.ndarray  # uint8 H x W x 3 RGB
    class_map: np.ndarray  # uint8 H x W class ids (classes.json)
    instances: np.ndarray | None  # uint16 H x W, 0 = background
    coarse: np.ndarray | None  # uint8 H x W {0, 1} (glas only)


def read_manifest(data_root: Path, dataset: str) -> list[dict[str, str]]:
    manifest = Path(data_root) / dataset / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest for dataset {dataset!r} at {manifest}")
    with manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


def load_records(data_root: Path, dataset: str) -> list[Record]:
    """Records of <data_root>/<dataset>/manifest.csv in manifest order.

    Rows without a mask (DeepLIIF's unlabeled ROIs) are skipped: every Record has a class map.
    """
    layout = dataset_layout(dataset)
    base = Path(data_root) / dataset
    records: list[Record] = []
    for row_number, row in enumerate(read_manifest(data_root, dataset), start=2):
        if not row.get("mask"):
            continue
        group_value = row.get(layout.group_column, "")
        if not group_value:
            raise ValueError(
                f"{base / 'manifest.csv'} line {row_number}: empty group column {layout.group_column!r}"
            )
        instances = row.get("instances") or None
        coarse = row.get("coarse_mask") or None
        records.append(
            Record(
                dataset=dataset,
                image_path=base / row["image"],
                mask_path=base / row["mask"],
                instance_path=base / instances if instances else None,
                coarse_path=base / coarse if coarse else None,
                group=f"{dataset}:{group_value}",
                labels={key: row[key] for key in layout.label_columns if row.get(key)},
            )
        )
    return records


def _stable_shuffle(items: Sequence[str], seed: int) -> list[str]:
    """Order `items` by keys from the raw PCG64 stream (stable across NumPy versions, unlike Generator methods)."""
    keys = np.random.PCG64(int(seed)).random_raw(len(items))
    order = sorted(range(len(items)), key=lambda i: (int(keys[i]), items[i]))
    return [items[i] for i in order]


def _split_counts(n_groups: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder allocation of groups; every split with a positive fraction gets >= 1 group when
    there are enough groups (taken from the currently largest split)."""
    exact = [f * n_groups for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n_groups - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n_groups >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split_records(
    records: Sequence[Record] | Sequence[PatchRecord],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    held_back: Sequence[str] = (),
) -> dict[str, list[Record]]:
    """Deterministic grouped split into {"train", "val", "test"}.

    `held_back` groups (e.g. the downstream benchmark's patients, training.data.benchmark_split) go to "test"
    whatever the draw; the fractions then split the remaining groups, so no held-back group can reach training.

    Whole groups (patients / source images) are assigned, so no group is in two splits. Fractions apply to
    the number of groups (not records), allocated by largest remainder; a split with a positive fraction gets
    at least one group whenever there are at least as many groups as such splits. Groups are shuffled by
    `seed` from the raw PCG64 stream (same seed -> same split on any NumPy). Records keep their input order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    forced = set(held_back)
    groups = sorted({record.group for record in records} - forced)
    shuffled = _stable_shuffle(groups, seed)
    counts = _split_counts(len(groups), fractions)
    assignment: dict[str, str] = {group: "test" for group in forced}
    start = 0
    for name, count in zip(SPLIT_NAMES, counts):
        for group in shuffled[start : start + count]:
            assignment[group] = name
        start += count
    splits: dict[str, list[Record]] = {name: [] for name in SPLIT_NAMES}
    for record in records:
        splits[assignment[record.group]].append(record)
    return splits


def _read_2d(path: Path, dtype: type[np.generic], what: str) -> np.ndarray:
    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"{what} {path} must be single-channel, got shape {array.shape}")
    if array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise ValueError(f"{what} {path} has values outside {np.dtype(dtype).name}")
    return array.astype(dtype, copy=False)


def load_image(path: Path) -> np.ndarray:
    """uint8 H x W x 3 RGB of an image file (PNG or JPEG)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_sample(record: Record) -> Sample:
    image = load_image(record.image_path)
    class_map = _read_2d(record.mask_path, np.uint8, "mask")
    instances = _read_2d(record.instance_path, np.uint16, "instance map") if record.instance_path else None
    coarse = _read_2d(record.coarse_path, np.uint8, "coarse mask") if record.coarse_path else None
    for name, array in (("mask", class_map), ("instances", instances), ("coarse mask", coarse)):
        if array is not None and array.shape != image.shape[:2]:
            raise ValueError(
                f"{record.image_path}: {name} shape {array.shape} differs from image shape {image.shape[:2]}"
            )
    return Sample(image=image, class_map=class_map, instances=instances, coarse=coarse)


@dataclass(frozen=True)
class PatchRecord:
    """One row of patches128/index.csv: a labelled size x size crop of a staged glas/monuseg image."""

    dataset: str
    image_path: Path
    x: int
    y: int
    size: int
    group: str  # same group as the image's Record ("<dataset>:<patient>") when the manifest is present
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def load_patch_records(data_root: Path) -> list[PatchRecord]:
    """Records of <data_root>/patches128/index.csv; labels = the non-empty label columns (glas_grade5, ...).

    `group` is looked up from the source dataset's manifest (patient for glas and monuseg), so patches split
    with split_records never share a patient across splits; without that manifest it falls back to
    "<dataset>:<source_image>".
    """
    index = Path(data_root) / "patches128" / "index.csv"
    if not index.is_file():
        raise FileNotFoundError(f"no patch index at {index}")
    group_of: dict[tuple[str, str], str] = {}
    for dataset in ("glas", "monuseg"):
        if (Path(data_root) / dataset / "manifest.csv").is_file():
            column = dataset_layout(dataset).group_column
            for row in read_manifest(data_root, dataset):
                group_of[(dataset, row["source_image"])] = f"{dataset}:{row[column]}"
    positional = {"dataset", "image", "x", "y", "size", "source_image", "mask_fraction", "tissue_fraction"}
    records = []
    with index.open(newline="") as handle:
        for row in csv.DictReader(handle):
            records.append(
                PatchRecord(
                    dataset=row["dataset"],
                    image_path=Path(data_root) / row["image"],
                    x=int(row["x"]),
                    y=int(row["y"]),
                    size=int(row["size"]),
                    group=group_of.get(
                        (row["dataset"], row["source_image"]), f"{row['dataset']}:{row['source_image']}"
                    ),
                    labels={k: v for k, v in row.items() if k not in positional and v},
                )
            )
    return records


def load_patch(record: PatchRecord) -> np.ndarray:
    """uint8 size x size x 3 crop of a PatchRecord."""
    image = load_image(record.image_path)
    crop = image[record.y : record.y + record.size, record.x : record.x + record.size]
    if crop.shape[:2] != (record.size, record.size):
        raise ValueError(f"patch at x={record.x} y={record.y} size={record.size} exceeds {record.image_path}")
    return crop
