"""KServe / Triton Open Inference Protocol v2 over gRPC: hosted models at the tensor level.

Mounted beside a service's domain API, over the same ModelHost, so ``tritonclient.grpc``
and KServe tooling can list, inspect and call our models, and their requests share the
model's DynamicBatcher (and its queue limits) with domain requests. ModelInfer feeds the
model's own input tensors (as its manifest declares them) and returns its raw outputs:
no pre/post-processing, which is what the domain API is for. Every call goes through the
model's memory admission (HISTOSYNTH_MEMORY_BUDGET); a service may pass a runner per model
kind, and the rendering service does for GAN renderers, so a field larger than the model's
tile runs tile by tile with Render's raised-cosine blending instead of in one piece. Kinds
without a runner run whole, or are refused with RESOURCE_EXHAUSTED naming the budget.

Pipeline models (services.kserve_pipelines): a service may also pass catalogs of ``<model>-pipeline``
models, which take uint8 masks and return uint8 images / masks through the domain pipelines (the same
bytes as Render / Refine), with scalars (seed, steps, ...) as request parameters. They are listed,
described and configured like the bare models. The REST binding (services.kserve_rest) transcodes
HTTP/JSON onto this servicer, so both protocols share every rule and message.

Served RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer,
ModelConfig, ModelStatistics, RepositoryIndex. Others of the protocol answer UNIMPLEMENTED.
ModelConfig and ModelStatistics answer in Triton's shapes (model_config.proto), which is what
Triton's perf_analyzer (``-i grpc --service-kind triton``) needs: the config says the batch axis
(max_batch_size > 0, dims without it, -1 for dynamic), the dynamic batcher and the instances, and
names the engine and precision actually used in ``backend`` and ``parameters``; statistics are
cumulative per model version since the process started (services.core.metrics.InferenceStats).

The protocol's messages live in services._generated.inference (from proto/inference/
grpc_service.proto, wire-compatible with Triton's). NOTE: tritonclient registers the same
``inference.*`` message names in protobuf's default descriptor pool, so this module and
``tritonclient.grpc`` cannot be imported into one process unless the generated module is
built into a private pool (see the lead's Makefile note); tests run tritonclient in a
subprocess.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import grpc
import numpy as np

from services._generated.inference import grpc_service_pb2 as pb
from services._generated.inference import grpc_service_pb2_grpc as pb_grpc
from services._generated.inference import model_config_pb2 as config_pb
from services.core import metrics
from services.core.errors import InvalidInputError, ModelNotFoundError
from services.core.grpc_server import ServiceRegistration
from services.core.runtimes.base import TensorSpec
from services.kserve_pipelines import PLATFORM as PIPELINE_PLATFORM
from services.kserve_pipelines import PipelineCatalog, PipelineModel
from services.model_host import ModelHost, ServedModel
from services.servicer_common import deadline_of
from services.tensor_codec import DEFAULT_LIMITS, array_from_bytes, describe

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME: Final = "histosynth"
SERVER_VERSION: Final = "0.1.0"
# Triton's platform names for the formats a manifest can name.
PLATFORMS: Final[Mapping[str, str]] = {
    "onnx": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch",
    "tensorrt_plan": "tensorrt_plan",
}

# Optional protocol extensions served in full (Triton's names, reported by ServerMetadata).
EXTENSIONS: Final = ("model_configuration", "statistics")
# Triton backend names per engine / format (ModelConfig.backend).
BACKENDS: Final[Mapping[str, str]] = {
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "torchscript": "pytorch",
    "tensorrt_plan": "tensorrt",
}
# Manifest dtype name -> model configuration DataType.
CONFIG_DTYPES: Final[Mapping[str, int]] = {
    "bool": config_pb.TYPE_BOOL, "uint8": config_pb.TYPE_UINT8, "int8": config_pb.TYPE_INT8,
    "int16": config_pb.TYPE_INT16, "int32": config_pb.TYPE_INT32, "int64": config_pb.TYPE_INT64,
    "float16": config_pb.TYPE_FP16, "float32": config_pb.TYPE_FP32, "float64": config_pb.TYPE_FP64,
}

# Protocol datatype -> little-endian numpy dtype.
V2_DTYPES: Final[Mapping[str, np.dtype]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# Manifest dtype name -> protocol datatype.
V2_BY_MANIFEST_DTYPE: Final[Mapping[str, str]] = {
    "bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32",
    "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
# Protocol datatype -> the InferTensorContents field carrying it (FP16 travels raw only).
CONTENTS_FIELDS: Final[Mapping[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def v2_shape(spec: TensorSpec) -> list[int]:
    """Manifest shape -> protocol shape, -1 for every named (dynamic) axis."""
    return [dim if isinstance(dim, int) else -1 for dim in spec.shape]


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=V2_BY_MANIFEST_DTYPE[spec.dtype], shape=v2_shape(spec)
    )


def decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, spec: TensorSpec
) -> np.ndarray:
    """One request input -> numpy, checked against the model's declared datatype and rank."""
    name = f"input {tensor.name!r}"
    expected_type = V2_BY_MANIFEST_DTYPE[spec.dtype]
    wanted = f"{expected_type} {v2_shape(spec)}"
    if tensor.datatype != expected_type:
        raise InvalidInputError(f"{name}: expected {wanted}, got {describe(tensor.datatype, tensor.shape)}")
    shape = [int(dim) for dim in tensor.shape]
    if len(shape) != len(spec.shape) or any(
        isinstance(dim, int) and dim != size for dim, size in zip(spec.shape, shape)
    ):
        raise InvalidInputError(f"{name}: expected {wanted}, got {describe(tensor.datatype, shape)}")
    dtype = V2_DTYPES[expected_type]
    if raw is None:
        raw = contents_to_bytes(tensor, dtype, name)
    return array_from_bytes(name, dtype, shape, raw, dtype_label=tensor.datatype)


