"""The manifest's ``format`` -> the Runtime implementation that loads it (never the file extension)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from services.core.runtimes.base import ModelLoadError, Runtime, RuntimeOptions, TensorSpec
from services.core.runtimes.onnxruntime import OnnxRuntime
from services.core.runtimes.openvino import OpenVinoRuntime
from services.core.runtimes.tensorrt import TensorRTRuntime
from services.core.runtimes.torch import TorchRuntime

if TYPE_CHECKING:  # model_store imports this module for the list of valid formats
    from services.core.model_store import ModelManifest


class RuntimeFactory(Protocol):
    """The constructor signature every runtime shares."""

    def __call__(
        self,
        model_path: Path,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        device: str,
        options: RuntimeOptions,
    ) -> Runtime: ...


RUNTIMES: Final[dict[str, RuntimeFactory]] = {
    "onnx": OnnxRuntime,
    "torchscript": TorchRuntime,
    "tensorrt_plan": TensorRTRuntime,
}
# Engines that read a manifest of format 'onnx' (RuntimeOptions.runtime picks one; selection.py decides per model).
ONNX_ENGINES: Final[dict[str, RuntimeFactory]] = {
    "onnxruntime": OnnxRuntime,
    "openvino": OpenVinoRuntime,
}


def runtime_factory(model_format: str) -> RuntimeFactory:
    try:
        return RUNTIMES[model_format]
    except KeyError:
        raise ModelLoadError(
            f"unknown model format {model_format!r}; valid formats: {', '.join(RUNTIMES)}"
        ) from None


def create_runtime(
    manifest: ModelManifest, device: str = "cpu", options: RuntimeOptions = RuntimeOptions()
) -> Runtime:
    """Load the manifest's model file on ``device`` with the runtime its format names.

    The returned runtime's ``device`` may be "cpu" when an accelerator was asked for but
    could not be used (see each runtime); callers compare it with what they asked for.
    """
    factory = runtime_factory(manifest.format)
    if manifest.format == "onnx":
        try:
            factory = ONNX_ENGINES[options.runtime]
        except KeyError:
            raise ModelLoadError(
                f"unknown runtime {options.runtime!r} for format 'onnx'; valid: {', '.join(ONNX_ENGINES)}"
            ) from None
    return factory(manifest.path, manifest.inputs, manifest.outputs, device, options)
