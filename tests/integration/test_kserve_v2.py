"""KServe/Triton v2 GRPCInferenceService on the refinement and rendering servers.

The stock tritonclient.grpc runs in a subprocess (see tritonclient_probe.py for why); the
protocol details it does not exercise (typed contents, output selection, error cases) are
driven with our own generated stub in-process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from services._generated.histosynth.v1 import mask_rendering_pb2, mask_rendering_pb2_grpc
from services._generated.inference import grpc_service_pb2 as pb
from services._generated.inference import grpc_service_pb2_grpc as pb_grpc
from services.core import metrics
from services.core.memory import MemoryBudget
from services.mask_rendering import servicer as rendering
from services.mask_rendering.pipeline import RenderingPipeline, to_uint8_rgb
from services.tensor_codec import array_to_tensor, tensor_to_array
from tests.fixtures.service_models import REFINER_NAME, RENDERER_NAME, RENDERER_TILE_SIZE, renderer_channels
from tests.integration.conftest import LiveServer, live_server

pytestmark = pytest.mark.asyncio(loop_scope="module")
PROBE = Path(__file__).with_name("tritonclient_probe.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


async def run_probe(server: LiveServer, model: str, data: np.ndarray, tmp_path: Path) -> dict:
    """Run tritonclient in a child process (asyncio, so this loop keeps serving meanwhile)."""
    # find_spec, not importorskip: importing tritonclient here would clash with our inference.* stubs.
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] is not installed (a dev dependency)")
    np.save(tmp_path / "input.npy", data)
    args = {"url": server.address, "model": model, "input": str(tmp_path / "input.npy"),
            "output": str(tmp_path / "output.npy")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), json.dumps(args), cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout)
    result["output_array"] = np.load(tmp_path / "output.npy")
    return result


def reference(store: Path, model: str, version: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(store / model / version / "model.onnx")).run(None, feeds)[0]


async def test_tritonclient_against_refinement_server(
    refinement_server: LiveServer, module_store: Path, tmp_path: Path
) -> None:
    coarse = np.where(np.random.default_rng(0).random((2, 1, 16, 16)) > 0.5, 1.0, -1.0).astype(np.float32)
    seen = await run_probe(refinement_server, REFINER_NAME, coarse, tmp_path)

    assert seen["live"] and seen["ready"]
    assert seen["server"]["name"] == "histosynth"
    states = {(model["name"], model["version"]): model["state"] for model in seen["index"]}
    # Latest versions load at start-up; older ones on first use (UNAVAILABLE until then). Each refiner
    # version is also served as a pipeline model (uint8 masks in and out, tests/integration/test_kserve_pipelines.py).
    pipeline = f"{REFINER_NAME}-pipeline"
    assert set(states) == {(REFINER_NAME, "1"), (REFINER_NAME, "2"), (pipeline, "1"), (pipeline, "2")}
    assert states[(REFINER_NAME, "2")] == "READY" and states[(pipeline, "2")] == "READY"
    assert seen["model_ready"] and not seen["unknown_model_ready"]
    metadata = seen["metadata"]
    assert metadata["name"] == REFINER_NAME and metadata["versions"] == ["1", "2"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "coarse", "datatype": "FP32", "shape": ["-1", "1", "-1", "-1"]}]
    assert metadata["outputs"] == [{"name": "fine", "datatype": "FP32", "shape": ["-1", "1", "-1", "-1"]}]

    assert seen["response"]["model_name"] == REFINER_NAME and seen["response"]["model_version"] == "2"
    assert seen["response"]["id"] == "probe-1"
    np.testing.assert_array_equal(seen["output_array"], reference(module_store, REFINER_NAME, "2", {"coarse": coarse}))

    assert seen["wrong_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'coarse': expected FP32 [-1, 1, -1, -1], got UINT8 [2, 1, 16, 16]" in seen["wrong_datatype"]["message"]
    assert seen["wrong_rank"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert seen["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "available: ['mask-refiner', 'mask-refiner-pipeline']" in seen["unknown_model"]["message"]
    assert seen["unknown_metadata"]["status"] == "StatusCode.NOT_FOUND"
    assert seen["unimplemented"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert seen["infer_after_errors_equal"]
    assert set(seen["server"]["extensions"]) == {"model_configuration", "statistics"}

    config = seen["config"]
    assert config["name"] == REFINER_NAME and config["max_batch_size"] > 0  # the batch axis is implicit
    assert config["input"] == [{"name": "coarse", "data_type": "TYPE_FP32", "dims": ["1", "-1", "-1"]}]
    assert config["output"][0]["name"] == "fine" and config["output"][0]["dims"] == ["1", "-1", "-1"]
    assert config["backend"] == "onnxruntime" and config["platform"] == "onnxruntime_onnx"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["parameters"]["histosynth_precision"]["string_value"] == "fp32"
    assert config["parameters"]["histosynth_runtime"]["string_value"] == "CPUExecutionProvider"
    [stats] = seen["statistics"]
    assert stats["name"] == REFINER_NAME and stats["version"] == "2"
    # The probe's first infer (at least) was counted.
    succeeded = int(stats["inference_stats"]["success"]["count"])
    assert succeeded >= 1 and int(stats["inference_count"]) == succeeded
    assert int(stats["inference_stats"]["compute_infer"]["ns"]) > 0 and int(stats["execution_count"]) >= 1
    assert sum(int(b["compute_infer"]["count"]) for b in stats["batch_stats"]) == int(stats["execution_count"])
    assert seen["unknown_statistics"]["status"] == "StatusCode.NOT_FOUND"


async def test_tritonclient_against_rendering_server(
    rendering_server: LiveServer, module_store: Path, tmp_path: Path
) -> None:
    label = np.random.default_rng(1).random((1, renderer_channels(), 16, 16)).astype(np.float32)
    seen = await run_probe(rendering_server, RENDERER_NAME, label, tmp_path)
    assert [(m["name"], m["version"], m["state"]) for m in seen["index"]] == [
        (RENDERER_NAME, "1", "READY"), (f"{RENDERER_NAME}-pipeline", "1", "READY")]
    np.testing.assert_array_equal(seen["output_array"], reference(module_store, RENDERER_NAME, "1", {"label": label}))


def infer_request(model: str, array: np.ndarray, *, raw: bool = True, name: str = "coarse",
                  datatype: str = "FP32", **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    if raw:
        request.raw_input_contents.append(array.tobytes())
    else:
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    return request


async def test_typed_contents_equal_raw_contents(refinement_server: LiveServer) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(refinement_server.channel)
    coarse = np.where(np.random.default_rng(2).random((1, 1, 8, 8)) > 0.5, 1.0, -1.0).astype(np.float32)
    raw = await stub.ModelInfer(infer_request(REFINER_NAME, coarse), timeout=30)
    typed = await stub.ModelInfer(infer_request(REFINER_NAME, coarse, raw=False, model_version="2"), timeout=30)
    assert raw.raw_output_contents == typed.raw_output_contents
    assert raw.outputs[0].name == "fine" and list(raw.outputs[0].shape) == [1, 1, 8, 8]
    assert raw.outputs[0].datatype == "FP32"


async def test_pinned_old_version_loads_on_first_use(refinement_server: LiveServer) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(refinement_server.channel)
    coarse = np.ones((1, 1, 8, 8), np.float32)
    response = await stub.ModelInfer(infer_request(REFINER_NAME, coarse, model_version="1"), timeout=30)
    assert response.model_version == "1"
    ready = await stub.ModelReady(pb.ModelReadyRequest(name=REFINER_NAME, version="1"), timeout=10)
    assert ready.ready
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
    pipeline = f"{REFINER_NAME}-pipeline"
    assert {(model.name, model.version) for model in index.models} == {
        (REFINER_NAME, "1"), (REFINER_NAME, "2"), (pipeline, "1"), (pipeline, "2")}


@pytest.mark.parametrize(
    "mutate, code, message",
    [
        (lambda r: r.outputs.add(name="nope"), grpc.StatusCode.INVALID_ARGUMENT, "has no output(s) ['nope']"),
        (lambda r: r.raw_input_contents.append(b"extra"), grpc.StatusCode.INVALID_ARGUMENT,
         "raw_input_contents has 2 entries for 1 inputs"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7), grpc.StatusCode.INVALID_ARGUMENT,
         "data holds 7 bytes but FP32 [1, 1, 8, 8] needs 64 x 4 = 256 bytes"),
        (lambda r: r.inputs[0].__setattr__("name", "x"), grpc.StatusCode.INVALID_ARGUMENT,
         "takes inputs ['coarse'], got ['x']"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 3), grpc.StatusCode.INVALID_ARGUMENT,
         "expected FP32 [-1, 1, -1, -1], got FP32 [1, 3, 8, 8]"),
        (lambda r: r.__setattr__("model_name", ""), grpc.StatusCode.INVALID_ARGUMENT, "model name is required"),
        (lambda r: (r.inputs[0].shape.__setitem__(3, 6), r.raw_input_contents.__setitem__(0, b"\0" * 192)),
         grpc.StatusCode.INVALID_ARGUMENT, "input 'coarse': width 6 is not a multiple of 4"),
        (lambda r: r.__setattr__("model_version", "5"), grpc.StatusCode.NOT_FOUND, "'mask-refiner/5' is not loaded"),
    ],
)
async def test_v2_bad_requests(refinement_server: LiveServer, mutate, code: grpc.StatusCode, message: str) -> None:  # noqa: ANN001
    stub = pb_grpc.GRPCInferenceServiceStub(refinement_server.channel)
    request = infer_request(REFINER_NAME, np.ones((1, 1, 8, 8), np.float32))
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ModelInfer(request, timeout=30)
    assert raised.value.code() == code
    assert message in raised.value.details()


async def test_v2_typed_contents_count_mismatch_and_non_finite(refinement_server: LiveServer) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(refinement_server.channel)
    request = infer_request(REFINER_NAME, np.ones((1, 1, 8, 8), np.float32), raw=False)
    del request.inputs[0].contents.fp32_contents[-1]
    with pytest.raises(grpc.aio.AioRpcError, match="contents.fp32_contents holds 63 values but shape"):
        await stub.ModelInfer(request, timeout=30)
    nan = np.ones((1, 1, 8, 8), np.float32)
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(grpc.aio.AioRpcError, match="NaN or infinite"):
        await stub.ModelInfer(infer_request(REFINER_NAME, nan), timeout=30)


# ----------------------------------------------------------------------- renderer tiling (issue 14)
def renderer_input(host_pipeline: RenderingPipeline, served, classes: np.ndarray, seed: int) -> np.ndarray:  # noqa: ANN001
    """The float32 [1, C, H, W] generator input Render builds for ``classes`` (noise from ``seed``)."""
    spec = host_pipeline.spec(served)
    maps = RenderingPipeline.field_maps(classes, spec, None, None, seed, 0.0)
    return maps.generator_input((slice(None), slice(None)), spec.num_classes)[None].astype(np.float32)


async def test_model_infer_on_a_large_field_is_tiled_like_render(rendering_server: LiveServer) -> None:
    """A field larger than the renderer's tile: ModelInfer cuts, runs and blends it as Render does, so its raw
    output, converted as Render converts it, is Render's image bit for bit (and differs from one whole call)."""
    size = 3 * RENDERER_TILE_SIZE + 6  # 102: 4 x 4 tiles of 32 with the default overlap of 8
    classes = np.random.default_rng(3).integers(0, 3, (size, size), dtype=np.uint8)
    served = await rendering_server.host.get(RENDERER_NAME)
    pipeline = RenderingPipeline(rendering_server.host)
    label = renderer_input(pipeline, served, classes, seed=7)

    stub = pb_grpc.GRPCInferenceServiceStub(rendering_server.channel)
    response = await stub.ModelInfer(infer_request(RENDERER_NAME, label, name="label"), timeout=30)
    assert response.outputs[0].name == "image" and list(response.outputs[0].shape) == [1, 3, size, size]
    tiled = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, 3, size, size)

    render = mask_rendering_pb2_grpc.MaskRenderingStub(rendering_server.channel)
    rendered = await render.Render(
        mask_rendering_pb2.RenderRequest(model=RENDERER_NAME, class_masks=array_to_tensor(classes[None]), seed=7),
        timeout=30,
    )
    image = tensor_to_array(rendered.images, "images")[0]
    np.testing.assert_array_equal(to_uint8_rgb(tiled[0], (-1.0, 1.0)), image)
    whole = ort.InferenceSession(str(served.manifest.path)).run(None, {"label": label})[0]
    assert not np.array_equal(whole, tiled)  # it really was tiled (each tile's normalisation sees the tile alone)


