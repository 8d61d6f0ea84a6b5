"""Runtimes with real models: ONNX Runtime on the tiny ONNX model, TorchScript on a scripted module."""

from __future__ import annotations

import dataclasses
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from services.core.errors import InvalidInputError
from services.core.model_store import ModelStore
from services.core.runtimes.base import (
    ModelLoadError,
    Runtime,
    RuntimeOptions,
    TensorSpec,
    parse_device,
    validate_feeds,
)
from services.core.runtimes.onnxruntime import OnnxRuntime, provider_list
from services.core.runtimes.registry import RUNTIMES, create_runtime
from services.core.runtimes.tensorrt import TensorRTRuntime
from tests.fixtures.tiny_model import tiny_model_expected

RNG_SEED = 0


def _random_input(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(RNG_SEED).standard_normal(shape, dtype=np.float32)


# ------------------------------------------------------------------------- base
def test_tensor_spec_rejects_bad_dtype_and_dims() -> None:
    assert TensorSpec("x", "float32", ["batch", 3]).shape == ("batch", 3)  # type: ignore[arg-type]
    assert TensorSpec("x", "float32", ("batch", 3, "h")).describe() == "float32[batch, 3, h]"
    with pytest.raises(ValueError, match="unknown dtype 'float'"):
        TensorSpec("x", "float", ("batch",))
    with pytest.raises(ValueError, match="shape entry 0"):
        TensorSpec("x", "float32", ("batch", 0))
    with pytest.raises(ValueError, match="shape entry True"):
        TensorSpec("x", "float32", ("batch", True))  # type: ignore[arg-type]


def test_parse_device() -> None:
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("cuda:1") == ("cuda", 1)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        parse_device("gpu0")


SPECS = (
    TensorSpec("label", "float32", ("batch", 7, "height", "width")),
    TensorSpec("noise", "float32", ("batch", 1, "height", "width")),
)


def test_validate_feeds_accepts_matching_feeds_and_resolves_axes() -> None:
    feeds = {"label": np.zeros((2, 7, 4, 5), np.float32), "noise": np.zeros((2, 1, 4, 5), np.float32)}
    assert validate_feeds(feeds, SPECS) == {"batch": 2, "height": 4, "width": 5}


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"label": np.zeros((2, 7, 4, 5), np.float32)}, r"missing \['noise'\]"),
        (
            {
                "label": np.zeros((2, 7, 4, 5), np.float32),
                "noise": np.zeros((2, 1, 4, 5), np.float32),
                "seed": np.zeros(2, np.int64),
            },
            r"unexpected \['seed'\]",
        ),
        (
            {"label": np.zeros((2, 7, 4, 5), np.float64), "noise": np.zeros((2, 1, 4, 5), np.float32)},
            r"'label' has dtype float64, model expects float32",
        ),
        (
            {"label": np.zeros((7, 4, 5), np.float32), "noise": np.zeros((2, 1, 4, 5), np.float32)},
            r"'label' has shape \[7, 4, 5\] \(rank 3\)",
        ),
        (
            {"label": np.zeros((2, 6, 4, 5), np.float32), "noise": np.zeros((2, 1, 4, 5), np.float32)},
            r"'label' has size 6 on axis 1, model expects 7",
        ),
        (
            {"label": np.zeros((2, 7, 4, 5), np.float32), "noise": np.zeros((3, 1, 4, 5), np.float32)},
            r"axis 'batch' is 3 in input 'noise' but 2 in input 'label'",
        ),
        (
            {"label": [[0.0]], "noise": np.zeros((2, 1, 4, 5), np.float32)},
            r"'label' must be a numpy array, got list",
        ),
        (
            {"label": np.zeros((0, 7, 4, 5), np.float32), "noise": np.zeros((0, 1, 4, 5), np.float32)},
            r"empty axis 0",
        ),
    ],
)
def test_validate_feeds_names_the_problem(feeds, message) -> None:
    with pytest.raises(InvalidInputError, match=message) as raised:
        validate_feeds(feeds, SPECS)
    assert raised.value.status == "INVALID_ARGUMENT"


