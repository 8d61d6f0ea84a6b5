"""Diffusion models of issue #9: denoiser shapes, SPADE, CFG condition dropout, a short real training run on the
fixture data, ONNX export parity + contract metadata, and the mask decode rule on the shipped reference vector
(tests/fixtures/diffusion_decode_reference.npz, which the serving decode must reproduce exactly)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from training.data import diffusion_data as dd  # noqa: E402
from training.export import diffusion_export  # noqa: E402
from training.models.diffusion_denoiser import (ConcatUNet, MaskGeneratorUNet, SpadeNorm, SpadeUNet,  # noqa: E402
                                                build_denoiser)
from training.data.shared_layout import load_records  # noqa: E402
from training.train import load_config  # noqa: E402
from training.trainers.diffusion_trainer import DiffusionTrainer, drop_condition, null_condition  # noqa: E402

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[3]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
REFERENCE = REPO / "tests" / "fixtures" / "diffusion_decode_reference.npz"
TINY = {"channels": [8, 16], "groups": 4, "attention_head_dim": 8}


def tiny_config(name: str) -> dict:
    config = copy.deepcopy(load_config(REPO / "training" / "configs" / f"{name}.yaml"))
    config["model"].update(TINY)
    if "spade_hidden" in config["model"]:
        config["model"]["spade_hidden"] = 8
    # The fixture has two CoNSeP tiles: one trains, one is held back.
    config["data"].update({"source_crop": 32, "factor": 2, "epoch_length": 8, "split_fractions": [0.5, 0.5, 0.0]})
    config["train"].update({"batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "log_every": 5, "checkpoint_every": 1000,
                            "preview": False, "cond_dropout": 0.15})
    return config


@pytest.mark.parametrize("model, condition", [
    (SpadeUNet(channels=(8, 16), spade_hidden=8, groups=4, attention_head_dim=8), (2, 6, 24, 32)),
    (ConcatUNet(channels=(8, 16), groups=4, attention_head_dim=8), (2, 6, 24, 32)),
    (MaskGeneratorUNet(channels=(8, 16), groups=4, attention_head_dim=8), (2, 5)),
])
def test_denoisers_keep_sample_shape_with_per_row_timesteps(model, condition):
    channels = 6 if isinstance(model, MaskGeneratorUNet) else 3
    sample = torch.randn(2, channels, 24, 32)
    out = model(sample, torch.tensor([3.0, 901.0]), torch.rand(condition))
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_spade_norm_starts_as_groupnorm_and_modulates_per_pixel():
    torch.manual_seed(0)
    norm = SpadeNorm(channels=8, hidden=4, groups=4)
    x, features = torch.randn(1, 8, 6, 6), torch.zeros(1, 4, 6, 6)
    plain = torch.nn.functional.group_norm(x, 4, eps=1e-6)
    torch.testing.assert_close(norm(x, torch.randn(1, 4, 6, 6)), plain)  # zero-initialised gamma/beta
    torch.nn.init.normal_(norm.gamma.weight)
    torch.nn.init.normal_(norm.beta.weight)
    features[:, :, 0, 0] = 1.0  # the condition differs only at pixel (0, 0) ...
    changed = (norm(x, features) - norm(x, torch.zeros_like(features))).abs().sum(dim=1)[0]
    assert changed[:2, :2].min() > 0  # ... which moves that pixel and its 3x3 neighbourhood
    assert changed[3:, 3:].max() == 0  # ... and nothing far away


def test_condition_dropout_uses_the_null_condition():
    generator = torch.Generator().manual_seed(0)
    spatial = torch.ones(400, 6, 2, 2)
    dropped = drop_condition("image", spatial, 0.15, generator)
    rows_null = (dropped.flatten(1) == 0).all(dim=1)
    assert torch.equal(dropped[~rows_null], spatial[~rows_null])
    assert 0.10 < rows_null.float().mean() < 0.20
    vector = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]]).repeat(400, 1)
    dropped = drop_condition("mask", vector, 0.15, generator)
    null = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    is_null = (dropped == null).all(dim=1)
    assert 0.10 < is_null.float().mean() < 0.20 and torch.equal(dropped[~is_null], vector[~is_null])
    assert torch.equal(null_condition("mask", vector[:1])[0], null)
    assert torch.equal(drop_condition("image", spatial, 0.0, generator), spatial)


@pytest.mark.parametrize("name", ["renderer-diffusion-nuclei", "nuclei-mask-generator"])
def test_a_few_training_steps_reduce_the_loss_and_resume(tmp_path, name):
    config = tiny_config(name)
    trainer = DiffusionTrainer(config, tmp_path / "run", FIXTURE_DATA, steps=40)
    x0, cond = trainer.batch(list(range(4)))

    def fixed_loss() -> float:  # same timesteps/noise/dropout every time
        trainer.generator.manual_seed(123)
        with torch.no_grad():
            return float(trainer.loss(trainer.model, x0, cond))

    before = fixed_loss()
    state = trainer.fit()
    assert state.step == 40 and fixed_loss() < 0.8 * before
    assert (tmp_path / "run" / "latest.pt").is_file()
    resumed = DiffusionTrainer(config, tmp_path / "run", FIXTURE_DATA, steps=41)
    assert resumed.fit().step == 41
    history = torch.load(tmp_path / "run" / "latest.pt", map_location="cpu", weights_only=False)["code_commits"]
    assert [c["from_step"] for c in history] == [0]  # resumed under the same commit: one entry


def test_export_parity_and_contract_metadata(tmp_path):
    config = tiny_config("nuclei-mask-generator")
    model = build_denoiser(config["model"]).eval()
    info = {"config": config, "step": 0, "train_seconds": 0.0, "splits": {"train": ["consep:a"]}}
    version_dir = diffusion_export.export_denoiser(model, info, "mask-test", "1", tmp_path, {}, 20, 2.0, False,
                                                   parity_sizes=((16, 16), (24, 32)))
    manifest = yaml.safe_load((version_dir / "manifest.yaml").read_text())
    assert manifest["kind"] == "denoiser" and manifest["format"] == "onnx"
    assert [i["name"] for i in manifest["inputs"]] == ["sample", "timestep", "condition"]
    assert manifest["inputs"][1]["shape"] == ["batch"] and manifest["inputs"][2]["shape"] == ["batch", 5]
    assert manifest["outputs"][0]["name"] == "model_output"
    assert manifest["metrics"]["onnx_parity_max_abs"] < 1e-3
    assert sorted(b for b, _, _ in manifest["metrics"]["onnx_parity_sizes"]) == [1, 1, 3, 3]
    meta = manifest["metadata"]
    assert meta["role"] == "mask_generator" and meta["condition"]["names"][-1] == "null"
    assert meta["diffusion"]["prediction_type"] == "v_prediction" and meta["decode"]["boundary_channel"] == 5
    assert diffusion_export.batch_invariance(version_dir, config) < 1e-4


def write_reference(path: Path = REFERENCE) -> None:
    """How the reference vector was made (rerun only if the decode rule changes on purpose):
    `.venv/bin/python -c "from tests.unit.training.test_diffusion_models import write_reference; write_reference()"`.
    Samples: two fixture crops' mask encodings with Gaussian noise (sd 0.5 and 0.9: ties, broken boundaries,
    stray pixels) and one pure N(0, 1) sample (many small blobs: growth + the min-size filter)."""
    rng = np.random.default_rng(0)
    crops = dd.grid_crops(load_records(FIXTURE_DATA, "consep"), 128, 2)
    samples = [dd.mask_sample(crops[0][1], crops[0][2]) + rng.normal(0, 0.5, (6, 64, 64)),
               dd.mask_sample(crops[5][1], crops[5][2]) + rng.normal(0, 0.9, (6, 64, 64)),
               rng.normal(0, 1, (6, 64, 64))]
    # Values on a 1/64 grid: exact in float32 everywhere and the file compresses to a few tens of KB.
    samples = (np.round(np.stack(samples) * 64) / 64).astype(np.float32)
    decoded = [dd.decode_mask(s, dd.DECODE_THRESHOLD, dd.DECODE_MIN_INSTANCE_PIXELS) for s in samples]
    np.savez_compressed(path, sample=samples, class_map=np.stack([d[0] for d in decoded]),
                        instances=np.stack([d[1] for d in decoded]), threshold=np.float32(dd.DECODE_THRESHOLD),
                        min_instance_pixels=np.int32(dd.DECODE_MIN_INSTANCE_PIXELS))


def test_decode_matches_the_reference_vector():
    reference = np.load(REFERENCE)
    for sample, class_map, instances in zip(reference["sample"], reference["class_map"], reference["instances"]):
        got_classes, got_instances = dd.decode_mask(sample, float(reference["threshold"]),
                                                    int(reference["min_instance_pixels"]))
        np.testing.assert_array_equal(got_classes, class_map)
        np.testing.assert_array_equal(got_instances, instances)


def test_decode_separates_touching_nuclei_and_grows_back_the_boundary():
    class_map = np.zeros((12, 12), np.uint8)
    instances = np.zeros((12, 12), np.int32)
    class_map[2:8, 1:6], instances[2:8, 1:6] = 3, 1
    class_map[2:8, 6:11], instances[2:8, 6:11] = 2, 2  # touches nucleus 1 along a vertical line
    got_classes, got_instances = dd.decode_mask(dd.mask_sample(class_map, instances))
    np.testing.assert_array_equal(got_classes, class_map)
    np.testing.assert_array_equal(got_instances, instances)


def test_mask_encoding_round_trips_on_fixture_crops():
    crops = dd.grid_crops(load_records(FIXTURE_DATA, "consep"), 128, 2)
    agreement = [np.mean(dd.decode_mask(dd.mask_sample(cm, inst))[0] == cm) for _, cm, inst in crops]
    assert min(agreement) > 0.97
    image, class_map, instances = crops[0]
    assert image.shape == (64, 64, 3) and class_map.shape == instances.shape == (64, 64)
    assert dd.renderer_condition(class_map, instances).shape == (6, 64, 64)
    assert dd.mask_condition(dd.types_present(class_map)).shape == (5,)
