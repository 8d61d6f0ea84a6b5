"""bench.bench_serving helpers: the FLOP counter against hand-counted MACs, and the closed-loop driver."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.bench_serving import closed_loop, conv_flops, summarize


def write_conv_model(path: Path) -> None:
    """Reflect pad -> Conv 3x3 stride 2 (4 -> 8 ch) -> ConvTranspose 3x3 stride 2 (8 -> 2 ch).

    The pad's amounts are a runtime tensor, as in the exported renderers, so static shape
    inference alone cannot size the convolutions.
    """
    rng = np.random.default_rng(0)
    conv_w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    deconv_w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "zero_index"], ["batch"], axis=0),
        helper.make_node("Sub", ["batch", "batch"], ["pad_zero"]),
        helper.make_node("Add", ["pads_const", "pad_zero"], ["pads"]),
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "conv_w"], ["down"], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["down", "deconv_w"], ["y"], strides=[2, 2], pads=[1, 1, 0, 0],
                         output_padding=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "conv_pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "out_height", "out_width"])],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(deconv_w, "deconv_w"),
            numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_const"),
            numpy_helper.from_array(np.array(0, np.int64), "zero_index"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_conv_flops_counts_conv_and_convtranspose_macs(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    write_conv_model(path)
    flops = conv_flops(path, "x", (1, 4, 16, 32))
    # Conv: padded 18x34 -> 8x16 outputs, each 4*3*3 MACs per output channel (8).
    conv_macs = 8 * 8 * 16 * 4 * 9
    # ConvTranspose: every input element (8 ch, 8x16) scatters into 2 channels x 3x3 taps.
    deconv_macs = 8 * 8 * 16 * 2 * 9
    assert flops["conv_gflop"] == round(2 * conv_macs / 1e9, 2)
    assert flops["convtranspose_gflop"] == round(2 * deconv_macs / 1e9, 2)
    # Large enough at 1024x2048 to check the exact scale (FLOPs grow with the pixel count).
    big = conv_flops(path, "x", (1, 4, 1024, 2048))
    assert big["total_gflop"] == round(2 * (conv_macs + deconv_macs) * 4096 / 1e9, 2)


def test_closed_loop_keeps_concurrency_clients_busy() -> None:
    active, peak = 0, 0
    lock = threading.Lock()

    def call() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.01)
        with lock:
            active -= 1

    latencies, seconds = closed_loop(call, concurrency=4, duration_s=0.1)
    assert peak == 4
    assert len(latencies) >= 4 * 5  # ~10 calls per client in 0.1 s; allow a slow, shared host
    assert 0.1 <= seconds < 2.0
    summary = summarize(latencies)
    assert 10.0 <= summary["p50"] <= summary["p95"] <= summary["p99"]