# ------------------------------------------------------------------ onnxruntime
def test_onnx_runtime_real_inference_at_two_sizes(tiny_model_store: Path) -> None:
    manifest = ModelStore(tiny_model_store).get("tiny")
    runtime = create_runtime(manifest, "cpu", RuntimeOptions(intra_op_threads=1))
    try:
        assert isinstance(runtime, OnnxRuntime) and isinstance(runtime, Runtime)
        assert runtime.device == "cpu"
        assert runtime.provider == "CPUExecutionProvider"
        assert runtime.inputs == manifest.inputs and runtime.outputs == manifest.outputs
        for shape in ((1, 3, 8, 8), (4, 3, 17, 31)):
            x = _random_input(shape)
            result = runtime.infer({"x": x})
            assert set(result) == {"y"}
            assert result["y"].shape == shape and result["y"].dtype == np.float32
            np.testing.assert_allclose(result["y"], tiny_model_expected(x), rtol=0, atol=1e-6)
    finally:
        runtime.close()


def test_onnx_runtime_reports_cpu_when_cuda_is_not_usable(tiny_model_store: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA; the fallback is covered on CPU-only builds")
    runtime = create_runtime(ModelStore(tiny_model_store).get("tiny"), "cuda:0")
    assert runtime.device == "cpu"
    assert runtime.provider == "CPUExecutionProvider"
    x = _random_input((2, 3, 4, 4))
    np.testing.assert_allclose(runtime.infer({"x": x})["y"], tiny_model_expected(x), atol=1e-6)


def test_provider_list_orders_accelerators_before_cpu() -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_list("cpu", RuntimeOptions(), available) == [("CPUExecutionProvider", {})]
    assert [name for name, _ in provider_list("cuda:1", RuntimeOptions(), available)] == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with_trt = provider_list(
        "cuda:1", RuntimeOptions(use_tensorrt_provider=True, tensorrt_cache_dir=Path("/cache")), available
    )
    assert [name for name, _ in with_trt] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert with_trt[0][1]["device_id"] == "1" and with_trt[0][1]["trt_engine_cache_path"] == "/cache"
    assert provider_list("cuda:0", RuntimeOptions(), ["CPUExecutionProvider"]) == [("CPUExecutionProvider", {})]


def test_onnx_runtime_validates_feeds(tiny_model_store: Path) -> None:
    runtime = create_runtime(ModelStore(tiny_model_store).get("tiny"))
    with pytest.raises(InvalidInputError, match="size 4 on axis 1, model expects 3"):
        runtime.infer({"x": np.zeros((1, 4, 8, 8), np.float32)})


def test_onnx_runtime_is_usable_from_threads(tiny_model_store: Path) -> None:
    runtime = create_runtime(ModelStore(tiny_model_store).get("tiny"))
    inputs = [_random_input((1 + index % 3, 3, 8 + index, 8)) for index in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda x: runtime.infer({"x": x})["y"], inputs))
    for x, y in zip(inputs, results, strict=True):
        np.testing.assert_allclose(y, tiny_model_expected(x), atol=1e-6)


def test_closed_runtime_refuses_calls(tiny_model_store: Path) -> None:
    runtime = create_runtime(ModelStore(tiny_model_store).get("tiny"))
    runtime.close()
    runtime.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        runtime.infer({"x": np.zeros((1, 3, 2, 2), np.float32)})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TensorSpec("x", "float32", ("batch", 4, "height", "width")), r"has shape \[batch, 3, height, width\]"),
        (TensorSpec("x", "int64", ("batch", 3, "height", "width")), r"is float32 in the model"),
        (TensorSpec("image", "float32", ("batch", 3, "height", "width")), r"model inputs are \['x'\]"),
        (TensorSpec("x", "float32", ("batch", 3, "height")), r"has shape \[batch, 3, height, width\]"),
    ],
)
def test_onnx_runtime_refuses_manifest_that_disagrees_with_model(
    tiny_model_store: Path, spec: TensorSpec, message: str
) -> None:
    manifest = dataclasses.replace(ModelStore(tiny_model_store).get("tiny"), inputs=(spec,))
    with pytest.raises(ModelLoadError, match=message):
        create_runtime(manifest)


