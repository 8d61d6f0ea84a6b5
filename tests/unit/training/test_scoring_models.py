"""Scoring models (histology-encoder, tissue segmenters): 2-step training on the fixture data, evaluation with the
scoring metrics, ONNX export + parity through real ONNX Runtime on tiny instances."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from training.data.scoring_data import (
    ENCODER_CLASSES,
    SEGMENTATION_SCHEMES,
    SegmenterBatchSampler,
    load_patch_records,
    load_scheme_records,
    segmentation_scheme,
    split_per_dataset,
)
from training.export.scoring_models import evaluate_encoder, evaluate_segmenter, export_encoder, export_segmenter
from training.models.histology_encoder import EncoderConfig, HistologyEncoder
from training.models.tissue_segmenter import SegmenterConfig, TissueSegmenter
from training.train import load_config
from training.trainers import get_trainer
from training.trainers.scoring_trainers import segmentation_loss

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[3]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
CONFIGS = REPO / "training" / "configs"
SEGMENTER_CONFIGS = ("segmenter-he-nuclei", "segmenter-he-glands", "segmenter-ihc")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(config_name: str, **train_overrides) -> dict:
    config = load_config(CONFIGS / f"{config_name}.yaml")
    config = copy.deepcopy(config)
    config["train"].update({"checkpoint_every": 1, "log_every": 1, **train_overrides})
    if config["kind"] == "encoder":
        config["model"].update({"widths": [8, 16], "input_size": 32})
    else:
        config["model"].update({"base_channels": 4})
        config["data"]["crop"] = 32
    return config


def onnx_session(version_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------------- training
def test_encoder_trains_two_steps_and_resumes(tmp_path):
    config = tiny("histology-encoder", batch_size=4)
    trainer = get_trainer("encoder")(config, tmp_path, FIXTURE_DATA, steps=1)
    assert trainer.fit().step == 1
    resumed = get_trainer("encoder")(config, tmp_path, FIXTURE_DATA, steps=2)
    state = resumed.fit()
    assert state.step == 2
    payload = torch.load(tmp_path / "latest.pt", map_location="cpu", weights_only=False)
    assert payload["step"] == 2 and payload["config"]["name"] == "histology-encoder"
    assert [c["from_step"] for c in payload["code_commits"]] == [0]  # resumed under the same commit
    log = (tmp_path / "losses.jsonl").read_text()
    assert '"event": "resumed"' in log and '"class_ce"' in log
    # train split never shares a patient with val/test
    splits = payload["splits"]["patches"]
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))


@pytest.mark.parametrize("config_name", SEGMENTER_CONFIGS)
def test_segmenter_trains_two_steps(tmp_path, config_name):
    config = tiny(config_name, batch_size=2)
    state = get_trainer("segmenter")(config, tmp_path, FIXTURE_DATA, steps=2).fit()
    assert state.step == 2
    payload = torch.load(tmp_path / "latest.pt", map_location="cpu", weights_only=False)
    num_classes = len(segmentation_scheme(config["data"]["scheme"]).class_names)
    assert payload["model"]["head.weight"].shape[0] == num_classes


def test_configs_load_and_registry_lists_scoring_trainers():
    for name in ("histology-encoder", *SEGMENTER_CONFIGS):
        config = load_config(CONFIGS / f"{name}.yaml")
        assert config["name"] == name
        assert get_trainer(config["trainer"]) is not None
    with pytest.raises(ValueError, match="valid trainers: .*encoder.*segmenter"):
        get_trainer("nope")
    with pytest.raises(ValueError, match="valid schemes"):
        segmentation_scheme("nope")


def test_segmenter_batches_are_a_function_of_seed_and_step():
    scheme = SEGMENTATION_SCHEMES["he_glands"]
    records = load_scheme_records(FIXTURE_DATA, scheme)
    a = SegmenterBatchSampler(records, scheme, batch_size=2, crop=32, seed=3)
    b = SegmenterBatchSampler(records, scheme, batch_size=2, crop=32, seed=3)
    for x, y in zip(a.batch(5), b.batch(5)):
        np.testing.assert_array_equal(x, y)
    images, targets, partial = a.batch(5)
    assert images.shape == (2, 32, 32, 3) and targets.shape == (2, 32, 32) and not partial.any()
    assert set(np.unique(targets)) <= {0, 1, 2}


def test_partial_label_loss_rewards_any_nucleus_type_for_untyped_nuclei():
    target = torch.zeros(1, 4, 4, dtype=torch.uint8)
    target[0, :2] = 1  # MoNuSeg: nucleus (untyped) in the top half
    partial = torch.tensor([True])
    confident_epithelial = torch.full((1, 5, 4, 4), -10.0)
    confident_epithelial[0, 3, :2] = 10.0  # predicts "epithelial" on the nucleus pixels
    confident_epithelial[0, 0, 2:] = 10.0  # background elsewhere
    calls_background = torch.full((1, 5, 4, 4), -10.0)
    calls_background[0, 0] = 10.0
    good, _ = segmentation_loss(confident_epithelial, target, partial, (1, 2, 3, 4), dice_weight=0.5)
    bad, _ = segmentation_loss(calls_background, target, partial, (1, 2, 3, 4), dice_weight=0.5)
    assert float(good) < 1e-3 < 5.0 < float(bad)


# ------------------------------------------------------------------------------------------------- evaluation
def test_encoder_evaluation_uses_disjoint_held_out_halves():
    model = HistologyEncoder(EncoderConfig(len(ENCODER_CLASSES), 4, widths=(8, 16), input_size=32)).eval()
    result = evaluate_encoder(model, FIXTURE_DATA, load_config(CONFIGS / "histology-encoder.yaml"))
    halves = result["held_out_groups"]
    assert halves["half_a"] and halves["half_b"] and not set(halves["half_a"]) & set(halves["half_b"])
    train_groups = set(r.group for r in split_per_dataset(load_patch_records(FIXTURE_DATA), (0.8, 0.1, 0.1), 0)["train"])
    assert not train_groups & (set(halves["half_a"]) | set(halves["half_b"]))
    for row in result["rows"]:
        assert np.isfinite(row["fid"]) and row["fid"] >= -1e-9


def test_segmenter_evaluation_reports_per_dataset_scores():
    model = TissueSegmenter(SegmenterConfig(5, base_channels=4, depth=2)).eval()
    result = evaluate_segmenter(model, FIXTURE_DATA, load_config(CONFIGS / "segmenter-he-nuclei.yaml"))
    assert result
    for key, scores in result.items():
        assert key.split("/")[0] in ("test", "val")
        assert 0.0 <= scores["miou"] <= 1.0 and 0.0 <= scores["mean_dice"] <= 1.0
        if "monuseg" in key:
            assert len(scores["dice_per_class"]) == 2  # untyped nuclei: nucleus vs background only


# ------------------------------------------------------------------------------------------------- export parity
def test_encoder_export_matches_torch_on_uint8_range_inputs(tmp_path):
    config = tiny("histology-encoder")
    torch.manual_seed(0)
    model = HistologyEncoder(EncoderConfig(len(ENCODER_CLASSES), 4, widths=(8, 16), input_size=32)).eval()
    payload = {"step": 0, "train_seconds": 0.0, "splits": {}}
    out = export_encoder(model, config, payload, version="1", store_root=tmp_path, data_root=None)
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    assert manifest["kind"] == "encoder" and [o["name"] for o in manifest["outputs"]] == ["features", "logits"]
    assert manifest["metadata"]["input_range"] == [0.0, 255.0]
    assert manifest["metadata"]["resize"]["size"] == [32, 32]
    assert manifest["metadata"]["class_names"] == list(ENCODER_CLASSES)
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 45, 70)).astype(np.float32)
    features, logits = onnx_session(out).run(None, {"image": image})
    with torch.no_grad():
        expected_features, expected_logits = model(torch.from_numpy(image))
    assert features.shape == (2, 16) and logits.shape == (2, len(ENCODER_CLASSES))
    np.testing.assert_allclose(features, expected_features.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config_name", SEGMENTER_CONFIGS)
def test_segmenter_export_matches_torch(tmp_path, config_name):
    config = tiny(config_name)
    scheme = segmentation_scheme(config["data"]["scheme"])
    torch.manual_seed(0)
    model = TissueSegmenter(SegmenterConfig(len(scheme.class_names), base_channels=4,
                                            depth=config["model"]["depth"])).eval()
    payload = {"step": 0, "train_seconds": 0.0, "splits": {}}
    out = export_segmenter(model, config, payload, version="2", store_root=tmp_path, data_root=None)
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    assert manifest["kind"] == "segmenter" and manifest["name"] == config_name and manifest["version"] == "2"
    assert manifest["metadata"]["class_names"] == list(scheme.class_names)
    assert manifest["metadata"]["size_multiple"] == 2 ** config["model"]["depth"]
    multiple = manifest["metadata"]["size_multiple"]
    image = np.random.default_rng(1).integers(0, 256, (1, 3, 2 * multiple, 5 * multiple)).astype(np.float32)
    (logits,) = onnx_session(out).run(None, {"image": image})
    with torch.no_grad():
        expected = model(torch.from_numpy(image)).numpy()
    assert logits.shape == (1, len(scheme.class_names), 2 * multiple, 5 * multiple)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
