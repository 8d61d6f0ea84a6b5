"""Reliability under load and faults, on loopback with real servers, models and processes.

* Overload: open-loop traffic at about twice the measured capacity against a refinement
  server with a small queue is shed with RESOURCE_EXHAUSTED (never another error), goodput
  holds, the server stays healthy, and its RSS stays bounded.
* Faulty model instances: a DevicePool instance that hangs is taken out of rotation while the
  others keep serving, and comes back when its call returns; one that raises fails only the
  batches it ran.
* A streaming client that disconnects mid-stream (generation) frees its work: the job is
  cancelled, nothing more is computed, nothing stays queued.
* SIGTERM: a real ``python -m services.mask_rendering`` process drains, completing every call
  it had accepted, and refuses calls that arrive after the signal.

Every loop is bounded by a count or a wall-clock budget. The ``slow`` variants (excluded from
CI by default; ``pytest -m slow``) run the overload for longer and check RSS for a trend.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services._generated.histosynth.v1 import (
    generation_pb2_grpc,
    mask_refinement_pb2,
    mask_refinement_pb2_grpc,
    mask_rendering_pb2,
    mask_rendering_pb2_grpc,
)
from services.core import metrics
from services.core.device_pool import DevicePool
from services.core.dynamic_batcher import BatcherConfig, DynamicBatcher
from services.core.errors import BatchFailedError
from services.all_in_one import BackgroundServers
from services.core.model_store import ModelStore
from services.core.runtimes.base import RuntimeOptions
from services.core.runtimes.onnxruntime import OnnxRuntime
from services.tensor_codec import array_to_tensor, tensor_to_array
from tests.fixtures.service_models import RENDERER_NAME, write_service_store
from tests.fixtures.tiny_model import write_tiny_model
from tests.fixtures.process_stats import rss_bytes
from tests.integration.conftest import server_config

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


# ============================================================================ helpers
def coarse_masks(count: int = 1, size: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, size, size), np.uint8)
    masks[:, size // 4: 3 * size // 4, size // 5: 4 * size // 5] = 1
    masks ^= (rng.random(masks.shape) < 0.02).astype(np.uint8)  # ragged edges, like real coarse masks
    return masks


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


# Tallies kept beside the status codes.
DETAILS = ("client_backlog_full", "shed_by_queue", "shed_by_rpc_limit")


@dataclass
class LoadResult:
    offered: int
    codes: Counter  # status codes, plus the DETAILS tallies
    seconds: float

    @property
    def statuses(self) -> set[Any]:
        return {code for code in self.codes if code not in DETAILS}

    @property
    def ok(self) -> int:
        return self.codes[grpc.StatusCode.OK]

    @property
    def shed(self) -> int:
        return self.codes[grpc.StatusCode.RESOURCE_EXHAUSTED]


async def _one_refine(stub: mask_refinement_pb2_grpc.MaskRefinementStub, request: Any, codes: Counter) -> None:
    try:
        await stub.Refine(request, timeout=10)
        codes[grpc.StatusCode.OK] += 1
    except grpc.aio.AioRpcError as error:
        codes[error.code()] += 1
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Shed by the model's batcher queue, or by gRPC's concurrent-call bound in front of it.
            assert "queue is full" in error.details() or "Concurrent RPC limit" in error.details(), error.details()
            codes["shed_by_queue" if "queue is full" in error.details() else "shed_by_rpc_limit"] += 1


async def closed_loop(stub: Any, request: Any, concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` callers, each sending its next request when the previous one answered."""
    codes: Counter = Counter()
    stop_at = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop_at:
            await _one_refine(stub, request, codes)

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return LoadResult(sum(codes.values()), codes, time.monotonic() - started)


