"""KServe v2 pipeline models over gRPC: uint8 masks in, the domain Render / Refine bytes out.

Real servers on loopback over the fixture models (tests/fixtures/service_models.py, diffusion_models.py);
the stock tritonclient.grpc runs in a subprocess (tritonclient_pipeline_probe.py), the protocol's
corner cases are driven with our own stub in-process. One test renders with a shipped renderer.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from services._generated.histosynth.v1 import (
    mask_refinement_pb2,
    mask_refinement_pb2_grpc,
    mask_rendering_pb2,
    mask_rendering_pb2_grpc,
)
from services._generated.inference import grpc_service_pb2 as pb
from services._generated.inference import grpc_service_pb2_grpc as pb_grpc
from services.core.model_store import ModelStore
from services.mask_rendering import servicer as rendering
from services.model_host import HostSettings, ModelHost
from services.servicer_common import start_with_host
from services.tensor_codec import array_to_tensor, tensor_to_array
from tests.fixtures.diffusion_models import MASK_GENERATOR_NAME, write_diffusion_store
from tests.fixtures.diffusion_models import RENDERER_NAME as DIFFUSION_RENDERER
from tests.fixtures.service_models import REFINER_NAME, RENDERER_NAME, RENDERER_TILE_SIZE, write_renderer
from tests.integration.conftest import LiveServer, live_server, server_config

pytestmark = pytest.mark.asyncio(loop_scope="module")
PROBE = Path(__file__).with_name("tritonclient_pipeline_probe.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_STORE = REPO_ROOT / "model_store"
PIPELINE = f"{RENDERER_NAME}-pipeline"
REFINER_PIPELINE = f"{REFINER_NAME}-pipeline"


async def run_pipeline_probe(
    protocol: str, url: str, model: str, inputs: dict[str, np.ndarray], parameters: dict[str, object],
    outputs: list[str], tmp_path: Path,
) -> dict:
    """Run the stock tritonclient (``protocol`` grpc or http) in a child process; its outputs under "arrays"."""
    # find_spec, not importorskip: importing tritonclient here would clash with our inference.* stubs.
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (a dev dependency)")
    paths = {}
    for name, array in inputs.items():
        paths[name] = str(tmp_path / f"in_{name}.npy")
        np.save(paths[name], array)
    args = {"protocol": protocol, "url": url, "model": model, "inputs": paths, "parameters": parameters,
            "outputs": outputs, "output_dir": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), json.dumps(args), cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout)
    result["arrays"] = {name: np.load(tmp_path / f"{name}.npy") for name in outputs}
    return result


def class_masks(count: int, size: int, classes: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, (count, size, size), dtype=np.uint8)


async def domain_render(live: LiveServer, masks: np.ndarray, model: str = RENDERER_NAME, **fields: object) -> np.ndarray:
    stub = mask_rendering_pb2_grpc.MaskRenderingStub(live.channel)
    request = mask_rendering_pb2.RenderRequest(model=model, class_masks=array_to_tensor(masks), **fields)
    return tensor_to_array((await stub.Render(request, timeout=60)).images, "images")


def pipeline_request(model: str, inputs: dict[str, np.ndarray], datatypes: dict[str, str] | None = None,
                     **parameters: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        datatype = (datatypes or {}).get(name) or {"uint8": "UINT8", "int32": "INT32", "bool": "BOOL"}[array.dtype.name]
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], field, value)
    return request


def output(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    position = [tensor.name for tensor in response.outputs].index(name)
    tensor = response.outputs[position]
    return np.frombuffer(response.raw_output_contents[position], np.uint8).reshape(list(tensor.shape))


# --------------------------------------------------------------------------------- GAN renderer
async def test_tritonclient_grpc_gets_render_bytes_from_the_pipeline_model(
    rendering_server: LiveServer, tmp_path: Path
) -> None:
    """A batch of two fields larger than the renderer's tile (so tiled and blended) with seed 7: tritonclient
    gets exactly Render's uint8 RGB, and sees the pipeline model listed, described and configured."""
    masks = class_masks(2, RENDERER_TILE_SIZE + 8)
    seen = await run_pipeline_probe("grpc", rendering_server.address, PIPELINE, {"class_masks": masks},
                                    {"seed": 7}, ["images"], tmp_path)
    rendered = await domain_render(rendering_server, masks, seed=7)
    assert seen["arrays"]["images"].dtype == np.uint8
    np.testing.assert_array_equal(seen["arrays"]["images"], rendered)
    assert not np.array_equal(rendered, await domain_render(rendering_server, masks, seed=8))  # the seed mattered

    assert seen["ready"] and seen["model_ready"]
    assert {(m["name"], m["state"]) for m in seen["index"]["models"]} >= {(PIPELINE, "READY"), (RENDERER_NAME, "READY")}
    metadata = seen["metadata"]
    assert metadata["platform"] == "histosynth_pipeline" and metadata["versions"] == ["1"]
    assert metadata["inputs"][0] == {"name": "class_masks", "datatype": "UINT8", "shape": ["-1", "-1", "-1"]}
    assert metadata["outputs"] == [{"name": "images", "datatype": "UINT8", "shape": ["-1", "-1", "-1", "3"]}]
    config = seen["config"]
    assert config["max_batch_size"] > 0 and config["input"][1]["optional"]
    assert config["parameters"]["histosynth_model"]["string_value"] == RENDERER_NAME
    assert "seed (int)" in config["parameters"]["histosynth_parameters"]["string_value"]
    response = seen["response"]
    assert response["model_name"] == PIPELINE and response["model_version"] == "1" and response["id"] == "pipeline-1"
    assert response["parameters"]["histosynth_model"]["string_param"] == f"{RENDERER_NAME}/1"

    assert seen["wrong_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'class_masks' of model renderer-test-pipeline: expected UINT8" in seen["wrong_datatype"]["message"]
    assert seen["unknown_parameter"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "has no parameter 'sed'; parameters: seed (int)" in seen["unknown_parameter"]["message"]
    assert "parameter 'seed' of model renderer-test-pipeline must be an integer" in seen["bad_parameter"]["message"]
    assert seen["again_equal"]


async def test_unbatched_mask_instances_noise_and_spacing_reach_render(rendering_server: LiveServer) -> None:
    """An [H, W] mask with instance maps, noise labels or a noise spacing: Render's bytes for each."""
    stub = pb_grpc.GRPCInferenceServiceStub(rendering_server.channel)
    mask = class_masks(1, 24, seed=1)[0]
    instances = np.random.default_rng(2).integers(0, 5, mask.shape, dtype=np.int32)
    noise = (np.random.default_rng(3).random(mask.shape) > 0.9).astype(np.uint8)
    cases: list[tuple[dict[str, np.ndarray], dict[str, object], dict[str, object]]] = [
        ({}, {}, {}),
        ({"instance_maps": instances}, {"seed": 4}, {"seed": 4}),
        ({"noise_labels": noise}, {}, {}),
        ({}, {"seed": 2, "noise_spacing": 3.0}, {"seed": 2, "noise_spacing": 3.0}),
        ({}, {"seed": 5, "stain_source": "dark"}, {"seed": 5, "stain_variation": True, "stain_source": "dark"}),
        ({}, {"seed": 5, "stain_source": "all"}, {"seed": 5, "stain_variation": True}),
    ]
    for extra, parameters, render_fields in cases:
        response = await stub.ModelInfer(pipeline_request(PIPELINE, {"class_masks": mask, **extra}, **parameters),
                                         timeout=60)
        domain_fields = dict(render_fields)
        if "instance_maps" in extra:
            domain_fields["instance_maps"] = array_to_tensor(extra["instance_maps"])
        if "noise_labels" in extra:
            domain_fields["noise_labels"] = array_to_tensor(extra["noise_labels"])
        expected = await domain_render(rendering_server, mask, **domain_fields)
        assert list(response.outputs[0].shape) == [1, 24, 24, 3]
        np.testing.assert_array_equal(output(response, "images"), expected)


def _drop_raw(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[:]
    request.raw_input_contents.append(b"\0")


@pytest.mark.parametrize(
    "mutate, code, message",
    [
        (lambda r: r.inputs[0].__setattr__("name", "masks"), grpc.StatusCode.INVALID_ARGUMENT,
         "takes inputs class_masks (UINT8), instance_maps (INT32/UINT8/UINT16/INT64, optional)"),
        (lambda r: r.inputs[0].shape.insert(0, 1), grpc.StatusCode.INVALID_ARGUMENT,
         "expected UINT8 with 2 or 3 dimensions, got UINT8 [1, 1, 8, 8]"),
        (_drop_raw, grpc.StatusCode.INVALID_ARGUMENT, "data holds 1 bytes but UINT8 [1, 8, 8] needs 64"),
        (lambda r: r.outputs.add(name="image"), grpc.StatusCode.INVALID_ARGUMENT,
         "has no output(s) ['image']; outputs: ['images']"),
        (lambda r: r.raw_input_contents.__setitem__(0, bytes([9]) * 64), grpc.StatusCode.INVALID_ARGUMENT,
         "class id 9 is outside [0, 2] for model renderer-test/1"),
        (lambda r: r.parameters["noise_spacing"].__setattr__("double_param", -1.0), grpc.StatusCode.INVALID_ARGUMENT,
         "noise_spacing must be >= 0"),
        (lambda r: r.parameters["seed"].__setattr__("int64_param", -1), grpc.StatusCode.INVALID_ARGUMENT,
         "seed must be a non-negative integer"),
        (lambda r: r.__setattr__("model_version", "9"), grpc.StatusCode.NOT_FOUND, "'renderer-test/9'"),
        (lambda r: r.__setattr__("model_name", "renderer-nope-pipeline"), grpc.StatusCode.NOT_FOUND,
         "available: ['renderer-test', 'renderer-test-pipeline']"),
    ],
)
async def test_pipeline_bad_requests(
    rendering_server: LiveServer, mutate: Callable[[pb.ModelInferRequest], object], code: grpc.StatusCode, message: str
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(rendering_server.channel)
    request = pipeline_request(PIPELINE, {"class_masks": np.zeros((1, 8, 8), np.uint8)})
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ModelInfer(request, timeout=30)
    assert raised.value.code() == code
    assert message in raised.value.details()


async def test_pipeline_statistics_count_its_calls(rendering_server: LiveServer) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(rendering_server.channel)
    before = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=PIPELINE), timeout=10)
    await stub.ModelInfer(pipeline_request(PIPELINE, {"class_masks": np.zeros((8, 8), np.uint8)}), timeout=30)
    after = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=PIPELINE), timeout=10)
    [stats] = after.model_stats
    assert stats.name == PIPELINE and stats.version == "1"
    assert stats.inference_stats.success.count == before.model_stats[0].inference_stats.success.count + 1


