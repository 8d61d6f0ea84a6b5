"""DiffusionEngine: step-level (continuous) batching of diffusion sampling for one denoiser model.

A diffusion request needs 10-50 denoiser calls. Batching whole requests (the DynamicBatcher's
way) makes a newcomer wait until the running batch has finished every step. Instead, as in
LLM serving's continuous batching, the engine batches *steps*:

  * every admitted request keeps its own x_t, scheduler state (DDIM / DPM-Solver++, see
    schedulers.py) and step index;
  * one scheduling loop per model; each iteration takes the next step of the active requests
    of one H x W (so tensors stack), longest-waiting first, up to ``max_rows`` rows;
    classifier-free guidance adds a null-condition row per request (skipped at guidance 1);
  * ONE denoiser call runs them all with a per-row ``timestep`` input, through the model's
    DevicePool (device placement, hang detection and instance metrics as for any model);
  * each request applies its own guidance and scheduler step; finished requests resolve their
    future; requests queued meanwhile are admitted at the next iteration.

Determinism: a request's initial noise comes only from its seed (PCG64), guidance and scheduler
updates are per-request elementwise numpy, and ONNX Runtime on CPU computes a row independently
of the other rows in the batch (tests/unit/diffusion/test_engine.py checks all of this
bit-for-bit), so the same seed gives the same image whatever else is in flight.

Failure isolation: a request past its deadline or cancelled by its caller leaves the active set
at the next iteration (its result, if computing, is discarded); a denoiser call that raises fails
only the requests whose rows were in it; the admission queue is bounded (RESOURCE_EXHAUSTED).

``step_batching=False`` is the request-level (static) baseline: when idle, the engine admits the
queued requests of one size that fit in ``max_rows`` and runs them to the end before admitting
anyone else.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from services.core.errors import (
    BatchFailedError,
    DeadlineExceededError,
    HistosynthError,
    InvalidInputError,
    QueueFullError,
    UnavailableError,
)
from services.core.memory import MemoryBudget, MemoryModel, format_bytes
from services.core.metrics import MEMORY_REFUSED, REASON_CANCELLED, DiffusionMetrics, ModelMetrics
from services.diffusion.schedulers import SCHEDULERS, SchedulerState, make_scheduler
from services.diffusion.spec import CONDITION_INPUT, MODEL_OUTPUT, SAMPLE_INPUT, TIMESTEP_INPUT, DiffusionSpec

_log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
InferFn = Callable[[Mapping[str, np.ndarray]], Awaitable[Feeds]]
MAX_SEED = 2**64 - 1
# Stacking inputs and guidance + scheduler updates of up to this many elements (e.g. 16 rows of
# 3 x 64 x 64) run on the event loop, where a thread hop would cost more; larger ones in a worker thread.
INLINE_UPDATE_ELEMENTS = 16 * 3 * 64 * 64


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one image: scheduler steps, scheduler name, CFG scale and the noise seed."""

    steps: int
    scheduler: str
    guidance_scale: float
    seed: int