async def open_loop(stub: Any, request: Any, rate_per_s: float, seconds: float, max_outstanding: int) -> LoadResult:
    """Requests at a fixed rate whether or not earlier ones answered (how overload really arrives).

    ``max_outstanding`` bounds the client's own backlog so a stuck server cannot make the
    test itself grow without bound; hitting it counts as offered-but-not-sent.
    """
    codes: Counter = Counter()
    pending: set[asyncio.Task] = set()
    interval = 1.0 / rate_per_s
    started = time.monotonic()
    offered = 0
    while (now := time.monotonic()) - started < seconds:
        due = int((now - started) / interval) + 1
        while offered < due:
            offered += 1
            if len(pending) >= max_outstanding:
                codes["client_backlog_full"] += 1
                continue
            task = asyncio.ensure_future(_one_refine(stub, request, codes))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.sleep(min(interval, 0.005))
    if pending:
        await asyncio.wait(pending, timeout=15)
    return LoadResult(offered, codes, time.monotonic() - started)


# =========================================================================== overload
SMALL_QUEUE = 4
MAX_BATCH = 4


async def run_overload(
    tmp_path: Path, seconds: float, *, warmup_s: float = 1.0, rss_checkpoints: int = 1, max_growth_mib: int = 64
) -> None:
    store = write_service_store(tmp_path / "model_store")
    config = server_config(
        store, max_queue_size=SMALL_QUEUE, max_batch_size=MAX_BATCH, instances_per_device=1,
        intra_op_threads=1, max_queue_delay_ms=2.0, max_concurrent_rpcs=64, log_level="WARNING",
    )
    # The server runs on its own event loop (thread), as in production it owns its process: the
    # client's loop then cannot become the bottleneck that hides the server's own admission control.
    with BackgroundServers(config, ("refinement",), {"refinement": 0}) as servers:
        async with grpc.aio.insecure_channel(servers.addresses["refinement"]) as channel:
            stub = mask_refinement_pb2_grpc.MaskRefinementStub(channel)
            request = mask_refinement_pb2.RefineRequest(coarse_masks=array_to_tensor(coarse_masks(1, 384)))
            # Capacity: goodput with twice as many callers as the server holds (a full batch computing,
            # a full queue waiting), so it never idles; the excess is shed and not counted.
            capacity_run = await closed_loop(stub, request, concurrency=2 * (MAX_BATCH + SMALL_QUEUE), seconds=1.0)
            assert capacity_run.statuses <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, capacity_run.codes
            capacity = capacity_run.ok / capacity_run.seconds
            # Warm-up at the same overload, so buffers, arenas and caches reach their working size
            # before the baseline (the allocator keeps freed memory; growth after that is a leak).
            await open_loop(stub, request, 2.0 * capacity, seconds=warmup_s, max_outstanding=256)
            baseline = rss_bytes()

            samples = [baseline]
            totals = LoadResult(0, Counter(), 0.0)
            for _ in range(rss_checkpoints):
                result = await open_loop(stub, request, 2.0 * capacity, seconds / rss_checkpoints, max_outstanding=256)
                totals = LoadResult(totals.offered + result.offered, totals.codes + result.codes,
                                    totals.seconds + result.seconds)
                samples.append(rss_bytes())

            assert totals.statuses <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, totals.codes
            assert totals.shed > 0, f"no request was shed at 2x capacity ({capacity:.0f}/s): {totals.codes}"
            # Shedding protects goodput: the server still completes a good share of its capacity.
            goodput = totals.ok / totals.seconds
            assert goodput >= 0.3 * capacity, f"goodput {goodput:.0f}/s collapsed (capacity {capacity:.0f}/s)"
            shown = [sample // MIB for sample in samples]
            growth = samples[-1] - baseline
            assert growth < max_growth_mib * MIB, f"RSS grew {growth / MIB:.1f} MiB under load: {shown} MiB"
            if rss_checkpoints >= 6:
                # A leak is a trend; allocator high-water steps and noise are not: the last third
                # of the run must sit where the middle third did.
                third = len(samples) // 3
                middle, last = np.median(samples[third:2 * third]), np.median(samples[2 * third:])
                assert last - middle < 24 * MIB, f"RSS still climbing: {shown} MiB"

            # The server is healthy and answers normally once the load stops.
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            reply = await stub.Refine(request, timeout=10)
            assert tensor_to_array(reply.fine_masks, "fine_masks").shape == (1, 384, 384)
            print(f"capacity {capacity:.0f}/s, offered {totals.offered / totals.seconds:.0f}/s, {dict(totals.codes)}, "
                  f"RSS MiB {[s // MIB for s in samples]}")


@pytest.mark.timeout(60)
async def test_overload_is_shed_with_resource_exhausted(tmp_path: Path) -> None:
    # Two seconds cannot tell a slow leak from allocator arenas still settling inside a full test
    # session (seen: +66 MiB once), so this CI variant only bounds gross growth; the trend check
    # that catches a real leak is test_sustained_overload_keeps_rss_flat (slow marker).
    await run_overload(tmp_path, seconds=2.0, warmup_s=2.0, max_growth_mib=192)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sustained_overload_keeps_rss_flat(tmp_path: Path) -> None:
    await run_overload(tmp_path, seconds=60.0, warmup_s=10.0, rss_checkpoints=12, max_growth_mib=128)


# ===================================================================== faulty instances
class FaultyRuntime:
    """A real ONNX Runtime session behind a fault switch: ``hang`` blocks, ``raise`` fails.

    Stands in for a wedged GPU context or a corrupted session on one instance of a pool.
    """

    def __init__(self, runtime: OnnxRuntime, mode: str, release: threading.Event) -> None:
        self._runtime = runtime
        self.mode = mode
        self.release = release
        self.inputs, self.outputs = runtime.inputs, runtime.outputs
        self.device, self.provider = runtime.device, runtime.provider
        self.calls = 0

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.mode == "hang" and not self.release.is_set():
            self.release.wait(timeout=30)
        if self.mode == "raise":
            raise RuntimeError("injected fault: device lost")
        return self._runtime.infer(feeds)

    def close(self) -> None:
        self._runtime.close()


@dataclass
class FaultyPool:
    pool: DevicePool
    batcher: DynamicBatcher
    faulty: FaultyRuntime


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> tuple[Path, Any]:
    version_dir = write_tiny_model(tmp_path / "store")
    manifest = ModelStore(tmp_path / "store").get("tiny", "1")
    return version_dir / "model.onnx", manifest


async def faulty_pool(tiny_onnx: tuple[Path, Any], mode: str, release: threading.Event,
                      instances: int = 3, timeout_s: float = 0.4) -> FaultyPool:
    model_path, manifest = tiny_onnx
    made: list[FaultyRuntime] = []

    def factory(device: str) -> Any:
        runtime = OnnxRuntime(model_path, manifest.inputs, manifest.outputs, device, RuntimeOptions(intra_op_threads=1))
        if made:
            return runtime
        made.append(FaultyRuntime(runtime, mode, release))
        return made[0]

    pool = DevicePool(factory, ["cpu"], instances, instance_timeout_s=timeout_s, model_name=f"faulty-{mode}")
    batcher = DynamicBatcher(
        pool.infer,
        BatcherConfig(max_batch_size=4, max_queue_delay_ms=1.0, max_queue_size=256,
                      max_concurrent_batches=pool.instance_count),
        f"faulty-{mode}", "1",
    )
    await batcher.start()
    return FaultyPool(pool, batcher, made[0])


async def fire(batcher: DynamicBatcher, count: int) -> tuple[int, list[BaseException]]:
    """``count`` concurrent one-sample requests; (correct results, errors)."""
    inputs = [np.full((1, 3, 4, 4), index, np.float32) for index in range(count)]
    results = await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs), return_exceptions=True)
    correct, errors = 0, []
    for x, result in zip(inputs, results):
        if isinstance(result, BaseException):
            errors.append(result)
        else:
            np.testing.assert_array_equal(result["y"], 2 * x + 1)
            correct += 1
    return correct, errors


