"""training.data on the real fixture sample (tests/fixtures/data): records, splits, augmentation, datasets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.measure import label as connected_components

from services.core import mask_ops
from training.data.augment import paired_augment
from training.data.shared_layout import (
    LAYOUTS,
    PatchRecord,
    Record,
    load_patch,
    load_patch_records,
    load_records,
    load_sample,
    split_records,
)

FIXTURE_DATA = Path(__file__).resolve().parents[2] / "fixtures" / "data"
EXPECTED_COUNTS = {"monuseg": 3, "consep": 4, "glas": 3, "deepliif": 2}


def synthetic_records(n_groups: int, per_group: int = 3) -> list[Record]:
    return [
        Record(
            dataset="synthetic",
            image_path=Path(f"/nowhere/{g}_{i}.png"),
            mask_path=Path(f"/nowhere/{g}_{i}_mask.png"),
            instance_path=None,
            coarse_path=None,
            group=f"synthetic:{g}",
            labels={},
        )
        for g in range(n_groups)
        for i in range(per_group)
    ]


# ---------------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("dataset", sorted(EXPECTED_COUNTS))
def test_records_load_from_the_fixture_sample(dataset: str) -> None:
    records = load_records(FIXTURE_DATA, dataset)
    assert len(records) == EXPECTED_COUNTS[dataset]
    layout = LAYOUTS[dataset]
    num_classes = len(json.loads((FIXTURE_DATA / dataset / "classes.json").read_text())["mask_classes"])
    for record in records:
        assert record.dataset == dataset and record.group.startswith(f"{dataset}:")
        assert record.image_path.is_file() and record.mask_path.is_file()
        assert (record.instance_path is not None) == layout.has_instances
        assert (record.coarse_path is not None) == layout.has_coarse
        sample = load_sample(record)
        height, width = sample.image.shape[:2]
        assert sample.image.dtype == np.uint8 and sample.image.shape == (height, width, 3)
        assert sample.class_map.dtype == np.uint8 and sample.class_map.shape == (height, width)
        assert int(sample.class_map.max()) < num_classes
        if layout.has_instances:
            assert sample.instances is not None and sample.instances.dtype == np.uint16
            assert sample.instances.shape == (height, width)
        else:
            assert sample.instances is None
        if layout.has_coarse:
            assert sample.coarse is not None and set(np.unique(sample.coarse)) <= {0, 1}
        else:
            assert sample.coarse is None


def test_record_groups_and_labels() -> None:
    monuseg = load_records(FIXTURE_DATA, "monuseg")
    assert [r.labels["organ"] for r in monuseg] == ["lung", "breast", "colon"]
    assert monuseg[0].group == "monuseg:TCGA-21-5784"
    glas = load_records(FIXTURE_DATA, "glas")
    assert [r.group for r in glas] == ["glas:4", "glas:4", "glas:1"]
    assert glas[2].labels["grade5"] == "poorly differentiated" and glas[2].labels["grade_glas"] == "malignant"
    consep = load_records(FIXTURE_DATA, "consep")
    assert [r.group for r in consep] == ["consep:CoNSeP_train_1"] * 2 + ["consep:CoNSeP_test_13"] * 2
    assert {r.group for r in load_records(FIXTURE_DATA, "deepliif")} == {"deepliif:Bladder1", "deepliif:22_2"}
    assert hash(monuseg[0]) == hash(load_records(FIXTURE_DATA, "monuseg")[0])  # usable as dict keys


def test_unknown_dataset_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'kather'.*consep.*deepliif.*glas.*monuseg"):
        load_records(FIXTURE_DATA, "kather")


def test_masks_agree_with_instances_and_coarse_masks() -> None:
    for record in load_records(FIXTURE_DATA, "monuseg"):
        sample = load_sample(record)
        np.testing.assert_array_equal(sample.class_map, (sample.instances > 0).astype(np.uint8))
    for record in load_records(FIXTURE_DATA, "glas"):
        sample = load_sample(record)
        np.testing.assert_array_equal(sample.instances, connected_components(sample.class_map > 0, connectivity=1))
        # coarse = 32 x 32 block majority of the gland mask (crops are block-aligned)
        h, w = sample.class_map.shape
        blocks = sample.class_map.reshape(h // 32, 32, w // 32, 32).mean(axis=(1, 3)) >= 0.5
        np.testing.assert_array_equal(sample.coarse, np.kron(blocks, np.ones((32, 32))).astype(np.uint8))


def test_patch_index_points_into_the_sampled_images() -> None:
    patches = load_patch_records(FIXTURE_DATA)
    assert len(patches) == 23
    groups = {r.group for d in ("glas", "monuseg") for r in load_records(FIXTURE_DATA, d)}
    assert {p.group for p in patches} <= groups
    for patch in patches:
        crop = load_patch(patch)
        assert crop.shape == (128, 128, 3)
        # The index's tissue_fraction (mean RGB < 215) must be reproduced at the shifted coordinates.
        stated = float(patch_row(patch)["tissue_fraction"])
        assert abs(float((crop.mean(axis=2) < 215).mean()) - stated) < 1e-3


def patch_row(patch: PatchRecord) -> dict[str, str]:
    with (FIXTURE_DATA / "patches128" / "index.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            same_image = FIXTURE_DATA / row["image"] == patch.image_path
            if same_image and (int(row["x"]), int(row["y"])) == (patch.x, patch.y):
                return row
    raise AssertionError(f"no index row for {patch}")


# ---------------------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_and_grouped_on_the_fixture() -> None:
    records = [r for d in EXPECTED_COUNTS for r in load_records(FIXTURE_DATA, d)]
    first = split_records(records, seed=3)
    assert first == split_records(records, seed=3)
    assert set(first) == {"train", "val", "test"}
    assert all(first[name] for name in first)  # 9 groups: every split gets one
    assert_no_group_leakage(first)
    assert sorted(map(str, (r.image_path for s in first.values() for r in s))) == sorted(
        str(r.image_path) for r in records
    )


def assert_no_group_leakage(splits: dict[str, list[Record]]) -> None:
    groups = {name: {r.group for r in records} for name, records in splits.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**32 - 1))
def test_split_properties(n_groups: int, seed: int) -> None:
    records = synthetic_records(n_groups, per_group=2)
    splits = split_records(records, (0.8, 0.1, 0.1), seed=seed)
    assert_no_group_leakage(splits)
    assert sum(len(v) for v in splits.values()) == len(records)
    counts = {name: len({r.group for r in v}) for name, v in splits.items()}
    if n_groups >= 3:
        assert min(counts.values()) >= 1
    if n_groups >= 20:
        assert abs(counts["train"] - 0.8 * n_groups) <= 1.5


def test_split_group_assignment_ignores_record_order() -> None:
    records = synthetic_records(30)
    forward = split_records(records, seed=1)
    backward = split_records(list(reversed(records)), seed=1)
    for name in forward:
        assert {r.group for r in forward[name]} == {r.group for r in backward[name]}


def test_split_seed_changes_the_assignment() -> None:
    records = synthetic_records(40)
    groups = [{r.group for r in split_records(records, seed=s)["test"]} for s in range(4)]
    assert len({frozenset(g) for g in groups}) > 1


def test_split_is_pinned() -> None:
    # Golden assignment: a NumPy upgrade must not silently reshuffle the train/val/test patients.
    splits = split_records(synthetic_records(10, per_group=1), seed=0)
    assert {name: sorted(int(r.group.split(":")[1]) for r in v) for name, v in splits.items()} == GOLDEN_SPLIT


GOLDEN_SPLIT = {"train": [0, 1, 2, 3, 4, 6, 7, 8], "val": [5], "test": [9]}


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_records(synthetic_records(3), (0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------------- augmentation


@pytest.fixture(scope="module")
def glas_sample():
    return load_sample(load_records(FIXTURE_DATA, "glas")[0])


@pytest.mark.parametrize("crop", [None, 96, 256, 300])
def test_paired_augment_keeps_image_and_derived_masks_aligned(glas_sample, crop: int | None) -> None:
    image = glas_sample.image
    tissue = mask_ops.tissue_mask(image, "he")
    edges = mask_ops.instance_edges(glas_sample.instances)
    for seed in range(8):
        rng = np.random.default_rng(seed)
        aug_image, aug_tissue, aug_instances = paired_augment([image, tissue, glas_sample.instances], crop, rng)
        expected_side = crop if crop is not None else image.shape[0]
        assert aug_image.shape[:2] == aug_tissue.shape == aug_instances.shape == (expected_side, expected_side)
        # Relations that hold pixelwise survive only if all arrays moved identically.
        np.testing.assert_array_equal(mask_ops.tissue_mask(aug_image, "he"), aug_tissue)
        if crop is None or crop <= image.shape[0]:
            inner = mask_ops.instance_edges(aug_instances)[1:-1, 1:-1]
            # Edges of the augmented map are the augmented edges (away from the new crop border).
            (aug_edges,) = paired_augment([edges], crop, np.random.default_rng(seed))
            np.testing.assert_array_equal(inner, aug_edges[1:-1, 1:-1])


def test_paired_augment_reaches_all_eight_symmetries() -> None:
    base = np.arange(9).reshape(3, 3)
    seen = {paired_augment([base], None, np.random.default_rng(s))[0].tobytes() for s in range(200)}
    assert len(seen) == 8


def test_paired_augment_is_reproducible_and_handles_channels() -> None:
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    first = paired_augment([image, image[:, :, 0]], 32, np.random.default_rng(5))
    second = paired_augment([image, image[:, :, 0]], 32, np.random.default_rng(5))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first[0][:, :, 0], first[1])
    assert first[0].flags["C_CONTIGUOUS"]


def test_paired_augment_zero_pads_masks_when_asked() -> None:
    mask = np.ones((10, 10), np.uint8)
    padded, zero_padded = paired_augment([mask, mask], 20, np.random.default_rng(0), pad_mode=["reflect", "zero"])
    assert padded.all() and zero_padded.sum() == 100


def test_paired_augment_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="array 1"):
        paired_augment([np.zeros((4, 4)), np.zeros((4, 5))], None, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pad mode"):
        paired_augment([np.zeros((4, 4))], 8, np.random.default_rng(0), pad_mode="wrap")


# ------------------------------------------------------------------------------------------ torch datasets


@pytest.mark.torch
def test_mask_to_image_dataset_items() -> None:
    from training.data.datasets import MaskToImageDataset

    records = load_records(FIXTURE_DATA, "consep")
    dataset = MaskToImageDataset(
        records, crop=128, num_classes=5, noise_spacing=15.0, use_edges=True, seed=1, length=6
    )
    assert len(dataset) == 6 and dataset.label_channels == 7
    item = dataset[4]
    label, image = item["label"].numpy(), item["image"].numpy()
    assert label.shape == (7, 128, 128) and label.dtype == np.float32
    assert image.shape == (3, 128, 128) and image.dtype == np.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(label[:5].sum(axis=0), 1.0)  # one-hot first
    assert int(label[5].sum()) == mask_ops.noise_pixel_count((128, 128), 15.0)  # then noise
    class_map = label[:5].argmax(axis=0)
    edges = label[6]
    # Class boundaries are always instance boundaries (an instance carries one class).
    class_edges = mask_ops.instance_edges(class_map).astype(bool)
    assert (edges[class_edges] == 1).all()
    # Determinism per (seed, epoch, index); a new epoch gives new crops and noise.
    np.testing.assert_array_equal(dataset[4]["label"].numpy(), label)
    dataset.set_epoch(1)
    assert not np.array_equal(dataset[4]["label"].numpy(), label)


@pytest.mark.torch
def test_mask_to_image_dataset_remap_and_no_extras() -> None:
    from training.data.datasets import MaskToImageDataset

    records = load_records(FIXTURE_DATA, "deepliif")
    dataset = MaskToImageDataset(records, crop=64, num_classes=3, class_remap={3: 0}, seed=0)
    label = dataset[0]["label"].numpy()
    assert label.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="class id 3"):
        MaskToImageDataset(records, crop=256, num_classes=3, seed=0)[0]
    with pytest.raises(ValueError, match="instance maps"):
        MaskToImageDataset(records, crop=64, num_classes=4, use_edges=True)


@pytest.mark.torch
def test_coarse_to_fine_dataset_pairs() -> None:
    import torch
    from torch.utils.data import DataLoader

    from training.data.datasets import CoarseToFineDataset

    records = load_records(FIXTURE_DATA, "monuseg") + load_records(FIXTURE_DATA, "glas")
    dataset = CoarseToFineDataset(records, crop=128, stain="he", seed=2, length=10)
    batch = next(iter(DataLoader(dataset, batch_size=5, shuffle=False)))
    assert batch["coarse"].shape == batch["fine"].shape == (5, 1, 128, 128)
    for coarse, fine in zip(batch["coarse"], batch["fine"]):
        assert set(torch.unique(fine).tolist()) <= {-1.0, 1.0}
        expected = mask_ops.coarsen_mask(fine[0].numpy() > 0, 5, 10)
        np.testing.assert_array_equal(coarse[0].numpy() > 0, expected)
    with pytest.raises(ValueError, match="'pas'"):
        CoarseToFineDataset(records, crop=128, stain="pas")
