"""Native TensorRT engines (``format: tensorrt_plan``), for the lowest GPU latency.

A .plan file is built for one GPU architecture and one TensorRT version (see
training/export on the GPU machine); it cannot run on CPU. ``tensorrt`` and NVIDIA's
``cuda-python`` bindings are imported only when such a model is loaded, so CPU
deployments never need them, and a missing GPU or library is reported as a
ModelLoadError that says which one is missing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.core.runtimes.base import (
    DTYPES,
    ModelLoadError,
    RuntimeOptions,
    TensorSpec,
    check_model_signature,
    parse_device,
    validate_feeds,
)


def _import_cudart(model_path: Path) -> Any:
    """NVIDIA's CUDA runtime bindings; the module moved between cuda-python releases."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as error:
            raise ModelLoadError(
                f"{model_path}: format 'tensorrt_plan' needs NVIDIA's cuda-python bindings "
                "(pip install cuda-python), which are not installed"
            ) from error
    return cudart


class _Cuda:
    """The few CUDA runtime calls the engine needs, each checked for errors."""

    def __init__(self, cudart: Any, device_index: int, model_path: Path) -> None:
        self._cudart = cudart
        self.model_path = model_path
        error, count = cudart.cudaGetDeviceCount()
        if error != cudart.cudaError_t.cudaSuccess or count == 0:
            raise ModelLoadError(
                f"{model_path}: format 'tensorrt_plan' needs a CUDA GPU, and none is visible "
                f"({self._describe(error) if error != cudart.cudaError_t.cudaSuccess else '0 devices'}); "
                "serve an ONNX export of this model on CPU instead"
            )
        if device_index >= count:
            raise ModelLoadError(
                f"{model_path}: requested cuda:{device_index} but only {count} CUDA device(s) are visible"
            )
        self.device_index = device_index
        self.check(cudart.cudaSetDevice(device_index), "cudaSetDevice")
        self.stream = self.check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _describe(self, error: Any) -> str:
        name = self._cudart.cudaGetErrorString(error)[1]
        return name.decode() if isinstance(name, bytes) else str(name)

    def check(self, result: tuple[Any, ...], call: str) -> Any:
        """cuda-python returns (error, value...); raise on error, return the value."""
        error, *values = result
        if error != self._cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{self.model_path}: {call} failed: {self._describe(error)}")
        return values[0] if len(values) == 1 else tuple(values) or None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, pointer: int) -> None:
        self.check(self._cudart.cudaFree(pointer), "cudaFree")

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(
            self._cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, self.stream),
            "cudaMemcpyAsync(host to device)",
        )

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(
            self._cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, self.stream),
            "cudaMemcpyAsync(device to host)",
        )

    def synchronize(self) -> None:
        self.check(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        self.check(self._cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")


class TensorRTRuntime:
    """One deserialised TensorRT engine and execution context on one GPU.

    An execution context runs one inference at a time, so calls are serialised by a
    lock; the device pool gets concurrency from several instances instead. Device
    buffers grow to the largest batch seen and are reused after that.
    """

    def __init__(
        self,
        model_path: Path,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        device: str = "cuda:0",
        options: RuntimeOptions = RuntimeOptions(),
    ) -> None:
        del options  # engine-building options are fixed when the .plan is built
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.model_path = Path(model_path)
        kind, index = parse_device(device)
        if kind != "cuda":
            raise ModelLoadError(
                f"{self.model_path}: format 'tensorrt_plan' runs only on a CUDA device, "
                f"not {device!r}; serve an ONNX export of this model on CPU instead"
            )
        try:
            import tensorrt as trt
        except ImportError as error:
            raise ModelLoadError(
                f"{self.model_path}: format 'tensorrt_plan' needs the tensorrt Python package, "
                "which is not installed (it comes with NVIDIA's GPU images / pip install tensorrt)"
            ) from error
        self._cuda = _Cuda(_import_cudart(self.model_path), index, self.model_path)

        try:
            engine = self._load_engine(trt)
        except BaseException:
            self._cuda.close()  # the stream is the only CUDA resource held so far
            raise
        self._engine = engine
        self._context: Any = engine.create_execution_context()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity bytes)
        self._lock = threading.Lock()
        self.device: str = device
        self.provider: str = f"tensorrt-{trt.__version__}"

    def _load_engine(self, trt: Any) -> Any:
        """Deserialise the plan and check its I/O tensors against the manifest."""
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._trt_runtime = trt.Runtime(self._trt_logger)
        engine = self._trt_runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if engine is None:
            raise ModelLoadError(
                f"{self.model_path}: TensorRT {trt.__version__} could not deserialise the engine; "
                "plans only load on the TensorRT version and GPU architecture they were built for"
            )
        declared: dict[str, dict[str, tuple[str | None, Sequence[int | str | None]]]] = {
            "inputs": {},
            "outputs": {},
        }
        for position in range(engine.num_io_tensors):
            name = engine.get_tensor_name(position)
            role = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            dtype_name = next((key for key, value in DTYPES.items() if value == dtype), str(dtype))
            declared[role][name] = (dtype_name, tuple(engine.get_tensor_shape(name)))
        check_model_signature("inputs", declared["inputs"], self.inputs, self.model_path)
        check_model_signature("outputs", declared["outputs"], self.outputs, self.model_path)
        return engine

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes:
            if pointer:
                self._cuda.free(pointer)
            pointer = self._cuda.malloc(nbytes)
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        validate_feeds(feeds, self.inputs)
        with self._lock:
            context = self._context
            if context is None:
                raise RuntimeError(f"{self.model_path}: runtime is closed")
            host_inputs = [np.ascontiguousarray(feeds[spec.name]) for spec in self.inputs]
            for spec, array in zip(self.inputs, host_inputs, strict=True):
                if not context.set_input_shape(spec.name, array.shape):
                    raise RuntimeError(
                        f"{self.model_path}: input {spec.name!r} shape {list(array.shape)} is "
                        "outside the engine's optimisation profile"
                    )
                pointer = self._buffer(spec.name, array.nbytes)
                self._cuda.to_device(pointer, array)
                context.set_tensor_address(spec.name, pointer)
            results: dict[str, np.ndarray] = {}
            for spec in self.outputs:
                shape = tuple(context.get_tensor_shape(spec.name))
                result = np.empty(shape, dtype=spec.numpy_dtype)
                pointer = self._buffer(spec.name, result.nbytes)
                context.set_tensor_address(spec.name, pointer)
                results[spec.name] = result
            if not context.execute_async_v3(int(self._cuda.stream)):
                raise RuntimeError(f"{self.model_path}: TensorRT execution failed (see log)")
            for spec in self.outputs:
                self._cuda.to_host(results[spec.name], self._buffers[spec.name][0])
            # The host input arrays must stay alive until the copies finished.
            self._cuda.synchronize()
            del host_inputs
            return results

    def close(self) -> None:
        with self._lock:
            if self._context is None:
                return
            self._context = None
            self._engine = None
            for pointer, _ in self._buffers.values():
                self._cuda.free(pointer)
            self._buffers.clear()
            self._cuda.close()

    def __repr__(self) -> str:
        return f"TensorRTRuntime({str(self.model_path)!r}, device={self.device!r}, provider={self.provider!r})"
