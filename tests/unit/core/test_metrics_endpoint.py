"""The /metrics endpoint: its port follows the gRPC port unless set, and only /metrics answers."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from services.core import metrics
from services.core.config import ConfigError, ServerConfig, derived_metrics_port


def test_metrics_port_is_derived_from_the_grpc_port_unless_set() -> None:
    assert ServerConfig().resolved_metrics_port == 9464  # the default gRPC port 50051
    assert ServerConfig(port=50053).resolved_metrics_port == 9466
    assert ServerConfig.from_env(environ={"HISTOSYNTH_PORT": "60000"}).resolved_metrics_port == 19413
    assert ServerConfig(port=8080).resolved_metrics_port == 18080  # below the offset
    assert ServerConfig(port=0).resolved_metrics_port == 0  # a free gRPC port -> a free metrics port
    explicit = ServerConfig.from_env(environ={"HISTOSYNTH_PORT": "60000", "HISTOSYNTH_METRICS_PORT": "9999"})
    assert explicit.resolved_metrics_port == 9999
    assert ServerConfig.from_env(environ={"HISTOSYNTH_METRICS_PORT": "off"}).resolved_metrics_port is None
    assert all(0 < derived_metrics_port(port) <= 65535 for port in (1, 40587, 40588, 50051, 55535, 65535))
    with pytest.raises(ConfigError, match="HISTOSYNTH_METRICS_PORT='-2'"):
        ServerConfig.from_env(environ={"HISTOSYNTH_METRICS_PORT": "-2"})


def test_only_the_metrics_path_answers() -> None:
    server = metrics.start_metrics_http_server("127.0.0.1", 0, sample_gpu=False)
    try:
        with urllib.request.urlopen(server.url, timeout=5) as response:  # noqa: S310 - loopback
            assert response.status == 200
            assert b"# HELP" in response.read()
        with urllib.request.urlopen(server.url + "?name[]=histosynth_model_requests_total", timeout=5) as response:  # noqa: S310
            assert response.status == 200
        for path in ("/", "/metric", "/metrics/x", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5)  # noqa: S310
            assert caught.value.code == 404, path
            assert b"/metrics" in caught.value.read()
    finally:
        server.close()
