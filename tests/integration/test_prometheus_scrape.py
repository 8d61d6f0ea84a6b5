"""A real Prometheus scrapes a real histosynth server, and answers a latency-quantile query.

The server is services.core.grpc_server.start_server on loopback with a small echo servicer, so
calls pass through the same interceptor that records histosynth_grpc_request_duration_seconds
for every service. Prometheus (the Debian package, /usr/bin/prometheus) runs with the shipped
deploy/prometheus/prometheus.yml, its targets pointed at that server and its interval cut to 1 s,
on a free loopback port with a temporary TSDB. The test drives calls until
histogram_quantile(0.9, ...) over the scraped buckets is a finite number.

Skips when the prometheus/promtool binaries are missing (scripts/ensure_system_deps.sh installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.core.config import ServerConfig
from services.core.grpc_server import RunningServer, ServiceRegistration, start_server

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ECHO_SERVICE = "histosynth.test.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
P90_QUERY = "histogram_quantile(0.9, sum by (le) (rate(histosynth_grpc_request_duration_seconds_bucket[1m])))"
SCRAPE_DEADLINE_S = 30.0

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
PROMTOOL = shutil.which("promtool")


class EchoServicer:
    """Answers with the request bytes after a short, call-dependent pause (spreads the latency buckets)."""

    def __init__(self) -> None:
        self.calls = 0

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        await asyncio.sleep((self.calls % 5) * 0.002)
        return request


def add_echo_to_server(servicer: EchoServicer, server: grpc.aio.Server) -> None:
    """What a generated add_<Name>Servicer_to_server does, with raw bytes as messages."""
    handler = grpc.unary_unary_rpc_method_handler(servicer.echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler}),))


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_json(url: str, timeout_s: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback only
        return json.loads(response.read())


def scrape_config(metrics_target: str) -> dict[str, Any]:
    """The shipped config, with its static targets replaced by ``metrics_target`` and a 1 s interval."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "histosynth"]
    job["static_configs"] = [{"targets": [metrics_target], "labels": {"histosynth_service": "echo"}}]
    return config


@contextlib.contextmanager
def running_prometheus(config: dict[str, Any], workdir: Path) -> Iterator[str]:
    """Start Prometheus on a free loopback port; yields its base URL once /-/ready answers."""
    assert PROMETHEUS is not None
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = _free_loopback_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                log_text = (workdir / "prometheus.log").read_text()
                raise RuntimeError(f"prometheus exited with {process.returncode}: {log_text}")
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after 20 s: {(workdir / 'prometheus.log').read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


def instant_query(base: str, query: str) -> list[dict[str, Any]]:
    answer = _http_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.fixture
async def echo_server() -> AsyncIterator[RunningServer]:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, log_format="text", drain_grace_s=0.5)
    running = await start_server([ServiceRegistration(add_echo_to_server, EchoServicer(), ECHO_SERVICE)], config)
    try:
        yield running
    finally:
        await running.stop()


async def _drive_calls(address: str, stop: asyncio.Event) -> int:
    """Unary calls until ``stop``, spaced so every 1 s scrape sees the counters move."""
    sent = 0
    async with grpc.aio.insecure_channel(address) as channel:
        echo = channel.unary_unary(ECHO_METHOD)
        while not stop.is_set():
            assert await echo(b"ping", timeout=5) == b"ping"
            sent += 1
            await asyncio.sleep(0.02)
    return sent


def _promtool_check(config_file: Path) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/ensure_system_deps.sh)")
    return subprocess.run([PROMTOOL, "check", "config", str(config_file)], capture_output=True, text=True, timeout=30)


def test_shipped_config_is_valid() -> None:
    result = _promtool_check(SHIPPED_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_commented_kubernetes_example_is_a_valid_job(tmp_path: Path) -> None:
    """The kubernetes_sd job is shipped commented out; uncommented, it must be a valid job."""
    text = SHIPPED_CONFIG.read_text()
    example = text[text.index("  # - job_name: histosynth-kubernetes"):]
    uncommented = "\n".join(line.replace("  # ", "  ", 1) for line in example.splitlines() if line.startswith("  # "))
    (job,) = yaml.safe_load(uncommented)
    assert job["job_name"] == "histosynth-kubernetes"
    assert job["kubernetes_sd_configs"][0]["role"] == "endpoints"
    # namespace and pod labels are what prometheus-adapter maps onto the HPA's Pods metric.
    assert {"namespace", "pod"} <= {rule.get("target_label") for rule in job["relabel_configs"]}
    config = yaml.safe_load(text)
    config["scrape_configs"].append(job)
    candidate = tmp_path / "prometheus.yml"
    candidate.write_text(yaml.safe_dump(config))
    result = _promtool_check(candidate)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's package is); "
                    "the job was checked structurally only")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(90)
async def test_prometheus_scrapes_request_latency_quantile(echo_server: RunningServer, tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/ensure_system_deps.sh)")
    assert echo_server.metrics_port is not None
    config = scrape_config(f"127.0.0.1:{echo_server.metrics_port}")

    stop = asyncio.Event()
    driver = asyncio.create_task(_drive_calls(echo_server.address, stop))
    try:
        with running_prometheus(config, tmp_path) as base:
            deadline = time.monotonic() + SCRAPE_DEADLINE_S
            p90: float | None = None
            while time.monotonic() < deadline:
                result = await asyncio.to_thread(instant_query, base, P90_QUERY)
                if result and math.isfinite(float(result[0]["value"][1])):
                    p90 = float(result[0]["value"][1])
                    break
                await asyncio.sleep(0.5)
            up = await asyncio.to_thread(instant_query, base, 'up{job="histosynth"}')
            echo_rate = await asyncio.to_thread(
                instant_query, base,
                f'sum(rate(histosynth_grpc_requests_total{{service="{ECHO_SERVICE}",code="OK"}}[1m]))',
            )
    finally:
        stop.set()
        sent = await driver

    assert p90 is not None, f"no finite p90 within {SCRAPE_DEADLINE_S} s after {sent} calls"
    # The echo handler pauses 0..8 ms; the interceptor measures handler entry to response.
    assert 0.0 < p90 < 1.0
    assert [sample["value"][1] for sample in up] == ["1"]
    assert up[0]["metric"]["histosynth_service"] == "echo"
    assert float(echo_rate[0]["value"][1]) > 0
