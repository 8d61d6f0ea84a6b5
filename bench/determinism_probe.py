"""Does a sample's output depend on the batch it is computed in? (DESIGN convention 5)

    python -m bench.determinism_probe [--store model_store] [--architectures] [--output bench/results/determinism.json]

For every refiner/renderer in the model store (and, with ``--architectures``, for the
project's own generator architectures -- training.models' pix2pix U-Net and pix2pixHD global
generator at their config sizes, initial weights, exported with torch; needs the train extra)
it runs 8 samples through the serving OnnxRuntime once one by one and once in batches of
2, 4 and 8, with 1 and 2 intra-op threads, and reports whether the float outputs are
bit-identical and the largest difference. The serving path keeps true batching on a device
only if this holds there; the integration test tests/integration/test_determinism.py pins it.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from services.core.model_store import ModelManifest, ModelStore
from services.core.runtimes.base import RuntimeOptions, TensorSpec
from services.core.runtimes.onnxruntime import OnnxRuntime

SAMPLES = 8
BATCHES = (2, 4, 8)
THREADS = (1, 2)


def probe_model(label: str, path: Path, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                size: int, device: str = "cpu") -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    spec = inputs[0]
    channels = spec.shape[1]
    feeds = rng.standard_normal((SAMPLES, channels, size, size)).astype(spec.numpy_dtype)
    rows = []
    solos: list[np.ndarray] = []
    for threads in THREADS:
        runtime = OnnxRuntime(path, inputs, outputs, device, RuntimeOptions(intra_op_threads=threads))
        name = outputs[0].name
        solo = np.concatenate([runtime.infer({spec.name: feeds[i:i + 1]})[name] for i in range(SAMPLES)])
        solos.append(solo)
        for batch in BATCHES:
            merged = np.concatenate(
                [runtime.infer({spec.name: feeds[i:i + batch]})[name] for i in range(0, SAMPLES, batch)]
            )
            rows.append({
                "model": label, "size": size, "threads": threads, "batch": batch, "provider": runtime.provider,
                "bit_identical": bool(np.array_equal(solo, merged)),
                "max_abs_diff": float(np.abs(solo.astype(np.float64) - merged).max()),
                "differing_fraction": float(np.mean(solo != merged)),
            })
        runtime.close()
    # Not needed for convention 5 (one server keeps its thread count), but worth knowing when
    # replicas are configured differently.
    rows.append({
        "model": label, "size": size, "threads": "1 vs 2", "batch": 1, "provider": "CPUExecutionProvider",
        "bit_identical": bool(np.array_equal(solos[0], solos[-1])),
        "max_abs_diff": float(np.abs(solos[0].astype(np.float64) - solos[-1]).max()),
        "differing_fraction": float(np.mean(solos[0] != solos[-1])),
    })
    return rows


def store_models(root: Path) -> list[ModelManifest]:
    store = ModelStore(root)
    manifests = []
    for name in store.list_models():
        manifest = store.get(name)
        if manifest.kind in ("refiner", "renderer"):
            manifests.append(manifest)
    return manifests


def export_architectures(directory: Path) -> list[tuple[str, Path, tuple[TensorSpec, ...], tuple[TensorSpec, ...], int]]:
    """training.models generators at their config sizes, exported with dynamic batch/H/W."""
    import torch

    from training.models.pix2pixhd_global import GlobalGenerator
    from training.models.unet_refiner import UNetGenerator

    torch.manual_seed(0)
    models = [
        ("unet_refiner(ngf24,7 levels)", UNetGenerator(1, 1, ngf=24, num_downs=7), 1, 256),
        ("pix2pixhd_global(ngf32,3 down,4 blocks)", GlobalGenerator(8, 3, ngf=32, n_downsample=3, n_blocks=4), 8, 256),
    ]
    built = []
    for label, module, channels, size in models:
        path = directory / f"{label.split('(')[0]}.onnx"
        module.eval()
        torch.onnx.export(
            module, (torch.randn(1, channels, 128, 128),), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch", 2: "height", 3: "width"}},
        )
        out_channels = 1 if channels == 1 else 3
        built.append((
            label, path,
            (TensorSpec("x", "float32", ("batch", channels, "height", "width")),),
            (TensorSpec("y", "float32", ("batch", out_channels, "height", "width")),),
            size,
        ))
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--architectures", action="store_true", help="also probe training.models (needs torch)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/determinism.json"))
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    if args.store.is_dir():
        for manifest in store_models(args.store):
            size = int(manifest.metadata.get("tile_size", 256))
            rows += probe_model(manifest.key, manifest.path, manifest.inputs, manifest.outputs, size)
    if args.architectures:
        with tempfile.TemporaryDirectory() as tmp:
            for label, path, inputs, outputs, size in export_architectures(Path(tmp)):
                rows += probe_model(label, path, inputs, outputs, size)
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "onnxruntime": onnxruntime.__version__,
        "machine": platform.processor() or platform.machine(),
        "all_bit_identical": all(row["bit_identical"] for row in rows),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    for row in rows:
        print(f"{row['model']:45s} {row['size']:4d}px threads={row['threads']!s:6s} batch={row['batch']} "
              f"identical={row['bit_identical']} max|diff|={row['max_abs_diff']:.3g}")
    print(f"all bit-identical: {report['all_bit_identical']}  -> {args.output}")


if __name__ == "__main__":
    main()
