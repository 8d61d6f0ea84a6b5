"""A TorchServe archive of a shipped model, served by real TorchServe on loopback, computes what our runtime does.

Builds renderer-he-nuclei's .mar (training/export/torchserve_archive.py), starts `torchserve --start` through
deploy/torchserve/launcher.py (every listener, REST inference/management/metrics and gRPC inference/management,
on 127.0.0.1 at a free port; waits for /ping Healthy and a READY worker), POSTs a renderer input built the way the rendering service
builds it (mask_ops.build_generator_input with noise_label from the request seed), and compares the output
with services.core.runtimes OnnxRuntime.infer on the same input. The launcher's stop (`torchserve --stop`, then
waiting for the frontend and its workers to exit) runs in a finally block. Skipped only when java or torchserve is absent.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.core import mask_ops
from services.core.model_store import ModelManifest, ModelStore
from services.core.runtimes.onnxruntime import OnnxRuntime

MODEL = "renderer-he-nuclei"
SHIPPED_STORE = Path(__file__).resolve().parents[2] / "model_store"
SEED = 1234
BATCH_HEADER = "X-Histosynth-Batched-Requests"
# TorchServe gathers up to BATCH_SIZE requests, waiting at most BATCH_DELAY_MS after the first.
BATCH_SIZE = 3
BATCH_DELAY_MS = 500
READY_TIMEOUT_S = 45.0

# psutil comes with torchserve (its launcher needs it): without it torchserve is not installed.
pytest.importorskip("psutil", reason="torchserve is not installed (its dependency psutil is missing)")
from deploy.torchserve import launcher  # noqa: E402 - needs psutil, checked above

TORCHSERVE = launcher.torchserve_executable()
JAVA = shutil.which("java")

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(JAVA is None, reason="TorchServe needs java (JDK 17), not found on PATH"),
    pytest.mark.skipif(TORCHSERVE is None, reason="torchserve is not installed (pip install torchserve==0.12.0)"),
    pytest.mark.skipif(not (SHIPPED_STORE / MODEL).is_dir(), reason=f"{MODEL} is not in model_store/"),
]


def renderer_input(manifest: ModelManifest, seed: int, size: int) -> np.ndarray:
    """float32 [1, C, size, size]: what RenderingPipeline feeds the model for one tile and ``seed``."""
    metadata = manifest.metadata
    rng = np.random.default_rng(seed)
    instances = np.zeros((size, size), np.int32)
    classes = np.zeros((size, size), np.uint8)
    for instance_id in range(1, 25):  # round nuclei of random classes at random places
        row, col = rng.integers(8, size - 8, size=2)
        radius = int(rng.integers(3, 8))
        yy, xx = np.ogrid[:size, :size]
        disk = (yy - row) ** 2 + (xx - col) ** 2 <= radius**2
        instances[disk] = instance_id
        classes[disk] = rng.integers(1, metadata["num_classes"])
    noise = mask_ops.noise_label((size, size), float(metadata["noise_spacing"]), seed)
    edges = mask_ops.instance_edges(instances) if metadata["use_instance_edges"] else None
    label = mask_ops.build_generator_input(classes, metadata["num_classes"], noise, edges)
    return label[None].astype(np.float32)


def wire(array: np.ndarray) -> dict[str, object]:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": base64.b64encode(little.tobytes()).decode()}


def from_wire(tensor: dict[str, object]) -> np.ndarray:
    raw = base64.b64decode(str(tensor["data"]))
    return np.frombuffer(raw, dtype=np.dtype(str(tensor["dtype"])).newbyteorder("<")).reshape(tensor["shape"])


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    batched_requests: str | None  # the handler's X-Histosynth-Batched-Requests header


def post(url: str, body: bytes) -> Reply:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, json.loads(response.read()), response.headers.get(BATCH_HEADER))
    except urllib.error.HTTPError as error:
        return Reply(error.code, json.loads(error.read() or b"{}"), None)


def infer_request(url: str, input_name: str, batch: np.ndarray) -> Reply:
    return post(url, json.dumps({"inputs": {input_name: wire(batch)}}).encode())


def test_torchserve_archive_serves_same_output_as_onnx_runtime(tmp_path: Path) -> None:
    from training.export.torchserve_archive import ArchiveSettings, build_archive  # imports the torch-side package

    manifest = ModelStore(SHIPPED_STORE).get(MODEL)
    store = tmp_path / "store"
    archive = build_archive(manifest, store, ArchiveSettings(batch_size=BATCH_SIZE, max_batch_delay_ms=BATCH_DELAY_MS))
    assert archive.name == f"{MODEL}.mar"

    runtime = OnnxRuntime(manifest.path, manifest.inputs, manifest.outputs)
    tile = int(manifest.metadata["tile_size"])
    single = renderer_input(manifest, SEED, tile)
    pair = np.concatenate([renderer_input(manifest, SEED + 1, tile), renderer_input(manifest, SEED + 2, tile)])
    larger = renderer_input(manifest, SEED + 3, 2 * tile)
    input_name, output_name = manifest.inputs[0].name, manifest.outputs[0].name

    started = time.monotonic()
    server = launcher.start(store, {MODEL: archive.name}, tmp_path / "torchserve", ready_timeout_s=READY_TIMEOUT_S)
    try:
        print(f"TorchServe ready {time.monotonic() - started:.1f} s after --start")

        url = server.prediction_url(MODEL)
        # Three requests at once: TorchServe hands them to the handler as one batch; the two tile-sized
        # ones share one model call ([1 + 2, C, tile, tile]), the larger one runs on its own.
        requests = [single, pair, larger]
        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda batch: infer_request(url, input_name, batch), requests))
        for batch, reply in zip(requests, replies):
            assert reply.status == 200, reply.body
            assert reply.body["model"] == MODEL and reply.body["version"] == manifest.version
            served = from_wire(reply.body["outputs"][output_name])
            ours = runtime.infer({input_name: batch})[output_name]
            assert served.shape == ours.shape and served.dtype == ours.dtype
            # Same file, same ONNX Runtime, same session options, per-sample independent: bytes must agree.
            np.testing.assert_array_equal(served, ours)
        assert [reply.batched_requests for reply in replies] == ["2", "2", "1"]

        bad = infer_request(url, input_name, single[:, :3])
        assert bad.status == 400 and "size 3 on axis 1" in str(bad.body.get("error")), bad.body
    finally:
        killed = server.stop(timeout_s=20)
        runtime.close()
    assert not killed, f"TorchServe processes still running 20 s after --stop (killed): {killed}"
