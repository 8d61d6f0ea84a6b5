"""training/experiments/downstream_segmentation.py: --quick end to end on the fixture data, plus its pieces.

The end-to-end test renders with the SHIPPED renderer-he-nuclei (model_store/, real ONNX Runtime) from a copy
whose manifest records a split of the fixture's two CoNSeP tiles, trains the real U-Net for a few steps in
spawned workers, and checks the written report. It never reads ../shared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from training.data.shared_layout import Record, load_records, split_records
from training.experiments import downstream_segmentation as experiment

REPO = Path(__file__).resolve().parents[3]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
FRACTIONS = [0.5, 0.0, 0.5]  # the fixture has 2 CoNSeP tiles: one to train from, one held back


def _fixture_store(root: Path) -> Path:
    """model_store/ with a copy of the shipped renderer whose provenance records a split of the fixture tiles."""
    source = REPO / "model_store" / experiment.RENDERER / "1"
    target = root / experiment.RENDERER / "1"
    target.mkdir(parents=True)
    shutil.copy(source / "model.onnx", target / "model.onnx")
    manifest = yaml.safe_load((source / "manifest.yaml").read_text())
    splits = split_records(load_records(FIXTURE_DATA, "consep"), tuple(FRACTIONS), 0)
    manifest["provenance"]["config"]["data"]["split_fractions"] = FRACTIONS
    manifest["provenance"]["split"]["groups"] = {name: sorted({r.group for r in rows}) for name, rows in splits.items()}
    (target / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root


def test_quick_run_writes_a_report(tmp_path: Path) -> None:
    store = _fixture_store(tmp_path / "model_store")
    out, runs = tmp_path / "report", tmp_path / "runs"
    argv = ["--data-root", str(FIXTURE_DATA), "--out", str(out), "--store", str(store), "--runs-dir", str(runs),
            "--quick"]
    assert experiment.main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    expected_test = sorted({r.group for r in split_records(load_records(FIXTURE_DATA, "consep"),
                                                           tuple(FRACTIONS), 0)["test"]})
    assert results["split"]["test_groups"] == expected_test
    assert len(results["runs"]) == len(experiment.CONDITIONS) * len(experiment.QUICK.seeds)
    for run in results["runs"]:
        assert run["steps"] == experiment.QUICK.steps
        metrics = run["metrics"]
        for key, _ in experiment.METRIC_ROWS:
            assert 0.0 <= metrics[key] <= 1.0
        assert np.asarray(metrics["confusion"]).sum() == run["test_patches"] * 256 * 256
    by_condition = results["summary"]["by_condition"]
    assert set(by_condition) == set(experiment.CONDITIONS)
    assert by_condition["real_only"]["miou"]["n"] == len(experiment.QUICK.seeds)
    shipped = yaml.safe_load((REPO / "model_store" / experiment.RENDERER / "1" / "manifest.yaml").read_text())
    for seed_meta in results["seeds"]:
        assert seed_meta["renderer"]["sha256"] == shipped["sha256"]
        assert not set(seed_meta["real_patches"]) & set(seed_meta["synthetic_mask_patches"])
        assert not set(seed_meta["real_tiles"]) & set(expected_test)
    synthetic = np.load(runs / "data" / "seed0.npz")
    assert synthetic["synthetic_images"].shape == (1, 256, 256, 3) and synthetic["synthetic_images"].std() > 5
    readme = (out / "README.md").read_text()
    assert "real_plus_synthetic" in readme and "nucleus Dice (binary)" in readme
    for name in ("test_predictions.png", "synthetic_samples.png", "real_subset.png"):
        assert (out / name).stat().st_size > 0


def _records(tiles: int, per_tile: int) -> list[Record]:
    return [Record("consep", Path(f"t{t}_{p}.jpg"), Path(f"t{t}_{p}.png"), None, None, f"consep:t{t}")
            for t in range(tiles) for p in range(per_tile)]


def test_subsets_are_seeded_and_tile_disjoint() -> None:
    records = _records(tiles=10, per_tile=4)
    settings = experiment.Settings(n_real=3, n_synthetic=12)
    real, synthetic = experiment.draw_subsets(records, settings, seed=1)
    assert len(real) == 3 and len(synthetic) == 12
    assert not {r.group for r in real} & {r.group for r in synthetic}
    assert experiment.draw_subsets(records, settings, seed=1) == (real, synthetic)
    assert experiment.draw_subsets(records, settings, seed=2)[0] != real
    with pytest.raises(ValueError, match="disjoint"):
        experiment.draw_subsets(records, experiment.Settings(n_real=3, n_synthetic=38), seed=1)


def test_metrics_of_a_known_prediction() -> None:
    truth = np.zeros((1, 8, 8), np.uint8)
    truth[0, :4, :4] = 3  # epithelial nucleus
    perfect = experiment.segmentation_metrics(truth, truth.copy())
    assert perfect["nucleus_dice"] == pytest.approx(1.0) and perfect["iou_per_class"]["epithelial"] == 1.0
    wrong_class = truth.copy()
    wrong_class[truth == 3] = 2  # right nucleus, wrong type: binary perfect, class IoU 0
    scores = experiment.segmentation_metrics(truth, wrong_class)
    assert scores["nucleus_dice"] == pytest.approx(1.0)
    assert scores["iou_per_class"]["epithelial"] == 0.0 and scores["iou_per_class"]["inflammatory"] == 0.0
    assert scores["miou"] < perfect["miou"]
