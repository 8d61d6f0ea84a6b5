"""Diffusion serving benchmark: step-level (continuous) vs request-level batching, 1 vs 8 clients.

    python -m bench.bench_diffusion [--steps 20] [--output bench/results/diffusion.json] [--quick]

The DiffusionEngine (services/diffusion/engine.py) runs in-process over the model's real
DevicePool + ONNX Runtime session (CPU, intra-op threads 1 unless --threads), exactly as the
rendering service does behind gRPC. Model: the shipped renderer-diffusion-nuclei at its trained
size when model_store/ has it, otherwise the tiny fixture denoiser (clearly labelled in the JSON).

For each mode (step_batching on / off) and each client count (1, 8): closed-loop clients, each
sending ``requests_per_client`` Render-sized requests (one field at the trained size, DDIM, the
manifest's guidance) one after the other; client i starts i * stagger after the first, stagger =
one solo request's latency / clients, so requests arrive while others are at different timesteps.
A third, mixed scenario has one client of short (10-step) requests among 7 clients of long
(2 x steps) ones: request-level batching makes the short ones wait behind whole long batches.

Reported per run: images/s (images / wall time from first arrival to last answer), latency
p50/p95 (ms), denoiser calls, mean and max rows per call, denoising steps/s; plus the machine and
its load average (the CPU is shared, so absolute numbers move with the load; compare runs of one file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import bench_core
from services.core.model_store import ModelStore
from services.core.runtimes.base import RuntimeOptions
from services.diffusion.engine import DiffusionEngine, SamplingParams
from services.diffusion.pipeline import DiffusionPipeline, DiffusionSettings
from services.model_host import HostSettings, ModelHost

SHIPPED_STORE = Path(__file__).resolve().parents[1] / "model_store"
SHIPPED_MODEL = "renderer-diffusion-nuclei"
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "diffusion.json"
CLIENTS = (1, 8)


@dataclass(frozen=True)
class RunResult:
    scenario: str
    step_batching: bool
    clients: int
    images: int
    wall_s: float
    images_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    denoiser_calls: int
    mean_rows_per_call: float
    max_rows_per_call: int
    mixed_timestep_calls: int
    steps_per_s: float
    # Mixed scenario only: latency of the short requests (the ones request-level batching makes wait).
    short_latency_p50_ms: float | None = None
    short_latency_p95_ms: float | None = None


def class_map(size: tuple[int, int], seed: int, num_classes: int) -> np.ndarray:
    """Blobby nuclei-like class map: a few 8-14 px squares of random nucleus classes."""
    rng = np.random.default_rng(seed)
    height, width = size
    classes = np.zeros(size, np.uint8)
    for _ in range(max(1, height * width // 400)):
        side = int(rng.integers(8, 15))
        y, x = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        classes[y:y + side, x:x + side] = rng.integers(1, num_classes)
    return classes


def _ms(values: list[float], percentile: float) -> float:
    return round(float(np.percentile(values, percentile)) * 1000, 1)


async def run_clients(
    engine: DiffusionEngine,
    scenario: str,
    steps: list[int],
    requests: list[int],
    stagger_s: float,
) -> RunResult:
    """Closed-loop client i sends ``requests[i]`` requests of ``steps[i]`` DDIM steps, starting i * stagger_s."""
    spec = engine.spec
    base = (engine.calls, engine.rows_total, engine.mixed_timestep_calls)
    engine.max_rows_seen = 0
    latencies: dict[int, list[float]] = {}

    async def client(index: int) -> None:
        await asyncio.sleep(index * stagger_s)
        for number in range(requests[index]):
            seed = index * 1000 + number
            condition = spec.class_map_condition(class_map(spec.sample_size, seed, spec.num_classes), None)
            params = SamplingParams(steps[index], "ddim", spec.default_guidance_scale, seed)
            started = time.perf_counter()
            await engine.sample(condition, params)
            latencies.setdefault(steps[index], []).append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(len(steps))))
    wall = time.perf_counter() - started
    calls = engine.calls - base[0]
    rows = engine.rows_total - base[1]
    images = sum(requests)
    everything = [value for values in latencies.values() for value in values]
    short = latencies[min(latencies)] if len(latencies) > 1 else None
    return RunResult(
        scenario=scenario,
        step_batching=engine.config.step_batching,
        clients=len(steps),
        images=images,
        wall_s=round(wall, 3),
        images_per_s=round(images / wall, 3),
        latency_p50_ms=_ms(everything, 50),
        latency_p95_ms=_ms(everything, 95),
        denoiser_calls=calls,
        mean_rows_per_call=round(rows / max(calls, 1), 2),
        max_rows_per_call=engine.max_rows_seen,
        mixed_timestep_calls=engine.mixed_timestep_calls - base[2],
        steps_per_s=round(sum(s * r for s, r in zip(steps, requests, strict=True)) / wall, 1),
        short_latency_p50_ms=None if short is None else _ms(short, 50),
        short_latency_p95_ms=None if short is None else _ms(short, 95),
    )


def machine_info() -> dict[str, Any]:
    """bench_core's machine facts, plus all three load averages (diffusion runs are long)."""
    info = dict(bench_core.machine_info())
    info["load_average_at_start"] = [round(value, 2) for value in os.getloadavg()]
    return info


