"""DiffusionEngine over a real tiny denoiser in ONNX Runtime (tests/fixtures/diffusion_models.py).

The headline test: a request gives bit-identical pixels whether it runs alone or co-batched with
7 other requests that started at other times (so one denoiser call holds rows at different
timesteps, with and without guidance, DDIM and DPM-Solver++ mixed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from services.core.errors import BatchFailedError, DeadlineExceededError, HistosynthError, InvalidInputError, QueueFullError
from services.core.metrics import REGISTRY
from services.core.model_store import ModelStore
from services.diffusion.engine import DiffusionEngine, EngineConfig, SamplingParams
from services.diffusion.spec import DiffusionSpec
from services.model_host import ModelHost, ServedModel
from tests.fixtures.diffusion_models import RENDERER_NAME, SAMPLE_SIZE, write_diffusion_store

H, W = SAMPLE_SIZE


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_diffusion_store(tmp_path_factory.mktemp("diffusion_store"))


@pytest_asyncio.fixture
async def served(store: Path) -> AsyncIterator[ServedModel]:
    host = ModelHost(ModelStore(store), ["denoiser"])
    await host.start()
    try:
        yield await host.get(RENDERER_NAME)
    finally:
        await host.stop()


def make_engine(served: ServedModel, infer=None, **config: object) -> DiffusionEngine:  # noqa: ANN001
    return DiffusionEngine(
        DiffusionSpec.from_manifest(served.manifest),
        infer or served.pool.infer,
        EngineConfig(**{"max_rows": 16, **config}),  # type: ignore[arg-type]
        model=served.manifest.name,
        version=served.manifest.version,
    )


def condition(engine: DiffusionEngine, seed: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, engine.spec.num_classes, size).astype(np.uint8)
    return engine.spec.class_map_condition(classes, None)


async def wait_for_calls(engine: DiffusionEngine, calls: int) -> None:
    while engine.calls < calls:
        await asyncio.sleep(0.0005)


async def test_same_seed_same_image_alone_or_cobatched_at_staggered_timesteps(served: ServedModel) -> None:
    probe = SamplingParams(steps=12, scheduler="ddim", guidance_scale=2.0, seed=42)
    alone_engine = make_engine(served)
    alone = await alone_engine.sample(condition(alone_engine, 0), probe)
    assert alone.shape == (3, H, W) and alone.dtype == np.float32

    engine = make_engine(served)
    others = [
        SamplingParams(steps=20, scheduler="dpmsolver++", guidance_scale=1.0, seed=7),
        SamplingParams(steps=15, scheduler="ddim", guidance_scale=3.0, seed=8),
        SamplingParams(steps=10, scheduler="dpmsolver++", guidance_scale=2.0, seed=9),
    ]
    tasks = []
    # Staggered arrivals: each request joins after the previous ones have run a few steps.
    for index in range(7):
        params = others[index % len(others)]
        params = SamplingParams(params.steps, params.scheduler, params.guidance_scale, params.seed + index)
        tasks.append(asyncio.create_task(engine.sample(condition(engine, 100 + index), params)))
        await wait_for_calls(engine, 2 * (index + 1))
        if index == 3:
            tasks.append(asyncio.create_task(engine.sample(condition(engine, 0), probe)))
    results = await asyncio.gather(*tasks)
    np.testing.assert_array_equal(results[4], alone)  # bit-identical, not just close
    assert engine.mixed_timestep_calls > 0 and engine.max_rows_seen > 2
    # Each co-batched request also equals its own solo run.
    solo_engine = make_engine(served)
    for index in (0, 5):
        params = others[index % len(others)]
        params = SamplingParams(params.steps, params.scheduler, params.guidance_scale, params.seed + index)
        solo = await solo_engine.sample(condition(solo_engine, 100 + index), params)
        np.testing.assert_array_equal(results[index if index < 4 else index + 1], solo)


async def test_different_seeds_give_different_images(served: ServedModel) -> None:
    engine = make_engine(served)
    cond = condition(engine, 1)
    first, second = await asyncio.gather(
        engine.sample(cond, SamplingParams(8, "ddim", 2.0, 1)), engine.sample(cond, SamplingParams(8, "ddim", 2.0, 2))
    )
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("step_batching", [True, False])
async def test_newcomer_joins_mid_way_only_with_step_batching(served: ServedModel, step_batching: bool) -> None:
    engine = make_engine(served, step_batching=step_batching)
    finished: dict[str, float] = {}

    async def run(name: str, params: SamplingParams) -> None:
        await engine.sample(condition(engine, 3), params)
        finished[name] = time.monotonic()

    long = asyncio.create_task(run("long", SamplingParams(60, "ddim", 2.0, 1)))
    await wait_for_calls(engine, 10)
    short = asyncio.create_task(run("short", SamplingParams(5, "ddim", 2.0, 2)))
    await asyncio.gather(long, short)
    if step_batching:
        assert finished["short"] < finished["long"]  # did not wait for the long one
        assert engine.max_rows_seen == 4 and engine.calls == 60  # joined the long one's calls
    else:
        assert finished["short"] > finished["long"]  # request-level: waited for the batch to finish
        assert engine.max_rows_seen == 2 and engine.calls == 65


async def test_static_batching_runs_queued_requests_together(served: ServedModel) -> None:
    engine = make_engine(served, step_batching=False)
    params = [SamplingParams(6, "ddim", 2.0, seed) for seed in range(4)]
    await asyncio.gather(*(engine.sample(condition(engine, 5), p) for p in params))
    assert engine.calls == 6 and engine.max_rows_seen == 8


async def test_max_rows_bounds_every_call(served: ServedModel) -> None:
    engine = make_engine(served, max_rows=4)
    params = [SamplingParams(5, "ddim", 2.0, seed) for seed in range(5)]
    await asyncio.gather(*(engine.sample(condition(engine, 5), p) for p in params))
    assert engine.max_rows_seen == 4 and engine.calls == 13  # 5 requests x 5 steps, 2 per call, round-robin


async def test_deadline_drops_only_that_request(served: ServedModel) -> None:
    engine = make_engine(served)
    keeper = SamplingParams(1000, "ddim", 2.0, 11)
    expected = await make_engine(served).sample(condition(engine, 4), keeper)
    kept = asyncio.create_task(engine.sample(condition(engine, 4), keeper))
    await wait_for_calls(engine, 2)
    with pytest.raises(DeadlineExceededError, match="deadline passed") as caught:
        await engine.sample(condition(engine, 6), SamplingParams(1000, "ddim", 2.0, 1), time.monotonic() + 0.03)
    assert caught.value.status == "DEADLINE_EXCEEDED"
    assert not kept.done()  # still running after the other one's deadline
    calls = engine.calls
    await wait_for_calls(engine, calls + 1)
    assert engine.in_flight == 1  # the expired request left at the next iteration
    np.testing.assert_array_equal(await kept, expected)


async def test_cancelled_request_leaves_the_engine(served: ServedModel) -> None:
    engine = make_engine(served)
    doomed = asyncio.create_task(engine.sample(condition(engine, 1), SamplingParams(1000, "ddim", 2.0, 1)))
    other = asyncio.create_task(engine.sample(condition(engine, 2), SamplingParams(20, "ddim", 2.0, 2)))
    await wait_for_calls(engine, 3)
    doomed.cancel()
    await other
    assert doomed.cancelled() and engine.in_flight == 0 and engine.calls < 100


async def test_full_queue_is_refused_with_resource_exhausted(served: ServedModel) -> None:
    engine = make_engine(served, max_active=1, max_queue=2)
    params = SamplingParams(4, "ddim", 2.0, 0)
    tasks = [asyncio.create_task(engine.sample(condition(engine, 1), params)) for _ in range(3)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], QueueFullError) and results[2].status == "RESOURCE_EXHAUSTED"
    assert "retry with exponential backoff" in results[2].message
    assert all(isinstance(result, np.ndarray) for result in results[:2])


async def test_failed_call_fails_only_its_requests_and_the_engine_keeps_serving(served: ServedModel) -> None:
    """Fault injection around the real runtime: calls holding 8 x 8 samples raise."""

    async def faulty(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feeds["sample"].shape[-1] == 8:
            raise RuntimeError("injected device fault")
        return await served.pool.infer(feeds)

    engine = make_engine(served, infer=faulty)
    params = SamplingParams(10, "ddim", 2.0, 3)
    good, bad = await asyncio.gather(
        engine.sample(condition(engine, 1), params),
        engine.sample(condition(engine, 1, (8, 8)), params),
        return_exceptions=True,
    )
    assert isinstance(good, np.ndarray)
    assert isinstance(bad, BatchFailedError) and "injected device fault" in bad.message
    again = await engine.sample(condition(engine, 1), params)
    np.testing.assert_array_equal(again, good)


@pytest.mark.parametrize(
    ("params", "size", "message"),
    [
        (SamplingParams(0, "ddim", 2.0, 0), (H, W), r"steps must be in 1\.\.1000"),
        (SamplingParams(2000, "ddim", 2.0, 0), (H, W), r"steps must be in 1\.\.1000"),
        (SamplingParams(10, "euler", 2.0, 0), (H, W), r"scheduler 'euler' is unknown; valid: ddim, dpmsolver\+\+"),
        (SamplingParams(10, "ddim", float("nan"), 0), (H, W), "guidance_scale"),
        (SamplingParams(10, "ddim", 2.0, -1), (H, W), "seed"),
        (SamplingParams(10, "ddim", 2.0, 0), (15, 16), r"not a positive multiple of 2"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    served: ServedModel, params: SamplingParams, size: tuple[int, int], message: str
) -> None:
    engine = make_engine(served)
    with pytest.raises(InvalidInputError, match=message):
        await engine.sample(condition(engine, 0, size), params)
    with pytest.raises(InvalidInputError, match=r"condition must be float32 \[6, 16, 16\]"):
        await engine.sample(np.zeros((5, H, W), np.float32), SamplingParams(10, "ddim", 2.0, 0))


async def test_metrics_count_steps_rows_and_in_flight(served: ServedModel) -> None:
    labels = {"model": served.manifest.name, "version": served.manifest.version}

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    steps_before = value("histosynth_model_denoising_steps_total")
    calls_before = value("histosynth_model_denoiser_call_samples_count")
    engine = make_engine(served)
    params = [SamplingParams(5, "ddim", 2.0, seed) for seed in range(3)]
    await asyncio.gather(*(engine.sample(condition(engine, 5), p) for p in params))
    assert value("histosynth_model_denoising_steps_total") - steps_before == 15
    assert value("histosynth_model_denoiser_call_samples_count") - calls_before == 5
    assert value("histosynth_model_diffusion_in_flight_samples") == 0
    assert value("histosynth_model_denoising_step_duration_seconds_count") > 0


async def test_runtime_rows_are_batch_invariant(served: ServedModel) -> None:
    """ORT CPU computes each row independently of the others: the premise of the determinism above."""
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((16, 3, H, W), dtype=np.float32),
        "timestep": rng.integers(0, 1000, 16).astype(np.float32),
        "condition": rng.random((16, 6, H, W), dtype=np.float32),
    }
    full = (await served.pool.infer(feeds))["model_output"]
    for start, stop in ((0, 1), (3, 4), (5, 12), (15, 16)):
        part = (await served.pool.infer({k: v[start:stop] for k, v in feeds.items()}))["model_output"]
        np.testing.assert_array_equal(part, full[start:stop])


async def test_a_cfg_pair_larger_than_max_rows_is_split_with_the_same_result(served: ServedModel) -> None:
    params = SamplingParams(6, "dpmsolver++", 2.0, 5)
    wide = await make_engine(served).sample(condition(make_engine(served), 2), params)
    narrow_engine = make_engine(served, max_rows=1)
    narrow = await narrow_engine.sample(condition(narrow_engine, 2), params)
    np.testing.assert_array_equal(narrow, wide)
    assert narrow_engine.max_rows_seen == 2 and narrow_engine.calls == 6  # one step = 2 runtime calls of 1 row


async def test_close_fails_waiting_requests_with_unavailable(served: ServedModel) -> None:
    from services.core.errors import UnavailableError

    engine = make_engine(served)
    task = asyncio.create_task(engine.sample(condition(engine, 1), SamplingParams(1000, "ddim", 2.0, 1)))
    await wait_for_calls(engine, 2)
    await engine.close()
    with pytest.raises(UnavailableError, match="shutting down"):
        await task
    with pytest.raises(UnavailableError, match="closed"):
        await engine.sample(condition(engine, 1), SamplingParams(5, "ddim", 2.0, 1))


# ---------------------------------------------------------------- issue 14: memory and deadlines
def budgeted_engine(served: ServedModel, rows_of_room: int) -> DiffusionEngine:
    from services.core.memory import MemoryBudget, MemoryModel

    memory = MemoryModel(bytes_per_pixel=1000.0, bytes_per_row=0.0, source="test")
    budget = MemoryBudget(memory.estimate(rows_of_room, H, W) + 2 * memory.estimate(1, H, W) // 3)
    return DiffusionEngine(
        DiffusionSpec.from_manifest(served.manifest), served.pool.infer, EngineConfig(max_rows=16),
        model=served.manifest.name, version=served.manifest.version, memory=memory, budget=budget,
    )


async def test_step_engine_packs_only_the_rows_the_memory_budget_has_room_for(served: ServedModel) -> None:
    engine = budgeted_engine(served, rows_of_room=3)
    assert engine.row_cap((H, W)) == 3
    reference = await make_engine(served).sample(condition(engine, 0), SamplingParams(3, "ddim", 2.0, 7))
    results = await asyncio.gather(
        *(engine.sample(condition(engine, index), SamplingParams(3, "ddim", 2.0, 7 + index)) for index in range(6))
    )
    assert engine.max_rows_seen <= 3  # CFG pairs (2 rows) split into calls of at most the room left
    np.testing.assert_array_equal(results[0], reference)  # splitting rows never changes a sample's bits
    with pytest.raises(HistosynthError, match="HISTOSYNTH_MEMORY_BUDGET") as caught:
        engine.check_size((8 * H, 8 * W))
    assert caught.value.status == "RESOURCE_EXHAUSTED"


async def test_an_expired_request_leaves_the_engine_at_the_next_step(served: ServedModel) -> None:
    engine = make_engine(served)
    params = SamplingParams(1000, "ddim", 2.0, 3)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await engine.sample(condition(engine, 3), params, deadline=time.monotonic() + 0.2)
    await asyncio.sleep(0.05)  # at most one step in flight when the deadline passed
    assert engine.in_flight == 0 and engine.queued == 0
    calls = engine.calls
    await asyncio.sleep(0.1)
    assert engine.calls == calls  # nothing computed for it any more
    assert time.monotonic() - started < 1.0
