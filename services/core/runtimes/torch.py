"""TorchScript runtime, for models whose export to ONNX is not (yet) faithful.

torch is imported inside the class, never at module level: the serving images ship
without torch, and importing the runtime registry must not need it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.core.runtimes.base import (
    ModelLoadError,
    RuntimeOptions,
    TensorSpec,
    parse_device,
    validate_feeds,
)

_log = logging.getLogger(__name__)


class TorchRuntime:
    """A ``torch.jit.load``-ed module called with the inputs in manifest order.

    The module may return one tensor, a tuple/list in manifest output order, or a dict
    keyed by output name. CUDA requested but unavailable falls back to CPU and is reported
    in ``device``/``provider``, like ONNX Runtime does.
    """

    def __init__(
        self,
        model_path: Path,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        device: str = "cpu",
        options: RuntimeOptions = RuntimeOptions(),
    ) -> None:
        try:
            import torch
        except ImportError as error:
            raise ModelLoadError(
                f"{model_path}: format 'torchscript' needs torch, which is not installed "
                "(pip install 'histosynth[train]', or export the model to ONNX)"
            ) from error
        self._torch = torch
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.model_path = Path(model_path)

        kind, _ = parse_device(device)
        if kind == "cuda" and not torch.cuda.is_available():
            _log.warning(
                "requested %s but torch sees no CUDA device; running %s on CPU",
                device,
                self.model_path,
                extra={"requested_device": device, "device": "cpu"},
            )
            device, kind = "cpu", "cpu"
        self.device: str = device
        self.provider: str = f"torchscript-{kind}"
        # torch's intra-op pool is process-wide: the last TorchRuntime created sets it.
        if options.intra_op_threads > 0:
            torch.set_num_threads(options.intra_op_threads)

        try:
            module = torch.jit.load(str(self.model_path), map_location=device)
        except Exception as error:  # torch raises RuntimeError/ValueError for bad archives
            raise ModelLoadError(
                f"{self.model_path}: torch.jit.load could not load the model: {error}"
            ) from error
        module.eval()
        self._module: Any = module
        self._torch_device = torch.device(device)
        self._close_lock = threading.Lock()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = self._module
        if module is None:
            raise RuntimeError(f"{self.model_path}: runtime is closed")
        validate_feeds(feeds, self.inputs)
        torch = self._torch
        arguments = []
        for spec in self.inputs:
            array = np.ascontiguousarray(feeds[spec.name])
            if not array.flags.writeable:  # torch.from_numpy wants writable memory
                array = array.copy()
            arguments.append(torch.from_numpy(array).to(self._torch_device))
        with torch.inference_mode():
            result = module(*arguments)
        return self._to_outputs(result)

    def _to_outputs(self, result: Any) -> dict[str, np.ndarray]:
        torch = self._torch
        names = [spec.name for spec in self.outputs]
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, Mapping):
            missing = [name for name in names if name not in result]
            if missing:
                raise RuntimeError(
                    f"{self.model_path}: module returned keys {sorted(result)}, manifest outputs {names}"
                )
            tensors = [result[name] for name in names]
        else:
            tensors = list(result)
            if len(tensors) != len(names):
                raise RuntimeError(
                    f"{self.model_path}: module returned {len(tensors)} tensors, "
                    f"manifest declares {len(names)} outputs {names}"
                )
        arrays: dict[str, np.ndarray] = {}
        for spec, tensor in zip(self.outputs, tensors, strict=True):
            array = tensor.detach().cpu().numpy()
            if array.dtype != spec.numpy_dtype:
                raise RuntimeError(
                    f"{self.model_path}: output {spec.name!r} is {array.dtype}, "
                    f"manifest declares {spec.describe()}"
                )
            arrays[spec.name] = array
        return arrays

    def close(self) -> None:
        with self._close_lock:
            self._module = None

    def __repr__(self) -> str:
        return f"TorchRuntime({str(self.model_path)!r}, device={self.device!r})"
