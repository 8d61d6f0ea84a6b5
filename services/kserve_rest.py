"""KServe / Triton Open Inference Protocol v2 over HTTP/REST (KServe's default protocol).

A transcoder, like grpc-gateway: each route turns the HTTP request into the GRPCInferenceService
message, calls the same KServeV2Servicer the gRPC port serves, and writes the answer as the REST
binding's JSON. So both protocols share every model, pipeline model, check and error message, and
a REST infer shares the models' batchers with gRPC and domain calls. Served on the HTTP companion
port of the gRPC server (services.core.http_server: HISTOSYNTH_HTTP_PORT, same TLS / token / drain;
errors are ``{"error": "..."}`` with 400 / 404 / 429 / 503 ... from the gRPC status).

Routes (``{m}`` = ``/v2/models/{name}`` or ``/v2/models/{name}/versions/{version}``):
  GET  /v2/health/live, /v2/health/ready     200, or 503 when not ready
  GET  /v2                                   server metadata
  GET  {m}, {m}/ready, {m}/config, {m}/stats  model metadata, readiness (200/503), Triton config, statistics
  GET  /v2/models/stats                      statistics of every loaded model
  POST /v2/repository/index                  [{name, version, state, reason}]
  POST {m}/infer                             JSON tensors, and the binary tensor extension that
                                             tritonclient.http uses (Inference-Header-Content-Length)

Infer: each input has ``data`` (a flat or nested JSON list) or ``parameters.binary_data_size`` (its
bytes follow the JSON header, in input order). Outputs come as JSON ``data`` unless asked for in
binary (``outputs[i].parameters.binary_data`` or request ``parameters.binary_data_output``). Request
``parameters`` reach the model (a pipeline model's seed, steps, ...); ``parameters.timeout`` (µs, as
tritonclient.http sends it) becomes the call's deadline.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from services._generated.inference import grpc_service_pb2 as pb
from services.core.errors import InvalidInputError, ModelNotFoundError
from services.kserve_v2 import V2_DTYPES, KServeV2Servicer

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
# Only REST has binary tensors; the other extensions are the servicer's.
REST_EXTENSIONS: Final = ("binary_tensor_data",)
INT64_RANGE: Final = (-(2**63), 2**63 - 1)


class HttpCallContext:
    """What the servicer asks of its call context (the remaining time), for a REST call."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


def _json(payload: object, status: int = 200) -> web.Response:
    return web.json_response(payload, status=status)


def _message_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def tensor_json(tensor: pb.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": [int(dim) for dim in tensor.shape]}


def json_data_to_bytes(name: str, datatype: str, shape: list[int], data: object) -> bytes:
    """An input's JSON ``data`` (flat or nested list) -> little-endian bytes of ``datatype``, values range-checked."""
    dtype = V2_DTYPES[datatype]
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInputError(f"input {name!r}: data is not a regular list of numbers") from None
    if values.dtype == object or values.dtype.kind in "USV":
        raise InvalidInputError(f"input {name!r}: data must hold numbers (or true/false for BOOL)")
    if values.size != math.prod(shape):
        raise InvalidInputError(f"input {name!r}: data holds {values.size} values but shape {shape} needs "
                                f"{math.prod(shape)}")
    kinds = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}[dtype.kind]
    if values.size and values.dtype.kind not in kinds:
        raise InvalidInputError(f"input {name!r}: {datatype} data cannot hold {values.dtype.name} values")
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidInputError(f"input {name!r}: data has values outside the range of {datatype}")
    return values.astype(dtype).tobytes()


def _parameter(name: str, value: object, target: pb.InferParameter) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            raise InvalidInputError(f"parameter {name[:100]!r}: {value} does not fit in 64 bits")
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidInputError(f"parameter {name[:100]!r} must be a boolean, number or string, got {value!r:.100}")


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return value


