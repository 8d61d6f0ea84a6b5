"""services.core.metrics: names, exposition validity (promtool), HTTP endpoint."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from services.core import metrics
from services.core.errors import QueueFullError

_NAME = re.compile(r"^histosynth_(grpc|http|model|gpu)_([a-z0-9_]+_)?(total|seconds|bytes|ratio|samples|requests|instances)$")
_ALLOWED_LABELS = {"service", "method", "code", "route", "model", "version", "status", "reason", "device", "runtime", "precision"}


def _families() -> dict[str, object]:
    return {family.name: family for family in metrics.REGISTRY.collect()}


def _record_one_sample_in_every_metric() -> None:
    metrics.GRPC_REQUESTS.labels("histosynth.v1.MaskRendering", "Render", "OK").inc()
    metrics.GRPC_REQUEST_DURATION.labels("histosynth.v1.MaskRendering", "Render").observe(0.012)
    metrics.GRPC_INFLIGHT_REQUESTS.labels("histosynth.v1.MaskRendering").set(3)
    metrics.HTTP_REQUESTS.labels("/v2/models/{name}/infer", "POST", "200").inc()
    metrics.HTTP_REQUEST_DURATION.labels("/v2/models/{name}/infer", "POST").observe(0.02)
    model = metrics.ModelMetrics("test_exposition", "7")
    model.pending_inc(2)
    model.observe_queue_wait(0.002)
    model.record_batch(samples=8, compute_s=0.03)
    model.record_success(total_s=0.035)
    model.record_failure(QueueFullError.reason)
    model.set_instances("cpu", 2)
    model.set_runtimes({("openvino-2026.4.1-CPU-bf16", "bf16"): 2})
    metrics.record_gpu_samples(
        [metrics.GpuSample("cuda:0", utilization_ratio=0.5, memory_used_bytes=2**30, memory_total_bytes=2**34)]
    )
    # Every other labelled family (e.g. not-serving and admission counters other tests normally touch) gets
    # one sample too, so the test does not depend on which tests ran before it.
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            child = value.labels(*["test_exposition"] * len(value._labelnames))
            if hasattr(child, "observe"):
                child.observe(0.01)
            else:
                child.inc()


def test_every_metric_is_named_by_the_convention_with_few_labels() -> None:
    families = _families()
    assert families, "REGISTRY has no metrics"
    for name, family in families.items():
        exposed = name + "_total" if family.type == "counter" else name
        assert _NAME.match(exposed), f"{exposed!r} breaks histosynth_<subsystem>_<name>_<unit>"
    declared = [
        metrics.GRPC_REQUESTS, metrics.GRPC_REQUEST_DURATION, metrics.GRPC_INFLIGHT_REQUESTS,
        metrics.HTTP_REQUESTS, metrics.HTTP_REQUEST_DURATION, metrics.HTTP_INFLIGHT_REQUESTS,
        metrics.MODEL_REQUESTS, metrics.MODEL_PENDING_REQUESTS, metrics.MODEL_QUEUE_DURATION,
        metrics.MODEL_COMPUTE_DURATION, metrics.MODEL_REQUEST_DURATION, metrics.MODEL_BATCH_SIZE,
        metrics.MODEL_INSTANCES, metrics.MODEL_RUNTIME, metrics.GPU_UTILIZATION, metrics.GPU_MEMORY_USED, metrics.GPU_MEMORY_TOTAL,
    ]
    for metric in declared:
        labels = set(metric._labelnames)
        assert labels <= _ALLOWED_LABELS, f"{metric._name}: unexpected labels {labels - _ALLOWED_LABELS}"
        assert len(labels) <= 4


def test_full_exposition_passes_promtool(tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    _record_one_sample_in_every_metric()
    exposition = metrics.render_exposition()
    # Every declared family has at least one sample, so promtool sees all of them.
    parsed = {family.name: family for family in text_string_to_metric_families(exposition.decode())}
    for name, family in parsed.items():
        assert family.samples, f"{name} has no samples in the exposition"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    # promtool prints lint problems (and exits 0 on some versions), so require silence.
    assert result.stdout.strip() == b"" and result.stderr.strip() == b"", result.stdout + result.stderr


def test_model_metrics_record_by_model_version_and_reason() -> None:
    model = metrics.ModelMetrics("test_labels", "3")
    model.record_success(total_s=0.1)
    model.record_failure("deadline_exceeded")
    model.record_failure("deadline_exceeded")
    value = metrics.REGISTRY.get_sample_value
    assert value("histosynth_model_requests_total", {"model": "test_labels", "version": "3", "status": "success", "reason": "none"}) == 1
    assert value("histosynth_model_requests_total", {"model": "test_labels", "version": "3", "status": "failure", "reason": "deadline_exceeded"}) == 2
    assert value("histosynth_model_request_duration_seconds_count", {"model": "test_labels", "version": "3"}) == 1


def test_http_server_serves_registry_on_an_ephemeral_port() -> None:
    metrics.ModelMetrics("test_http", "1").set_instances("cpu", 4)
    endpoint = metrics.start_metrics_http_server("127.0.0.1", 0, sample_gpu=False)
    try:
        assert endpoint.port > 0
        server, thread = endpoint  # unpacks like prometheus_client.start_http_server
        assert thread.is_alive() and server.server_address[1] == endpoint.port
        with urllib.request.urlopen(endpoint.url, timeout=5) as response:
            body = response.read().decode()
        assert 'histosynth_model_instances{device="cpu",model="test_http",version="1"} 4.0' in body
    finally:
        endpoint.close()
    assert not endpoint.thread.is_alive()


def test_http_server_rejects_bad_port() -> None:
    with pytest.raises(ValueError, match="70000"):
        metrics.start_metrics_http_server("127.0.0.1", 70000)


def test_gpu_sampler_starts_only_with_a_gpu() -> None:
    sampler = metrics.GpuMetricsSampler(interval_s=0.05)
    started = sampler.start()
    try:
        if metrics._load_nvml() is None:
            assert started is False
        else:
            assert started is True
    finally:
        sampler.stop()
    with pytest.raises(ValueError, match="interval_s"):
        metrics.GpuMetricsSampler(interval_s=0)