@pytest.mark.timeout(30)
async def test_hung_instance_is_isolated_while_others_serve(tiny_onnx: tuple[Path, Any]) -> None:
    release = threading.Event()
    setup = await faulty_pool(tiny_onnx, "hang", release)
    try:
        _, first_errors = await fire(setup.batcher, 24)
        # Only the batch that reached the hung instance failed, with a timeout naming it.
        assert 1 <= len(first_errors) <= 4, first_errors
        assert all(isinstance(e, BatchFailedError) and isinstance(e.cause, TimeoutError) for e in first_errors)
        assert [info.healthy for info in setup.pool.instances] == [False, True, True]
        calls_while_hung = setup.faulty.calls
        for _ in range(5):  # while hung, everything goes to the healthy instances
            correct, errors = await fire(setup.batcher, 24)
            assert (correct, errors) == (24, [])
        assert setup.faulty.calls == calls_while_hung
        release.set()  # the wedged call returns: the instance is healthy again and takes work
        for _ in range(100):
            if setup.pool.instances[0].healthy:
                break
            await asyncio.sleep(0.02)
        assert setup.pool.instances[0].healthy
        setup.faulty.mode = "ok"
        correct, errors = await fire(setup.batcher, 48)
        assert (correct, errors) == (48, []) and setup.faulty.calls > calls_while_hung
    finally:
        release.set()
        await setup.batcher.stop()
        await setup.pool.aclose()


