"""Fixtures shared by the core serving tests: a real tiny ONNX model run by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.core.runtimes.base import RuntimeOptions, TensorSpec
from services.core.runtimes.onnxruntime import OnnxRuntime

TILE = 8
INPUT_SPEC = TensorSpec("image", "float32", ("batch", 1, TILE, TILE))
OUTPUT_SPEC = TensorSpec("features", "float32", ("batch", 2, TILE, TILE))


def build_tiny_conv_model(path: Path, seed: int = 0) -> Path:
    """image[b,1,8,8] -> conv3x3(1->4) -> relu -> conv1x1(4->2) -> features[b,2,8,8].

    Per-sample (no op mixes the batch axis), so a sample's output must not depend on
    which batch it is computed in: what the batcher tests check.
    """
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["features"]),
        ],
        "tiny_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, TILE, TILE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 2, TILE, TILE])],
        initializer=[w1, b1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime we support
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_conv_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_conv_model(tmp_path_factory.mktemp("models") / "tiny_conv.onnx")


def make_onnx_runtime(model_path: Path, device: str = "cpu") -> OnnxRuntime:
    # One intra-op thread per instance: several instances share the few CI cores.
    return OnnxRuntime(model_path, (INPUT_SPEC,), (OUTPUT_SPEC,), device, RuntimeOptions(intra_op_threads=1))
