"""KServe v2 REST binding on the refinement and rendering servers (the HTTP companion of the gRPC port).

Real servers on loopback over the fixture models: the stock tritonclient.http in a subprocess
(tritonclient_pipeline_probe.py) for the pipeline models, aiohttp's client in-process for the routes,
JSON and binary tensors, error statuses, the token and TLS.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from services._generated.histosynth.v1 import mask_refinement_pb2, mask_refinement_pb2_grpc
from services.mask_rendering import servicer as rendering
from services.tensor_codec import array_to_tensor, tensor_to_array
from tests.fixtures.service_models import REFINER_NAME, RENDERER_NAME, RENDERER_TILE_SIZE, renderer_channels
from tests.integration.conftest import LiveServer, live_server
from tests.integration.test_kserve_pipelines import class_masks, domain_render, run_pipeline_probe
from tests.unit.core import test_security
from tests.unit.core.test_security import TOKEN, Pki

pytestmark = pytest.mark.asyncio(loop_scope="module")
# The security tests' token file and certificates (CA, server certificate with SAN 127.0.0.1).
token_file = test_security.token_file
pki = test_security.pki
PIPELINE = f"{RENDERER_NAME}-pipeline"
HEADER = "Inference-Header-Content-Length"


def base(live: LiveServer, scheme: str = "http") -> str:
    assert live.running.http_port is not None
    return f"{scheme}://127.0.0.1:{live.running.http_port}"


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as response:
        body = await response.read()
        if response.headers.get(HEADER):
            return response.status, (body, int(response.headers[HEADER]))
        return response.status, json.loads(body) if body else None


# ------------------------------------------------------------------------------ tritonclient.http
async def test_tritonclient_http_gets_render_bytes_from_the_pipeline_model(
    rendering_server: LiveServer, tmp_path: Path
) -> None:
    masks = class_masks(2, RENDERER_TILE_SIZE + 8, seed=3)
    seen = await run_pipeline_probe("http", f"127.0.0.1:{rendering_server.running.http_port}", PIPELINE,
                                    {"class_masks": masks}, {"seed": 7}, ["images"], tmp_path)
    np.testing.assert_array_equal(seen["arrays"]["images"], await domain_render(rendering_server, masks, seed=7))
    assert seen["ready"] and seen["model_ready"]
    assert {(m["name"], m["state"]) for m in seen["index"]} >= {(PIPELINE, "READY"), (RENDERER_NAME, "READY")}
    assert seen["metadata"]["inputs"][0] == {"name": "class_masks", "datatype": "UINT8", "shape": [-1, -1, -1]}
    assert seen["config"]["parameters"]["histosynth_model"]["string_value"] == RENDERER_NAME
    response = seen["response"]
    assert response["model_name"] == PIPELINE and response["id"] == "pipeline-1"
    assert response["parameters"]["histosynth_model"] == f"{RENDERER_NAME}/1"
    assert seen["wrong_datatype"]["status"] == "400"
    assert "input 'class_masks' of model renderer-test-pipeline: expected UINT8" in seen["wrong_datatype"]["message"]
    assert seen["unknown_parameter"]["status"] == "400" and "has no parameter 'sed'" in seen["unknown_parameter"]["message"]
    assert seen["bad_parameter"]["status"] == "400"
    assert seen["again_equal"]


async def test_tritonclient_http_refiner_pipeline_equals_refine(refinement_server: LiveServer, tmp_path: Path) -> None:
    coarse = (np.random.default_rng(4).random((2, 16, 16)) > 0.5).astype(np.uint8)
    seen = await run_pipeline_probe("http", f"127.0.0.1:{refinement_server.running.http_port}",
                                    f"{REFINER_NAME}-pipeline", {"coarse_masks": coarse},
                                    {"seed": 2, "noise_spacing": 4.0}, ["fine_masks", "noise_labels"], tmp_path)
    refine = mask_refinement_pb2_grpc.MaskRefinementStub(refinement_server.channel)
    expected = await refine.Refine(mask_refinement_pb2.RefineRequest(
        coarse_masks=array_to_tensor(coarse), seed=2, noise_spacing=4.0), timeout=30)
    np.testing.assert_array_equal(seen["arrays"]["fine_masks"], tensor_to_array(expected.fine_masks, "fine"))
    np.testing.assert_array_equal(seen["arrays"]["noise_labels"], tensor_to_array(expected.noise_labels, "noise"))


# ------------------------------------------------------------------------------------- routes
async def test_health_metadata_config_statistics_and_index(
    rendering_server: LiveServer, http: aiohttp.ClientSession
) -> None:
    url = base(rendering_server)
    assert await call(http, "GET", f"{url}/v2/health/live") == (200, {"live": True})
    assert await call(http, "GET", f"{url}/v2/health/ready") == (200, {"ready": True})
    status, server = await call(http, "GET", f"{url}/v2")
    assert status == 200 and server["name"] == "histosynth" and "binary_tensor_data" in server["extensions"]
    for path in (f"/v2/models/{RENDERER_NAME}", f"/v2/models/{RENDERER_NAME}/versions/1"):
        status, metadata = await call(http, "GET", url + path)
        assert status == 200 and metadata["platform"] == "onnxruntime_onnx"
        assert metadata["inputs"] == [{"name": "label", "datatype": "FP32", "shape": [-1, renderer_channels(), -1, -1]}]
    status, metadata = await call(http, "GET", f"{url}/v2/models/{PIPELINE}")
    assert status == 200 and metadata["outputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert await call(http, "GET", f"{url}/v2/models/{PIPELINE}/ready") == (200, {"name": PIPELINE, "ready": True})
    status, config = await call(http, "GET", f"{url}/v2/models/{RENDERER_NAME}/config")
    assert status == 200 and config["name"] == RENDERER_NAME and config["backend"] == "onnxruntime"
    status, stats = await call(http, "GET", f"{url}/v2/models/{RENDERER_NAME}/stats")
    assert status == 200 and [(s["name"], s["version"]) for s in stats["model_stats"]] == [(RENDERER_NAME, "1")]
    status, every = await call(http, "GET", f"{url}/v2/models/stats")
    assert status == 200 and {s["name"] for s in every["model_stats"]} == {RENDERER_NAME, PIPELINE}
    status, index = await call(http, "POST", f"{url}/v2/repository/index", json={"ready": True})
    assert status == 200 and {(m["name"], m["version"]) for m in index} == {(RENDERER_NAME, "1"), (PIPELINE, "1")}


async def test_json_and_binary_infer_equal_render(rendering_server: LiveServer, http: aiohttp.ClientSession) -> None:
    """JSON data in / JSON data out, and the binary extension both ways: Render's bytes either way."""
    masks = class_masks(1, 20, seed=5)
    expected = await domain_render(rendering_server, masks, seed=9)
    url = f"{base(rendering_server)}/v2/models/{PIPELINE}/infer"
    request = {"id": "json-1", "parameters": {"seed": 9},
               "inputs": [{"name": "class_masks", "datatype": "UINT8", "shape": [1, 20, 20],
                           "data": masks.tolist()}]}  # nested lists are accepted too
    status, answer = await call(http, "POST", url, json=request)
    assert status == 200 and answer["id"] == "json-1" and answer["model_version"] == "1"
    [image] = answer["outputs"]
    assert image["shape"] == [1, 20, 20, 3] and image["datatype"] == "UINT8"
    np.testing.assert_array_equal(np.array(image["data"], np.uint8).reshape(image["shape"]), expected)

    header = json.dumps({"parameters": {"seed": 9}, "inputs": [{
        "name": "class_masks", "datatype": "UINT8", "shape": [20, 20], "parameters": {"binary_data_size": 400}}],
        "outputs": [{"name": "images", "parameters": {"binary_data": True}}]}).encode()
    status, (body, length) = await call(http, "POST", url, data=header + masks[0].tobytes(),
                                        headers={HEADER: str(len(header))})
    assert status == 200
    meta = json.loads(body[:length])
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": expected.size}
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.uint8).reshape(expected.shape), expected)


