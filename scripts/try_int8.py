"""int8 for a renderer: OpenVINO post-training quantisation (NNCF), judged by the same gate as bf16.

    .venv/bin/pip install nncf        # an experiment dependency only: never imported by services/
    .venv/bin/python scripts/try_int8.py --model renderer-he-nuclei --version 2 --record

Steps (issue #15, item 2):
  1. Calibration: ``--calibration`` crops (256 px) of the renderer's TRAINING split only (its recorded split,
     recomputed as the trainer did, benchmark tiles forced out; the script refuses any crop from a
     held-back / test group), encoded as the Render service encodes them (class map + instance edges + noise).
  2. ``nncf.quantize`` of the shipped model.onnx read by OpenVINO (8-bit weights and activations; preset and
     options below), saved as OpenVINO IR to --out (not into the model store unless it passes).
  3. Quality, the same checks as bf16:
       output    the 64 held-back 128 px crops of scripts/check_precision.py (seed 0), int8 vs ONNX Runtime fp32,
                 its tolerances (uint8 image mean |diff| <= 0.5 grey levels, p99.9 <= 4);
       FID       renders of held-back masks (the downstream benchmark's MoNuSeg held-back patients, 256 px grid
                 crops, n = 256, the crops its distribution scores use) by ORT fp32, OpenVINO bf16 and int8, each
                 vs the real crops (histology encoder, 95 % bootstrap CI), and int8 / bf16 vs fp32 renders.
  4. Speed: img/s at 256x256, batch 1, --threads threads each, rounds interleaved ORT fp32 / OV fp32 / OV bf16 /
     OV int8 (same window, same threads).
Writes --json (every number); --record adds the check (passed or FAILED) to precision_checks.yaml keyed by
the shipped model file's sha256 (runtime openvino, precision int8). The serving path has no int8 precision:
a failed check changes nothing there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from check_precision import TOLERANCES, compare, renderer_inputs  # noqa: E402

from services.core.model_store import ModelManifest, ModelStore  # noqa: E402
from services.core.runtimes.base import RuntimeOptions  # noqa: E402
from services.core.runtimes.openvino import openvino_version  # noqa: E402
from services.core.runtimes.registry import create_runtime  # noqa: E402
from services.core.runtimes.selection import record_check  # noqa: E402
from services.mask_rendering.pipeline import RendererSpec, RenderingPipeline, to_uint8_rgb  # noqa: E402


def encode(manifest: ModelManifest, classes: np.ndarray, instances: np.ndarray | None, seed: int) -> np.ndarray:
    """One crop -> the renderer's [1, C, H, W] input, exactly as the Render service builds it."""
    spec = RendererSpec.from_metadata(manifest.key, manifest.metadata)
    if instances is not None and not instances.any():
        instances = None
    maps = RenderingPipeline.field_maps(classes, spec, instances, None, seed, 0.0)
    padded = maps.padded(spec.size_multiple, spec.min_size)
    return padded.generator_input((slice(None), slice(None)), spec.num_classes)[None].astype(np.float32)


def calibration_inputs(manifest: ModelManifest, data_root: Path, count: int, crop: int,
                       seed: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``count`` crops of the renderer's training split (never its test / benchmark groups)."""
    from training.data.benchmark_split import BENCHMARK_HELD_BACK, held_back_groups
    from training.data.shared_layout import load_records, split_records
    from training.evaluate import HeldBack, Source, _training_data, held_back, sample_crops

    data = _training_data(manifest)
    test = held_back(manifest, data_root)  # also checks the recomputed split against the recorded one
    fractions = tuple(float(f) for f in data["split_fractions"])
    split_seed = int(data.get("split_seed", manifest.provenance.get("seed", 0)))
    sources, records = [], []
    for raw in data["sources"]:
        source = Source(raw["dataset"], raw.get("derive", "mask"),
                        {int(k): int(v) for k, v in (raw.get("class_remap") or {}).items()})
        split = split_records(load_records(data_root, source.dataset), tuple(float(f) for f in raw.get(
            "split_fractions", fractions)), split_seed, held_back=held_back_groups(raw))
        sources.append(source)
        records.append(tuple(split["train"]))
    train_groups = sorted({r.group for recs in records for r in recs})
    forbidden = set(test.groups) | {g for groups in BENCHMARK_HELD_BACK.values() for g in groups}
    leaked = sorted(set(train_groups) & forbidden)
    if leaked:
        raise SystemExit(f"calibration would use held-back groups {leaked}; refusing")
    recorded = set(((manifest.provenance.get("split") or {}).get("groups") or {}).get("train") or train_groups)
    if set(train_groups) - recorded:
        raise SystemExit(f"calibration groups {sorted(set(train_groups) - recorded)} are not in the recorded train split")
    train = HeldBack(crop, test.fractions, split_seed, tuple(sources), tuple(records))
    crops = sample_crops(train, count, seed, lambda source, sample: source.class_map(sample))
    tensors = [encode(manifest, crops.class_maps[i], None if crops.instances is None else crops.instances[i], seed + i)
               for i in range(len(crops.class_maps))]
    return tensors, {"crops": len(tensors), "crop": crop, "seed": seed, "split": "train (recorded split)",
                     "train_groups": len(train_groups), "held_back_groups_excluded": sorted(forbidden),
                     "origins_first": crops.origins[:4]}


def quantize(manifest: ModelManifest, calibration: list[np.ndarray], out: Path, preset: str,
             fast_bias_correction: bool) -> tuple[Path, dict[str, Any]]:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(manifest.path))
    # "MIXED+first-last": the preset, with the first and the last convolution (one-hot input, tanh output) kept fp32.
    base, _, keep = preset.partition("+")
    convs = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "ConvolutionBackpropData", "GroupConvolution")]
    ignored = [convs[0], convs[-1]] if keep == "first-last" else []
    started = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(calibration), preset=getattr(nncf.QuantizationPreset, base),
                              subset_size=len(calibration), fast_bias_correction=fast_bias_correction,
                              ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None)
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model_int8_{preset.lower().replace('+', '_')}.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path, {"nncf": nncf.__version__, "preset": preset, "kept_fp32": ignored, "fast_bias_correction": fast_bias_correction,
                  "seconds": round(seconds, 1), "ir": str(path)}


