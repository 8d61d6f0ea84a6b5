"""Export + evaluate a diffusion run into model_store/<name>/<version>/ (issue #9; notes/DIFFUSION_CONTRACT.md).

`python -m training.export.diffusion_export --run runs/renderer-diffusion-nuclei [--name renderer-diffusion-nuclei]
 [--compare runs/renderer-diffusion-nuclei-concat] [--renderer-run runs/renderer-diffusion-nuclei]
 [--data-root ../shared/data] [--split test] [--count 192] [--steps 20] [--guidance 2.0] [--version 1] [--overwrite]
 [--no-eval]`

1. Rebuilds the denoiser from the checkpoint's config and loads the EMA weights.
2. Evaluates on the held-back split (every non-overlapping 128 px tile of the split's CoNSeP patches, downsampled
   2x like training), sampling in torch with diffusers' DDIMScheduler (eta 0) + classifier-free guidance:
   - renderer: condition = the real crops' class maps + instance edges; FID/KID/precision/recall of generated vs
     the real crops through the scoring service (ScoringSession, shipped histology-encoder). `--compare` scores
     another renderer run (the concatenation baseline) on the same crops/seed.
   - mask generator: condition = each real crop's multi-hot type vector; generated masks are decoded
     (diffusion_data.decode_mask) and compared with the real class maps by the per-object shape statistics
     (services/scoring/mask_stats: KS / Jensen-Shannon per class); requested-type hit rates; with `--renderer-run` the decoded masks are also
     rendered (mask AND image from nothing) and scored by FID/KID.
3. Exports the EMA denoiser to ONNX (sample/timestep/condition -> model_output, dynamic batch/height/width) with a
   torch-vs-ONNX-Runtime parity check (2 sizes x batch 1 and 3, per-row random timesteps), writes manifest.yaml
   with the contract metadata, MODEL_CARD.md with the scores and the sample grid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from services.scoring import mask_stats
from training.data import diffusion_data as dd
from training.export.onnx_export import (ModelCard, export_to_model_store, hardware_string, png_bytes,
                                         render_model_card)
from training.models.diffusion_denoiser import build_denoiser, parameter_count
from training.provenance import training_commit_fields
from training.trainers.base import make_grid
from training.trainers.diffusion_trainer import build_splits, colorize_mask, sample_ddim, to_rgb, to_uint8

INPUT_NAMES = ("sample", "timestep", "condition")
OUTPUT_NAMES = ("model_output",)
SIZE_MULTIPLE = 8
DECODE_RULE = (
    "cls = argmax over channels 0..4 (first max wins); foreground = cls > 0; seeds = foreground & "
    "(channel 5 < threshold); seed labels = 4-connected components numbered 1..M in raster order of first pixel "
    "(scipy.ndimage.label, cross structure); grow: repeat until no change, every unlabelled foreground pixel with a "
    "labelled 4-neighbour takes the largest label among its 4-neighbours (simultaneous update from the previous "
    "sweep); foreground never reached stays unlabelled; drop labels with < min_instance_pixels pixels and renumber "
    "the rest 1..N by increasing old label; class map = per instance the majority cls over its pixels (ties -> "
    "smallest class id), background (0) outside instances.")


# ------------------------------------------------------------------------------------------- loading
def load_run(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(EMA denoiser in eval mode, checkpoint payload without tensors)."""
    payload = torch.load(Path(run_dir) / "latest.pt", map_location="cpu", weights_only=False)
    model = build_denoiser(payload["config"]["model"])
    model.load_state_dict(payload["ema"])
    info = {k: payload[k] for k in ("step", "train_seconds", "config", "splits")}
    info["code_commits"] = payload.get("code_commits", [])
    return model.eval(), info


def final_loss(run_dir: Path, last: int = 10) -> float | None:
    path = Path(run_dir) / "losses.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r][-last:]
    return float(np.mean(losses)) if losses else None


