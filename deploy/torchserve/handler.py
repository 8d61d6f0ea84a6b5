"""TorchServe handler for a histosynth model archive: a thin tensor-level adapter over ONNX Runtime (CPU).

TorchServe archives are an optional output (DESIGN.md), not our serving path: this handler only moves
tensors in and out of the archived ``model.onnx``. Pre/post-processing (mask encoding, tiling, thresholds)
stays with the caller, exactly as for the KServe v2 API of our own services.

The archive (built by ``training/export/torchserve_archive.py``) holds ``model.onnx`` as the serialized
file and our ``manifest.yaml`` as an extra file; the manifest gives input/output names, dtypes, shapes
and ``max_batch_size``. This file is self-contained (onnxruntime, numpy, pyyaml): it is copied into the
archive and runs in TorchServe's worker, which need not have histosynth installed.

Wire format, request body (``Content-Type: application/json``)::

    {"inputs": {"<input name>": {"dtype": "float32", "shape": [N, ...], "data": "<base64>"}, ...}}

``data`` is the tensor's raw bytes, little-endian, C order; every input of the model must be present,
with the manifest's dtype (no silent casts), rank and fixed dimensions, and axis 0 is the batch. The
response has the same form under ``"outputs"``, plus ``"model"`` and ``"version"``. A malformed request
gets HTTP 400 with ``{"error": "..."}`` naming the tensor and the bad value, and a failing model call
(e.g. a spatial size the network cannot take) HTTP 500 with the ONNX Runtime message; either way the
other requests of the same TorchServe batch are unaffected.

Batching: TorchServe hands the handler a list of requests (``batchSize`` in the archive's model config).
Requests whose inputs agree on every non-batch dimension are concatenated on axis 0 and run together,
in calls of at most the manifest's ``max_batch_size`` samples, then split back per request; the response
header ``X-Histosynth-Batched-Requests`` says how many requests shared the call. ONNX Runtime
computes each sample independently of its batch neighbours, so batching does not change the bytes.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml
from ts.torch_handler.base_handler import BaseHandler

_log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.yaml"
# Manifest dtype names -> little-endian numpy dtypes of the bytes on the wire (services/core/runtimes/base.py).
WIRE_DTYPES = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
# Response header: the number of requests whose samples ran in the same batched model call(s).
BATCH_HEADER = "X-Histosynth-Batched-Requests"
# Bound on one request's elements per tensor (1 GiB of float32): refuses absurd shapes before allocating.
MAX_ELEMENTS = 1 << 28


def decode_tensor(name: str, spec: dict[str, Any], payload: Any) -> np.ndarray:
    """One wire tensor -> numpy array in native byte order; raises ValueError naming ``name``."""
    if not isinstance(payload, dict):
        raise ValueError(f"input {name!r}: expected an object with dtype, shape, data; got {type(payload).__name__}")
    dtype_name, shape, data = payload.get("dtype"), payload.get("shape"), payload.get("data")
    if dtype_name != spec["dtype"]:
        raise ValueError(f"input {name!r}: dtype {dtype_name!r}, model expects {spec['dtype']}")
    if not isinstance(shape, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape):
        raise ValueError(f"input {name!r}: shape must be a list of integers, got {shape!r}")
    expected = spec["shape"]
    if len(shape) != len(expected):
        raise ValueError(f"input {name!r}: shape {shape} has rank {len(shape)}, model expects {expected}")
    for axis, (size, dim) in enumerate(zip(shape, expected)):
        if size <= 0 or (isinstance(dim, int) and size != dim):
            raise ValueError(f"input {name!r}: size {size} on axis {axis}, model expects {expected}")
    count = int(np.prod(shape, dtype=np.int64))
    if count > MAX_ELEMENTS:
        raise ValueError(f"input {name!r}: {count} elements exceed the limit of {MAX_ELEMENTS}")
    if not isinstance(data, str):
        raise ValueError(f"input {name!r}: data must be a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as error:
        raise ValueError(f"input {name!r}: data is not valid base64 ({error})") from error
    wire_dtype = WIRE_DTYPES[spec["dtype"]]
    if len(raw) != count * wire_dtype.itemsize:
        raise ValueError(
            f"input {name!r}: {len(raw)} bytes, shape {shape} of {spec['dtype']} needs {count * wire_dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=wire_dtype).reshape(shape).astype(wire_dtype.newbyteorder("="), copy=False)


def encode_tensor(array: np.ndarray, dtype_name: str) -> dict[str, Any]:
    wire = np.ascontiguousarray(array, dtype=WIRE_DTYPES[dtype_name])
    return {"dtype": dtype_name, "shape": list(wire.shape), "data": base64.b64encode(wire.tobytes()).decode("ascii")}


class HistosynthOnnxHandler(BaseHandler):
    """Loads the archive's ONNX model with ONNX Runtime on CPU and serves it tensor in, tensor out."""

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties.get("model_dir")
        manifest_path = os.path.join(model_dir, MANIFEST_FILE)
        with open(manifest_path, encoding="utf-8") as stream:
            self.histosynth_manifest = yaml.safe_load(stream)
        manifest = self.histosynth_manifest
        if manifest.get("format") != "onnx":
            raise RuntimeError(f"{manifest_path}: format {manifest.get('format')!r}; this handler serves onnx only")
        for spec in manifest["inputs"] + manifest["outputs"]:
            if spec["dtype"] not in WIRE_DTYPES:
                raise RuntimeError(f"{manifest_path}: tensor {spec['name']!r} has unsupported dtype {spec['dtype']!r}")
        self.input_specs = list(manifest["inputs"])
        self.output_specs = list(manifest["outputs"])
        self.max_batch_size = int(manifest["max_batch_size"])

        # The same session settings as services/core/runtimes/onnxruntime.py, so the archive computes
        # the same numbers as our services for the same input.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(os.environ.get("HISTOSYNTH_INTRA_OP_THREADS", "0"))
        options.log_severity_level = 2
        model_path = os.path.join(model_dir, manifest["file"])
        self.session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
        found = sorted(arg.name for arg in self.session.get_inputs())
        declared = sorted(spec["name"] for spec in self.input_specs)
        if found != declared:
            raise RuntimeError(f"{model_path}: model inputs are {found}, manifest declares {declared}")
        self.manifest = context.manifest
        self.initialized = True
        _log.info("loaded %s version %s from %s", manifest["name"], manifest["version"], model_path)

    def parse_request(self, request: dict[str, Any]) -> dict[str, np.ndarray]:
        body = request.get("body", request.get("data"))
        if isinstance(body, (bytes, bytearray, str)):
            try:
                body = json.loads(body)
            except ValueError as error:
                raise ValueError(f"request body is not JSON ({error})") from error
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
            raise ValueError('request body must be a JSON object {"inputs": {name: tensor, ...}}')
        given = body["inputs"]
        expected = [spec["name"] for spec in self.input_specs]
        if sorted(given) != sorted(expected):
            raise ValueError(f"inputs {sorted(given)} do not match the model's {expected}")
        feeds = {spec["name"]: decode_tensor(spec["name"], spec, given[spec["name"]]) for spec in self.input_specs}
        batch_sizes = {array.shape[0] for array in feeds.values()}
        if len(batch_sizes) != 1:
            raise ValueError(f"inputs disagree on the batch size (axis 0): {sorted(batch_sizes)}")
        return feeds

    def run_batched(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Concatenate same-shaped requests, run in chunks of ``max_batch_size``, split back per request."""
        joined = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
        total = next(iter(joined.values())).shape[0]
        names = [spec["name"] for spec in self.output_specs]
        chunks = []
        for start in range(0, total, self.max_batch_size):
            chunk = {name: array[start : start + self.max_batch_size] for name, array in joined.items()}
            chunks.append(self.session.run(names, chunk))
        outputs = {name: np.concatenate([chunk[index] for chunk in chunks]) for index, name in enumerate(names)}
        results, start = [], 0
        for feed in feeds:
            count = next(iter(feed.values())).shape[0]
            results.append({name: array[start : start + count] for name, array in outputs.items()})
            start += count
        return results

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        responses: list[str | None] = [None] * len(data)
        # Group valid requests by their non-batch shapes: only those can share one model call.
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, request in enumerate(data):
            context.set_response_content_type(index, "application/json")
            try:
                feeds = self.parse_request(request)
            except ValueError as error:
                context.set_response_status(400, "Bad Request", index)
                responses[index] = json.dumps({"error": str(error)})
                continue
            key = tuple((name, array.shape[1:]) for name, array in feeds.items())
            groups.setdefault(key, []).append((index, feeds))

        manifest = self.histosynth_manifest
        for members in groups.values():
            try:
                results = self.run_batched([feeds for _, feeds in members])
            except Exception as error:  # ORT raises its own types; fail this group only, not the whole batch
                _log.exception("model call failed for %d request(s)", len(members))
                for index, _ in members:
                    context.set_response_status(500, "Internal Server Error", index)
                    responses[index] = json.dumps({"error": f"model call failed: {error}"})
                continue
            for (index, _), outputs in zip(members, results):
                # How many requests shared this model call: lets an operator see batching at work.
                context.set_response_header(index, BATCH_HEADER, str(len(members)))
                encoded = {
                    spec["name"]: encode_tensor(outputs[spec["name"]], spec["dtype"]) for spec in self.output_specs
                }
                responses[index] = json.dumps(
                    {"model": manifest["name"], "version": str(manifest["version"]), "outputs": encoded},
                    separators=(",", ":"),
                )
        return responses  # type: ignore[return-value]
