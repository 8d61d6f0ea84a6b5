"""The one interface every inference runtime implements, and the checks they share.

A runtime owns one loaded model on one device and runs whole batches: every array
in ``infer``'s feeds and results has the batch on axis 0. Which implementation
loads a model is decided by the manifest's ``format`` (see ``registry.py``), never
by the file extension.

Tensor shapes use the manifest's notation: an ``int`` is a fixed size, a ``str``
names a dynamic axis (``"batch"``, ``"height"``). Two tensors that name the same
axis must agree on its size within one call, which is how a mismatched batch or
image size between inputs is caught before it reaches the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import numpy as np

from services.core.errors import HistosynthError, InvalidInputError

# Manifest dtype names -> numpy dtypes. Only types our models exchange are listed, so
# a typo in a manifest fails at load instead of at the first request.
DTYPES: Final[Mapping[str, np.dtype]] = {
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}

# Inference precisions a model may be served at; anything but fp32 needs a passing precision check.
PRECISIONS: Final = ("fp32", "bf16")

_DEVICE_PATTERN: Final = re.compile(r"^(cpu|cuda:(\d+))$")


class ModelLoadError(HistosynthError):
    """A model could not be loaded: bad file, file/manifest disagreement, or the device or
    library its format needs is missing. A deployment problem, not a caller's."""

    default_status = "FAILED_PRECONDITION"
    reason = "model_load_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one model input or output.

    ``shape`` entries: a positive ``int`` is a fixed size, a non-empty ``str`` names a
    dynamic axis. Axis 0 is the batch axis for every tensor a Runtime exchanges.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name must be a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"tensor {self.name!r}: unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}"
            )
        # Accept lists from YAML but store a tuple so the spec stays hashable and frozen.
        object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            fixed = isinstance(dim, int) and not isinstance(dim, bool) and dim > 0
            named = isinstance(dim, str) and bool(dim)
            if not (fixed or named):
                raise ValueError(
                    f"tensor {self.name!r}: shape entry {dim!r} must be a positive int or an axis name"
                )

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def describe(self) -> str:
        """``float32[batch, 3, height, width]``: the form used in error messages."""
        return f"{self.dtype}[{', '.join(str(dim) for dim in self.shape)}]"


@dataclass(frozen=True)
class RuntimeOptions:
    """Knobs a runtime may honour; each implementation ignores those that do not apply."""

    # Threads inside one operator (ONNX Runtime intra-op pool, torch.set_num_threads);
    # 0 keeps the library default (one per core).
    intra_op_threads: int = 0
    # ONNX Runtime on cuda:N: put the TensorRT execution provider in front of CUDA when present.
    use_tensorrt_provider: bool = False
    # TensorRT execution provider: allow fp16 kernels (changes numerics; parity must be re-checked).
    tensorrt_fp16: bool = False
    # TensorRT execution provider: where built engines are cached between restarts (None = no cache).
    tensorrt_cache_dir: Path | None = None
    # Which engine runs a manifest of format 'onnx': "onnxruntime" (the portable default) or "openvino".
    # Chosen per model by services.core.runtimes.selection (HISTOSYNTH_RUNTIME, manifest metadata.serving).
    runtime: str = "onnxruntime"
    # Inference precision: "fp32", or a reduced one ("bf16") that the model's precision check allowed
    # (services.core.runtimes.selection); a runtime that cannot run it refuses to load.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")


@runtime_checkable
class Runtime(Protocol):
    """One loaded model on one device.

    ``device`` is the device the model actually runs on ("cpu", "cuda:0"), which can
    differ from the one asked for when a runtime fell back to CPU; ``provider`` names
    the execution engine actually used (e.g. "CUDAExecutionProvider").
    ``infer`` is safe to call from worker threads; ``close`` releases the model and
    is idempotent.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    device: str
    provider: str

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` -> ``("cpu", 0)``, ``"cuda:1"`` -> ``("cuda", 1)``; anything else raises."""
    match = _DEVICE_PATTERN.match(device) if isinstance(device, str) else None
    if match is None:
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda:<index>'")
    if match.group(1) == "cpu":
        return "cpu", 0
    return "cuda", int(match.group(2))


