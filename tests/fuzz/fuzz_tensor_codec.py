"""Coverage-guided fuzzing of services.tensor_codec with atheris (by hand, not in CI).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_tensor_codec.py -runs=200000          # or -max_total_time=600
    .venv/bin/python tests/fuzz/fuzz_tensor_codec.py corpus_dir/           # keep a corpus between runs

Each input is decoded two ways: as a serialised ``common_pb2.Tensor`` (what arrives on the
wire), and structurally (dtype, shape and bytes drawn from the input with a
FuzzedDataProvider, which reaches the shape/byte-length checks far more often than random
protobuf bytes do). The contract: tensor_to_array / array_from_bytes return an array that
matches the declared dtype, shape and bytes, or raise InvalidInputError; any other
exception, or a mismatching array, is a crash that libFuzzer reports with the input that
caused it. tests/unit/test_fuzz_decoders.py checks the same contract with hypothesis in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the checkout

with atheris.instrument_imports():
    import numpy as np
    from google.protobuf.message import DecodeError

    from services._generated.histosynth.v1 import common_pb2
    from services.core.errors import InvalidInputError
    from services.tensor_codec import DTYPE_BY_ENUM, TensorLimits, array_from_bytes, tensor_to_array

ENUMS = sorted(DTYPE_BY_ENUM)
LIMITS = TensorLimits(max_rank=8, max_elements=2**22)  # keep single examples fast


def check(array: np.ndarray, dtype: np.dtype, shape: list[int], data: bytes) -> None:
    if array.shape != tuple(shape) or array.dtype != dtype.newbyteorder("="):
        raise AssertionError(f"decoded {array.dtype} {array.shape} for {dtype} {shape}")
    if array.astype(dtype).tobytes() != data:
        raise AssertionError("decoded values differ from the wire bytes")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise AssertionError("non-finite values were accepted")


def from_protobuf(data: bytes) -> None:
    try:
        tensor = common_pb2.Tensor.FromString(data)
    except DecodeError:
        return
    try:
        array = tensor_to_array(tensor, "fuzz", allow_empty=True, limits=LIMITS)
    except InvalidInputError:
        return
    check(array, DTYPE_BY_ENUM[tensor.dtype], list(tensor.shape), tensor.data)


def structured(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    enum = provider.PickValueInList(ENUMS) if provider.ConsumeBool() else provider.ConsumeIntInRange(-5, 20)
    rank = provider.ConsumeIntInRange(0, 10)
    shape = [
        provider.ConsumeIntInRange(0, 16) if provider.ConsumeProbability() < 0.9 else provider.ConsumeInt(8)
        for _ in range(rank)
    ]
    payload = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 4096))
    tensor = common_pb2.Tensor(dtype=enum, shape=shape, data=payload)
    try:
        array = tensor_to_array(tensor, "fuzz", allow_empty=provider.ConsumeBool(), limits=LIMITS)
    except InvalidInputError:
        pass
    else:
        check(array, DTYPE_BY_ENUM[enum], shape, payload)
    dtype = np.dtype(provider.PickValueInList(["<f4", ">f4", "<f2", "?", "<i8", ">u2", "u1", "<f8"]))
    try:
        array = array_from_bytes("fuzz", dtype, shape, payload, allow_empty=True, limits=LIMITS)
    except InvalidInputError:
        return
    check(array, dtype, shape, payload)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        from_protobuf(data[1:])
    else:
        structured(data[1:])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
