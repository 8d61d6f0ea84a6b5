"""Every Prometheus metric of histosynth, declared once on one registry.

Names follow ``histosynth_<subsystem>_<name>_<unit>`` and labels stay few
(service, method, code, model, version, status, reason, device) so that cardinality
is bounded by the number of deployed models, RPC methods and devices, never by
request content. The model-level set mirrors Triton's: success/failure by reason,
pending requests, queue/compute/total duration, batch size, instance count and
device utilisation/memory.

Usage from serving code::

    from services.core import metrics
    model_metrics = metrics.ModelMetrics("mask_rendering", "1")
    model_metrics.record_batch(samples=8, compute_s=0.02)
    model_metrics.record_success(total_s=0.021)

Everything is registered on :data:`REGISTRY` (not on prometheus_client's global
default registry), so importing this module twice in tests or embedding the core
in another process never collides with foreign collectors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler
from wsgiref.simple_server import make_server

_log = logging.getLogger(__name__)

REGISTRY: Final = CollectorRegistry(auto_describe=True)

# Latency buckets span sub-millisecond queueing up to a 30 s slow render: the
# interesting band for a GPU batcher is 1 ms .. 1 s, so it gets the most resolution.
LATENCY_BUCKETS_SECONDS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Powers of two: max_batch_size settings are almost always powers of two.
BATCH_SIZE_BUCKETS: Final[tuple[float, ...]] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

STATUS_SUCCESS: Final = "success"
STATUS_FAILURE: Final = "failure"
# Reason label for successful requests; failures use the error's ``reason``
# (see services.core.errors) or REASON_CANCELLED.
REASON_NONE: Final = "none"
REASON_CANCELLED: Final = "cancelled"

# --------------------------------------------------------------------------- gRPC
GRPC_REQUESTS = Counter(
    "histosynth_grpc_requests_total",
    "Finished gRPC calls by service, method and status code name (OK, RESOURCE_EXHAUSTED, ...).",
    ("service", "method", "code"),
    registry=REGISTRY,
)
GRPC_REQUEST_DURATION = Histogram(
    "histosynth_grpc_request_duration_seconds",
    "Wall time of a gRPC call from handler entry to the last response message.",
    ("service", "method"),
    buckets=LATENCY_BUCKETS_SECONDS,
    registry=REGISTRY,
)
GRPC_INFLIGHT_REQUESTS = Gauge(
    "histosynth_grpc_inflight_requests",
    "gRPC calls currently being handled.",
    ("service",),
    registry=REGISTRY,
)

# ---------------------------------------------------------------------- HTTP/REST
# The REST binding (services.core.http_server) beside the gRPC series: same shape, labelled by the matched route
# pattern (e.g. /v2/models/{name}/infer, never the raw path, so the label set stays bounded), the HTTP method and
# the HTTP status code.
HTTP_REQUESTS = Counter(
    "histosynth_http_requests_total",
    "Finished HTTP/REST calls by route pattern, method and HTTP status code.",
    ("route", "method", "code"),
    registry=REGISTRY,
)
HTTP_REQUEST_DURATION = Histogram(
    "histosynth_http_request_duration_seconds",
    "Wall time of an HTTP/REST call from the middleware's entry to the handler's response.",
    ("route", "method"),
    buckets=LATENCY_BUCKETS_SECONDS,
    registry=REGISTRY,
)
HTTP_INFLIGHT_REQUESTS = Gauge(
    "histosynth_http_inflight_requests",
    "HTTP/REST calls currently being handled.",
    registry=REGISTRY,
)

# -------------------------------------------------------------------------- model
MODEL_REQUESTS = Counter(
    "histosynth_model_requests_total",
    "Inference requests finished by the dynamic batcher; status is success or failure, "
    "reason says why a request failed (none on success).",
    ("model", "version", "status", "reason"),
    registry=REGISTRY,
)
MODEL_PENDING_REQUESTS = Gauge(
    "histosynth_model_pending_requests",
    "Requests accepted by the batcher and not yet answered (queued or computing).",
    ("model", "version"),
    registry=REGISTRY,
)
MODEL_QUEUE_DURATION = Histogram(
    "histosynth_model_queue_duration_seconds",
    "Time a request waited in the batcher queue before its batch started computing.",
    ("model", "version"),
    buckets=LATENCY_BUCKETS_SECONDS,
    registry=REGISTRY,
)
MODEL_COMPUTE_DURATION = Histogram(
    "histosynth_model_compute_duration_seconds",
    "Time one merged batch spent in the runtime (one observation per batch).",
    ("model", "version"),
    buckets=LATENCY_BUCKETS_SECONDS,
    registry=REGISTRY,
)
MODEL_REQUEST_DURATION = Histogram(
    "histosynth_model_request_duration_seconds",
    "Time from submit to result for a successful request (queue + compute + split).",
    ("model", "version"),
    buckets=LATENCY_BUCKETS_SECONDS,
    registry=REGISTRY,
)
MODEL_BATCH_SIZE = Histogram(
    "histosynth_model_batch_size_samples",
    "Samples (axis-0 rows) in each merged batch sent to the runtime.",
    ("model", "version"),
    buckets=BATCH_SIZE_BUCKETS,
    registry=REGISTRY,
)
MODEL_INSTANCES = Gauge(
    "histosynth_model_instances",
    "Healthy runtime instances per model and the device they actually run on "
    "(after CPU fallback).",
    ("model", "version", "device"),
    registry=REGISTRY,
)
MODEL_RUNTIME = Gauge(
    "histosynth_model_runtime_instances",
    "Runtime instances of a loaded model by the engine actually used (e.g. CPUExecutionProvider, "
    "openvino-2026.4.1-CPU-bf16; the device is part of it) and the inference precision they run at.",
    ("model", "version", "runtime", "precision"),
    registry=REGISTRY,
)

MODEL_NOT_SERVING = Counter(
    "histosynth_model_not_serving_total",
    "Models found unable to serve as configured at start-up, by reason (checksum_mismatch, load_failed, "
    "device_fallback); with HISTOSYNTH_STRICT_MODELS (default) each makes its server's health NOT_SERVING.",
    ("model", "reason"),
    registry=REGISTRY,
)
MEMORY_REFUSED = Counter(
    "histosynth_model_memory_refused_requests_total",
    "Model calls refused with RESOURCE_EXHAUSTED because their estimated working memory did not fit "
    "HISTOSYNTH_MEMORY_BUDGET.",
    ("model",),
    registry=REGISTRY,
)

# ---------------------------------------------------------------------- diffusion
# The diffusion engine (services/diffusion/engine.py) batches denoising *steps*, not requests;
# its requests are also counted in histosynth_model_requests_total / _request_duration_seconds.
# Under the "model" subsystem (they are per model version); "rows" of a denoiser call are samples
# along axis 0, as in histosynth_model_batch_size_samples.
DIFFUSION_STEPS = Counter(
    "histosynth_model_denoising_steps_total",
    "Denoising steps completed (one per sample per scheduler step; rate() = steps/s).",
    ("model", "version"),
    registry=REGISTRY,
)
DIFFUSION_SAMPLES_IN_FLIGHT = Gauge(
    "histosynth_model_diffusion_in_flight_samples",
    "Samples being denoised right now (admitted to the engine's active set, not finished).",
    ("model", "version"),
    registry=REGISTRY,
)
DIFFUSION_QUEUED_SAMPLES = Gauge(
    "histosynth_model_diffusion_queued_samples",
    "Samples waiting for admission to the engine's active set.",
    ("model", "version"),
    registry=REGISTRY,
)
DIFFUSION_CALL_ROWS = Histogram(
    "histosynth_model_denoiser_call_samples",
    "Rows (samples, doubled by classifier-free guidance) in each denoiser call of the engine.",
    ("model", "version"),
    buckets=BATCH_SIZE_BUCKETS,
    registry=REGISTRY,
)
DIFFUSION_STEP_DURATION = Histogram(
    "histosynth_model_denoising_step_duration_seconds",
    "One engine iteration: a batched denoiser call plus every request's scheduler update.",
    ("model", "version"),
    buckets=LATENCY_BUCKETS_SECONDS,
    registry=REGISTRY,
)


@dataclass(frozen=True)
class DiffusionMetrics:
    """Diffusion-engine metrics bound to one (model, version) label pair."""

    model: str
    version: str

    def record_iteration(self, *, rows: int, steps: int, seconds: float) -> None:
        """One engine iteration: ``rows`` denoiser rows advanced ``steps`` samples by one step."""
        DIFFUSION_CALL_ROWS.labels(self.model, self.version).observe(rows)
        DIFFUSION_STEPS.labels(self.model, self.version).inc(steps)
        DIFFUSION_STEP_DURATION.labels(self.model, self.version).observe(seconds)

    def set_load(self, *, in_flight: int, queued: int) -> None:
        DIFFUSION_SAMPLES_IN_FLIGHT.labels(self.model, self.version).set(in_flight)
        DIFFUSION_QUEUED_SAMPLES.labels(self.model, self.version).set(queued)


# ---------------------------------------------------------------------------- GPU
GPU_UTILIZATION = Gauge(
    "histosynth_gpu_utilization_ratio",
    "GPU compute utilisation over NVML's last sample period, 0..1.",
    ("device",),
    registry=REGISTRY,
)
GPU_MEMORY_USED = Gauge(
    "histosynth_gpu_memory_used_bytes",
    "GPU memory in use (all processes), from NVML.",
    ("device",),
    registry=REGISTRY,
)
GPU_MEMORY_TOTAL = Gauge(
    "histosynth_gpu_memory_total_bytes",
    "GPU memory capacity, from NVML.",
    ("device",),
    registry=REGISTRY,
)


class InferenceStats:
    """Cumulative counts and durations of one model version in this process, in the shape of Triton's
    model statistics (the v2 ModelStatistics RPC reads them; perf_analyzer reports server-side times).

    Prometheus histograms hold the same sums, but not per batch size or the last success time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.queue_count = 0
        self.queue_ns = 0
        self.compute_count = 0  # rows run (each row of a batch counts the batch's duration, as Triton does)
        self.compute_ns = 0
        self.execution_count = 0  # runtime calls (batches)
        self.last_success_ms = 0
        self.batches: dict[int, list[int]] = {}  # batch size -> [count, ns]

    def success(self, seconds: float) -> None:
        with self._lock:
            self.success_count += 1
            self.success_ns += int(seconds * 1e9)
            self.last_success_ms = int(time.time() * 1000)

    def failure(self) -> None:
        with self._lock:
            self.fail_count += 1

    def queued(self, seconds: float) -> None:
        with self._lock:
            self.queue_count += 1
            self.queue_ns += int(seconds * 1e9)

    def batch(self, samples: int, seconds: float) -> None:
        ns = int(seconds * 1e9)
        with self._lock:
            self.execution_count += 1
            self.compute_count += samples
            self.compute_ns += samples * ns
            entry = self.batches.setdefault(samples, [0, 0])
            entry[0] += 1
            entry[1] += ns

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {key: (dict((k, list(v)) for k, v in value.items()) if key == "batches" else value)
                    for key, value in vars(self).items() if not key.startswith("_")}


