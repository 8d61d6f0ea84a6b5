"""The KServe v2 REST port: HISTOSYNTH_HTTP_PORT, or derived from the gRPC port as the metrics port is."""

from __future__ import annotations

from services.all_in_one import PORT_OFFSETS, http_port
from services.core.config import ServerConfig, derived_http_port


def test_http_port_is_derived_from_the_grpc_port_like_the_metrics_port() -> None:
    assert ServerConfig().resolved_http_port == 8000
    assert ServerConfig.from_env(environ={"HISTOSYNTH_PORT": "50052"}).resolved_http_port == 8001
    assert derived_http_port(0) == 0 and derived_http_port(9000) == 29000  # never a privileged port
    assert ServerConfig.from_env(environ={"HISTOSYNTH_HTTP_PORT": "off"}).resolved_http_port is None
    assert ServerConfig.from_env(environ={"HISTOSYNTH_HTTP_PORT": "9100"}).resolved_http_port == 9100
    explicit = ServerConfig.from_env(environ={"HISTOSYNTH_HTTP_PORT": "9100"})
    assert http_port(explicit, "rendering") == 9100 + PORT_OFFSETS["rendering"]  # serve --all: one port each
    assert http_port(ServerConfig(), "rendering") == ServerConfig().http_port  # derived per server from its own port

