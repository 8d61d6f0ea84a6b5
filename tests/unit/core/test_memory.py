"""Memory admission (services/core/memory.py): sizes, budgets, memory models and the shared ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.config import ConfigError, ServerConfig
from services.core.errors import HistosynthError
from services.core.memory import (
    MemoryBudget,
    MemoryModel,
    default_memory_budget,
    host_memory_bytes,
    memory_model_for,
    parse_bytes,
)
from services.core.model_store import ModelStore

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("text", "size"),
    [("6442450944", 6442450944), ("6GiB", 6 * 2**30), ("6G", 6 * 10**9), ("512MiB", 512 * 2**20),
     ("1.5 GiB", int(1.5 * 2**30)), ("2000m", 2 * 10**9)],
)
def test_sizes_parse_with_units(text: str, size: int) -> None:
    assert parse_bytes(text) == size


def test_the_budget_setting_is_checked_at_start_up() -> None:
    assert ServerConfig.from_env(environ={"HISTOSYNTH_MEMORY_BUDGET": "2GiB"}).memory_budget == "2GiB"
    for bad in ("lots", "-1G", "12 parsecs", "100"):
        with pytest.raises(ConfigError, match="HISTOSYNTH_MEMORY_BUDGET"):
            ServerConfig.from_env(environ={"HISTOSYNTH_MEMORY_BUDGET": bad})


def test_default_budget_is_three_quarters_of_the_memory_we_may_use() -> None:
    host = host_memory_bytes()
    assert host is not None
    assert 0 < default_memory_budget() <= 0.75 * host + 1


def test_memory_model_scales_with_pixels_tokens_squared_and_rows() -> None:
    model = MemoryModel(bytes_per_pixel=10.0, bytes_per_token2=2.0, token_stride=4, bytes_per_row=100.0)
    tokens = (64 // 4) * (64 // 4)
    assert model.estimate(1, 64, 64) == 100 + 10 * 64 * 64 + 2 * tokens**2
    assert model.estimate(3, 64, 64) == 3 * model.estimate(1, 64, 64)
    assert model.estimate(1, 128, 128) > 4 * model.estimate(1, 64, 64)  # quadratic in the area
    assert model.rows_within(model.estimate(5, 64, 64), 64, 64) == 5
    with pytest.raises(ValueError, match="unknown key"):
        MemoryModel.from_metadata({"bytes_per_pixel": 1, "bytes_per_pixle": 2})


def test_one_ledger_per_process_and_clear_refusals() -> None:
    small, large = MemoryBudget(1000), MemoryBudget(10_000)
    with pytest.raises(HistosynthError, match="more than this server's memory budget") as caught:
        small.check(2000, "a call")
    assert caught.value.status == "RESOURCE_EXHAUSTED" and "HISTOSYNTH_MEMORY_BUDGET" in caught.value.message
    before = small.in_use
    with large.reserve(900, "first"):
        assert small.in_use == before + 900  # every budget sees every reservation of the process
        with pytest.raises(HistosynthError, match="held by calls in flight"):
            with small.reserve(500, "second"):
                pass
        with small.reserve(500, "admitted work", force=True):
            assert small.in_use == before + 1400
    assert small.in_use == before


def test_shipped_models_get_derived_memory_models() -> None:
    store = ModelStore(REPO_ROOT / "model_store")
    denoiser = memory_model_for(store.get("renderer-diffusion-nuclei"))
    # SPADE U-Net, channels [16, 32, 64], attention heads of 16 at the lowest level: 4 heads at 1/4 resolution.
    assert denoiser.source == "derived" and denoiser.token_stride == 4 and denoiser.has_attention
    # Measured peak per row (ONNX Runtime CPU): 69 MiB at 128 x 128, 254 MiB at 192 x 192; the model covers both.
    assert 69 * 2**20 <= denoiser.estimate(1, 128, 128) <= 2 * 69 * 2**20
    assert 254 * 2**20 <= denoiser.estimate(1, 192, 192) <= 2 * 254 * 2**20
    renderer = memory_model_for(store.get("renderer-he-glands"))
    assert not renderer.has_attention
    assert 34 * 2**20 <= renderer.estimate(1, 256, 256) <= 8 * 34 * 2**20  # measured 34 MiB


def test_a_row_that_can_never_fit_is_refused_from_its_shape_before_any_tensor_exists() -> None:
    import numpy as np

    from services.model_host import ServedModel

    store = ModelStore(REPO_ROOT / "model_store")
    manifest = store.get("histology-encoder")
    model = MemoryModel(bytes_per_pixel=100.0)
    served = ServedModel(manifest, pool=None, batcher=None, memory=model, budget=MemoryBudget(64 * 2**20))  # type: ignore[arg-type]
    name = manifest.inputs[0].name
    served.check_row_fits({name: ((500, 3, 256, 256), np.dtype(np.float32))})  # 7 MiB a row: rows are split later
    with pytest.raises(HistosynthError, match="more than this server's memory budget") as caught:
        served.check_row_fits({name: ((4, 3, 2048, 2048), np.dtype(np.float32))})  # ~500 MiB for one row
    assert caught.value.status == "RESOURCE_EXHAUSTED" and "1 row(s) of 2048 x 2048" in caught.value.message