@pytest.mark.timeout(30)
async def test_raising_instance_fails_only_its_own_batches(tiny_onnx: tuple[Path, Any]) -> None:
    setup = await faulty_pool(tiny_onnx, "raise", threading.Event())
    try:
        total_correct, total_errors = 0, []
        for _ in range(10):
            correct, errors = await fire(setup.batcher, 24)
            total_correct += correct
            total_errors += errors
        assert total_errors, "the raising instance was never used"
        assert all(isinstance(e, BatchFailedError) and "injected fault" in str(e) for e in total_errors)
        assert total_correct > 0
        # The healthy instances keep serving: most work still succeeds. (A raising instance is not
        # taken out of rotation: DevicePool only isolates hangs; see the module docstring of device_pool.)
        assert total_correct >= len(total_errors), (total_correct, len(total_errors))
        assert all(info.healthy for info in setup.pool.instances)
    finally:
        await setup.batcher.stop()
        await setup.pool.aclose()


# ================================================================ client disconnects
@pytest.mark.timeout(60)
def test_client_disconnect_mid_stream_frees_its_work(tmp_path: Path) -> None:
    from clients.client import HistosynthClient, request_from_spec, spec_from_dict
    from services.all_in_one import BackgroundServers
    from tests.fixtures.generation_models import write_generation_store

    store = write_generation_store(tmp_path / "model_store")
    services = ("refinement", "rendering", "generation")
    spec = spec_from_dict({"tissue": "nuclei", "count": 300, "height": 128, "width": 128, "seed": 5})
    with BackgroundServers(server_config(store), services, {name: 0 for name in services}) as servers:
        address = servers.addresses["generation"]
        channel = grpc.insecure_channel(address)
        call = generation_pb2_grpc.GenerationStub(channel).Generate(request_from_spec(spec), timeout=60)
        job_id = dict(call.initial_metadata())["histosynth-job-id"]
        assert [next(call).index, next(call).index] == [0, 1]
        channel.close()  # the client goes away without cancelling: the connection just ends

        with HistosynthClient(address, timeout=10) as observer:
            deadline = time.monotonic() + 10
            while (job := observer.get_job(job_id)).state != "cancelled" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert job.state == "cancelled" and job.completed < job.total, job
            time.sleep(0.3)
            assert observer.get_job(job_id).completed == job.completed  # nothing computed after it left
            pending = metrics.REGISTRY.get_sample_value(
                "histosynth_model_pending_requests", {"model": "renderer-he-nuclei", "version": "1"}
            )
            assert pending == 0  # its queued render requests were withdrawn
            inflight = metrics.REGISTRY.get_sample_value(
                "histosynth_grpc_inflight_requests", {"service": "histosynth.v1.Generation"}
            )
            assert inflight == 0
            # ... and the service goes on serving others.
            assert len(list(observer.generate({"tissue": "nuclei", "count": 1, "height": 64, "width": 64}))) == 1


