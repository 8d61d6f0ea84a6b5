"""Quality half of the precision gate: are the held-back downstream and FID numbers unchanged at a reduced precision?

    .venv/bin/python -m training.experiments.downstream --data-root ../shared/data --datasets monuseg --ks 16 \\
        --versions 2 --precision-variants openvino-bf16 --parallel 1 --out /tmp/ds-bf16   # trains the variant arms
    .venv/bin/python scripts/precision_quality.py --model renderer-he-nuclei --version 2 --variant openvino-bf16

scripts/check_precision.py records that a candidate's outputs are within a stated tolerance of ONNX Runtime
fp32. This script adds what that check does not cover (issue #15: "the held-back FID/downstream numbers
unchanged within their CI") to the same entry of precision_checks.yaml, from the downstream benchmark's
cached runs (training/experiments/downstream.py, --precision-variants): the SAME masks rendered with the same
seeds by the same model version through the same Render service, fp32 vs the variant, then

  downstream  arms B (k real + 4k synthetic) and C (4k synthetic) on the held-back patients: per seed the
              variant's pixel Dice / object F1 / AJI minus fp32's (same seed, masks, init and batch order);
  distribution  seed 0's renders vs the held-back crops the benchmark scores (histology encoder): FID with a
              bootstrap CI, KID, rgb2hed stain W1; and the variant's renders vs the fp32 renders directly.

Rules, fixed before measuring (QUALITY_RULES): for arms B and C and metrics pixel Dice and object F1, the
variant's mean lies inside the 95 % t-interval of the fp32 mean over seeds AND the paired t-test finds no
difference (p >= 0.05); the variant's FID lies inside the fp32 FID's 95 % bootstrap CI; the variant's KID lies
within 1.96 subset-std of fp32's. AJI and stain W1 are recorded, not gated. The entry's ``passed`` becomes
output check AND quality check; the serving runtime reads only ``passed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

import numpy as np
from scipy import stats as scipy_stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.core.model_store import ModelStore  # noqa: E402
from services.core.runtimes.selection import read_checks, record_check  # noqa: E402

QUALITY_RULES: Final[dict[str, Any]] = {
    "downstream": "arms B and C, pixel_dice and object_f1: variant mean inside the fp32 mean's 95 % t-interval "
    "over seeds, and paired t-test p >= 0.05",
    "fid": "variant FID inside the fp32 FID's 95 % bootstrap CI (both vs the same held-back crops)",
    "kid": "|KID variant - KID fp32| <= 1.96 x fp32 KID subset std",
    "gated_metrics": ["pixel_dice", "object_f1"],
    "p_min": 0.05,
}
ARMS: Final = ("B", "C")
METRICS: Final = ("pixel_dice", "object_f1", "aji")


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    array = np.asarray(values, np.float64)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))
    return float(array.mean()) - half, float(array.mean()) + half


def downstream_comparison(runs_dir: Path, dataset: str, k: int, seeds: list[int], version: str,
                          label: str) -> dict[str, Any]:
    from training.experiments.instance_metrics import scores

    out: dict[str, Any] = {}
    for arm in ARMS:
        per: dict[str, dict[int, dict[str, float]]] = {}
        for name in (version, label):
            per[name] = {}
            for seed in seeds:
                path = runs_dir / f"{dataset}-k{k}-seed{seed}-{arm}-v{name}" / "result.json"
                if not path.is_file():
                    raise SystemExit(f"{path} is missing: run training.experiments.downstream with "
                                     f"--precision-variants first (see this script's docstring)")
                per[name][seed] = scores(json.loads(path.read_text())["counts"])
        out[arm] = {}
        for metric in METRICS:
            base = [per[version][s][metric] for s in seeds]
            other = [per[label][s][metric] for s in seeds]
            diffs = [b - a for a, b in zip(base, other, strict=True)]
            p = float(scipy_stats.ttest_rel(other, base).pvalue) if any(diffs) else 1.0
            low, high = t_interval(base)
            entry = {"fp32_mean": round(float(np.mean(base)), 4), "fp32_std": round(float(np.std(base, ddof=1)), 4),
                     "fp32_ci95": [round(low, 4), round(high, 4)],
                     "variant_mean": round(float(np.mean(other)), 4),
                     "variant_std": round(float(np.std(other, ddof=1)), 4),
                     "diff_mean": round(float(np.mean(diffs)), 4), "diff_std": round(float(np.std(diffs, ddof=1)), 4),
                     "diff_per_seed": [round(d, 4) for d in diffs], "p_paired_t": round(p if np.isfinite(p) else 1.0, 4)}
            entry["inside_fp32_ci"] = bool(low <= entry["variant_mean"] <= high)
            if metric in QUALITY_RULES["gated_metrics"]:
                entry["within"] = bool(entry["inside_fp32_ci"] and entry["p_paired_t"] >= QUALITY_RULES["p_min"])
            out[arm][metric] = entry
    return out


def distribution_comparison(store: Path, data_dir: Path, dataset: str, crop: int, crops: int, seed: int,
                            version: str, label: str, bootstrap: int) -> dict[str, Any]:
    from training.experiments import downstream_data as data
    from training.experiments.coarse_to_fine import experiment_config
    from training.experiments.downstream import stain_distances
    from training.experiments.report import ScoreOptions, ScoringSession

    # The held-back crops the benchmark's distribution scores use (downstream.distribution_scores).
    test = np.load(data_dir / f"{dataset}-test.npz")["images"]
    held = data.grid_crops(list(test), crop, max(crop // 2, 1))
    fp32 = np.load(data_dir / f"{dataset}-seed{seed}-v{version}.npz")["images"]
    variant = np.load(data_dir / f"{dataset}-seed{seed}-v{label}.npz")["images"]
    n = min(crops, len(held), len(fp32))
    held_n = held[np.random.default_rng(0).permutation(len(held))[:n]]
    options = ScoreOptions(kid_subset_size=max(2, n // 2), kid_subsets=100, fid_bootstrap=bootstrap)

    def brief(s: dict[str, Any], a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        w1 = stain_distances(a, b)
        out = {"fid": round(s["fid"], 2), "kid_mean": round(s["kid_mean"], 4), "kid_std": round(s["kid_std"], 4),
               "precision": round(s["precision"], 3), "recall": round(s["recall"], 3),
               "stain_w1_h": round(w1["H"], 4), "stain_w1_e": round(w1["E"], 4)}
        if "fid_ci" in s:
            out["fid_ci95"] = [round(s["fid_ci"]["low"], 2), round(s["fid_ci"]["high"], 2)]
        return out

    with ScoringSession(store, experiment_config(store)) as scorer:
        base = scorer.score(held_n, fp32[:n], options)
        cand = scorer.score(held_n, variant[:n], options)
        direct = scorer.score(fp32[:n], variant[:n], options)
    result = {"n": int(n), "seed": seed, "dataset": dataset, "extractor": f"{base['extractor']['name']} "
              f"v{base['extractor']['version']} (sha256 {base['extractor']['sha256'][:12]})",
              "fp32_vs_held_back": brief(base, held_n, fp32[:n]), "variant_vs_held_back": brief(cand, held_n, variant[:n]),
              "variant_vs_fp32_renders": brief(direct, fp32[:n], variant[:n])}
    low, high = result["fp32_vs_held_back"].get("fid_ci95", [base["fid"], base["fid"]])
    result["fid_within"] = bool(low <= cand["fid"] <= high)
    result["kid_within"] = bool(abs(cand["kid_mean"] - base["kid_mean"]) <= 1.96 * base["kid_std"])
    return result


def main(argv: list[str] | None = None) -> int:
    from training.experiments.downstream import PRECISION_VARIANTS, Settings, default_runs_dir, renderer_label

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="renderer-he-nuclei")
    parser.add_argument("--version", required=True)
    parser.add_argument("--variant", default="openvino-bf16", choices=sorted(PRECISION_VARIANTS))
    parser.add_argument("--dataset", default="monuseg")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--crops", type=int, default=256, help="n for FID/KID (the benchmark's)")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--fid-bootstrap", type=int, default=200)
    parser.add_argument("--runs-dir", type=Path, default=default_runs_dir(Settings().steps))
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--dry-run", action="store_true", help="print the quality block, do not record it")
    args = parser.parse_args(argv)

    manifest = ModelStore(args.model_store).get(args.model, args.version)
    engine, precision = PRECISION_VARIANTS[args.variant]
    label = renderer_label(manifest.version, args.variant)
    [entry] = [c for c in read_checks(manifest) if c.get("runtime") == engine and c.get("precision") == precision] \
        or [None]
    if entry is None:
        raise SystemExit(f"{manifest.key}: no output check for {engine}/{precision} in precision_checks.yaml; run "
                         f"scripts/check_precision.py --model {args.model} --version {args.version} first")
    downstream = downstream_comparison(args.runs_dir, args.dataset, args.k, args.seeds, manifest.version, label)
    distribution = distribution_comparison(args.model_store, args.runs_dir / "data", args.dataset, args.crop,
                                           args.crops, args.seeds[0], manifest.version, label, args.fid_bootstrap)
    downstream_ok = all(m["within"] for arm in downstream.values() for m in arm.values() if "within" in m)
    quality_ok = downstream_ok and distribution["fid_within"] and distribution["kid_within"]
    failures = [f"downstream {arm} {metric}: variant {e['variant_mean']} vs fp32 {e['fp32_mean']} (95 % CI "
                f"{e['fp32_ci95']}), paired diff {e['diff_mean']:+} +- {e['diff_std']} (p = {e['p_paired_t']})"
                for arm, ms in downstream.items() for metric, e in ms.items() if e.get("within") is False]
    if not distribution["fid_within"]:
        failures.append(f"FID {distribution['variant_vs_held_back']['fid']} outside fp32's "
                        f"{distribution['fp32_vs_held_back'].get('fid_ci95')}")
    if not distribution["kid_within"]:
        failures.append("KID moved by more than 1.96 fp32 subset-std")
    quality = {
        "passed": bool(quality_ok),
        "failed_rules": failures,
        "rules": QUALITY_RULES,
        "protocol": f"training.experiments.downstream --precision-variants {args.variant}: {args.dataset} held-back "
        f"patients, k = {args.k}, m = {4 * args.k}, seeds {args.seeds}; the same masks and render seeds through the "
        f"gRPC Render service at fp32 (onnxruntime) and at {precision} ({engine}); runs {args.runs_dir}",
        "downstream": downstream,
        "distribution": distribution,
    }
    return record_quality(manifest, entry, quality, args.dry_run, not_checked=(
        f"downstream arms other than {args.dataset} k = {args.k} (CoNSeP, k = 64); other models and versions need "
        "their own entries"))


def record_quality(manifest: Any, entry: dict[str, Any], quality: dict[str, Any], dry_run: bool,
                   not_checked: str | None = None) -> int:
    """The output-check entry with ``quality`` added and ``passed`` = output AND quality; printed, and recorded
    unless ``dry_run``. Exit status 0 when the entry passes."""
    output_ok = bool(entry.get("output_passed", entry.get("passed")))
    quality_ok = bool(quality["passed"])
    updated = {**entry, "passed": output_ok and quality_ok, "output_passed": output_ok, "quality": quality}
    updated.pop("not_checked", None)
    if not_checked:
        updated["not_checked"] = not_checked
    print(json.dumps(quality, indent=1))
    if not dry_run:
        path = record_check(manifest, updated)
        print(f"{'PASSED' if updated['passed'] else 'FAILED'} (output {output_ok}, quality {quality_ok}): "
              f"recorded in {path.relative_to(ROOT)}")
    return 0 if updated["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