# --------------------------------------------------------------------------------------- refiner
async def test_refiner_pipeline_equals_refine(refinement_server: LiveServer) -> None:
    """Fine masks and noise labels from the pipeline model are Refine's, pinned version included."""
    stub = pb_grpc.GRPCInferenceServiceStub(refinement_server.channel)
    refine = mask_refinement_pb2_grpc.MaskRefinementStub(refinement_server.channel)
    coarse = (np.random.default_rng(5).random((2, 18, 18)) > 0.5).astype(np.uint8)
    for version in ("", "1"):
        request = pipeline_request(REFINER_PIPELINE, {"coarse_masks": coarse}, seed=3, noise_spacing=5.0)
        request.model_version = version
        response = await stub.ModelInfer(request, timeout=30)
        expected = await refine.Refine(mask_refinement_pb2.RefineRequest(
            coarse_masks=array_to_tensor(coarse), seed=3, noise_spacing=5.0, model_version=version), timeout=30)
        assert response.model_version == (version or "2")
        np.testing.assert_array_equal(output(response, "fine_masks"), tensor_to_array(expected.fine_masks, "fine"))
        np.testing.assert_array_equal(output(response, "noise_labels"),
                                      tensor_to_array(expected.noise_labels, "noise"))
    plain = await stub.ModelInfer(pipeline_request(REFINER_PIPELINE, {"coarse_masks": coarse[0].astype(bool)}),
                                  timeout=30)
    assert [tensor.name for tensor in plain.outputs] == ["fine_masks"]  # no spacing, no noise label


