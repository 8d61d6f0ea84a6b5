"""`make experiment-coarse-to-fine --quick` on the fixture GlaS sample: real refinement + scoring services on
loopback, the shipped mask-refiner and histology-encoder, a real report on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from services.scoring import mask_stats
from training.experiments import coarse_to_fine

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def test_blob_masks_hit_the_fraction_and_are_seeded() -> None:
    masks, sigmas = coarse_to_fine.blob_masks(6, 64, 0.3, seed=5)
    again, _ = coarse_to_fine.blob_masks(6, 64, 0.3, seed=5)
    other, _ = coarse_to_fine.blob_masks(6, 64, 0.3, seed=6)
    assert masks.shape == (6, 64, 64) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    np.testing.assert_allclose(masks.reshape(6, -1).mean(1), 0.3, atol=1.0 / 64**2)
    assert np.array_equal(masks, again) and not np.array_equal(masks, other)
    assert set(sigmas) <= set(coarse_to_fine.BLOB_SIGMAS)


def test_quick_experiment_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "coarse-to-fine"
    assert coarse_to_fine.main(["--data-root", str(FIXTURE_DATA), "--out", str(out), "--quick"]) == 0

    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    assert "quick mode" in results["data"]["split"]  # the fixture sample holds no refiner test split
    assert results["refiner"]["name"] == "mask-refiner"
    sets = set(coarse_to_fine.SET_ORDER)
    assert set(results["mask_scores_vs_real_b"]) == sets == set(results["image_scores_vs_real_b"])
    half = results["data"]["half_b_reference"]
    for name in sets:
        masks = results["mask_scores_vs_real_b"][name]
        assert masks["real_count"] == half and masks["synthetic_count"] == half
        # Tissue (class 1) only, border objects measured as cut: 9 object features + 2 image features.
        assert masks["classes"]["1"]["status"] == "compared" and masks["include_border_objects"] is True
        assert len(masks["per_feature"]) == len(mask_stats.OBJECT_FEATURES) + len(mask_stats.IMAGE_FEATURES)
        assert all(name.endswith("/class_1") for name in masks["per_feature"])
        assert 0.0 <= masks["mean_ks"] <= 1.0 and 0.0 <= masks["mean_js"] <= 1.0
        assert masks["real_objects"] > 0 and masks["synthetic_objects"] > 0
        images = results["image_scores_vs_real_b"][name]
        assert np.isfinite(images["fid"]) and images["extractor"]["name"] == "histology-encoder"
    # The noise baseline is thresholded to real half A's tissue fraction.
    assert abs(results["tissue_fraction"]["noise_blobs"]["mean"]
               - results["data"]["noise_blobs"]["tissue_fraction_f"]) < 1e-3
    # The H&E refiner is refused for IHC by the service, and the report records the answer.
    assert results["ihc_deepliif_235"]["service_answer_for_stain_ihc"]["refused"] is True

    # Paired agreement per tile with its own fine mask, refined with and without the gland layout.
    paired = results["paired_with_own_real_fine"]
    assert set(paired["mean"]) == {"coarse_sketch", "refined_sketch_guided", "refined_sketch_unguided",
                                   "refined_priorpath_guided", "coarse_priorpath"}
    tiles = results["data"]["tiles"]
    assert all(len(per_tile) == tiles for per_tile in paired["per_tile"].values())
    assert 0.0 <= paired["refined_vs_coarse_sketch"]["sketch_guided"]["boundary_f"]["share_better"] <= 1.0
    # The shipped refiner (v2) takes the gland layout and noise: two seeds give different fine masks, and the
    # mask-only glands chain ran through the rendering service against the patient-disjoint reference.
    assert results["refiner"]["guided"] is True
    assert results["seed_diversity_changed_pixel_fraction"] > 0.0
    glands = results["glands_from_masks"]
    assert set(glands["summary"]) == {"real_vs_real", "layout_only", "layout_sketch", "layout_no_refiner",
                                      "real_image_rule"}
    assert all(np.isfinite(v["fid_mean"]) for v in glands["summary"].values())
    assert (out / "glands_grid.png").is_file()

    readme = (out / "README.md").read_text()
    assert "noise-only blobs" in readme and "FID" in readme and "relative" in readme.lower()
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 4 * 256  # five columns: H&E | real | coarse | refined | blob
