"""Dynamic batcher: merges concurrent inference requests into batches along axis 0.

A request is a dict of named arrays whose axis 0 counts its samples (n >= 1, the
same n for every input). Requests are grouped by *signature* (input names, per-sample
shapes and dtypes): only requests of one signature are concatenated, so a 256x256
tile is never merged with a 512x512 one. Within a group the order is FIFO and the
batch output is split back by each request's sample count, so a request gets
exactly its own rows, in order, whatever batch it landed in.

When a batch is formed (Triton's dynamic batcher, simplified):
  * only when a compute slot is free (``max_concurrent_batches``; set it to the
    device pool's instance count), so requests keep accumulating while the
    runtimes are busy and batches grow under load;
  * immediately if some group holds ``max_batch_size`` samples, otherwise once the
    oldest request of a group has waited ``max_queue_delay_ms``, or at once while
    draining; with ``dispatch_when_idle`` also at once when no batch is computing
    (waiting for company only pays while the runtimes are busy: at concurrency 1 the
    delay was pure latency, 5 of Refine's ~14 ms per call at 256x256);
  * among ready groups, the one with the oldest head request goes first (fairness).

Failure rules (each recorded in histosynth_model_requests_total by reason):
  * queue full -> QueueFullError at submit, nothing enqueued;
  * a request larger than ``max_batch_size`` -> InvalidInputError. It is rejected
    rather than split: splitting would run one request across several batches
    (and possibly several instances), so its latency and failure would no longer
    be atomic, and the model's batch limit usually reflects device memory;
  * deadline passed while queued -> removed, never computed, DeadlineExceededError
    (raised at the deadline, not when the batch would have formed);
  * waiter cancelled while queued -> removed, never computed;
  * the infer call raises -> every waiter in that batch gets BatchFailedError;
  * stopping -> UnavailableError for new work (and for queued work when not draining).
"""

from __future__ import annotations

import asyncio
import enum
import logging
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
from services.core.metrics import REASON_CANCELLED, ModelMetrics

_log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
InferFn = Callable[[Feeds], Awaitable[Feeds]]
# (input name, per-sample shape, dtype string) for every input, sorted by name.
Signature = tuple[tuple[str, tuple[int, ...], str], ...]


@dataclass(frozen=True)
class BatcherConfig:
    """Batching policy of one model.

    max_batch_size: most samples (axis-0 rows, summed over requests) in one batch;
        also the largest request accepted.
    max_queue_delay_ms: how long the oldest queued request may wait for company
        before a partial batch is sent; 0 sends whatever is queued at once.
    max_queue_size: most requests waiting to be batched (not counting those
        computing); one more is refused with RESOURCE_EXHAUSTED.
    max_concurrent_batches: batches computing at once; match the number of runtime
        instances behind the infer callable (DevicePool.instance_count).
    dispatch_when_idle: send a partial batch at once when no batch is computing,
        instead of waiting max_queue_delay_ms; requests arriving while the runtimes
        are busy still gather into the next batch.
    """

    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    max_concurrent_batches: int = 1
    dispatch_when_idle: bool = False

    def __post_init__(self) -> None:
        _require_int("max_batch_size", self.max_batch_size, minimum=1)
        _require_int("max_queue_size", self.max_queue_size, minimum=1)
        _require_int("max_concurrent_batches", self.max_concurrent_batches, minimum=1)
        delay = self.max_queue_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < float("inf"):
            raise ValueError(f"max_queue_delay_ms must be a finite number >= 0, got {delay!r}")


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class _State(enum.Enum):
    QUEUED = enum.auto()
    COMPUTING = enum.auto()
    DONE = enum.auto()


@dataclass(eq=False)  # identity equality: deque.remove must find this very request
class _Request:
    feeds: Feeds
    samples: int
    signature: Signature
    future: asyncio.Future[Feeds]
    enqueued_at: float
    deadline: float | None
    state: _State = _State.QUEUED


@dataclass
class _Group:
    """Queued requests of one signature, FIFO."""

    requests: deque[_Request] = field(default_factory=deque)
    samples: int = 0


