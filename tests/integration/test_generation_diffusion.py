"""Mask AND image with no input mask: generation over real gRPC with the shipped diffusion models.

tissue "nuclei-diffusion": nuclei-mask-generator draws a class + instance map with the stratum's
nucleus types present, renderer-diffusion-nuclei paints it; both run through the rendering
process's step-batching engines (services.diffusion), driven by the blocking client like the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.client import HistosynthClient, spec_from_dict
from services.all_in_one import BackgroundServers
from tests.integration.conftest import server_config

MODEL_STORE = Path(__file__).resolve().parents[2] / "model_store"
MODELS = ("nuclei-mask-generator", "renderer-diffusion-nuclei")
SERVICES = ("rendering", "generation")
SPEC = {
    "tissue": "nuclei-diffusion",
    "count": 3,
    "height": 64,
    "width": 64,
    "seed": 3,
    "diffusion": {"steps": 4, "scheduler": "ddim", "guidance_scale": 2.0},
    "strata": [
        {"label": "epi+inf", "nuclei_types": ["epithelial", "inflammatory"]},
        {"label": "spindle", "nuclei_types": ["spindle"]},
    ],
}

pytestmark = pytest.mark.skipif(
    not all((MODEL_STORE / name).is_dir() for name in MODELS), reason=f"needs {MODELS} in model_store/"
)


@pytest.fixture(scope="module")
def client() -> Iterator[HistosynthClient]:
    with BackgroundServers(server_config(MODEL_STORE), SERVICES, {name: 0 for name in SERVICES}) as running:
        with HistosynthClient(targets=running.addresses, timeout=120) as built:
            yield built


def test_generates_mask_and_image_without_an_input_mask(client: HistosynthClient) -> None:
    samples = list(client.generate(spec_from_dict(SPEC)))
    assert [s.stratum for s in samples] == ["epi+inf", "spindle", "epi+inf"]
    for sample in samples:
        image, mask = sample.image, sample.mask
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert float(image.std()) > 5.0  # painted, not a flat colour
        assert int(mask.max()) <= 4  # CoNSeP ids: background + 4 types
        names = [m["name"] for m in sample.provenance["models"]]
        assert names == ["renderer-diffusion-nuclei", "nuclei-mask-generator"]
        parameters = sample.provenance["parameters"]
        assert parameters["diffusion"] == {"steps": 4, "scheduler": "ddim", "guidance_scale": 2.0}
        requested = SPEC["strata"][0 if sample.stratum == "epi+inf" else 1]["nuclei_types"]
        assert {key for key in sample.scores if key.startswith("present/")} == {f"present/{t}" for t in requested}
    # Same spec + seed + models -> byte-identical sample, alone or in a batch.
    again = list(client.generate(spec_from_dict(SPEC), indices=[2]))
    assert np.array_equal(again[0].image, samples[2].image)
    assert np.array_equal(again[0].mask, samples[2].mask)


def test_bad_diffusion_specs_get_invalid_argument(client: HistosynthClient) -> None:
    bad_type = {**SPEC, "strata": [{"label": "x", "nuclei_types": ["mitotic"]}]}
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate(spec_from_dict(bad_type)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "knows" in caught.value.details() and "epithelial" in caught.value.details()
    fractions = {**SPEC, "strata": [{"label": "x", "class_fractions": {"epithelial": 0.3}}]}
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate(spec_from_dict(fractions)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server keeps serving after refusing.
    assert len(list(client.generate(spec_from_dict({**SPEC, "count": 1})))) == 1
