"""`make experiment-balanced-generation --quick`: the real generation + scoring services on loopback with the
shipped renderers and segmenters, and the bin statistics on hand-made values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.stats

from services.generation.spec import FractionRange, GenerationSpec, StratumSpec
from training.experiments import balanced_generation as bg

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def glands_spec(weights: tuple[float, float, float]) -> GenerationSpec:
    spans = ((0.1, 0.3), (0.3, 0.5), (0.5, 0.7))
    return GenerationSpec(count=10, tissue="glands", strata=tuple(
        StratumSpec(label=f"s{i}", weight=w, class_fraction_ranges={"gland": FractionRange(*span)})
        for i, (w, span) in enumerate(zip(weights, spans))))


def test_gland_bins_outside_values_and_statistics() -> None:
    scheme = bg.bin_scheme(glands_spec((1, 3, 6)))
    assert scheme.requested == pytest.approx((0.1, 0.3, 0.6))
    assert [scheme.bin_of(v) for v in (0.1, 0.29, 0.3, 0.7, 0.05, 0.71)] == [0, 0, 1, 2, None, None]
    values = [0.2] + [0.4] * 3 + [0.6] * 5 + [0.9]  # one sample above every bin
    result = bg.distribution(values, scheme)
    assert result["counts"] == [1, 3, 5] and result["outside"] == 1
    assert result["total_variation"] == pytest.approx(0.5 * (0 + 0 + 0.1 + 0.1))
    # chi-square after merging the outside value into the nearest bin (the top one): counts 1 / 3 / 6.
    assert result["chi2_counts_outside_merged"] == [1, 3, 6]
    assert result["chi2_p"] == pytest.approx(scipy.stats.chisquare([1, 3, 6], [1, 3, 6]).pvalue)


def test_ihc_bins_follow_the_clinical_cutoffs() -> None:
    spec = GenerationSpec(count=10, tissue="ihc", strata=(
        StratumSpec(label="low", weight=6, positive_proportion=FractionRange(0.0, 0.0099)),
        StratumSpec(label="mid", weight=3, positive_proportion=FractionRange(0.01, 0.49)),
        StratumSpec(label="high", weight=1, positive_proportion=FractionRange(0.5, 1.0))))
    scheme = bg.bin_scheme(spec)
    assert scheme.labels == ("<1%", "1-49%", ">=50%") and scheme.requested == pytest.approx((0.6, 0.3, 0.1))
    result = bg.distribution([0.0] * 2 + [0.3] * 8, scheme)  # nothing >= 50 %, too few < 1 %
    assert result["total_variation"] == pytest.approx(0.5)
    assert result["chi2_p"] < 0.01


def test_quick_experiment_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "balanced-generation"
    assert bg.main(["--data-root", str(FIXTURE_DATA), "--out", str(out), "--quick"]) == 0

    results = json.loads((out / "report.json").read_text())["results"]
    assert set(results["specs"]) == {name for name, _ in bg.SPECS}
    for name, spec in results["specs"].items():
        assert spec["delivered"] == bg.QUICK.count
        assert sum(spec["requested"]) == pytest.approx(1.0)
        for side in ("achieved_mask", "achieved_image"):
            achieved = spec[side]
            assert sum(achieved["counts"]) + achieved["outside"] == bg.QUICK.count
            assert 0.0 <= achieved["total_variation"] <= 1.0
        # The mask-side value is what the generation service scored for the sample.
        assert spec["mask_vs_service_score_max_abs_diff"] < 1e-6
        assert spec["segmenter"]["name"].startswith("segmenter-")
        assert (out / spec["grid"]).is_file()
    # The image measure is calibrated on real fixture images (GlaS for glands, DeepLIIF for IHC).
    calibration = results["image_measure_on_real_images"]
    assert set(calibration) == {"glands", "ihc"}
    for tissue, result in calibration.items():
        assert result["crops"] == bg.QUICK.calibration_crops
        assert 0.0 <= result["bin_agreement"] <= 1.0
        assert sum(map(sum, result["confusion_true_rows_read_columns"])) == result["crops"]
        assert result["segmenter"]["name"] == bg.CALIBRATION[tissue][0]
    readme = (out / "README.md").read_text()
    assert "total variation" in readme.lower() and "chi-square" in readme.lower() and "calibration" in readme