def held_back_crops(config: Mapping[str, Any], data_root: Path, split: str, count: int | None, every: int = 1):
    """Deterministic held-back crops (image uint8, class map, instances) at the model scale: every `every`-th
    grid crop of the split (so a subset still spans all held-back tiles), then the first `count`."""
    records = build_splits(config, data_root)[split]
    data = config["data"]
    crops = dd.grid_crops(records, int(data["source_crop"]), int(data["factor"]))[::every]
    return crops if count is None else crops[:count]


# ------------------------------------------------------------------------------------------- sampling
def sample_batched(model: torch.nn.Module, conditions: np.ndarray, shape: Sequence[int], diffusion: Mapping[str, Any],
                   target: str, steps: int, guidance: float, seed: int, batch: int = 32) -> np.ndarray:
    """x0 samples for every condition row; chunk i uses seed + i so results do not depend on other chunks."""
    out = []
    for i, start in enumerate(range(0, len(conditions), batch)):
        cond = torch.from_numpy(np.ascontiguousarray(conditions[start:start + batch]))
        out.append(sample_ddim(model, cond, tuple(shape), diffusion, target, steps=steps, guidance_scale=guidance,
                               seed=seed + i).numpy())
    return np.concatenate(out)


def images_uint8(samples: np.ndarray) -> np.ndarray:
    return np.stack([to_uint8(s) for s in samples])


def score_images(real: np.ndarray, synthetic: np.ndarray) -> dict[str, Any]:
    """FID/KID/precision/recall through the real scoring service on loopback."""
    from training.experiments.report import ScoringSession

    with ScoringSession() as scorer:
        return scorer.score(real, synthetic)


def headline(scores: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(scores[k]) for k in ("fid", "kid_mean", "kid_std", "precision", "recall")}