# ======================================================================= SIGTERM drain
LISTENING_MESSAGE = "gRPC server listening"


class ServerProcess:
    """``python -m services.mask_rendering`` as a child process; address and metrics port from its log."""

    def __init__(self, store: Path, **settings: str) -> None:
        env = dict(os.environ)
        env.update(
            HISTOSYNTH_MODEL_STORE=str(store), HISTOSYNTH_HOST="127.0.0.1", HISTOSYNTH_PORT="0",
            HISTOSYNTH_METRICS_PORT="0", HISTOSYNTH_LOG_FORMAT="json", HISTOSYNTH_LOG_LEVEL="INFO",
            HISTOSYNTH_INTRA_OP_THREADS="1", PYTHONUNBUFFERED="1",
        )
        env.update(settings)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.mask_rendering"], cwd=REPO_ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.address = ""
        self.metrics_port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            try:
                entry = json.loads(line)
            except ValueError:  # a traceback line, say
                continue
            if entry.get("msg") == LISTENING_MESSAGE:
                self.address, self.metrics_port = entry["address"], int(entry["metrics_port"])
                self._listening.set()

    def wait_listening(self, timeout: float = 60) -> None:
        if not self._listening.wait(timeout):
            self.process.kill()
            raise AssertionError("server did not start:\n" + "".join(self.lines[-30:]))

    def metric(self, name: str, labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def log(self) -> str:
        return "".join(self.lines[-40:])


@pytest.fixture
def render_process(tmp_path: Path) -> Iterator[ServerProcess]:
    store = write_service_store(tmp_path / "model_store")
    server = ServerProcess(
        store, HISTOSYNTH_DRAIN_GRACE_S="30", HISTOSYNTH_MAX_BATCH_SIZE="4", HISTOSYNTH_INSTANCES_PER_DEVICE="1"
    )
    try:
        server.wait_listening()
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(10)


@pytest.mark.timeout(90)
async def test_sigterm_drains_accepted_calls_and_refuses_later_ones(render_process: ServerProcess) -> None:
    accepted_count = 6
    classes = np.random.default_rng(0).integers(0, 3, (1, 512, 512)).astype(np.uint8)  # ~0.3 s of work each
    request = mask_rendering_pb2.RenderRequest(model=RENDERER_NAME, class_masks=array_to_tensor(classes), seed=1)
    channel = grpc.aio.insecure_channel(render_process.address)
    stub = mask_rendering_pb2_grpc.MaskRenderingStub(channel)
    try:
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        accepted = [asyncio.ensure_future(stub.Render(request, timeout=60)) for _ in range(accepted_count)]
        labels = 'service="histosynth.v1.MaskRendering"'
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(render_process.metric, "histosynth_grpc_inflight_requests", labels) < accepted_count:
            assert time.monotonic() < deadline, "calls never all reached the server"
            await asyncio.sleep(0.01)

        render_process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while await health_status(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never reported NOT_SERVING"
            await asyncio.sleep(0.01)
        assert not all(call.done() for call in accepted), "the calls finished before the drain began"

        # Calls arriving during the drain are refused, with a message that says to retry elsewhere.
        small = mask_rendering_pb2.RenderRequest(model=RENDERER_NAME, class_masks=array_to_tensor(classes[:, :32, :32]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Render(small, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()

        # Every call accepted before the signal completes normally.
        replies = await asyncio.gather(*accepted)
        for reply in replies:
            assert tensor_to_array(reply.images, "images").shape == (1, 512, 512, 3)

        exit_code = await asyncio.to_thread(render_process.process.wait, 30)
        assert exit_code == 0, render_process.log()
        assert "drain grace over" not in render_process.log()  # nothing was cut off
    finally:
        await channel.close()

    # Once it has exited, the port refuses connections outright.
    async with grpc.aio.insecure_channel(render_process.address) as late:
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await mask_rendering_pb2_grpc.MaskRenderingStub(late).Render(small, timeout=5)
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
