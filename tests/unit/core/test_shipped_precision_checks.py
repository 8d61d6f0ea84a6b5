"""The precision checks shipped beside the models say what the gate serves (services/core/runtimes/selection.py).

renderer-he-nuclei v2: OpenVINO bf16 passed the output tolerance but its held-back quality check
(scripts/precision_quality.py: downstream benchmark arms B and C paired with fp32, encoder FID/KID) broke a
rule stated before measuring, and NNCF int8 failed the output tolerance: neither may load; fp32 still does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.model_store import ModelStore
from services.core.runtimes.base import ModelLoadError
from services.core.runtimes.selection import passing_check, read_checks, require_precision_check

SHIPPED = Path(__file__).resolve().parents[3] / "model_store"


@pytest.fixture(scope="module")
def renderer_v2():  # noqa: ANN201 - ModelManifest
    return ModelStore(SHIPPED).get("renderer-he-nuclei", "2")


def test_v2_bf16_entry_records_output_and_quality_and_is_refused(renderer_v2) -> None:  # noqa: ANN001
    [bf16] = [c for c in read_checks(renderer_v2) if (c["runtime"], c["precision"]) == ("openvino", "bf16")]
    assert bf16["output_passed"] is True and bf16["passed"] is False
    quality = bf16["quality"]
    assert quality["passed"] is False and quality["failed_rules"]
    for arm in ("B", "C"):
        for metric in ("pixel_dice", "object_f1"):
            entry = quality["downstream"][arm][metric]
            assert len(entry["diff_per_seed"]) == 5 and "within" in entry and "inside_fp32_ci" in entry
    distribution = quality["distribution"]
    assert distribution["n"] == 256 and distribution["fid_within"] and distribution["kid_within"]
    low, high = distribution["fp32_vs_held_back"]["fid_ci95"]
    assert low <= distribution["variant_vs_held_back"]["fid"] <= high
    assert passing_check(renderer_v2, "openvino", "bf16") is None
    with pytest.raises(ModelLoadError, match=r"openvino/bf16: FAILED.*openvino/int8: FAILED"):
        require_precision_check(renderer_v2, "openvino", "bf16")
    assert require_precision_check(renderer_v2, "onnxruntime", "fp32") is None


def test_v2_int8_entry_is_a_failed_output_check_calibrated_on_training_tiles(renderer_v2) -> None:  # noqa: ANN001
    [int8] = [c for c in read_checks(renderer_v2) if (c["runtime"], c["precision"]) == ("openvino", "int8")]
    assert int8["passed"] is False and int8["output_passed"] is False
    assert int8["measured"]["image_mean_abs_levels"] > int8["tolerance"]["image_mean_abs_levels"]
    calibration = int8["calibration"]
    assert calibration["split"].startswith("train")
    held_back = set(calibration["held_back_groups_excluded"])
    assert set(renderer_v2.provenance["split"]["groups"]["test"]) <= held_back
    stems = {origin.split("/")[-1].split("@")[0] for origin in calibration["origins_first"]}
    names = {group.split(":")[1].removeprefix("CoNSeP_") for group in held_back}  # CoNSeP files: train_12_003.jpg
    assert not any(stem.startswith((f"{name}_", f"{name}-")) for name in names for stem in stems)


def test_rerunning_the_output_check_keeps_a_failed_quality_check(renderer_v2) -> None:  # noqa: ANN001
    import sys

    sys.path.insert(0, str(SHIPPED.parent / "scripts"))
    from check_precision import keep_quality

    fresh = {"runtime": "openvino", "precision": "bf16", "sha256": renderer_v2.sha256, "passed": True, "measured": {}}
    merged = keep_quality(fresh, read_checks(renderer_v2))
    assert merged["output_passed"] is True and merged["passed"] is False and merged["quality"]["passed"] is False
    other_file = {**fresh, "sha256": "0" * 64}
    assert keep_quality(other_file, read_checks(renderer_v2)) == other_file
