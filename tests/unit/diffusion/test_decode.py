"""Mask decode: the documented rule on hand-made samples, and pixel equality with the training side's rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.diffusion.decode import decode_mask_sample
from services.diffusion.spec import DecodeSpec

DECODE = DecodeSpec(class_channels=5, boundary_channel=5, threshold=0.0, min_instance_pixels=4)
REFERENCE = Path(__file__).resolve().parents[2] / "fixtures" / "diffusion_decode_reference.npz"


def encode(classes: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """A clean generator sample: one-hot classes and the boundary map, {0, 1} -> {-1, 1}."""
    one_hot = (np.arange(5)[:, None, None] == classes[None]).astype(np.float32)
    return np.concatenate([one_hot, boundary[None].astype(np.float32)]) * 2 - 1


def test_touching_nuclei_are_split_by_the_boundary_and_grown_back() -> None:
    classes = np.zeros((8, 12), np.uint8)
    classes[1:7, 1:11] = 3  # one epithelial blob ...
    boundary = np.zeros((8, 12), bool)
    boundary[1:7, 6] = True  # ... cut in two by a boundary column
    boundary[1, 1:11] = boundary[6, 1:11] = True
    class_map, instances = decode_mask_sample(encode(classes, boundary), DECODE)
    assert set(np.unique(instances)) == {0, 1, 2}
    np.testing.assert_array_equal(class_map, classes)  # every nucleus pixel reached and kept its class
    assert (instances[2:6, 1:6] == 1).all() and (instances[2:6, 7:11] == 2).all()
    assert (instances[1:7, 6] == 2).all()  # the boundary column takes the larger neighbouring label


def test_small_instances_are_dropped_and_instances_get_their_majority_class() -> None:
    classes = np.zeros((8, 8), np.uint8)
    classes[0, 0] = 2  # one-pixel "nucleus": below min_instance_pixels
    classes[3:7, 3:7] = 1
    classes[3, 3] = 4  # a minority pixel inside the instance
    class_map, instances = decode_mask_sample(encode(classes, np.zeros((8, 8), bool)), DECODE)
    assert instances[0, 0] == 0 and class_map[0, 0] == 0
    assert (instances[3:7, 3:7] == 1).all() and (class_map[3:7, 3:7] == 1).all()


def test_foreground_no_seed_reaches_becomes_background() -> None:
    classes = np.zeros((6, 6), np.uint8)
    classes[1:5, 1:5] = 2
    class_map, instances = decode_mask_sample(encode(classes, classes > 0), DECODE)  # all boundary: no seed
    assert not instances.any() and not class_map.any()


def random_samples(count: int, size: int = 32) -> list[np.ndarray]:
    """Noisy, blobby samples like a half-trained generator makes (ties and fragments included)."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(count):
        coarse = rng.standard_normal((6, size // 4, size // 4)).astype(np.float32)
        sample = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2) + 0.5 * rng.standard_normal((6, size, size))
        samples.append(np.clip(sample, -1, 1).astype(np.float32))
    return samples


def test_matches_the_training_decode_rule() -> None:
    diffusion_data = pytest.importorskip("training.data.diffusion_data")
    for sample in random_samples(20):
        want = diffusion_data.decode_mask(sample, 0.0, 4)
        got = decode_mask_sample(sample, DECODE)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.skipif(not REFERENCE.exists(), reason="training helper's reference vectors not shipped yet")
def test_matches_the_reference_vectors() -> None:
    """tests/fixtures/diffusion_decode_reference.npz: samples and the training decode_mask outputs."""
    with np.load(REFERENCE) as reference:
        arrays = dict(reference)
    samples, class_maps, instance_maps = arrays["sample"], arrays["class_map"], arrays["instances"]
    threshold = float(arrays.get("threshold", 0.0))
    min_pixels = int(arrays.get("min_instance_pixels", 4))
    decode = DecodeSpec(class_channels=5, boundary_channel=5, threshold=threshold, min_instance_pixels=min_pixels)
    for sample, class_map, instance_map in zip(samples, class_maps, instance_maps, strict=True):
        got_classes, got_instances = decode_mask_sample(sample, decode)
        np.testing.assert_array_equal(got_classes, class_map)
        np.testing.assert_array_equal(got_instances, instance_map)
