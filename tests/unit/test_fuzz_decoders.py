"""Property-based fuzzing of every request decoder, in process and over real gRPC.

The property everywhere: whatever a client sends (wrong dtypes and shapes, negative or
gigantic sizes, truncated or padded bytes, NaN/inf, unknown enum values, garbage that is not
a protobuf at all), a decoder either returns well-formed data or raises HistosynthError
(in practice InvalidInputError) naming the field; over gRPC the caller gets
INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED, never INTERNAL or UNKNOWN, and the server
keeps serving.

Decoders covered: services.tensor_codec (both wire forms); the generation spec
(spec_from_request + validate_spec + sink_path + indices); scoring's image sets, class maps,
PNGs, options and class-map scoring; KServe v2 ModelInfer input parsing; and, through a real
server, the MaskRefinement.Refine and MaskRendering.Render request paths.

Examples are derandomised (fixed seeds) so CI is reproducible; run with
``--hypothesis-seed=random`` or raise FUZZ_EXAMPLES for a deeper local run.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra import numpy as hnp

from services._generated.histosynth.v1 import (
    common_pb2,
    generation_pb2,
    mask_refinement_pb2,
    mask_refinement_pb2_grpc,
    mask_rendering_pb2,
    mask_rendering_pb2_grpc,
)
from services._generated.inference import grpc_service_pb2 as kserve_pb
from services.core.config import ServerConfig
from services.core.errors import InvalidInputError
from services.core.runtimes.base import TensorSpec
from services.all_in_one import BackgroundServers
from services.generation import servicer as generation_servicer
from services.generation.sink import sink_path
from services.generation.spec import validate_spec
from services.kserve_v2 import V2_DTYPES, KServeV2Servicer, check_spatial_multiple, decode_input
from services.tensor_codec import DTYPE_BY_ENUM, TensorLimits, array_from_bytes, array_to_tensor, tensor_to_array
from tests.fixtures.service_models import (
    REFINER_NAME,
    REFINER_SIZE_MULTIPLE,
    RENDERER_CLASSES,
    RENDERER_NAME,
    write_service_store,
)

pytestmark = pytest.mark.timeout(240)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Through a real server: each example is one real call over loopback.
FUZZ_GRPC = settings(FUZZ, max_examples=EXAMPLES)

# Every status a malformed request may legitimately get; INTERNAL / UNKNOWN mean a decoder leaked.
CLIENT_ERROR_CODES = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
MAX_MESSAGE_BYTES = 1024 * 1024


# =============================================================================== strategies
VALID_DTYPE_ENUMS = sorted(DTYPE_BY_ENUM)
dtype_enums = st.one_of(
    st.sampled_from([*VALID_DTYPE_ENUMS, common_pb2.DATA_TYPE_UNSPECIFIED]),
    st.integers(-(2**31), 2**31 - 1),  # proto3 enums are open: any int32 reaches the server
)
# Sizes that break naive arithmetic: negative, past 32 bits, at the int64 edges.
EXTREME_DIMS = st.sampled_from([-1, -7, -(2**63), 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1])
finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, -1.0, 1e300, math.nan, math.inf, -math.inf]),
)
short_text = st.text(max_size=24)


@st.composite
def wire_bytes(draw: st.DrawFn, dtype: np.dtype, shape: list[int]) -> bytes:
    """Bytes for ``shape``: exact, truncated or padded; random, in-range or with NaN/inf planted.

    Drawn from a numpy generator seeded by hypothesis (hypothesis' own buffer is too small
    for tensors of realistic size), so examples stay reproducible and shrinkable by seed.
    """
    if any(dim < 0 for dim in shape) or math.prod(shape) > 64 * 1024:
        return draw(st.binary(max_size=64))  # the shape alone must get it refused
    count = math.prod(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fill = draw(st.sampled_from(("random", "values", "values", "nonfinite")))
    if fill == "random":
        data = rng.bytes(count * dtype.itemsize)
    else:
        high = draw(st.sampled_from((2, 3, 256)))
        values = rng.integers(0, high, size=count).astype(dtype)
        if fill == "nonfinite" and dtype.kind == "f" and count:
            values[rng.integers(0, count)] = draw(st.sampled_from((np.nan, np.inf, -np.inf)))
        data = values.tobytes()
    cut = draw(st.sampled_from(("exact", "exact", "exact", "truncated", "padded", "empty")))
    if cut == "truncated" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if cut == "padded":
        return data + rng.bytes(draw(st.integers(1, 9)))
    if cut == "empty":
        return b""
    return data


@st.composite
def wire_shapes(draw: st.DrawFn, max_rank: int = 4, max_side: int = 20) -> list[int]:
    kind = draw(st.sampled_from(("small", "small", "small", "extreme", "deep")))
    if kind == "deep":
        return draw(st.lists(st.integers(0, 2), min_size=9, max_size=12))
    if kind == "extreme":
        return draw(st.lists(st.one_of(st.integers(0, max_side), EXTREME_DIMS), min_size=1, max_size=max_rank))
    return draw(st.lists(st.integers(0, max_side), min_size=0, max_size=max_rank))


@st.composite
def wire_tensors(
    draw: st.DrawFn, enums: st.SearchStrategy[int] = dtype_enums, max_rank: int = 4, max_side: int = 20
) -> common_pb2.Tensor:
    enum = draw(enums)
    shape = draw(wire_shapes(max_rank, max_side))
    dtype = DTYPE_BY_ENUM.get(enum, np.dtype("u1"))
    return common_pb2.Tensor(dtype=enum, shape=shape, data=draw(wire_bytes(dtype, shape)))


def mask_tensors(*dtypes: int) -> st.SearchStrategy[common_pb2.Tensor]:
    """Tensors biased towards what a service accepts, so deeper checks are reached too."""
    likely = st.sampled_from(dtypes) if dtypes else dtype_enums
    return wire_tensors(st.one_of(likely, likely, likely, dtype_enums), max_rank=4, max_side=24)


# ============================================================================ tensor codec
def assert_well_formed(array: np.ndarray, tensor: common_pb2.Tensor) -> None:
    dtype = DTYPE_BY_ENUM[tensor.dtype]
    assert array.shape == tuple(tensor.shape)
    assert array.dtype == dtype.newbyteorder("=")
    assert array.astype(dtype).tobytes() == tensor.data
    if array.dtype.kind == "f":
        assert np.isfinite(array).all()
    if array.dtype == np.bool_:
        assert array.view(np.uint8).max(initial=0) <= 1


@FUZZ
@given(
    tensor=wire_tensors(),
    allowed=st.one_of(st.none(), st.lists(st.sampled_from(sorted(set(DTYPE_BY_ENUM.values()), key=str)), min_size=1)),
    ranks=st.one_of(st.none(), st.sets(st.integers(0, 5), min_size=1)),
    allow_empty=st.booleans(),
    limits=st.builds(TensorLimits, max_rank=st.integers(1, 8), max_elements=st.integers(1, 2**28)),
)
def test_tensor_to_array_returns_valid_arrays_or_refuses_clearly(
    tensor: common_pb2.Tensor, allowed: list[np.dtype] | None, ranks: set[int] | None, allow_empty: bool,
    limits: TensorLimits,
) -> None:
    try:
        array = tensor_to_array(
            tensor, "field", allowed_dtypes=allowed, allowed_ranks=ranks, allow_empty=allow_empty, limits=limits
        )
    except InvalidInputError as error:
        assert error.status == "INVALID_ARGUMENT"
        assert error.message.startswith("field: "), error.message
        return
    assert_well_formed(array, tensor)
    assert len(tensor.shape) <= limits.max_rank and array.size <= limits.max_elements
    assert allow_empty or array.size > 0
    assert ranks is None or array.ndim in ranks
    assert allowed is None or array.dtype in {np.dtype(d).newbyteorder("=") for d in allowed}


def test_empty_tensor_with_a_gigantic_axis_is_refused() -> None:
    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[2**40, 0, 2**40], data=b"")
    with pytest.raises(InvalidInputError):
        tensor_to_array(tensor, "x", allow_empty=True)


ENCODABLE = [np.dtype(name) for name in ("uint8", "uint16", "int32", "int64", "float16", "float32", "bool")]


@FUZZ
@given(
    hnp.arrays(
        dtype=st.sampled_from(ENCODABLE),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_valid_arrays_round_trip(array: np.ndarray) -> None:
    decoded = tensor_to_array(array_to_tensor(array), "x", allow_empty=True)
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == array.dtype


@FUZZ
@given(
    dtype=st.sampled_from([*V2_DTYPES.values(), np.dtype(">f4"), np.dtype(">i8"), np.dtype("<c8")]),
    shape=wire_shapes(),
    data=st.data(),
)
def test_array_from_bytes_any_dtype(dtype: np.dtype, shape: list[int], data: st.DataObject) -> None:
    raw = data.draw(wire_bytes(dtype, shape))
    try:
        array = array_from_bytes("raw", dtype, shape, raw)
    except InvalidInputError as error:
        assert error.message.startswith("raw: ")
        return
    assert array.shape == tuple(shape) and array.dtype == dtype.newbyteorder("=")
    assert array.astype(dtype).tobytes() == raw


# ================================================================================ generation
fraction_ranges = st.builds(generation_pb2.FractionRange, min=finite_or_not, max=finite_or_not)
strata = st.builds(
    generation_pb2.Stratum,
    label=st.one_of(st.sampled_from(["", "a", "b", "a"]), short_text),
    weight=finite_or_not,
    class_fractions=st.dictionaries(st.one_of(st.sampled_from(RENDERER_CLASSES), short_text), finite_or_not, max_size=3),
    class_fraction_ranges=st.dictionaries(st.sampled_from(RENDERER_CLASSES), fraction_ranges, max_size=2),
)


@st.composite
def generation_requests(draw: st.DrawFn) -> generation_pb2.GenerateRequest:
    spec = generation_pb2.GenerationSpec(
        count=draw(st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1))),
        tissue=draw(st.one_of(st.sampled_from(["nuclei", "glands", "ihc", "NUCLEI", ""]), short_text)),
        height=draw(st.one_of(st.sampled_from([0, 16, 64, 256, 255, 4096]), st.integers(0, 2**32 - 1))),
        width=draw(st.one_of(st.sampled_from([0, 64, 256]), st.integers(0, 2**32 - 1))),
        strata=draw(st.lists(strata, max_size=3)),
        tolerance=draw(finite_or_not),
        seed=draw(st.integers(0, 2**64 - 1)),
        noise_spacing=draw(st.one_of(st.sampled_from([0.0, 2.0, 6.0, 300.0, -1.0, math.nan]), st.floats(width=32))),
        refine=draw(st.booleans()),
        min_consistency=draw(finite_or_not),
        sink_uri=draw(st.one_of(st.just(""), short_text, st.sampled_from(["file:///tmp/x", "s3://b/k", "http://[::1"]))),
    )
    for stratum in spec.strata:
        if draw(st.booleans()):
            stratum.positive_proportion.CopyFrom(draw(fraction_ranges))
        if draw(st.booleans()):
            stratum.nuclear_fraction.CopyFrom(draw(fraction_ranges))
    if draw(st.booleans()):
        spec.coarse_masks.CopyFrom(draw(mask_tensors(common_pb2.DATA_TYPE_UINT8)))
    request = generation_pb2.GenerateRequest(
        model_versions=draw(st.dictionaries(st.sampled_from(["renderer-he-nuclei", "mask-refiner", "x"]),
                                            st.sampled_from(["1", "0", "-1", "abc", "", "99"]), max_size=2)),
        indices=draw(st.lists(st.integers(0, 2**32 - 1), max_size=4)),
    )
    if draw(st.integers(0, 9)):  # a request without a spec now and then
        request.spec.CopyFrom(spec)
    return request


@FUZZ
@given(generation_requests())
def test_generation_spec_decoding_and_validation(request: generation_pb2.GenerateRequest) -> None:
    try:
        spec = generation_servicer.spec_from_request(request)
        validate_spec(spec, None)
        validate_spec(spec, RENDERER_CLASSES)
        generation_servicer._indices(request, spec.count)
        if spec.sink_uri:
            sink_path(spec.sink_uri)
    except InvalidInputError as error:
        assert error.status == "INVALID_ARGUMENT" and error.message


@FUZZ
@given(st.one_of(short_text, st.sampled_from(["http://[::1", "file://[x", "dir\x00name", "file:///tmp/a", "s3://b/k"])))
def test_sink_uri_parsing(uri: str) -> None:
    try:
        path = sink_path(uri)
    except InvalidInputError as error:
        assert error.message.startswith("sink_uri")
        return
    assert "\x00" not in str(path)


# ==================================================================================== scoring
scoring = pytest.importorskip("services.scoring.servicer", reason="scoring service not in this build")
from services._generated.histosynth.v1 import scoring_pb2  # noqa: E402


def _png(height: int, width: int, channels: int, seed: int, depth: type = np.uint8) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, np.iinfo(depth).max, size=(height, width, channels) if channels > 1 else (height, width))
    ok, encoded = cv2.imencode(".png", image.astype(depth))
    assert ok
    return encoded.tobytes()


@st.composite
def png_blobs(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(("valid", "truncated", "garbage", "huge_header", "sixteen_bit", "flipped")))
    seed = draw(st.integers(0, 1000))
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    if kind == "sixteen_bit":
        return _png(4, 5, 3, seed, np.uint16)
    blob = _png(draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.sampled_from((1, 3, 4))), seed)
    if kind == "truncated":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if kind == "huge_header":  # a 65535 x 65535 canvas claimed by a tiny file
        return blob[:16] + (65535).to_bytes(4, "big") * 2 + blob[24:]
    if kind == "flipped":
        position = draw(st.integers(8, len(blob) - 1))
        return blob[:position] + bytes([blob[position] ^ 0xFF]) + blob[position + 1:]
    return blob


image_sets = st.builds(
    lambda tensor, pngs, use_tensor: scoring_pb2.ImageSet(images=tensor) if use_tensor
    else scoring_pb2.ImageSet(png_images=pngs),
    mask_tensors(common_pb2.DATA_TYPE_UINT8),
    st.lists(png_blobs(), max_size=3),
    st.booleans(),
)


@FUZZ
@given(image_set=image_sets, both=st.booleans(), allow_empty=st.booleans())
def test_scoring_image_sets(image_set: Any, both: bool, allow_empty: bool) -> None:
    if both and image_set.HasField("images"):
        image_set.png_images.append(b"\x89PNG")
    try:
        count = scoring.image_count(image_set, "real")  # the pre-decode checks never raise anything else
        images = asyncio.run(scoring.image_set(image_set, "real", allow_empty=allow_empty))
        assert len(images) == count
    except InvalidInputError as error:
        assert error.message
        return
    for image in images:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size


map_dtypes = (common_pb2.DATA_TYPE_UINT8, common_pb2.DATA_TYPE_UINT16, common_pb2.DATA_TYPE_INT32,
              common_pb2.DATA_TYPE_INT64)


@FUZZ
@given(
    real=mask_tensors(*map_dtypes),
    synthetic=mask_tensors(*map_dtypes),
    class_ids=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 3), max_size=4),
    connectivity=st.sampled_from([0, 4, 8, 6, 2**32 - 1]),
    bins=st.sampled_from([0, 1, 20, 10_001, 2**32 - 1]),
    flags=st.tuples(st.booleans(), st.booleans()),
)
def test_scoring_mask_requests(real: Any, synthetic: Any, class_ids: list[int], connectivity: int, bins: int,
                               flags: tuple[bool, bool]) -> None:
    request = scoring_pb2.ScoreMasksRequest(
        real_masks=real, synthetic_masks=synthetic, class_ids=class_ids, connectivity=connectivity, bins=bins,
        include_background=flags[0], include_border_objects=flags[1],
    )
    try:
        real_maps = scoring.class_maps(request, "real_masks")
        synthetic_maps = scoring.class_maps(request, "synthetic_masks")
        result = scoring.score_masks(real_maps, synthetic_maps, list(request.class_ids),
                                     int(request.connectivity) or 8, int(request.bins) or 20,
                                     request.include_background, request.include_border_objects)
        scoring.mask_scores(result)
    except InvalidInputError as error:
        assert error.message


@FUZZ
@given(
    predicted=mask_tensors(*map_dtypes),
    reference=mask_tensors(*map_dtypes),
    probabilities=st.one_of(st.none(), mask_tensors(common_pb2.DATA_TYPE_FLOAT32, common_pb2.DATA_TYPE_FLOAT16)),
    num_classes=st.sampled_from([0, 1, 3, 1025, 2**32 - 1]),
    ignore_index=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 255])),
    tps=st.one_of(st.none(), st.tuples(st.integers(-3, 5), st.integers(-3, 5))),
)
def test_scoring_segmentation_requests(
    predicted: Any, reference: Any, probabilities: Any, num_classes: int, ignore_index: int | None,
    tps: tuple[int, int] | None,
) -> None:
    request = scoring_pb2.ScoreSegmentationRequest(predicted=predicted, reference=reference, num_classes=num_classes)
    if probabilities is not None:
        request.probabilities.CopyFrom(probabilities)
    try:
        predicted_maps = scoring.class_maps(request, "predicted")
        reference_maps = scoring.class_maps(request, "reference")
        probs = None
        if request.HasField("probabilities"):
            probs = tensor_to_array(
                request.probabilities, "probabilities", allowed_dtypes=scoring.PROBABILITY_DTYPES,
                allowed_ranks=(3, 4),
            )
        scoring.score_segmentation(predicted_maps, reference_maps, probs, int(request.num_classes), ignore_index, tps)
        if tps is not None:
            scoring.tumor_proportions(predicted_maps, *tps)
    except InvalidInputError as error:
        assert error.message


options_strategy = st.builds(
    scoring_pb2.DistributionOptions,
    extractor=short_text,
    kid_subsets=st.integers(0, 2**32 - 1),
    kid_subset_size=st.integers(0, 2**32 - 1),
    pr_k=st.integers(0, 2**32 - 1),
    fid_bootstrap=st.integers(0, 2**32 - 1),
    fid_ci_level=finite_or_not,
    is_splits=st.integers(0, 2**32 - 1),
    seed=st.integers(0, 2**64 - 1),
    max_kept_features=st.integers(0, 2**32 - 1),
)


@FUZZ
@given(options_strategy)
def test_scoring_distribution_options(message: Any) -> None:
    try:
        scoring.distribution_options(message).validate(scoring.ScoringSettings())
    except InvalidInputError as error:
        assert error.message


# ================================================================================= KServe v2
KSERVE_DATATYPES = [*V2_DTYPES, "BYTES", "fp32", "", "FP8"]
REFINER_INPUT = TensorSpec("coarse", "float32", ("batch", 1, "height", "width"))
FIXED_INPUT = TensorSpec("x", "int64", ("batch", 3))


@st.composite
def infer_inputs(draw: st.DrawFn) -> tuple[kserve_pb.ModelInferRequest.InferInputTensor, bytes | None]:
    datatype = draw(st.one_of(st.sampled_from(KSERVE_DATATYPES), short_text))
    shape = draw(st.one_of(wire_shapes(), st.lists(st.integers(0, 9), min_size=4, max_size=4)))
    tensor = kserve_pb.ModelInferRequest.InferInputTensor(name="coarse", datatype=datatype, shape=shape)
    dtype = V2_DTYPES.get(datatype, np.dtype("u1"))
    if draw(st.booleans()):
        return tensor, draw(wire_bytes(dtype, shape))
    count = math.prod(shape) if all(0 <= d <= 64 for d in shape) else draw(st.integers(0, 8))
    count = max(0, min(count, 64 * 1024) + draw(st.sampled_from((0, 0, 0, -1, 1))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    field = draw(st.sampled_from(("int_contents", "uint_contents", "fp32_contents", "bool_contents", "int64_contents")))
    wide = draw(st.booleans())  # values far outside small types' ranges, or small ones
    if field == "fp32_contents":
        values = rng.standard_normal(count).astype(np.float32)
        if count and draw(st.booleans()):
            values[rng.integers(0, count)] = draw(st.sampled_from((np.nan, np.inf)))
    elif field == "bool_contents":
        values = rng.integers(0, 2, count).astype(bool)
    else:
        info = np.iinfo({"int_contents": np.int32, "uint_contents": np.uint32, "int64_contents": np.int64}[field])
        values = rng.integers(info.min if wide else 0, info.max if wide else 3, count, dtype=info.dtype)
    getattr(tensor.contents, field).extend(values.tolist())
    return tensor, None


@FUZZ
@given(infer_inputs(), st.sampled_from([REFINER_INPUT, FIXED_INPUT]))
def test_kserve_input_decoding(given_input: tuple[Any, bytes | None], spec: TensorSpec) -> None:
    tensor, raw = given_input
    tensor.name = spec.name
    try:
        array = decode_input(tensor, raw, spec)
        check_spatial_multiple({spec.name: array}, [spec], REFINER_SIZE_MULTIPLE, "model/1")
    except InvalidInputError as error:
        assert error.message
        return
    assert array.shape == tuple(tensor.shape)
    assert array.dtype == np.dtype(spec.dtype)


@FUZZ
@given(
    names=st.lists(st.sampled_from(["coarse", "x", ""]), max_size=3),
    raw_count=st.integers(0, 3),
)
def test_kserve_request_level_checks(names: list[str], raw_count: int) -> None:
    request = kserve_pb.ModelInferRequest(model_name=REFINER_NAME)
    for name in names:
        request.inputs.add(name=name, datatype="FP32", shape=[1, 1, 4, 4])
    request.raw_input_contents.extend([np.zeros(16, np.float32).tobytes()] * raw_count)
    try:
        feeds = KServeV2Servicer._decode_inputs(request, [REFINER_INPUT], "mask-refiner/1")
    except InvalidInputError as error:
        assert error.message
        return
    assert list(feeds) == ["coarse"]


# ========================================================================= real gRPC servers
@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, grpc.Channel]]:
    """Refinement and rendering servers (own event loop thread) and a blocking channel to each."""
    store = write_service_store(tmp_path_factory.mktemp("fuzz_store") / "model_store")
    config = ServerConfig(
        model_store=store, host="127.0.0.1", port=0, metrics_port=None, max_queue_delay_ms=1.0,
        max_message_bytes=MAX_MESSAGE_BYTES, drain_grace_s=0.5, log_format="text", log_level="WARNING",
        intra_op_threads=1,
    )
    services = ("refinement", "rendering")
    with BackgroundServers(config, services, {name: 0 for name in services}) as servers:
        options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
        opened = {name: grpc.insecure_channel(servers.addresses[name], options=options) for name in services}
        try:
            yield opened
        finally:
            for channel in opened.values():
                channel.close()


def call_status(call: Callable[..., Any], request: Any) -> grpc.StatusCode:
    """The call's status, asserting it is OK or a client error with a message."""
    try:
        call(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in CLIENT_ERROR_CODES, f"{error.code()}: {error.details()}"
        assert error.details()
        code = error.code()
    else:
        code = grpc.StatusCode.OK
    try:
        event(f"status {code.name}")  # --hypothesis-show-statistics shows how deep the examples got
    except InvalidArgument:  # called outside a property test
        pass
    return code


@st.composite
def label_maps(draw: st.DrawFn, high: int, dtype: type = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Valid maps with values in [0, high): the base that mutations start from."""
    if shape is None:
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 24)), draw(st.integers(1, 24)))
        if draw(st.integers(0, 4)) == 0:
            shape = shape[1:]  # [H, W] is accepted too
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.integers(0, high, size=shape).astype(dtype)


def mutations(*names: str) -> st.SearchStrategy[set[str]]:
    """Which fields of a valid request to break: none (a valid call), one, or two."""
    return st.sets(st.sampled_from(names), max_size=2)


@st.composite
def refine_requests(draw: st.DrawFn) -> mask_refinement_pb2.RefineRequest:
    masks = draw(label_maps(2, draw(st.sampled_from([np.uint8, np.bool_]))))
    request = mask_refinement_pb2.RefineRequest(
        coarse_masks=array_to_tensor(masks), seed=draw(st.integers(0, 1000)),
        model=draw(st.sampled_from(["", REFINER_NAME])), noise_spacing=draw(st.sampled_from([0.0, 3.0, 6.0])),
    )
    broken = draw(mutations("masks", "masks", "drop_masks", "stain", "model", "version", "noise", "seed"))
    if "masks" in broken:
        request.coarse_masks.CopyFrom(draw(mask_tensors(common_pb2.DATA_TYPE_UINT8, common_pb2.DATA_TYPE_BOOL)))
    if "drop_masks" in broken:
        request.ClearField("coarse_masks")
    if "stain" in broken:
        request.stain = draw(st.one_of(st.sampled_from(["he", "ihc", "HE", "x"]), short_text))
    if "model" in broken:
        request.model = draw(st.one_of(st.sampled_from([RENDERER_NAME, "nope"]), short_text))
    if "version" in broken:
        request.model_version = draw(st.sampled_from(["1", "2", "3", "0", "-1", "abc", "99999999999999999999999"]))
    if "noise" in broken:
        request.noise_spacing = draw(st.one_of(st.sampled_from([1e-30, -1.0, math.nan, math.inf]), st.floats(width=32)))
    if "seed" in broken:
        request.seed = draw(st.sampled_from([2**64 - 1, 2**64 - 2, 2**63]))
    return request


@FUZZ_GRPC
@given(refine_requests())
def test_refine_over_grpc_answers_client_errors_only(channels: dict[str, grpc.Channel], request: Any) -> None:
    stub = mask_refinement_pb2_grpc.MaskRefinementStub(channels["refinement"])
    call_status(stub.Refine, request)


@st.composite
def render_requests(draw: st.DrawFn) -> mask_rendering_pb2.RenderRequest:
    classes = draw(label_maps(len(RENDERER_CLASSES)))
    request = mask_rendering_pb2.RenderRequest(
        model=RENDERER_NAME, class_masks=array_to_tensor(classes), seed=draw(st.integers(0, 1000)),
        encoding=draw(st.sampled_from([0, 1, 2])),
    )
    if draw(st.booleans()):
        dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.int64]))
        request.instance_maps.CopyFrom(array_to_tensor(draw(label_maps(5, dtype, classes.shape))))
    if draw(st.booleans()):
        request.noise_labels.CopyFrom(array_to_tensor(draw(label_maps(2, np.uint8, classes.shape))))
    broken = draw(mutations("classes", "classes", "drop_classes", "instances", "noise", "model", "version",
                            "spacing", "seed", "encoding", "class_ids"))
    if "classes" in broken:
        request.class_masks.CopyFrom(draw(mask_tensors(common_pb2.DATA_TYPE_UINT8)))
    if "drop_classes" in broken:
        request.ClearField("class_masks")
    if "class_ids" in broken:  # well-formed tensor, ids the renderer does not have
        request.class_masks.CopyFrom(array_to_tensor(draw(label_maps(256, np.uint8, classes.shape))))
    if "instances" in broken:
        request.instance_maps.CopyFrom(draw(mask_tensors(*map_dtypes)))
    if "noise" in broken:
        request.noise_labels.CopyFrom(draw(mask_tensors(common_pb2.DATA_TYPE_UINT8, common_pb2.DATA_TYPE_BOOL)))
    if "model" in broken:
        request.model = draw(st.one_of(st.sampled_from(["", REFINER_NAME, "nope"]), short_text))
    if "version" in broken:
        request.model_version = draw(st.sampled_from(["2", "0", "x", "-1"]))
    if "spacing" in broken:
        request.noise_spacing = draw(st.one_of(st.sampled_from([1e-30, -1.0, math.nan, 1e30]), st.floats(width=32)))
    if "seed" in broken:
        request.seed = draw(st.sampled_from([2**64 - 1, 2**64 - 2]))
    if "encoding" in broken:
        request.encoding = draw(st.integers(-(2**31), 2**31 - 1))
    return request


@FUZZ_GRPC
@given(render_requests())
def test_render_over_grpc_answers_client_errors_only(channels: dict[str, grpc.Channel], request: Any) -> None:
    stub = mask_rendering_pb2_grpc.MaskRenderingStub(channels["rendering"])
    call_status(stub.Render, request)


@st.composite
def model_infer_requests(draw: st.DrawFn) -> kserve_pb.ModelInferRequest:
    batch, height, width = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(
        (batch, 1, height * REFINER_SIZE_MULTIPLE, width * REFINER_SIZE_MULTIPLE)
    ).astype(np.float32)
    request = kserve_pb.ModelInferRequest(model_name=REFINER_NAME)
    request.inputs.add(name="coarse", datatype="FP32", shape=list(values.shape))
    request.raw_input_contents.append(values.tobytes())
    broken = draw(mutations("input", "input", "model", "version", "outputs", "extra_input", "raw_count"))
    if "input" in broken:
        tensor, raw = draw(infer_inputs())
        del request.inputs[:]
        del request.raw_input_contents[:]
        request.inputs.append(tensor)
        if raw is not None:
            request.raw_input_contents.append(raw)
    if "model" in broken:
        request.model_name = draw(st.one_of(st.sampled_from(["", "nope", RENDERER_NAME]), short_text))
    if "version" in broken:
        request.model_version = draw(st.sampled_from(["2", "3", "x"]))
    if "outputs" in broken:
        request.outputs.add(name=draw(st.sampled_from(["fine", "nope", ""])))
    if "extra_input" in broken:
        request.inputs.add(name=draw(st.sampled_from(["coarse", "x"])), datatype="FP32", shape=[1])
    if "raw_count" in broken:
        request.raw_input_contents.append(b"\0" * 4)
    return request


@FUZZ_GRPC
@given(model_infer_requests())
def test_kserve_model_infer_over_grpc(channels: dict[str, grpc.Channel], request: Any) -> None:
    infer = channels["refinement"].unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=kserve_pb.ModelInferRequest.SerializeToString,
        response_deserializer=kserve_pb.ModelInferResponse.FromString,
    )
    call_status(infer, request)


@FUZZ_GRPC
@given(payload=st.binary(max_size=512), method=st.sampled_from([
    ("refinement", "/histosynth.v1.MaskRefinement/Refine"),
    ("rendering", "/histosynth.v1.MaskRendering/Render"),
    ("refinement", "/inference.GRPCInferenceService/ModelInfer"),
]))
def test_raw_bytes_that_are_not_protobuf(channels: dict[str, grpc.Channel], payload: bytes,
                                         method: tuple[str, str]) -> None:
    """Bytes straight onto the wire: a parse failure is INVALID_ARGUMENT, not grpc's UNKNOWN."""
    service, path = method
    call_status(channels[service].unary_unary(path), payload)


def test_oversized_message_is_resource_exhausted_and_server_recovers(channels: dict[str, grpc.Channel]) -> None:
    big = np.ones((1, 1100, 1000), np.uint8)  # > MAX_MESSAGE_BYTES on the wire
    stub = mask_refinement_pb2_grpc.MaskRefinementStub(channels["refinement"])
    request = mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(big))
    assert call_status(stub.Refine, request) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(channels)


def assert_still_serving(channels: dict[str, grpc.Channel]) -> None:
    for name, channel in channels.items():
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, name
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[:, 4:12, 2:14] = 1
    refined = mask_refinement_pb2_grpc.MaskRefinementStub(channels["refinement"]).Refine(
        mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(masks), seed=1), timeout=30
    )
    assert tuple(refined.fine_masks.shape) == (2, 16, 16)
    rendered = mask_rendering_pb2_grpc.MaskRenderingStub(channels["rendering"]).Render(
        mask_rendering_pb2.RenderRequest(model=RENDERER_NAME, class_masks=array_to_tensor(masks), seed=1), timeout=30
    )
    assert tuple(rendered.images.shape) == (2, 16, 16, 3)


def test_servers_still_answer_after_the_fuzzing(channels: dict[str, grpc.Channel]) -> None:
    """Runs after the fuzz tests above (same module, same servers)."""
    assert_still_serving(channels)