# ------------------------------------------------------------------------------------------- evaluations
def evaluate_renderer(models: Mapping[str, tuple[torch.nn.Module, dict]], crops, steps: int, guidance: float,
                      seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scores per model name on the same crops and seed; returns (scores, generated uint8 images per model)."""
    real = np.stack([c[0] for c in crops])
    conditions = np.stack([dd.renderer_condition(c[1], c[2]) for c in crops])
    results, generated = {}, {}
    for name, (model, info) in models.items():
        start = time.perf_counter()
        samples = sample_batched(model, conditions, (3, *real.shape[1:3]), info["config"]["diffusion"], "image",
                                 steps, guidance, seed)
        seconds = time.perf_counter() - start
        generated[name] = images_uint8(samples)
        scores = score_images(real, generated[name])
        results[name] = {**headline(scores), "extractor": scores["extractor"]["name"],
                         "real_count": scores["real_count"], "synthetic_count": scores["synthetic_count"],
                         "step": info["step"], "train_seconds": round(info["train_seconds"], 1),
                         "parameters": parameter_count(model), "sampling_seconds": round(seconds, 1)}
    return results, generated


def type_hit_rates(requested: np.ndarray, generated_maps: Sequence[np.ndarray]) -> dict[str, Any]:
    """Per type: share of requests (type in the condition) whose decoded mask holds that type (>= the presence
    threshold), and share of non-requests where it appears anyway."""
    present = np.stack([dd.types_present(m) for m in generated_maps])
    out: dict[str, Any] = {}
    for k, name in enumerate(dd.TYPE_NAMES):
        asked, not_asked = requested[:, k] > 0.5, requested[:, k] < 0.5
        out[name] = {"requested": int(asked.sum()),
                     "hit_rate": float(present[asked, k].mean()) if asked.any() else None,
                     "unrequested_rate": float(present[not_asked, k].mean()) if not_asked.any() else None}
    exact = (present == (requested > 0.5)).all(axis=1)
    out["all_types_exact"] = float(exact.mean())
    return out


def mask_statistics(real_maps: Sequence[np.ndarray], synth_maps: Sequence[np.ndarray]) -> dict[str, Any]:
    class_ids = list(range(1, dd.NUM_CLASSES))
    # Every type class (background 0 left out); objects touching the crop border are left out of the object
    # features (mask_stats' default: a cut nucleus is not a nucleus shape) and counted.
    return mask_stats.score_mask_sets(real_maps, synth_maps, class_ids).as_dict()


def _mean_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def instance_counts(instance_maps: Sequence[np.ndarray], min_pixels: int = dd.DECODE_MIN_INSTANCE_PIXELS) -> dict[str, float]:
    """Instances per crop with >= min_pixels pixels (the decode's size filter, applied to real maps too)."""
    counts = np.array([int(np.sum(np.bincount(m.ravel())[1:] >= min_pixels)) for m in instance_maps], np.float64)
    return {"mean": float(counts.mean()), "std": float(counts.std())}


# ------------------------------------------------------------------------------------------- metadata
def diffusion_metadata(config: Mapping[str, Any], steps: int, guidance: float) -> dict[str, Any]:
    d = config["diffusion"]
    return {"prediction_type": d["prediction_type"], "num_train_timesteps": int(d["num_train_timesteps"]),
            "beta_schedule": d["beta_schedule"], "beta_start": float(d["beta_start"]), "beta_end": float(d["beta_end"]),
            "clip_sample": bool(d.get("clip_sample", True)), "default_steps": int(steps),
            "default_scheduler": "ddim", "default_guidance_scale": float(guidance)}


def contract_metadata(config: Mapping[str, Any], steps: int, guidance: float) -> dict[str, Any]:
    data = config["data"]
    size = int(data["source_crop"]) // int(data["factor"])
    factor = int(data["factor"])
    common = {"diffusion": diffusion_metadata(config, steps, guidance), "sample_size": [size, size],
              "size_multiple": SIZE_MULTIPLE, "output_range": [-1.0, 1.0], "stain": "he",
              "pixel_size_um": dd.CONSEP_PIXEL_SIZE_UM * factor,
              "magnification": f"{40 // factor}x (CoNSeP 40x downsampled {factor}x)",
              "downsample": {"factor": factor, "image": "box average", "labels": "top-left pixel of each block"}}
    if data["target"] == "image":
        return {"role": "image_renderer", **common, "sample_channels": 3,
                "condition": {"kind": "class_map", "channels": list(dd.RENDERER_CONDITION_CHANNELS),
                              "num_classes": dd.NUM_CLASSES, "class_names": list(dd.CLASS_NAMES), "null": "zeros",
                              "encoding": "services.core.mask_ops.build_generator_input(class_map, 5, None, "
                                          "mask_ops.instance_edges(instances)) at the model scale"}}
    return {"role": "mask_generator", **common, "sample_channels": dd.NUM_CLASSES + 1,
            "sample_channel_names": list(dd.MASK_SAMPLE_CHANNELS),
            "condition": {"kind": "multi_hot", "names": list(dd.MASK_CONDITION_NAMES), "null": "null_flag",
                          "class_names": list(dd.CLASS_NAMES),
                          "type_present_min_pixels": dd.TYPE_PRESENT_MIN_PIXELS},
            "decode": {"class_channels": dd.NUM_CLASSES, "boundary_channel": dd.NUM_CLASSES,
                       "threshold": dd.DECODE_THRESHOLD, "min_instance_pixels": dd.DECODE_MIN_INSTANCE_PIXELS,
                       "connectivity": 4, "rule": DECODE_RULE,
                       "implementation": "training.data.diffusion_data.decode_mask",
                       "reference": "tests/fixtures/diffusion_decode_reference.npz"}}


def parity_inputs_for(config: Mapping[str, Any]):
    """(batch, h, w, generator) -> (sample, per-row random timesteps, condition) for the parity check."""
    model = config["model"]
    target = config["data"]["target"]
    channels = int(model["sample_channels"])
    timesteps = int(config["diffusion"]["num_train_timesteps"])

    def make(batch: int, height: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        sample = torch.randn((batch, channels, height, width), generator=generator)
        timestep = torch.randint(0, timesteps, (batch,), generator=generator).float()
        if target == "image":
            condition = (torch.rand((batch, int(model["condition_channels"]), height, width), generator=generator) > 0.5).float()
        else:
            condition = (torch.rand((batch, int(model["condition_dim"])), generator=generator) > 0.5).float()
        return sample, timestep, condition

    return make


def dynamic_axes(target: str) -> dict[str, dict[int, str]]:
    spatial = {0: "batch", 2: "height", 3: "width"}
    return {"sample": spatial, "timestep": {0: "batch"}, "model_output": spatial,
            "condition": spatial if target == "image" else {0: "batch"}}


def export_denoiser(model: torch.nn.Module, info: Mapping[str, Any], name: str, version: str, store: Path,
                    metrics: Mapping[str, Any], steps: int, guidance: float, overwrite: bool,
                    parity_sizes: Sequence[tuple[int, int]] = ((64, 64), (96, 128))) -> Path:
    config = info["config"]
    data = config["data"]
    example = parity_inputs_for(config)(2, 64, 64, torch.Generator().manual_seed(0))
    provenance = {**training_commit_fields(info), "config": config, "seed": int(config.get("seed", 0)),
                  "data": [data.get("dataset", "consep")], "steps": int(info["step"]),
                  "train_seconds": round(float(info["train_seconds"]), 1), "hardware": hardware_string(),
                  "split": {"fractions": list(data["split_fractions"]), "seed": int(data["split_seed"]),
                            "grouped_by": "CoNSeP source tile", "groups": info["splits"]}}
    return export_to_model_store(
        model, example, name=name, version=version, kind="denoiser", input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES, dynamic_axes=dynamic_axes(data["target"]),
        metadata=contract_metadata(config, steps, guidance), provenance=provenance, metrics=metrics,
        store_root=store, parity_sizes=parity_sizes, atol=1e-3, max_batch_size=64, card=None,
        overwrite=overwrite, parity_inputs=parity_inputs_for(config))


def batch_invariance(version_dir: Path, config: Mapping[str, Any], batch: int = 4) -> float:
    """max |ORT(row alone) - ORT(row inside a batch of mixed timesteps)| over the rows (serving relies on it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    sample, timestep, condition = (x.numpy() for x in parity_inputs_for(config)(batch, 64, 64,
                                                                             torch.Generator().manual_seed(3)))
    together = session.run(None, {"sample": sample, "timestep": timestep, "condition": condition})[0]
    alone = [session.run(None, {"sample": sample[i:i + 1], "timestep": timestep[i:i + 1],
                                "condition": condition[i:i + 1]})[0][0] for i in range(batch)]
    return float(np.max(np.abs(together - np.stack(alone))))


# ------------------------------------------------------------------------------------------- card
def scores_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| model | step | train s | params | FID | KID (mean ± std) | precision | recall |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r.get('step', '-')} | {r.get('train_seconds', '-')} | {r.get('parameters', '-')} | "
                     f"{r['fid']:.2f} | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} |")
    return "\n".join(lines)


def write_card(version_dir: Path, card: ModelCard, sections: Mapping[str, str]) -> None:
    """The generic card from onnx_export (data, training, interface, parity) with its placeholder Scores section
    replaced by the measured ones."""
    import yaml

    from training.export.onnx_export import ParityResult

    manifest = yaml.safe_load((version_dir / "manifest.yaml").read_text())
    m = manifest["metrics"]
    parity = [ParityResult(h, w, b, float("nan"), float("nan")) for b, h, w in m["onnx_parity_sizes"]]
    text = render_model_card(manifest, card, parity, has_samples=False)
    text = text.split("## Export parity")[0] + (
        "## Export parity (ONNX Runtime CPU vs torch)\n\n"
        f"Sizes/batches {m['onnx_parity_sizes']} (batch 3 rows at different random timesteps): max abs "
        f"{m['onnx_parity_max_abs']:.3g}, mean abs {m['onnx_parity_mean_abs']:.3g} (atol {m['onnx_parity_atol']}). "
        f"Batch invariance (ORT, row alone vs in a batch of 4): max abs {m.get('ort_batch_invariance_max_abs', 'n/a')}.\n\n"
        + text.split("## Export parity", 1)[1].split("\n\n", 2)[2])
    text = text.split("## Scores")[0]
    for title, body in sections.items():
        text += f"## {title}\n\n{body}\n\n"
    (version_dir / "MODEL_CARD.md").write_text(text)


# ------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--name", default=None, help="model name (default: the run's config name)")
    parser.add_argument("--compare", type=Path, action="append", default=[], help="other renderer runs to score")
    parser.add_argument("--renderer-run", type=Path, default=None, help="mask generator: render its masks with this")
    parser.add_argument("--guidance-sweep-json", type=Path, default=None,
                        help="renderer: {split, crops, steps, seed, step, rows: [{guidance_scale, fid, kid_mean, ...}]} "
                             "from --eval-only runs at several --guidance values, for the card")
    parser.add_argument("--comparison-json", type=Path, default=None,
                        help="renderer: an earlier --eval-only --compare result (equal-budget variants) for the card")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--count", type=int, default=None, help="held-back crops (default all)")
    parser.add_argument("--every", type=int, default=1, help="take every n-th held-back grid crop")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--version", default="1")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-eval", action="store_true", help="export only (fast; scores left out)")
    parser.add_argument("--eval-only", action="store_true", help="print/save scores, do not export")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, info = load_run(args.run)
    config = info["config"]
    target = config["data"]["target"]
    name = args.name or config["name"]
    metrics: dict[str, Any] = {"eval": {"split": args.split, "scheduler": "ddim (diffusers DDIMScheduler, eta 0)",
                                        "steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed}}
    loss = final_loss(args.run)
    if loss is not None:
        metrics["final_train_loss"] = loss
    sections: dict[str, str] = {}
    grid = None
    if not args.no_eval:
        crops = held_back_crops(config, args.data_root, args.split, args.count, args.every)
        metrics["eval"].update({"crops": len(crops), "every": args.every})
        if target == "image":
            runs = {name: (model, info)}
            for other in args.compare:
                other_model, other_info = load_run(other)
                runs[other_info["config"]["name"]] = (other_model, other_info)
            scores, generated = evaluate_renderer(runs, crops, args.steps, args.guidance, args.seed)
            metrics["scores"] = scores[name]
            if len(runs) > 1:
                metrics["comparison"] = scores
            # Reference: the other held-back split's REAL crops scored against this split's real crops - with
            # three source tiles per split the between-tile shift alone is large, so read FID relative to this.
            other_split = "val" if args.split == "test" else "test"
            other = held_back_crops(config, args.data_root, other_split, args.count, args.every)
            floor = headline(score_images(np.stack([c[0] for c in crops]), np.stack([c[0] for c in other])))
            metrics["real_vs_real_reference"] = {**floor, "split": other_split, "crops": len(other)}
            scores = {**scores, f"real {other_split} crops (reference, no model)": floor}
            rows = [[to_rgb((c[1], dd.renderer_condition(c[1], c[2])[dd.NUM_CLASSES] > 0.5)), c[0],
                     *[generated[n][i] for n in runs]] for i, c in enumerate(crops[:8])]
            grid = make_grid(rows)
            sections["Scores"] = (
                f"Held-back {args.split} split: {len(crops)} crops (every non-overlapping 128 px tile of the split's "
                f"CoNSeP patches, downsampled 2x), generated from their real class maps + instance edges with DDIM "
                f"{args.steps} steps (eta 0), guidance {args.guidance}, seed {args.seed}; FID/KID/precision/recall vs "
                f"the real crops by the scoring service (extractor {scores[name]['extractor']}, features of 64 px "
                f"crops; small sets, so FID is biased upwards - compare rows, not with other papers). The reference row "
                f"scores REAL crops of the other held-back split against the same real crops: the distance between "
                f"CoNSeP tiles alone, a floor-like yardstick for this set size.\n\n"
                + scores_table(scores) + "\n\n![samples](samples.png)\n\nColumns: condition (classes, instance edges "
                "white) | real | " + " | ".join(f"generated ({n})" for n in runs) + ".")
        else:
            real_maps = [c[1] for c in crops]
            requested = np.stack([dd.types_present(m) for m in real_maps])
            conditions = np.stack([dd.mask_condition(r) for r in requested])
            start = time.perf_counter()
            samples = sample_batched(model, conditions, (dd.NUM_CLASSES + 1, *real_maps[0].shape),
                                     config["diffusion"], "mask", args.steps, args.guidance, args.seed)
            sampling_seconds = time.perf_counter() - start
            decoded = [dd.decode_mask(s) for s in samples]
            synth_maps = [d[0] for d in decoded]
            stats = mask_statistics(real_maps, synth_maps)
            hits = type_hit_rates(requested, synth_maps)
            metrics["scores"] = {"ks_mean": stats["mean_ks"], "js_mean": stats["mean_js"],
                                 "image_ks_mean": stats["image_mean_ks"], "image_js_mean": stats["image_mean_js"],
                                 "objects": {"real": stats["real_objects"], "generated": stats["synthetic_objects"]},
                                 "missing_classes": stats["missing_classes"], "type_hits": hits,
                                 "instances_per_crop": {"real": instance_counts([c[2] for c in crops]),
                                                        "generated": instance_counts([d[1] for d in decoded])},
                                 "sampling_seconds": round(sampling_seconds, 1)}
            metrics["mask_stats_per_feature"] = stats["per_feature"]
            metrics["mask_stats_per_class"] = stats["classes"]
            rows = [[to_rgb((c[1], dd.instance_boundary(c[2]))), colorize_mask(s)] for c, s in zip(crops[:8], samples)]
            chain = ""
            if args.renderer_run is not None:
                renderer, renderer_info = load_run(args.renderer_run)
                rendered_conditions = np.stack([dd.renderer_condition(cm, inst) for cm, inst in decoded])
                images = images_uint8(sample_batched(renderer, rendered_conditions, (3, *real_maps[0].shape),
                                                     renderer_info["config"]["diffusion"], "image", args.steps,
                                                     args.guidance, args.seed + 1000))
                real_images = np.stack([c[0] for c in crops])
                chain_scores = score_images(real_images, images)
                other_split = "val" if args.split == "test" else "test"
                other = held_back_crops(config, args.data_root, other_split, args.count, args.every)
                floor = headline(score_images(real_images, np.stack([c[0] for c in other])))
                metrics["chain_scores"] = {**headline(chain_scores), "renderer": renderer_info["config"]["name"],
                                           "renderer_step": renderer_info["step"]}
                metrics["real_vs_real_reference"] = {**floor, "split": other_split, "crops": len(other)}
                rows = [row + [images[i]] for i, row in enumerate(rows)]
                chain = (f"\n\nMask AND image from nothing but the type vector: the decoded masks rendered by "
                         f"{renderer_info['config']['name']} (step {renderer_info['step']}, same DDIM settings) vs the "
                         f"real crops: FID {chain_scores['fid']:.2f}, KID {chain_scores['kid_mean']:.4f} ± "
                         f"{chain_scores['kid_std']:.4f}, precision {chain_scores['precision']:.3f}, recall "
                         f"{chain_scores['recall']:.3f} (scoring service, extractor {chain_scores['extractor']['name']}). "
                         f"Reference: real {other_split} crops vs the same real crops (no model) FID {floor['fid']:.2f}, "
                         f"KID {floor['kid_mean']:.4f} ± {floor['kid_std']:.4f} - with three source tiles per split the "
                         f"between-tile distance alone is that large.")
            grid = make_grid(rows)
            feature_rows = "\n".join(f"| {n} | {v['ks']:.3f} | {v['js']:.3f} | {v['real_n']} / {v['synthetic_n']} |"
                                     for n, v in stats["per_feature"].items())
            shape_means = ", ".join(f"{k}: {_mean_text(c['mean_ks'])} / {_mean_text(c['mean_js'])} "
                                    f"({c['real_objects']} / {c['synthetic_objects']} objects, {c['status']})"
                                    for k, c in stats["classes"].items())
            hit_rows = "\n".join(f"| {t} | {hits[t]['requested']} | {_rate(hits[t]['hit_rate'])} | "
                                 f"{_rate(hits[t]['unrequested_rate'])} |" for t in dd.TYPE_NAMES)
            counts = metrics["scores"]["instances_per_crop"]
            sections["Scores"] = (
                f"Held-back {args.split} split: {len(crops)} crops (non-overlapping 128 px tiles of the split's CoNSeP "
                f"patches, downsampled 2x). Each real crop's multi-hot type vector (type present = >= "
                f"{dd.TYPE_PRESENT_MIN_PIXELS} px) is the condition of one generated mask (DDIM {args.steps} steps, "
                f"eta 0, guidance {args.guidance}, seed {args.seed}); generated masks are decoded by the manifest's rule "
                f"and compared with the real class maps by per-object shape statistics (services/scoring/mask_stats: "
                f"regionprops features of every 8-connected object of classes 1-4 pooled over the crops, objects "
                f"touching the crop border left out; KS and Jensen-Shannon divergence in bits on shared bins).\n\n"
                f"Mean KS / mean JS over the object features: {_mean_text(stats['mean_ks'])} / "
                f"{_mean_text(stats['mean_js'])} (per class, real / generated objects: {shape_means}); image "
                f"features (area fraction, object count per crop): {_mean_text(stats['image_mean_ks'])} / "
                f"{_mean_text(stats['image_mean_js'])}. Instances (>= {dd.DECODE_MIN_INSTANCE_PIXELS} px) per crop: real "
                f"{counts['real']['mean']:.1f} ± {counts['real']['std']:.1f}, generated {counts['generated']['mean']:.1f} ± "
                f"{counts['generated']['std']:.1f}.\n\n"
                "Requested types that appear (hit rate) and unrequested types that appear anyway:\n\n"
                "| type | requests | hit rate | unrequested rate |\n|---|---|---|---|\n" + hit_rows +
                f"\n\nAll four types exactly as requested: {hits['all_types_exact']:.3f}.{chain}\n\n"
                "| feature | KS | JS (bits) | n real / generated |\n|---|---|---|---|\n" + feature_rows +
                "\n\n![samples](samples.png)\n\nColumns: real mask of a held-back crop | generated mask for that "
                "crop's type vector (decoded, instance borders white)" + (" | the generated mask rendered" if chain else "")
                + ".")
    if args.comparison_json is not None:
        earlier = json.loads(args.comparison_json.read_text())
        metrics["variant_comparison"] = {"eval": earlier["eval"], "scores": earlier["comparison"]}
        sections["Variant comparison (SPADE decoder vs concatenation)"] = (
            f"Both variants trained for the same wall-clock budget on the shared CPU (same data, schedule, seed), "
            f"scored on the held-back {earlier['eval']['split']} split ({earlier['eval']['crops']} crops, DDIM "
            f"{earlier['eval']['steps']} steps, guidance {earlier['eval']['guidance_scale']}) by the scoring "
            f"service:\n\n" + scores_table(earlier["comparison"]) + "\n\nThe shipped model is the SPADE variant, "
            "trained further after this comparison (Scores above).")
    if args.guidance_sweep_json is not None:
        sweep = json.loads(args.guidance_sweep_json.read_text())
        metrics["guidance_sweep"] = sweep
        lines = ["| guidance | FID | KID (mean ± std) | precision | recall |", "|---|---|---|---|---|"]
        lines += [f"| {r['guidance_scale']} | {r['fid']:.2f} | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | "
                  f"{r['precision']:.3f} | {r['recall']:.3f} |" for r in sweep["rows"]]
        sections["Guidance scale (why the default is what it is)"] = (
            f"Same model (step {sweep['step']}), held-back {sweep['split']} split ({sweep['crops']} crops), DDIM "
            f"{sweep['steps']} steps, seed {sweep['seed']}; scoring service:\n\n" + "\n".join(lines))
    if args.eval_only:
        print(json.dumps(metrics, indent=2, default=str))
        return 0
    version_dir = export_denoiser(model, info, name, args.version, args.store, metrics, args.steps, args.guidance,
                                  args.overwrite)
    invariance = batch_invariance(version_dir, config)
    _set_metric(version_dir, "ort_batch_invariance_max_abs", invariance)
    if grid is not None:  # 64 px tiles: shown 2x (nearest) so nuclei are visible in the card
        (version_dir / "samples.png").write_bytes(png_bytes(grid.repeat(2, axis=0).repeat(2, axis=1)))
    write_card(version_dir, model_card(config, info), sections or {"Scores": "Not evaluated in this export (--no-eval)."})
    size = (version_dir / "model.onnx").stat().st_size
    print(json.dumps({"version_dir": str(version_dir), "onnx_bytes": size, "batch_invariance": invariance,
                      "metrics": metrics}, indent=2, default=str))
    return 0


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _set_metric(version_dir: Path, key: str, value: Any) -> None:
    """Add one metric to manifest.yaml (after export; the sha256 covers model.onnx only)."""
    import yaml

    path = version_dir / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["metrics"][key] = value
    path.write_text(yaml.safe_dump(manifest, sort_keys=False, width=120))


def model_card(config: Mapping[str, Any], info: Mapping[str, Any]) -> ModelCard:
    data = config["data"]
    model = config["model"]
    common_data = (
        f"CoNSeP (colorectal H&E, 40x, 256x256 JPEG patches), split by CoNSeP source tile {data['split_fractions']} "
        f"with seed {data['split_seed']} (groups in the manifest's provenance.split). Training items: random "
        f"{data['source_crop']} px crops with flips/rot90, downsampled {data['factor']}x (box-averaged image, "
        f"top-left-pixel labels) to 64x64 at ~{dd.CONSEP_PIXEL_SIZE_UM * int(data['factor'])} um/px.")
    schedule = (f"{config['diffusion']['prediction_type']}, {config['diffusion']['num_train_timesteps']} steps, "
                f"{config['diffusion']['beta_schedule']} betas; AdamW lr {config['train']['lr']}, batch "
                f"{config['train']['batch_size']}, EMA {config['train']['ema_decay']} (EMA weights exported), "
                f"condition dropout {config['train']['cond_dropout']} for classifier-free guidance; "
                f"{info['step']} steps on a shared 2-core CPU (1 thread).")
    if data["target"] == "image":
        arch = ("SPADE U-Net (NASDM/SDM): diffusers ResnetBlock2D encoder, ResNet+attention mid block, decoder of "
                "SPADE residual blocks (GroupNorm without affine, per-pixel scale/shift from the condition)"
                if model["arch"] == "spade_unet" else "diffusers UNet2DModel on concat(noisy image, condition)")
        return ModelCard(
            title="mask-conditioned diffusion renderer (CoNSeP nuclei classes + instance edges -> H&E, 64 px)",
            summary=(f"Denoiser of a conditional diffusion model: {arch}, channels {model['channels']}. Condition = "
                     f"one-hot background/other/inflammatory/epithelial/spindle + instance edge map (zeros = "
                     f"unconditional). Training: {schedule} Sample with DDIM 20 steps, guidance 2."),
            data=common_data,
            intended_use="Research: rendering synthetic H&E crops from nuclei layouts (e.g. the nuclei-mask-generator's "
                         "masks) for augmentation experiments through the serving-side diffusion sampler.",
            limitations="Tiny model, minutes of CPU training at 64 px: blurry textures, colours roughly H&E, nuclei "
                        "placed by the mask but weakly detailed. 20x only (0.5 um/px); CoNSeP colorectal tissue only; "
                        "JPEG artefacts of the source may be learned. Not for clinical use.")
    return ModelCard(
        title="nuclei mask generator (CoNSeP type multi-hot -> class + instance-boundary maps, 64 px)",
        summary=(f"Denoiser of a diffusion model over masks (NASDM section 3.1): diffusers UNet2DModel, channels "
                 f"{model['channels']}, with a Linear embedding of [other, inflammatory, epithelial, spindle, null] "
                 f"added to the time embedding (class_embed_type identity). Sample = 5 one-hot class channels + "
                 f"instance-boundary channel in [-1, 1], decoded by the rule in metadata.decode. Training: {schedule}"),
        data=common_data + " Condition = types covering >= 8 px of the crop.",
        intended_use="Research: generating nuclei layouts with requested types, to be rendered by "
                     "renderer-diffusion-nuclei (mask and image without an input mask).",
        limitations="Tiny model, short CPU training: shapes are blob-like, touching nuclei may merge or split, "
                    "type control is soft (see hit rates). 64 px at 0.5 um/px only. Not for clinical use.")


if __name__ == "__main__":
    raise SystemExit(main())
