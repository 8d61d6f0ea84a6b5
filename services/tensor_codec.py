"""The one place where wire tensors become numpy arrays and back.

Every tensor a client sends is checked here before any service touches it: a known
element type, a sane shape (non-negative, bounded rank, bounded element count), a byte
length that matches the shape, and finite values for floating types. Failures raise
InvalidInputError naming the field and saying what was expected, e.g.
``class_masks: expected uint8 [N, H, W], got float32 [2, 3]``.

Two wire forms share the checks: histosynth's ``common_pb2.Tensor`` (dtype enum +
shape + bytes) via :func:`tensor_to_array` / :func:`array_to_tensor`, and any other
"dtype + shape + raw bytes" form (the KServe v2 protocol) via :func:`array_from_bytes`.
Bytes are little-endian, C order, on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from services._generated.histosynth.v1 import common_pb2
from services.core.errors import InvalidInputError

# DataType enum value -> little-endian numpy dtype of the bytes on the wire.
DTYPE_BY_ENUM: Final[Mapping[int, np.dtype]] = {
    common_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
    common_pb2.DATA_TYPE_UINT16: np.dtype("<u2"),
    common_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    common_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    common_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DATA_TYPE_BOOL: np.dtype("?"),
}
# numpy dtype (native order) name -> DataType enum value, for encoding responses.
ENUM_BY_DTYPE_NAME: Final[Mapping[str, int]] = {
    dtype.newbyteorder("=").name: enum for enum, dtype in DTYPE_BY_ENUM.items()
}


@dataclass(frozen=True)
class TensorLimits:
    """Bounds on a decoded tensor; the defaults fit every histosynth request.

    max_rank: most dimensions a tensor may have.
    max_elements: most elements in one tensor (default 2**28: a 16384 x 16384 field).
        The declared shape is checked against it before its bytes are touched, so a
        tiny message claiming a gigantic shape is refused up front.
    """

    max_rank: int = 8
    max_elements: int = 2**28

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank!r}")
        if self.max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {self.max_elements!r}")


DEFAULT_LIMITS: Final = TensorLimits()


def dtype_name(dtype: np.dtype) -> str:
    """``float32``, ``uint8``, ``bool``: the byte-order-free name used in messages."""
    return np.dtype(dtype).newbyteorder("=").name


def describe(dtype_label: str, shape: Sequence[int]) -> str:
    """``float32 [2, 3]``: how an actual tensor is shown in error messages."""
    return f"{dtype_label} [{', '.join(str(int(dim)) for dim in shape)}]"


def expectation(
    allowed_dtypes: Collection[np.dtype] | None, layouts: Sequence[str] | None
) -> str:
    """``uint8 [N, H, W] or [H, W]``: what a field accepts, for error messages."""
    types = "any dtype" if allowed_dtypes is None else " or ".join(dtype_name(d) for d in allowed_dtypes)
    if not layouts:
        return types
    return f"{types} {' or '.join(layouts)}"


def array_from_bytes(
    name: str,
    dtype: np.dtype,
    shape: Sequence[int],
    data: bytes,
    *,
    dtype_label: str | None = None,
    allowed_dtypes: Collection[np.dtype] | None = None,
    allowed_ranks: Collection[int] | None = None,
    layouts: Sequence[str] | None = None,
    allow_empty: bool = False,
    limits: TensorLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Validate and view raw little-endian bytes as an array of ``dtype`` and ``shape``.

    ``name`` is the field shown in errors; ``dtype_label`` how the client spelled the type
    (defaults to the numpy name); ``layouts`` (e.g. ``["[N, H, W]", "[H, W]"]``) document
    the accepted ranks in messages. The result is a read-only view of ``data`` in native
    byte order (copied only on a big-endian host): callers must not write into it.
    """
    dtype = np.dtype(dtype)
    label = dtype_label or dtype_name(dtype)
    shape = [int(dim) for dim in shape]
    wanted = expectation(allowed_dtypes, layouts)
    if allowed_dtypes is not None and dtype.newbyteorder("=") not in {
        np.dtype(d).newbyteorder("=") for d in allowed_dtypes
    }:
        raise InvalidInputError(f"{name}: expected {wanted}, got {describe(label, shape)}")
    if len(shape) > limits.max_rank:
        raise InvalidInputError(
            f"{name}: rank {len(shape)} exceeds the limit of {limits.max_rank} dimensions "
            f"(shape {shape}); expected {wanted}"
        )
    if allowed_ranks is not None and len(shape) not in allowed_ranks:
        raise InvalidInputError(f"{name}: expected {wanted}, got {describe(label, shape)}")
    negative = [dim for dim in shape if dim < 0]
    if negative:
        raise InvalidInputError(f"{name}: shape {shape} has negative dimensions; every size must be >= 0")
    # Each axis is capped on its own too: a zero-size axis makes the product 0, which would
    # otherwise let [2**40, 0, 2**40] through to numpy's reshape.
    oversized = [dim for dim in shape if dim > limits.max_elements]
    if oversized:
        raise InvalidInputError(
            f"{name}: shape {shape} has an axis of {oversized[0]}, more than the limit of "
            f"{limits.max_elements} elements; send smaller tensors or split the request"
        )
    elements = math.prod(shape)
    if elements > limits.max_elements:
        raise InvalidInputError(
            f"{name}: shape {shape} holds {elements} elements, more than the limit of "
            f"{limits.max_elements}; send smaller tensors or split the request"
        )
    if elements == 0 and not allow_empty:
        raise InvalidInputError(f"{name}: tensor is empty (shape {shape}); send at least one element")
    expected_bytes = elements * dtype.itemsize
    if len(data) != expected_bytes:
        raise InvalidInputError(
            f"{name}: data holds {len(data)} bytes but {describe(label, shape)} needs "
            f"{elements} x {dtype.itemsize} = {expected_bytes} bytes; send little-endian, "
            "C-order bytes matching the shape"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
        array.flags.writeable = False
    _check_values(name, array)
    return array


def _check_values(name: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InvalidInputError(f"{name}: {bad} values are NaN or infinite; send finite values only")
    if array.dtype == np.bool_ and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInputError(f"{name}: bool bytes must be 0 or 1")


def tensor_to_array(
    tensor: common_pb2.Tensor,
    name: str,
    *,
    allowed_dtypes: Collection[np.dtype] | None = None,
    allowed_ranks: Collection[int] | None = None,
    layouts: Sequence[str] | None = None,
    allow_empty: bool = False,
    limits: TensorLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Decode a ``common_pb2.Tensor`` into a read-only numpy array (see array_from_bytes)."""
    enum_value = int(tensor.dtype)
    dtype = DTYPE_BY_ENUM.get(enum_value)
    if dtype is None:
        enum_label = _enum_label(enum_value)
        valid = ", ".join(common_pb2.DataType.Name(value) for value in DTYPE_BY_ENUM)
        hint = " (is the field set?)" if enum_value == common_pb2.DATA_TYPE_UNSPECIFIED else ""
        raise InvalidInputError(
            f"{name}: unsupported dtype {enum_label}{hint}; expected "
            f"{expectation(allowed_dtypes, layouts)}; valid dtypes: {valid}"
        )
    return array_from_bytes(
        name,
        dtype,
        list(tensor.shape),
        tensor.data,
        allowed_dtypes=allowed_dtypes,
        allowed_ranks=allowed_ranks,
        layouts=layouts,
        allow_empty=allow_empty,
        limits=limits,
    )


def _enum_label(value: int) -> str:
    try:
        return common_pb2.DataType.Name(value)
    except ValueError:
        return str(value)


def array_to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    """Encode an array as a ``common_pb2.Tensor`` (little-endian, C order)."""
    array = np.asarray(array)
    enum_value = ENUM_BY_DTYPE_NAME.get(dtype_name(array.dtype))
    if enum_value is None:
        raise ValueError(
            f"cannot encode dtype {array.dtype} as a Tensor; encodable: {sorted(ENUM_BY_DTYPE_NAME)}"
        )
    wire = np.ascontiguousarray(array, dtype=DTYPE_BY_ENUM[enum_value])
    return common_pb2.Tensor(dtype=enum_value, shape=list(array.shape), data=wire.tobytes())
