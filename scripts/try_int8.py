"""int8 for a renderer or a refiner: OpenVINO post-training quantisation (NNCF), judged by the same gate as bf16.

    .venv/bin/pip install nncf        # an experiment dependency only: never imported by services/
    .venv/bin/python scripts/try_int8.py --model renderer-he-nuclei --version 2 --record
    .venv/bin/python scripts/try_int8.py --model mask-refiner --version 2 --record

Steps (issue #15, item 2):
  1. Calibration: ``--calibration`` crops (256 px) of the model's TRAINING split only (its recorded split,
     recomputed as the trainer did, benchmark tiles forced out; the script refuses any crop from a
     held-back / test group), encoded as the service encodes them (renderers: class map + instance edges +
     noise; refiners: PriorPath-coarsened tissue mask + gland guide on every other crop + noise).
  2. Quantisation of the shipped model.onnx read by OpenVINO (8-bit weights and activations):
       renderers  ``nncf.quantize`` with each ``--preset`` (options below);
       refiners   ``nncf.quantize_with_accuracy_control`` (preset MIXED): quantised layers are reverted to
                  floating point, most harmful first, until the thresholded masks of ``--validation`` further
                  TRAINING crops differ from fp32's in at most REFINER_MAX_FLIP of their pixels (half the
                  held-back output tolerance below, stated before measuring).
  3. Quality, the same checks as bf16:
       output    the 64 held-back crops of scripts/check_precision.py (seed 0), int8 vs ONNX Runtime fp32, its
                 tolerances (renderers: uint8 image mean |diff| <= 0.5 grey levels, p99.9 <= 4; refiners: at
                 most 0.1 % of mask pixels flipped);
       FID       (renderers) renders of held-back masks (the downstream benchmark's MoNuSeg held-back patients,
                 256 px grid crops, n = 256, the crops its distribution scores use) by ORT fp32, OpenVINO bf16
                 and int8, each vs the real crops (histology encoder, 95 % bootstrap CI), and int8 / bf16 vs
                 fp32 renders. Refiners: held-back Dice and mask-shape statistics (scripts/eval_precision_quality.py)
                 would follow an output check that passed.
  4. Speed: img/s at 256x256, batch 1, --threads threads each, rounds interleaved ORT fp32 / OV fp32 / OV bf16 /
     OV int8 (same window, same threads).
Writes --json (every number); --record adds the check (passed or FAILED) to precision_checks.yaml keyed by
the shipped model file's sha256 (runtime openvino, precision int8). The serving path has no int8 precision
(no model has passed): the IR stays in --out and a failed check changes nothing there. Serving one would
need the IR beside model.onnx with its sha256 in the entry, verified by the gate before loading.
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
from typing import Any, Final

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from check_precision import TOLERANCES, compare, refiner_coarse_masks, refiner_inputs, renderer_inputs  # noqa: E402

from services.core.model_store import ModelManifest, ModelStore  # noqa: E402
from services.core.runtimes.base import RuntimeOptions  # noqa: E402
from services.core.runtimes.openvino import openvino_version  # noqa: E402
from services.core.runtimes.registry import create_runtime  # noqa: E402
from services.core.runtimes.selection import record_check  # noqa: E402
from services.mask_refinement.pipeline import encode_input  # noqa: E402
from services.mask_rendering.pipeline import RendererSpec, RenderingPipeline, to_uint8_rgb  # noqa: E402

# Refiners: largest share of mask pixels the accuracy-controlled quantisation may flip on its TRAINING
# validation crops (half of check_precision's held-back tolerance, so that the held-back check has margin).
REFINER_MAX_FLIP: Final = 0.0005


def encode(manifest: ModelManifest, classes: np.ndarray, instances: np.ndarray | None, seed: int) -> np.ndarray:
    """One crop -> the renderer's [1, C, H, W] input, exactly as the Render service builds it."""
    spec = RendererSpec.from_metadata(manifest.key, manifest.metadata)
    if instances is not None and not instances.any():
        instances = None
    maps = RenderingPipeline.field_maps(classes, spec, instances, None, seed, 0.0)
    padded = maps.padded(spec.size_multiple, spec.min_size)
    return padded.generator_input((slice(None), slice(None)), spec.num_classes)[None].astype(np.float32)


def training_split(manifest: ModelManifest, data_root: Path, crop: int) -> tuple[Any, dict[str, Any]]:
    """The model's TRAINING split (training.evaluate.recorded_split, ``crop`` px crops); refuses if any of its
    groups is held back (the model's test split or the benchmark's)."""
    from dataclasses import replace

    from training.data.benchmark_split import BENCHMARK_HELD_BACK
    from training.evaluate import held_back, recorded_split

    test = held_back(manifest, data_root)
    train = recorded_split(manifest, data_root, "train")
    forbidden = set(test.groups) | {g for groups in BENCHMARK_HELD_BACK.values() for g in groups}
    leaked = sorted(set(train.groups) & forbidden)
    if leaked:
        raise SystemExit(f"calibration would use held-back groups {leaked}; refusing")
    return replace(train, crop=crop), {"split": "train (recorded split)", "train_groups": len(train.groups),
                                       "held_back_groups_excluded": sorted(forbidden)}


