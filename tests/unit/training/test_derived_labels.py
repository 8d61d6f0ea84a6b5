"""tissue_gland_class_map: the 3-class map the gland renderer is trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from training.data.derived_labels import TissueGlandDataset, tissue_gland_class_map  # noqa: E402
from training.data.shared_layout import load_records  # noqa: E402

pytestmark = pytest.mark.torch
FIXTURE_DATA = Path(__file__).resolve().parents[2] / "fixtures" / "data"


def test_non_tissue_wins_over_gland_and_stroma_is_tissue_outside_glands() -> None:
    image = np.full((2, 3, 3), 120, np.uint8)  # tissue (gray 120 < 204)
    image[0, 0] = 250  # glass outside a gland
    image[1, 2] = 250  # lumen inside a gland
    gland = np.array([[0, 0, 1], [0, 1, 1]], np.uint8)
    assert tissue_gland_class_map(image, gland).tolist() == [[0, 1, 2], [1, 2, 0]]


def test_dataset_one_hot_uses_three_classes_plus_noise_and_edges() -> None:
    records = load_records(FIXTURE_DATA, "glas")
    dataset = TissueGlandDataset(records, crop=64, num_classes=3, noise_spacing=15.0, use_edges=True, seed=0,
                                 length=2)
    label = dataset[0]["label"].numpy()
    assert label.shape == (5, 64, 64)
    assert np.allclose(label[:3].sum(0), 1.0)
