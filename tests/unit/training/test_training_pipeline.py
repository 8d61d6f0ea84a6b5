"""Smoke tests for the training stage: 2-step runs of every shipped config on the fixture data (then resume for
one more step), export parity of a tiny random model, and the manifest loading through ModelStore.

Configs are the shipped YAML files shrunk (tiny widths, 64-128 px crops) so the file stays well under a minute
on 2 cores; the code paths (datasets, losses, trainers, checkpoint/resume, grids, logs, export) are the real ones.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from training.export.onnx_export import ModelCard, ParityError, export_to_model_store  # noqa: E402
from training.train import load_config, main as train_main  # noqa: E402

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "training" / "configs"
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
SHIPPED = ["mask-refiner", "renderer-he-nuclei", "renderer-he-glands", "renderer-ihc"]


def tiny_config(name: str) -> dict:
    config = copy.deepcopy(load_config(CONFIGS / f"{name}.yaml"))
    if config["trainer"] == "pix2pix":
        config["generator"] = {"ngf": 4, "num_downs": 5, "max_mult": 4}
        config["discriminator"] = {"ndf": 4, "n_layers": 3}
        config["data"]["crop"] = 64
        config["data"]["epoch_length"] = 4
    else:
        config["generator"] = {"ngf": 4, "n_downsample": 2, "n_blocks": 1}
        config["discriminator"] = {"ndf": 4, "n_layers": 2, "num_scales": 2}
        config["data"]["crop"] = 64
        for source in config["data"]["sources"]:
            source["epoch_length"] = 3
    config["export"]["metadata"]["tile_size"] = 64
    config["export"]["parity_sizes"] = [[64, 64], [64, 96]]
    config["train"].update(steps=2, sample_every=2, checkpoint_every=2, log_every=1, num_threads=2)
    return config


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_two_step_training_writes_checkpoint_grid_log_and_resumes(tmp_path: Path, name: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from training.provenance import git_commit
    from training.trainers import base

    config_path = write_config(tmp_path, tiny_config(name))
    out = tmp_path / "run"
    train_main(["--config", str(config_path), "--data-root", str(FIXTURE_DATA), "--out", str(out)])

    checkpoint = torch.load(out / "latest.pt", map_location="cpu", weights_only=False)
    assert checkpoint["step"] == 2
    assert checkpoint["code_commits"] == [{"commit": git_commit(), "from_step": 0}]
    assert (out / "samples_000002.png").is_file()
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(v) for r in steps for k, v in r.items() if k not in ("step",))
    splits = json.loads((out / "splits.json").read_text())
    assert splits["train"], "the grouped split must give the training set at least one group"

    # resume: same out dir, one more step; continues from step 2 instead of restarting, under "new" code
    monkeypatch.setattr(base, "git_commit", lambda: "resumed-code")
    train_main(["--config", str(config_path), "--data-root", str(FIXTURE_DATA), "--out", str(out), "--steps", "3"])
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "step": 2} in records
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3]
    resumed = torch.load(out / "latest.pt", map_location="cpu", weights_only=False)
    assert resumed["step"] == 3
    assert resumed["code_commits"] == [{"commit": git_commit(), "from_step": 0},
                                       {"commit": "resumed-code", "from_step": 2}]


def test_export_cli_writes_manifest_that_model_store_loads(tmp_path: Path) -> None:
    model_store = pytest.importorskip("services.core.model_store")
    from training.export.__main__ import main as export_main

    config_path = write_config(tmp_path, tiny_config("renderer-ihc"))
    out = tmp_path / "run"
    train_main(["--config", str(config_path), "--data-root", str(FIXTURE_DATA), "--out", str(out)])
    store = tmp_path / "model_store"
    version_dir = export_main(["--config", str(config_path), "--checkpoint", str(out / "latest.pt"), "--version", "1",
                               "--store-root", str(store), "--data-root", str(FIXTURE_DATA)])

    assert {p.name for p in version_dir.iterdir()} >= {"model.onnx", "manifest.yaml", "MODEL_CARD.md"}
    manifest = model_store.ModelStore(store).get("renderer-ihc")
    assert manifest.version == "1" and manifest.kind == "renderer" and manifest.format == "onnx"
    model_store.ModelStore(store).verify_checksum(manifest)
    assert manifest.metadata["num_classes"] == 4
    assert manifest.metadata["input_channels"][-1] == "noise"
    assert manifest.provenance["steps"] == 2
    trained_by = torch.load(out / "latest.pt", map_location="cpu", weights_only=False)["code_commits"]
    assert manifest.provenance["training_commit"] == trained_by[0]["commit"]  # recorded at training, not export
    assert "export_commit" in manifest.provenance
    assert manifest.metrics["onnx_parity_max_abs"] < 1e-3
    card = (version_dir / "MODEL_CARD.md").read_text()
    assert "## Scores" in card and "non-commercial" in card


def test_refiner_v2_exports_guide_and_noise_channels_and_ema_weights(tmp_path: Path) -> None:
    """mask-refiner v2: [coarse, guide, noise] input recorded in the manifest; glands renderer v2 keeps an EMA."""
    model_store = pytest.importorskip("services.core.model_store")
    from training.export.__main__ import main as export_main

    config = tiny_config("mask-refiner")
    config["train"]["ema_decay"] = 0.9
    config_path = write_config(tmp_path, config)
    out = tmp_path / "run"
    train_main(["--config", str(config_path), "--data-root", str(FIXTURE_DATA), "--out", str(out)])
    checkpoint = torch.load(out / "latest.pt", map_location="cpu", weights_only=False)
    assert "generator_ema" in checkpoint
    assert not torch.equal(checkpoint["generator_ema"]["model.model.0.weight"],
                           checkpoint["generator"]["model.model.0.weight"])
    version_dir = export_main(["--config", str(config_path), "--checkpoint", str(out / "latest.pt"), "--version", "2",
                               "--store-root", str(tmp_path / "store"), "--data-root", str(FIXTURE_DATA)])
    manifest = model_store.ModelStore(tmp_path / "store").get("mask-refiner")
    assert manifest.metadata["input_channels"] == ["coarse", "guide", "noise"]
    assert manifest.inputs[0].shape[1] == 3
    assert manifest.provenance["weights"] == "EMA of the generator weights"
    assert (version_dir / "model.onnx").is_file()


def _tiny_renderer() -> torch.nn.Module:
    from training.models.pix2pixhd_global import GlobalGenerator

    torch.manual_seed(0)
    return GlobalGenerator(in_channels=5, ngf=4, n_downsample=2, n_blocks=1)


PROVENANCE = {"training_commit": "test", "config": {}, "seed": 0, "data": ["none"], "steps": 0,
              "train_seconds": 0.0, "hardware": "test"}
AXES = {"label": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "height", 3: "width"}}


def test_export_parity_at_two_sizes_and_dynamic_axes(tmp_path: Path) -> None:
    import onnxruntime as ort

    version_dir = export_to_model_store(
        _tiny_renderer(), (torch.zeros(1, 5, 64, 64),), name="tiny-renderer", version=1, kind="test",
        input_names=["label"], output_names=["image"], dynamic_axes=AXES, metadata={"num_classes": 4},
        provenance=PROVENANCE, store_root=tmp_path, parity_sizes=[(64, 64), (48, 80)], atol=1e-4,
        card=ModelCard("tiny", "s", "d", "i", "l"),
    )
    manifest = yaml.safe_load((version_dir / "manifest.yaml").read_text())
    assert manifest["inputs"] == [{"name": "label", "dtype": "float32", "shape": ["batch", 5, "height", "width"]}]
    assert manifest["outputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert manifest["metrics"]["onnx_parity_max_abs"] < 1e-4
    assert [tuple(s) for s in manifest["metrics"]["onnx_parity_sizes"]] == [(1, 64, 64), (3, 64, 64), (1, 48, 80),
                                                                             (3, 48, 80)]
    # a size never used during export or parity still runs (H/W were not frozen by the example)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"label": np.zeros((2, 5, 40, 96), np.float32)})[0]
    assert out.shape == (2, 3, 40, 96)
    for key in ("name", "version", "kind", "format", "file", "sha256", "max_batch_size", "inputs", "outputs",
                "metadata", "provenance", "metrics"):
        assert key in manifest, key


def _export_tiny_renderer(model: torch.nn.Module, store_root: Path) -> Any:
    """Export a tiny 5-channel renderer as version 1 (parity checked at two sizes); an ORT session on the file."""
    import onnxruntime as ort

    version_dir = export_to_model_store(
        model, (torch.zeros(1, 5, 64, 64),), name="tiny-renderer", version=1, kind="test",
        input_names=["label"], output_names=["image"], dynamic_axes=AXES, metadata={"num_classes": 4},
        provenance=PROVENANCE, store_root=store_root, parity_sizes=[(64, 64), (48, 80)], atol=1e-4,
        card=ModelCard("tiny", "s", "d", "i", "l"))
    return ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def test_reflect_padded_generator_takes_zero_padded_weights_exports_and_loses_the_top_left_border_cue(
        tmp_path: Path) -> None:
    from training.models.pix2pixhd_global import GlobalGenerator

    zero = _tiny_renderer()
    reflect = GlobalGenerator(in_channels=5, ngf=4, n_downsample=2, n_blocks=1, downsample_padding="reflect")
    reflect.load_state_dict(zero.state_dict())  # same names and shapes: shipped weights load as they are
    # A uniform label: reflection padding keeps the strided convs' input uniform up to the border, zero padding
    # does not, so only the zero-padded net's output varies near the top and left edges.
    label = torch.zeros(1, 5, 32, 32)
    label[:, 0] = 1
    zero.eval(), reflect.eval()
    with torch.no_grad():
        spread_zero, spread_reflect = float(zero(label).std()), float(reflect(label).std())
    assert spread_reflect < 1e-4 < spread_zero
    session = _export_tiny_renderer(reflect, tmp_path)
    assert session.run(None, {"label": label.numpy()})[0].std() < 1e-4
    with pytest.raises(ValueError, match="downsample_padding"):
        GlobalGenerator(in_channels=5, downsample_padding="circular")


def test_resize_conv_generator_draws_no_checkerboard_and_exports_at_any_size(tmp_path: Path) -> None:
    from training.models.pix2pixhd_global import GlobalGenerator

    from training.models.pix2pixhd_global import _upsample_x2

    # A uniform feature map: a stride-2 transposed conv3 sums one kernel tap into even and two into odd output
    # pixels, so its output alternates with period 2 (the checkerboard); nearest upsampling + conv weighs all alike.
    torch.manual_seed(0)
    features = torch.ones(1, 8, 16, 16)
    with torch.no_grad():
        grid = torch.nn.Sequential(*_upsample_x2(8, 4, "transposed"))(features)[0, 0, 2:-2, 2:-2]
        flat = torch.nn.Sequential(*_upsample_x2(8, 4, "resize"))(features)[0, 0]
    assert float((grid[0::2, 0::2].mean() - grid[1::2, 1::2].mean()).abs()) > 1e-2
    assert float(flat.std()) < 1e-5
    torch.manual_seed(0)
    transposed = GlobalGenerator(in_channels=5, ngf=4, n_downsample=2, n_blocks=1, downsample_padding="reflect")
    resize = GlobalGenerator(in_channels=5, ngf=4, n_downsample=2, n_blocks=1, downsample_padding="reflect",
                             upsample="resize")
    with pytest.raises(RuntimeError, match="size mismatch"):  # no transposed-conv weights can warm-start it
        resize.load_state_dict(transposed.state_dict())
    session = _export_tiny_renderer(resize, tmp_path)
    assert session.run(None, {"label": np.zeros((1, 5, 40, 96), np.float32)})[0].shape == (1, 3, 40, 96)
    with pytest.raises(ValueError, match="upsample"):
        GlobalGenerator(in_channels=5, upsample="bilinear")


def test_export_refuses_existing_version_and_bad_tolerance(tmp_path: Path) -> None:
    kwargs = dict(name="tiny-renderer", kind="test", input_names=["label"], output_names=["image"],
                  dynamic_axes=AXES, metadata={}, provenance=PROVENANCE, store_root=tmp_path,
                  parity_sizes=[(32, 32), (32, 48)])
    export_to_model_store(_tiny_renderer(), (torch.zeros(1, 5, 32, 32),), version="1", **kwargs)
    with pytest.raises(FileExistsError, match="already exists"):
        export_to_model_store(_tiny_renderer(), (torch.zeros(1, 5, 32, 32),), version="1", **kwargs)
    with pytest.raises(ParityError, match="atol"):
        export_to_model_store(_tiny_renderer(), (torch.zeros(1, 5, 32, 32),), version="2", atol=0.0, **kwargs)
    assert not (tmp_path / "tiny-renderer" / "2").exists(), "a failed export must not leave a version directory"


def test_build_tensorrt_skips_cleanly_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from training.export import build_tensorrt

    if build_tensorrt.tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and CUDA present: the engine build is covered by tests/gpu/training")
    assert build_tensorrt.main(["--model-dir", str(tmp_path / "absent" / "1")]) == 0
    assert build_tensorrt.SKIP_MESSAGE in capsys.readouterr().out
    assert not any(tmp_path.iterdir()), "a skipped build writes nothing"


def test_refiner_warm_starts_from_the_store_with_a_discriminator_warm_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init_from_store works for the pix2pix refiner as for the renderers: G from the shipped ONNX, D warmed up alone."""
    from training.export.__main__ import main as export_main
    from training.trainers.store_weights import read_onnx_initializers

    config = tiny_config("mask-refiner")
    shipped_config = write_config(tmp_path, config)
    export_main(["--config", str(shipped_config), "--checkpoint", str(_trained(tmp_path, shipped_config)),
                 "--version", "4", "--store-root", str(tmp_path / "store"), "--data-root", str(FIXTURE_DATA)])
    monkeypatch.setenv("HISTOSYNTH_MODEL_STORE", str(tmp_path / "store"))

    successor = copy.deepcopy(config)
    successor["train"].update(steps=1, init_from_store={"model": config["name"], "version": 4,
                                                       "discriminator_warmup_steps": 2})
    successor_dir = tmp_path / "successor"
    successor_dir.mkdir()
    out = tmp_path / "runs" / "successor"
    train_main(["--config", str(write_config(successor_dir, successor)), "--data-root", str(FIXTURE_DATA),
                "--out", str(out)])
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in records[:2]] == ["warm_started", "discriminator_warmup"]
    assert records[0]["from"] == f"model_store:{config['name']}/4" and records[1]["steps"] == 2
    assert np.isfinite(records[1]["d_real"]) and np.isfinite(records[1]["d_fake"])
    assert [r["step"] for r in records if "event" not in r] == [1]
    # before any step, G holds exactly the shipped weights
    from training.trainers import get_trainer

    trainer = get_trainer(successor["trainer"])(successor, tmp_path / "runs" / "fresh", FIXTURE_DATA)
    assert trainer.maybe_warm_start()["discriminator"] == "fresh"
    shipped = read_onnx_initializers(tmp_path / "store" / config["name"] / "4" / "model.onnx")
    state = trainer.generator.state_dict()
    assert shipped and set(shipped) <= set(state)
    for key, value in shipped.items():
        np.testing.assert_array_equal(state[key].numpy(), value)


