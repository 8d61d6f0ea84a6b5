"""MEP prompt building: SD validity index, prompt table, balanced sampler, the prompt-conditioned cGAN run and the
experiment's --quick path on tests/fixtures/data (real ONNX encoder, real trainer subprocesses, real scoring service)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")
pytest.importorskip("sklearn")

from training.data.mep_prompts import (  # noqa: E402
    PROMPT_TEMPLATE,
    PromptTable,
    balanced_weights,
    build_prompt_table,
    choose_k,
    scattering,
    sd_index_curve,
    total_separation,
)

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[3]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"


def blobs(centres: np.ndarray, per_blob: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.standard_normal((per_blob, centres.shape[1])) for c in centres])
    return x, np.repeat(np.arange(len(centres)), per_blob)


# ----------------------------------------------------------------------------------------------- SD index
def test_scattering_and_separation_match_hand_computed_values() -> None:
    # var(X) = 26; each cluster {0, 2} / {10, 12} has variance 1 -> Scat = mean(1, 1) / 26.
    x = np.array([[0.0], [2.0], [10.0], [12.0]])
    assert scattering(x, np.array([0, 0, 1, 1]), 2) == pytest.approx(1 / 26)
    # Centres 0, 1, 3: Dmax/Dmin = 3, row sums of distances 4, 3, 5 -> Dis = 3 * (1/4 + 1/3 + 1/5).
    centres = np.array([[0.0], [1.0], [3.0]])
    assert total_separation(centres) == pytest.approx(3 * (1 / 4 + 1 / 3 + 1 / 5))


@pytest.mark.parametrize("true_k", [3, 5])
def test_sd_index_finds_the_number_of_well_separated_blobs(true_k: int) -> None:
    rng = np.random.default_rng(true_k)
    centres = rng.uniform(-10, 10, (true_k, 6))
    x, _ = blobs(centres, 60, 0.5, seed=1)
    curve, fits = sd_index_curve(x, range(2, 9), seed=0)
    assert [p.k for p in curve] == list(range(2, 9))
    assert choose_k(curve) == true_k
    # alpha = Dis(k_max): the SD of k_max is exactly (Scat + 1) * Dis there.
    assert curve[-1].sd == pytest.approx(curve[-1].dis * curve[-1].scat + curve[-1].dis)
    assert set(fits) == set(range(2, 9))


def test_sd_index_rejects_a_range_below_two() -> None:
    with pytest.raises(ValueError, match=">= 2"):
        sd_index_curve(np.zeros((10, 2)), range(1, 4))


# ----------------------------------------------------------------------------------------------- prompt table
def three_blob_table(tmp_path: Path | None = None, min_cell_crops: int = 10) -> tuple[PromptTable, list, list]:
    """Blobs of 40, 40 and 40 points; label "a" owns blob 0 and 3 points of blob 2, label "b" the rest."""
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    x, blob = blobs(centres, 40, 0.3, seed=0)
    labels = ["a" if b == 0 or (b == 2 and i % 40 < 3) else "b" for i, b in enumerate(blob)]
    keys = [(f"img/{i // 10}.png", 128 * (i % 10), 0) for i in range(len(x))]
    table = build_prompt_table(keys, labels, x, label_order=["b", "a"], ks=range(2, 6),
                               min_cell_crops=min_cell_crops, seed=0, encoder={"name": "synthetic"})
    return table, keys, labels


def test_prompt_table_conditions_texts_and_merging() -> None:
    table, keys, labels = three_blob_table()
    assert table.k == 3
    # Label order first ("b" then "a"), clusters ascending within a label; ids are consecutive.
    assert [c.condition_id for c in table.conditions] == list(range(len(table.conditions)))
    assert [c.label for c in table.conditions][:2] == ["b", "b"]
    assert all(c.text == PROMPT_TEMPLATE.format(label=c.label, cluster=c.cluster) for c in table.conditions)
    # "a" has 40 crops in one cluster and 3 in another (< 10): the 3 are merged into a's only kept cell.
    a_cells = table.of_label("a")
    assert len(a_cells) == 1 and a_cells[0].train_crops == 43 and len(a_cells[0].merged_clusters) == 1
    assert sum(c.train_crops for c in table.conditions) == len(keys)
    counts = Counter(table.assignments.values())
    assert all(counts[c.condition_id] == c.train_crops for c in table.conditions)
    # A crop of "a" in the merged cluster maps to a's kept cell.
    merged = a_cells[0].merged_clusters[0]
    assert table.condition("a", merged).condition_id == a_cells[0].condition_id
    assert table.label_shares("b") == pytest.approx({c.condition_id: c.train_crops / 77 for c in table.of_label("b")})


def test_prompt_table_json_round_trip_and_nearest_cluster(tmp_path: Path) -> None:
    table, keys, _ = three_blob_table()
    loaded = PromptTable.from_json(table.to_json(tmp_path / "table.json"))
    assert loaded.conditions == table.conditions
    assert loaded.assignments == table.assignments and loaded.clusters == table.clusters
    assert loaded.k == table.k and [p.k for p in loaded.sd_curve] == [p.k for p in table.sd_curve]
    # Points at the cluster centres are assigned to those clusters.
    assert loaded.nearest_cluster(table.centers).tolist() == list(range(table.k))
    json.dumps(table.metadata())  # the manifest part is plain JSON


# ----------------------------------------------------------------------------------------------- balancing
def test_balanced_weights_label_then_cell_and_cell() -> None:
    ids = np.array([0] * 10 + [1] * 90 + [2] * 50)
    cell_labels = ["A", "A", "B"]
    w = balanced_weights(ids, cell_labels, "label_then_cell")
    mass = np.bincount(ids, weights=w)
    assert mass == pytest.approx([0.25, 0.25, 0.5])
    mass = np.bincount(ids, weights=balanced_weights(ids, cell_labels, "cell"))
    assert mass == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    # What the trainer does with the weights: draws with replacement, seeded.
    draws = torch.multinomial(torch.from_numpy(w), 40_000, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    freq = np.bincount(ids[draws.numpy()], minlength=3) / 40_000
    assert freq == pytest.approx([0.25, 0.25, 0.5], abs=0.01)
    with pytest.raises(ValueError, match="balance mode"):
        balanced_weights(ids, cell_labels, "uniform")


def test_condition_draws_are_exact_per_label() -> None:
    from training.experiments.mep_prompts import allocate, condition_ids_for

    assert Counter(allocate(10, {0: 0.5, 1: 0.3, 2: 0.2})) == {0: 5, 1: 3, 2: 2}
    assert len(allocate(7, {3: 1 / 3, 4: 1 / 3, 5: 1 / 3})) == 7
    table, _, _ = three_blob_table()
    wanted = ["b"] * 20 + ["a"] * 5
    prop = condition_ids_for(wanted, table, "proportional")
    assert all(table.conditions[i].label == lab for i, lab in zip(prop, wanted))
    bal = Counter(condition_ids_for(wanted, table, "balanced")[:20].tolist())
    assert sorted(bal.values()) == [10, 10]


# ----------------------------------------------------------------------------------------------- experiment
def test_quick_experiment_on_fixture_trains_scores_and_exports(tmp_path: Path) -> None:
    import onnxruntime as ort

    from training.experiments.mep_prompts import SET_ORDER, main

    out = tmp_path / "report"
    assert main(["--data-root", str(FIXTURE_DATA), "--out", str(out), "--quick"]) == 0
    report = json.loads((out / "report.json").read_text())["results"]
    for name in SET_ORDER:
        for metric in ("fid", "kid_mean", "precision", "recall"):
            assert np.isfinite(report["scores"][name][metric]["mean"])
    assert report["extractor"]["name"] == "histology-encoder"
    # Same training steps for both models; the MEP run has one class id per prompt.
    assert report["training"]["baseline"]["steps"] == report["training"]["mep"]["steps"] == 2
    prompts = report["prompts"]["prompts"]
    assert 2 <= report["prompts"]["k"] <= 4 and len(report["prompts"]["sd_index_curve"]) == 3
    for grid in report["grids"].values():
        assert (out / grid).is_file()
    readme = (out / "README.md").read_text()
    assert "Circularity caveat" in readme and "morphology type" in readme

    version_dir = out / "model_store" / "patch-generator-mep" / "1"
    manifest = yaml.safe_load((version_dir / "manifest.yaml").read_text())
    meta = manifest["metadata"]
    assert meta["conditioning"] == "label_x_morphology_prompt"
    assert meta["num_classes"] == len(prompts) == len(meta["prompt_table"]["prompts"])
    assert meta["class_names"] == [p["text"] for p in prompts]
    assert "mep_experiment" in manifest["metrics"]
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((2, meta["latent_dim"]), dtype=np.float32)
    image = session.run(["image"], {"z": z, "class_id": np.array([0, len(prompts) - 1], dtype=np.int64)})[0]
    assert image.shape == (2, 3, 128, 128) and np.abs(image).max() <= 1.0


def test_trainer_rejects_balance_without_prompt_table(tmp_path: Path) -> None:
    from training.train import main

    config = yaml.safe_load((REPO / "training/configs/patch-generator-mep-baseline.yaml").read_text())
    config["data"].update(min_source_images=1, balance="cell")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(KeyError, match="prompt_table"):
        main(["--config", str(path), "--data-root", str(FIXTURE_DATA), "--out", str(tmp_path / "run"), "--steps", "1"])
