"""Serving benchmark: the trained models through ONNX Runtime in-process vs our gRPC services.

    python -m bench.bench_serving [--quick] [--duration S] [--output bench/results/serving.json]

Like perf_analyzer: for each model (Render = renderer-he-nuclei, Refine = mask-refiner), each
size (256x256, 512x1024) and each concurrency (1, 2, 4, 8 closed-loop clients, one image per
request) it measures throughput (images/s) and latency p50/p95/p99 (ms) of

  (a) runtime  ``OnnxRuntime.infer`` on the model tensor, called from N client threads on one
               session loaded through ``ModelStore`` (the model's own cost, nothing else);
  (b) grpc     the MaskRendering / MaskRefinement server started in-process on loopback
               (``servicer.start`` with a ``ServerConfig``), called with ``HistosynthClient``
               from N client threads: uint8 masks in, uint8 images/masks out, so (b) also pays
               for encoding (one-hot, noise label, instance edges), protobuf, HTTP/2 and the
               dynamic batcher. Rendering runs with a tile size of 1024 so both sizes render
               in one piece and (a) and (b) run the same FLOPs (the service's default tiles
               at the model's 128 px training crop, which costs more).

  (c) torchserve  the same ONNX file archived for TorchServe (training/export/torchserve_archive.py,
               deploy/torchserve/handler.py: ONNX Runtime inside a TorchServe Python worker, 1 worker),
               started on loopback (deploy/torchserve/launcher.py) and called over REST with a
               urllib3 connection pool from N client threads: the model tensor in and out as base64
               JSON, so (c) runs the same FLOPs as (a). Its batching config (batchSize x maxBatchDelay)
               is chosen per model by a short trial at one concurrency before the sweep; all trials
               are recorded.

  (d) grpc-ov  the same servers as (b) with HISTOSYNTH_RUNTIME=openvino, HISTOSYNTH_PRECISION=bf16 (the
               fast path; its precision check is recorded beside each manifest), same calls as (b).

and reports b/a, d/a and b/c, d/c per row, with (a), (b), (c) and (d) interleaved in the same run.
Then Triton's own perf_analyzer (``-i grpc --service-kind triton``, the tritonclient 2.45 binary that
scripts/get_perf_analyzer.sh installs) drives the KServe v2 endpoint of the (b) and (d) servers on the
model tensors at 256x256, concurrency 1 and 4; its CSV rows go into the JSON. Same session
settings on all paths (graph optimisation ALL, ONNX Runtime's default intra-op threads = one per core).

Also: the renderer's achieved FLOP/s as a fraction of this machine's matmul peak, measured in
the same run with numpy float32 matmul (FLOPs counted from the ONNX graph: 2 x MACs of every
Conv / ConvTranspose at the given size, after shape inference); and end-to-end generation
samples/s of clients/specs/glands-balanced.yaml through the in-process Generation service.

The host's speed drifts (other jobs share the cores): compare ratios within one run only;
absolute numbers hold for the machine and load average recorded in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime
import urllib3
import yaml

from clients.client import HistosynthClient, spec_from_dict
from services.all_in_one import BackgroundServers
from services.core import mask_ops
from services.core.config import ServerConfig
from services.core.model_store import ModelStore
from services.core.runtimes.base import RuntimeOptions
from services.core.runtimes.onnxruntime import OnnxRuntime
from services.mask_refinement import pipeline as refinement_pipeline
from services.mask_refinement import servicer as refinement_servicer
from services.mask_rendering import servicer as rendering_servicer

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
MODEL_STORE: Final = REPO_ROOT / "model_store"
GLANDS_SPEC: Final = REPO_ROOT / "clients" / "specs" / "glands-balanced.yaml"
DEFAULT_OUTPUT: Final = Path(__file__).parent / "results" / "serving.json"
RENDERER: Final = "renderer-he-nuclei"
REFINER: Final = "mask-refiner"
SIZES: Final = ((256, 256), (512, 1024))
CONCURRENCIES: Final = (1, 2, 4, 8)
# Fields up to this edge render in one piece on the service, as they do on the runtime path.
ONE_PIECE_TILE: Final = 1024
FAST_PATH: Final = {"runtime": "openvino", "precision": "bf16"}
PERF_ANALYZER_HOME: Final = Path(os.environ.get("HISTOSYNTH_PERF_ANALYZER_HOME",
                                                Path.home() / ".cache" / "histosynth" / "perf_analyzer"))
PERF_ANALYZER_CONCURRENCIES: Final = (1, 4)
# TorchServe batching configs tried per model (batchSize, maxBatchDelay ms) at TRIAL_CONCURRENCY and the smaller size.
TORCHSERVE_TRIALS: Final = ((1, 5), (1, 20), (4, 5), (4, 20))
TRIAL_CONCURRENCY: Final = 4


# ----------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "logical_cpus": os.cpu_count(),
        "gpu": "none used (CPU execution provider)",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def matmul_peak_gflops(size: int, seconds: float) -> dict[str, Any]:
    """Best float32 numpy matmul rate over repeated size x size products (the reference 'peak')."""
    rng = np.random.default_rng(0)
    left = rng.standard_normal((size, size), dtype=np.float32)
    right = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), np.float32)
    np.matmul(left, right, out=out)  # warm-up: thread pool start, page faults
    flops = 2.0 * size**3
    best, repeats = 0.0, 0
    stop_at = time.perf_counter() + seconds
    while repeats < 3 or time.perf_counter() < stop_at:
        started = time.perf_counter()
        np.matmul(left, right, out=out)
        best = max(best, flops / (time.perf_counter() - started))
        repeats += 1
    return {"matrix": size, "repeats": repeats, "best_gflops": round(best / 1e9, 1)}


def matmul_peak_auto_coretype(size: int, seconds: float) -> dict[str, Any]:
    """The same measurement in a child process without OPENBLAS_CORETYPE, so OpenBLAS picks its own
    kernel for this CPU (a forced Haswell core type runs AVX2 kernels only: about half on AVX-512)."""
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_CORETYPE"}
    code = (
        "import json, sys; from bench.bench_serving import matmul_peak_gflops; "
        f"print(json.dumps(matmul_peak_gflops({size}, {seconds})))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_peak(seconds: float) -> dict[str, Any]:
    size = 2048
    forced = matmul_peak_gflops(size, seconds)
    auto = matmul_peak_auto_coretype(size, seconds)
    return {
        "method": f"numpy float32 matmul {size}x{size}, best of repeats, 2 threads (OpenBLAS)",
        "this_process": {"OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), **forced},
        "auto_coretype": {"OPENBLAS_CORETYPE": None, **auto},
        "best_gflops": max(forced["best_gflops"], auto["best_gflops"]),
    }


# ----------------------------------------------------------------------- FLOPs
def conv_flops(model_path: Path, input_name: str, shape: tuple[int, ...]) -> dict[str, float]:
    """2 x multiply-accumulates of every Conv / ConvTranspose for one input of ``shape``.

    ONNX shape inference cannot see through the exported reflect pads, so the shapes come
    from running the graph once (optimisations off, every convolution's input and output
    exposed as graph outputs); bias adds and normalisations are not counted.
    """
    model = onnx.load(str(model_path))
    convs = [node for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")]
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    existing = {output.name for output in model.graph.output}
    probes = sorted({name for node in convs for name in (node.input[0], node.output[0])} - existing)
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in probes)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, {input_name: np.zeros(shape, np.float32)})
    shapes = {name: value.shape for name, value in zip(names, values, strict=True)}
    totals = {"Conv": 0, "ConvTranspose": 0}
    for node in convs:
        weight = weights.get(node.input[1])
        if weight is None:
            raise ValueError(f"{model_path}: {node.op_type} {node.name!r} has a non-constant weight {node.input[1]!r}")
        kernel = int(np.prod(weight[2:]))
        if node.op_type == "Conv":  # weight [C_out, C_in/group, k...]: each output element costs C_in/group x k MACs
            macs = int(np.prod(shapes[node.output[0]])) * weight[1] * kernel
        else:  # weight [C_in, C_out/group, k...]: each input element scatters into C_out/group x k outputs
            macs = int(np.prod(shapes[node.input[0]])) * weight[1] * kernel
        totals[node.op_type] += macs
    return {
        "conv_gflop": round(2 * totals["Conv"] / 1e9, 2),
        "convtranspose_gflop": round(2 * totals["ConvTranspose"] / 1e9, 2),
        "total_gflop": round(2 * sum(totals.values()) / 1e9, 2),
    }


# ----------------------------------------------------------------------- inputs
def class_map(height: int, width: int, num_classes: int, seed: int) -> np.ndarray:
    """uint8 class ids in 8 x 8 px blocks: a layout with many region edges, like dense nuclei."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_classes, size=(height // 8, width // 8), dtype=np.uint8)
    return np.kron(coarse, np.ones((8, 8), np.uint8))


