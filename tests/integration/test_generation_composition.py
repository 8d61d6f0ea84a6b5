"""Generation composed over the wire: a model-less Generation server calling separately started
MaskRendering, MaskRefinement and Scoring servers on loopback gives byte-identical samples to the
embedded mode (every model in the generation process).

Each server set has its own event loop thread, model hosts and batchers; the remote Generation
server hosts no model at all (its stack has no host) and reaches the others through
HISTOSYNTH_GENERATION_*_ADDRESS settings, as the Helm chart deploys it.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clients.client import ClientSample, HistosynthClient
from services.all_in_one import BackgroundServers
from services.generation.remote import GenerationSettings
from tests.fixtures.generation_models import write_generation_store
from tests.integration.conftest import server_config

GLANDS_REFINED = {
    "tissue": "glands", "count": 3, "height": 64, "width": 64, "seed": 11, "refine": True,
    "strata": [{"label": "mid", "class_fraction_ranges": {"gland": [0.2, 0.4]}}],
}
NUCLEI = {"tissue": "nuclei", "count": 3, "height": 64, "width": 64, "seed": 5}
# Stain variation needs the renderer's stain sources from DescribeModel and Render's stain fields over the wire.
NUCLEI_STAINED = dict(NUCLEI, stain_variation=True, stain_source="pale")
IHC = {"tissue": "ihc", "count": 3, "height": 64, "width": 64, "seed": 2,
       "strata": [{"label": "low", "positive_proportion": [0.0, 0.005]}, {"label": "high", "positive_proportion": [0.6, 0.9]}]}
GATED = {"tissue": "glands", "count": 2, "height": 64, "width": 64, "seed": 4, "min_consistency": 1e-9}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generation_store(tmp_path_factory.mktemp("composition") / "model_store")


@pytest.fixture(scope="module")
def embedded(store: Path) -> Iterator[HistosynthClient]:
    services = ("refinement", "rendering", "generation")
    with BackgroundServers(server_config(store), services, {name: 0 for name in services},
                           generation=GenerationSettings()) as running:
        with HistosynthClient(targets=running.addresses, timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def peers(store: Path) -> Iterator[dict[str, str]]:
    """Rendering, refinement and scoring, each started on its own (own hosts, own event loop)."""
    started = []
    try:
        for name in ("rendering", "refinement", "scoring"):
            started.append(BackgroundServers(server_config(store), (name,), {name: 0}).start())
        yield {name: servers.addresses[name] for name, servers in zip(("rendering", "refinement", "scoring"), started)}
    finally:
        for servers in started:
            servers.stop()


@pytest.fixture(scope="module")
def remote_servers(tmp_path_factory: pytest.TempPathFactory, peers: dict[str, str]) -> Iterator[BackgroundServers]:
    # An empty model store: the remote generation server must not need a single model file.
    empty = tmp_path_factory.mktemp("no_models")
    settings = GenerationSettings(
        rendering_address=peers["rendering"], refinement_address=peers["refinement"], scoring_address=peers["scoring"]
    )
    with BackgroundServers(server_config(empty), ("generation",), {"generation": 0}, generation=settings) as running:
        yield running


@pytest.fixture(scope="module")
def remote(remote_servers: BackgroundServers) -> Iterator[HistosynthClient]:
    with HistosynthClient(targets=remote_servers.addresses, timeout=60) as client:
        yield client


def fingerprint(sample: ClientSample) -> tuple:
    instances = b"" if sample.instances is None else sample.instances.tobytes()
    return (sample.index, sample.stratum, sample.image_png, sample.mask.tobytes(), instances,
            sorted(sample.scores.items()), sample.provenance, sample.class_names)


def test_remote_generation_server_hosts_no_model(remote_servers: BackgroundServers) -> None:
    running = remote_servers.running
    assert running.hosts == [] and running.stack is not None
    assert running.stack.hosts == () and running.stack.peers is not None


@pytest.mark.parametrize("spec", [GLANDS_REFINED, NUCLEI, NUCLEI_STAINED, IHC, GATED],
                         ids=["glands-refined", "nuclei", "nuclei-stained", "ihc", "gated"])
def test_remote_samples_are_byte_identical_to_embedded(
    embedded: HistosynthClient, remote: HistosynthClient, spec: dict
) -> None:
    here = [fingerprint(s) for s in embedded.generate(spec)]
    there = [fingerprint(s) for s in remote.generate(spec)]
    assert len(here) == spec["count"]
    assert there == here
    if spec is GLANDS_REFINED:
        assert [m["name"] for m in here[0][6]["models"]] == ["renderer-he-glands", "mask-refiner"]
        assert all(m["sha256"] for m in here[0][6]["models"])
    if spec is GATED:
        assert all(0 < dict(s[5])["consistency"] <= 1 for s in there)


def test_remote_sink_matches_embedded(embedded: HistosynthClient, remote: HistosynthClient, tmp_path: Path) -> None:
    for client, name in ((embedded, "embedded"), (remote, "remote")):
        job = client.submit_job(dict(NUCLEI, sink_uri=str(tmp_path / name)))
        for _ in range(600):
            state = client.get_job(job.job_id)
            if state.state in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.05)
        assert state.state == "succeeded", state.error
    for path in sorted((tmp_path / "embedded").iterdir()):
        assert (tmp_path / "remote" / path.name).read_bytes() == path.read_bytes(), path.name


def test_peer_errors_keep_their_status_and_name_the_peer(remote: HistosynthClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(remote.generate(dict(NUCLEI, model_versions={"renderer-he-nuclei": "7"})))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "MaskRendering at 127.0.0.1:" in caught.value.details()


def test_missing_peer_is_failed_precondition(tmp_path: Path, peers: dict[str, str]) -> None:
    settings = GenerationSettings(rendering_address=peers["rendering"])  # no refinement, no scoring peer
    with BackgroundServers(server_config(tmp_path), ("generation",), {"generation": 0}, generation=settings) as running:
        with HistosynthClient(targets=running.addresses, timeout=30) as client:
            for spec in (GLANDS_REFINED, GATED):
                with pytest.raises(grpc.RpcError) as caught:
                    list(client.generate(spec))
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
            assert len(list(client.generate(NUCLEI))) == 3


def test_unreachable_peer_is_unavailable(tmp_path: Path) -> None:
    settings = GenerationSettings(rendering_address="127.0.0.1:1", peer_timeout_s=5)
    with BackgroundServers(server_config(tmp_path), ("generation",), {"generation": 0}, generation=settings) as running:
        with HistosynthClient(targets=running.addresses, timeout=30) as client:
            with pytest.raises(grpc.RpcError) as caught:
                list(client.generate(NUCLEI))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "MaskRendering at 127.0.0.1:1" in caught.value.details()


def test_no_servicer_or_pipeline_imports_another_service() -> None:
    """Design rule 14: peers share code only through services/core (and the shared model host/codec)."""
    root = Path(__file__).resolve().parents[2] / "services"
    peers = {"generation", "mask_rendering", "mask_refinement", "scoring"}
    offenders = []
    for service in sorted(peers):
        for path in sorted((root / service).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
                for name in names:
                    parts = name.split(".")
                    if len(parts) >= 2 and parts[0] == "services" and parts[1] in peers - {service}:
                        offenders.append(f"{path.relative_to(root)} imports {name}")
    assert offenders == []