@dataclass(frozen=True)
class EngineConfig:
    """Batching policy of one engine.

    step_batching: continuous (step-level) batching; False = request-level baseline.
    max_rows: most rows per denoiser call (a CFG sample takes 2).
    max_active: most samples being denoised at once (step-level mode).
    max_queue: most samples waiting for admission; one more is refused (RESOURCE_EXHAUSTED).
    """

    step_batching: bool = True
    max_rows: int = 16
    max_active: int = 32
    max_queue: int = 256

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_active", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(eq=False)
class _Request:
    seq: int
    params: SamplingParams
    condition: np.ndarray
    null_condition: np.ndarray | None  # None when guidance_scale == 1 (no unconditional row)
    state: SchedulerState
    sample: np.ndarray
    future: asyncio.Future[np.ndarray]
    submitted_at: float
    deadline: float | None
    last_iteration: int = -1
    failed: bool = field(default=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.sample.shape[-2], self.sample.shape[-1]

    @property
    def rows(self) -> int:
        return 1 if self.null_condition is None else 2

    @property
    def abandoned(self) -> bool:
        """The caller gave up (cancelled, deadline) or the request already has its answer."""
        return self.future.done()


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """x_T for a request: a function of its seed only (never of a shared RNG or of the traffic)."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


class DiffusionEngine:
    """Samples from one denoiser model; ``await engine.sample(condition, params, deadline)``.

    ``infer`` runs the denoiser (``DevicePool.infer`` of the served model, or anything with its
    signature); ``model``/``version`` label metrics and errors. The scheduling loop starts when
    work arrives and ends when there is none, so an idle engine holds no task to stop.
    """

    def __init__(
        self,
        spec: DiffusionSpec,
        infer: InferFn,
        config: EngineConfig = EngineConfig(),
        *,
        model: str = "unknown",
        version: str = "unknown",
        memory: MemoryModel | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.model = model
        self.version = version
        # Memory admission: with both set, a request must fit the budget alone and each denoiser call
        # packs only as many rows as the budget has room for.
        self.memory = memory
        self.budget = budget
        # Fields above the trained size: attention memory grows with the square of the field's area and
        # the model never saw such context, so they are refused unless the manifest declares a larger size.
        if spec.max_sample_size is not None:
            self.max_size: tuple[int, int] | None = spec.max_sample_size
        elif memory is not None and memory.has_attention:
            self.max_size = spec.sample_size
        else:
            self.max_size = None
        self._infer = infer
        self._queue: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._seq = itertools.count()
        self._iteration = 0
        self._model_metrics = ModelMetrics(model, version)
        self._metrics = DiffusionMetrics(model, version)
        # Observed per denoiser call; read by tests and the benchmark.
        self.calls = 0
        self.rows_total = 0
        self.max_rows_seen = 0
        self.mixed_timestep_calls = 0

    # ---------------------------------------------------------------- inspection
    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---------------------------------------------------------------- public API
    def default_params(self, seed: int = 0) -> SamplingParams:
        spec = self.spec
        return SamplingParams(spec.default_steps, spec.default_scheduler, spec.default_guidance_scale, seed)

    def check(self, condition: np.ndarray, params: SamplingParams, size: tuple[int, int]) -> None:
        """Refuse bad requests (INVALID_ARGUMENT) before they take a queue slot."""
        spec = self.spec
        if params.scheduler not in SCHEDULERS:
            raise InvalidInputError(f"scheduler {params.scheduler!r} is unknown; valid: {', '.join(SCHEDULERS)}")
        try:
            spec.schedule.check_steps(params.steps)
        except ValueError as error:
            raise InvalidInputError(f"{error} (model {spec.model_key}; 10-50 is the useful range)") from None
        if not math.isfinite(params.guidance_scale) or not 0.0 <= params.guidance_scale <= 30.0:
            raise InvalidInputError(f"guidance_scale must be in 0..30 (1 = no guidance), got {params.guidance_scale}")
        if isinstance(params.seed, bool) or not 0 <= int(params.seed) <= MAX_SEED:
            raise InvalidInputError(f"seed must be in 0..2**64-1, got {params.seed!r}")
        self.check_size(size)
        height, width = size
        expected = spec.condition_shape(height, width)
        if condition.shape != expected or condition.dtype != np.float32:
            raise InvalidInputError(
                f"condition must be float32 {list(expected)} for model {spec.model_key}, "
                f"got {condition.dtype} {list(condition.shape)}"
            )

    def check_size(self, size: tuple[int, int]) -> None:
        """Size rules (multiple, trained size, memory budget): cheap, so callers run them before building inputs."""
        spec = self.spec
        height, width = size
        multiple = spec.size_multiple
        if height < multiple or width < multiple or height % multiple or width % multiple:
            raise InvalidInputError(
                f"size {height} x {width} is not a positive multiple of {multiple} for model {spec.model_key} "
                f"(trained at {spec.sample_size[0]} x {spec.sample_size[1]}); crop or pad to a multiple"
            )
        if self.max_size is not None and (height > self.max_size[0] or width > self.max_size[1]):
            raise InvalidInputError(
                f"size {height} x {width} is above the {self.max_size[0]} x {self.max_size[1]} that model "
                f"{spec.model_key} serves (trained at {spec.sample_size[0]} x {spec.sample_size[1]}; its "
                "self-attention memory grows with the square of the field's area); send fields of at most "
                f"{self.max_size[0]} x {self.max_size[1]} and tile larger areas client-side"
            )
        if self.memory is not None and self.budget is not None:
            one_row = self.memory.estimate(1, height, width)
            if one_row > self.budget.limit:
                MEMORY_REFUSED.labels(self.model).inc()
                self.budget.check(one_row, f"model {spec.model_key} sampling one {height} x {width} field")

    def row_cap(self, size: tuple[int, int]) -> int:
        """Most rows of ``size`` one denoiser call may take: max_rows, lowered to what the memory budget has room for."""
        limit = self.config.max_rows
        if self.memory is not None and self.budget is not None:
            limit = min(limit, max(1, self.memory.rows_within(self.budget.available, *size)))
        return limit

    async def sample(
        self,
        condition: np.ndarray,
        params: SamplingParams,
        deadline: float | None = None,
        *,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The final x0 sample [C, H, W] float32 in model space for ``condition``.

        ``size`` (H, W) defaults to the condition's spatial size (renderers) or the model's trained
        sample_size (vector conditions). ``deadline`` is absolute ``time.monotonic()`` seconds.
        Raises InvalidInputError, QueueFullError, DeadlineExceededError, BatchFailedError,
        UnavailableError; cancelling the awaiting task removes the request from the engine.
        """
        if size is None:
            size = tuple(condition.shape[-2:]) if self.spec.spatial_condition else self.spec.sample_size
        self.check(condition, params, size)
        if self._closed:
            raise UnavailableError(f"diffusion engine of model {self.model!r} is closed; retry on another replica")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._model_metrics.record_failure(DeadlineExceededError.reason)
            raise DeadlineExceededError(self.model, 0.0)
        if len(self._queue) >= self.config.max_queue:
            self._model_metrics.record_failure(QueueFullError.reason)
            raise QueueFullError(self.model, self.config.max_queue)
        loop = asyncio.get_running_loop()
        shape = (self.spec.sample_channels, *size)
        null = None if params.guidance_scale == 1.0 else self.spec.null_condition(condition.shape)
        request = _Request(
            seq=next(self._seq),
            params=params,
            condition=condition,
            null_condition=null,
            state=make_scheduler(params.scheduler, self.spec.schedule, params.steps),
            sample=initial_noise(int(params.seed), shape),
            future=loop.create_future(),
            submitted_at=now,
            deadline=deadline,
        )
        self._queue.append(request)
        self._model_metrics.pending_inc()
        self._publish_load()
        self._ensure_loop()
        try:
            if deadline is None:
                result = await request.future
            else:
                # wait_for cancels the future on timeout: the loop sees it as abandoned and drops it.
                result = await asyncio.wait_for(request.future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self._model_metrics.record_failure(DeadlineExceededError.reason)
            computing = request.state.steps_done > 0
            raise DeadlineExceededError(self.model, time.monotonic() - now, computing=computing) from None
        except asyncio.CancelledError:
            if not request.failed:
                self._model_metrics.record_failure(REASON_CANCELLED)
            raise
        except HistosynthError as error:
            self._model_metrics.record_failure(error.reason)
            raise
        finally:
            self._model_metrics.pending_dec()
        self._model_metrics.record_success(total_s=time.monotonic() - now)
        return result

    async def close(self) -> None:
        """Refuse new work and fail what is queued or running with UNAVAILABLE."""
        self._closed = True
        error = UnavailableError(f"diffusion engine of model {self.model!r} is shutting down; retry elsewhere")
        for request in [*self._queue, *self._active]:
            self._fail(request, error)
        self._queue.clear()
        self._active.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._publish_load()

    # ---------------------------------------------------------------- the loop
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"diffusion-{self.model}")

    async def _run(self) -> None:
        try:
            while True:
                self._drop_abandoned()
                self._admit()
                self._publish_load()
                if not self._active:
                    if not self._queue:
                        return  # idle: the next sample() starts a new loop
                    continue
                picked = self._pick()
                await self._iterate(picked)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a bug here must not leave callers waiting forever
            _log.exception("diffusion engine of model %r crashed; failing its requests", self.model)
            for request in [*self._queue, *self._active]:
                self._fail(request, BatchFailedError(self.model, error))
            self._queue.clear()
            self._active.clear()
            self._publish_load()

    def _drop_abandoned(self) -> None:
        # A request whose deadline passed leaves at this step even if its caller has not noticed yet.
        now = time.monotonic()
        for request in [*self._queue, *self._active]:
            if request.deadline is not None and now >= request.deadline and not request.abandoned:
                self._fail(request, DeadlineExceededError(
                    self.model, now - request.submitted_at, computing=request.state.steps_done > 0
                ))
        if any(request.abandoned for request in self._queue):
            self._queue = deque(request for request in self._queue if not request.abandoned)
        self._active = [request for request in self._active if not request.abandoned]

    def _admit(self) -> None:
        if not self._queue:
            return
        if self.config.step_batching:
            while self._queue and len(self._active) < self.config.max_active:
                self._active.append(self._queue.popleft())
            return
        if self._active:
            return  # request-level batching: newcomers wait for the running batch to finish
        size = self._queue[0].size
        rows, kept = 0, deque()
        while self._queue:
            request = self._queue.popleft()
            fits = request.size == size and (not self._active or rows + request.rows <= self.config.max_rows)
            if fits and len(self._active) < self.config.max_active:
                self._active.append(request)
                rows += request.rows
            else:
                kept.append(request)
        self._queue = kept

    def _pick(self) -> list[_Request]:
        """The next step's requests: one H x W, longest since its last step first, up to max_rows rows."""
        order = sorted(self._active, key=lambda request: (request.last_iteration, request.seq))
        size = order[0].size
        cap = self.row_cap(size)
        picked, rows = [], 0
        for request in order:
            if request.size != size:
                continue
            if picked and rows + request.rows > cap:
                continue
            picked.append(request)
            rows += request.rows
        return picked

    async def _iterate(self, picked: list[_Request]) -> None:
        started = time.perf_counter()
        self._iteration += 1
        for request in picked:
            request.last_iteration = self._iteration
        if picked[0].sample.size * len(picked) <= INLINE_UPDATE_ELEMENTS:
            feeds = _stack_rows(picked)
        else:
            feeds = await asyncio.to_thread(_stack_rows, picked)
        rows = int(feeds[SAMPLE_INPUT].shape[0])
        try:
            output = await self._call(feeds, picked)
        except BaseException as error:
            if isinstance(error, asyncio.CancelledError):
                raise
            _log.warning("denoiser call of model %r failed for %d requests: %s", self.model, len(picked), error)
            failure = error if isinstance(error, HistosynthError) else BatchFailedError(self.model, error)
            for request in picked:
                self._fail(request, failure)
            self._active = [request for request in self._active if request not in picked]
            return
        if output is None:  # every request of the call gave up between its chunks
            self._active = [request for request in self._active if not request.abandoned]
            self._publish_load()
            return
        # Abandoned requests are stepped too (their rows are in the output) and dropped next iteration.
        live = sum(not request.abandoned for request in picked)
        if output.size <= INLINE_UPDATE_ELEMENTS:
            finished = _advance(picked, output)  # microseconds: a thread hop would cost more
        else:
            finished = await asyncio.to_thread(_advance, picked, output)  # keep the event loop free
        for request in finished:
            if not request.future.done():
                request.future.set_result(request.sample)
        done = set(finished)
        self._active = [request for request in self._active if request not in done and not request.abandoned]
        self._publish_load()
        self.calls += 1
        self.rows_total += rows
        self.max_rows_seen = max(self.max_rows_seen, rows)
        if len(set(feeds[TIMESTEP_INPUT].tolist())) > 1:
            self.mixed_timestep_calls += 1
        self._metrics.record_iteration(rows=rows, steps=live, seconds=time.perf_counter() - started)

    async def _call(self, feeds: Feeds, picked: list[_Request]) -> np.ndarray | None:
        """The denoiser on ``feeds``, in calls of at most row_cap rows (only a lone CFG pair can exceed
        max_rows; the memory cap splits even that). None when every request of ``picked`` gave up
        between two chunks: the remaining chunks are not computed."""
        rows = feeds[SAMPLE_INPUT].shape[0]
        size = tuple(feeds[SAMPLE_INPUT].shape[-2:])
        limit = self.row_cap(size)  # type: ignore[arg-type]
        started = time.perf_counter()
        parts = []
        for start in range(0, rows, limit):
            if start and all(request.abandoned for request in picked):
                return None
            chunk = feeds if rows <= limit else {name: array[start:start + limit] for name, array in feeds.items()}
            parts.append((await self._reserved_infer(chunk))[MODEL_OUTPUT])
        output = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._model_metrics.record_batch(samples=rows, compute_s=time.perf_counter() - started)
        if output.shape != feeds[SAMPLE_INPUT].shape:
            raise ValueError(f"denoiser returned {list(output.shape)} for sample {list(feeds[SAMPLE_INPUT].shape)}")
        return output

    async def _reserved_infer(self, feeds: Feeds) -> Feeds:
        """One denoiser call, its estimated memory held in the process budget while it runs.

        Forced: the rows were sized to the room left when they were picked, and refusing admitted
        work mid-sampling would waste every step already taken.
        """
        if self.memory is None or self.budget is None:
            return await self._infer(feeds)
        sample = feeds[SAMPLE_INPUT]
        estimate = self.memory.estimate(sample.shape[0], *sample.shape[-2:]) + 2 * sum(a.nbytes for a in feeds.values())
        with self.budget.reserve(estimate, f"model {self.spec.model_key} denoiser call", force=True):
            return await self._infer(feeds)

    def describe_memory(self, size: tuple[int, int]) -> str:
        if self.memory is None:
            return "no memory model"
        return f"{format_bytes(self.memory.estimate(1, *size))} per row at {size[0]} x {size[1]}"

    def _fail(self, request: _Request, error: BaseException) -> None:
        if not request.future.done():
            request.failed = True
            request.future.set_exception(error)

    def _publish_load(self) -> None:
        self._metrics.set_load(in_flight=len(self._active), queued=len(self._queue))


def _stack_rows(requests: list[_Request]) -> Feeds:
    """Conditional rows of every request first, then the null rows of those that use guidance."""
    samples = [request.sample for request in requests]
    timesteps = [request.state.timestep for request in requests]
    conditions = [request.condition for request in requests]
    for request in requests:
        if request.null_condition is not None:
            samples.append(request.sample)
            timesteps.append(request.state.timestep)
            conditions.append(request.null_condition)
    return {
        SAMPLE_INPUT: np.stack(samples),
        TIMESTEP_INPUT: np.asarray(timesteps, dtype=np.float32),
        CONDITION_INPUT: np.stack(conditions),
    }


def _advance(requests: list[_Request], output: np.ndarray) -> list[_Request]:
    """Apply each request's guidance and scheduler step (rows laid out as _stack_rows); return the finished."""
    finished = []
    null_row = len(requests)
    for row, request in enumerate(requests):
        model_output = output[row]
        if request.null_condition is not None:
            unconditional = output[null_row]
            null_row += 1
            scale = np.float32(request.params.guidance_scale)
            model_output = unconditional + scale * (model_output - unconditional)
        request.sample = request.state.step(model_output, request.sample)
        if request.state.done:
            finished.append(request)
    return finished
