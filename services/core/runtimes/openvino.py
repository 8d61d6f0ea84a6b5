"""OpenVINO: the CPU fast path for the shipped ONNX files (reads the same model.onnx as ONNX Runtime).

OpenVINO compiles the ONNX graph for this CPU's instruction set and, asked for ``bf16``,
runs convolutions and matmuls with AVX-512 BF16 / AMX kernels (about 2x fp32 on this
machine kind, ../shared/docs/PERF-NOTES.md). Which precision a model may run at is not
this module's decision: ``registry.create_runtime`` only passes a reduced precision after
the model's precision check passed (``precision.py``). The precision is always set
explicitly, because on CPUs with AMX OpenVINO's own default is bf16, and the one the
compiled model actually uses is read back and reported in ``provider``/``precision``.

Batch invariance: OpenVINO's CPU kernels for a batch of 1 differ from those for larger
batches in the last bits (fp32 ~1e-5, bf16 ~1e-2, measured), so a sample would change with
the batch it lands in. ``infer`` therefore runs the rows of a batch one at a time through
one compiled model: every row sees exactly the computation it would alone, bit for bit,
and on CPU larger batches give no per-image gain anyway (PERF-NOTES). Dynamic height/width
are kept dynamic; OpenVINO compiles each new shape on first use.

``openvino`` is imported lazily: the runtime registry must import without it, and ONNX
Runtime stays the portable default where it is not installed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from services.core.runtimes.base import (
    ModelLoadError,
    RuntimeOptions,
    TensorSpec,
    check_model_signature,
    parse_device,
    validate_feeds,
)

# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values, and back.
OV_PRECISIONS: Final[Mapping[str, str]] = {"fp32": "f32", "bf16": "bf16"}
_FROM_OV_PRECISION: Final[Mapping[str, str]] = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
# OpenVINO element type names -> manifest dtype names.
_OV_DTYPES: Final[Mapping[str, str]] = {
    "f16": "float16", "f32": "float32", "f64": "float64", "i8": "int8", "i16": "int16",
    "i32": "int32", "i64": "int64", "u8": "uint8", "boolean": "bool",
}


def openvino_version() -> str | None:
    """The installed OpenVINO version, or None when the package is absent."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__).split("-")[0]


class OpenVinoRuntime:
    """One OpenVINO compiled model on the CPU, at a fixed inference precision.

    Safe to call from several threads: each thread gets its own infer request (requests are
    cheap; OpenVINO's one-stream latency mode runs them one after another on its own pool).
    """

    def __init__(
        self,
        model_path: Path,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        device: str = "cpu",
        options: RuntimeOptions = RuntimeOptions(),
    ) -> None:
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.model_path = Path(model_path)
        kind, _ = parse_device(device)
        if kind != "cpu":
            raise ModelLoadError(
                f"{self.model_path}: the openvino runtime serves CPU only here, not {device!r}; "
                "use onnxruntime (CUDA/TensorRT providers) on GPUs"
            )
        precision = options.precision
        if precision not in OV_PRECISIONS:
            raise ModelLoadError(
                f"{self.model_path}: openvino cannot run precision {precision!r}; valid: {', '.join(OV_PRECISIONS)}"
            )
        try:
            import openvino as ov
        except ImportError as error:
            raise ModelLoadError(
                f"{self.model_path}: runtime 'openvino' needs the openvino package, which is not installed "
                "(pip install openvino, or serve with HISTOSYNTH_RUNTIME=onnxruntime)"
            ) from error

        core = ov.Core()
        try:
            model = core.read_model(str(self.model_path))
        except Exception as error:  # OpenVINO raises RuntimeError subclasses for bad graphs
            raise ModelLoadError(f"{self.model_path}: OpenVINO could not read the model: {error}") from error
        check_model_signature("inputs", _declared(model.inputs), self.inputs, self.model_path)
        check_model_signature("outputs", _declared(model.outputs), self.outputs, self.model_path)

        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if options.intra_op_threads > 0:
            config["INFERENCE_NUM_THREADS"] = options.intra_op_threads
        try:
            compiled = core.compile_model(model, "CPU", config)
        except Exception as error:
            raise ModelLoadError(f"{self.model_path}: OpenVINO could not compile the model: {error}") from error
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an element Type (f32, bf16)
        actual = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.precision: str = _FROM_OV_PRECISION.get(actual, actual)
        self.threads: int = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        self.device: str = "cpu"
        self.provider: str = f"openvino-{openvino_version()}-CPU-{self.precision}"
        self._compiled: Any = compiled
        self._ov_outputs = [compiled.output(spec.name) for spec in self.outputs]
        self._local = threading.local()
        self._close_lock = threading.Lock()

    def _request(self, compiled: Any) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = compiled.create_infer_request()
            self._local.request = request
        return request

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        compiled = self._compiled
        if compiled is None:
            raise RuntimeError(f"{self.model_path}: runtime is closed")
        validate_feeds(feeds, self.inputs)
        request = self._request(compiled)
        arrays = {spec.name: np.ascontiguousarray(feeds[spec.name]) for spec in self.inputs}
        rows = next(iter(arrays.values())).shape[0]
        results: dict[str, np.ndarray] | None = None
        for row in range(rows):
            # share_inputs: the row views are read in place; share_outputs: results are copied below.
            answer = request.infer({name: array[row:row + 1] for name, array in arrays.items()},
                                   share_inputs=True, share_outputs=True)
            if results is None:
                results = {
                    spec.name: np.empty((rows, *answer[port].shape[1:]), dtype=spec.numpy_dtype)
                    for spec, port in zip(self.outputs, self._ov_outputs, strict=True)
                }
            for spec, port in zip(self.outputs, self._ov_outputs, strict=True):
                results[spec.name][row] = answer[port][0]
        assert results is not None  # validate_feeds refuses empty batches
        return results

    def close(self) -> None:
        with self._close_lock:
            self._compiled = None
            self._ov_outputs = []

    def __repr__(self) -> str:
        return f"OpenVinoRuntime({str(self.model_path)!r}, device={self.device!r}, provider={self.provider!r})"


def _declared(ports: Sequence[Any]) -> dict[str, tuple[str | None, list[int | None]]]:
    """OpenVINO model ports -> {name: (manifest dtype, shape with None for every dynamic dim)}."""
    declared: dict[str, tuple[str | None, list[int | None]]] = {}
    for port in ports:
        shape = [dim.get_length() if dim.is_static else None for dim in port.get_partial_shape()]
        declared[port.get_any_name()] = (_OV_DTYPES.get(port.get_element_type().get_type_name()), shape)
    return declared
