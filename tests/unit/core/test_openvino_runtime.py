"""OpenVINO runtime on the shipped ONNX files: parity with ONNX Runtime, batch invariance and determinism
per precision, the precision-check gate, and engine/precision selection.

Real models (model_store/mask-refiner, the latest version) at small sizes; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from services.core.model_store import ModelStore
from services.core.runtimes.base import ModelLoadError, RuntimeOptions
from services.core.runtimes.onnxruntime import OnnxRuntime
from services.core.runtimes.registry import create_runtime
from services.core.runtimes.selection import (
    CHECKS_FILE,
    Choice,
    RuntimeSelection,
    parse_choice,
    passing_check,
    require_precision_check,
)
from services.model_host import HostSettings, ModelHost

pytest.importorskip("openvino")

REPO_ROOT = Path(__file__).resolve().parents[3]
SHIPPED = REPO_ROOT / "model_store"
REFINER = "mask-refiner"
SIZE = 128  # the refiner's size_multiple: the smallest field it runs on
# Stated tolerances (the precision check's, scripts/check_precision.py): fp32 engines agree to float
# rounding; bf16 may flip at most 0.1 % of thresholded mask pixels.
FP32_ATOL = 1e-4
BF16_MAX_FLIPPED = 0.001


@pytest.fixture(scope="module")
def manifest():  # noqa: ANN201 - ModelManifest
    return ModelStore(SHIPPED).get(REFINER)


@pytest.fixture(scope="module")
def inputs(manifest) -> np.ndarray:  # noqa: ANN001
    """8 rows of the refiner's own encoding: {-1, +1} coarse blobs, zero guide, N(0, 1) noise."""
    rng = np.random.default_rng(0)
    channels = manifest.inputs[0].shape[1]
    blobs = np.kron(rng.random((8, 1, SIZE // 16, SIZE // 16)) < 0.6, np.ones((16, 16))).astype(np.float32)
    rows = [np.where(blobs != 0, np.float32(1.0), np.float32(-1.0))]
    if channels > 1:
        rows.append(np.zeros_like(rows[0]))
    if channels > 2:
        rows.append(rng.standard_normal(rows[0].shape, dtype=np.float32))
    return np.concatenate(rows, axis=1)


@pytest.fixture(scope="module")
def reference(manifest, inputs) -> np.ndarray:  # noqa: ANN001
    runtime = OnnxRuntime(manifest.path, manifest.inputs, manifest.outputs, "cpu", RuntimeOptions(intra_op_threads=1))
    try:
        return runtime.infer({manifest.inputs[0].name: inputs})[manifest.outputs[0].name]
    finally:
        runtime.close()


def openvino(manifest, precision: str, threads: int = 1):  # noqa: ANN001, ANN201
    options = RuntimeOptions(intra_op_threads=threads, runtime="openvino", precision=precision)
    return create_runtime(manifest, "cpu", options)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def ov_runtime(request, manifest):  # noqa: ANN001, ANN201
    runtime = openvino(manifest, request.param)
    yield runtime
    runtime.close()


def run(runtime, manifest, batch: np.ndarray) -> np.ndarray:  # noqa: ANN001
    return runtime.infer({manifest.inputs[0].name: batch})[manifest.outputs[0].name]


# ----------------------------------------------------------------------- runtime
def test_reports_engine_precision_and_threads(ov_runtime) -> None:  # noqa: ANN001
    assert ov_runtime.device == "cpu"
    assert ov_runtime.provider.startswith("openvino-") and ov_runtime.provider.endswith(f"-CPU-{ov_runtime.precision}")
    assert ov_runtime.precision in ("fp32", "bf16")
    assert ov_runtime.threads == 1


def test_fp32_matches_onnxruntime(manifest, inputs, reference) -> None:  # noqa: ANN001
    runtime = openvino(manifest, "fp32")
    try:
        assert runtime.precision == "fp32"  # asked explicitly: this CPU's AMX would otherwise pick bf16
        output = run(runtime, manifest, inputs)
    finally:
        runtime.close()
    assert output.shape == reference.shape and output.dtype == np.float32
    np.testing.assert_allclose(output, reference, atol=FP32_ATOL, rtol=0)


def test_bf16_within_the_stated_tolerance(manifest, inputs, reference) -> None:  # noqa: ANN001
    runtime = openvino(manifest, "bf16")
    try:
        output = run(runtime, manifest, inputs)
    finally:
        runtime.close()
    flipped = ((output > 0) != (reference > 0)).mean()
    assert flipped <= BF16_MAX_FLIPPED
    assert np.abs(output - reference).mean() < 0.01
    assert not np.array_equal(output, reference)  # it really ran at a lower precision


@pytest.mark.parametrize("batch", [2, 4, 8])
def test_rows_bit_identical_whatever_the_batch(ov_runtime, manifest, inputs, batch: int) -> None:  # noqa: ANN001
    alone = np.concatenate([run(ov_runtime, manifest, inputs[row:row + 1]) for row in range(batch)])
    together = run(ov_runtime, manifest, inputs[:batch])
    assert np.array_equal(alone, together)
    # A row's position in the batch does not matter either.
    assert np.array_equal(run(ov_runtime, manifest, inputs[batch - 1::-1][:batch]), together[::-1])


def test_repeat_calls_and_threads_are_deterministic(ov_runtime, manifest, inputs) -> None:  # noqa: ANN001
    first = run(ov_runtime, manifest, inputs[:4])
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: run(ov_runtime, manifest, inputs[:4]), range(6)))
    assert all(np.array_equal(first, result) for result in results)


def test_other_sizes_run_dynamic_shapes(ov_runtime, manifest, inputs) -> None:  # noqa: ANN001
    wide = np.concatenate([inputs[:1], inputs[1:2]], axis=-1)  # 128 x 256
    assert run(ov_runtime, manifest, wide).shape == (1, manifest.outputs[0].shape[1], SIZE, 2 * SIZE)


def test_validates_feeds_and_refuses_gpu_and_unknown_precision(manifest, inputs) -> None:  # noqa: ANN001
    runtime = openvino(manifest, "fp32")
    try:
        with pytest.raises(Exception, match="dtype float64"):
            runtime.infer({manifest.inputs[0].name: inputs.astype(np.float64)})
    finally:
        runtime.close()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.infer({manifest.inputs[0].name: inputs[:1]})
    with pytest.raises(ModelLoadError, match="CPU only"):
        create_runtime(manifest, "cuda:0", RuntimeOptions(runtime="openvino"))
    with pytest.raises(ModelLoadError, match="fp32 only"):
        create_runtime(manifest, "cpu", RuntimeOptions(precision="bf16"))  # ONNX Runtime
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        RuntimeOptions(precision="int4")
    with pytest.raises(ModelLoadError, match="unknown runtime 'tvm'"):
        create_runtime(manifest, "cpu", RuntimeOptions(runtime="tvm"))


# ----------------------------------------------------------------------- selection
def test_parse_choice() -> None:
    choice = parse_choice("openvino, mask-refiner=onnxruntime ,renderer-x=AUTO", ("onnxruntime", "openvino", "auto"), "V")
    assert choice == Choice("openvino", (("mask-refiner", "onnxruntime"), ("renderer-x", "auto")))
    assert choice.for_model("mask-refiner") == "onnxruntime" and choice.for_model("other") == "openvino"
    assert parse_choice(None, ("fp32",), "V") == Choice() and parse_choice(" ", ("fp32",), "V") == Choice()
    with pytest.raises(ValueError, match="V: 'fp16' in 'm=fp16' is not one of fp32, bf16"):
        parse_choice("m=fp16", ("fp32", "bf16"), "V")
    with pytest.raises(ValueError, match="two defaults"):
        parse_choice("fp32,bf16", ("fp32", "bf16"), "V")


def test_resolution_order(manifest) -> None:  # noqa: ANN001
    serving = dataclasses.replace(manifest, metadata={**manifest.metadata, "serving": {"runtime": "openvino",
                                                                                       "precision": "bf16"}})
    assert RuntimeSelection().resolve(manifest) == ("onnxruntime", "fp32")  # the portable default
    assert RuntimeSelection().resolve(serving) == ("openvino", "bf16")  # the manifest's preference
    assert RuntimeSelection.from_settings("onnxruntime", "fp32").resolve(serving) == ("onnxruntime", "fp32")
    chosen = RuntimeSelection.from_settings("onnxruntime,mask-refiner=openvino", "mask-refiner=bf16")
    assert chosen.resolve(manifest) == ("openvino", "bf16")
    assert RuntimeSelection.from_settings("auto", None).resolve(manifest) == ("openvino", "fp32")


# ----------------------------------------------------------------------- the gate
@pytest.fixture
def store_copy(tmp_path: Path, manifest) -> Path:  # noqa: ANN001
    """The refiner's version directory copied (with its recorded precision checks) into a store of its own."""
    target = tmp_path / "model_store" / REFINER / manifest.version
    shutil.copytree(manifest.directory, target)
    return tmp_path / "model_store"


async def host_with(store: Path, precision: str) -> ModelHost:
    settings = HostSettings(selection=RuntimeSelection.from_settings("openvino", precision),
                            runtime_options=RuntimeOptions(intra_op_threads=1))
    host = ModelHost(ModelStore(store), ["refiner"], settings)
    await host.start()
    return host


async def test_bf16_loads_with_its_recorded_check_and_reports_it(store_copy: Path, manifest) -> None:  # noqa: ANN001
    check = passing_check(manifest, "openvino", "bf16")
    assert check is not None, f"{manifest.key} ships a passing openvino/bf16 check"
    assert check["sha256"] == manifest.sha256 and check["tolerance"] and check["measured"]
    assert check["measured"]["mask_flipped_fraction"] <= check["tolerance"]["mask_flipped_fraction"]
    host = await host_with(store_copy, "bf16")
    try:
        served = await host.get(REFINER)
        [info] = served.pool.instances
        assert info.precision == "bf16" and info.provider.startswith("openvino-") and host.serving
    finally:
        await host.stop()


async def test_bf16_without_a_check_does_not_load(store_copy: Path, manifest) -> None:  # noqa: ANN001
    (store_copy / REFINER / manifest.version / CHECKS_FILE).unlink()
    host = await host_with(store_copy, "bf16")
    try:
        assert not host.serving
        assert "no passing precision check" in host.readiness_problems[REFINER]
        assert "scripts/check_precision.py --model mask-refiner" in host.readiness_problems[REFINER]
    finally:
        await host.stop()


def test_a_check_of_another_file_or_a_failed_check_does_not_count(store_copy: Path, manifest) -> None:  # noqa: ANN001
    path = store_copy / REFINER / manifest.version / CHECKS_FILE
    copy = dataclasses.replace(manifest, directory=path.parent)
    document = yaml.safe_load(path.read_text())
    for check in document["checks"]:
        check["sha256"] = "0" * 64  # a check recorded for an earlier export
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ModelLoadError, match="no passing precision check"):
        require_precision_check(copy, "openvino", "bf16")
    for check in document["checks"]:
        check["sha256"], check["passed"] = manifest.sha256, False
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ModelLoadError, match="FAILED"):
        require_precision_check(copy, "openvino", "bf16")
    assert require_precision_check(copy, "openvino", "fp32") is None  # fp32 needs no check