async def test_bare_model_infer_over_rest_equals_grpc_model_infer(
    refinement_server: LiveServer, http: aiohttp.ClientSession
) -> None:
    coarse = np.where(np.random.default_rng(6).random((1, 1, 8, 8)) > 0.5, 1.0, -1.0).astype(np.float32)
    url = f"{base(refinement_server)}/v2/models/{REFINER_NAME}/versions/1/infer"
    request = {"inputs": [{"name": "coarse", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": coarse.ravel().tolist()}],
               "parameters": {"binary_data_output": True}}
    status, (body, length) = await call(http, "POST", url, json=request)
    assert status == 200 and json.loads(body[:length])["model_version"] == "1"
    fine = np.frombuffer(body[length:], "<f4").reshape(1, 1, 8, 8)
    status, answer = await call(http, "POST", url, json={"inputs": request["inputs"]})
    np.testing.assert_array_equal(np.array(answer["outputs"][0]["data"], np.float32).reshape(1, 1, 8, 8), fine)


def binary_body(shape: list[int], size: int, payload: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "class_masks", "datatype": "UINT8", "shape": shape,
                                     "parameters": {"binary_data_size": size}}]}).encode()
    return header + payload, {HEADER: str(len(header))}


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", f"/v2/models/{PIPELINE}/infer", b"{not json", 400, "the request body is not valid JSON"),
        ("POST", f"/v2/models/{PIPELINE}/infer", b"{}", 400, '"inputs" must be a non-empty list'),
        ("POST", "/v2/models/nope/infer", {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}]},
         404, "'nope' is not loaded; available: ['renderer-test', 'renderer-test-pipeline']"),
        ("POST", f"/v2/models/{PIPELINE}/infer",
         {"inputs": [{"name": "class_masks", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3]}]},
         400, "data holds 3 values but shape [2, 2] needs 4"),
        ("POST", f"/v2/models/{PIPELINE}/infer",
         {"inputs": [{"name": "class_masks", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3, 300]}]},
         400, "data has values outside the range of UINT8"),
        ("POST", f"/v2/models/{PIPELINE}/infer",
         {"inputs": [{"name": "class_masks", "datatype": "UINT8", "shape": [2, 2], "data": ["a", "b", "c", "d"]}]},
         400, "data must hold numbers"),
        ("POST", f"/v2/models/{PIPELINE}/infer",
         {"inputs": [{"name": "class_masks", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
         400, "datatype 'BYTES' is not served"),
        ("POST", f"/v2/models/{PIPELINE}/infer",
         {"inputs": [{"name": "class_masks", "datatype": "FP32", "shape": [2, 2], "data": [0.5] * 4}]},
         400, "expected UINT8 with 2 or 3 dimensions, got FP32 [2, 2]"),
        ("POST", f"/v2/models/{PIPELINE}/infer",
         {"inputs": [{"name": "class_masks", "datatype": "UINT8", "shape": [2, 2], "data": [0] * 4}],
          "parameters": {"steps": 3}}, 400, "has no parameter 'steps'"),
        ("POST", f"/v2/models/{PIPELINE}/infer", binary_body([4, 4], 64, bytes(16)), 400,
         "binary_data_size 64 runs past the 16 binary bytes"),
        ("POST", f"/v2/models/{PIPELINE}/infer", binary_body([4, 4], 16, bytes(20)), 400,
         "4 binary bytes after the JSON header belong to no input"),
        ("POST", f"/v2/models/{RENDERER_NAME}/versions/7/infer",
         {"inputs": [{"name": "label", "datatype": "FP32", "shape": [1], "data": [0.0]}]}, 404, "'renderer-test/7'"),
        ("GET", "/v2/models/nope/ready", None, 404, "'nope' is not loaded"),
        ("GET", "/v2/nowhere", None, 404, "Not Found: GET /v2/nowhere"),
        ("GET", f"/v2/models/{PIPELINE}/infer", None, 405, "Method Not Allowed"),
        ("POST", f"/v2/models/{PIPELINE}/infer", b"x" * (9 << 20), 413, "HISTOSYNTH_MAX_MESSAGE_BYTES"),
    ],
)
async def test_bad_requests_get_clear_statuses_and_the_server_keeps_serving(
    rendering_server: LiveServer, http: aiohttp.ClientSession,
    method: str, path: str, body: object, status: int, message: str,
) -> None:
    kwargs: dict[str, Any] = {}
    if isinstance(body, tuple):
        kwargs = {"data": body[0], "headers": body[1]}
    elif isinstance(body, bytes):
        kwargs = {"data": body}
    elif body is not None:
        kwargs = {"json": body}
    got, answer = await call(http, method, base(rendering_server) + path, **kwargs)
    assert got == status, answer
    assert message in answer["error"]
    assert await call(http, "GET", f"{base(rendering_server)}/v2/health/ready") == (200, {"ready": True})


async def test_rest_calls_are_in_the_http_metrics_by_route_pattern(
    rendering_server: LiveServer, http: aiohttp.ClientSession
) -> None:
    from services.core.metrics import REGISTRY

    def count(route: str, method: str, code: str) -> float:
        labels = {"route": route, "method": method, "code": code}
        return REGISTRY.get_sample_value("histosynth_http_requests_total", labels) or 0.0

    def observations(route: str, method: str) -> float:
        labels = {"route": route, "method": method}
        return REGISTRY.get_sample_value("histosynth_http_request_duration_seconds_count", labels) or 0.0

    model_route = "/v2/models/{name}"
    before = {"ok": count(model_route, "GET", "200"), "missing": count(model_route, "GET", "404"),
              "unmatched": count("unmatched", "GET", "404"), "timed": observations(model_route, "GET")}
    url = base(rendering_server)
    assert (await call(http, "GET", f"{url}/v2/models/{PIPELINE}"))[0] == 200
    assert (await call(http, "GET", f"{url}/v2/models/{RENDERER_NAME}"))[0] == 200
    assert (await call(http, "GET", f"{url}/v2/models/no-such-model"))[0] == 404
    assert (await call(http, "GET", f"{url}/no/such/path"))[0] == 404
    # The label is the route's pattern, never the model name or raw path, so the series stay bounded.
    assert count(model_route, "GET", "200") - before["ok"] == 2
    assert count(model_route, "GET", "404") - before["missing"] == 1
    assert count("unmatched", "GET", "404") - before["unmatched"] == 1
    assert observations(model_route, "GET") - before["timed"] == 3
    assert REGISTRY.get_sample_value("histosynth_http_inflight_requests") == 0


# --------------------------------------------------------------------------------- token and TLS
async def test_bearer_token_guards_everything_but_health(
    module_store: Path, token_file: Path, http: aiohttp.ClientSession
) -> None:
    async for live in live_server(rendering.start, module_store, auth_token_file=token_file):
        url = base(live)
        assert (await call(http, "GET", f"{url}/v2/health/ready"))[0] == 200
        status, answer = await call(http, "GET", f"{url}/v2/models/{PIPELINE}")
        assert status == 401 and "missing bearer token: send HTTP header 'authorization: Bearer" in answer["error"]
        status, answer = await call(http, "GET", f"{url}/v2", headers={"Authorization": "Bearer wrong-token-0123456"})
        assert status == 401 and "invalid bearer token" in answer["error"]
        status, _ = await call(http, "GET", f"{url}/v2/models/{PIPELINE}", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200


async def test_tls_port_serves_https_with_the_grpc_certificate(
    module_store: Path, pki: Pki, http: aiohttp.ClientSession
) -> None:
    async for live in live_server(rendering.start, module_store, tls_cert=pki.server_cert, tls_key=pki.server_key):
        context = ssl.create_default_context(cafile=str(pki.ca))
        status, answer = await call(http, "GET", f"{base(live, 'https')}/v2/health/ready", ssl=context)
        assert (status, answer) == (200, {"ready": True})
        with pytest.raises(aiohttp.ClientError):  # plaintext is refused
            await call(http, "GET", f"{base(live)}/v2/health/ready")


# ------------------------------------------------------------------------------------- drain
async def test_drain_waits_for_rest_calls_and_refuses_new_ones(module_store: Path, http: aiohttp.ClientSession) -> None:
    """SIGTERM's drain counts REST calls in flight: a running infer finishes (200), new calls get 503 meanwhile,
    liveness still answers."""
    async for live in live_server(rendering.start, module_store, drain_grace_s=30.0):
        url = base(live)
        masks = np.zeros((2, 1024, 1024), np.uint8)  # a second or so of tiles on the fixture renderer
        header = json.dumps({"inputs": [{"name": "class_masks", "datatype": "UINT8", "shape": list(masks.shape),
                                         "parameters": {"binary_data_size": masks.size}}],
                             "outputs": [{"name": "images", "parameters": {"binary_data": True}}]}).encode()
        running = asyncio.ensure_future(call(http, "POST", f"{url}/v2/models/{PIPELINE}/infer",
                                             data=header + masks.tobytes(), headers={HEADER: str(len(header))}))
        while live.running.in_flight == 0:
            await asyncio.sleep(0.005)
        stopping = asyncio.ensure_future(live.running.stop(grace=30.0))
        while not live.running.draining:
            await asyncio.sleep(0)
        status, answer = await call(http, "GET", f"{url}/v2/health/ready")
        assert status == 503 and "shutting down" in answer["error"]
        assert await call(http, "GET", f"{url}/v2/health/live") == (200, {"live": True})
        assert not running.done()
        status, (body, length) = await running
        assert status == 200 and len(body) - length == 2 * 1024 * 1024 * 3
        await stopping