class DynamicBatcher:
    """Merges concurrent ``submit`` calls into batched calls of ``infer``.

    ``infer`` receives a dict of arrays batched on axis 0 and must return a dict of
    arrays whose axis 0 has the same length, row i belonging to input row i.
    Use as ``async with DynamicBatcher(...) as batcher:`` or call start()/stop().
    """

    def __init__(self, infer: InferFn, config: BatcherConfig, model_name: str, model_version: str) -> None:
        self._infer = infer
        self._config = config
        self._model_name = model_name
        self._metrics = ModelMetrics(model_name, model_version)
        self._groups: dict[Signature, _Group] = {}
        self._queued = 0
        self._pending = 0
        self._accepting = False
        self._draining = False
        self._stopped = False
        self._scheduler: asyncio.Task[None] | None = None
        # In-flight batches by task, so stop() can fail waiters of a task cancelled
        # before it ever ran (its coroutine body, and so its except clause, never runs).
        self._batch_tasks: dict[asyncio.Task[None], list[_Request]] = {}
        self._wakeup = asyncio.Event()
        self._slots: asyncio.Semaphore | None = None
        self._stop_lock = asyncio.Lock()
        self._delay_s = config.max_queue_delay_ms / 1000.0

    # ------------------------------------------------------------------ lifecycle
    @property
    def config(self) -> BatcherConfig:
        return self._config

    @property
    def queued_requests(self) -> int:
        """Requests waiting to be batched."""
        return self._queued

    @property
    def pending_requests(self) -> int:
        """Requests accepted and not yet answered (queued or computing)."""
        return self._pending

    async def start(self) -> None:
        if self._scheduler is not None:
            raise RuntimeError(f"batcher for model {self._model_name!r} is already started")
        self._slots = asyncio.Semaphore(self._config.max_concurrent_batches)
        self._accepting = True
        self._draining = False
        self._stopped = False
        self._scheduler = asyncio.create_task(self._schedule(), name=f"batcher-{self._model_name}")

    async def stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Refuse new work; with ``drain``, finish everything already accepted first.

        If draining takes longer than ``timeout_s``, the rest is failed with
        UnavailableError as with ``drain=False``. Idempotent.
        """
        self._accepting = False
        async with self._stop_lock:  # a second concurrent stop() waits for the first
            if self._scheduler is None:
                return
            await self._stop_locked(drain, timeout_s)

    async def _stop_locked(self, drain: bool, timeout_s: float | None) -> None:
        assert self._scheduler is not None
        self._stopped = True
        if drain:
            self._draining = True
            self._wakeup.set()
            try:
                await asyncio.wait_for(self._wait_idle(), timeout_s)
            except TimeoutError:
                _log.warning(
                    "model %r: drain did not finish within %.1f s; failing %d pending requests",
                    self._model_name, timeout_s, self._pending,
                )
        self._scheduler.cancel()
        in_flight = dict(self._batch_tasks)
        for task in in_flight:
            task.cancel()
        await asyncio.gather(self._scheduler, *in_flight, return_exceptions=True)
        self._scheduler = None
        self._draining = False
        error = UnavailableError(self._stopped_message())
        for batch in in_flight.values():
            self._fail(batch, error)
        self._fail_all_queued(error)

    async def __aenter__(self) -> DynamicBatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(drain=True)

    async def _wait_idle(self) -> None:
        while self._queued or self._batch_tasks:
            self._wakeup.clear()
            await self._wakeup.wait()

    def _stopped_message(self) -> str:
        return (
            f"model {self._model_name!r} is shutting down and accepts no new requests; "
            "retry against another replica or after the server restarts"
        )

    # --------------------------------------------------------------------- submit
    async def submit(self, feeds: Mapping[str, np.ndarray], deadline: float | None = None) -> Feeds:
        """Queue one request and wait for its outputs.

        ``deadline`` is an absolute ``time.monotonic()`` time, or None for no deadline.
        Returns the request's own rows of every output, in input order.
        """
        submitted_at = time.monotonic()
        try:
            request = self._enqueue(feeds, deadline, submitted_at)
        except HistosynthError as error:
            self._metrics.record_failure(error.reason)
            raise
        self._pending += 1
        self._metrics.pending_inc()
        try:
            outputs = await self._await_result(request)
        except HistosynthError as error:
            self._metrics.record_failure(error.reason)
            raise
        except asyncio.CancelledError:
            self._metrics.record_failure(REASON_CANCELLED)
            raise
        else:
            self._metrics.record_success(total_s=time.monotonic() - submitted_at)
            return outputs
        finally:
            self._pending -= 1
            self._metrics.pending_dec()
            if not self._accepting:
                self._wakeup.set()  # let a drain notice it may be idle

    def _enqueue(self, feeds: Mapping[str, np.ndarray], deadline: float | None, now: float) -> _Request:
        if not self._accepting:
            raise UnavailableError(
                self._stopped_message() if self._stopped
                else f"model {self._model_name!r} batcher is not started; call start() first"
            )
        samples, signature = self._validate(feeds)
        if deadline is not None and deadline <= now:
            raise DeadlineExceededError(self._model_name, 0.0)
        if self._queued >= self._config.max_queue_size:
            raise QueueFullError(self._model_name, self._config.max_queue_size)
        request = _Request(
            feeds=dict(feeds),
            samples=samples,
            signature=signature,
            future=asyncio.get_running_loop().create_future(),
            enqueued_at=now,
            deadline=deadline,
        )
        group = self._groups.get(signature)
        if group is None:
            group = self._groups[signature] = _Group()
        group.requests.append(request)
        group.samples += samples
        self._queued += 1
        self._wakeup.set()
        return request

    def _validate(self, feeds: Mapping[str, np.ndarray]) -> tuple[int, Signature]:
        if not feeds:
            raise InvalidInputError(f"model {self._model_name!r}: request has no input tensors")
        counts: dict[str, int] = {}
        signature = []
        for name, array in sorted(feeds.items()):
            if not isinstance(array, np.ndarray) or array.ndim == 0:
                raise InvalidInputError(
                    f"model {self._model_name!r}: input {name!r} must be a numpy array with a "
                    f"batch axis 0, got {type(array).__name__} of shape {getattr(array, 'shape', None)}"
                )
            counts[name] = array.shape[0]
            signature.append((name, tuple(array.shape[1:]), array.dtype.str))
        sizes = set(counts.values())
        if len(sizes) != 1:
            raise InvalidInputError(
                f"model {self._model_name!r}: every input must have the same batch size on "
                f"axis 0, got {counts}"
            )
        samples = sizes.pop()
        if samples < 1:
            raise InvalidInputError(f"model {self._model_name!r}: request has 0 samples on axis 0")
        if samples > self._config.max_batch_size:
            raise InvalidInputError(
                f"model {self._model_name!r}: request has {samples} samples but max_batch_size is "
                f"{self._config.max_batch_size}; split it into requests of at most "
                f"{self._config.max_batch_size} samples"
            )
        return samples, tuple(signature)

    async def _await_result(self, request: _Request) -> Feeds:
        timeout = None if request.deadline is None else max(0.0, request.deadline - time.monotonic())
        try:
            # asyncio.wait (unlike wait_for) never cancels the future on timeout,
            # so the request's fate is decided here, by its state.
            done, _ = await asyncio.wait((request.future,), timeout=timeout)
        except asyncio.CancelledError:
            self._abandon(request)
            raise
        if done or (request.future.done() and not request.future.cancelled()):
            return request.future.result()
        waited = time.monotonic() - request.enqueued_at
        computing = request.state is _State.COMPUTING
        self._abandon(request)
        raise DeadlineExceededError(self._model_name, waited, computing=computing)

    def _abandon(self, request: _Request) -> None:
        """The waiter is gone: unqueue the request, or let its batch finish without it."""
        if request.state is _State.QUEUED:
            group = self._groups[request.signature]
            group.requests.remove(request)
            group.samples -= request.samples
            if not group.requests:
                del self._groups[request.signature]
            self._queued -= 1
        request.state = _State.DONE
        if not request.future.done():
            request.future.cancel()
        elif not request.future.cancelled():
            request.future.exception()  # mark retrieved: nobody is left to read it

    # ------------------------------------------------------------------ scheduler
    async def _schedule(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                signature = await self._next_ready_group()
            except BaseException:
                self._slots.release()
                raise
            batch = self._take_batch(signature)
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run_batch(batch))
            self._batch_tasks[task] = batch
            task.add_done_callback(self._batch_finished)

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        self._batch_tasks.pop(task, None)
        assert self._slots is not None
        self._slots.release()
        self._wakeup.set()

    async def _next_ready_group(self) -> Signature:
        while True:
            now = time.monotonic()
            ready: list[tuple[float, Signature]] = []
            next_due = float("inf")
            idle = self._config.dispatch_when_idle and not self._batch_tasks
            for signature, group in self._groups.items():
                head_at = group.requests[0].enqueued_at
                due = head_at + self._delay_s
                if idle or self._draining or group.samples >= self._config.max_batch_size or due <= now:
                    ready.append((head_at, signature))
                else:
                    next_due = min(next_due, due)
            if ready:
                return min(ready, key=lambda item: item[0])[1]
            self._wakeup.clear()
            if next_due == float("inf"):
                await self._wakeup.wait()
            else:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), next_due - now)
                except TimeoutError:
                    pass

    def _take_batch(self, signature: Signature) -> list[_Request]:
        """Pop FIFO requests of one group that fit in max_batch_size; drop expired ones."""
        group = self._groups[signature]
        now = time.monotonic()
        batch: list[_Request] = []
        samples = 0
        while group.requests:
            request = group.requests[0]
            if request.deadline is not None and request.deadline <= now:
                # Its waiter's timer has fired or is about to; fail it here so the
                # request can never reach compute even if that timer is late.
                group.requests.popleft()
                group.samples -= request.samples
                self._queued -= 1
                request.state = _State.DONE
                if not request.future.done():
                    request.future.set_exception(
                        DeadlineExceededError(self._model_name, now - request.enqueued_at)
                    )
                continue
            if samples + request.samples > self._config.max_batch_size:
                break
            group.requests.popleft()
            group.samples -= request.samples
            self._queued -= 1
            request.state = _State.COMPUTING
            samples += request.samples
            batch.append(request)
            self._metrics.observe_queue_wait(now - request.enqueued_at)
        if not group.requests:
            del self._groups[signature]
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        try:
            merged = _merge(batch)
            started = time.monotonic()
            outputs = await self._infer(merged)
            compute_s = time.monotonic() - started
            total = sum(request.samples for request in batch)
            self._metrics.record_batch(samples=total, compute_s=compute_s)
            results = _split(outputs, batch, total)
        except asyncio.CancelledError:
            self._fail(batch, UnavailableError(self._stopped_message()))
            raise
        except Exception as cause:
            _log.warning("model %r: batch of %d requests failed: %r", self._model_name, len(batch), cause)
            self._fail(batch, BatchFailedError(self._model_name, cause))
            return
        for request, result in zip(batch, results, strict=True):
            request.state = _State.DONE
            if not request.future.done():
                request.future.set_result(result)

    def _fail(self, batch: list[_Request], error: HistosynthError) -> None:
        for request in batch:
            request.state = _State.DONE
            if not request.future.done():
                request.future.set_exception(error)

    def _fail_all_queued(self, error: HistosynthError) -> None:
        for group in self._groups.values():
            self._fail(list(group.requests), error)
        self._groups.clear()
        self._queued = 0


def _merge(batch: list[_Request]) -> Feeds:
    if len(batch) == 1:
        return batch[0].feeds
    names = batch[0].feeds.keys()
    return {name: np.concatenate([request.feeds[name] for request in batch], axis=0) for name in names}


def _split(outputs: Mapping[str, np.ndarray], batch: list[_Request], total: int) -> list[Feeds]:
    """Cut every output back into each request's rows (views, no copies)."""
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError(f"infer must return a non-empty dict of arrays, got {type(outputs).__name__}")
    for name, array in outputs.items():
        if not isinstance(array, np.ndarray) or array.ndim == 0 or array.shape[0] != total:
            raise ValueError(
                f"output {name!r} must have {total} rows on axis 0 (one per input sample), "
                f"got shape {getattr(array, 'shape', None)}"
            )
    if len(batch) == 1:
        return [dict(outputs)]
    results = []
    start = 0
    for request in batch:
        stop = start + request.samples
        results.append({name: array[start:stop] for name, array in outputs.items()})
        start = stop
    return results
