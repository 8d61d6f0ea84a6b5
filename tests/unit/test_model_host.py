"""ModelHost: which models a service hosts, loading, batching through the core batcher, shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.core.errors import ModelNotFoundError, UnavailableError
from services.core.model_store import ChecksumMismatchError, ModelStore
from services.model_host import HostSettings, ModelHost
from tests.fixtures.service_models import REFINER_NAME, RENDERER_NAME, write_renderer, write_service_store


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return write_service_store(tmp_path / "model_store")


@pytest.fixture
async def refiners(store_root: Path) -> AsyncIterator[ModelHost]:
    async with ModelHost(ModelStore(store_root), ["refiner"], HostSettings(max_batch_size=2)) as host:
        yield host


async def test_hosts_only_its_kinds_and_loads_latest_versions(refiners: ModelHost) -> None:
    assert refiners.model_names() == [REFINER_NAME]
    assert [model.manifest.key for model in refiners.loaded()] == [f"{REFINER_NAME}/2"]
    assert refiners.is_ready(REFINER_NAME) and not refiners.is_ready(REFINER_NAME, "1")
    assert not refiners.is_ready(RENDERER_NAME)


async def test_older_version_loads_on_first_use(refiners: ModelHost) -> None:
    served = await refiners.get(REFINER_NAME, "1")
    assert served.ref.version == "1" and refiners.is_ready(REFINER_NAME, "1")
    assert await refiners.get(REFINER_NAME, "1") is served


async def test_unknown_and_foreign_models_list_what_is_hosted(refiners: ModelHost) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'renderer-test' is not loaded; available: \['mask-refiner'\]"):
        await refiners.get(RENDERER_NAME)
    with pytest.raises(ModelNotFoundError, match=r"available: \['mask-refiner/1', 'mask-refiner/2'\]"):
        await refiners.get(REFINER_NAME, "3")


async def test_model_added_to_the_store_later_is_found(store_root: Path) -> None:
    async with ModelHost(ModelStore(store_root), ["renderer"]) as host:
        write_renderer(store_root, name="renderer-late")
        assert (await host.get("renderer-late")).ref.name == "renderer-late"


async def test_requests_larger_than_max_batch_are_split_and_rejoined_in_order(
    refiners: ModelHost, store_root: Path
) -> None:
    served = await refiners.get(REFINER_NAME)
    assert served.max_batch_size == 2
    coarse = np.where(np.random.default_rng(0).random((5, 1, 8, 8)) > 0.5, 1.0, -1.0).astype(np.float32)
    outputs = await served.infer({"coarse": coarse})
    expected = ort.InferenceSession(str(store_root / REFINER_NAME / "2" / "model.onnx")).run(None, {"coarse": coarse})[0]
    np.testing.assert_array_equal(outputs["fine"], expected)


async def test_stopped_host_refuses_work(store_root: Path) -> None:
    host = ModelHost(ModelStore(store_root), ["refiner"])
    await host.start()
    await host.stop()
    assert host.loaded() == []
    with pytest.raises(UnavailableError, match="shutting down"):
        await host.get(REFINER_NAME)


def test_kinds_are_required(store_root: Path) -> None:
    with pytest.raises(ValueError, match="at least one model kind"):
        ModelHost(ModelStore(store_root), [])


async def test_a_model_that_fails_to_load_does_not_stop_the_others(store_root: Path) -> None:
    broken = write_renderer(store_root, name="renderer-broken")
    (broken / "model.onnx").write_bytes(b"not an onnx file")  # the checksum no longer matches
    async with ModelHost(ModelStore(store_root), ["renderer"]) as host:
        assert host.is_ready(RENDERER_NAME) and not host.is_ready("renderer-broken")
        assert "sha256 of model.onnx" in host.load_errors["renderer-broken/1"]
        with pytest.raises(ChecksumMismatchError):
            await host.get("renderer-broken")
