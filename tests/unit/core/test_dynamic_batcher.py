"""services.core.dynamic_batcher: merging, splitting, grouping, deadlines, cancellation, drain."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from services.core.device_pool import DevicePool
from services.core.dynamic_batcher import BatcherConfig, DynamicBatcher
from services.core.errors import (
    BatchFailedError,
    DeadlineExceededError,
    InvalidInputError,
    QueueFullError,
    UnavailableError,
)
from services.core.metrics import REGISTRY
from tests.unit.core.conftest import TILE, make_onnx_runtime

pytestmark = pytest.mark.timeout(10)


def f(x: np.ndarray) -> np.ndarray:
    """The row-wise function every numpy 'model' here computes."""
    return x * 2.0 + 1.0


class RecordingInfer:
    """Async infer computing f on every input, recording each batch it receives.

    With ``gated=True`` each call waits for ``release()`` so tests can hold a batch in
    compute while they fill the queue.
    """

    def __init__(self, gated: bool = False, fail_if=None) -> None:
        self.batches: list[dict[str, np.ndarray]] = []
        self.entered = asyncio.Event()
        self._gate = asyncio.Event()
        if not gated:
            self._gate.set()
        self._fail_if = fail_if

    def release(self) -> None:
        self._gate.set()

    def seen_values(self) -> set[float]:
        return {float(v) for batch in self.batches for array in batch.values() for v in array.reshape(-1)}

    async def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append({name: array.copy() for name, array in feeds.items()})
        self.entered.set()
        await self._gate.wait()
        if self._fail_if is not None and self._fail_if(feeds):
            raise ValueError("model exploded on a negative input")
        return {f"{name}_out": f(array) for name, array in feeds.items()}


def request(value: float, samples: int = 1, shape: tuple[int, ...] = (2,), dtype=np.float32) -> dict[str, np.ndarray]:
    """``samples`` rows, row i filled with value + i, so every row of every request is unique."""
    rows = [np.full(shape, value + i, dtype=dtype) for i in range(samples)]
    return {"x": np.stack(rows)}


def config(**overrides) -> BatcherConfig:
    values = dict(max_batch_size=8, max_queue_delay_ms=5.0, max_queue_size=1000)
    values.update(overrides)
    return BatcherConfig(**values)


def metric(name: str, model: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, {"model": model, "version": "1", **labels})
    return 0.0 if value is None else value


# ------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("max_batch_size", 0),
        ("max_batch_size", 2.0),
        ("max_batch_size", True),
        ("max_queue_delay_ms", -1.0),
        ("max_queue_delay_ms", float("nan")),
        ("max_queue_size", 0),
        ("max_concurrent_batches", 0),
    ],
)
def test_config_rejects_bad_values_naming_them(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        config(**{field: bad})


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        config().max_batch_size = 3  # type: ignore[misc]


# ------------------------------------------------------------------ merge / split
async def test_many_concurrent_clients_each_get_exactly_their_own_rows() -> None:
    infer = RecordingInfer()
    rng = np.random.default_rng(0)
    sample_counts = rng.integers(1, 4, size=200)
    async with DynamicBatcher(infer, config(max_batch_size=16, max_queue_delay_ms=2.0), "t_many", "1") as batcher:
        inputs = [request(1000.0 * index, int(n), shape=(3, 2)) for index, n in enumerate(sample_counts)]
        results = await asyncio.gather(*(batcher.submit(feeds) for feeds in inputs))
    for feeds, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result["x_out"], f(feeds["x"]))
    batch_sizes = [batch["x"].shape[0] for batch in infer.batches]
    assert sum(batch_sizes) == int(sample_counts.sum())
    assert max(batch_sizes) <= 16
    assert len(infer.batches) < 200, "requests were never merged"
    assert metric("histosynth_model_requests_total", "t_many", status="success", reason="none") == 200
    assert metric("histosynth_model_batch_size_samples_sum", "t_many") == int(sample_counts.sum())
    assert metric("histosynth_model_pending_requests", "t_many") == 0


async def test_rows_keep_submission_order_within_a_batch() -> None:
    infer = RecordingInfer(gated=True)
    async with DynamicBatcher(infer, config(max_batch_size=8, max_queue_delay_ms=0), "t_order", "1") as batcher:
        first = asyncio.create_task(batcher.submit(request(-1.0)))
        await infer.entered.wait()  # the single-request batch is computing; the rest queue up
        tasks = [asyncio.create_task(batcher.submit(request(10.0 * i, 2))) for i in range(4)]
        await asyncio.sleep(0)
        infer.release()
        await asyncio.gather(first, *tasks)
    merged = infer.batches[1]["x"][:, 0]
    np.testing.assert_array_equal(merged, [0, 1, 10, 11, 20, 21, 30, 31])


async def test_requests_of_different_shapes_or_dtypes_are_never_merged() -> None:
    infer = RecordingInfer()
    kinds = [((4, 4), np.float32), ((8, 8), np.float32), ((4, 4), np.float64)]
    async with DynamicBatcher(infer, config(max_batch_size=64, max_queue_delay_ms=20.0), "t_shapes", "1") as batcher:
        inputs = [request(float(i), 1 + i % 2, *kinds[i % 3]) for i in range(60)]
        results = await asyncio.gather(*(batcher.submit(feeds) for feeds in inputs))
    for feeds, result in zip(inputs, results, strict=True):
        assert result["x_out"].dtype == feeds["x"].dtype
        np.testing.assert_array_equal(result["x_out"], f(feeds["x"]))
    signatures = {(batch["x"].shape[1:], batch["x"].dtype) for batch in infer.batches}
    assert signatures == {((4, 4), np.dtype(np.float32)), ((8, 8), np.dtype(np.float32)), ((4, 4), np.dtype(np.float64))}
    assert len(infer.batches) == 3, "each signature should have formed exactly one batch"


async def test_full_batch_is_sent_without_waiting_for_the_queue_delay() -> None:
    infer = RecordingInfer()
    async with DynamicBatcher(infer, config(max_batch_size=4, max_queue_delay_ms=60_000), "t_full", "1") as batcher:
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(request(float(i))) for i in range(4))), timeout=2
        )
    assert [r["x_out"][0, 0] for r in results] == [1.0, 3.0, 5.0, 7.0]
    assert [batch["x"].shape[0] for batch in infer.batches] == [4]


async def test_partial_batch_is_sent_after_the_queue_delay() -> None:
    infer = RecordingInfer()
    async with DynamicBatcher(infer, config(max_batch_size=64, max_queue_delay_ms=20), "t_delay", "1") as batcher:
        started = time.monotonic()
        await batcher.submit(request(1.0))
        waited = time.monotonic() - started
    assert waited >= 0.019
    assert metric("histosynth_model_queue_duration_seconds_count", "t_delay") == 1


# ------------------------------------------------------------------ input errors
async def test_invalid_requests_are_rejected_with_what_to_fix() -> None:
    async with DynamicBatcher(RecordingInfer(), config(max_batch_size=4), "t_invalid", "1") as batcher:
        with pytest.raises(InvalidInputError, match="5 samples but max_batch_size is 4"):
            await batcher.submit(request(0.0, samples=5))
        with pytest.raises(InvalidInputError, match="same batch size"):
            await batcher.submit({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})
        with pytest.raises(InvalidInputError, match="numpy array"):
            await batcher.submit({"a": [1.0, 2.0]})  # type: ignore[dict-item]
        with pytest.raises(InvalidInputError, match="no input"):
            await batcher.submit({})
        with pytest.raises(InvalidInputError, match="0 samples"):
            await batcher.submit({"a": np.zeros((0, 3))})
    assert metric("histosynth_model_requests_total", "t_invalid", status="failure", reason="invalid_input") == 5


async def test_infer_returning_the_wrong_number_of_rows_fails_the_batch() -> None:
    async def drops_a_row(feeds):
        return {"y": feeds["x"][1:]}

    async with DynamicBatcher(drops_a_row, config(), "t_rows", "1") as batcher:
        with pytest.raises(BatchFailedError, match="must have 2 rows"):
            await batcher.submit(request(0.0, samples=2))


# ----------------------------------------------------------------- queue / deadline
async def test_full_queue_rejects_immediately_with_resource_exhausted() -> None:
    infer = RecordingInfer(gated=True)
    batcher = DynamicBatcher(infer, config(max_queue_size=2, max_queue_delay_ms=0), "t_queue", "1")
    await batcher.start()
    computing = asyncio.create_task(batcher.submit(request(1.0)))
    await infer.entered.wait()
    queued = [asyncio.create_task(batcher.submit(request(2.0 + i))) for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.queued_requests == 2
    with pytest.raises(QueueFullError) as caught:
        await batcher.submit(request(9.0))
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    assert "retry with exponential backoff" in caught.value.message
    infer.release()
    await asyncio.gather(computing, *queued)
    await batcher.stop()
    assert 9.0 not in infer.seen_values()
    assert metric("histosynth_model_requests_total", "t_queue", status="failure", reason="queue_full") == 1


async def test_request_whose_deadline_passes_in_the_queue_is_never_computed() -> None:
    infer = RecordingInfer(gated=True)
    async with DynamicBatcher(infer, config(max_queue_delay_ms=0), "t_deadline", "1") as batcher:
        computing = asyncio.create_task(batcher.submit(request(1.0)))
        await infer.entered.wait()
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as caught:
            await batcher.submit(request(7.0), deadline=started + 0.05)
        assert time.monotonic() - started < 1.0, "deadline error must come at the deadline"
        assert caught.value.status == "DEADLINE_EXCEEDED" and not caught.value.computing
        assert batcher.queued_requests == 0
        infer.release()
        await computing
        # The batcher stays healthy for later work.
        assert (await batcher.submit(request(3.0)))["x_out"][0, 0] == 7.0
    assert 7.0 not in infer.seen_values()
    assert metric("histosynth_model_requests_total", "t_deadline", status="failure", reason="deadline_exceeded") == 1


async def test_deadline_already_passed_is_rejected_without_queueing() -> None:
    infer = RecordingInfer()
    async with DynamicBatcher(infer, config(), "t_past", "1") as batcher:
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(request(5.0), deadline=time.monotonic() - 1.0)
    assert infer.batches == []


async def test_deadline_during_compute_discards_the_result_but_keeps_the_batch() -> None:
    infer = RecordingInfer(gated=True)
    async with DynamicBatcher(infer, config(max_batch_size=2, max_queue_delay_ms=60_000), "t_late", "1") as batcher:
        patient = asyncio.create_task(batcher.submit(request(1.0)))
        hasty = asyncio.create_task(batcher.submit(request(2.0), deadline=time.monotonic() + 0.05))
        await infer.entered.wait()
        with pytest.raises(DeadlineExceededError) as caught:
            await hasty
        assert caught.value.computing
        infer.release()
        assert (await patient)["x_out"][0, 0] == 3.0


async def test_cancelled_waiter_is_removed_and_never_computed() -> None:
    infer = RecordingInfer(gated=True)
    async with DynamicBatcher(infer, config(max_queue_delay_ms=0), "t_cancel", "1") as batcher:
        computing = asyncio.create_task(batcher.submit(request(1.0)))
        await infer.entered.wait()
        abandoned = asyncio.create_task(batcher.submit(request(5.0)))
        kept = asyncio.create_task(batcher.submit(request(6.0)))
        await asyncio.sleep(0)
        assert batcher.queued_requests == 2
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert batcher.queued_requests == 1
        infer.release()
        await computing
        assert (await kept)["x_out"][0, 0] == 13.0
    assert 5.0 not in infer.seen_values()
    assert metric("histosynth_model_requests_total", "t_cancel", status="failure", reason="cancelled") == 1
    assert metric("histosynth_model_pending_requests", "t_cancel") == 0


# -------------------------------------------------------------------- failures
async def test_failing_batch_fails_every_waiter_in_it_and_only_them() -> None:
    infer = RecordingInfer(fail_if=lambda feeds: bool((feeds["x"] < 0).any()))
    async with DynamicBatcher(infer, config(max_batch_size=4, max_queue_delay_ms=60_000), "t_fail", "1") as batcher:
        doomed = [batcher.submit(request(v)) for v in (1.0, -1.0, 2.0, 3.0)]  # one full batch
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(outcome, BatchFailedError) for outcome in outcomes)
        assert all(isinstance(outcome.cause, ValueError) for outcome in outcomes)
        assert "model exploded on a negative input" in str(outcomes[0])
        assert outcomes[0].status == "INTERNAL"
        healthy = await asyncio.gather(*(batcher.submit(request(v)) for v in (4.0, 5.0, 6.0, 7.0)))
    assert [r["x_out"][0, 0] for r in healthy] == [9.0, 11.0, 13.0, 15.0]
    assert metric("histosynth_model_requests_total", "t_fail", status="failure", reason="batch_failed") == 4


# ----------------------------------------------------------------- lifecycle
async def test_submit_before_start_is_unavailable() -> None:
    batcher = DynamicBatcher(RecordingInfer(), config(), "t_unstarted", "1")
    with pytest.raises(UnavailableError, match="not started"):
        await batcher.submit(request(1.0))


async def test_drain_finishes_accepted_work_then_refuses_new_work() -> None:
    async def slow_infer(feeds):
        await asyncio.sleep(0.005)
        return {"x_out": f(feeds["x"])}

    batcher = DynamicBatcher(slow_infer, config(max_batch_size=4, max_queue_delay_ms=50), "t_drain", "1")
    await batcher.start()
    tasks = [asyncio.create_task(batcher.submit(request(float(i)))) for i in range(30)]
    await asyncio.sleep(0)
    await batcher.stop(drain=True)
    results = await asyncio.gather(*tasks)
    assert [r["x_out"][0, 0] for r in results] == [2.0 * i + 1.0 for i in range(30)]
    with pytest.raises(UnavailableError, match="shutting down"):
        await batcher.submit(request(1.0))


async def test_stop_without_drain_fails_queued_and_computing_requests() -> None:
    infer = RecordingInfer(gated=True)
    batcher = DynamicBatcher(infer, config(max_queue_delay_ms=0), "t_abort", "1")
    await batcher.start()
    computing = asyncio.create_task(batcher.submit(request(1.0)))
    await infer.entered.wait()
    queued = asyncio.create_task(batcher.submit(request(2.0)))
    await asyncio.sleep(0)
    await batcher.stop(drain=False)
    for task in (computing, queued):
        with pytest.raises(UnavailableError):
            await task
    assert batcher.pending_requests == 0


async def test_drain_timeout_fails_what_is_left() -> None:
    infer = RecordingInfer(gated=True)  # never released: the drain cannot finish
    batcher = DynamicBatcher(infer, config(max_queue_delay_ms=0), "t_drain_timeout", "1")
    await batcher.start()
    stuck = asyncio.create_task(batcher.submit(request(1.0)))
    await infer.entered.wait()
    await batcher.stop(drain=True, timeout_s=0.05)
    with pytest.raises(UnavailableError):
        await stuck


# ------------------------------------------------------------- end to end (ORT)
async def test_batched_onnx_model_answers_each_request_as_if_run_alone(tiny_conv_model_path: Path) -> None:
    reference = make_onnx_runtime(tiny_conv_model_path)
    rng = np.random.default_rng(42)
    inputs = [
        {"image": rng.standard_normal((int(n), 1, TILE, TILE)).astype(np.float32)}
        for n in rng.integers(1, 4, size=64)
    ]
    expected = [reference.infer(feeds)["features"] for feeds in inputs]
    reference.close()

    with DevicePool(lambda device: make_onnx_runtime(tiny_conv_model_path, device), ["cpu"], 2,
                    model_name="t_e2e", model_version="1") as pool:
        batcher_config = config(max_batch_size=16, max_queue_delay_ms=2, max_concurrent_batches=pool.instance_count)
        async with DynamicBatcher(pool.infer, batcher_config, "t_e2e", "1") as batcher:
            results = await asyncio.gather(*(batcher.submit(feeds) for feeds in inputs))
    for result, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(result["features"], want, rtol=1e-5, atol=1e-6)
    assert metric("histosynth_model_batch_size_samples_count", "t_e2e") < 64


async def test_concurrent_stops_both_return_after_one_drain() -> None:
    async def slow_infer(feeds):
        await asyncio.sleep(0.01)
        return {"x_out": f(feeds["x"])}

    batcher = DynamicBatcher(slow_infer, config(max_queue_delay_ms=0), "t_double_stop", "1")
    await batcher.start()
    task = asyncio.create_task(batcher.submit(request(1.0)))
    await asyncio.sleep(0)
    await asyncio.gather(batcher.stop(), batcher.stop())
    assert (await task)["x_out"][0, 0] == 3.0
    await batcher.stop()  # idempotent once stopped


# ------------------------------------------------------------------ dispatch when idle
async def test_dispatch_when_idle_sends_a_lone_request_at_once_and_still_batches_under_load() -> None:
    infer = RecordingInfer(gated=True)
    settings = config(max_batch_size=8, max_queue_delay_ms=60_000, dispatch_when_idle=True)
    async with DynamicBatcher(infer, settings, "t_idle", "1") as batcher:
        started = time.monotonic()
        first = asyncio.create_task(batcher.submit(request(1.0)))
        await asyncio.wait_for(infer.entered.wait(), 5)  # not after the 60 s queue delay
        assert time.monotonic() - started < 1.0
        # While that batch computes, newcomers gather; they go together once the runtime is free.
        later = [asyncio.create_task(batcher.submit(request(10.0 * (i + 1)))) for i in range(3)]
        await asyncio.sleep(0.05)
        assert len(infer.batches) == 1
        infer.release()
        await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert [batch["x"].shape[0] for batch in infer.batches] == [1, 3]


async def test_without_dispatch_when_idle_a_lone_request_waits_for_company() -> None:
    infer = RecordingInfer()
    async with DynamicBatcher(infer, config(max_queue_delay_ms=200.0), "t_wait", "1") as batcher:
        started = time.monotonic()
        await batcher.submit(request(1.0))
        assert time.monotonic() - started >= 0.19