class InferTranscoder:
    """A REST infer body -> pb.ModelInferRequest, and the response back (JSON or binary)."""

    def __init__(self, body: bytes, header_length: str | None) -> None:
        if header_length is None:
            header, self.binary = body, b""
        else:
            try:
                length = int(header_length)
            except ValueError:
                length = -1
            if not 0 <= length <= len(body):
                raise InvalidInputError(f"{HEADER_LENGTH} must be the JSON header's length in bytes, between 0 "
                                        f"and the body's {len(body)}; got {header_length[:40]!r}")
            header, self.binary = body[:length], body[length:]
        try:
            self.doc = _object(json.loads(header or b"{}"), "the request body")
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidInputError(f"the request body is not valid JSON: {error}") from None
        self.binary_outputs: set[str] = set()
        self.all_binary = False

    def request(self, model: str, version: str) -> tuple[pb.ModelInferRequest, float | None]:
        doc = self.doc
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=str(doc.get("id", ""))[:1000])
        deadline = None
        for key, value in _object(doc.get("parameters", {}), "parameters").items():
            if key == "binary_data_output":
                self.all_binary = bool(value)
            elif key == "timeout" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                deadline = time.monotonic() + value / 1e6  # tritonclient.http sends microseconds
            else:
                _parameter(key, value, request.parameters[key])
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise InvalidInputError('"inputs" must be a non-empty list of {name, datatype, shape, data} objects')
        offset = 0
        for position, item in enumerate(inputs):
            item = _object(item, f"inputs[{position}]")
            name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
            if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) or not all(
                isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
            ):
                raise InvalidInputError(f"inputs[{position}] needs a name (string), datatype (string) and shape "
                                        "(list of non-negative integers)")
            if datatype not in V2_DTYPES:
                raise InvalidInputError(f"input {name[:100]!r}: datatype {datatype[:20]!r} is not served; "
                                        f"valid: {list(V2_DTYPES)}")
            size = _object(item.get("parameters", {}), f"inputs[{position}].parameters").get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or size < 0 or offset + size > len(self.binary):
                    raise InvalidInputError(
                        f"input {name[:100]!r}: binary_data_size {size!r} runs past the {len(self.binary)} binary "
                        f"bytes after the JSON header (offset {offset})")
                data = self.binary[offset:offset + size]
                offset += size
            elif "data" in item:
                data = json_data_to_bytes(name[:100], datatype, shape, item["data"])
            else:
                raise InvalidInputError(f"input {name[:100]!r} has neither data nor parameters.binary_data_size")
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(data)
        if offset != len(self.binary):
            raise InvalidInputError(f"{len(self.binary) - offset} binary bytes after the JSON header belong to no "
                                    "input; check each input's binary_data_size")
        for position, item in enumerate(doc.get("outputs") or []):
            item = _object(item, f"outputs[{position}]")
            name = item.get("name")
            if not isinstance(name, str):
                raise InvalidInputError(f"outputs[{position}] needs a name (string)")
            request.outputs.add(name=name)
            if _object(item.get("parameters", {}), f"outputs[{position}].parameters").get("binary_data"):
                self.binary_outputs.add(name)
        return request, deadline

    def response(self, answer: pb.ModelInferResponse) -> web.Response:
        payload: dict[str, Any] = {"model_name": answer.model_name, "model_version": answer.model_version}
        if answer.id:
            payload["id"] = answer.id
        if answer.parameters:
            payload["parameters"] = {key: getattr(value, value.WhichOneof("parameter_choice"))
                                     for key, value in answer.parameters.items()}
        chunks: list[bytes] = []
        outputs = []
        for tensor, raw in zip(answer.outputs, answer.raw_output_contents, strict=True):
            entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                     "shape": [int(dim) for dim in tensor.shape]}
            if self.all_binary or tensor.name in self.binary_outputs:
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = np.frombuffer(raw, V2_DTYPES[tensor.datatype]).tolist()
            outputs.append(entry)
        payload["outputs"] = outputs
        header = json.dumps(payload).encode()
        if not chunks:
            return web.Response(body=header, content_type="application/json")
        return web.Response(body=b"".join([header, *chunks]), content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(len(header))})


class KServeRestBinding:
    """The v2 REST routes over one KServeV2Servicer (add them with :meth:`add_routes`)."""

    def __init__(self, servicer: KServeV2Servicer) -> None:
        self.servicer = servicer
        self.context = HttpCallContext()

    def add_routes(self, app: web.Application) -> None:
        get, post = app.router.add_get, app.router.add_post
        get("/v2/health/live", self.live)
        get("/v2/health/ready", self.ready)
        get("/v2", self.server_metadata)
        get("/v2/models/stats", self.statistics)  # before /v2/models/{name}, which would match it
        post("/v2/repository/index", self.repository_index)
        routes: list[tuple[str, Callable[[web.Request], Awaitable[web.Response]], Callable[..., Any]]] = [
            ("", self.model_metadata, get), ("/ready", self.model_ready, get), ("/config", self.model_config, get),
            ("/stats", self.statistics, get), ("/infer", self.infer, post),
        ]
        for suffix, handler, add in routes:
            add("/v2/models/{name}" + suffix, handler)
            add("/v2/models/{name}/versions/{version}" + suffix, handler)

    @staticmethod
    def _model(request: web.Request) -> tuple[str, str]:
        return request.match_info["name"], request.match_info.get("version", "")

    async def live(self, request: web.Request) -> web.Response:
        answer = await self.servicer.ServerLive(pb.ServerLiveRequest(), self.context)
        return _json({"live": answer.live}, 200 if answer.live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        answer = await self.servicer.ServerReady(pb.ServerReadyRequest(), self.context)
        return _json({"ready": answer.ready}, 200 if answer.ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        answer = await self.servicer.ServerMetadata(pb.ServerMetadataRequest(), self.context)
        return _json({"name": answer.name, "version": answer.version,
                      "extensions": [*answer.extensions, *REST_EXTENSIONS]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        answer = await self.servicer.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), self.context)
        return _json({"name": answer.name, "versions": list(answer.versions), "platform": answer.platform,
                      "inputs": [tensor_json(t) for t in answer.inputs],
                      "outputs": [tensor_json(t) for t in answer.outputs]})

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        answer = await self.servicer.ModelReady(pb.ModelReadyRequest(name=name, version=version), self.context)
        if not answer.ready and name not in self.servicer.known_models():
            raise ModelNotFoundError(name, None, self.servicer.known_models())
        return _json({"name": name, "ready": answer.ready}, 200 if answer.ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        answer = await self.servicer.ModelConfig(pb.ModelConfigRequest(name=name, version=version), self.context)
        return _json(_message_json(answer.config))  # Triton's REST answers the config itself, not {"config": ...}

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("name", ""), request.match_info.get("version", "")
        answer = await self.servicer.ModelStatistics(
            pb.ModelStatisticsRequest(name=name, version=version), self.context)
        return _json({"model_stats": _message_json(answer).get("model_stats", [])})

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            doc = _object(json.loads(body or b"{}"), "the request body")
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidInputError(f"the request body is not valid JSON: {error}") from None
        answer = await self.servicer.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=bool(doc.get("ready", False))), self.context)
        return _json([{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                      for m in answer.models])

    async def infer(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        transcoder = InferTranscoder(await request.read(), request.headers.get(HEADER_LENGTH))
        message, deadline = transcoder.request(name, version)
        answer = await self.servicer.ModelInfer(message, HttpCallContext(deadline))
        return transcoder.response(answer)
