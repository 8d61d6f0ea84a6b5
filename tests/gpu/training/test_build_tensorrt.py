"""TensorRT FP16 engine build from an exported ONNX (GPU machines with the tensorrt package only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from training.export import build_tensorrt  # noqa: E402
from training.export.onnx_export import export_to_model_store  # noqa: E402
from training.models.pix2pixhd_global import GlobalGenerator  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.torch]


def test_engine_built_next_to_onnx_with_tensorrt_manifest(tmp_path: Path) -> None:
    reason = build_tensorrt.tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    axes = {"label": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "height", 3: "width"}}
    onnx_dir = export_to_model_store(
        GlobalGenerator(in_channels=5, ngf=8, n_downsample=2, n_blocks=1), (torch.zeros(1, 5, 64, 64),),
        name="tiny-renderer", version=1, kind="test", input_names=["label"], output_names=["image"],
        dynamic_axes=axes, metadata={}, store_root=tmp_path, parity_sizes=[(64, 64), (48, 80)],
        provenance={"training_commit": "test", "config": {}, "seed": 0, "data": [], "steps": 0,
                    "train_seconds": 0.0, "hardware": "test"},
    )
    assert build_tensorrt.main(["--model-dir", str(onnx_dir), "--opt-size", "64", "--max-size", "128",
                                "--min-size", "32"]) == 0
    manifest = yaml.safe_load((tmp_path / "tiny-renderer" / "2" / "manifest.yaml").read_text())
    assert manifest["format"] == "tensorrt_plan" and manifest["file"] == "model.plan"
    assert manifest["metrics"]["tensorrt_parity_max_abs"] < 0.05
