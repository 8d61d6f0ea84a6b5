"""services.core.device_pool: least-loaded dispatch, CPU fallback, failure and hang isolation."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from services.core.device_pool import DevicePool
from services.core.errors import UnavailableError
from services.core.metrics import REGISTRY
from services.core.runtimes.base import Runtime, TensorSpec
from tests.unit.core.conftest import TILE, make_onnx_runtime

pytestmark = pytest.mark.timeout(10)

SPEC_IN = TensorSpec("x", "float32", ("batch", 2))
SPEC_OUT = TensorSpec("y", "float32", ("batch", 2))


class NumpyRuntime:
    """A real (numpy) runtime: y = 2x + 1, tagged with the instance that computed it.

    ``gate`` (a threading.Event) makes every call block until it is set, which lets
    tests hold an instance busy or hung. Tracks how many calls run at once.
    """

    inputs = (SPEC_IN,)
    outputs = (SPEC_OUT,)
    provider = "NumpyCPU"

    def __init__(self, instance_id: int, device: str, gate: threading.Event | None = None) -> None:
        self.instance_id = instance_id
        self.device = device
        self.gate = gate
        self.closed = False
        self.calls = 0
        self._active = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
            self.calls += 1
        try:
            if self.gate is not None and not self.gate.wait(timeout=5):
                raise RuntimeError("test gate never opened")
            x = feeds["x"]
            if (x < 0).any():
                raise ValueError(f"instance {self.instance_id} rejects negative input")
            return {"y": x * 2 + 1, "instance": np.full(x.shape[0], self.instance_id)}
        finally:
            with self._lock:
                self._active -= 1

    def close(self) -> None:
        self.closed = True


class Factory:
    """Creates NumpyRuntimes; devices listed in ``broken`` fail to load like a missing GPU."""

    def __init__(self, broken: frozenset[str] = frozenset(), gates: dict[int, threading.Event] | None = None) -> None:
        self.broken = broken
        self.gates = gates or {}
        self.created: list[NumpyRuntime] = []
        self.requested: list[str] = []

    def __call__(self, device: str) -> NumpyRuntime:
        self.requested.append(device)
        if device in self.broken:
            raise RuntimeError(f"CUDA driver not found for {device}")
        runtime = NumpyRuntime(len(self.created), device, self.gates.get(len(self.created)))
        self.created.append(runtime)
        return runtime


def x(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 2), value, dtype=np.float32)}


def instances_gauge(model: str, device: str) -> float | None:
    return REGISTRY.get_sample_value("histosynth_model_instances", {"model": model, "version": "1", "device": device})


def test_numpy_runtime_satisfies_the_runtime_protocol() -> None:
    assert isinstance(NumpyRuntime(0, "cpu"), Runtime)


def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError, match="devices"):
        DevicePool(Factory(), [], 1)
    with pytest.raises(ValueError, match="devices"):
        DevicePool(Factory(), "cpu", 1)
    with pytest.raises(ValueError, match="instances_per_device"):
        DevicePool(Factory(), ["cpu"], 0)
    with pytest.raises(ValueError, match="instance_timeout_s"):
        DevicePool(Factory(), ["cpu"], 1, instance_timeout_s=0)


def test_creates_instances_per_device_and_reports_them() -> None:
    factory = Factory()
    with DevicePool(factory, ["cpu", "cpu"], 3, model_name="p_count", model_version="1") as pool:
        assert pool.instance_count == 6
        assert [info.index for info in pool.instances] == list(range(6))
        assert all(info.healthy and info.device == "cpu" for info in pool.instances)
        assert pool.inputs == (SPEC_IN,) and pool.outputs == (SPEC_OUT,)
        assert instances_gauge("p_count", "cpu") == 6
    assert all(runtime.closed for runtime in factory.created)
    assert instances_gauge("p_count", "cpu") == 0


def test_gpu_that_fails_to_load_falls_back_to_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    factory = Factory(broken=frozenset({"cuda:0"}))
    with caplog.at_level(logging.WARNING, logger="services.core.device_pool"):
        pool = DevicePool(factory, ["cuda:0"], 2, model_name="p_fallback", model_version="1")
    with pool:
        assert [(i.requested_device, i.device) for i in pool.instances] == [("cuda:0", "cpu")] * 2
        assert factory.requested == ["cuda:0", "cpu", "cuda:0", "cpu"]
        assert instances_gauge("p_fallback", "cpu") == 2
        assert instances_gauge("p_fallback", "cuda:0") is None
    assert "falling back to CPU" in caplog.text and "CUDA driver not found" in caplog.text


def test_cpu_that_fails_to_load_raises_and_closes_what_was_created() -> None:
    class BreaksOnSecond(Factory):
        def __call__(self, device: str) -> NumpyRuntime:
            if len(self.created) == 1:
                raise RuntimeError("out of memory")
            return super().__call__(device)

    factory = BreaksOnSecond()
    with pytest.raises(RuntimeError, match="out of memory"):
        DevicePool(factory, ["cpu"], 2)
    assert factory.created[0].closed


async def test_ties_rotate_round_robin() -> None:
    with DevicePool(Factory(), ["cpu"], 3) as pool:
        used = [int((await pool.infer(x(1.0)))["instance"][0]) for _ in range(7)]
    assert used == [0, 1, 2, 0, 1, 2, 0]


async def test_dispatch_goes_to_the_least_loaded_instance() -> None:
    gates = {0: threading.Event(), 1: threading.Event(), 2: threading.Event()}
    with DevicePool(Factory(gates=gates), ["cpu"], 3) as pool:
        busy = [asyncio.create_task(pool.infer(x(float(i)))) for i in range(3)]  # one per instance
        await asyncio.sleep(0)
        assert [info.in_flight for info in pool.instances] == [1, 1, 1]
        gates[1].set()
        assert int((await busy[1])["instance"][0]) == 1
        # Instance 1 is now the only idle one, though round robin would pick instance 0.
        assert int((await pool.infer(x(5.0)))["instance"][0]) == 1
        gates[0].set()
        gates[2].set()
        results = await asyncio.gather(*busy)
    assert [int(r["instance"][0]) for r in results] == [0, 1, 2]


async def test_one_instance_never_runs_two_calls_at_once() -> None:
    factory = Factory()
    with DevicePool(factory, ["cpu"], 1) as pool:
        results = await asyncio.gather(*(pool.infer(x(float(i), rows=64)) for i in range(16)))
    assert factory.created[0].max_concurrent == 1
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], np.full((64, 2), 2.0 * i + 1.0))


async def test_a_raising_runtime_fails_only_that_call() -> None:
    with DevicePool(Factory(), ["cpu"], 2) as pool:
        outcomes = await asyncio.gather(
            pool.infer(x(1.0)), pool.infer(x(-1.0)), pool.infer(x(2.0)), return_exceptions=True
        )
        assert isinstance(outcomes[1], ValueError)
        assert [float(outcomes[i]["y"][0, 0]) for i in (0, 2)] == [3.0, 5.0]
        assert all(info.healthy for info in pool.instances)
        assert float((await pool.infer(x(3.0)))["y"][0, 0]) == 7.0


async def test_hung_instance_is_isolated_and_recovers_when_its_call_returns(caplog: pytest.LogCaptureFixture) -> None:
    hang = threading.Event()
    factory = Factory(gates={0: hang})
    pool = DevicePool(factory, ["cpu"], 3, instance_timeout_s=0.1, model_name="p_hang", model_version="1")
    try:
        with pytest.raises(TimeoutError, match="instance 0 .* did not answer within 0.1 s"):
            await pool.infer(x(1.0))  # round robin starts at instance 0, which hangs
        assert [info.healthy for info in pool.instances] == [False, True, True]
        assert instances_gauge("p_hang", "cpu") == 2
        results = await asyncio.gather(*(pool.infer(x(float(i))) for i in range(12)))
        assert {int(r["instance"][0]) for r in results} == {1, 2}
        assert [float(r["y"][0, 0]) for r in results] == [2.0 * i + 1.0 for i in range(12)]

        hang.set()
        for _ in range(200):  # the recovery callback runs on the loop once the thread returns
            if pool.instances[0].healthy:
                break
            await asyncio.sleep(0.005)
        assert pool.instances[0].healthy
        assert instances_gauge("p_hang", "cpu") == 3
    finally:
        hang.set()
        pool.close()
    assert "marked unhealthy" in caplog.text


async def test_all_instances_hung_is_unavailable() -> None:
    hang = threading.Event()
    pool = DevicePool(Factory(gates={0: hang}), ["cpu"], 1, instance_timeout_s=0.05)
    try:
        with pytest.raises(TimeoutError):
            await pool.infer(x(1.0))
        with pytest.raises(UnavailableError, match="unhealthy"):
            await pool.infer(x(1.0))
    finally:
        hang.set()
        pool.close()


async def test_closed_pool_is_unavailable() -> None:
    pool = DevicePool(Factory(), ["cpu"], 1)
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(UnavailableError, match="closed"):
        await pool.infer(x(1.0))


async def test_pool_of_onnx_runtimes_serves_concurrent_calls(tiny_conv_model_path: Path) -> None:
    rng = np.random.default_rng(3)
    batches = [{"image": rng.standard_normal((4, 1, TILE, TILE)).astype(np.float32)} for _ in range(12)]
    reference = make_onnx_runtime(tiny_conv_model_path)
    expected = [reference.infer(feeds)["features"] for feeds in batches]
    reference.close()
    with DevicePool(lambda device: make_onnx_runtime(tiny_conv_model_path, device), ["cpu"], 2) as pool:
        assert [info.provider for info in pool.instances] == ["CPUExecutionProvider"] * 2
        results = await asyncio.gather(*(pool.infer(feeds) for feeds in batches))
    for result, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(result["features"], want)
