"""Runtimes on a CUDA GPU: native TensorRT engines and ONNX Runtime's CUDA provider.

Marked ``gpu`` (excluded by default, run with ``-m gpu``) and skipped cleanly where
CUDA, tensorrt or onnxruntime-gpu is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from services.core.model_store import ModelStore
from services.core.runtimes.registry import create_runtime
from tests.fixtures.tiny_model import (
    build_tiny_onnx,
    manifest_dict,
    sha256_of,
    tiny_model_expected,
    write_manifest,
)

pytestmark = pytest.mark.gpu


def _cuda_device_count() -> int:
    if importlib.util.find_spec("cuda") is None:
        return 0
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef]
    error, count = cudart.cudaGetDeviceCount()
    return count if error == cudart.cudaError_t.cudaSuccess else 0


def _build_plan(onnx_path: Path, plan_path: Path, max_batch: int) -> None:
    """Build a TensorRT engine for the tiny model with a profile covering batch 1..max_batch, 8..64 px."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 3, 8, 8), (max_batch, 3, 32, 32), (max_batch, 3, 64, 64))
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed")
    plan_path.write_bytes(bytes(serialized))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt not installed")
def test_tensorrt_plan_real_inference(tmp_path: Path) -> None:
    if _cuda_device_count() == 0:
        pytest.skip("no CUDA device visible (or cuda-python missing)")
    import onnx

    version_dir = tmp_path / "tiny-trt" / "1"
    version_dir.mkdir(parents=True)
    onnx_path = tmp_path / "tiny.onnx"
    onnx.save(build_tiny_onnx(), str(onnx_path))
    plan_path = version_dir / "model.plan"
    _build_plan(onnx_path, plan_path, max_batch=4)
    write_manifest(
        version_dir,
        manifest_dict("tiny-trt", "1", sha256_of(plan_path), file="model.plan",
                      model_format="tensorrt_plan", max_batch_size=4),
    )
    runtime = create_runtime(ModelStore(tmp_path).get("tiny-trt"), "cuda:0")
    try:
        assert runtime.device == "cuda:0" and runtime.provider.startswith("tensorrt-")
        for shape in ((1, 3, 8, 8), (4, 3, 40, 24), (2, 3, 16, 16)):  # grows, then reuses buffers
            x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
            np.testing.assert_allclose(runtime.infer({"x": x})["y"], tiny_model_expected(x), atol=1e-5)
    finally:
        runtime.close()


def test_onnx_runtime_uses_cuda_provider(tiny_model_store: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime build without CUDAExecutionProvider (install onnxruntime-gpu)")
    runtime = create_runtime(ModelStore(tiny_model_store).get("tiny"), "cuda:0")
    # onnxruntime-gpu falls back to CPU when CUDA libraries are missing; the runtime must say so.
    if runtime.provider == "CPUExecutionProvider":
        assert runtime.device == "cpu"
        pytest.skip("CUDA provider listed but unusable here; runtime correctly reported CPU")
    assert runtime.device == "cuda:0" and runtime.provider == "CUDAExecutionProvider"
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(runtime.infer({"x": x})["y"], tiny_model_expected(x), atol=1e-5)