def tissue_mask(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 {0, 1} coarse tissue mask in 16 x 16 px blocks."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 16, width // 16)) < 0.6).astype(np.uint8)
    return np.kron(coarse, np.ones((16, 16), np.uint8))


@dataclass(frozen=True)
class Workload:
    """One model at one size: the runtime's feed and the service call's input."""

    task: str  # "Render" or "Refine"
    model: str
    height: int
    width: int
    runtime_feeds: dict[str, np.ndarray]
    service_input: np.ndarray


def render_workload(manifest: Any, height: int, width: int) -> Workload:
    num_classes = int(manifest.metadata["num_classes"])
    classes = class_map(height, width, num_classes, seed=height + width)
    noise = mask_ops.noise_label((height, width), float(manifest.metadata["noise_spacing"]), 0)
    edges = mask_ops.instance_edges(classes)
    label = mask_ops.build_generator_input(classes, num_classes, noise, edges)[None].astype(np.float32)
    return Workload("Render", manifest.name, height, width, {manifest.inputs[0].name: label}, classes[None])


def refine_workload(manifest: Any, height: int, width: int) -> Workload:
    """The refiner's input as the service encodes it (v2: coarse, guide, noise channels; no guide sent)."""
    mask = tissue_mask(height, width, seed=height + width)
    channels = [str(c) for c in manifest.metadata.get("input_channels") or ["coarse"]]
    coarse = refinement_pipeline.encode_input(channels, mask[None], None, seed=0)
    return Workload("Refine", manifest.name, height, width, {manifest.inputs[0].name: coarse}, mask[None])


# ----------------------------------------------------------------------- load generator
@dataclass(frozen=True)
class RunResult:
    task: str
    model: str
    size: str
    mode: str
    concurrency: int
    requests: int
    seconds: float
    images_per_s: float
    latency_ms: dict[str, float]
    load_average_1min_at_start: float


def summarize(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000.0
    return {name: round(float(np.percentile(values, q)), 1) for name, q in (("p50", 50), ("p95", 95), ("p99", 99))}


def closed_loop(call: Callable[[], object], concurrency: int, duration_s: float) -> tuple[list[float], float]:
    """``concurrency`` client threads, each sending the next request when its last one returns.

    Every client completes at least one request, so slow rows still get ``concurrency`` samples;
    throughput counts requests finished over the wall time until the last client stops.
    """
    latencies: list[float] = []
    lock = threading.Lock()
    start_barrier = threading.Barrier(concurrency + 1)
    stop_at = 0.0

    def client() -> None:
        start_barrier.wait()
        mine: list[float] = []
        while not mine or time.perf_counter() < stop_at:
            started = time.perf_counter()
            call()
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="client") as pool:
        futures = [pool.submit(client) for _ in range(concurrency)]
        stop_at = time.perf_counter() + duration_s
        started = time.perf_counter()
        start_barrier.wait()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - started
    return latencies, elapsed


def paired_sweep(
    workload: Workload, calls: dict[str, Callable[[], object]], duration_s: float, rounds: int
) -> list[RunResult]:
    """Every mode at each concurrency, interleaved in short rounds (a b c, c b a, a b c, ...).

    The cores are shared with other jobs whose load swings by 2x within seconds, so running
    all of (a) and then all of (b) would measure the neighbours, not the paths. Rounds stop
    once each mode has had ``duration_s`` (a slow row gets one round per mode: every client
    must finish one request).
    """
    for call in calls.values():
        call()  # warm-up: the first run of a shape allocates ONNX Runtime's buffers
    results = []
    for concurrency in CONCURRENCIES:
        latencies: dict[str, list[float]] = {mode: [] for mode in calls}
        seconds = {mode: 0.0 for mode in calls}
        load_1min = load_average()[0]
        for round_index in range(rounds):
            order = list(calls) if round_index % 2 == 0 else list(reversed(calls))
            for mode in order:
                round_latencies, round_seconds = closed_loop(calls[mode], concurrency, duration_s / rounds)
                latencies[mode] += round_latencies
                seconds[mode] += round_seconds
            if min(seconds.values()) >= duration_s:
                break
        for mode in calls:
            result = RunResult(
                workload.task, workload.model, f"{workload.height}x{workload.width}", mode, concurrency,
                len(latencies[mode]), round(seconds[mode], 3), round(len(latencies[mode]) / seconds[mode], 2),
                summarize(latencies[mode]), load_1min,
            )
            print(f"  {result.task:6s} {result.size:8s} {mode:7s} c={concurrency}: {result.images_per_s:7.2f} img/s "
                  f"p50 {result.latency_ms['p50']:8.1f} ms (n={result.requests}, load {load_1min})", flush=True)
            results.append(result)
    return results


# ----------------------------------------------------------------------- servers
class LoopThread:
    """An asyncio event loop in a daemon thread, so blocking client threads can call its servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-servers", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def server_config(**overrides: Any) -> ServerConfig:
    return ServerConfig(model_store=MODEL_STORE, port=0, metrics_port=None, log_level="WARNING", **overrides)


# ----------------------------------------------------------------------- perf_analyzer
def perf_analyzer_command() -> tuple[list[str], dict[str, str]] | None:
    """The perf_analyzer binary and its environment (scripts/get_perf_analyzer.sh), or None when absent."""
    binary = PERF_ANALYZER_HOME / "bin" / "perf_analyzer"
    if not binary.is_file():
        found = shutil.which("perf_analyzer")
        if found is None:
            return None
        return [found], dict(os.environ)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(PERF_ANALYZER_HOME / "lib"), env.get("LD_LIBRARY_PATH")]))
    return [str(binary)], env


def perf_analyzer_version(command: tuple[list[str], dict[str, str]]) -> str:
    done = subprocess.run([*command[0], "--version"], env=command[1], capture_output=True, text=True, timeout=30)
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "unknown"


def run_perf_analyzer(command: tuple[list[str], dict[str, str]], address: str, workload: Workload,
                      concurrency: int, interval_ms: int, scratch: Path) -> dict[str, Any]:
    """perf_analyzer against our KServe v2 endpoint with the workload's own tensor (JSON input data)."""
    name, tensor = next(iter(workload.runtime_feeds.items()))
    data = scratch / f"{workload.model}-{workload.height}x{workload.width}.json"
    if not data.exists():
        data.write_text(json.dumps({"data": [{name: {"content": tensor[0].reshape(-1).tolist(),
                                                     "shape": list(tensor.shape[1:])}}]}))
    csv = scratch / f"pa-{workload.model}-{concurrency}-{time.monotonic_ns()}.csv"
    args = [*command[0], "-m", workload.model, "-u", address, "-i", "grpc", "--service-kind", "triton",
            "-b", "1", "--input-data", str(data), "--concurrency-range", str(concurrency),
            "--measurement-interval", str(interval_ms), "--stability-percentage", "30", "--max-trials", "6",
            "-f", str(csv), "--verbose-csv"]
    done = subprocess.run(args, env=command[1], capture_output=True, text=True, timeout=600)
    result: dict[str, Any] = {"model": workload.model, "size": f"{workload.height}x{workload.width}",
                              "concurrency": concurrency, "command": " ".join(args[1:]), "returncode": done.returncode}
    if csv.exists():
        header, *rows = [line.split(",") for line in csv.read_text().splitlines() if line.strip()]
        if rows:
            result["csv"] = dict(zip(header, rows[0], strict=False))
            result["images_per_s"] = float(result["csv"]["Inferences/Second"])
            result["p50_ms"] = round(float(result["csv"]["p50 latency"]) / 1000, 1)
    # Notes on unstable windows are expected on this shared machine; keep the tail of the output.
    result["output_tail"] = (done.stdout + done.stderr)[-1500:]
    return result


# ----------------------------------------------------------------------- torchserve
def torchserve_missing() -> str | None:
    """Why (c) cannot run here, or None when java and torchserve are both installed."""
    if shutil.which("java") is None:
        return "java (JDK 17) is not on PATH"
    try:
        from deploy.torchserve.launcher import torchserve_executable
    except ImportError as error:  # psutil comes with torchserve
        return f"torchserve is not installed ({error})"
    if torchserve_executable() is None:
        return "torchserve is not installed"
    return None


class TorchServeCaller:
    """POSTs one model tensor as the handler's JSON to /predictions/<model> and decodes the reply tensor.

    The request body is encoded once per workload (the runtime path gets its tensor ready-made too);
    the reply is decoded on every call, as the gRPC client decodes its images.
    """

    def __init__(self, pool: urllib3.PoolManager, url: str, feeds: dict[str, np.ndarray], output: str) -> None:
        self._pool, self._url, self._output = pool, url, output
        self._body = json.dumps({"inputs": {name: wire_tensor(array) for name, array in feeds.items()}}).encode()

    def __call__(self) -> np.ndarray:
        response = self._pool.request("POST", self._url, body=self._body,
                                      headers={"Content-Type": "application/json"}, timeout=600.0)
        if response.status != 200:
            raise RuntimeError(f"TorchServe {self._url} answered {response.status}: {response.data[:500]!r}")
        tensor = json.loads(response.data)["outputs"][self._output]
        raw = base64.b64decode(tensor["data"])
        return np.frombuffer(raw, np.dtype(tensor["dtype"]).newbyteorder("<")).reshape(tensor["shape"])


def wire_tensor(array: np.ndarray) -> dict[str, object]:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": base64.b64encode(little.tobytes()).decode()}


def start_torchserve(manifests: dict[str, Any], settings: dict[str, tuple[int, int]], work_dir: Path) -> Any:
    """Archive each model with its (batchSize, maxBatchDelay ms) and start TorchServe serving them."""
    from deploy.torchserve import launcher
    from training.export.torchserve_archive import ArchiveSettings, build_archive

    store = work_dir / "store"
    archives = {}
    for name, manifest in manifests.items():
        batch_size, delay_ms = settings[name]
        archive = build_archive(manifest, store, ArchiveSettings(batch_size=batch_size, max_batch_delay_ms=delay_ms))
        archives[name] = archive.name
    return launcher.start(store, archives, work_dir / "server", ready_timeout_s=90.0)


def torchserve_callers(server: Any, pool: urllib3.PoolManager, workloads: list[Workload],
                       manifests: dict[str, Any]) -> dict[tuple[str, int, int], TorchServeCaller]:
    return {
        (w.model, w.height, w.width): TorchServeCaller(pool, server.prediction_url(w.model), w.runtime_feeds,
                                                       manifests[w.model].outputs[0].name)
        for w in workloads
    }


def torchserve_trials(manifests: dict[str, Any], workloads: list[Workload], duration_s: float,
                      work_root: Path) -> tuple[dict[str, tuple[int, int]], list[dict[str, Any]]]:
    """Each batching config at TRIAL_CONCURRENCY on each model's smaller workload; the fastest per model."""
    smallest = [w for w in workloads if (w.height, w.width) == SIZES[0]]
    trials = []
    for batch_size, delay_ms in TORCHSERVE_TRIALS:
        settings = {name: (batch_size, delay_ms) for name in manifests}
        server = start_torchserve(manifests, settings, work_root / f"trial-b{batch_size}-d{delay_ms}")
        try:
            with urllib3.PoolManager(maxsize=max(CONCURRENCIES)) as pool:
                callers = torchserve_callers(server, pool, smallest, manifests)
                for workload in smallest:
                    call = callers[(workload.model, workload.height, workload.width)]
                    call()  # warm-up
                    latencies, seconds = closed_loop(call, TRIAL_CONCURRENCY, duration_s)
                    trial = {
                        "model": workload.model, "size": f"{workload.height}x{workload.width}",
                        "concurrency": TRIAL_CONCURRENCY, "batch_size": batch_size, "max_batch_delay_ms": delay_ms,
                        "requests": len(latencies), "seconds": round(seconds, 3),
                        "images_per_s": round(len(latencies) / seconds, 2), "latency_ms": summarize(latencies),
                        "load_average_1min": load_average()[0],
                    }
                    print(f"  trial {workload.task:6s} batchSize {batch_size} maxBatchDelay {delay_ms:2d} ms: "
                          f"{trial['images_per_s']:7.2f} img/s p50 {trial['latency_ms']['p50']:8.1f} ms", flush=True)
                    trials.append(trial)
        finally:
            server.stop()
    best = {}
    for name in manifests:
        fastest = max((t for t in trials if t["model"] == name), key=lambda t: t["images_per_s"])
        best[name] = (fastest["batch_size"], fastest["max_batch_delay_ms"])
    return best, trials


def perf_analyzer_runs(addresses: dict[str, tuple[str, str]], workloads: list[Workload],
                       duration_s: float) -> dict[str, Any]:
    """perf_analyzer on each server's v2 endpoint: (render address, refine address) per mode."""
    command = perf_analyzer_command()
    if command is None:
        print("perf_analyzer skipped: not installed (scripts/get_perf_analyzer.sh)", flush=True)
        return {"status": "not measured", "reason": f"no perf_analyzer in {PERF_ANALYZER_HOME}/bin or on PATH "
                "(scripts/get_perf_analyzer.sh installs it)"}
    runs = []
    interval_ms = int(max(1000, duration_s * 1000 / 2))
    with tempfile.TemporaryDirectory(prefix="bench-pa-") as scratch:
        for mode, (render_address, refine_address) in addresses.items():
            for workload in workloads:
                address = render_address if workload.task == "Render" else refine_address
                for concurrency in PERF_ANALYZER_CONCURRENCIES:
                    run = {"mode": mode, "task": workload.task,
                           **run_perf_analyzer(command, address, workload, concurrency, interval_ms, Path(scratch))}
                    print(f"  perf_analyzer {mode:7s} {workload.task:6s} c={concurrency}: "
                          f"{run.get('images_per_s', 'failed')} infer/s p50 {run.get('p50_ms', '-')} ms "
                          f"(rc {run['returncode']})", flush=True)
                    runs.append(run)
    return {"status": "measured", "version": perf_analyzer_version(command),
            "how": "perf_analyzer -i grpc --service-kind triton against the KServe v2 endpoint of the (b) and (d) "
            "servers, batch 1, the workload's model tensor as --input-data JSON, time windows of "
            f"{interval_ms} ms, stability 30 %, at most 6 trials (the host is shared)", "runs": runs}


# ----------------------------------------------------------------------- generation
def generation_rate(count: int, warmup: int) -> dict[str, Any]:
    """Samples/s of the glands spec streamed from the in-process Generation service (gRPC, loopback)."""
    data = yaml.safe_load(GLANDS_SPEC.read_text(encoding="utf-8"))
    config = server_config()
    with BackgroundServers(config, services=("generation",), ports={"generation": 0}) as servers:
        with HistosynthClient(target=servers.addresses["generation"], timeout=600) as client:
            for _ in client.generate(spec_from_dict(data, count=warmup)):
                pass
            started = time.perf_counter()
            samples = list(client.generate(spec_from_dict(data, count=count)))
            seconds = time.perf_counter() - started
    if len(samples) != count or not all(sample.image_png for sample in samples):
        raise RuntimeError(f"generation returned {len(samples)} samples (wanted {count}) or an empty image")
    return {
        "spec": str(GLANDS_SPEC.relative_to(REPO_ROOT)),
        "path": "HistosynthClient.generate -> in-process Generation server (loopback gRPC), "
        "service defaults (renderer-he-glands in tiles of its tile_size; every sample returns a PNG image, "
        "mask and instances)",
        "size": f"{data['height']}x{data['width']}",
        "samples": len(samples),
        "seconds": round(seconds, 2),
        "samples_per_s": round(len(samples) / seconds, 3),
        "score_keys": sorted(samples[0].scores),
    }


# ----------------------------------------------------------------------- main
def run(duration_s: float, rounds: int, generation_count: int, peak_seconds: float) -> dict[str, Any]:
    load_at_start = load_average()
    store = ModelStore(MODEL_STORE)
    render_manifest, refine_manifest = store.get(RENDERER), store.get(REFINER)

    print("matmul peak ...", flush=True)
    peak = measure_peak(peak_seconds)
    print(f"  numpy float32 matmul: {peak['best_gflops']} GFLOP/s (forced core type "
          f"{peak['this_process']['best_gflops']}, auto {peak['auto_coretype']['best_gflops']})", flush=True)

    workloads = [
        factory(manifest, height, width)
        for factory, manifest in ((render_workload, render_manifest), (refine_workload, refine_manifest))
        for height, width in SIZES
    ]

    manifests = {manifest.name: manifest for manifest in (render_manifest, refine_manifest)}
    torchserve_reason = torchserve_missing()
    torchserve_scratch = tempfile.TemporaryDirectory(prefix="bench-torchserve-")
    torchserve_server: Any = None
    torchserve_pool: urllib3.PoolManager | None = None
    torchserve_best: dict[str, tuple[int, int]] = {}
    trials: list[dict[str, Any]] = []
    if torchserve_reason is None:
        print(f"(c) TorchServe batching trials at concurrency {TRIAL_CONCURRENCY} ...", flush=True)
        torchserve_best, trials = torchserve_trials(manifests, workloads, duration_s, Path(torchserve_scratch.name))
        print(f"  best (batchSize, maxBatchDelay ms) per model: {torchserve_best}", flush=True)
        torchserve_server = start_torchserve(manifests, torchserve_best, Path(torchserve_scratch.name) / "sweep")
        torchserve_pool = urllib3.PoolManager(maxsize=max(CONCURRENCIES))
    else:
        print(f"(c) TorchServe skipped: {torchserve_reason}", flush=True)

    results: list[RunResult] = []
    print("(a) ONNX Runtime in-process vs (b) gRPC services vs (c) TorchServe, on loopback, interleaved ...",
          flush=True)
    options = RuntimeOptions()
    runtimes = {
        manifest.name: OnnxRuntime(manifest.path, manifest.inputs, manifest.outputs, "cpu", options)
        for manifest in (render_manifest, refine_manifest)
    }
    loop = LoopThread()
    config = server_config()
    render_settings = rendering_servicer.RenderingSettings(tile_size=ONE_PIECE_TILE)
    render_server, _ = loop.run(rendering_servicer.start(config, store, render_settings))
    refine_server, _ = loop.run(refinement_servicer.start(config, store))
    client = HistosynthClient(targets={"rendering": render_server.address, "refinement": refine_server.address},
                              timeout=600)
    fast_config = server_config(runtime=FAST_PATH["runtime"], precision=FAST_PATH["precision"])
    fast_render_server, fast_render_host = loop.run(rendering_servicer.start(fast_config, store, render_settings))
    fast_refine_server, fast_refine_host = loop.run(refinement_servicer.start(fast_config, store))
    fast_runtimes = {model.manifest.name: [info.provider for info in model.pool.instances]
                     for host in (fast_render_host, fast_refine_host) for model in host.loaded()}
    print(f"  (d) fast path runtimes: {fast_runtimes}", flush=True)
    fast_client = HistosynthClient(targets={"rendering": fast_render_server.address,
                                            "refinement": fast_refine_server.address}, timeout=600)
    perf_analyzer: dict[str, Any] = {}
    try:
        ts_callers = (torchserve_callers(torchserve_server, torchserve_pool, workloads, manifests)
                      if torchserve_server is not None and torchserve_pool is not None else {})
        for workload in workloads:
            runtime = runtimes[workload.model]
            if workload.task == "Render":
                service_call = lambda w=workload: client.render(w.service_input, model=w.model, seed=0)  # noqa: E731
                fast_call = lambda w=workload: fast_client.render(w.service_input, model=w.model, seed=0)  # noqa: E731
            else:
                service_call = lambda w=workload: client.refine(w.service_input, model=w.model)  # noqa: E731
                fast_call = lambda w=workload: fast_client.refine(w.service_input, model=w.model)  # noqa: E731
            calls = {"runtime": lambda r=runtime, w=workload: r.infer(w.runtime_feeds), "grpc": service_call,
                     "grpc-ov": fast_call}
            if ts_callers:
                calls["torchserve"] = ts_callers[(workload.model, workload.height, workload.width)]
            results += paired_sweep(workload, calls, duration_s, rounds)
        perf_analyzer = perf_analyzer_runs(
            {"grpc": (render_server.address, refine_server.address),
             "grpc-ov": (fast_render_server.address, fast_refine_server.address)},
            [w for w in workloads if (w.height, w.width) == SIZES[0]], duration_s,
        )
    finally:
        client.close()
        fast_client.close()
        for server in (render_server, refine_server, fast_render_server, fast_refine_server):
            loop.run(server.stop(0))
        loop.close()
        for runtime in runtimes.values():
            runtime.close()
        if torchserve_pool is not None:
            torchserve_pool.clear()
        if torchserve_server is not None:
            killed = torchserve_server.stop()
            if killed:
                print(f"  TorchServe processes killed after --stop: {killed}", flush=True)
        torchserve_scratch.cleanup()

    peak_end = measure_peak(peak_seconds)
    print(f"  matmul peak again: {peak_end['best_gflops']} GFLOP/s", flush=True)

    print("end-to-end generation ...", flush=True)
    generation = generation_rate(generation_count, warmup=2)
    print(f"  {generation['samples_per_s']} samples/s", flush=True)

    flops = {
        f"{h}x{w}": conv_flops(render_manifest.path, render_manifest.inputs[0].name,
                               (1, render_manifest.inputs[0].shape[1], h, w))
        for h, w in SIZES
    }
    # The neighbours' load moves the measured peak too: the higher of the two readings is the
    # closer estimate of what the cores can do, and gives the conservative (lower) fraction.
    peak_gflops = max(peak["best_gflops"], peak_end["best_gflops"])
    rows = []
    by_key = {(r.task, r.size, r.mode, r.concurrency): r for r in results}
    for r in results:
        if r.mode != "runtime":
            continue
        grpc_result = by_key[(r.task, r.size, "grpc", r.concurrency)]
        row: dict[str, Any] = {
            "task": r.task, "model": r.model, "size": r.size, "concurrency": r.concurrency,
            "runtime": asdict(r), "grpc": asdict(grpc_result),
            "throughput_ratio_b_over_a": round(grpc_result.images_per_s / r.images_per_s, 3),
            "p50_ratio_b_over_a": round(grpc_result.latency_ms["p50"] / r.latency_ms["p50"], 3),
        }
        fast_result = by_key.get((r.task, r.size, "grpc-ov", r.concurrency))
        if fast_result is not None:
            row["grpc_openvino_bf16"] = asdict(fast_result)
            row["throughput_ratio_d_over_a"] = round(fast_result.images_per_s / r.images_per_s, 3)
        torchserve_result = by_key.get((r.task, r.size, "torchserve", r.concurrency))
        if torchserve_result is not None:
            row["torchserve"] = asdict(torchserve_result)
            row["torchserve_batching"] = dict(zip(("batch_size", "max_batch_delay_ms"), torchserve_best[r.model],
                                                  strict=True))
            row["throughput_ratio_b_over_c"] = round(grpc_result.images_per_s / torchserve_result.images_per_s, 3)
            row["p50_ratio_b_over_c"] = round(grpc_result.latency_ms["p50"] / torchserve_result.latency_ms["p50"], 3)
            if fast_result is not None:
                row["throughput_ratio_d_over_c"] = round(fast_result.images_per_s / torchserve_result.images_per_s, 3)
        if r.task == "Render":
            gflop = flops[r.size]["total_gflop"]
            row["runtime_gflops"] = round(gflop * r.images_per_s, 1)
            row["runtime_fraction_of_peak"] = round(gflop * r.images_per_s / peak_gflops, 3)
            row["grpc_fraction_of_peak"] = round(gflop * grpc_result.images_per_s / peak_gflops, 3)
        rows.append(row)

    return {
        "benchmark": "bench.bench_serving",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_1_5_15": {"start": load_at_start, "end": load_average()},
        "note": "cores shared with other jobs; compare ratios within this run only, absolute numbers hold "
        "for this machine and load",
        "settings": {
            "duration_s_per_configuration_and_mode": duration_s,
            "interleaving": f"up to {rounds} alternating rounds per row (a b c, c b a, ...); a slow row gets "
            "one round per mode because every client finishes at least one request",
            "concurrencies": list(CONCURRENCIES),
            "images_per_request": 1,
            "runtime": "OnnxRuntime via ModelStore, CPU, graph optimisation ALL, intra_op_threads 0 (one per core)",
            "grpc": "servicer.start(ServerConfig(port=0, defaults: max_batch_size 8, max_queue_delay_ms 5, "
            "1 instance per device)), HistosynthClient on loopback, uint8 masks in, raw uint8 out; "
            f"rendering tile_size {ONE_PIECE_TILE} (one piece at both sizes)",
            "grpc-ov": "as grpc with ServerConfig(runtime='openvino', precision='bf16'): OpenVINO bf16 behind the same "
            "servicers (allowed by each model's precision_checks.yaml)",
            "torchserve": "torchserve --start on loopback (deploy/torchserve/launcher.py), .mar of the same ONNX "
            "file with deploy/torchserve/handler.py (ONNX Runtime, graph optimisation ALL, intra_op_threads 0), "
            "1 worker per model, batching per model from the trials; urllib3 PoolManager from N client threads, "
            "REST POST /predictions/<model>, model tensor in/out as base64 JSON (body encoded once per workload, "
            "reply decoded per call)",
        },
        "matmul_peak": peak,
        "matmul_peak_after_sweeps": peak_end,
        "peak_gflops_used_for_fractions": peak_gflops,
        "renderer_flops": {"model": RENDERER, "counted": "2 x MACs of Conv and ConvTranspose", **flops},
        "rows": rows,
        "fast_path": {**FAST_PATH, "runtimes": fast_runtimes},
        "perf_analyzer": perf_analyzer,
        "generation": generation,
        "torchserve": torchserve_summary(torchserve_reason, torchserve_best, trials),
    }


def torchserve_summary(reason: str | None, best: dict[str, tuple[int, int]],
                       trials: list[dict[str, Any]]) -> dict[str, Any]:
    if reason is not None:
        return {"status": "not measured", "reason": reason}
    return {
        "status": "measured",
        "version": torchserve_version(),
        "batching_trials": {
            "configs_batch_size_x_max_batch_delay_ms": [list(config) for config in TORCHSERVE_TRIALS],
            "concurrency": TRIAL_CONCURRENCY,
            "size": f"{SIZES[0][0]}x{SIZES[0][1]}",
            "chosen_by": "highest images/s per model",
            "results": trials,
        },
        "chosen": {name: {"batch_size": b, "max_batch_delay_ms": d} for name, (b, d) in best.items()},
        "workers_per_model": 1,
    }


def torchserve_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torchserve")
    except Exception:  # noqa: BLE001 - metadata is informational only
        return None


def markdown_table(report: dict[str, Any]) -> str:
    peak = report["matmul_peak"]["best_gflops"]
    used = report["peak_gflops_used_for_fractions"]
    lines = [
        f"Machine: {report['machine']['cpu']}, {report['machine']['logical_cpus']} cores, no GPU; "
        f"onnxruntime {report['machine']['onnxruntime']}; load average at start "
        f"{report['load_average_1_5_15']['start'][0]}, end {report['load_average_1_5_15']['end'][0]}; "
        f"{report['timestamp']}. numpy fp32 matmul peak measured in this run: {peak} GFLOP/s before the sweeps, "
        f"{report['matmul_peak_after_sweeps']['best_gflops']} after; FLOP/s fractions use the higher, {used}.",
        "",
        "| Task | Size | Conc. | (a) ORT img/s | (a) p50/p95/p99 ms | (b) gRPC img/s | (b) p50/p95/p99 ms "
        "| (d) gRPC OpenVINO bf16 img/s | (d) p50 ms "
        "| (c) TorchServe img/s | (c) p50/p95/p99 ms | b/a img/s | d/a img/s | b/c img/s | d/c img/s | n a/b/c/d "
        "| Renderer FLOP/s / peak (a) | load 1 min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        a, b = row["runtime"], row["grpc"]
        fraction = f"{row['runtime_fraction_of_peak']:.0%}" if "runtime_fraction_of_peak" in row else "–"
        lat = lambda r: "/".join(f"{r['latency_ms'][k]:.0f}" for k in ("p50", "p95", "p99"))  # noqa: E731
        c = row.get("torchserve")
        c_rate, c_lat, b_over_c = (
            (f"{c['images_per_s']:.2f}", lat(c), f"{row['throughput_ratio_b_over_c']:.2f}") if c else ("–", "–", "–")
        )
        d = row.get("grpc_openvino_bf16")
        d_rate, d_lat = (f"{d['images_per_s']:.2f}", f"{d['latency_ms']['p50']:.0f}") if d else ("–", "–")
        d_over_a = f"{row['throughput_ratio_d_over_a']:.2f}" if d else "–"
        d_over_c = f"{row['throughput_ratio_d_over_c']:.2f}" if "throughput_ratio_d_over_c" in row else "–"
        counts = "/".join(str(r["requests"]) for r in (a, b, c, d) if r)
        lines.append(
            f"| {row['task']} | {row['size']} | {row['concurrency']} | {a['images_per_s']:.2f} | {lat(a)} "
            f"| {b['images_per_s']:.2f} | {lat(b)} | {d_rate} | {d_lat} | {c_rate} | {c_lat} "
            f"| {row['throughput_ratio_b_over_a']:.2f} | {d_over_a} | {b_over_c} | {d_over_c} | {counts} | {fraction} "
            f"| {a['load_average_1min_at_start']:.1f} |"
        )
    flops = report["renderer_flops"]
    generation = report["generation"]
    lines += [
        "",
        f"Renderer FLOPs (Conv+ConvTranspose, 2xMAC): {flops['256x256']['total_gflop']} GFLOP at 256x256, "
        f"{flops['512x1024']['total_gflop']} GFLOP at 512x1024.",
        f"End-to-end generation ({generation['spec']}, {generation['size']}, in-process Generation service): "
        f"{generation['samples_per_s']} samples/s ({generation['samples']} samples in {generation['seconds']} s).",
        torchserve_line(report["torchserve"]),
        perf_analyzer_line(report.get("perf_analyzer") or {"status": "not measured", "reason": "not run"}),
    ]
    return "\n".join(lines)


def perf_analyzer_line(pa: dict[str, Any]) -> str:
    if pa.get("status") != "measured":
        return f"perf_analyzer: {pa.get('status')} ({pa.get('reason')})."
    parts = [f"{r['task']} {r['size']} {r['mode']} c={r['concurrency']}: "
             + (f"{r['images_per_s']:.2f} infer/s, p50 {r['p50_ms']} ms" if "images_per_s" in r else f"failed (rc {r['returncode']})")
             for r in pa["runs"]]
    return f"perf_analyzer ({pa['version']}, -i grpc --service-kind triton, v2 endpoint): " + "; ".join(parts) + "."


def torchserve_line(torchserve: dict[str, Any]) -> str:
    if torchserve["status"] != "measured":
        return f"TorchServe: {torchserve['status']} ({torchserve['reason']})."
    trials = torchserve["batching_trials"]
    tried = "; ".join(
        f"{t['model']} b{t['batch_size']}/{t['max_batch_delay_ms']}ms {t['images_per_s']:.2f} img/s" for t in trials["results"]
    )
    chosen = ", ".join(f"{name} batchSize {c['batch_size']} maxBatchDelay {c['max_batch_delay_ms']} ms"
                       for name, c in torchserve["chosen"].items())
    return (f"TorchServe {torchserve['version']}, 1 worker per model; batching chosen: {chosen} "
            f"(trials at concurrency {trials['concurrency']}, {trials['size']}: {tried}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short configurations (about 1.5 s each)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per configuration")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    duration = args.duration if args.duration is not None else (1.5 if args.quick else 4.0)
    report = run(duration, rounds=3 if args.quick else 4, generation_count=6 if args.quick else 12, peak_seconds=1.5 if args.quick else 3.0)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print()
    print(markdown_table(report))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
