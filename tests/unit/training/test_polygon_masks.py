"""training.data.polygon_masks: polygon-style region masks derived from nuclei class maps (synthetic + fixture)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from training.data.datasets import PolygonMaskDataset
from training.data.polygon_masks import (
    PolygonSettings,
    class_densities,
    dominant_regions,
    polygon_mask,
    trace_polygons,
)
from training.data.shared_layout import load_records, load_sample

FIXTURE_DATA = Path(__file__).resolve().parents[2] / "fixtures" / "data"


def nuclei_grid(shape: tuple[int, int], cls: int, top_left: tuple[int, int], size: tuple[int, int],
                pitch: int = 12, radius: int = 4, out: np.ndarray | None = None) -> np.ndarray:
    """Discs of class `cls` on a regular grid inside a rectangle: a dense cell region."""
    out = np.zeros(shape, np.uint8) if out is None else out
    y0, x0 = top_left
    for y in range(y0 + radius, y0 + size[0] - radius, pitch):
        for x in range(x0 + radius, x0 + size[1] - radius, pitch):
            cv2.circle(out, (x, y), radius, int(cls), thickness=-1)
    return out


def test_dense_nuclei_become_one_region_of_their_type() -> None:
    class_map = nuclei_grid((192, 192), 3, (48, 48), (96, 96))
    mask = polygon_mask(class_map, 5)
    assert set(np.unique(mask)) == {0, 3}
    # one filled polygon covering the nuclei cluster, not the individual discs
    n_components, _ = cv2.connectedComponents((mask == 3).astype(np.uint8))
    assert n_components - 1 == 1
    assert (mask[52:140, 52:140] == 3).all()  # gaps between nuclei are filled
    # the region reaches a little beyond the outer nuclei (density scale sigma), not much further
    assert (mask[:24, :] == 0).all() and (mask[:, -24:] == 0).all()


def test_two_types_get_two_regions_with_the_dominant_type() -> None:
    class_map = nuclei_grid((128, 192), 2, (16, 8), (96, 80))
    nuclei_grid((128, 192), 4, (16, 104), (96, 80), out=class_map)
    mask = polygon_mask(class_map, 5)
    assert (mask[40:90, 20:70] == 2).all()
    assert (mask[40:90, 120:170] == 4).all()


def test_isolated_nucleus_is_not_annotated() -> None:
    class_map = np.zeros((96, 96), np.uint8)
    cv2.circle(class_map, (48, 48), 5, 1, thickness=-1)
    assert not polygon_mask(class_map, 5).any()  # below density threshold / min area: nobody draws one cell


def test_empty_and_shapes_and_dtype() -> None:
    mask = polygon_mask(np.zeros((40, 50), np.uint8), 5)
    assert mask.shape == (40, 50) and mask.dtype == np.uint8 and not mask.any()
    assert class_densities(np.zeros((8, 9), np.uint8), 5, 2.0).shape == (4, 8, 9)


def test_polygons_are_simplified() -> None:
    class_map = nuclei_grid((160, 160), 3, (10, 10), (140, 140))
    regions = dominant_regions(class_map, 5, 14.0, 0.06)
    coarse = trace_polygons(regions, 5, epsilon=4.0, min_area=300)
    fine = trace_polygons(regions, 5, epsilon=0.5, min_area=300)
    assert sum(len(p) for p in coarse[3]) < sum(len(p) for p in fine[3])


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        polygon_mask(np.full((8, 8), 7, np.uint8), 5)
    with pytest.raises(ValueError):
        polygon_mask(np.zeros((2, 8, 8), np.uint8), 5)
    with pytest.raises(ValueError):
        polygon_mask(np.zeros((8, 8), np.float32), 5)
    with pytest.raises(ValueError):
        PolygonSettings(sigma=0)
    with pytest.raises(ValueError):
        PolygonSettings(density_threshold=1.5)


def test_real_consep_fixture_masks_are_coarser_than_nuclei() -> None:
    for record in load_records(FIXTURE_DATA, "consep"):
        sample = load_sample(record)
        mask = polygon_mask(sample.class_map, 5)
        assert set(np.unique(mask)) <= set(range(5))
        # regions: fewer connected pieces than nuclei (single cells are merged)
        pieces = sum(cv2.connectedComponents((mask == c).astype(np.uint8))[0] - 1 for c in range(1, 5))
        assert pieces < max(1, int(sample.instances.max()))
        if (sample.class_map > 0).mean() > 0.05:
            assert (mask > 0).mean() > (sample.class_map > 0).mean()  # regions cover the gaps between nuclei


def test_polygon_dataset_items() -> None:
    records = load_records(FIXTURE_DATA, "consep")
    data = PolygonMaskDataset(records, crop=64, num_classes=5, noise_spacing=10.0, seed=3, length=4, cache=True,
                              polygon={"sigma": 14.0})
    item = data[1]
    assert item["label"].shape == (6, 64, 64) and item["image"].shape == (3, 64, 64)
    assert torch.equal(item["label"][:5].sum(0), torch.ones(64, 64))  # one-hot region classes
    assert int(item["label"][5].sum()) == round(64 * 64 / 100)  # noise pixels at spacing 10
    assert torch.equal(data[1]["label"], item["label"])  # pure function of (seed, epoch, index)
    data.set_epoch(1)
    assert not torch.equal(data[1]["label"][5], item["label"][5])  # fresh noise every epoch
    with pytest.raises(ValueError):
        PolygonMaskDataset(records, crop=64, num_classes=5, use_edges=True)