def test_onnx_runtime_refuses_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="ONNX Runtime could not load"):
        OnnxRuntime(model_path, (TensorSpec("x", "float32", ("batch",)),), (TensorSpec("y", "float32", ("batch",)),))


# --------------------------------------------------------------------- registry
def test_registry_names_every_format() -> None:
    assert set(RUNTIMES) == {"onnx", "torchscript", "tensorrt_plan"}


def test_registry_unknown_format_lists_valid_ones(tiny_model_store: Path) -> None:
    manifest = dataclasses.replace(ModelStore(tiny_model_store).get("tiny"), format="savedmodel")
    with pytest.raises(ModelLoadError, match=r"unknown model format 'savedmodel'; valid formats: onnx, torchscript, tensorrt_plan"):
        create_runtime(manifest)


# --------------------------------------------------------------------- tensorrt
def test_tensorrt_runtime_refuses_cpu(tmp_path: Path) -> None:
    spec = (TensorSpec("x", "float32", ("batch",)),)
    with pytest.raises(ModelLoadError, match="runs only on a CUDA device, not 'cpu'"):
        TensorRTRuntime(tmp_path / "model.plan", spec, spec, "cpu")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_runtime_without_tensorrt_says_what_is_missing(tmp_path: Path) -> None:
    spec = (TensorSpec("x", "float32", ("batch",)),)
    with pytest.raises(ModelLoadError, match="needs the tensorrt Python package"):
        TensorRTRuntime(tmp_path / "model.plan", spec, spec, "cuda:0")


# ------------------------------------------------------------------------ torch
# torch 2.13 marks TorchScript deprecated; the runtime still serves existing exports.
ignore_torchscript_deprecation = pytest.mark.filterwarnings(
    "ignore:`torch.jit.*` is deprecated:DeprecationWarning"
)


@pytest.mark.torch
@ignore_torchscript_deprecation
@pytest.mark.parametrize("module_name", ["AffineTensor", "AffineDict"])
def test_torch_runtime_real_inference(tmp_path: Path, module_name: str) -> None:
    pytest.importorskip("torch")
    from tests.fixtures import tiny_torchscript

    tiny_torchscript.write_tiny_torchscript(tmp_path, getattr(tiny_torchscript, module_name)())
    runtime = create_runtime(ModelStore(tmp_path).get("tiny-ts"), "cpu", RuntimeOptions())
    try:
        assert runtime.device == "cpu" and runtime.provider == "torchscript-cpu"
        x = _random_input((3, 3, 6, 9))
        x.setflags(write=False)  # read-only buffers (e.g. from np.frombuffer) must work too
        result = runtime.infer({"x": x})
        np.testing.assert_allclose(result["y"], tiny_model_expected(x), atol=1e-6)
        with pytest.raises(InvalidInputError):
            runtime.infer({"x": x.astype(np.float64)})
    finally:
        runtime.close()


@pytest.mark.torch
@ignore_torchscript_deprecation
def test_torch_runtime_reports_cpu_when_cuda_is_missing(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the fallback only happens without it")
    from tests.fixtures import tiny_torchscript

    tiny_torchscript.write_tiny_torchscript(tmp_path, tiny_torchscript.AffineTensor())
    runtime = create_runtime(ModelStore(tmp_path).get("tiny-ts"), "cuda:0")
    assert runtime.device == "cpu" and runtime.provider == "torchscript-cpu"


@pytest.mark.torch
@ignore_torchscript_deprecation
def test_torch_runtime_refuses_a_file_that_is_not_torchscript(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from services.core.runtimes.torch import TorchRuntime

    model_path = tmp_path / "model.pt"
    model_path.write_bytes(b"not a model")
    spec = (TensorSpec("x", "float32", ("batch",)),)
    with pytest.raises(ModelLoadError, match="torch.jit.load could not load"):
        TorchRuntime(model_path, spec, spec)

