"""renderer-he-nuclei v3's recipe: a config that `extends` another, a warm start from an earlier run, and the
frozen-segmenter mask-consistency loss (training/losses.py), each run for real on the fixture data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.unit.training.test_training_pipeline import FIXTURE_DATA, tiny_config, write_config  # noqa: E402
from training.losses import mask_consistency_loss  # noqa: E402
from training.train import load_config, main as train_main, merge_configs  # noqa: E402
from tests.unit.training.renderer_recipes import train_fixture_segmenter, train_tiny_renderer  # noqa: E402

pytestmark = pytest.mark.torch
CONFIGS = Path(__file__).resolve().parents[3] / "training" / "configs"


def test_merge_configs_merges_mappings_and_replaces_everything_else() -> None:
    base = {"train": {"lr": 1, "steps": 5}, "data": {"sources": [1, 2]}, "name": "a"}
    merged = merge_configs(base, {"train": {"lr": 2}, "data": {"sources": [3]}})
    assert merged == {"train": {"lr": 2, "steps": 5}, "data": {"sources": [3]}, "name": "a"}
    assert base["train"]["lr"] == 1, "the base config is not modified"
    assert merge_configs(base, {"train": {"steps": None}, "name": None}) == {"train": {"lr": 1},
                                                                            "data": {"sources": [1, 2]}}


def test_v3_config_extends_v2_and_keeps_its_data_and_export() -> None:
    v2, v3 = load_config(CONFIGS / "renderer-he-nuclei.yaml"), load_config(CONFIGS / "renderer-he-nuclei-v3.yaml")
    assert "extends" not in v3 and v3["name"] == v2["name"]
    assert v3["data"] == v2["data"] and v3["generator"] == v2["generator"]
    # Same interface; only the card is v3's own (v2's benchmark sections deleted with `null`, not carried over).
    assert {k: v for k, v in v3["export"].items() if k != "card"} == {k: v for k, v in v2["export"].items() if k != "card"}
    assert all("(v3)" in section for section in v3["export"]["card"]["extra_sections"])
    assert v3["export"]["card"]["title"] == v2["export"]["card"]["title"]
    assert v3["train"]["init_from"] == "renderer-he-nuclei-v2" and v3["train"]["precision"] == "bf16"
    assert len(v3["train"]["consistency"]["allowed_classes"]) == v2["data"]["num_classes"]


def test_consistency_loss_is_minus_log_probability_of_the_allowed_classes() -> None:
    # one pixel per case, 3 segmenter classes with probabilities (0.5, 0.3, 0.2)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).view(1, 3, 1, 1)
    allowed = [[0], [1], [1, 2]]
    for renderer_class, expected in ((0, 0.5), (1, 0.3), (2, 0.5)):
        loss = mask_consistency_loss(logits, torch.tensor([[[renderer_class]]]), allowed)
        assert math.isclose(loss.item(), -math.log(expected), rel_tol=1e-5)


def test_consistency_loss_gradient_pulls_towards_the_mask() -> None:
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    class_map = torch.tensor([[[0, 1], [1, 1]]])
    mask_consistency_loss(logits, class_map, [[0], [1]]).backward()
    grad = logits.grad[0]
    assert (grad[1][class_map[0] == 1] < 0).all(), "nucleus pixels: raising the nucleus logit lowers the loss"
    assert (grad[0][class_map[0] == 0] < 0).all()


def test_v3_recipe_warm_starts_from_v2_and_trains_with_the_segmenter_loss(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    train_fixture_segmenter(runs, "segmenter-he-nuclei-consistency")
    train_tiny_renderer(tmp_path, "renderer-he-nuclei", runs, "renderer-he-nuclei-v2")
    records = train_tiny_renderer(tmp_path, "renderer-he-nuclei-v3", runs, "renderer-he-nuclei-v3")
    assert {"event": "warm_started", "from": str(runs / "renderer-he-nuclei-v2" / "latest.pt")} in records
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["g_seg"]) for r in steps)

    # resuming v3 continues v3 (its own checkpoint), it does not warm-start again
    records = train_tiny_renderer(tmp_path, "renderer-he-nuclei-v3", runs, "renderer-he-nuclei-v3", "--steps", "3")
    assert sum(1 for r in records if r.get("event") == "warm_started") == 1
    assert {"event": "resumed", "step": 2} in records


def test_warm_start_from_a_missing_run_names_it(tmp_path: Path) -> None:
    config = tiny_config("renderer-he-nuclei")
    config["train"]["init_from"] = "no-such-run"
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        train_main(["--config", str(write_config(tmp_path, config)), "--data-root", str(FIXTURE_DATA),
                    "--out", str(tmp_path / "runs" / "x")])


def test_consistency_segmenter_split_forces_held_back_groups_to_test() -> None:
    from training.data.scoring_data import load_scheme_records, segmentation_scheme, split_per_dataset

    records = load_scheme_records(FIXTURE_DATA, segmentation_scheme("he_nuclei"))
    groups = sorted({r.group for r in records})
    forced = groups[:1]
    split = split_per_dataset(records, (1.0, 0.0, 0.0), 0, held_back=forced)
    assert {r.group for r in split["test"]} == set(forced)
    assert not {r.group for r in split["train"]} & set(forced)


def test_warm_start_from_the_store_when_the_run_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh machine has no runs cache: a recipe that continues a run falls back to the shipped ONNX weights
    (sha256-checked), whose generator then computes what the shipped file computes; D starts fresh and warms up."""
    import numpy as np
    import onnxruntime as ort
    import yaml

    from training.export.__main__ import main as export_main
    from training.trainers.store_weights import read_onnx_initializers

    runs, store = tmp_path / "runs", tmp_path / "store"
    train_tiny_renderer(tmp_path, "renderer-he-nuclei", runs, "shipped-run")
    config_path = tmp_path / "configs" / "shipped-run" / "renderer-he-nuclei.yaml"
    version_dir = export_main(["--config", str(config_path), "--checkpoint", str(runs / "shipped-run" / "latest.pt"),
                               "--version", "7", "--store-root", str(store), "--data-root", str(FIXTURE_DATA)])
    monkeypatch.setenv("HISTOSYNTH_MODEL_STORE", str(store))

    config = tiny_config("renderer-he-nuclei")
    config["train"].update(init_from="not-cached-run", steps=1,
                           init_from_store={"model": "renderer-he-nuclei", "version": 7, "discriminator_warmup_steps": 2})
    out = runs / "successor"
    from training.trainers import get_trainer

    trainer = get_trainer(config["trainer"])(config, out, FIXTURE_DATA)
    record = trainer.maybe_warm_start()
    manifest = yaml.safe_load((version_dir / "manifest.yaml").read_text())
    assert record is not None and record["from"] == "model_store:renderer-he-nuclei/7"
    assert record["sha256"] == manifest["sha256"] and record["discriminator"] == "fresh"
    assert record["run_not_cached"] == str(runs / "not-cached-run" / "latest.pt")
    shipped = read_onnx_initializers(version_dir / "model.onnx")
    for key, value in trainer.generator.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), shipped[key])
    label = torch.rand(1, int(manifest["inputs"][0]["shape"][1]), 64, 64)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {manifest["inputs"][0]["name"]: label.numpy()})[0]
    with torch.no_grad():
        actual = trainer.generator_ema.eval()(label).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-4)

    # the whole run: warm start logged, D warm-up logged (not counted as steps), then the step
    config_dir = tmp_path / "configs" / "successor"
    config_dir.mkdir(parents=True)
    train_main(["--config", str(write_config(config_dir, config)), "--data-root", str(FIXTURE_DATA), "--out", str(out)])
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    events = [r.get("event") for r in records]
    assert events[:2] == ["warm_started", "discriminator_warmup"]
    warmup = records[1]
    assert warmup["steps"] == 2 and math.isfinite(warmup["d_real"]) and math.isfinite(warmup["d_fake"])
    assert [r["step"] for r in records if "event" not in r] == [1]


def test_store_warm_start_refuses_a_damaged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from training.trainers.store_weights import load_generator_from_store
    from training.trainers.pix2pixhd_trainer import build_generator

    shipped = CONFIGS.parents[1] / "model_store" / "renderer-he-nuclei" / "3"
    copy = tmp_path / "renderer-he-nuclei" / "3"
    shutil.copytree(shipped, copy)
    generator = build_generator(load_config(CONFIGS / "renderer-he-nuclei-v3.yaml"))
    loaded = load_generator_from_store(generator, tmp_path, "renderer-he-nuclei", 3)
    assert loaded.path == copy / "model.onnx"
    with open(copy / "model.onnx", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\1")
    with pytest.raises(ValueError, match="sha256"):
        load_generator_from_store(generator, tmp_path, "renderer-he-nuclei", 3)
    with pytest.raises(FileNotFoundError, match="version 4"):
        load_generator_from_store(generator, tmp_path, "renderer-he-nuclei", 4)
