"""A pool of runtime instances of one model across devices, with least-loaded dispatch.

Each instance owns one worker thread, so the blocking ``runtime.infer`` never blocks
the event loop and one instance never runs two calls at once (a GPU session is not
made faster by concurrent calls, and some runtimes are not re-entrant). Several
instances per device overlap host-side work (pre/post, transfers) with compute.

Failure isolation:
  * a GPU instance that cannot be created falls back to CPU with a warning; the
    device actually used is what the pool reports (``instances``, metrics);
  * a runtime that raises fails only that call;
  * a call that does not return within ``instance_timeout_s`` fails with TimeoutError
    and marks its instance unhealthy: it gets no new calls until the hung call
    returns, while the other instances keep serving. (Python cannot kill a thread:
    a call that never returns keeps its worker thread, which also delays
    interpreter exit; the pool only stops routing work to it.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.core.errors import UnavailableError
from services.core.metrics import ModelMetrics
from services.core.runtimes.base import Runtime, TensorSpec

_log = logging.getLogger(__name__)

InstanceFactory = Callable[[str], Runtime]
CPU_DEVICE = "cpu"


@dataclass(frozen=True)
class InstanceInfo:
    """Read-only view of one pool instance."""

    index: int
    requested_device: str
    device: str
    provider: str
    healthy: bool
    in_flight: int
    # Inference precision the runtime actually runs at ("fp32", "bf16").
    precision: str = "fp32"


class _Instance:
    def __init__(self, index: int, runtime: Runtime, requested_device: str, thread_name: str) -> None:
        self.index = index
        self.runtime = runtime
        self.requested_device = requested_device
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self.in_flight = 0
        self.hung_calls = 0  # calls that timed out and are still running in the thread

    @property
    def healthy(self) -> bool:
        return self.hung_calls == 0

    def info(self) -> InstanceInfo:
        return InstanceInfo(
            index=self.index,
            requested_device=self.requested_device,
            device=self.runtime.device,
            provider=self.runtime.provider,
            healthy=self.healthy,
            in_flight=self.in_flight,
            precision=str(getattr(self.runtime, "precision", "fp32")),
        )


class DevicePool:
    """``instances_per_device`` runtimes on each of ``devices``, served least-loaded first.

    ``factory(device)`` loads the model on ``device`` ("cpu", "cuda:0") and returns a
    Runtime. Creating instances is blocking (it loads models): do it at startup.
    ``instance_timeout_s`` bounds one call from dispatch to result (including the
    wait behind earlier calls on the same instance); None disables hang detection.
    """

    def __init__(
        self,
        factory: InstanceFactory,
        devices: Sequence[str],
        instances_per_device: int,
        *,
        instance_timeout_s: float | None = 60.0,
        model_name: str = "unknown",
        model_version: str = "unknown",
    ) -> None:
        if isinstance(devices, str) or not devices:
            raise ValueError(f"devices must be a non-empty sequence of device strings, got {devices!r}")
        if isinstance(instances_per_device, bool) or not isinstance(instances_per_device, int) or instances_per_device < 1:
            raise ValueError(f"instances_per_device must be an int >= 1, got {instances_per_device!r}")
        if instance_timeout_s is not None and not instance_timeout_s > 0:
            raise ValueError(f"instance_timeout_s must be > 0 or None, got {instance_timeout_s!r}")
        self._model_name = model_name
        self._timeout_s = instance_timeout_s
        self._metrics = ModelMetrics(model_name, model_version)
        self._instances: list[_Instance] = []
        self._next_index = 0  # round-robin start for ties
        self._closed = False
        self._reported_devices: set[str] = set()
        try:
            for device in devices:
                for _ in range(instances_per_device):
                    runtime = self._create(factory, device)
                    index = len(self._instances)
                    name = f"{model_name}-{runtime.device}-{index}".replace(":", "")
                    self._instances.append(_Instance(index, runtime, device, name))
        except BaseException:
            self.close()
            raise
        self._update_instance_gauge()
        self._metrics.set_runtimes(Counter((info.provider, info.precision) for info in self.instances))

    def _create(self, factory: InstanceFactory, device: str) -> Runtime:
        if device == CPU_DEVICE:
            return factory(device)
        try:
            return factory(device)
        except Exception as error:
            _log.warning(
                "model %r: could not create an instance on %s (%s: %s); falling back to CPU",
                self._model_name, device, type(error).__name__, error,
            )
            return factory(CPU_DEVICE)

    # ------------------------------------------------------------------ inspection
    @property
    def instances(self) -> tuple[InstanceInfo, ...]:
        return tuple(instance.info() for instance in self._instances)

    @property
    def instance_count(self) -> int:
        """All instances, healthy or not: the right ``max_concurrent_batches`` for a batcher."""
        return len(self._instances)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._instances[0].runtime.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._instances[0].runtime.outputs

    # ----------------------------------------------------------------------- infer
    async def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``feeds`` on the least-loaded healthy instance.

        Raises UnavailableError when the pool is closed or every instance is hung,
        TimeoutError when the call exceeds ``instance_timeout_s``, and whatever the
        runtime raised otherwise.
        """
        instance = self._pick()
        loop = asyncio.get_running_loop()
        instance.in_flight += 1
        try:
            future = loop.run_in_executor(instance.executor, instance.runtime.infer, feeds)
            done, _ = await asyncio.wait((future,), timeout=self._timeout_s)
            if not done:
                self._mark_hung(instance, future, loop)
                raise TimeoutError(
                    f"model {self._model_name!r} instance {instance.index} on {instance.runtime.device} "
                    f"did not answer within {self._timeout_s} s; it is marked unhealthy and "
                    "skipped until that call returns"
                )
            return future.result()
        finally:
            instance.in_flight -= 1

    def _pick(self) -> _Instance:
        if self._closed:
            raise UnavailableError(f"model {self._model_name!r} device pool is closed; no new requests accepted")
        count = len(self._instances)
        best: _Instance | None = None
        # Scan from the round-robin cursor so ties rotate instead of piling onto instance 0.
        for offset in range(count):
            candidate = self._instances[(self._next_index + offset) % count]
            if candidate.healthy and (best is None or candidate.in_flight < best.in_flight):
                best = candidate
        if best is None:
            raise UnavailableError(
                f"model {self._model_name!r}: all {count} instances are unhealthy (hung calls); "
                "retry later or restart the server"
            )
        self._next_index = (best.index + 1) % count
        return best

    def _mark_hung(self, instance: _Instance, future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        instance.hung_calls += 1
        _log.error(
            "model %r: instance %d on %s hung for more than %s s; marked unhealthy",
            self._model_name, instance.index, instance.runtime.device, self._timeout_s,
        )
        self._update_instance_gauge()

        def recovered(_: asyncio.Future) -> None:
            instance.hung_calls -= 1
            if instance.healthy and not self._closed:
                _log.warning(
                    "model %r: instance %d on %s returned from its hung call; healthy again",
                    self._model_name, instance.index, instance.runtime.device,
                )
                self._update_instance_gauge()

        # The asyncio future wrapping the executor call completes on the loop thread
        # once the worker thread returns, so the bookkeeping stays single-threaded.
        future.add_done_callback(recovered)

    def _update_instance_gauge(self) -> None:
        healthy = Counter(instance.runtime.device for instance in self._instances if instance.healthy and not self._closed)
        # Devices that lost every healthy instance must drop to 0, not keep a stale value.
        self._reported_devices |= {instance.runtime.device for instance in self._instances}
        for device in self._reported_devices:
            self._metrics.set_instances(device, healthy.get(device, 0))

    # ----------------------------------------------------------------------- close
    def close(self) -> None:
        """Wait for running calls, close every runtime and stop the worker threads.

        An instance stuck in a hung call is abandoned (its thread is not joined and
        its runtime is not closed under the running call). Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        for instance in self._instances:
            if instance.healthy:
                # Queued on the instance's own thread, so it runs after any call in progress.
                close_call = instance.executor.submit(instance.runtime.close)
                instance.executor.shutdown(wait=True)
                try:
                    close_call.result()
                except Exception:
                    _log.exception("model %r: closing instance %d failed", self._model_name, instance.index)
            else:
                _log.warning(
                    "model %r: instance %d on %s is hung; abandoning it without closing",
                    self._model_name, instance.index, instance.runtime.device,
                )
                instance.executor.shutdown(wait=False, cancel_futures=True)
        self._update_instance_gauge()

    async def aclose(self) -> None:
        """close() from async code without blocking the event loop while calls finish."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