def calibration_inputs(manifest: ModelManifest, data_root: Path, count: int, crop: int,
                       seed: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``count`` crops of the model's training split (never its test / benchmark groups), encoded as served.

    Refiners: coarse = the training's PriorPath coarsening of the crop's tissue mask (as check_precision's
    held-back inputs); the guide (gland layout) is given for even crops and left unknown (0) for odd ones,
    as callers with and without a layout do.
    """
    from training.evaluate import sample_crops

    train, info = training_split(manifest, data_root, crop)
    if manifest.kind == "refiner":
        crops = sample_crops(train, count, seed, lambda source, sample: sample.class_map)
        coarse, info["coarse"] = refiner_coarse_masks(manifest, crops.images)
        channels = [str(c) for c in manifest.metadata.get("input_channels") or ["coarse"]]
        tensors = []
        for index, mask in enumerate(coarse):
            guide = (crops.class_maps[index] > 0).astype(np.uint8)[None] if index % 2 == 0 else None
            tensors.append(encode_input(channels, mask[None], guide, seed + index))
        info["guide"] = "gland layout on even crops, unknown (0) on odd"
    else:
        crops = sample_crops(train, count, seed, lambda source, sample: source.class_map(sample))
        tensors = [encode(manifest, crops.class_maps[i], None if crops.instances is None else crops.instances[i],
                          seed + i) for i in range(len(crops.class_maps))]
    return tensors, {"crops": len(tensors), "crop": crop, "seed": seed, **info, "origins_first": crops.origins[:4]}


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


def quantize_refiner(manifest: ModelManifest, calibration: list[np.ndarray], validation: list[np.ndarray],
                     threads: int) -> tuple[Any, dict[str, Any]]:
    """Accuracy-controlled int8 of a refiner (module doc, step 2); the quantised OpenVINO model and its record."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(manifest.path))
    threshold = float(manifest.metadata.get("threshold", 0.0))
    reference = [Compiled(manifest.path, "f32", threads)(tensor) > threshold for tensor in validation]

    def agreement(compiled: Any, data: Any) -> float:
        """1 - share of validation mask pixels that differ from fp32's (the metric NNCF keeps within the drop)."""
        request = compiled.create_infer_request()
        flipped = [np.mean((request.infer({0: tensor})[0] > threshold) != fp32)
                   for tensor, fp32 in zip(data, reference, strict=True)]
        return 1.0 - float(np.mean(flipped))

    def agreement_at_f32(candidate: Any) -> float:
        """``agreement`` of a quantised model whose floating-point layers run at f32 (as served and as NNCF runs it)."""
        return agreement(ov.Core().compile_model(candidate, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), validation)

    def fake_quantize_nodes(candidate: Any) -> int:
        return sum(1 for op in candidate.get_ordered_ops() if op.get_type_name() == "FakeQuantize")

    ignored = nncf.IgnoredScope(types=["MVN"])
    # What is at stake: every quantiser kept (no accuracy control), judged on the same validation crops.
    plain = nncf.quantize(model, nncf.Dataset(calibration), preset=nncf.QuantizationPreset.MIXED,
                          subset_size=len(calibration), ignored_scope=ignored)
    plain_agreement = agreement_at_f32(plain)
    started = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(calibration), nncf.Dataset(validation), validation_fn=agreement,
        max_drop=REFINER_MAX_FLIP, drop_type=nncf.DropType.ABSOLUTE, preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calibration), ignored_scope=ignored)
    agreement_int8 = agreement_at_f32(quantized)
    seconds = time.perf_counter() - started
    # When NNCF cannot reach max_drop it reverts every quantiser and returns the floating-point model (with a
    # log line only): count what is left, so that such a model is never recorded as int8.
    return quantized, {"nncf": nncf.__version__, "method": "quantize_with_accuracy_control", "preset": "MIXED",
                       "kept_floating_point": "instance norms (MVN) not quantised; layers NNCF reverted",
                       "fake_quantize_nodes_left": fake_quantize_nodes(quantized),
                       "every_quantiser_kept": {"validation_flipped_fraction": round(1.0 - plain_agreement, 6),
                                                "fake_quantize_nodes": fake_quantize_nodes(plain)},
                       "metric": "1 - share of thresholded mask pixels differing from fp32 on the validation crops",
                       "max_drop": REFINER_MAX_FLIP, "validation_crops": len(validation),
                       "validation_agreement_int8": round(agreement_int8, 6),
                       "seconds": round(seconds, 1)}


