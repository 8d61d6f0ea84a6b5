"""DiffusionSpec: manifest metadata (as training/export/diffusion_export.py writes it) -> serving contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from services.core import mask_ops
from services.core.model_store import ModelStore
from services.diffusion.spec import DiffusionSpec
from tests.fixtures.diffusion_models import MASK_GENERATOR_NAME, RENDERER_NAME, write_diffusion_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(write_diffusion_store(tmp_path_factory.mktemp("store")))


def test_renderer_condition_is_one_hot_classes_then_instance_edges(store: ModelStore) -> None:
    spec = DiffusionSpec.from_manifest(store.get(RENDERER_NAME))
    assert spec.role == "image_renderer" and spec.schedule.prediction_type == "v_prediction"
    classes = np.zeros((8, 8), np.uint8)
    classes[2:6, 1:4] = 2
    instances = np.zeros((8, 8), np.int32)
    instances[2:6, 1:4] = 7
    condition = spec.class_map_condition(classes, instances)
    expected = mask_ops.build_generator_input(classes, 5, None, mask_ops.instance_edges(instances))
    np.testing.assert_array_equal(condition, expected)
    assert condition.shape == spec.condition_shape(8, 8) == (6, 8, 8)
    assert not spec.null_condition((6, 8, 8)).any()


def test_mask_generator_condition_and_null_flag(store: ModelStore) -> None:
    spec = DiffusionSpec.from_manifest(store.get(MASK_GENERATOR_NAME))
    assert spec.role == "mask_generator" and spec.decode is not None and spec.decode.boundary_channel == 5
    np.testing.assert_array_equal(spec.multi_hot_condition(("epithelial", "other")), [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(spec.null_condition((5,)), [0, 0, 0, 0, 1])
    assert spec.class_names == ("background", "other", "inflammatory", "epithelial", "spindle")


def test_training_export_extras_are_accepted_and_bad_metadata_named(store: ModelStore) -> None:
    manifest = store.get(MASK_GENERATOR_NAME)
    path = manifest.manifest_path
    raw = yaml.safe_load(path.read_text())
    raw["metadata"]["decode"].update(connectivity=4, rule="...", implementation="training...")
    raw["metadata"]["sample_channel_names"] = ["background", "other", "inflammatory", "epithelial", "spindle", "b"]
    path.write_text(yaml.safe_dump(raw))
    assert DiffusionSpec.from_manifest(store.get(MASK_GENERATOR_NAME)).decode.min_instance_pixels == 2
    raw["metadata"]["role"] = "painter"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"nuclei-mask-generator-test/1: diffusion metadata .*: role 'painter'; valid"):
        DiffusionSpec.from_manifest(store.get(MASK_GENERATOR_NAME))
    del raw["metadata"]["role"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"incomplete or invalid: missing key 'role'"):
        DiffusionSpec.from_manifest(store.get(MASK_GENERATOR_NAME))
    Path(path).write_text(yaml.safe_dump({**raw, "metadata": {**raw["metadata"], "role": "mask_generator"}}))