def contents_to_bytes(tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype, name: str) -> bytes:
    """Typed ``contents`` -> little-endian bytes; the element count is checked before copying."""
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidInputError(
            f"{name}: datatype {tensor.datatype} has no typed contents field; send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    shape = [int(dim) for dim in tensor.shape]
    if any(dim < 0 for dim in shape):
        raise InvalidInputError(f"{name}: shape {shape} has negative dimensions; every size must be >= 0")
    elements = math.prod(shape)
    if elements > DEFAULT_LIMITS.max_elements:
        raise InvalidInputError(
            f"{name}: shape {shape} holds {elements} elements, more than the limit of {DEFAULT_LIMITS.max_elements}"
        )
    if len(values) != elements:
        raise InvalidInputError(
            f"{name}: contents.{field} holds {len(values)} values but shape {shape} needs {elements}"
        )
    wide = np.asarray(values)
    if dtype.kind in "iu" and wide.size and (wide.min() < np.iinfo(dtype).min or wide.max() > np.iinfo(dtype).max):
        raise InvalidInputError(f"{name}: contents.{field} has values outside the range of {tensor.datatype}")
    return wide.astype(dtype).tobytes()


SPATIAL_AXES: Final = ("height", "width")
# Runs a decoded ModelInfer for one model kind: (model, feeds, deadline) -> outputs.
TensorRunner = Callable[[ServedModel, Mapping[str, np.ndarray], "float | None"], Awaitable[dict[str, np.ndarray]]]


def check_spatial_multiple(
    feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], multiple: object, model_key: str
) -> None:
    """Height/width axes must be multiples of the model's ``size_multiple`` (strided convolutions).

    The domain API pads for the caller; at the tensor level the caller owns the tensor, so a
    bad size is refused with INVALID_ARGUMENT instead of failing inside the runtime.
    """
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 1:
        return
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            size = feeds[spec.name].shape[axis]
            if dim in SPATIAL_AXES and size % multiple:
                raise InvalidInputError(
                    f"input {spec.name!r}: {dim} {size} is not a multiple of {multiple}, which model "
                    f"{model_key} needs; pad the tensor (the domain API pads for you)"
                )