class Compiled:
    """An OpenVINO IR (or ONNX) compiled for the CPU; rows run one at a time like services' OpenVinoRuntime."""

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, tensor: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: tensor})[0], copy=True)


def held_back_masks(manifest: ModelManifest, data_dir: Path, n: int, crop: int, seed: int):  # noqa: ANN201
    """The downstream benchmark's held-back MoNuSeg crops (its distribution-score selection) and their masks."""
    from training.experiments import downstream_data as data

    test = np.load(data_dir / "monuseg-test.npz")
    images = data.grid_crops(list(test["images"]), crop, crop // 2)
    instances = data.grid_crops([i[..., None] for i in test["instances"]], crop, crop // 2)[..., 0]
    order = np.random.default_rng(0).permutation(len(images))[:n]
    classes = data.remap((instances[order] > 0).astype(np.uint8), data.renderer_class_remap(manifest, "monuseg"))
    inputs = [encode(manifest, classes[i], instances[order][i], seed + i) for i in range(len(order))]
    return images[order], inputs


def speed(runners: dict[str, Any], tensor: np.ndarray, rounds: int, per_round: int) -> dict[str, Any]:
    for run in runners.values():
        run(tensor)  # compile the shape / warm up
    times: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(rounds):
        order = list(runners) if index % 2 == 0 else list(reversed(runners))
        for name in order:
            started = time.perf_counter()
            for _ in range(per_round):
                runners[name](tensor)
            times[name].append(per_round / (time.perf_counter() - started))
    return {name: {"img_s_median": round(float(np.median(v)), 2), "img_s_rounds": [round(x, 2) for x in v]}
            for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="renderer-he-nuclei")
    parser.add_argument("--version", default=None)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--downstream-data", type=Path,
                        default=Path.home() / ".cache" / "histosynth" / "runs" / "experiments" / "downstream" / "data")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--preset", nargs="*", default=["PERFORMANCE", "MIXED", "MIXED+first-last"],
                        help="NNCF preset, optionally +first-last (first and last convolution kept fp32)")
    parser.add_argument("--fast-bias-correction", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--fid-crops", type=int, default=256)
    parser.add_argument("--fid-bootstrap", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("/tmp/histosynth-int8"))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "int8_renderer.json")
    parser.add_argument("--record", action="store_true", help="add the check to precision_checks.yaml")
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "fid"])
    args = parser.parse_args(argv)

    manifest = ModelStore(args.model_store).get(args.model, args.version)
    spec = RendererSpec.from_metadata(manifest.key, manifest.metadata)
    result: dict[str, Any] = {"model": manifest.key, "sha256": manifest.sha256, "machine": {
        "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"openvino": openvino_version(), "onnxruntime": __import__("onnxruntime").__version__},
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds")}

    calibration, result["calibration"] = calibration_inputs(manifest, args.data_root, args.calibration, 256, seed=1)
    held_tensors, held_info = renderer_inputs(manifest, args.data_root, 64, 0)  # check_precision's inputs
    ort = create_runtime(manifest, "cpu", RuntimeOptions(intra_op_threads=args.threads))
    name, output = manifest.inputs[0].name, manifest.outputs[0].name
    reference = [ort.infer({name: t})[output] for t in held_tensors]
    bf16 = Compiled(manifest.path, "bf16", args.threads)

    variants: dict[str, dict[str, Any]] = {}
    runners: dict[str, Any] = {}
    for preset in args.preset:
        path, info = quantize(manifest, calibration, args.out, preset, args.fast_bias_correction)
        int8 = Compiled(path, "f32", args.threads)  # int8 layers run int8; the rest stays fp32
        measured = compare("renderer", manifest, reference, [int8(t) for t in held_tensors])
        passed = all(measured[key] <= limit for key, limit in TOLERANCES["renderer"].items())
        variants[preset] = {**info, "output": {k: round(v, 6) for k, v in measured.items()}, "output_passed": passed}
        runners[f"openvino int8 ({preset})"] = int8
        print(json.dumps({preset: variants[preset]}), flush=True)
    bf16_measured = compare("renderer", manifest, reference, [bf16(t) for t in held_tensors])
    result["output_inputs"] = held_info
    result["bf16_output"] = {k: round(v, 6) for k, v in bf16_measured.items()}
    result["int8"] = variants

    if "fid" not in args.skip:
        from training.experiments.coarse_to_fine import experiment_config
        from training.experiments.report import ScoreOptions, ScoringSession

        real, inputs = held_back_masks(manifest, args.downstream_data, args.fid_crops, 256, seed=7)
        rgb = {"onnxruntime fp32": [to_uint8_rgb(ort.infer({name: t})[output][0], spec.output_range) for t in inputs],
               "openvino bf16": [to_uint8_rgb(bf16(t)[0], spec.output_range) for t in inputs]}
        for label, run in runners.items():
            rgb[label] = [to_uint8_rgb(run(t)[0], spec.output_range) for t in inputs]
        sets = {k: np.stack(v) for k, v in rgb.items()}
        options = ScoreOptions(kid_subset_size=len(real) // 2, kid_subsets=100, fid_bootstrap=args.fid_bootstrap)
        fid: dict[str, Any] = {"n": len(real), "masks": "downstream benchmark's held-back MoNuSeg patients, 256 px grid "
                               "crops (its distribution-score selection), rendered in-process with the service's encoding"}
        with ScoringSession(args.model_store, experiment_config(args.model_store)) as scorer:
            for label, images in sets.items():
                s = scorer.score(real, images, options)
                fid[f"{label} vs held-back"] = {"fid": round(s["fid"], 2), "fid_ci95": [round(s["fid_ci"]["low"], 2),
                                                round(s["fid_ci"]["high"], 2)], "kid_mean": round(s["kid_mean"], 4),
                                                "kid_std": round(s["kid_std"], 4)}
                if label != "onnxruntime fp32":
                    d = scorer.score(sets["onnxruntime fp32"], images, replace_bootstrap(options))
                    fid[f"{label} vs fp32 renders"] = {"fid": round(d["fid"], 2), "kid_mean": round(d["kid_mean"], 4)}
                    levels = np.abs(images.astype(np.int16) - sets["onnxruntime fp32"]).astype(np.float64)
                    fid[f"{label} vs fp32 renders"]["image_mean_abs_levels"] = round(float(levels.mean()), 3)
        base = fid["onnxruntime fp32 vs held-back"]
        for label in runners:
            within = base["fid_ci95"][0] <= fid[f"{label} vs held-back"]["fid"] <= base["fid_ci95"][1]
            fid[f"{label} fid_within_fp32_ci"] = bool(within)
        result["fid"] = fid
        print(json.dumps({"fid": fid}), flush=True)

    if "speed" not in args.skip:
        runners = {"onnxruntime fp32": lambda t: ort.infer({name: t})[output],
                   "openvino fp32": Compiled(manifest.path, "f32", args.threads), "openvino bf16": bf16, **runners}
        tensor = encode(manifest, np.zeros((256, 256), np.uint8), None, 0)
        result["speed"] = {"size": "256x256", "batch": 1, "threads": args.threads, "rounds": args.rounds,
                           "per_round": args.per_round, **speed(runners, tensor, args.rounds, args.per_round)}
        print(json.dumps({"speed": result["speed"]}), flush=True)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")

    if args.record:
        best = min(variants, key=lambda p: variants[p]["output"]["image_mean_abs_levels"])
        v = variants[best]
        fid_ok = result.get("fid", {}).get(f"openvino int8 ({best}) fid_within_fp32_ci")
        passed = bool(v["output_passed"] and fid_ok)
        entry = {
            "runtime": "openvino", "precision": "int8", "sha256": manifest.sha256, "passed": passed,
            "output_passed": bool(v["output_passed"]), "tolerance": TOLERANCES["renderer"], "measured": v["output"],
            "reference": f"onnxruntime fp32 ({ort.provider})",
            "candidate_provider": f"openvino-{openvino_version()}-CPU int8 IR (NNCF {v['nncf']} post-training, "
            f"preset {best}; not saved to the store)",
            "inputs": {"source": "held-back crops as scripts/check_precision.py", **held_info},
            "calibration": result["calibration"],
            "presets_tried": {p: {"image_mean_abs_levels": x["output"]["image_mean_abs_levels"],
                                  "image_p999_abs_levels": x["output"]["image_p999_abs_levels"]}
                              for p, x in variants.items()},
            "fid": result.get("fid"), "speed": result.get("speed"),
            "versions": result["versions"], "machine": result["machine"], "timestamp": result["timestamp"],
            "not_checked": "downstream segmenter arms (not run: the output and FID checks decide first)",
        }
        path = record_check(manifest, entry)
        print(f"{'PASSED' if passed else 'FAILED'}: recorded in {path.relative_to(ROOT)}")
    return 0


def replace_bootstrap(options: Any) -> Any:
    from dataclasses import replace

    return replace(options, fid_bootstrap=0)


if __name__ == "__main__":
    sys.exit(main())