_STATS: dict[tuple[str, str], InferenceStats] = {}
_STATS_LOCK = threading.Lock()


def inference_stats(model: str, version: str) -> InferenceStats:
    """The process-wide statistics of ``model``/``version`` (created on first use)."""
    with _STATS_LOCK:
        stats = _STATS.get((model, version))
        if stats is None:
            stats = _STATS[(model, version)] = InferenceStats()
        return stats


@dataclass(frozen=True)
class ModelMetrics:
    """Model-level metrics bound to one (model, version) label pair.

    The batcher and the device pool hold one of these instead of repeating label
    values at every call site.
    """

    model: str
    version: str

    def record_success(self, *, total_s: float) -> None:
        """One request answered; ``total_s`` is its submit-to-result time."""
        MODEL_REQUESTS.labels(self.model, self.version, STATUS_SUCCESS, REASON_NONE).inc()
        MODEL_REQUEST_DURATION.labels(self.model, self.version).observe(total_s)
        inference_stats(self.model, self.version).success(total_s)

    def observe_queue_wait(self, seconds: float) -> None:
        """A request left the queue for compute after waiting ``seconds``."""
        MODEL_QUEUE_DURATION.labels(self.model, self.version).observe(seconds)
        inference_stats(self.model, self.version).queued(seconds)

    def record_failure(self, reason: str) -> None:
        """One request failed; ``reason`` is an errors.HistosynthError.reason or REASON_CANCELLED."""
        MODEL_REQUESTS.labels(self.model, self.version, STATUS_FAILURE, reason).inc()
        inference_stats(self.model, self.version).failure()

    def record_batch(self, *, samples: int, compute_s: float) -> None:
        """One merged batch went through the runtime."""
        MODEL_BATCH_SIZE.labels(self.model, self.version).observe(samples)
        MODEL_COMPUTE_DURATION.labels(self.model, self.version).observe(compute_s)
        inference_stats(self.model, self.version).batch(samples, compute_s)

    def pending_inc(self, amount: int = 1) -> None:
        MODEL_PENDING_REQUESTS.labels(self.model, self.version).inc(amount)

    def pending_dec(self, amount: int = 1) -> None:
        MODEL_PENDING_REQUESTS.labels(self.model, self.version).dec(amount)

    def set_instances(self, device: str, count: int) -> None:
        MODEL_INSTANCES.labels(self.model, self.version, device).set(count)

    def set_runtimes(self, counts: Mapping[tuple[str, str], int]) -> None:
        """(runtime, precision) -> instances running with it."""
        for (runtime, precision), count in counts.items():
            MODEL_RUNTIME.labels(self.model, self.version, runtime, precision).set(count)


