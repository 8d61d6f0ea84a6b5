"""Generation over real gRPC on loopback, with refinement and rendering in the same process.

The servers run on their own event loop thread (services.all_in_one.BackgroundServers) and
the tests drive them with the blocking clients.client.HistosynthClient, like the CLI does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from clients.client import HistosynthClient, request_from_spec
from services._generated.histosynth.v1 import generation_pb2, generation_pb2_grpc
from services.all_in_one import BackgroundServers
from services.core import metrics
from services.generation.sink import read_label_png
from services.generation.spec import FractionRange, GenerationSpec, StratumSpec
from tests.fixtures.generation_models import write_generation_store
from tests.integration.conftest import server_config

SERVICES = ("refinement", "rendering", "generation")
GLANDS = {
    "tissue": "glands",
    "count": 4,
    "height": 64,
    "width": 64,
    "seed": 1,
    "strata": [
        {"label": "sparse", "class_fraction_ranges": {"gland": [0.1, 0.3]}},
        {"label": "dense", "class_fraction_ranges": {"gland": [0.5, 0.7]}},
    ],
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServers]:
    store = write_generation_store(tmp_path_factory.mktemp("generation_service") / "model_store")
    with BackgroundServers(server_config(store), SERVICES, {name: 0 for name in SERVICES}) as running:
        yield running


@pytest.fixture(scope="module")
def client(servers: BackgroundServers) -> Iterator[HistosynthClient]:
    with HistosynthClient(targets=servers.addresses, timeout=60) as built:
        yield built


def wait_for(client: HistosynthClient, job_id: str, states: set[str], timeout_s: float = 30.0):  # noqa: ANN201
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get_job(job_id)
        if job.state in states or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def big_spec(count: int = 400) -> dict:
    return {"tissue": "nuclei", "count": count, "height": 256, "width": 256, "seed": 2}


def test_generate_streams_every_sample_in_order(client: HistosynthClient) -> None:
    samples = list(client.generate(GLANDS))
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert [s.stratum for s in samples] == ["sparse", "dense", "sparse", "dense"]
    for sample in samples:
        assert sample.image.shape == (64, 64, 3)
        assert sample.mask.shape == (64, 64) and sample.mask.dtype == np.uint8
        assert sample.class_names == ("non-tissue", "stroma", "gland")
        assert abs(sample.scores["fraction/gland"] - sample.scores["target/gland"]) <= 0.02
        assert sample.provenance["models"][0]["name"] == "renderer-he-glands"
        assert sample.provenance["parameters"]["sample"]["index"] == sample.index
    job = client.get_job(samples[0].job_id)
    assert (job.state, job.completed, job.total) == ("succeeded", 4, 4)
    # The same request again gives byte-identical samples; a subset reproduces its members.
    again = list(client.generate(GLANDS, indices=[2]))
    assert again[0].image_png == samples[2].image_png
    np.testing.assert_array_equal(again[0].mask, samples[2].mask)


def test_submit_job_writes_its_sink(client: HistosynthClient, tmp_path: Path) -> None:
    spec = dict(GLANDS, sink_uri=f"file://{tmp_path / 'sink'}")
    job = client.submit_job(spec)
    assert job.total == 4 and job.state in ("queued", "running")
    done = wait_for(client, job.job_id, {"succeeded", "failed", "cancelled"})
    assert (done.state, done.completed, done.error) == ("succeeded", 4, "")
    sink = tmp_path / "sink"
    assert sorted(p.name for p in sink.glob("*.json")) == [f"00000{i}.json" for i in range(4)]
    assert read_label_png(sink / "000001_mask.png").dtype == np.uint8
    assert read_label_png(sink / "000001_instances.png").dtype == np.uint16
    assert cv2.imread(str(sink / "000001_image.png")).shape == (64, 64, 3)


def test_quality_gate_counts_rejections(client: HistosynthClient, tmp_path: Path) -> None:
    job = client.submit_job(dict(GLANDS, count=2, min_consistency=1.0, sink_uri=str(tmp_path)))
    done = wait_for(client, job.job_id, {"succeeded", "failed", "cancelled"})
    assert (done.state, done.completed, done.rejected) == ("succeeded", 0, 6)  # 3 attempts per sample
    lenient = list(client.generate(dict(GLANDS, count=2, min_consistency=1e-9)))
    assert lenient and all(0 < s.scores["consistency"] <= 1 for s in lenient)


def test_cancel_job_stops_a_background_job(client: HistosynthClient, tmp_path: Path) -> None:
    job = client.submit_job(dict(big_spec(), sink_uri=str(tmp_path)))
    wait_for(client, job.job_id, {"running"})
    cancelled = client.cancel_job(job.job_id)
    assert cancelled.state == "cancelled"
    time.sleep(0.3)
    final = client.get_job(job.job_id)
    assert final.state == "cancelled" and final.completed < final.total
    assert client.cancel_job(job.job_id).state == "cancelled"  # idempotent
    time.sleep(0.2)
    assert len(list(tmp_path.glob("*.json"))) == final.completed  # nothing written after the cancel


def test_submit_job_needs_a_sink(client: HistosynthClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.submit_job(GLANDS)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.sink_uri: required for SubmitJob" in caught.value.details()


def test_cancelling_a_stream_cancels_its_job(client: HistosynthClient) -> None:
    call = client.generate_call(big_spec())
    job_id = dict(call.initial_metadata())["histosynth-job-id"]
    received = [next(call), next(call)]
    call.cancel()
    assert [m.index for m in received] == [0, 1]
    job = wait_for(client, job_id, {"cancelled"}, timeout_s=10)
    assert job.state == "cancelled" and job.completed < job.total
    completed = job.completed
    time.sleep(0.3)
    assert client.get_job(job_id).completed == completed  # nothing runs after the cancel
    # ... and its queued render requests were withdrawn from the batcher.
    labels = {"model": "renderer-he-nuclei", "version": "1"}
    assert metrics.REGISTRY.get_sample_value("histosynth_model_pending_requests", labels) == 0
    # CancelJob also ends a stream from the outside.
    other = client.generate_call(big_spec())
    other_id = dict(other.initial_metadata())["histosynth-job-id"]
    next(other)
    assert client.cancel_job(other_id).state == "cancelled"
    with pytest.raises(grpc.RpcError) as ended:
        for _ in other:
            pass
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    # The server keeps serving.
    assert len(list(client.generate(dict(GLANDS, count=1)))) == 1


def test_deadline_exceeded_on_a_stream(client: HistosynthClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate(big_spec(), timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(list(client.generate(dict(GLANDS, count=1)))) == 1


@pytest.mark.parametrize(
    ("changes", "code", "message"),
    [
        ({"count": 0}, grpc.StatusCode.INVALID_ARGUMENT, "spec.count: 0 is outside [1, 10000]"),
        ({"count": 20_000}, grpc.StatusCode.INVALID_ARGUMENT, "split larger batches"),
        ({"tissue": "liver"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown tissue 'liver'"),
        ({"height": 24}, grpc.StatusCode.INVALID_ARGUMENT, "spec.height: 24 px is not allowed"),
        ({"width": 8192}, grpc.StatusCode.INVALID_ARGUMENT, "spec.width: 8192 px"),
        ({"strata": [{"label": "x", "class_fractions": {"gland": 1.5}}]}, grpc.StatusCode.INVALID_ARGUMENT, "outside [0, 1]"),
        ({"strata": [{"label": "x", "class_fractions": {"gland": 0.6, "non-tissue": 0.6}}]},
         grpc.StatusCode.INVALID_ARGUMENT, "sum to 1.200 > 1"),
        ({"strata": [{"label": "x", "class_fractions": {"tumour": 0.2}}]},
         grpc.StatusCode.INVALID_ARGUMENT, "valid: ['non-tissue', 'stroma', 'gland']"),
        ({"tissue": "nuclei", "strata": [], "min_consistency": 0.5}, grpc.StatusCode.FAILED_PRECONDITION,
         "no segmenter in the model store checks renderer 'renderer-he-nuclei'"),
        ({"model_versions": {"renderer-he-glands": "7"}}, grpc.StatusCode.NOT_FOUND, "renderer-he-glands/7"),
    ],
)
def test_bad_specs_get_clear_statuses(
    client: HistosynthClient, changes: dict, code: grpc.StatusCode, message: str, tmp_path: Path
) -> None:
    spec = {**GLANDS, **changes}
    sunk = {**spec, "sink_uri": str(tmp_path / "never-written")}
    for call in (lambda: list(client.generate(spec)), lambda: client.submit_job(sunk)):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == code
        assert message in caught.value.details()


def test_missing_spec_indices_and_unknown_job(client: HistosynthClient, servers: BackgroundServers) -> None:
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(servers.addresses["generation"]))
    with pytest.raises(grpc.RpcError) as no_spec:
        list(stub.Generate(generation_pb2.GenerateRequest(), timeout=10))
    assert no_spec.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec: missing" in no_spec.value.details()
    spec = GenerationSpec(count=2, tissue="glands", height=64, width=64)
    with pytest.raises(grpc.RpcError) as bad_index:
        list(stub.Generate(request_from_spec(spec, indices=[5]), timeout=10))
    assert "indices: [5] are outside [0, 2)" in bad_index.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        client.get_job("nope")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "job 'nope' is unknown" in unknown.value.details()


def test_ihc_bins_and_refine_over_grpc(client: HistosynthClient) -> None:
    spec = GenerationSpec(
        count=3, tissue="ihc", height=128, width=128, seed=4,
        strata=tuple(
            StratumSpec(label, positive_proportion=FractionRange(low, high))
            for label, low, high in (("<1%", 0.0, 0.0099), ("1-49%", 0.01, 0.49), (">=50%", 0.5, 1.0))
        ),
    )
    assert [s.scores["tps_bin"] for s in client.generate(spec)] == [0.0, 1.0, 2.0]
    refined = list(client.generate(dict(GLANDS, count=1, refine=True)))
    assert [m["name"] for m in refined[0].provenance["models"]] == ["renderer-he-glands", "mask-refiner"]


def test_client_refine_and_render(client: HistosynthClient) -> None:
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[:, 8:24, 8:24] = 1
    refined = client.refine(masks, noise_spacing=6.0, seed=3)
    assert refined.fine_masks.shape == (2, 32, 32) and refined.noise_labels is not None
    rendered = client.render(masks, model="renderer-he-glands", seed=1)
    assert rendered.images.shape == (2, 32, 32, 3) and rendered.model.name == "renderer-he-glands"


@pytest.mark.parametrize("uri", ["/etc/histosynth-evil", "../../outside", "file:///root/.ssh"])
def test_sink_outside_the_sink_root_is_refused(client: HistosynthClient, uri: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.submit_job(dict(GLANDS, sink_uri=uri))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "outside this server's sink root" in details or "'..' path component" in details