def _trained(tmp_path: Path, config_path: Path) -> Path:
    out = tmp_path / "runs" / "shipped"
    train_main(["--config", str(config_path), "--data-root", str(FIXTURE_DATA), "--out", str(out)])
    return out / "latest.pt"


def test_v10_recipe_trains_a_resize_conv_renderer_from_scratch_and_exports_it_without_transposed_convs(
        tmp_path: Path) -> None:
    import onnx

    from training.export.__main__ import main as export_main

    real = load_config(CONFIGS / "renderer-he-nuclei-v10.yaml")
    assert real["generator"]["upsample"] == "resize" and real["generator"]["downsample_padding"] == "reflect"
    assert not real["train"].get("init_from") and not real["train"].get("init_from_store"), "from scratch"
    config = tiny_config("renderer-he-nuclei-v10")
    config["generator"].update({key: real["generator"][key] for key in ("upsample", "downsample_padding")})
    config_path = write_config(tmp_path, config)
    out = tmp_path / "run"
    train_main(["--config", str(config_path), "--data-root", str(FIXTURE_DATA), "--out", str(out)])
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert not any(r.get("event") == "warm_started" for r in records)
    version_dir = export_main(["--config", str(config_path), "--checkpoint", str(out / "latest.pt"), "--version", "10",
                               "--store-root", str(tmp_path / "store"), "--data-root", str(FIXTURE_DATA)])
    ops = {node.op_type for node in onnx.load(str(version_dir / "model.onnx")).graph.node}
    assert "Resize" in ops and "ConvTranspose" not in ops