def minimum_size(kind: str, metadata: Mapping[str, object]) -> int:
    """Smallest height/width a model runs on: metadata ``min_size``, else two ``size_multiple``s for GAN
    renderers (pix2pixHD's bottleneck reflection pads need 2 x 2), else 1."""
    declared = metadata.get("min_size")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 1:
        return declared
    multiple = metadata.get("size_multiple")
    if kind == "renderer" and isinstance(multiple, int) and not isinstance(multiple, bool) and multiple >= 1:
        return 2 * multiple
    return 1


def check_spatial_minimum(
    feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], minimum: int, model_key: str
) -> None:
    """Height/width below the network's minimum fail inside the runtime (ORT Pad errors): refuse them first."""
    if minimum <= 1:
        return
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            size = feeds[spec.name].shape[axis]
            if dim in SPATIAL_AXES and size < minimum:
                raise InvalidInputError(
                    f"input {spec.name!r}: {dim} {size} is below {minimum}, the smallest size model {model_key} "
                    "runs on; pad the tensor (the domain API pads small fields for you)"
                )


class KServeV2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over one or more ModelHosts (a model name is looked up in each in turn)."""

    def __init__(
        self,
        hosts: Sequence[ModelHost],
        runners: Mapping[str, TensorRunner] | None = None,
        pipelines: Sequence[PipelineCatalog] = (),
    ) -> None:
        """``runners``: model kind -> how ModelInfer runs that kind, when not as one call (the rendering
        service tiles its GAN renderers as Render does); other kinds run whole, through memory admission.
        ``pipelines``: catalogs of the service's pipeline models (uint8 mask in, uint8 out)."""
        if not hosts:
            raise ValueError("KServeV2Servicer needs at least one ModelHost")
        self.hosts = list(hosts)
        self.runners = dict(runners or {})
        self.catalogs = list(pipelines)

    # ------------------------------------------------------------------ lookup
    def _all_names(self) -> list[str]:
        return sorted({name for host in self.hosts for name in host.model_names()} | set(self._pipelines()))

    def known_models(self) -> list[str]:
        """Every model name served here, bare and pipeline."""
        return self._all_names()

    def _pipelines(self) -> dict[str, PipelineModel]:
        models: dict[str, PipelineModel] = {}
        for catalog in self.catalogs:
            models.update(catalog.pipelines())
        return models

    def _pipeline(self, name: str) -> PipelineModel | None:
        """The pipeline model called ``name``; a bare model of that name wins (a store may hold one)."""
        if any(name in host.model_names() for host in self.hosts):
            return None
        return self._pipelines().get(name)

    def _host_for(self, name: str) -> ModelHost:
        for host in self.hosts:
            if name in host.model_names() or name in host.model_names(refresh=True):
                return host
        raise ModelNotFoundError(name, None, self._all_names())

    async def _served(self, name: str, version: str) -> ServedModel:
        if not name:
            raise InvalidInputError(f"model name is required; available: {self._all_names()}")
        return await self._host_for(name).get(name, version or None)

    # ------------------------------------------------------------------ health
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        # Ready = every hosted model answers now; a model that failed to load makes the server not ready.
        ready = all(
            not host.load_errors and all(host.is_ready(name) for name in host.model_names()) for host in self.hosts
        )
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        pipeline = self._pipeline(request.name)
        if pipeline is not None:
            return pb.ModelReadyResponse(ready=pipeline.is_ready(request.version or None))
        try:
            host = self._host_for(request.name)
        except ModelNotFoundError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=host.is_ready(request.name, request.version or None))

    # ---------------------------------------------------------------- metadata
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        # RepositoryIndex is served but model load/unload is not, so model_repository is not claimed.
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        pipeline = self._pipeline(request.name)
        if pipeline is not None:
            return pipeline_metadata(pipeline)
        host = self._host_for(request.name)
        served = await self._served(request.name, request.version)
        manifest = served.manifest
        return pb.ModelMetadataResponse(
            name=manifest.name,
            versions=host.versions(manifest.name),
            platform=PLATFORMS.get(manifest.format, manifest.format),
            inputs=[tensor_metadata(spec) for spec in manifest.inputs],
            outputs=[tensor_metadata(spec) for spec in manifest.outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        pipeline = self._pipeline(request.name)
        if pipeline is not None:
            served = await pipeline.host.get(pipeline.model, request.version or None)
            return pb.ModelConfigResponse(config=pipeline_config(pipeline, served))
        served = await self._served(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(served))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        pipelines = self._pipelines()
        if request.name and request.name not in pipelines:
            self._host_for(request.name)  # NOT_FOUND naming the hosted models when unknown
        response = pb.ModelStatisticsResponse()
        for pipeline in pipelines.values():
            for version in pipeline.versions():
                if request.name not in ("", pipeline.name) or request.version not in ("", version):
                    continue
                if pipeline.is_ready(version):  # as for bare models: versions loaded in this process
                    response.model_stats.append(model_statistics(pipeline.name, version))
        for host in self.hosts:
            for served in host.loaded():
                manifest = served.manifest
                if request.name and manifest.name != request.name:
                    continue
                if request.version and manifest.version != request.version:
                    continue
                response.model_stats.append(model_statistics(manifest.name, manifest.version))
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for host in self.hosts:
            for name in host.model_names():
                for version in host.versions(name):
                    ready = host.is_ready(name, version)
                    if request.ready and not ready:
                        continue
                    error = host.load_errors.get(f"{name}/{version}")
                    response.models.add(
                        name=name,
                        version=version,
                        state="READY" if ready else "UNAVAILABLE",
                        reason="" if ready else error or "not loaded; loads on first request",
                    )
        for pipeline in self._pipelines().values():
            for version in pipeline.versions():
                ready = pipeline.is_ready(version)
                if not request.ready or ready:
                    response.models.add(
                        name=pipeline.name, version=version, state="READY" if ready else "UNAVAILABLE",
                        reason="" if ready else f"model {pipeline.model}/{version} loads on first request",
                    )
        return response

    # ------------------------------------------------------------------- infer
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        pipeline = self._pipeline(request.model_name)
        if pipeline is not None:
            return await infer_pipeline(pipeline, request, deadline_of(context))
        served = await self._served(request.model_name, request.model_version)
        manifest = served.manifest
        feeds = self._decode_inputs(request, manifest.inputs, manifest.key)
        check_spatial_multiple(feeds, manifest.inputs, manifest.metadata.get("size_multiple"), manifest.key)
        check_spatial_minimum(feeds, manifest.inputs, minimum_size(manifest.kind, manifest.metadata), manifest.key)
        requested = [output.name for output in request.outputs]
        declared = {spec.name: spec for spec in manifest.outputs}
        unknown = [name for name in requested if name not in declared]
        if unknown:
            raise InvalidInputError(
                f"model {manifest.key} has no output(s) {unknown}; outputs: {list(declared)}"
            )
        runner = self.runners.get(manifest.kind)
        if runner is None:
            outputs = await served.infer(feeds, deadline_of(context))
        else:
            outputs = await runner(served, feeds, deadline_of(context))
        response = pb.ModelInferResponse(model_name=manifest.name, model_version=manifest.version, id=request.id)
        for name in requested or list(declared):
            array = np.ascontiguousarray(outputs[name])
            wire_type = V2_BY_MANIFEST_DTYPE[declared[name].dtype]
            response.outputs.add(name=name, datatype=wire_type, shape=list(array.shape))
            response.raw_output_contents.append(array.astype(V2_DTYPES[wire_type], copy=False).tobytes())
        return response

    @staticmethod
    def _decode_inputs(
        request: pb.ModelInferRequest, specs: Sequence[TensorSpec], model_key: str
    ) -> dict[str, np.ndarray]:
        expected = [spec.name for spec in specs]
        given = [tensor.name for tensor in request.inputs]
        if sorted(given) != sorted(expected):
            raise InvalidInputError(f"model {model_key} takes inputs {expected}, got {given}")
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidInputError(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                "send one per input, in the order of inputs"
            )
        by_name = {spec.name: spec for spec in specs}
        feeds = {}
        for position, tensor in enumerate(request.inputs):
            feeds[tensor.name] = decode_input(tensor, raw[position] if raw else None, by_name[tensor.name])
        return feeds


def pipeline_metadata(pipeline: PipelineModel) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=pipeline.name, versions=pipeline.versions(), platform=PIPELINE_PLATFORM,
        inputs=[tensor(name=spec.name, datatype=spec.datatype, shape=list(spec.shape)) for spec in pipeline.inputs],
        outputs=[tensor(name=spec.name, datatype=spec.datatype, shape=list(spec.shape)) for spec in pipeline.outputs],
    )


def pipeline_config(pipeline: PipelineModel, served: ServedModel) -> config_pb.ModelConfig:
    """A pipeline model's configuration in Triton's shape: batch axis implicit, parameters listed."""
    config = config_pb.ModelConfig(
        name=pipeline.name, platform=PIPELINE_PLATFORM, backend="histosynth", max_batch_size=served.max_batch_size,
        model_transaction_policy=config_pb.ModelTransactionPolicy(decoupled=False),
    )
    for spec in pipeline.inputs:
        config.input.add(name=spec.name, data_type=config_pb.DataType.Value(f"TYPE_{spec.datatype}"),
                         dims=list(spec.shape[1:]), optional=spec.optional)
    for spec in pipeline.outputs:
        config.output.add(name=spec.name, data_type=config_pb.DataType.Value(f"TYPE_{spec.datatype}"),
                          dims=list(spec.shape[1:]))
    manifest = served.manifest
    parameters = {
        "histosynth_kind": "pipeline",
        "histosynth_model": manifest.name,
        "histosynth_version": manifest.version,
        "histosynth_sha256": manifest.sha256,
        "histosynth_parameters": pipeline.describe_parameters(),
        "histosynth_inputs": pipeline.describe_inputs(),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def parameter_value(name: str, parameter: pb.InferParameter) -> object:
    choice = parameter.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidInputError(f"parameter {name[:100]!r} has no value; set one of bool/int64/double/string")
    return getattr(parameter, choice)


async def infer_pipeline(
    pipeline: PipelineModel, request: pb.ModelInferRequest, deadline: float | None
) -> pb.ModelInferResponse:
    """ModelInfer on a pipeline model: checks, decodes, runs the domain pipeline, returns its uint8 outputs."""
    given = {tensor.name: (tensor.datatype, [int(dim) for dim in tensor.shape]) for tensor in request.inputs}
    if len(given) != len(request.inputs):
        raise InvalidInputError(f"model {pipeline.name}: an input is sent twice; send each once")
    pipeline.check_inputs(given)
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of inputs"
        )
    parameters = pipeline.parse_parameters(
        {name: parameter_value(name, value) for name, value in request.parameters.items()}
    )
    requested = [output.name for output in request.outputs]
    pipeline.check_outputs(requested, parameters)
    inputs = {}
    for position, tensor in enumerate(request.inputs):
        name, dtype = f"input {tensor.name!r}", V2_DTYPES[tensor.datatype]
        data = raw[position] if raw else contents_to_bytes(tensor, dtype, name)
        inputs[tensor.name] = array_from_bytes(name, dtype, given[tensor.name][1], data, dtype_label=tensor.datatype)
    version = request.model_version or pipeline.versions()[-1]
    stats = metrics.inference_stats(pipeline.name, version)
    started = time.perf_counter()
    try:
        result = await pipeline.run(request.model_version, inputs, parameters, deadline)
    except BaseException:
        stats.failure()
        raise
    stats.success(time.perf_counter() - started)
    declared = {spec.name: spec for spec in pipeline.outputs}
    response = pb.ModelInferResponse(model_name=pipeline.name, model_version=result.ref.version, id=request.id)
    response.parameters["histosynth_model"].string_param = f"{result.ref.name}/{result.ref.version}"
    response.parameters["histosynth_sha256"].string_param = result.ref.sha256
    for name in requested or list(result.outputs):
        array = np.ascontiguousarray(result.outputs[name], dtype=V2_DTYPES[declared[name].datatype])
        response.outputs.add(name=name, datatype=declared[name].datatype, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


def model_config(served: ServedModel) -> config_pb.ModelConfig:
    """A served model's configuration in Triton's shape; the batch axis is implicit (max_batch_size > 0)."""
    manifest = served.manifest
    instances = served.pool.instances
    engine = manifest.format
    if manifest.format == "onnx":
        engine = "openvino" if any(info.provider.startswith("openvino") for info in instances) else "onnxruntime"
    config = config_pb.ModelConfig(
        name=manifest.name,
        platform="openvino" if engine == "openvino" else PLATFORMS.get(manifest.format, manifest.format),
        backend=BACKENDS.get(engine, engine),
        max_batch_size=served.max_batch_size,
        default_model_filename=manifest.file,
        dynamic_batching=config_pb.ModelDynamicBatching(
            max_queue_delay_microseconds=int(served.batcher.config.max_queue_delay_ms * 1000)
        ),
        model_transaction_policy=config_pb.ModelTransactionPolicy(decoupled=False),
    )
    for spec in manifest.inputs:
        config.input.add(name=spec.name, data_type=CONFIG_DTYPES[spec.dtype], dims=v2_shape(spec)[1:])
    for spec in manifest.outputs:
        config.output.add(name=spec.name, data_type=CONFIG_DTYPES[spec.dtype], dims=v2_shape(spec)[1:])
    by_device: dict[str, int] = {}
    for info in instances:
        by_device[info.device] = by_device.get(info.device, 0) + 1
    for device, count in sorted(by_device.items()):
        gpu = device.startswith("cuda")
        config.instance_group.add(
            name=f"{manifest.name}_{device.replace(':', '')}", count=count,
            kind=config_pb.ModelInstanceGroup.KIND_GPU if gpu else config_pb.ModelInstanceGroup.KIND_CPU,
            gpus=[int(device.split(":")[1])] if gpu else [],
        )
    parameters = {
        "histosynth_version": manifest.version,
        "histosynth_kind": manifest.kind,
        "histosynth_sha256": manifest.sha256,
        "histosynth_runtime": ",".join(sorted({info.provider for info in instances})),
        "histosynth_precision": ",".join(sorted({info.precision for info in instances})),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def model_statistics(name: str, version: str) -> pb.ModelStatistics:
    """Cumulative statistics of one loaded model version (Triton's ModelStatistics shape)."""
    stats = metrics.inference_stats(name, version).snapshot()
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=stats["last_success_ms"],
        inference_count=stats["success_count"],
        execution_count=stats["execution_count"],
        inference_stats=pb.InferStatistics(
            success=duration(count=stats["success_count"], ns=stats["success_ns"]),
            fail=duration(count=stats["fail_count"], ns=0),
            queue=duration(count=stats["queue_count"], ns=stats["queue_ns"]),
            compute_input=duration(count=stats["compute_count"], ns=0),
            compute_infer=duration(count=stats["compute_count"], ns=stats["compute_ns"]),
            compute_output=duration(count=stats["compute_count"], ns=0),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(count=count, ns=ns))
            for size, (count, ns) in sorted(stats["batches"].items())
        ],
    )


def kserve_registration(servicer: KServeV2Servicer) -> ServiceRegistration:
    """The gRPC service and its REST binding (served on HISTOSYNTH_HTTP_PORT) over one servicer."""
    from services.kserve_rest import KServeRestBinding  # it transcodes onto this module: imported late (cycle)

    return ServiceRegistration(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, SERVICE_NAME,
                               http=KServeRestBinding(servicer).add_routes)
