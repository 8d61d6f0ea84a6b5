"""Quality half of the precision gate from the held-back evaluation (training.evaluate): unchanged at a reduced precision?

    .venv/bin/python scripts/eval_precision_quality.py --model mask-refiner --version 2 --variant openvino-bf16
    .venv/bin/python scripts/eval_precision_quality.py --model renderer-he-glands --version 2 --variant openvino-bf16

scripts/check_precision.py records that a model's outputs are within a stated tolerance of ONNX Runtime fp32.
Issue #15 also asks that the held-back numbers stay unchanged within their CI. scripts/precision_quality.py does
that for the nuclei renderer from the downstream benchmark; this script does it from training.evaluate's protocol
for the models the benchmark does not cover. Crops of the model's own held-back tiles go through the serving path
(RefinementPipeline / RenderingPipeline over a ModelHost) twice, ONNX Runtime fp32 and the variant, same inputs
and seeds:

  refiner   real fine mask = tissue_mask(crop), coarse = coarsen_mask(fine) with its training recipe;
            dice: per crop, Dice of the refined mask vs the real fine mask;
            shape: PriorPath-style shape statistics of refined vs real fine masks (services.scoring.mask_stats:
            mean KS and mean Jensen-Shannon divergence over per-object tissue features).
  renderer  the crops' class maps rendered; FID / KID / precision / recall of the renders vs the real crops with
            the histology encoder (ScoringSession), fp32 with a bootstrap CI; the variant vs the fp32 renders too.

Rules, fixed before measuring (QUALITY_RULES): refiner: the per-crop Dice of the variant is equivalent to fp32's
within +-0.005 (two one-sided paired t-tests, both p < 0.05; a "no difference detected" test would fail a variant
that flips a handful of pixels the same way on every crop), and the variant's mean KS and mean JS lie inside fp32's
95 % bootstrap CI over crops. Renderer: the variant's FID lies inside fp32's 95 % bootstrap CI and its KID within
1.96 fp32 subset-std (the rules of scripts/precision_quality.py's distribution half). The entry's ``passed``
becomes output check AND quality check; the serving runtime reads only ``passed``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import numpy as np
from scipy import stats as scipy_stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.core.model_store import ModelStore  # noqa: E402
from services.scoring import mask_stats  # noqa: E402
from precision_quality import record_quality  # noqa: E402  (scripts/ is on sys.path as this script's directory)
from services.core.runtimes.selection import RuntimeSelection, read_checks  # noqa: E402
from services.model_host import HostSettings, ModelHost  # noqa: E402
from training.evaluate import (  # noqa: E402
    EvalSettings,
    held_back,
    refine_all,
    refiner_masks,
    render_all,
    sample_crops,
    tissue_mask_features,
)

VARIANTS: Final = {"openvino-bf16": ("openvino", "bf16")}
DICE_MARGIN: Final = 0.005
QUALITY_RULES: Final[dict[str, dict[str, Any]]] = {
    "refiner": {
        "dice": f"per-crop Dice vs the real fine mask: variant - fp32 equivalent within +-{DICE_MARGIN} "
        "(two one-sided paired t-tests, both p < 0.05)",
        "shape": "mean KS and mean JS of refined vs real fine masks: variant inside fp32's 95 % bootstrap CI over "
        "crops",
        "p_max": 0.05,
    },
    "renderer": {
        "fid": "variant FID inside the fp32 FID's 95 % bootstrap CI (both vs the same held-back real crops)",
        "kid": "|KID variant - KID fp32| <= 1.96 x fp32 KID subset std",
    },
}


def dice_per_crop(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of tissue (1) per crop; a crop where both masks are empty counts as 1."""
    p, t = predicted.reshape(len(predicted), -1) > 0, truth.reshape(len(truth), -1) > 0
    both = (p & t).sum(1).astype(np.float64)
    total = (p.sum(1) + t.sum(1)).astype(np.float64)
    return np.where(total > 0, 2 * both / np.maximum(total, 1), 1.0)


def equivalence(differences: np.ndarray, margin: float) -> dict[str, Any]:
    """TOST on paired differences: is the mean difference inside (-margin, +margin)?"""
    n = len(differences)
    mean, sem = float(differences.mean()), float(differences.std(ddof=1) / np.sqrt(n))
    if sem == 0.0:  # identical on every crop, or the same shift everywhere: decide on the mean itself
        p_low = p_high = 0.0 if abs(mean) < margin else 1.0
    else:
        p_low = float(scipy_stats.t.sf((mean + margin) / sem, n - 1))  # H0: mean <= -margin
        p_high = float(scipy_stats.t.cdf((mean - margin) / sem, n - 1))  # H0: mean >= +margin
    return {"mean": mean, "std": float(differences.std(ddof=1)), "n": n, "margin": margin,
            "p_lower": p_low, "p_upper": p_high, "changed_crops": int(np.count_nonzero(differences))}


