"""Serving-core benchmark: DynamicBatcher + DevicePool vs calling the runtime directly.

    python -m bench.bench_core [--duration 2] [--instances N] [--output bench/results/core.json]

The model is a small real ONNX CNN (four convolutions on 3x64x64 tiles, ~79 M MACs
per sample) run by the serving OnnxRuntime. For each concurrency (1, 4, 16
closed-loop clients, one sample per request), with the same CPU budget on both
paths (N single-threaded sessions in the pool; N worker threads for direct):

  direct          every client calls ``runtime.infer`` on one shared session from a
                  worker thread (ONNX Runtime sessions are thread-safe);
  core_unbatched  DynamicBatcher(max_batch_size=1) -> DevicePool: the core's own
                  overhead (queue, scheduler, thread hop) without merging;
  core_batched    DynamicBatcher(max_batch_size=16, delay 0 and 2 ms) -> DevicePool.

Reported per run: throughput (requests/s) and latency p50/p95/p99 (ms); per core
run, the latency it adds over direct at the same concurrency; and the runtime's own
cost per sample at batch 1/4/16, which decides whether merging can pay off on this
device (on CPU a larger batch often costs more per sample: the activations fall out
of cache; on GPU it is the other way round).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from services.core.device_pool import DevicePool
from services.core.dynamic_batcher import BatcherConfig, DynamicBatcher
from services.core.runtimes.base import RuntimeOptions, TensorSpec
from services.core.runtimes.onnxruntime import OnnxRuntime

TILE = 64
CHANNELS = (3, 32, 32, 32, 3)  # conv3x3 x3 with ReLU, then a 1x1 projection back to RGB
INPUT = TensorSpec("image", "float32", ("batch", 3, TILE, TILE))
OUTPUT = TensorSpec("rgb", "float32", ("batch", 3, TILE, TILE))
CONCURRENCIES = (1, 4, 16)
MAX_BATCH_SIZE = 16
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "core.json"


def build_model(path: Path) -> int:
    """Write the benchmark CNN to ``path``; returns multiply-accumulates per sample."""
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    macs = 0
    current = "image"
    layers = len(CHANNELS) - 1
    for index, (c_in, c_out) in enumerate(zip(CHANNELS[:-1], CHANNELS[1:], strict=True)):
        kernel = 1 if index == layers - 1 else 3
        weight = (rng.standard_normal((c_out, c_in, kernel, kernel)) / np.sqrt(c_in * kernel * kernel)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(np.zeros(c_out, np.float32), f"b{index}"),
        ]
        pad = kernel // 2
        conv_out = "rgb" if index == layers - 1 else f"conv{index}"
        nodes.append(helper.make_node("Conv", [current, f"w{index}", f"b{index}"], [conv_out], pads=[pad] * 4))
        if index < layers - 1:
            nodes.append(helper.make_node("Relu", [conv_out], [f"relu{index}"]))
            current = f"relu{index}"
        macs += TILE * TILE * c_in * c_out * kernel * kernel
    graph = helper.make_graph(
        nodes,
        "bench_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, TILE, TILE])],
        [helper.make_tensor_value_info("rgb", TensorProto.FLOAT, ["batch", 3, TILE, TILE])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return macs


@dataclass(frozen=True)
class RunResult:
    mode: str
    concurrency: int
    max_batch_size: int | None
    max_queue_delay_ms: float | None
    requests: int
    seconds: float
    throughput_rps: float
    latency_ms: dict[str, float]
    mean_batch_samples: float | None


async def closed_loop(
    call: Callable[[dict[str, np.ndarray]], Awaitable[object]], concurrency: int, duration_s: float
) -> tuple[list[float], float]:
    """``concurrency`` clients each send a request as soon as the previous one returns."""
    rng = np.random.default_rng(1)
    samples = [{"image": rng.standard_normal((1, 3, TILE, TILE)).astype(np.float32)} for _ in range(concurrency)]
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration_s

    async def client(feeds: dict[str, np.ndarray]) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await call(feeds)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(feeds) for feeds in samples))
    return latencies, time.perf_counter() - started


def summarize(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000.0
    return {
        "p50": round(float(np.percentile(values, 50)), 3),
        "p95": round(float(np.percentile(values, 95)), 3),
        "p99": round(float(np.percentile(values, 99)), 3),
        "mean": round(float(values.mean()), 3),
    }


async def run_direct(runtime: OnnxRuntime, workers: int, concurrency: int, duration_s: float) -> RunResult:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="direct")
    loop = asyncio.get_running_loop()

    async def call(feeds):
        return await loop.run_in_executor(executor, runtime.infer, feeds)

    try:
        await closed_loop(call, concurrency, min(0.3, duration_s))  # warm-up
        latencies, seconds = await closed_loop(call, concurrency, duration_s)
    finally:
        executor.shutdown(wait=True)
    return RunResult("direct", concurrency, None, None, len(latencies), round(seconds, 3),
                     round(len(latencies) / seconds, 1), summarize(latencies), None)


async def run_core(
    model_path: Path, options: RuntimeOptions, instances: int, max_batch_size: int,
    delay_ms: float, concurrency: int, duration_s: float,
) -> RunResult:
    model_name = f"bench_c{concurrency}_b{max_batch_size}_d{delay_ms:g}"
    batches: list[int] = []
    with DevicePool(lambda device: OnnxRuntime(model_path, (INPUT,), (OUTPUT,), device, options),
                    ["cpu"], instances, model_name=model_name, model_version="1") as pool:

        async def counting_infer(feeds):
            batches.append(next(iter(feeds.values())).shape[0])
            return await pool.infer(feeds)

        config = BatcherConfig(max_batch_size=max_batch_size, max_queue_delay_ms=delay_ms,
                               max_queue_size=1024, max_concurrent_batches=pool.instance_count)
        async with DynamicBatcher(counting_infer, config, model_name, "1") as batcher:
            await closed_loop(batcher.submit, concurrency, min(0.3, duration_s))  # warm-up
            batches.clear()
            latencies, seconds = await closed_loop(batcher.submit, concurrency, duration_s)
    mode = "core_unbatched" if max_batch_size == 1 else "core_batched"
    return RunResult(mode, concurrency, max_batch_size, delay_ms, len(latencies), round(seconds, 3),
                     round(len(latencies) / seconds, 1), summarize(latencies),
                     round(float(np.mean(batches)), 2) if batches else None)


def runtime_batch_scaling(runtime: OnnxRuntime, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per sample when the runtime itself is given batches of 1, 4, 16."""
    rng = np.random.default_rng(2)
    per_sample = {}
    for batch in (1, 4, 16):
        feeds = {"image": rng.standard_normal((batch, 3, TILE, TILE)).astype(np.float32)}
        for _ in range(3):
            runtime.infer(feeds)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            runtime.infer(feeds)
            times.append(time.perf_counter() - started)
        per_sample[f"batch_{batch}"] = round(float(np.median(times)) * 1000.0 / batch, 3)
    return per_sample


