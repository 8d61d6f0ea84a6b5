"""Patch-generator cGAN: patches128 loader, 2-step training smoke run, exact resume, ONNX export parity.

Runs on tests/fixtures/data (23 crops, 6 classes, one source image each) with a tiny architecture.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

from training.data.patches128 import (  # noqa: E402
    Patch128Dataset,
    class_balanced_weights,
    load_patch_index,
)
from training.models.cgan_patch import PatchDiscriminator, PatchGANConfig, PatchGenerator  # noqa: E402
from training.trainers.cgan_trainer import export_patch_generator, fixed_latents  # noqa: E402

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[3]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
CONFIG = REPO / "training" / "configs" / "patch-generator.yaml"
TINY = [8, 8, 8, 8, 8]


def tiny_config(tmp_path: Path) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["data"]["min_source_images"] = 1  # the fixture has one source image per class
    config["generator"].update(latent_dim=16, class_embed_dim=4, channels=TINY)
    config["discriminator"]["channels"] = TINY
    config["train"].update(batch_size=4, log_every=1, sample_every=2, checkpoint_every=1, samples_per_class=2)
    path = tmp_path / "patch-generator-tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, out: Path, steps: int) -> None:
    from training.train import main

    main(["--config", str(config), "--data-root", str(FIXTURE_DATA), "--out", str(out), "--steps", str(steps)])


# ----------------------------------------------------------------------------------------------------- data
def write_index(root: Path, sources_per_class: dict[str, int]) -> None:
    """A patches128 index naming made-up source images (load_patch_index reads no pixels)."""
    (root / "patches128").mkdir(parents=True)
    columns = ["dataset", "image", "x", "y", "size", "source_image", "glas_grade5", "glas_benign_malignant",
               "monuseg_organ"]
    with (root / "patches128" / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for label, n_sources in sources_per_class.items():
            dataset, name = label.split(":")
            for s in range(n_sources):
                for crop in range(3):
                    row = dict.fromkeys(columns, "")
                    row.update(dataset=dataset, image=f"{dataset}/images/{name}_{s}.png", x=128 * crop, y=0,
                               size=128, source_image=f"{name}_{s}")
                    row["glas_grade5" if dataset == "glas" else "monuseg_organ"] = name
                    row["glas_benign_malignant"] = "benign" if dataset == "glas" else ""
                    writer.writerow(row)


def test_split_is_grouped_deterministic_and_drops_rare_classes(tmp_path: Path) -> None:
    write_index(tmp_path, {"glas:healthy": 10, "monuseg:lung": 4, "monuseg:liver": 1})
    index = load_patch_index(tmp_path, min_source_images=3, val_fraction=0.2, seed=0)
    assert index.class_names == ("glas:healthy", "monuseg:lung")
    assert index.dropped_classes == {"monuseg:liver": 1}
    train_sources = {r.source_image for r in index.splits["train"]}
    val_sources = {r.source_image for r in index.splits["val"]}
    assert not train_sources & val_sources
    assert index.source_image_counts("val") == {"glas:healthy": 2, "monuseg:lung": 1}
    again = load_patch_index(tmp_path, min_source_images=3, val_fraction=0.2, seed=0)
    assert again.splits == index.splits
    with pytest.raises(KeyError, match="grade5_organ"):
        load_patch_index(tmp_path, label_scheme="nope")


def test_dataset_items_and_class_balanced_sampling() -> None:
    index = load_patch_index(FIXTURE_DATA, label_scheme="grade5_organ_all")
    assert index.class_names[:3] == ("glas:adenomatous", "glas:moderately differentiated", "glas:poorly differentiated")
    dataset = Patch128Dataset(FIXTURE_DATA, index, "train", seed=0)
    image, class_id = dataset[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert 0 <= class_id < len(index.class_names)
    # weights inverse to class frequency: every class carries the same total weight
    weights = class_balanced_weights(dataset.class_ids)
    per_class = torch.zeros(len(index.class_names), dtype=torch.float64).index_add_(0, dataset.class_ids, weights)
    assert torch.allclose(per_class, torch.ones_like(per_class))
    # un-augmented item is exactly the crop of the source image
    plain = Patch128Dataset(FIXTURE_DATA, index, "train", augment=False)
    record = plain.records[0]
    from PIL import Image

    crop = np.asarray(Image.open(FIXTURE_DATA / record.image).convert("RGB"))[record.y : record.y + 128,
                                                                              record.x : record.x + 128]
    np.testing.assert_allclose(plain[0][0].permute(1, 2, 0).numpy(), crop / 127.5 - 1.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- model
def test_model_shapes_and_range() -> None:
    config = PatchGANConfig(num_classes=3, latent_dim=16, class_embed_dim=4, generator_channels=(8,) * 5,
                            discriminator_channels=(8,) * 5)
    generator, discriminator = PatchGenerator(config).eval(), PatchDiscriminator(config)
    z, class_id = torch.randn(2, 16), torch.tensor([0, 2])
    with torch.no_grad():
        image = generator(z, class_id)
    assert image.shape == (2, 3, 128, 128) and float(image.abs().max()) <= 1.0
    assert discriminator(image, class_id).shape == (2,)


# ----------------------------------------------------------------------------------------------------- training
def test_two_step_training_then_exact_resume(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    resumed_dir, straight_dir = tmp_path / "resumed", tmp_path / "straight"
    train(config, resumed_dir, steps=2)
    logged = [json.loads(line) for line in (resumed_dir / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(np.isfinite(r[k]) for r in logged for k in ("loss_d", "loss_g", "d_real", "d_fake"))
    assert (resumed_dir / "samples_000002.png").is_file()
    info = json.loads((resumed_dir / "run_info.json").read_text())
    assert len(info["class_names"]) == 6
    assert torch.load(resumed_dir / "latest.pt", weights_only=False)["step"] == 2

    train(config, resumed_dir, steps=3)  # picks up latest.pt at step 2
    train(config, straight_dir, steps=3)
    resumed = torch.load(resumed_dir / "latest.pt", weights_only=False)
    straight = torch.load(straight_dir / "latest.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 3
    assert {"event": "resumed", "step": 2} in [json.loads(line) for line in (resumed_dir / "losses.jsonl").read_text().splitlines()]
    for key, value in straight["generator"].items():
        torch.testing.assert_close(resumed["generator"][key], value, rtol=0, atol=0, msg=f"generator {key}")


# ----------------------------------------------------------------------------------------------------- export
def test_export_parity_on_tiny_random_generator(tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    class_names = ["glas:healthy", "monuseg:breast", "monuseg:lung"]
    arch = PatchGANConfig(num_classes=3, latent_dim=16, class_embed_dim=4, generator_channels=(8,) * 5,
                          discriminator_channels=(8,) * 5)
    generator = PatchGenerator(arch)
    generator.train()(torch.randn(8, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))  # non-trivial BN running stats
    config = yaml.safe_load(CONFIG.read_text())
    version_dir = export_patch_generator(
        generator, class_names=class_names, config=config, steps=0, train_seconds=0.0,
        train_counts={c: 1 for c in class_names}, store_root=tmp_path / "model_store",
    )
    assert version_dir == tmp_path / "model_store" / "patch-generator" / "1"
    manifest = yaml.safe_load((version_dir / "manifest.yaml").read_text())
    assert manifest["kind"] == "patch_generator"
    assert [(i["name"], i["dtype"], i["shape"]) for i in manifest["inputs"]] == [
        ("z", "float32", ["batch", 16]), ("class_id", "int64", ["batch"])]
    assert manifest["outputs"][0]["shape"] == ["batch", 3, 128, 128]
    assert manifest["metadata"]["class_ids"] == {name: i for i, name in enumerate(class_names)}
    assert manifest["metadata"]["z_distribution"] == "standard_normal"
    assert manifest["metrics"]["onnx_parity_max_abs"] < 1e-3
    assert (version_dir / "samples.png").is_file() and (version_dir / "MODEL_CARD.md").is_file()

    # serving recipe: z from PCG64(seed); every class, batch of 6
    z, class_id = fixed_latents(seed=7, num_classes=3, per_class=2, latent_dim=16)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"z": z.numpy(), "class_id": class_id.numpy()})
    with torch.no_grad():
        expected = generator.eval()(z, class_id).numpy()
    assert np.abs(got - expected).max() < 1e-3
    # batch independence (eval-mode BN): sample 0 alone equals sample 0 in the batch
    (alone,) = session.run(None, {"z": z[:1].numpy(), "class_id": class_id[:1].numpy()})
    np.testing.assert_allclose(alone[0], got[0], atol=1e-5)