def refiner_main(args: argparse.Namespace, manifest: ModelManifest, result: dict[str, Any]) -> int:
    """Module doc for refiners: accuracy-controlled int8, the held-back output check, speed, the record."""
    import openvino as ov

    crops, result["calibration"] = calibration_inputs(manifest, args.data_root, args.calibration + args.validation,
                                                      256, seed=1)
    calibration, validation = crops[:args.calibration], crops[args.calibration:]
    quantized, result["quantisation"] = quantize_refiner(manifest, calibration, validation, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ir = args.out / "model_int8_accuracy_control.xml"
    ov.save_model(quantized, str(ir), compress_to_fp16=False)
    print(json.dumps({"quantisation": result["quantisation"]}), flush=True)

    held, result["output_inputs"] = refiner_inputs(manifest, args.data_root, 64, 0)  # check_precision's inputs
    ort = create_runtime(manifest, "cpu", RuntimeOptions(intra_op_threads=args.threads))
    name, output = manifest.inputs[0].name, manifest.outputs[0].name
    reference = [ort.infer({name: t})[output] for t in held]
    int8, bf16 = Compiled(ir, "f32", args.threads), Compiled(manifest.path, "bf16", args.threads)
    measured = compare("refiner", manifest, reference, [int8(t) for t in held])
    quantised = result["quantisation"]["fake_quantize_nodes_left"] > 0
    passed = quantised and all(measured[key] <= limit for key, limit in TOLERANCES["refiner"].items())
    if not quantised:
        result["failure"] = "NNCF reverted every quantiser to reach max_drop: no int8 layer is left"
    result["int8_output"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in measured.items()}
    result["bf16_output"] = {k: round(v, 6) if isinstance(v, float) else v
                             for k, v in compare("refiner", manifest, reference, [bf16(t) for t in held]).items()}
    result["output_passed"] = passed
    print(json.dumps({"int8_output": result["int8_output"], "passed": passed}), flush=True)
    if "speed" not in args.skip:
        runners = {"onnxruntime fp32": lambda t: ort.infer({name: t})[output],
                   "openvino fp32": Compiled(manifest.path, "f32", args.threads), "openvino bf16": bf16,
                   "openvino int8": int8}
        result["speed"] = {"size": "256x256", "batch": 1, "threads": args.threads, "rounds": args.rounds,
                           "per_round": args.per_round, **speed(runners, held[0], args.rounds, args.per_round)}
        print(json.dumps({"speed": result["speed"]}), flush=True)
    write_json(args.json, result)
    if args.record:
        entry: dict[str, Any] = {
            "runtime": "openvino", "precision": "int8", "sha256": manifest.sha256, "passed": bool(passed),
            "tolerance": TOLERANCES["refiner"], "measured": result["int8_output"],
            **({"failure": result["failure"]} if "failure" in result else {}),
            "reference": f"onnxruntime fp32 ({ort.provider})",
            "candidate_provider": f"openvino-{openvino_version()}-CPU int8 IR (NNCF {result['quantisation']['nncf']} "
            "accuracy-controlled post-training quantisation; not saved to the store)",
            "inputs": {"source": "held-back crops as scripts/check_precision.py", **result["output_inputs"]},
            "calibration": result["calibration"], "quantisation": result["quantisation"],
            "speed": result.get("speed"), "versions": result["versions"], "machine": result["machine"],
            "timestamp": result["timestamp"],
            "not_checked": "held-back Dice and mask-shape statistics (scripts/eval_precision_quality.py): not run, "
            "the output check decides first",
        }
        path = record_check(manifest, entry)
        print(f"{'PASSED' if passed else 'FAILED'}: recorded in {path.relative_to(ROOT)}")
    return 0 if passed else 1


def write_json(path: Path, result: dict[str, Any]) -> None:
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


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
    parser.add_argument("--validation", type=int, default=32,
                        help="refiners: further training crops the accuracy-controlled quantisation is judged on")
    parser.add_argument("--json", type=Path, default=None,
                        help="default bench/results/int8_renderer.json or int8_refiner.json")
    parser.add_argument("--record", action="store_true", help="add the check to precision_checks.yaml")
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "fid"])
    args = parser.parse_args(argv)

    manifest = ModelStore(args.model_store).get(args.model, args.version)
    if manifest.kind not in ("renderer", "refiner"):
        raise SystemExit(f"{manifest.key}: kind {manifest.kind!r}; int8 is tried for renderers and refiners")
    args.json = args.json or ROOT / "bench" / "results" / f"int8_{manifest.kind}.json"
    result: dict[str, Any] = {"model": manifest.key, "sha256": manifest.sha256, "machine": {
        "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"openvino": openvino_version(), "onnxruntime": __import__("onnxruntime").__version__},
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds")}
    if manifest.kind == "refiner":
        return refiner_main(args, manifest, result)
    spec = RendererSpec.from_metadata(manifest.key, manifest.metadata)

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
    write_json(args.json, result)

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