class _AddOneRuntime:
    """Near-zero-cost numpy runtime: isolates the core's own overhead from model compute."""

    inputs = (INPUT,)
    outputs = (OUTPUT,)
    device = "cpu"
    provider = "numpy"

    def infer(self, feeds):
        return {"rgb": feeds["image"] + 1.0}

    def close(self) -> None:
        pass


async def core_overhead_us(calls: int = 3000) -> dict[str, dict[str, float]]:
    """Sequential (c=1) latency in microseconds of a near-free call through each layer."""
    feeds = {"image": np.zeros((1, 3, 8, 8), np.float32)}
    runtime = _AddOneRuntime()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()
    report = {}
    with DevicePool(lambda device: _AddOneRuntime(), ["cpu"], 1, model_name="bench_overhead", model_version="1") as pool:
        config = BatcherConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=16)
        async with DynamicBatcher(pool.infer, config, "bench_overhead", "1") as batcher:
            paths = {
                "worker_thread_direct": lambda: loop.run_in_executor(executor, runtime.infer, feeds),
                "device_pool": lambda: pool.infer(feeds),
                "batcher_and_pool": lambda: batcher.submit(feeds),
            }
            for name, call in paths.items():
                for _ in range(200):
                    await call()
                times = []
                for _ in range(calls):
                    started = time.perf_counter()
                    await call()
                    times.append(time.perf_counter() - started)
                micros = np.asarray(times) * 1e6
                report[name] = {q: round(float(np.percentile(micros, p)), 1)
                                for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
    executor.shutdown(wait=True)
    return report


def machine_info() -> dict[str, object]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# (max_batch_size, max_queue_delay_ms) of each core run: the first isolates the core's
# own overhead (queue + pool hop, no merging); the others merge.
CORE_SETTINGS: tuple[tuple[int, float], ...] = ((1, 0.0), (MAX_BATCH_SIZE, 0.0), (MAX_BATCH_SIZE, 2.0))


async def main_async(duration_s: float, instances: int, output: Path) -> dict[str, object]:
    # Same CPU budget on both paths: `instances` single-threaded sessions behind the
    # pool, `instances` worker threads sharing one single-threaded session for direct.
    options = RuntimeOptions(intra_op_threads=1)
    machine = machine_info()  # before the runs: the load average describes the competition
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "bench_cnn.onnx"
        macs = build_model(model_path)
        runtime = OnnxRuntime(model_path, (INPUT,), (OUTPUT,), "cpu", options)
        scaling = runtime_batch_scaling(runtime)
        print(f"runtime ms/sample by batch size: {scaling}", flush=True)
        overhead = await core_overhead_us()
        print(f"near-free call latency (us) by path: {overhead}", flush=True)
        results: list[RunResult] = []
        for concurrency in CONCURRENCIES:
            results.append(await run_direct(runtime, instances, concurrency, duration_s))
            for max_batch_size, delay_ms in CORE_SETTINGS:
                results.append(await run_core(model_path, options, instances, max_batch_size, delay_ms,
                                              concurrency, duration_s))
            for result in results[-1 - len(CORE_SETTINGS):]:
                print(
                    f"{result.mode:14s} c={result.concurrency:<3d} max_batch={result.max_batch_size!s:4s} "
                    f"delay={result.max_queue_delay_ms!s:5s} {result.throughput_rps:8.1f} req/s  "
                    f"p50={result.latency_ms['p50']:7.2f} p95={result.latency_ms['p95']:7.2f} "
                    f"p99={result.latency_ms['p99']:7.2f} ms"
                    + (f"  mean batch={result.mean_batch_samples}" if result.mean_batch_samples else ""),
                    flush=True,
                )
        runtime.close()

    direct = {r.concurrency: r for r in results if r.mode == "direct"}
    added = [
        {
            "mode": r.mode,
            "concurrency": r.concurrency,
            "max_batch_size": r.max_batch_size,
            "max_queue_delay_ms": r.max_queue_delay_ms,
            **{q: round(r.latency_ms[q] - direct[r.concurrency].latency_ms[q], 3) for q in ("p50", "p95", "p99")},
            "throughput_ratio": round(r.throughput_rps / direct[r.concurrency].throughput_rps, 3),
        }
        for r in results
        if r.mode != "direct"
    ]
    report = {
        "benchmark": "core: DynamicBatcher + DevicePool vs direct OnnxRuntime.infer from worker threads",
        "machine": machine,
        "model": {
            "layers": "conv3x3 3->32, relu, conv3x3 32->32, relu, conv3x3 32->32, relu, conv1x1 32->3",
            "input": INPUT.describe(),
            "macs_per_sample": macs,
            "runtime_ms_per_sample_by_batch": scaling,
        },
        "settings": {
            "duration_s_per_run": duration_s,
            "samples_per_request": 1,
            "instances_or_direct_threads": instances,
            "intra_op_threads": 1,
        },
        "core_overhead_us_c1_near_free_runtime": overhead,
        "results": [asdict(r) for r in results],
        "core_minus_direct_ms": added,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per run (after a warm-up)")
    parser.add_argument("--instances", type=int, default=os.cpu_count() or 1,
                        help="pool instances, and worker threads for the direct path (default: CPU count)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON report path")
    args = parser.parse_args()
    if args.duration <= 0:
        parser.error(f"--duration must be > 0, got {args.duration}")
    if args.instances < 1:
        parser.error(f"--instances must be >= 1, got {args.instances}")
    asyncio.run(main_async(args.duration, args.instances, args.output))


if __name__ == "__main__":
    main()
