"""training.experiments.noise_frequency --quick on the real CoNSeP fixture: trains the 7 variants for a few steps
(real Pix2PixHDTrainer), renders, scores through the real scoring service and writes the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.experiments import noise_frequency as nf

FIXTURE_DATA = Path(__file__).resolve().parents[2] / "fixtures" / "data"


def test_variants_differ_only_in_their_input() -> None:
    configs = {v.name: nf.trainer_config(v, nf.Budget()) for v in nf.variants()}
    assert list(configs) == ["polygon", "noise-5", "noise-10", "noise-15", "noise-25", "noise-40", "full"]
    shared = {k: v for k, v in configs["polygon"].items() if k not in ("name", "data")}
    for config in configs.values():
        assert {k: v for k, v in config.items() if k not in ("name", "data")} == shared
        assert config["data"]["crop"] == configs["polygon"]["data"]["crop"]
        assert config["data"]["split_fractions"] == [0.8, 0.1, 0.1] and config["data"]["split_seed"] == 0
    assert configs["noise-15"]["data"]["noise_spacing"] == 15.0
    assert configs["polygon"]["data"]["noise_spacing"] is None
    assert configs["full"]["data"]["use_edges"] and configs["full"]["data"]["sources"][0].get("derive") is None
    assert configs["noise-5"]["data"]["sources"][0]["derive"] == "polygon"


def test_gap_closed() -> None:
    assert nf.gap_closed(10.0, 10.0, 4.0) == 0.0
    assert nf.gap_closed(4.0, 10.0, 4.0) == 1.0
    assert nf.gap_closed(5.5, 10.0, 4.0) == pytest.approx(0.75)
    assert nf.gap_closed(3.0, 3.0, 3.0) is None


def test_shard_covers_every_variant_once() -> None:
    names = [v.name for v in nf.variants()]
    parts = nf.shard(names, 2)
    assert sorted(sum(parts, [])) == sorted(names) and len(parts[0]) == 4


def test_quick_run_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert nf.main(["--quick", "--data-root", str(FIXTURE_DATA), "--out", str(out)]) == 0
    for name in ("README.md", "report.json", "overview.png", *[f"grid_{v.name}.png" for v in nf.variants()]):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())["results"]
    assert set(report["variants"]) == {v.name for v in nf.variants()}
    n = report["design"]["held_back"]["n_per_half"]
    assert n >= 8
    for entry in [*report["variants"].values(), {"scores": report["real_vs_real"]}]:
        scores = entry["scores"]
        assert scores["real_count"] == n and scores["synthetic_count"] == n  # same N everywhere
        assert np.isfinite(scores["fid"]) and scores["fid"] >= 0
        assert np.isfinite(scores["kid_mean"]) and scores["kid_std"] >= 0
        assert scores["fid_ci"]["low"] <= scores["fid_ci"]["high"]
        assert scores["extractor"]["name"] == "histology-encoder"
    for entry in report["variants"].values():
        assert entry["training"]["steps"] == nf.QUICK.steps  # equal budget
        assert entry["training"]["final_losses"]
    findings = report["findings"]
    assert findings["best_spacing_fid"] in nf.SPACINGS
    assert report["variants"]["polygon"]["gap_closed"] == 0.0
    readme = (out / "README.md").read_text()
    assert "| noise-15 | 15 |" in readme and "real B vs real A" in readme and "## Answer" in readme