@pytest.mark.parametrize(
    "inputs, parameters, outputs, message",
    [
        ({"guide_masks": np.ones((8, 8), np.uint8)}, {}, [],
         "takes no guide_masks (its inputs are ['coarse'])"),
        ({}, {}, ["noise_labels"], "output 'noise_labels' of model mask-refiner-pipeline needs parameter noise_spacing"),
        ({}, {"stain": "ihc"}, [], "refines 'he' masks, not 'ihc'"),
        ({}, {"noise_spacing": "5"}, [], "parameter 'noise_spacing' of model mask-refiner-pipeline must be a number"),
    ],
)
async def test_refiner_pipeline_refusals(
    refinement_server: LiveServer, inputs: dict[str, np.ndarray], parameters: dict[str, object],
    outputs: list[str], message: str,
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(refinement_server.channel)
    request = pipeline_request(REFINER_PIPELINE, {"coarse_masks": np.ones((8, 8), np.uint8), **inputs}, **parameters)
    for name in outputs:
        request.outputs.add(name=name)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ModelInfer(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()


# ------------------------------------------------------------------------------------- diffusion
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def diffusion_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveServer]:
    root = write_diffusion_store(tmp_path_factory.mktemp("diffusion_store"))
    write_renderer(root)
    async for live in live_server(rendering.start, root):
        yield live


async def test_diffusion_sampler_pipeline_takes_steps_guidance_scheduler_and_seed(diffusion_server: LiveServer) -> None:
    """The diffusion renderer as a v2 model: mask + (steps, guidance_scale, scheduler, seed) -> Render's bytes."""
    stub = pb_grpc.GRPCInferenceServiceStub(diffusion_server.channel)
    model = f"{DIFFUSION_RENDERER}-pipeline"
    masks = class_masks(2, 16, classes=5, seed=6)
    settings = [
        ({"seed": 5, "steps": 3, "guidance_scale": 1.5, "scheduler": "ddim"},
         {"seed": 5, "diffusion": mask_rendering_pb2.DiffusionOptions(
             steps=3, guidance_scale=1.5, scheduler=mask_rendering_pb2.DIFFUSION_SCHEDULER_DDIM)}),
        ({"seed": 5, "steps": 2, "scheduler": "dpmsolver++"},
         {"seed": 5, "diffusion": mask_rendering_pb2.DiffusionOptions(
             steps=2, scheduler=mask_rendering_pb2.DIFFUSION_SCHEDULER_DPM_SOLVER_PP)}),
        ({}, {}),  # the manifest's defaults
    ]
    images = []
    for parameters, render_fields in settings:
        response = await stub.ModelInfer(pipeline_request(model, {"class_masks": masks}, **parameters), timeout=60)
        expected = await domain_render(diffusion_server, masks, model=DIFFUSION_RENDERER, **render_fields)
        np.testing.assert_array_equal(output(response, "images"), expected)
        images.append(expected)
    assert not np.array_equal(images[0], images[1])

    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    names = {m.name for m in index.models}
    assert {model, f"{RENDERER_NAME}-pipeline", MASK_GENERATOR_NAME} <= names
    assert f"{MASK_GENERATOR_NAME}-pipeline" not in names  # takes no mask
    metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
    assert [tensor.name for tensor in metadata.inputs] == ["class_masks", "instance_maps"]


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"steps": 2000}, "steps must be in 1..1000"),
        ({"scheduler": "euler"}, "scheduler 'euler' is unknown; valid: ddim, dpmsolver++"),
        ({"guidance_scale": float("nan")}, "must be finite"),
        ({"noise_spacing": 3.0}, "has no parameter 'noise_spacing'; parameters: seed (int)"),
    ],
)
async def test_diffusion_pipeline_bad_parameters(
    diffusion_server: LiveServer, parameters: dict[str, object], message: str
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(diffusion_server.channel)
    request = pipeline_request(f"{DIFFUSION_RENDERER}-pipeline", {"class_masks": class_masks(1, 16, 5)}, **parameters)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ModelInfer(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()


# --------------------------------------------------------------------------------- shipped model
async def test_shipped_renderer_pipeline_equals_render() -> None:
    name = "renderer-he-nuclei"
    if not (SHIPPED_STORE / name).is_dir():
        pytest.skip(f"{name} is not in model_store/")
    store = ModelStore(SHIPPED_STORE)
    host = ModelHost(store, rendering.MODEL_KINDS, HostSettings(), names=[name])
    await host.start()
    running, _ = await start_with_host(host, rendering.registrations(host), server_config(SHIPPED_STORE))
    channel = grpc.aio.insecure_channel(running.address)
    try:
        classes = int(host.latest_manifest(name).metadata["num_classes"])
        masks = class_masks(1, 64, classes=classes, seed=9)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = await stub.ModelInfer(pipeline_request(f"{name}-pipeline", {"class_masks": masks}, seed=11),
                                         timeout=120)
        live = LiveServer(running, host, channel)
        np.testing.assert_array_equal(output(response, "images"), await domain_render(live, masks, model=name, seed=11))
    finally:
        await channel.close()
        await running.stop(grace=0.5)
