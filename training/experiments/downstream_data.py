"""Data of the downstream benchmark (issue #17): held-back tiles, per-seed real crops and synthetic masks.

Per dataset the benchmark's held-back groups (training.data.benchmark_split) are the test set, scored whole.
The remaining (training) groups are shuffled per seed and cut in two halves: crops of the first half are the
REAL training crops, the masks of crops of the second half are rendered into SYNTHETIC crops, so a synthetic
crop never shows tissue of a tile that gave a real crop. The first k real crops and first 4k synthetic masks
of a seed are shared by every k (nested draws), and every arm of one seed uses the same crops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.core.model_store import ModelManifest
from training.data.shared_layout import Record, load_records, load_sample
from training.experiments.instance_metrics import three_class_target


@dataclass(frozen=True)
class Split:
    dataset: str
    train: tuple[Record, ...]
    test: tuple[Record, ...]

    @property
    def test_groups(self) -> list[str]:
        return sorted({r.group for r in self.test})

    @property
    def train_groups(self) -> list[str]:
        return sorted({r.group for r in self.train})


def benchmark_split(data_root: Path, dataset: str, held_back: Sequence[str]) -> Split:
    records = load_records(data_root, dataset)
    missing = sorted(set(held_back) - {r.group for r in records})
    if missing:
        raise ValueError(f"held-back groups {missing} are not in {data_root}/{dataset}; is this the shared data?")
    held = set(held_back)
    train = tuple(r for r in records if r.group not in held)
    test = tuple(r for r in records if r.group in held)
    if not train or not test:
        raise ValueError(f"{dataset}: the benchmark needs training and held-back groups, got {len(train)} / "
                         f"{len(test)} records")
    return Split(dataset, train, test)


@dataclass(frozen=True)
class Crops:
    """uint8 images [N, S, S, 3] (absent for mask-only sets), int32 instances [N, S, S], uint8 class maps."""

    images: np.ndarray | None
    instances: np.ndarray
    class_maps: np.ndarray
    sources: list[str]  # "<group>/<file>@y,x"


def _crop_many(records: Sequence[Record], count: int, size: int, rng: np.random.Generator,
               with_images: bool) -> Crops:
    cache: dict[Path, Any] = {}
    images, instances, class_maps, sources = [], [], [], []
    for _ in range(count):
        record = records[int(rng.integers(len(records)))]
        if record.image_path not in cache:
            cache[record.image_path] = load_sample(record)
        sample = cache[record.image_path]
        height, width = sample.class_map.shape
        if height < size or width < size:
            raise ValueError(f"{record.image_path} is {height}x{width}, smaller than the {size} px crop")
        y, x = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
        window = (slice(y, y + size), slice(x, x + size))
        inst = sample.instances if sample.instances is not None else np.zeros(sample.class_map.shape, np.uint16)
        instances.append(inst[window].astype(np.int32))
        class_maps.append(sample.class_map[window].astype(np.uint8))
        if with_images:
            images.append(sample.image[window])
        sources.append(f"{record.group}/{record.image_path.name}@{y},{x}")
    return Crops(np.stack(images) if with_images else None, np.stack(instances), np.stack(class_maps), sources)


@dataclass(frozen=True)
class SeedDraw:
    real: Crops
    synthetic_masks: Crops
    real_groups: list[str]
    mask_groups: list[str]


def draw_seed(split: Split, seed: int, n_real: int, n_synthetic: int, size: int) -> SeedDraw:
    """Real crops from one half of the training groups, synthetic masks from the other half."""
    rng = np.random.default_rng([seed, 17])
    groups = split.train_groups
    if len(groups) < 2:
        raise ValueError(f"{split.dataset}: need >= 2 training groups to keep real and synthetic tiles apart")
    order = [groups[i] for i in rng.permutation(len(groups))]
    real_groups, mask_groups = sorted(order[: len(order) // 2]), sorted(order[len(order) // 2:])
    real_records = [r for r in split.train if r.group in real_groups]
    mask_records = [r for r in split.train if r.group in mask_groups]
    real = _crop_many(real_records, n_real, size, np.random.default_rng([seed, 18]), with_images=True)
    masks = _crop_many(mask_records, n_synthetic, size, np.random.default_rng([seed, 19]), with_images=True)
    return SeedDraw(real, masks, real_groups, mask_groups)


@dataclass(frozen=True)
class TestImage:
    name: str
    group: str
    organ: str
    image: np.ndarray
    instances: np.ndarray


def test_image_info(dataset: str, record: Record) -> dict[str, str]:
    """Name, group and organ of a held-back image, from its record alone (no pixels read)."""
    organ = record.labels.get("organ", "colorectal" if dataset == "consep" else "unknown")
    return {"name": record.image_path.stem, "group": record.group, "organ": organ}


def test_images(split: Split) -> list[TestImage]:
    """Every held-back image whole (MoNuSeg 1000 px tiles, CoNSeP 256 px patches)."""
    out = []
    for record in split.test:
        sample = load_sample(record)
        inst = sample.instances if sample.instances is not None else np.zeros(sample.class_map.shape, np.uint16)
        out.append(TestImage(**test_image_info(split.dataset, record), image=sample.image,
                             instances=inst.astype(np.int32)))
    return out


def grid_crops(images: Sequence[np.ndarray], size: int, stride: int) -> np.ndarray:
    """All size x size crops on a stride grid of each image (for the distribution scores)."""
    crops = []
    for image in images:
        height, width = image.shape[:2]
        for y in range(0, height - size + 1, stride):
            for x in range(0, width - size + 1, stride):
                crops.append(image[y:y + size, x:x + size])
    return np.stack(crops)


def renderer_class_remap(manifest: ModelManifest, dataset: str) -> dict[int, int]:
    """The class ids the renderer was trained with for ``dataset`` (its config's per-source class_remap)."""
    sources = ((manifest.provenance.get("config") or {}).get("data") or {}).get("sources") or []
    for source in sources:
        if source.get("dataset") == dataset:
            return {int(k): int(v) for k, v in (source.get("class_remap") or {}).items()}
    raise ValueError(f"model {manifest.key} was not trained on {dataset}; its sources: "
                     f"{[s.get('dataset') for s in sources]}")


def remap(class_maps: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    lookup = np.arange(256, dtype=np.uint8)
    for source, target in mapping.items():
        lookup[source] = target
    return lookup[class_maps]


def renderer_saw(manifest: ModelManifest, groups: Sequence[str]) -> list[str]:
    """The given groups that the model's recorded split put in training."""
    trained = set(((manifest.provenance.get("split") or {}).get("groups") or {}).get("train") or [])
    return sorted(set(groups) & trained)


def targets(instances: np.ndarray) -> np.ndarray:
    return np.stack([three_class_target(i) for i in instances])
