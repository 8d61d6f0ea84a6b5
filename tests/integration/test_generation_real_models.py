"""Generation with the trained models shipped in model_store/ (skipped for models not exported yet)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from services.core.config import ServerConfig
from services.all_in_one import create_stack
from services.generation.servicer import GenerationStack
from services.generation.spec import RENDERER_FOR_TISSUE, FractionRange, GenerationSpec, StratumSpec

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL_STORE = Path(__file__).resolve().parents[2] / "model_store"
SPECS = {
    "glands": GenerationSpec(count=2, tissue="glands", seed=1),
    "nuclei": GenerationSpec(count=2, tissue="nuclei", seed=1),
    "ihc": GenerationSpec(
        count=2, tissue="ihc", seed=1,
        strata=(StratumSpec("<1%", positive_proportion=FractionRange(0.0, 0.0099)),
                StratumSpec(">=50%", positive_proportion=FractionRange(0.5, 1.0))),
    ),
}


def shipped(tissue: str) -> bool:
    return (MODEL_STORE / RENDERER_FOR_TISSUE[tissue]).is_dir()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[GenerationStack]:
    if not any(shipped(tissue) for tissue in SPECS):
        pytest.skip(f"no trained renderers in {MODEL_STORE} yet")
    config = ServerConfig(model_store=MODEL_STORE, port=0, metrics_port=None, log_format="text")
    built = create_stack(config)
    await built.start_hosts()
    yield built
    await built.stop()


@pytest.mark.parametrize("tissue", sorted(SPECS))
async def test_shipped_renderer_generates(stack: GenerationStack, tissue: str) -> None:
    if not shipped(tissue):
        pytest.skip(f"{RENDERER_FOR_TISSUE[tissue]} is not in {MODEL_STORE} yet")
    spec = SPECS[tissue]
    job = await stack.pipeline.prepare(spec)
    samples = [sample async for sample in stack.pipeline.run(job)]
    assert len(samples) == spec.count
    for sample in samples:
        assert sample.image.shape == (spec.height, spec.width, 3)
        assert float(sample.image.std()) > 5.0  # a rendered tissue image, not a flat colour
        assert sample.scores.get("fraction_error_max", 0.0) <= spec.tolerance
        assert sample.provenance.models[0].name == RENDERER_FOR_TISSUE[tissue]
    if tissue == "ihc":
        assert [s.scores["tps_bin"] for s in samples] == [0.0, 2.0]
    again = [s async for s in stack.pipeline.run(await stack.pipeline.prepare(dataclasses.replace(spec)), indices=[1])]
    assert again[0].image_png() == samples[1].image_png()
    assert np.array_equal(again[0].class_map, samples[1].class_map)


async def test_shipped_refiner_refines_the_tissue_layer(stack: GenerationStack) -> None:
    if not (shipped("glands") and (MODEL_STORE / "mask-refiner").is_dir()):
        pytest.skip("needs renderer-he-glands and mask-refiner in model_store/")
    spec = dataclasses.replace(
        SPECS["glands"], refine=True,
        strata=(StratumSpec("x", class_fractions={"gland": 0.3, "non-tissue": 0.1}),),
    )
    samples = [s async for s in stack.pipeline.run(await stack.pipeline.prepare(spec))]
    for sample in samples:
        assert [m.name for m in sample.provenance.models] == ["renderer-he-glands", "mask-refiner"]
        # The refined tissue layer is fed back until the fractions land (REFINE_ROUNDS at most).
        assert sample.scores["fraction_error_max"] <= 2 * spec.tolerance
