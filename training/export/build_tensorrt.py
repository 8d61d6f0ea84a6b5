"""Build a TensorRT FP16 engine from a model_store ONNX version: `python -m training.export.build_tensorrt
--model-dir model_store/<name>/<version> [--out-version N] [--max-size 1024] [--opt-size 256]`.

Writes model_store/<name>/<N>/{model.plan, manifest.yaml (format: tensorrt_plan), MODEL_CARD.md} where N defaults
to the next free version. The engine is tied to the GPU model and TensorRT version it was built with (recorded in
metadata.tensorrt), so build it on the serving GPU. Parity: the engine's output is compared with ONNX Runtime (CPU)
on the same random input at the optimisation shape and reported in metrics; above --atol the build fails.
Without the `tensorrt` package or a CUDA device this exits 0 with "skipped: no GPU/TensorRT" (PyPI's tensorrt wheel
cannot be installed on the CPU machines; see PERF-NOTES).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.core.model_store import file_sha256
from training.export.onnx_export import utc_now

SKIP_MESSAGE = "skipped: no GPU/TensorRT"


def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed"
    try:
        import torch
    except ImportError:
        return "torch (used for CUDA buffers) is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _profile_shapes(spec: dict[str, Any], max_batch: int, opt_size: int, max_size: int,
                    min_size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes for one NCHW input with named dynamic axes batch/height/width."""
    shapes = []
    for batch, size in ((1, min_size), (max(1, max_batch // 2), opt_size), (max_batch, max_size)):
        dims = []
        for axis, dim in enumerate(spec["shape"]):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(batch)
            else:
                dims.append(size)
        shapes.append(tuple(dims))
    return shapes[0], shapes[1], shapes[2]


def build_engine(onnx_path: Path, manifest: dict[str, Any], opt_size: int, max_size: int,
                 min_size: int) -> tuple[bytes, dict[str, Any]]:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profiles = {}
    for spec in manifest["inputs"]:
        lo, opt, hi = _profile_shapes(spec, int(manifest["max_batch_size"]), opt_size, max_size, min_size)
        profile.set_shape(spec["name"], lo, opt, hi)
        profiles[spec["name"]] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT engine build failed for {onnx_path}")
    return bytes(engine), profiles


def engine_parity(plan: bytes, onnx_path: Path, manifest: dict[str, Any], profiles: dict[str, Any],
                  seed: int = 0) -> tuple[float, float]:
    """(max abs, mean abs) of engine output vs ONNX Runtime CPU at the profile's opt shape."""
    import onnxruntime as ort
    import tensorrt as trt
    import torch

    rng = np.random.default_rng(seed)
    feeds = {spec["name"]: rng.uniform(-1, 1, profiles[spec["name"]]["opt"]).astype(np.float32)
             for spec in manifest["inputs"]}
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    buffers = {}
    for name, array in feeds.items():
        buffers[name] = torch.from_numpy(array).cuda()
        context.set_input_shape(name, array.shape)
        context.set_tensor_address(name, buffers[name].data_ptr())
    out_name = manifest["outputs"][0]["name"]
    out = torch.empty(tuple(context.get_tensor_shape(out_name)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(out_name, out.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    err = np.abs(out.cpu().numpy() - reference)
    return float(err.max()), float(err.mean())


def next_version(model_root: Path) -> str:
    versions = [int(p.name) for p in model_root.iterdir() if p.is_dir() and p.name.isdigit()]
    return str(max(versions, default=0) + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True, type=Path, help="model_store/<name>/<version> holding an ONNX")
    parser.add_argument("--out-version", default=None, help="version directory to write (default: next free)")
    parser.add_argument("--opt-size", type=int, default=256, help="H=W the engine is tuned for")
    parser.add_argument("--max-size", type=int, default=1024, help="largest H/W the engine accepts")
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--atol", type=float, default=0.05, help="FP16 engine vs fp32 ONNX Runtime tolerance")
    args = parser.parse_args(argv)

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        print(f"{SKIP_MESSAGE} ({reason}); nothing written")
        return 0

    import tensorrt as trt
    import torch

    source = yaml.safe_load((args.model_dir / "manifest.yaml").read_text())
    if source["format"] != "onnx":
        raise SystemExit(f"{args.model_dir}: format is {source['format']!r}, need an onnx version to build from")
    onnx_path = args.model_dir / source["file"]
    plan, profiles = build_engine(onnx_path, source, args.opt_size, args.max_size, args.min_size)
    max_abs, mean_abs = engine_parity(plan, onnx_path, source, profiles)
    if max_abs > args.atol:
        raise SystemExit(f"TensorRT FP16 engine differs from ONNX Runtime by {max_abs:.3g} > atol {args.atol}")

    model_root = args.model_dir.parent
    version = args.out_version or next_version(model_root)
    final_dir = model_root / version
    if final_dir.exists():
        raise SystemExit(f"{final_dir} already exists; pass another --out-version")
    work_dir = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=model_root))
    try:
        (work_dir / "model.plan").write_bytes(plan)
        manifest = {
            **source,
            "version": version,
            "format": "tensorrt_plan",
            "file": "model.plan",
            "sha256": file_sha256(work_dir / "model.plan"),
            "metadata": {**source["metadata"], "tensorrt": {
                "precision": "fp16", "tensorrt_version": trt.__version__,
                "device": torch.cuda.get_device_name(0), "profiles": profiles,
                "built_from": f"{source['name']}/{source['version']}", "built_from_sha256": source["sha256"]}},
            "provenance": {**source["provenance"], "created": utc_now()},
            "metrics": {**source["metrics"], "tensorrt_parity_max_abs": max_abs, "tensorrt_parity_mean_abs": mean_abs},
        }
        (work_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False, width=120))
        card = args.model_dir / "MODEL_CARD.md"
        if card.is_file():
            note = (f"\n## TensorRT engine (version {version})\n\nFP16 engine built from version {source['version']} "
                    f"with TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}; profiles {profiles}; "
                    f"max abs error vs ONNX Runtime fp32 {max_abs:.3g} (mean {mean_abs:.3g}).\n")
            (work_dir / "MODEL_CARD.md").write_text(card.read_text() + note)
        for extra in ("samples.png",):
            if (args.model_dir / extra).is_file():
                shutil.copy2(args.model_dir / extra, work_dir / extra)
        work_dir.chmod(0o755)
        work_dir.rename(final_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    print(f"built {final_dir / 'model.plan'} (max abs error vs ONNX {max_abs:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
