"""ONNX Runtime: the default serving runtime (CPU always; CUDA / TensorRT execution providers on GPU).

onnxruntime-gpu accepts a CUDA provider list and then quietly runs on CPU when the CUDA
libraries are missing, so the provider is read back from the session after creation
and ``device``/``provider`` report what actually runs, never what was asked for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from services.core.runtimes.base import (
    ModelLoadError,
    RuntimeOptions,
    TensorSpec,
    check_model_signature,
    parse_device,
    validate_feeds,
)

_log = logging.getLogger(__name__)

CPU_PROVIDER: Final = "CPUExecutionProvider"
CUDA_PROVIDER: Final = "CUDAExecutionProvider"
TENSORRT_PROVIDER: Final = "TensorrtExecutionProvider"

# ONNX Runtime's type strings -> manifest dtype names.
_ORT_DTYPES: Final = {
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def provider_list(
    device: str, options: RuntimeOptions, available: Sequence[str]
) -> list[tuple[str, dict[str, str]]]:
    """Execution providers to request, best first; CPU always closes the list as the fallback."""
    kind, index = parse_device(device)
    providers: list[tuple[str, dict[str, str]]] = []
    if kind == "cuda":
        if options.use_tensorrt_provider and TENSORRT_PROVIDER in available:
            trt_options = {"device_id": str(index), "trt_fp16_enable": str(options.tensorrt_fp16)}
            if options.tensorrt_cache_dir is not None:
                trt_options["trt_engine_cache_enable"] = "True"
                trt_options["trt_engine_cache_path"] = str(options.tensorrt_cache_dir)
            providers.append((TENSORRT_PROVIDER, trt_options))
        if CUDA_PROVIDER in available:
            providers.append((CUDA_PROVIDER, {"device_id": str(index)}))
    providers.append((CPU_PROVIDER, {}))
    return providers


class OnnxRuntime:
    """One ONNX Runtime session for one model on one device.

    ``InferenceSession.run`` is thread-safe and releases the GIL, so one instance may be
    driven from several worker threads.
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
        requested_kind, requested_index = parse_device(device)
        if options.precision != "fp32":
            raise ModelLoadError(
                f"{self.model_path}: ONNX Runtime serves fp32 only here, not {options.precision!r} "
                "(its fp16 gives no gain on CPU); use runtime 'openvino' for bf16"
            )
        self.precision: str = "fp32"

        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.intra_op_num_threads = options.intra_op_threads
        # Warnings and above only: ORT's info logs would flood the JSON log stream.
        session_options.log_severity_level = 2

        providers = provider_list(device, options, ort.get_available_providers())
        try:
            session = ort.InferenceSession(
                str(self.model_path),
                sess_options=session_options,
                providers=[name for name, _ in providers],
                provider_options=[provider_options for _, provider_options in providers],
            )
        except Exception as error:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise ModelLoadError(
                f"{self.model_path}: ONNX Runtime could not load the model: {error}"
            ) from error

        check_model_signature(
            "inputs",
            {arg.name: (_ORT_DTYPES.get(arg.type), arg.shape) for arg in session.get_inputs()},
            self.inputs,
            self.model_path,
        )
        check_model_signature(
            "outputs",
            {arg.name: (_ORT_DTYPES.get(arg.type), arg.shape) for arg in session.get_outputs()},
            self.outputs,
            self.model_path,
        )

        active = session.get_providers()
        self.provider: str = active[0]
        self.device: str = "cpu" if self.provider == CPU_PROVIDER else f"cuda:{requested_index}"
        if requested_kind == "cuda" and self.device == "cpu":
            _log.warning(
                "requested %s but ONNX Runtime runs %s on CPU (available providers: %s)",
                device,
                self.model_path,
                ", ".join(ort.get_available_providers()),
                extra={"requested_device": device, "device": self.device, "provider": self.provider},
            )
        self._session: ort.InferenceSession | None = session
        self._output_names = [spec.name for spec in self.outputs]
        self._close_lock = threading.Lock()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeError(f"{self.model_path}: runtime is closed")
        validate_feeds(feeds, self.inputs)
        ort_feeds: dict[str, Any] = {
            spec.name: np.ascontiguousarray(feeds[spec.name]) for spec in self.inputs
        }
        results = session.run(self._output_names, ort_feeds)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        with self._close_lock:
            self._session = None

    def __repr__(self) -> str:
        return f"OnnxRuntime({str(self.model_path)!r}, device={self.device!r}, provider={self.provider!r})"
