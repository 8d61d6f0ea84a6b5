"""services.tensor_codec: wire tensors <-> numpy, and every way a client tensor can be wrong."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services._generated.histosynth.v1 import common_pb2
from services.core.errors import InvalidInputError
from services.tensor_codec import (
    DTYPE_BY_ENUM,
    TensorLimits,
    array_from_bytes,
    array_to_tensor,
    tensor_to_array,
)

UINT8 = (np.dtype(np.uint8),)


@pytest.mark.parametrize("dtype", [np.dtype(d).newbyteorder("=") for d in DTYPE_BY_ENUM.values()])
def test_round_trip_every_supported_dtype(dtype: np.dtype) -> None:
    array = (np.arange(24) % 2).astype(dtype).reshape(2, 3, 4)
    tensor = array_to_tensor(array)
    decoded = tensor_to_array(tensor, "t")
    assert decoded.dtype == dtype
    np.testing.assert_array_equal(decoded, array)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.sampled_from(["u1", "<u2", "<i4", "<i8", "<f4"]))
def test_round_trip_any_shape(shape: list[int], dtype: str) -> None:
    array = np.arange(int(np.prod(shape))).astype(dtype).reshape(shape)
    np.testing.assert_array_equal(tensor_to_array(array_to_tensor(array), "t"), array)


def test_wire_bytes_are_little_endian_c_order() -> None:
    tensor = array_to_tensor(np.array([[1, 2]], dtype=">u2").T)  # big-endian, non-contiguous
    assert list(tensor.shape) == [2, 1]
    assert tensor.data == b"\x01\x00\x02\x00"


def test_decoded_array_is_read_only_view() -> None:
    decoded = tensor_to_array(array_to_tensor(np.zeros((2, 2), np.uint8)), "t")
    assert not decoded.flags.writeable


def test_wrong_dtype_message_names_field_expectation_and_actual() -> None:
    tensor = array_to_tensor(np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidInputError) as raised:
        tensor_to_array(tensor, "class_masks", allowed_dtypes=UINT8, allowed_ranks=(3,), layouts=["[N, H, W]"])
    assert raised.value.message == "class_masks: expected uint8 [N, H, W], got float32 [2, 3]"
    assert raised.value.status == "INVALID_ARGUMENT"


def test_wrong_rank() -> None:
    tensor = array_to_tensor(np.zeros((1, 2, 3, 4), np.uint8))
    with pytest.raises(InvalidInputError, match=r"masks: expected uint8 \[N, H, W\] or \[H, W\], got uint8 \[1, 2, 3, 4\]"):
        tensor_to_array(tensor, "masks", allowed_dtypes=UINT8, allowed_ranks=(2, 3), layouts=["[N, H, W]", "[H, W]"])


def test_unset_dtype_hints_at_missing_field() -> None:
    with pytest.raises(InvalidInputError, match=r"masks: unsupported dtype DATA_TYPE_UNSPECIFIED \(is the field set\?\)"):
        tensor_to_array(common_pb2.Tensor(), "masks")


def test_unknown_enum_value() -> None:
    with pytest.raises(InvalidInputError, match="unsupported dtype 99"):
        tensor_to_array(common_pb2.Tensor(dtype=99, shape=[1], data=b"\0"), "t")


def test_data_length_mismatch_states_the_arithmetic() -> None:
    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(InvalidInputError, match=r"t: data holds 20 bytes but float32 \[2, 3\] needs 6 x 4 = 24 bytes"):
        tensor_to_array(tensor, "t")


def test_negative_dimension() -> None:
    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[-1, 4], data=b"")
    with pytest.raises(InvalidInputError, match="negative dimensions"):
        tensor_to_array(tensor, "t")


def test_empty_tensor_refused_unless_allowed() -> None:
    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[0, 4, 4], data=b"")
    with pytest.raises(InvalidInputError, match=r"t: tensor is empty \(shape \[0, 4, 4\]\)"):
        tensor_to_array(tensor, "t")
    assert tensor_to_array(tensor, "t", allow_empty=True).shape == (0, 4, 4)


def test_huge_declared_shape_is_refused_before_reading_data() -> None:
    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[1, 1_000_000, 1_000_000], data=b"")
    with pytest.raises(InvalidInputError, match="more than the limit of"):
        tensor_to_array(tensor, "t")


def test_rank_limit() -> None:
    tensor = array_to_tensor(np.zeros((1,) * 5, np.uint8))
    with pytest.raises(InvalidInputError, match="rank 5 exceeds the limit of 4"):
        tensor_to_array(tensor, "t", limits=TensorLimits(max_rank=4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_refused(bad: float) -> None:
    array = np.zeros((2, 2), np.float32)
    array[1, 1] = bad
    with pytest.raises(InvalidInputError, match="1 values are NaN or infinite"):
        tensor_to_array(array_to_tensor(array), "t")


def test_bool_bytes_must_be_0_or_1() -> None:
    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_BOOL, shape=[2], data=b"\x00\x02")
    with pytest.raises(InvalidInputError, match="bool bytes must be 0 or 1"):
        tensor_to_array(tensor, "t")


def test_array_from_bytes_uses_client_dtype_label() -> None:
    with pytest.raises(InvalidInputError, match=r"input 'x': expected float32, got FP64 \[2\]"):
        array_from_bytes("input 'x'", np.dtype("<f8"), [2], b"\0" * 16, dtype_label="FP64",
                         allowed_dtypes=(np.dtype(np.float32),))


def test_unencodable_dtype() -> None:
    with pytest.raises(ValueError, match="cannot encode dtype complex64"):
        array_to_tensor(np.zeros(2, np.complex64))