def validate_feeds(
    feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]
) -> dict[str, int]:
    """Check feeds against input specs before they reach a runtime.

    Checks the exact set of names, that each value is a numpy array of the declared
    dtype (no silent casts: a float64 image would double memory and change numerics),
    the rank, every fixed dimension, and that each named axis has one size across all
    inputs. Returns the resolved size of each named axis. Raises InvalidInputError
    naming the tensor and the offending value.
    """
    expected_names = [spec.name for spec in specs]
    missing = [name for name in expected_names if name not in feeds]
    unexpected = sorted(name for name in feeds if name not in expected_names)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        raise InvalidInputError(
            f"input names do not match the model: {'; '.join(parts)}; expected {expected_names}"
        )

    axis_sizes: dict[str, int] = {}
    axis_source: dict[str, str] = {}
    for spec in specs:
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise InvalidInputError(
                f"input {spec.name!r} must be a numpy array, got {type(value).__name__}"
            )
        if value.dtype != spec.numpy_dtype:
            raise InvalidInputError(
                f"input {spec.name!r} has dtype {value.dtype}, model expects {spec.dtype}"
            )
        if value.ndim != spec.rank:
            raise InvalidInputError(
                f"input {spec.name!r} has shape {list(value.shape)} (rank {value.ndim}), "
                f"model expects {spec.describe()} (rank {spec.rank})"
            )
        for axis, (dim, size) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise InvalidInputError(
                        f"input {spec.name!r} has size {size} on axis {axis}, "
                        f"model expects {dim} ({spec.describe()})"
                    )
                continue
            if size == 0:
                raise InvalidInputError(f"input {spec.name!r} has an empty axis {axis} ({dim!r})")
            known = axis_sizes.get(dim)
            if known is None:
                axis_sizes[dim] = size
                axis_source[dim] = spec.name
            elif known != size:
                raise InvalidInputError(
                    f"axis {dim!r} is {size} in input {spec.name!r} "
                    f"but {known} in input {axis_source[dim]!r}"
                )
    return axis_sizes


def check_model_signature(
    role: str,
    declared: Mapping[str, tuple[str | None, Sequence[int | str | None]]],
    specs: Sequence[TensorSpec],
    model_path: Path,
) -> None:
    """Refuse a model file whose own inputs or outputs disagree with its manifest.

    ``declared`` maps each tensor name found in the model to (dtype name or None when the
    file does not say, shape); a positive int is a fixed dim, anything else dynamic.
    A manifest may fix a dim the model leaves dynamic (it only narrows what callers may
    send), but not the other way round: requests the manifest allows would then fail.
    """
    expected = {spec.name for spec in specs}
    if set(declared) != expected:
        raise ModelLoadError(
            f"{model_path}: model {role} are {sorted(declared)}, manifest declares {sorted(expected)}"
        )
    for spec in specs:
        dtype, shape = declared[spec.name]
        found = "[" + ", ".join(str(dim) for dim in shape) + "]"
        if dtype is not None and dtype != spec.dtype:
            raise ModelLoadError(
                f"{model_path}: {role[:-1]} {spec.name!r} is {dtype} in the model, "
                f"manifest declares {spec.describe()}"
            )
        if len(shape) != spec.rank:
            raise ModelLoadError(
                f"{model_path}: {role[:-1]} {spec.name!r} has shape {found} in the model, "
                f"manifest declares {spec.describe()}"
            )
        for dim, model_dim in zip(spec.shape, shape, strict=True):
            model_fixed = isinstance(model_dim, int) and model_dim > 0
            if model_fixed and dim != model_dim:
                raise ModelLoadError(
                    f"{model_path}: {role[:-1]} {spec.name!r} has shape {found} in the model, "
                    f"manifest declares {spec.describe()}"
                )
