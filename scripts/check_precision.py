"""Precision check: may a model be served at a reduced precision (bf16) on a runtime (openvino)?

    .venv/bin/python scripts/check_precision.py --model renderer-he-nuclei --runtime openvino --precision bf16
    .venv/bin/python scripts/check_precision.py --model mask-refiner --runtime openvino --precision bf16 --count 64

Inputs are the model's own held-back crops (training.evaluate: the test split of its recorded split, N
random crops of its training crop size, fixed seed), encoded exactly as the serving pipelines encode them
(renderers: class map + instance edges + noise label, RenderingPipeline.field_maps; refiners: coarse mask
by the training coarsening, + guide/noise channels, refinement.encode_input). Each crop runs through
ONNX Runtime fp32 (the reference, the default serving runtime) and through the candidate runtime and
precision, one row at a time; then

  renderers  raw output |diff| (max, mean, p99.9) and the served product: the uint8 RGB image
             (to_uint8_rgb): mean and p99.9 |grey-level diff| and the share of pixels that differ;
  refiners   raw output |diff| and the served product: the thresholded mask, share of flipped pixels.

The tolerances below are fixed before measuring. The result (pass or fail, every number, the inputs,
runtime versions) is added to precision_checks.yaml beside the manifest, keyed by the model file's
sha256; the serving runtime loads a reduced precision only with a passing entry
(services/core/runtimes/selection.py). What this check does NOT cover is written into the entry too:
held-back FID/KID and downstream numbers at the reduced precision (training.evaluate / the experiments).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.core import mask_ops  # noqa: E402
from services.core.model_store import ModelManifest, ModelStore  # noqa: E402
from services.core.runtimes.base import RuntimeOptions  # noqa: E402
from services.core.runtimes.openvino import openvino_version  # noqa: E402
from services.core.runtimes.registry import create_runtime  # noqa: E402
from services.core.runtimes.selection import read_checks, record_check  # noqa: E402
from services.mask_refinement.pipeline import encode_input  # noqa: E402
from services.mask_rendering.pipeline import RendererSpec, RenderingPipeline, to_uint8_rgb  # noqa: E402

# Stated before measuring. Renderers: the served uint8 image may move by half a grey level on average and
# by at most 4 levels at the 99.9th percentile (JPEG q95 moves more). Refiners: at most 0.1 % of the mask's
# pixels may flip (they sit where the fp32 output is within bf16 rounding of the threshold).
TOLERANCES: Final[dict[str, dict[str, float]]] = {
    "renderer": {"image_mean_abs_levels": 0.5, "image_p999_abs_levels": 4.0},
    "refiner": {"mask_flipped_fraction": 0.001},
}


def renderer_inputs(manifest: ModelManifest, data_root: Path, count: int, seed: int) -> tuple[list[np.ndarray], dict]:
    from training.evaluate import held_back, sample_crops

    held = held_back(manifest, data_root)
    crops = sample_crops(held, count, seed, lambda source, sample: source.class_map(sample))
    spec = RendererSpec.from_metadata(manifest.key, manifest.metadata)
    tensors = []
    for index, classes in enumerate(crops.class_maps):
        instances = None if crops.instances is None else crops.instances[index]
        if instances is not None and not instances.any():
            instances = None
        maps = RenderingPipeline.field_maps(classes, spec, instances, None, seed + index, 0.0)
        padded = maps.padded(spec.size_multiple, spec.min_size)
        region = (slice(None), slice(None))
        tensors.append(padded.generator_input(region, spec.num_classes)[None].astype(np.float32))
    return tensors, {"crops": len(tensors), "crop": held.crop, "test_tiles": sum(len(r) for r in held.records),
                     "test_groups": held.groups, "seed": seed, "origins_first": crops.origins[:4]}


def refiner_inputs(manifest: ModelManifest, data_root: Path, count: int, seed: int) -> tuple[list[np.ndarray], dict]:
    from training.evaluate import held_back, sample_crops

    held = held_back(manifest, data_root)
    crops = sample_crops(held, count, seed, lambda source, sample: sample.class_map)
    coarse, recipe = refiner_coarse_masks(manifest, crops.images)
    channels = [str(c) for c in manifest.metadata.get("input_channels") or ["coarse"]]
    tensors = [encode_input(channels, mask[None], None, seed + index) for index, mask in enumerate(coarse)]
    return tensors, {"crops": len(tensors), "crop": held.crop, "test_tiles": sum(len(r) for r in held.records),
                     "test_groups": held.groups, "seed": seed, "coarse": recipe, "channels": channels, "guide": "none (zeros)"}


def refiner_coarse_masks(manifest: ModelManifest, images: np.ndarray) -> tuple[list[np.ndarray], str]:
    """uint8 coarse masks of RGB crops by the refiner's PriorPath training recipe (tissue threshold of its stain,
    opening then closing), and the recipe in words."""
    from training.evaluate import _training_data

    data = _training_data(manifest)
    stain = str(data.get("stain", manifest.metadata.get("stain", "he")))
    coarsening = manifest.metadata.get("coarsening") or {}
    open_size = int(coarsening.get("open_size", data.get("open_size", 5)))
    close_size = int(coarsening.get("close_size", data.get("close_size", 10)))
    masks = [mask_ops.coarsen_mask(mask_ops.tissue_mask(image, stain).astype(bool), open_size, close_size)
             .astype(np.uint8) for image in images]
    return masks, f"coarsen_mask(tissue_mask(crop), open {open_size}, close {close_size})"


def compare(kind: str, manifest: ModelManifest, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    ref, cand = np.concatenate(reference), np.concatenate(candidate)
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    measured: dict[str, float] = {
        "raw_max_abs": float(diff.max()), "raw_mean_abs": float(diff.mean()),
        "raw_p999_abs": float(np.percentile(diff, 99.9)),
    }
    if kind == "renderer":
        spec = RendererSpec.from_metadata(manifest.key, manifest.metadata)
        levels = np.concatenate([
            np.abs(to_uint8_rgb(a, spec.output_range).astype(np.int16) - to_uint8_rgb(b, spec.output_range))
            for a, b in zip(ref, cand, strict=True)
        ])
        measured |= {"image_mean_abs_levels": float(levels.mean()),
                     "image_p999_abs_levels": float(np.percentile(levels, 99.9)),
                     "image_max_abs_levels": float(levels.max()),
                     "image_pixels_changed_fraction": float((levels > 0).mean())}
    else:
        threshold = float(manifest.metadata.get("threshold", 0.0))
        flipped = (ref > threshold) != (cand > threshold)
        measured |= {"mask_flipped_fraction": float(flipped.mean()), "mask_flipped_pixels": int(flipped.sum()),
                     "mask_pixels": int(flipped.size)}
    return measured


def keep_quality(entry: dict[str, Any], recorded: list[dict[str, Any]]) -> dict[str, Any]:
    """``entry`` with the held-back quality check already recorded for the same file, runtime and precision.

    scripts/precision_quality.py adds that check to the entry; re-running this output check must not drop
    it, or a precision whose downstream/FID check failed would be allowed again.
    """
    earlier = [c for c in recorded if (c.get("sha256"), c.get("runtime"), c.get("precision"))
               == (entry["sha256"], entry["runtime"], entry["precision"]) and isinstance(c.get("quality"), dict)]
    if not earlier:
        return entry
    quality = earlier[-1]["quality"]
    return {**entry, "output_passed": entry["passed"], "passed": bool(entry["passed"] and quality.get("passed")),
            "quality": quality, "not_checked": earlier[-1].get("not_checked", entry.get("not_checked"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default=None)
    parser.add_argument("--runtime", default="openvino", choices=("openvino", "onnxruntime"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--count", type=int, default=64, help="held-back crops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--dry-run", action="store_true", help="print the entry, do not record it")
    args = parser.parse_args(argv)

    manifest = ModelStore(args.model_store).get(args.model, args.version)
    kind = "renderer" if manifest.kind == "renderer" else "refiner" if manifest.kind == "refiner" else None
    if kind is None or manifest.format != "onnx":
        raise SystemExit(f"{manifest.key}: kind {manifest.kind!r} / format {manifest.format!r} has no precision "
                         "check here (renderers and refiners in ONNX only)")
    build = renderer_inputs if kind == "renderer" else refiner_inputs
    tensors, inputs = build(manifest, args.data_root, args.count, args.seed)

    reference_rt = create_runtime(manifest, "cpu", RuntimeOptions(intra_op_threads=args.threads))
    candidate_rt = create_runtime(manifest, "cpu", RuntimeOptions(intra_op_threads=args.threads, runtime=args.runtime,
                                                                  precision=args.precision))
    name = manifest.inputs[0].name
    output = manifest.outputs[0].name
    timings: dict[str, float] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for label, runtime in (("reference", reference_rt), ("candidate", candidate_rt)):
        runtime.infer({name: tensors[0]})  # warm-up (first shape compiles)
        started = time.perf_counter()
        outputs[label] = [runtime.infer({name: tensor})[output] for tensor in tensors]
        timings[label] = time.perf_counter() - started
    measured = compare(kind, manifest, outputs["reference"], outputs["candidate"])
    tolerance = TOLERANCES[kind]
    passed = all(measured[key] <= limit for key, limit in tolerance.items())
    entry: dict[str, Any] = {
        "runtime": args.runtime,
        "precision": getattr(candidate_rt, "precision", args.precision),
        "sha256": manifest.sha256,
        "passed": bool(passed),
        "tolerance": tolerance,
        "measured": {key: round(value, 6) if isinstance(value, float) else value for key, value in measured.items()},
        "reference": f"onnxruntime fp32 ({reference_rt.provider})",
        "candidate_provider": candidate_rt.provider,
        "inputs": {"source": f"held-back crops of {args.data_root.name}/ (training.evaluate.held_back / sample_crops), "
                   "encoded as the serving pipeline encodes them", **inputs},
        "seconds": {"reference": round(timings["reference"], 2), "candidate": round(timings["candidate"], 2)},
        "versions": {"openvino": openvino_version(), "onnxruntime": __import__("onnxruntime").__version__},
        "machine": platform.processor() or platform.machine(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "not_checked": "held-back FID/KID and downstream numbers at this precision (training.evaluate / "
        "experiments re-run by their owners); this entry covers output tolerance against fp32 only",
    }
    reference_rt.close()
    candidate_rt.close()
    entry = keep_quality(entry, read_checks(manifest))
    passed = entry["passed"]
    print(json.dumps(entry, indent=2))
    if not args.dry_run:
        path = record_check(manifest, entry)
        print(f"{'PASSED' if passed else 'FAILED'}: recorded in {path.relative_to(ROOT)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