async def test_model_infer_tiles_rows_independently(rendering_server: LiveServer) -> None:
    """Two rows in one tiled ModelInfer equal each row sent alone."""
    size = 2 * RENDERER_TILE_SIZE
    rng = np.random.default_rng(4)
    label = rng.random((2, renderer_channels(), size, size)).astype(np.float32)
    stub = pb_grpc.GRPCInferenceServiceStub(rendering_server.channel)

    async def run(array: np.ndarray) -> np.ndarray:
        response = await stub.ModelInfer(infer_request(RENDERER_NAME, array, name="label"), timeout=30)
        return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(array.shape[0], 3, size, size)

    both = await run(label)
    np.testing.assert_array_equal(both[0], (await run(label[:1]))[0])
    np.testing.assert_array_equal(both[1], (await run(label[1:]))[0])


async def test_model_infer_tiling_that_cannot_fit_the_budget_is_refused_naming_it(module_store: Path) -> None:
    """With a 16 MiB budget a 1024 x 1024 field's blend buffers (44 MiB) alone do not fit: RESOURCE_EXHAUSTED
    naming HISTOSYNTH_MEMORY_BUDGET, counted, nothing left reserved; a small tiled field still answers."""
    async for server in live_server(rendering.start, module_store, memory_budget="16MiB", max_message_bytes=64 << 20):
        stub = pb_grpc.GRPCInferenceServiceStub(server.channel)
        label = np.zeros((1, renderer_channels(), 1024, 1024), np.float32)
        refused_before = metrics.REGISTRY.get_sample_value(
            "histosynth_model_memory_refused_requests_total", {"model": RENDERER_NAME}) or 0.0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request(RENDERER_NAME, label, name="label"), timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "blend buffers" in raised.value.details()
        assert "memory budget of 16.0 MiB (HISTOSYNTH_MEMORY_BUDGET)" in raised.value.details()
        assert metrics.REGISTRY.get_sample_value(
            "histosynth_model_memory_refused_requests_total", {"model": RENDERER_NAME}) == refused_before + 1
        assert MemoryBudget(1).in_use == 0
        small = np.zeros((1, renderer_channels(), 96, 96), np.float32)
        response = await stub.ModelInfer(infer_request(RENDERER_NAME, small, name="label"), timeout=30)
        assert list(response.outputs[0].shape) == [1, 3, 96, 96]