def shape_scores(real: Sequence[mask_stats.MaskSetFeatures], other: Sequence[mask_stats.MaskSetFeatures]
                 ) -> dict[str, float | None]:
    """Mean KS / mean JS of pooled per-crop features: training.evaluate.tissue_shape_scores on those crops."""
    comparison = mask_stats.compare_mask_sets(mask_stats.pool_mask_set_features(real),
                                              mask_stats.pool_mask_set_features(other))
    return {"mean_ks": comparison.mean_ks, "mean_js": comparison.mean_js}


def bootstrap_shape_ci(real: Sequence[mask_stats.MaskSetFeatures], refined: Sequence[mask_stats.MaskSetFeatures],
                       resamples: int, seed: int) -> dict[str, list[float]]:
    """95 % percentile CI of mean KS / mean JS over crop resamples (real and refined crops resampled together),
    pooling each crop's features measured once (tissue_mask_features)."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"mean_ks": [], "mean_js": []}
    for _ in range(resamples):
        pick = rng.integers(len(real), size=len(real))
        scores = shape_scores([real[i] for i in pick], [refined[i] for i in pick])
        for key, values in draws.items():
            values.append(np.nan if scores[key] is None else scores[key])
    return {key: [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]
            for key, values in draws.items()}


def host_settings(name: str, engine: str, precision: str) -> HostSettings:
    """The model under test at ``engine``/``precision``; every other hosted model (the encoder) at the default."""
    return HostSettings(max_queue_size=4096, selection=RuntimeSelection.from_settings(f"{name}={engine}",
                                                                                      f"{name}={precision}"))


async def served(store: ModelStore, manifest: Any, engine: str, precision: str,
                 work: Callable[[ModelHost], Awaitable[np.ndarray]]) -> tuple[np.ndarray, float]:
    """``work`` on a host serving only the model under test at ``engine``/``precision``; (its result, seconds)."""
    host = ModelHost(store, {manifest.kind}, host_settings(manifest.name, engine, precision), names={manifest.name})
    async with host:
        started = time.perf_counter()
        result = await work(host)
        return result, time.perf_counter() - started


def refiner_quality(store: ModelStore, manifest: Any, engine: str, precision: str, args: argparse.Namespace
                    ) -> dict[str, Any]:
    masks = refiner_masks(manifest, args.data_root, EvalSettings(max_images=args.crops, seed=0))

    def refine(host: ModelHost) -> Awaitable[np.ndarray]:
        return refine_all(host, manifest.name, masks.coarse, manifest.version)

    fp32, fp32_seconds = asyncio.run(served(store, manifest, "onnxruntime", "fp32", refine))
    variant, variant_seconds = asyncio.run(served(store, manifest, engine, precision, refine))
    dice_fp32, dice_variant = dice_per_crop(fp32, masks.fine), dice_per_crop(variant, masks.fine)
    dice = equivalence(dice_variant - dice_fp32, DICE_MARGIN)
    rules = QUALITY_RULES["refiner"]
    dice_ok = dice["p_lower"] < rules["p_max"] and dice["p_upper"] < rules["p_max"]
    real_parts, fp32_parts = tissue_mask_features(masks.fine), tissue_mask_features(fp32)
    shape_fp32, shape_variant = shape_scores(real_parts, fp32_parts), shape_scores(real_parts,
                                                                                   tissue_mask_features(variant))
    ci = bootstrap_shape_ci(real_parts, fp32_parts, args.bootstrap, seed=1)
    shape_ok = {key: bool(ci[key][0] <= shape_variant[key] <= ci[key][1]) for key in ("mean_ks", "mean_js")}
    failures = ([] if dice_ok else [f"Dice difference {dice['mean']:+.5f} not shown inside +-{DICE_MARGIN}"]) + [
        f"{key} {shape_variant[key]:.4f} outside fp32's CI {ci[key]}" for key, ok in shape_ok.items() if not ok]
    return {
        "passed": bool(dice_ok and all(shape_ok.values())),
        "failed_rules": failures,
        "rules": rules,
        "protocol": f"training.evaluate's refiner protocol: {len(masks.fine)} crops of {masks.fine.shape[1]} px from "
        f"the held-back groups {masks.held.groups} (seed 0), fine = tissue_mask(crop, {masks.stain!r}), coarse = "
        f"coarsen_mask(fine, open {masks.open_size}, close {masks.close_size}); RefinementPipeline over a ModelHost "
        f"at fp32 (onnxruntime) and at {precision} ({engine}); scripts/eval_precision_quality.py",
        "dice": {"fp32_mean": float(dice_fp32.mean()), "variant_mean": float(dice_variant.mean()),
                 "variant_minus_fp32": dice},
        "shape": {"fp32": shape_fp32, "fp32_ci95": ci, "variant": shape_variant, "bootstrap": args.bootstrap},
        "pixels_differing": int(np.count_nonzero(fp32 != variant)), "pixels": int(fp32.size),
        "seconds": {"fp32": round(fp32_seconds, 2), "variant": round(variant_seconds, 2)},
    }


def renderer_quality(store: ModelStore, manifest: Any, engine: str, precision: str, args: argparse.Namespace
                     ) -> dict[str, Any]:
    from training.experiments.coarse_to_fine import experiment_config
    from training.experiments.report import ScoreOptions, ScoringSession

    held = held_back(manifest, args.data_root)
    crops = sample_crops(held, args.crops, 0, lambda source, sample: source.class_map(sample))

    def render(host: ModelHost) -> Awaitable[np.ndarray]:
        return render_all(host, manifest.name, crops, seed=0, version=manifest.version)

    fp32, fp32_seconds = asyncio.run(served(store, manifest, "onnxruntime", "fp32", render))
    variant, variant_seconds = asyncio.run(served(store, manifest, engine, precision, render))
    n = len(crops.images)
    options = ScoreOptions(kid_subset_size=max(2, n // 2), kid_subsets=100, fid_bootstrap=args.bootstrap)

    def brief(scores: dict[str, Any]) -> dict[str, Any]:
        out = {key: round(float(scores[key]), 4) for key in ("fid", "kid_mean", "kid_std", "precision", "recall")}
        if "fid_ci" in scores:
            out["fid_ci95"] = [round(scores["fid_ci"]["low"], 3), round(scores["fid_ci"]["high"], 3)]
        return out

    with ScoringSession(store.root, experiment_config(store.root)) as scorer:
        base = scorer.score(crops.images, fp32, options)
        no_bootstrap = dataclasses.replace(options, fid_bootstrap=0)  # only the fp32 FID needs its CI
        candidate = scorer.score(crops.images, variant, no_bootstrap)
        direct = scorer.score(fp32, variant, no_bootstrap)
    low, high = base["fid_ci"]["low"], base["fid_ci"]["high"]
    fid_ok = bool(low <= candidate["fid"] <= high)
    kid_ok = bool(abs(candidate["kid_mean"] - base["kid_mean"]) <= 1.96 * base["kid_std"])
    failures = ([] if fid_ok else [f"FID {candidate['fid']:.2f} outside fp32's CI [{low:.2f}, {high:.2f}]"]) + (
        [] if kid_ok else ["KID moved by more than 1.96 fp32 subset-std"])
    difference = np.abs(fp32.astype(np.int16) - variant.astype(np.int16))
    return {
        "passed": fid_ok and kid_ok,
        "failed_rules": failures,
        "rules": QUALITY_RULES["renderer"],
        "protocol": f"training.evaluate's renderer protocol: {n} crops of {crops.images.shape[1]} px from the "
        f"held-back groups {held.groups} (seed 0); RenderingPipeline over a ModelHost at fp32 (onnxruntime) and at "
        f"{precision} ({engine}), same class maps and seeds; encoder {base['extractor']['name']} "
        f"v{base['extractor']['version']}; scripts/eval_precision_quality.py",
        "fp32_vs_held_back": brief(base), "variant_vs_held_back": brief(candidate),
        "variant_vs_fp32_renders": brief(direct),
        "image_abs_levels": {"mean": round(float(difference.mean()), 3), "max": int(difference.max())},
        "seconds": {"fp32": round(fp32_seconds, 2), "variant": round(variant_seconds, 2)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mask-refiner")
    parser.add_argument("--version", required=True)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="openvino-bf16")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--crops", type=int, default=512, help="held-back crops (training.evaluate's default is 200)")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--dry-run", action="store_true", help="print, do not record")
    args = parser.parse_args(argv)

    store = ModelStore(args.model_store)
    manifest = store.get(args.model, args.version)
    if manifest.kind not in ("refiner", "renderer"):
        raise SystemExit(f"{manifest.key} is a {manifest.kind}; this check is for refiners and renderers")
    engine, precision = VARIANTS[args.variant]
    entries = [c for c in read_checks(manifest) if c.get("runtime") == engine and c.get("precision") == precision]
    if not entries:
        raise SystemExit(f"{manifest.key}: no output check for {engine}/{precision} in precision_checks.yaml; run "
                         f"scripts/check_precision.py --model {args.model} --version {args.version} first")
    entry = entries[0]
    measure = refiner_quality if manifest.kind == "refiner" else renderer_quality
    return record_quality(manifest, entry, measure(store, manifest, engine, precision, args), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