# ------------------------------------------------------------------ GPU sampling
@dataclass(frozen=True)
class GpuSample:
    """One NVML reading for one GPU; ``device`` uses the runtime spelling ``cuda:<index>``."""

    device: str
    utilization_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int


def record_gpu_samples(samples: Sequence[GpuSample]) -> None:
    """Copy GPU readings into the GPU gauges."""
    for sample in samples:
        GPU_UTILIZATION.labels(sample.device).set(sample.utilization_ratio)
        GPU_MEMORY_USED.labels(sample.device).set(sample.memory_used_bytes)
        GPU_MEMORY_TOTAL.labels(sample.device).set(sample.memory_total_bytes)


def _load_nvml() -> Any | None:
    """Import and initialise NVML; None when the library or a GPU driver is absent.

    Imported lazily because nvidia-ml-py is optional: CPU-only deployments and CI
    have no driver, and the serving path must not need it.
    """
    try:
        import pynvml  # type: ignore[import-not-found]  # provided by nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as error:  # pynvml.NVMLError when the driver library is missing
        _log.info("NVML unavailable, GPU metrics disabled: %s", error)
        return None
    return pynvml


def read_nvml_samples(nvml: Any) -> list[GpuSample]:
    """One reading per visible GPU from an initialised pynvml module."""
    samples = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        samples.append(
            GpuSample(
                device=f"cuda:{index}",
                utilization_ratio=utilization.gpu / 100.0,
                memory_used_bytes=int(memory.used),
                memory_total_bytes=int(memory.total),
            )
        )
    return samples


