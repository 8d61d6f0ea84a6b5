"""training/experiments/downstream.py (issue #17): --quick end to end on the fixture data, and its metrics.

The end-to-end test renders with the SHIPPED renderer-he-nuclei versions through a real gRPC rendering server
on loopback, trains the real U-Net for a few steps and scores with the real scoring service. It never reads
../shared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from services.core.model_store import ModelStore
from services.core.runtimes.selection import record_check
from training.data.benchmark_split import BENCHMARK_HELD_BACK, SEEN_BY_V1, held_back_groups
from training.data.shared_layout import load_records, split_records
from training.experiments import downstream
from training.experiments.downstream_data import benchmark_split, draw_seed
from training.experiments.instance_metrics import (
    BOUNDARY, INTERIOR, image_counts, instances_from_prediction, scores, three_class_target)

REPO = Path(__file__).resolve().parents[3]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_perfect_prediction_scores_one_and_touching_nuclei_stay_apart() -> None:
    truth = np.zeros((64, 64), np.int32)
    truth[_disc(truth.shape, (20, 20), 8)] = 1
    truth[_disc(truth.shape, (20, 35), 8) & (truth == 0)] = 2  # touches nucleus 1
    truth[_disc(truth.shape, (48, 48), 6)] = 3
    target = three_class_target(truth)
    assert set(np.unique(target)) == {0, INTERIOR, BOUNDARY}
    predicted = instances_from_prediction(target)
    assert len(np.unique(predicted)) - 1 == 3  # the boundary class keeps the touching pair apart
    result = scores([image_counts(truth, predicted)])
    assert result["object_f1"] == 1.0
    assert result["pixel_dice"] > 0.97 and result["aji"] > 0.9


def test_missed_and_spurious_objects_lower_f1_and_aji_by_the_expected_amount() -> None:
    truth = np.zeros((64, 64), np.int32)
    truth[_disc(truth.shape, (16, 16), 7)] = 1
    truth[_disc(truth.shape, (48, 48), 7)] = 2
    predicted = np.zeros_like(truth)
    predicted[truth == 1] = 5  # nucleus 1 found exactly, nucleus 2 missed
    predicted[_disc(truth.shape, (16, 48), 5)] = 9  # one spurious object
    counts = image_counts(truth, predicted)
    assert (counts.objects_matched, counts.objects_true, counts.objects_predicted) == (1, 2, 2)
    area = int((truth == 1).sum())
    assert counts.aji_intersection == area
    assert counts.aji_union == area + int((truth == 2).sum()) + int((predicted == 9).sum())
    assert scores([counts])["object_f1"] == pytest.approx(0.5)


def test_benchmark_groups_are_forced_out_of_training_splits() -> None:
    records = load_records(FIXTURE_DATA, "monuseg")
    held = held_back_groups({"dataset": "monuseg", "held_back": "benchmark"})
    assert held == BENCHMARK_HELD_BACK["monuseg"] and SEEN_BY_V1 <= set(held)
    for seed in range(5):
        splits = split_records(records, (0.9, 0.1, 0.0), seed, held_back=held)
        trained = {r.group for r in splits["train"]} | {r.group for r in splits["val"]}
        assert not trained & set(held)
        assert "monuseg:TCGA-NH-A8F7" in {r.group for r in splits["test"]}
    with pytest.raises(ValueError, match="held_back"):
        held_back_groups({"dataset": "monuseg", "held_back": 3})


def test_seed_draws_keep_real_and_synthetic_tiles_apart_and_are_reproducible() -> None:
    split = benchmark_split(FIXTURE_DATA, "monuseg", ("monuseg:TCGA-NH-A8F7",))
    first, again = draw_seed(split, 3, 4, 8, 64), draw_seed(split, 3, 4, 8, 64)
    assert not set(first.real_groups) & set(first.mask_groups)
    assert {s.split("/")[0] for s in first.real.sources} <= set(first.real_groups)
    assert {s.split("/")[0] for s in first.synthetic_masks.sources} <= set(first.mask_groups)
    assert np.array_equal(first.real.images, again.real.images)
    assert first.synthetic_masks.sources == again.synthetic_masks.sources


def test_quick_benchmark_renders_over_grpc_trains_every_arm_and_writes_the_report(tmp_path: Path) -> None:
    out, runs = tmp_path / "report", tmp_path / "runs"
    argv = ["--data-root", str(FIXTURE_DATA), "--out", str(out), "--runs-dir", str(runs), "--quick", "--versions", "1"]
    assert downstream.main(argv) == 0
    report = json.loads((out / "report.json").read_text())["results"]
    quick = downstream.QUICK
    assert report["split"]["monuseg"]["test_groups"] == ["monuseg:TCGA-NH-A8F7"]
    # renderer v1 trained on that patient: the report must say so
    assert report["split"]["monuseg"]["renderers"]["1"]["saw_held_back"] == ["monuseg:TCGA-NH-A8F7"]
    # A, B and C with v1, and B and C on the masks' own real crops (the ceiling)
    assert len(report["runs"]) == len(quick.seeds) * 5
    assert report["split"]["monuseg"]["renderers"]["real"]["saw_held_back"] == []
    ceiling = report["summary"]["monuseg/k2/vreal"]
    assert ceiling["arms"]["B"]["seeds"] == list(quick.seeds) and "vreal" not in report["distribution"]["monuseg"]
    assert report["summary"]["monuseg/k2/v1"]["vs_real"]["B"]["pixel_dice"]["n"] == len(quick.seeds)
    assert not (runs / "data" / "monuseg-seed0-vreal.npz").exists()  # read from the seed file, not copied
    for run in report["runs"]:
        assert run["steps"] == quick.steps
        assert set(run["scores"]) == {"pixel_dice", "object_f1", "aji"}
        assert all(0.0 <= v <= 1.0 for v in run["scores"].values())
    entry = report["summary"]["monuseg/k2/v1"]
    assert set(entry["paired"]) == {"B-A", "C-A"} and entry["paired"]["B-A"]["pixel_dice"]["n"] == 2
    dist = report["distribution"]["monuseg"]
    assert dist["n"] == quick.distribution_crops and "warning" in dist and dist["warning"]
    assert dist["v1"]["extractor"]["name"] == "histology-encoder"
    assert set(dist["v1"]["stain_wasserstein"]) == {"H", "E", "DAB"}
    for name in ("real_vs_real", "v1"):
        contrast = dist[name]["nucleus_contrast"]
        assert contrast["n"] > 0 and np.isfinite(contrast["mean"]) and contrast["w1_to_held_back"] >= 0
    assert all(dist[name]["fixed_line_ratio"] >= 1.0 for name in ("real_vs_real", "v1"))
    assert all(dist[name]["grid_ratio"] > 0.0 for name in ("real_vs_real", "v1"))
    assert dist["held_back_nucleus_contrast"]["mean"] > 0  # real nuclei hold more hematoxylin than their surround
    assert {"FID <= 1.5x real-vs-real", "recall >= 0.3", "W1 H <= real-vs-real",
            "W1 nucleus contrast <= real-vs-real"} <= set(report["done_when"]["v1"])
    synthetic = np.load(runs / "data" / "monuseg-seed0-v1.npz")["images"]
    assert synthetic.shape == (quick.synthetic_factor * 2, quick.crop, quick.crop, 3) and synthetic.dtype == np.uint8
    readme = (out / "README.md").read_text()
    assert "B − A" in readme and "Protocol" in readme and "B real − A" in readme
    for grid in report["grids"]:
        assert (out / grid).is_file()
    # A second invocation reuses every finished run (nothing retrained).
    stamps = {p: p.stat().st_mtime for p in runs.glob("*/result.json")}
    assert downstream.main(argv) == 0
    assert stamps == {p: p.stat().st_mtime for p in runs.glob("*/result.json")}
    # --arms B trains only A and B; C is reported as missing, not as a failed check.
    assert downstream.main(argv + ["--arms", "B", "--no-distribution"]) == 0
    report = json.loads((out / "report.json").read_text())["results"]
    assert sorted({run["arm"] for run in report["runs"]}) == ["A", "B"]
    assert sorted({run["version"] for run in report["runs"]}) == ["", "1", "real"]
    assert report["summary"]["monuseg/k2/v1"]["arms"]["C"] is None


def test_renderer_labels_name_precision_variants_and_reject_unknown_ones() -> None:
    assert downstream.renderer_labels(("1", "2"), ("openvino-bf16",)) == ("1", "2", "1-openvino-bf16", "2-openvino-bf16")
    assert downstream.parse_label("2-openvino-bf16") == ("2", "openvino-bf16")
    assert downstream.parse_label("2") == ("2", None)
    assert downstream.parse_label("3-stain") == ("3", "stain")
    with pytest.raises(ValueError, match="unknown variant 'tpu-int4'"):
        downstream.parse_label("2-tpu-int4")


def test_quick_precision_variant_renders_the_same_masks_on_openvino_bf16_and_pairs_with_fp32(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    # A store of its own holding the shipped v2 with a passing bf16 entry, so this test does not depend on what the
    # shipped precision_checks.yaml says (the gate itself is tested in tests/unit/core/test_openvino_runtime.py).
    shipped = REPO / "model_store" / "renderer-he-nuclei" / "2"
    store = tmp_path / "model_store"
    shutil.copytree(shipped, store / "renderer-he-nuclei" / "2")
    manifest = ModelStore(store).get("renderer-he-nuclei", "2")
    record_check(manifest, {"runtime": "openvino", "precision": "bf16", "sha256": manifest.sha256, "passed": True})
    out, runs = tmp_path / "report", tmp_path / "runs"
    argv = ["--data-root", str(FIXTURE_DATA), "--out", str(out), "--runs-dir", str(runs), "--quick", "--versions", "2",
            "--precision-variants", "openvino-bf16", "--no-distribution", "--store", str(store), "--ks", "2",
            "--datasets", "monuseg"]
    assert downstream.main(argv) == 0
    report = json.loads((out / "report.json").read_text())["results"]
    keys = {f"{r['dataset']}-k{r['k']}-seed{r['seed']}-{r['arm']}" + (f"-v{r['version']}" if r["version"] else "")
            for r in report["runs"]}
    assert {"monuseg-k2-seed0-B-v2-openvino-bf16", "monuseg-k2-seed1-C-v2-openvino-bf16", "monuseg-k2-seed0-B-v2"} <= keys
    assert all((runs / key / "result.json").is_file() for key in keys)
    data_dir = runs / "data"
    # fp32 renders keep their old names; the variant's are cached beside them, served by the engine it names.
    fp32_meta = json.loads((data_dir / "monuseg-seed0-v2.json").read_text())
    bf16_meta = json.loads((data_dir / "monuseg-seed0-v2-openvino-bf16.json").read_text())
    assert fp32_meta["served_by"] == ["CPUExecutionProvider"]
    assert len(bf16_meta["served_by"]) == 1 and bf16_meta["served_by"][0].endswith("-CPU-bf16")
    assert fp32_meta["sha256"] == bf16_meta["sha256"] and fp32_meta["version"] == bf16_meta["version"] == "2"
    fp32 = np.load(data_dir / "monuseg-seed0-v2.npz")["images"].astype(np.int16)
    bf16 = np.load(data_dir / "monuseg-seed0-v2-openvino-bf16.npz")["images"].astype(np.int16)
    assert fp32.shape == bf16.shape and np.abs(fp32 - bf16).mean() < 1.0  # the same masks and seeds, bf16 rounding
    renderer = report["split"]["monuseg"]["renderers"]["2-openvino-bf16"]
    assert (renderer["runtime"], renderer["precision"], renderer["version"]) == ("openvino", "bf16", "2")
    vs = report["summary"]["monuseg/k2/v2-openvino-bf16"]["vs_fp32"]
    assert set(vs) == {"B", "C"} and vs["B"]["pixel_dice"]["n"] == 2 and "fp32" in vs["C"]["object_f1"]
    assert "vs_fp32" not in report["summary"]["monuseg/k2/v2"]
    readme = (out / "README.md").read_text()
    assert "renderer renderer-he-nuclei v2 (openvino bf16)" in readme and "B v2 (openvino bf16) − B fp32" in readme
    assert "Precision variants (openvino-bf16: openvino bf16)" in readme
    assert report["settings"]["draw_k"] == {"monuseg": 2}  # --ks keeps the full list's draw


def test_quick_stain_variation_restains_the_same_renders_and_pairs_with_the_plain_ones(tmp_path: Path) -> None:
    out, runs = tmp_path / "report", tmp_path / "runs"
    argv = ["--data-root", str(FIXTURE_DATA), "--out", str(out), "--runs-dir", str(runs), "--quick", "--versions", "3",
            "--stain-variation", "--no-distribution", "--no-real-ceiling", "--ks", "2", "--datasets", "monuseg",
            "--seeds", "0", "1"]
    assert downstream.main(argv) == 0
    report = json.loads((out / "report.json").read_text())["results"]
    assert report["split"]["monuseg"]["renderers"]["3-stain"]["stain_variation"] == "monuseg"
    plain = np.load(runs / "data" / "monuseg-seed0-v3.npz")["images"]
    stained = np.load(runs / "data" / "monuseg-seed0-v3-stain.npz")["images"]
    assert plain.shape == stained.shape and not np.array_equal(plain, stained)
    # Only the stain moved: the restaining is affine in optical density, so the two stay strongly correlated.
    assert np.corrcoef(plain.mean(-1).ravel(), stained.mean(-1).ravel())[0, 1] > 0.6
    vs = report["summary"]["monuseg/k2/v3-stain"]["vs_fp32"]
    assert set(vs) == {"B", "C"} and vs["B"]["pixel_dice"]["n"] == 2
    readme = (out / "README.md").read_text()
    assert "B v3 (stain variation) − B plain" in readme and "Stain variation (label <version>-stain)" in readme


def test_subset_flags_are_checked() -> None:
    with pytest.raises(SystemExit):
        downstream.main(["--data-root", str(FIXTURE_DATA), "--quick", "--datasets", "glas"])
    with pytest.raises(SystemExit):
        downstream.main(["--data-root", str(FIXTURE_DATA), "--quick", "--precision-variants", "int4"])


def test_precision_variant_without_a_passing_check_fails_instead_of_rendering_at_fp32(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    store = tmp_path / "model_store"
    shutil.copytree(REPO / "model_store" / "renderer-he-nuclei" / "2", store / "renderer-he-nuclei" / "2")
    (store / "renderer-he-nuclei" / "2" / "precision_checks.yaml").unlink(missing_ok=True)
    argv = ["--data-root", str(FIXTURE_DATA), "--out", str(tmp_path / "report"), "--runs-dir", str(tmp_path / "runs"),
            "--quick", "--versions", "2", "--precision-variants", "openvino-bf16", "--no-distribution",
            "--store", str(store)]
    with pytest.raises(Exception, match="precision check"):
        downstream.main(argv)
    assert not list((tmp_path / "runs" / "data").glob("*openvino-bf16*"))


def test_a_cached_run_under_another_step_budget_is_refused(tmp_path: Path) -> None:
    # The cache key has no step budget in it: reusing a 300-step result for a 1000-step run would be silent.
    run_dir = tmp_path / "monuseg-k16-seed0-A"
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"steps": 300, "scores": {}}))
    spec = downstream.RunSpec("monuseg", 16, 0, "A", "", str(run_dir), "", "", "", {"steps": 1000})
    with pytest.raises(ValueError, match="another --runs-dir"):
        downstream.run_one(spec)
    assert downstream.run_one(downstream.RunSpec("monuseg", 16, 0, "A", "", str(run_dir), "", "", "",
                                                  {"steps": 300}))["steps"] == 300


def test_the_main_protocol_is_p2_with_a_runs_cache_per_step_budget() -> None:
    assert downstream.Settings().steps == 1000
    assert downstream.default_runs_dir(1000).name == "downstream-steps1000"
    assert downstream.default_runs_dir(300).name == "downstream"  # P1's cache keeps its name
    assert downstream.default_runs_dir(1000) != downstream.default_runs_dir(downstream.QUICK.steps)


def test_real_data_gain_pairs_arm_a_across_k_by_seed() -> None:
    def run(k: int, seed: int, intersection: int, arm: str = "A") -> dict:
        counts = [{"pixels_intersection": intersection, "pixels_predicted": 100, "pixels_true": 100,
                   "objects_matched": 1, "objects_predicted": 2, "objects_true": 2,
                   "aji_intersection": 1, "aji_union": 2}]
        return {"dataset": "monuseg", "k": k, "seed": seed, "arm": arm, "version": "", "counts": counts}
    results = [run(16, 0, 70), run(16, 1, 72), run(64, 0, 75), run(64, 1, 74), run(64, 0, 10, arm="B")]
    gain = downstream.real_data_gain(results, "monuseg", 16, 64, "pixel_dice")
    assert gain is not None and gain["seeds"] == [0, 1] and gain["higher"] == 2
    assert gain["mean"] == pytest.approx((0.05 + 0.02) / 2)
    assert downstream.real_data_gain(results[:3], "monuseg", 16, 64, "pixel_dice") is None  # one paired seed


def test_done_when_leaves_out_checks_of_arms_that_were_not_trained() -> None:
    diff = {"mean": 0.04, "std": 0.01, "p_paired_t": 0.01}
    summary = {"monuseg/k16/v3": {"arms": {"A": {}, "B": {}, "C": None},
                                  "paired": {"B-A": {"pixel_dice": diff, "object_f1": diff},
                                             "C-A": {"pixel_dice": None, "object_f1": None}}}}
    assert downstream.done_when(summary, "3") == {"k16 B-A pixel_dice >= +0.03, p < 0.05": True,
                                                  "k16 B-A object_f1 >= +0.03, p < 0.05": True}


def test_done_when_adds_the_render_checks_from_the_distribution_scores() -> None:
    summary: dict = {}
    reference = {"fid": 100.0, "recall": 0.3, "stain_wasserstein": {"H": 0.005}, "nucleus_contrast": {"w1_to_held_back": 0.02}}
    rendered = {"fid": 140.0, "recall": 0.2, "stain_wasserstein": {"H": 0.01}, "nucleus_contrast": {"w1_to_held_back": 0.01}}
    checks = downstream.done_when(summary, "6", {"real_vs_real": reference, "v6": rendered})
    assert checks == {"FID <= 1.5x real-vs-real": True, "recall >= 0.3": False, "W1 H <= real-vs-real": False,
                      "W1 nucleus contrast <= real-vs-real": True}
    assert downstream.done_when(summary, "6", None) == {}


def test_nucleus_contrast_is_hematoxylin_inside_minus_outside_and_skips_crops_without_nuclei() -> None:
    instances = np.zeros((3, 32, 32), np.int32)
    instances[:2, 8:24, 8:24] = 1
    images = np.full((3, 32, 32, 3), 230, np.uint8)
    images[0][instances[0] > 0] = (80, 40, 140)  # dark purple nuclei: hematoxylin
    contrast = downstream.nucleus_contrast(images, instances)
    assert contrast.shape == (2,)  # the third crop has no nucleus
    assert contrast[0] > 0.05 and abs(contrast[1]) < 1e-9  # the second crop's nuclei look like background
    scores = downstream.contrast_scores(contrast, contrast[:1])
    assert scores["n"] == 1 and scores["w1_to_held_back"] == pytest.approx(abs(contrast[0] - contrast[1]) / 2)



def test_the_ceiling_trains_on_the_real_crops_of_the_rendered_masks(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    instances = np.zeros((4, 16, 16), np.int32)
    instances[:, 4:9, 4:9] = 1
    seed_file, test_file = tmp_path / "seed.npz", tmp_path / "test.npz"
    np.savez(seed_file, real_images=rng.integers(0, 255, (4, 16, 16, 3), np.uint8), real_instances=instances,
             mask_instances=instances, mask_class_maps=(instances > 0).astype(np.uint8),
             mask_source_images=rng.integers(0, 255, (4, 16, 16, 3), np.uint8))
    np.savez(test_file, images=rng.integers(0, 255, (1, 16, 16, 3), np.uint8), instances=instances[:1])
    seen: dict[str, np.ndarray] = {}

    def capture(spec: downstream.RunSpec, pools: dict) -> tuple[torch.nn.Module, list]:
        seen.update({name: images for name, (images, _) in pools.items()})
        return torch.nn.Conv2d(3, 3, 1), [0.0]
    monkeypatch.setattr(downstream, "train_segmenter", capture)
    spec = downstream.RunSpec("monuseg", 1, 0, "B", downstream.REAL, str(tmp_path / "run"), str(seed_file), "",
                              str(test_file), {"steps": 1, "synthetic_factor": 4})
    downstream.run_one(spec)
    with np.load(seed_file) as arrays:
        assert np.array_equal(seen["synthetic"], arrays["mask_source_images"])
        assert np.array_equal(seen["real"], arrays["real_images"][:1])


def test_fixed_line_ratio_finds_a_line_drawn_at_one_offset_in_every_crop() -> None:
    rng = np.random.default_rng(0)
    crops = rng.integers(100, 156, (16, 64, 64, 3)).astype(np.uint8)
    plain = downstream.fixed_line_ratio(crops)
    framed = crops.copy()
    framed[:, 20, :, :] = 40  # a dark row 20 px below the top of every crop
    assert plain < 1.2 < 2.0 < downstream.fixed_line_ratio(framed)
    transposed = np.ascontiguousarray(framed.transpose(0, 2, 1, 3))  # the same line as a column
    assert downstream.fixed_line_ratio(transposed) == pytest.approx(downstream.fixed_line_ratio(framed))


def test_upsampling_grid_ratio_finds_a_period_two_checkerboard_and_not_plain_texture() -> None:
    # (on the benchmark's seed-0 MoNuSeg crops: real 1.08, renderer-he-nuclei v3 11.2)
    rng = np.random.default_rng(0)
    crops = rng.integers(110, 146, (16, 64, 64, 3)).astype(np.uint8)  # white noise: a flat spectrum
    plain = downstream.upsampling_grid_ratio(crops)
    grid = crops.astype(np.int16)
    grid[:, ::2, ::2] += 4  # a 4-grey-level period-2 checkerboard on every crop
    assert plain < 1.5 < 5.0 < downstream.upsampling_grid_ratio(np.clip(grid, 0, 255).astype(np.uint8))
    with pytest.raises(ValueError, match="divisible"):
        downstream.upsampling_grid_ratio(crops[:, :60, :60])


def test_benchmark_workers_stop_when_the_benchmark_process_is_killed(tmp_path: Path) -> None:
    # A parent holding the benchmark's worker pool, its worker mid-task, is killed by SIGKILL (no cleanup runs):
    # the worker must not go on with the task (it did before worker_pool: two orphans trained for ~15 min).
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, time
from training.experiments.downstream import worker_pool
with worker_pool(1) as pool:
    worker = pool.submit(os.getpid).result()
    open({str(pid_file)!r}, "w").write(str(worker))
    pool.submit(time.sleep, 600).result()
"""], cwd=Path(__file__).resolve().parents[3])
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        worker_pid = int(pid_file.read_text())
        assert _running(worker_pid)  # sleeping in its task
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 30
        while _running(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
            raise AssertionError("the worker outlived its parent by 30 s")
    finally:
        parent.kill()


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's exit may wait for an init that reaps late)."""
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "zombie" not in state