def model_store(args: argparse.Namespace, workdir: Path) -> tuple[Path, str, str]:
    """(store root, model name, label): --store/--model, else the shipped model, else the fixture."""
    quick = args.quick
    if args.store is not None:
        return args.store, args.model, f"{args.model} from {args.store}"
    if not quick and (SHIPPED_STORE / SHIPPED_MODEL / "1" / "manifest.yaml").is_file():
        return SHIPPED_STORE, SHIPPED_MODEL, f"shipped {SHIPPED_MODEL}/1 (trained weights)"
    from tests.fixtures.diffusion_models import RENDERER_NAME, write_diffusion_renderer

    write_diffusion_renderer(workdir)
    reason = "--quick" if quick else f"{SHIPPED_MODEL} is not in model_store/ yet"
    return workdir, RENDERER_NAME, f"FIXTURE denoiser (random weights, tests/fixtures/diffusion_models.py; {reason})"


async def denoiser_cost_ms(served: Any, spec: Any, rows: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Milliseconds per denoiser call by rows (best of ``repeats``): does batching pay on this device?"""
    height, width = spec.sample_size
    rng = np.random.default_rng(0)
    costs = {}
    for count in rows:
        feeds = {
            "sample": rng.standard_normal((count, spec.sample_channels, height, width), dtype=np.float32),
            "timestep": rng.integers(0, 1000, count).astype(np.float32),
            "condition": np.zeros((count, *spec.condition_shape(height, width)), np.float32),
        }
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            await served.pool.infer(feeds)
            best = min(best, time.perf_counter() - started)
        costs[str(count)] = round(best * 1000, 2)
    return costs


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()  # before the runs: the load they start under
    with tempfile.TemporaryDirectory() as workdir:
        root, name, label = model_store(args, Path(workdir))
        options = RuntimeOptions(intra_op_threads=args.threads)
        host = ModelHost(ModelStore(root), ["denoiser"], HostSettings(runtime_options=options), names=[name])
        await host.start()
        try:
            served = await host.get(name)
            results = []
            cost = None
            for step_batching in (True, False):
                pipeline = DiffusionPipeline(host, DiffusionSettings(step_batching=step_batching))
                engine = await pipeline.engine(served)
                spec = engine.spec
                condition = spec.class_map_condition(class_map(spec.sample_size, 0, spec.num_classes), None)
                warm = time.perf_counter()
                await engine.sample(condition, SamplingParams(args.steps, "ddim", spec.default_guidance_scale, 0))
                solo_s = time.perf_counter() - warm
                if cost is None:
                    cost = await denoiser_cost_ms(served, spec, (1, 2, 8, 16), 2 if args.quick else 3)
                runs = [
                    (f"{clients} client(s), DDIM {args.steps} steps", [args.steps] * clients,
                     [args.requests_single if clients == 1 else args.requests_per_client] * clients, solo_s / clients)
                    for clients in CLIENTS
                ]
                # Mixed lengths: 1 client of short requests among 7 of long ones (head-of-line blocking test).
                long_steps = args.steps * 2
                runs.append((
                    f"mixed: 1 client DDIM {args.short_steps} steps + 7 clients DDIM {long_steps} steps",
                    [args.short_steps] + [long_steps] * 7,
                    [args.requests_short] + [args.requests_long] * 7,
                    solo_s / 8,
                ))
                for scenario, steps, requests, stagger in runs:
                    result = await run_clients(engine, scenario, steps, requests, stagger)
                    print(json.dumps(asdict(result)), flush=True)
                    results.append(asdict(result))
            return {
                "benchmark": "diffusion serving: step-level vs request-level batching (DiffusionEngine, in-process)",
                "model": label,
                "model_ref": asdict(served.ref),
                "model_training_steps": served.manifest.provenance.get("steps"),
                "sample_size": list(spec.sample_size),
                "scheduler": "ddim",
                "steps": args.steps,
                "guidance_scale": spec.default_guidance_scale,
                "rows_per_sample_step": 1 if spec.default_guidance_scale == 1.0 else 2,
                "max_rows_per_call": engine.config.max_rows,
                "onnxruntime_intra_op_threads": args.threads,
                "arrivals": "closed-loop clients; client i starts i * (solo latency / clients) after client 0",
                "mixed_scenario": "client 0 sends short requests, clients 1-7 long ones (2 x steps); "
                                  "short_latency_* = latency of the short requests only",
                "cpu_cost_per_row_note": "on CPU a denoiser call costs about rows x per-row time, so batching "
                                         "rows changes scheduling (who waits) more than throughput",
                "denoiser_call_ms_by_rows": cost,
                "machine": machine,
                "runs": results,
            }
        finally:
            await host.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests-per-client", type=int, default=3, help="requests per client with 8 clients")
    parser.add_argument("--requests-single", type=int, default=6, help="requests of the single client")
    parser.add_argument("--short-steps", type=int, default=10, help="mixed scenario: steps of the short requests")
    parser.add_argument("--requests-short", type=int, default=4, help="mixed scenario: short requests")
    parser.add_argument("--requests-long", type=int, default=1, help="mixed scenario: long requests per client")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (shared CPU: 1)")
    parser.add_argument("--store", type=Path, default=None, help="another model store (with --model)")
    parser.add_argument("--model", default=SHIPPED_MODEL, help="denoiser (role image_renderer) in --store")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--quick", action="store_true", help="fixture model, 3 steps, 1 request per client (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.requests_per_client, args.requests_single = 3, 1, 2
        args.short_steps, args.requests_short, args.requests_long = 2, 2, 1
    report = asyncio.run(benchmark(args))
    report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