class GpuMetricsSampler:
    """Background thread refreshing the GPU gauges from NVML every ``interval_s``.

    :meth:`start` returns False (and starts nothing) when no GPU is present, so
    callers can start it unconditionally.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any | None = None

    def start(self) -> bool:
        nvml = _load_nvml()
        if nvml is None or nvml.nvmlDeviceGetCount() == 0:
            return False
        self._nvml = nvml
        self._thread = threading.Thread(target=self._run, name="gpu-metrics-sampler", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        assert self._nvml is not None
        while not self._stop.is_set():
            try:
                record_gpu_samples(read_nvml_samples(self._nvml))
            except Exception:  # a flaky driver read must not kill the sampler
                _log.exception("reading GPU metrics from NVML failed")
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval_s + 1.0)
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


# ------------------------------------------------------------------- exposition
@dataclass
class MetricsHttpServer:
    """A running /metrics endpoint; ``port`` is the bound port (useful when asked for port 0).

    Unpacks as ``server, thread = start_metrics_http_server(...)`` too.
    """

    host: str
    port: int
    server: ThreadingHTTPServer
    thread: threading.Thread
    gpu_sampler: GpuMetricsSampler | None = field(default=None)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.server, self.thread))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; idempotent."""
        if self.gpu_sampler is not None:
            self.gpu_sampler.stop()
            self.gpu_sampler = None
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


def start_metrics_http_server(
    host: str, port: int, *, sample_gpu: bool = True, gpu_interval_s: float = 5.0
) -> MetricsHttpServer:
    """Serve :data:`REGISTRY` over HTTP on a daemon thread.

    ``port=0`` binds an ephemeral port; read it back from the result's ``port``.
    With ``sample_gpu`` the GPU gauges are refreshed from NVML when a GPU is present.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port!r}")
    server, thread = _serve_metrics_only(host, port)
    bound_port = int(server.server_address[1])
    sampler = None
    if sample_gpu:
        sampler = GpuMetricsSampler(gpu_interval_s)
        if not sampler.start():
            sampler = None
    _log.info("metrics endpoint on http://%s:%d/metrics", host, bound_port)
    return MetricsHttpServer(host=host, port=bound_port, server=server, thread=thread, gpu_sampler=sampler)


METRICS_PATH: Final = "/metrics"


def _metrics_only_app(app: Any) -> Any:
    """The exposition at /metrics only: any other path is 404 (a typo'd scrape path must not look healthy)."""

    def routed(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO", "") != METRICS_PATH:
            body = f"not found: histosynth serves Prometheus metrics at {METRICS_PATH}\n".encode()
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return routed


def _serve_metrics_only(host: str, port: int) -> tuple[Any, threading.Thread]:
    """prometheus_client's start_http_server, routed through :func:`_metrics_only_app`."""

    class Server(ThreadingWSGIServer):
        pass

    Server.address_family, addr = _get_best_family(host, port)
    httpd = make_server(addr, port, _metrics_only_app(make_wsgi_app(REGISTRY)), Server, handler_class=_SilentHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="histosynth-metrics", daemon=True)
    thread.start()
    return httpd, thread


def render_exposition() -> bytes:
    """The Prometheus text exposition of every histosynth metric (what /metrics serves)."""
    return generate_latest(REGISTRY)
