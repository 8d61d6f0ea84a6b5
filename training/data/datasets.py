"""torch Datasets over shared-layout records (the only torch module in training/data).

Every random choice of an item comes from np.random.SeedSequence([seed, epoch, index]), so an item is a pure
function of (seed, epoch, index): reproducible regardless of DataLoader worker count or order. Call
`set_epoch(e)` before each epoch for fresh crops/noise (works with non-persistent DataLoader workers, which
re-pickle the dataset every epoch; with persistent workers the epoch stays at its value at worker start).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from services.core import mask_ops
from training.data.augment import paired_augment
from training.data.coarsening import Coarsening, coarsen
from training.data.polygon_masks import PolygonSettings, polygon_mask
from training.data.shared_layout import Record, Sample, load_sample


def _item_rng(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, int]:
    """(augmentation generator, noise seed) for one item, both derived from (seed, epoch, index)."""
    sequence = np.random.SeedSequence([int(seed), int(epoch), int(index)])
    noise_seed = int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))
    return np.random.Generator(np.random.PCG64(sequence)), noise_seed


def _remap_lut(class_remap: Mapping[int, int] | None) -> np.ndarray | None:
    if not class_remap:
        return None
    lut = np.arange(256, dtype=np.uint8)
    for source, target in class_remap.items():
        if not (0 <= int(source) <= 255 and 0 <= int(target) <= 255):
            raise ValueError(f"class_remap entry {source} -> {target} outside 0..255")
        lut[int(source)] = int(target)
    return lut


def _to_signed_unit(array: np.ndarray) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0)


class _RecordDataset(Dataset):
    """Common part: records, virtual length, epoch, optional in-memory cache of decoded samples."""

    def __init__(self, records: Sequence[Record], seed: int, length: int | None, cache: bool) -> None:
        if not records:
            raise ValueError("records is empty")
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1 or None, got {length}")
        self.records = list(records)
        self.seed = int(seed)
        self.length = len(self.records) if length is None else int(length)
        self.epoch = 0
        self.cache = cache
        self._samples: dict[int, Sample] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _sample(self, index: int) -> Sample:
        # Records are visited cyclically, so a virtual epoch longer than the record list covers them evenly.
        position = index % len(self.records)
        if position in self._samples:
            return self._samples[position]
        sample = load_sample(self.records[position])
        if self.cache:
            self._samples[position] = sample
        return sample

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for dataset of length {self.length}")
        return int(index)


class MaskToImageDataset(_RecordDataset):
    """(label, image) pairs for the mask -> image renderer.

    label = mask_ops.build_generator_input(class_map, num_classes, noise, edges): float32 [C', h, w] with
    C' = num_classes (+1 if noise_spacing) (+1 if use_edges); image = float32 [3, h, w] in [-1, 1].
    class_remap maps source class ids to model class ids (unlisted ids are kept), applied before one-hot.
    Noise is mask_ops.noise_label at the crop size, seeded per item from (seed, epoch, index).
    """

    def __init__(
        self,
        records: Sequence[Record],
        crop: int,
        num_classes: int,
        class_remap: dict | None = None,
        noise_spacing: float | None = None,
        use_edges: bool = False,
        seed: int = 0,
        length: int | None = None,
        *,
        cache: bool = False,
    ) -> None:
        super().__init__(records, seed, length, cache)
        if use_edges:
            missing = [str(r.image_path) for r in self.records if r.instance_path is None]
            if missing:
                raise ValueError(
                    f"use_edges needs instance maps; {len(missing)} records have none, e.g. {missing[0]}"
                )
        self.crop = int(crop)
        self.num_classes = int(num_classes)
        self.lut = _remap_lut(class_remap)
        self.noise_spacing = noise_spacing
        self.use_edges = use_edges

    @property
    def label_channels(self) -> int:
        return mask_ops.generator_input_channels(self.num_classes, self.noise_spacing is not None, self.use_edges)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = self._check_index(index)
        sample = self._sample(index)
        rng, noise_seed = _item_rng(self.seed, self.epoch, index)
        arrays = [sample.image, sample.class_map]
        if self.use_edges:
            arrays.append(sample.instances)
        augmented = paired_augment(arrays, self.crop, rng)
        image, class_map = augmented[0], augmented[1]
        if self.lut is not None:
            class_map = self.lut[class_map]
        edges = mask_ops.instance_edges(augmented[2]) if self.use_edges else None
        noise = (
            mask_ops.noise_label(class_map.shape, self.noise_spacing, seed=noise_seed)
            if self.noise_spacing is not None
            else None
        )
        label = mask_ops.build_generator_input(class_map, self.num_classes, noise, edges)
        return {
            "label": torch.from_numpy(label),
            "image": _to_signed_unit(image.transpose(2, 0, 1)),
        }


class PolygonMaskDataset(MaskToImageDataset):
    """MaskToImageDataset whose class map is the polygon-style region mask of the nuclei class map.

    The region mask (training.data.polygon_masks.polygon_mask, `polygon` = PolygonSettings fields) is derived
    from the WHOLE record before cropping, so a crop sees the regions its tile context implies, and is cached
    with the decoded sample. Used by the noise-frequency ablation: "Polygons" (+ noise_spacing = "Polygons +
    Noise"). use_edges is rejected: a polygon mask has no instances (the point of the ablation).
    """

    def __init__(self, records: Sequence[Record], crop: int, num_classes: int, class_remap: dict | None = None,
                 noise_spacing: float | None = None, use_edges: bool = False, seed: int = 0,
                 length: int | None = None, *, cache: bool = False, polygon: Mapping | None = None) -> None:
        if use_edges:
            raise ValueError("PolygonMaskDataset has no instance edges (polygon masks carry no single cells)")
        super().__init__(records, crop, num_classes, class_remap, noise_spacing, False, seed, length, cache=cache)
        self.settings = PolygonSettings(**dict(polygon or {}))
        # The remap must happen before region derivation (polygon ids = model ids), and only once.
        self._region_lut, self.lut = self.lut, None

    def _sample(self, index: int) -> Sample:
        position = index % len(self.records)
        if position in self._samples:
            return self._samples[position]
        sample = load_sample(self.records[position])
        class_map = sample.class_map if self._region_lut is None else self._region_lut[sample.class_map]
        regions = polygon_mask(class_map, self.num_classes, self.settings)
        derived = Sample(image=sample.image, class_map=regions, instances=None, coarse=sample.coarse)
        if self.cache:
            self._samples[position] = derived
        return derived


class CoarseToFineDataset(_RecordDataset):
    """(coarse, fine) tissue-mask pairs for the mask refiner, from random crops of all records.

    fine = mask_ops.tissue_mask(crop, stain). coarse = one recipe of ``coarsenings`` drawn uniformly per item
    (training.data.coarsening; default: PriorPath's opening 5x5 then closing 10x10). Masks are float32 [1, h, w]
    with tissue = 1 and air = -1. With ``guide``, item["guide"] is the record's region annotation (GlaS glands:
    +1 inside a gland, -1 outside), replaced by 0 ("unknown") with probability ``guide_dropout`` so one model
    serves callers with and without a layout. With ``noise``, item["noise"] is N(0, 1) per pixel: the stochastic
    input that lets one coarse mask yield several fine ones. Length is the virtual epoch size (records cycled).
    """

    def __init__(
        self,
        records: Sequence[Record],
        crop: int,
        stain: str = "he",
        open_size: int = 5,
        close_size: int = 10,
        seed: int = 0,
        length: int | None = None,
        *,
        cache: bool = False,
        coarsenings: Sequence[Coarsening] | None = None,
        guide: bool = False,
        guide_dropout: float = 0.0,
        noise: bool = False,
    ) -> None:
        super().__init__(records, seed, length, cache)
        mask_ops.tissue_threshold(stain)  # validate early
        if not 0.0 <= guide_dropout <= 1.0:
            raise ValueError(f"guide_dropout must be in [0, 1], got {guide_dropout}")
        self.crop = int(crop)
        self.stain = stain
        self.open_size = int(open_size)
        self.close_size = int(close_size)
        self.coarsenings = tuple(coarsenings or ())
        self.guide = guide
        self.guide_dropout = float(guide_dropout)
        self.noise = noise

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = self._check_index(index)
        sample = self._sample(index)
        rng, _ = _item_rng(self.seed, self.epoch, index)
        arrays = [sample.image, (sample.class_map > 0).astype(np.uint8)] if self.guide else [sample.image]
        augmented = paired_augment(arrays, self.crop, rng)
        fine = mask_ops.tissue_mask(augmented[0], self.stain)
        if self.coarsenings:
            coarse = coarsen(fine, self.coarsenings[int(rng.integers(len(self.coarsenings)))])
        else:
            coarse = mask_ops.coarsen_mask(fine, self.open_size, self.close_size)
        item = {
            "coarse": torch.from_numpy(np.where(coarse, 1.0, -1.0).astype(np.float32)[None]),
            "fine": torch.from_numpy(np.where(fine, 1.0, -1.0).astype(np.float32)[None]),
        }
        if self.guide:
            known = rng.random() >= self.guide_dropout
            guide = np.where(augmented[1] > 0, 1.0, -1.0) if known else np.zeros(fine.shape)
            item["guide"] = torch.from_numpy(guide.astype(np.float32)[None])
        if self.noise:
            item["noise"] = torch.from_numpy(rng.standard_normal(fine.shape, dtype=np.float32)[None])
        return item
