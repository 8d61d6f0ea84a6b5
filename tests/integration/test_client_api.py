"""The Python client against `serve --all`-style servers on loopback: base_port, scoring calls, spec files,
Sample.save() and typed errors (issue 16.3)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from clients.client import (
    SERVE_ALL_PORT_OFFSETS,
    HistosynthClient,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from services.all_in_one import PORT_OFFSETS, BackgroundServers, default_ports
from services.generation.remote import GenerationSettings
from services.generation.sink import read_label_png
from tests.fixtures.generation_models import write_generation_store
from tests.integration.conftest import server_config

SERVICES = ("refinement", "rendering", "generation", "scoring")
GLANDS = {"tissue": "glands", "count": 2, "height": 64, "width": 64, "seed": 3}


def _free_base_port() -> int:
    """A base port whose 4 serve --all ports are free now (probed, then released)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 3 > 65535:
            continue
        sockets = []
        try:
            for offset in range(4):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no 4 consecutive free ports")


@pytest.fixture(scope="module")
def base_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    store = write_generation_store(tmp_path_factory.mktemp("client_api") / "model_store")
    base = _free_base_port()
    with BackgroundServers(server_config(store, port=base), SERVICES, default_ports(base, SERVICES),
                           generation=GenerationSettings()):
        yield base


@pytest.fixture(scope="module")
def client(base_port: int) -> Iterator[HistosynthClient]:
    with HistosynthClient(base_port=base_port, timeout=60) as built:
        yield built


def test_client_offsets_are_serve_alls() -> None:
    assert SERVE_ALL_PORT_OFFSETS == dict(PORT_OFFSETS)


def test_base_port_reaches_every_service(client: HistosynthClient, base_port: int) -> None:
    assert client.targets == {name: f"127.0.0.1:{base_port + offset}" for name, offset in PORT_OFFSETS.items()}
    masks = np.zeros((1, 64, 64), np.uint8)
    masks[0, 16:48, 16:48] = 1
    assert client.refine(masks).fine_masks.shape == (1, 64, 64)
    images = client.render(masks + 1, model="renderer-he-glands").images
    assert images.shape == (1, 64, 64, 3)
    scores = client.consistency(images, masks + 1, renderer="renderer-he-glands", return_predictions=True)
    assert scores.miou.shape == (1,) and 0 <= scores.mean_miou <= 1
    assert scores.segmenter.name and scores.predictions is not None and scores.predictions.shape == (1, 64, 64)
    class_maps = np.zeros((2, 8, 8), np.uint8)
    class_maps[0, :4] = 2
    class_maps[0, 4:] = 1
    tps = client.tumor_proportion(class_maps, positive_id=2, negative_id=1)
    assert [(round(t["tps"], 3), t["bin"]) for t in tps] == [(0.5, ">=50%"), (0.0, "<1%")]
    shapes = client.score_masks(masks, masks, class_ids=[1])
    # The MaskScores message as a dict (uint64 fields are strings in proto3 JSON).
    assert (shapes["real_count"], shapes["synthetic_count"], shapes["class_ids"]) == ("1", "1", [1])
    assert shapes["image_mean_ks"] == 0.0  # identical sets


def test_spec_file_and_save(client: HistosynthClient, tmp_path: Path) -> None:
    spec_file = tmp_path / "glands.yaml"
    spec_file.write_text(yaml.safe_dump(GLANDS))
    from_file = list(client.generate(spec_file))
    from_dict = list(client.generate(GLANDS))
    assert [s.image_png for s in from_file] == [s.image_png for s in from_dict]
    out = tmp_path / "saved"
    record = from_file[1].save(out)
    assert record == out / "000001.json"
    body = json.loads(record.read_text())
    assert body["index"] == 1 and body["provenance"]["seed"] == from_file[1].provenance["seed"]
    assert (out / "000001_image.png").read_bytes() == from_file[1].image_png
    np.testing.assert_array_equal(read_label_png(out / "000001_mask.png"), from_file[1].mask)
    with pytest.raises(ValueError, match="spec file .*missing.yaml"):
        list(client.generate(tmp_path / "missing.yaml"))


def test_stain_variation_from_a_spec_dict_reaches_every_sample(client: HistosynthClient) -> None:
    spec = {"tissue": "nuclei", "count": 2, "height": 64, "width": 64, "seed": 4}
    plain = list(client.generate(spec))
    stained = list(client.generate(dict(spec, stain_variation=True, stain_source="pale")))
    assert [s.image_png for s in plain] != [s.image_png for s in stained]
    assert all(s.provenance["parameters"]["stain_source"] == "pale" for s in stained)
    with pytest.raises(InvalidArgumentError, match="stain_source 'pale' is set but spec.stain_variation is not"):
        list(client.generate(dict(spec, stain_source="pale")))


def test_typed_errors_keep_status_and_details(client: HistosynthClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.render(np.zeros((1, 8, 8), np.uint8), model="renderer-nope")
    assert isinstance(caught.value, grpc.RpcError) and caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "renderer-nope" in caught.value.details()
    with pytest.raises(InvalidArgumentError, match=r"renderer-he-glands/\d+ has no stain bank"):
        client.render(np.ones((1, 64, 64), np.uint8), model="renderer-he-glands", stain_variation=True)
    with pytest.raises(InvalidArgumentError):
        list(client.generate(dict(GLANDS, tissue="bones")))
    with pytest.raises(UnavailableError):
        HistosynthClient(base_port=1, timeout=5).refine(np.zeros((1, 8, 8), np.uint8))


def test_base_port_needs_a_bare_host() -> None:
    with pytest.raises(ValueError, match="host name without a port"):
        HistosynthClient("127.0.0.1:50051", base_port=50051)
