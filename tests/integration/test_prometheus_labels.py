"""The shipped Prometheus config labels series by service from the series themselves.

`histosynth serve --all` answers every service's metrics on ONE endpoint; a static per-target label
would stamp all of them with one service (the bug of issue 16). A real Prometheus with the shipped
deploy/prometheus/prometheus.yml (targets replaced by one loopback server hosting two services, as
serve --all does) must report each service's request series under its own histosynth_service.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import yaml

from services.core.config import ServerConfig, derived_metrics_port
from services.core.grpc_server import ServiceRegistration, start_server
from services.all_in_one import PORT_OFFSETS
from tests.integration.test_prometheus_scrape import (
    PROMETHEUS,
    SHIPPED_CONFIG,
    EchoServicer,
    instant_query,
    running_prometheus,
    scrape_config,
)

SERVICES = {"histosynth.v1.MaskRendering": "mask_rendering", "histosynth.v1.Generation": "generation"}


def add_echo_as(name: str):  # noqa: ANN201 - a generated add_<Name>Servicer_to_server stand-in
    def add(servicer: EchoServicer, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(servicer.echo)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {"Echo": handler}),))
    return add


def test_static_targets_are_the_derived_metrics_ports_of_serve_all() -> None:
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "histosynth"]
    (static,) = job["static_configs"]
    assert "labels" not in static, "a per-target service label is wrong for serve --all's single endpoint"
    expected = {f"127.0.0.1:{derived_metrics_port(50051 + offset)}" for offset in PORT_OFFSETS.values()}
    assert set(static["targets"]) == expected
    mapped = {rule["replacement"] for rule in job["metric_relabel_configs"]}
    assert mapped == {"mask_refinement", "mask_rendering", "scoring", "generation"}


@pytest.mark.timeout(90)
async def test_one_endpoint_two_services_two_labels(tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/ensure_system_deps.sh)")
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, log_format="text", drain_grace_s=0.5)
    registrations = [ServiceRegistration(add_echo_as(name), EchoServicer(), name) for name in SERVICES]
    running = await start_server(registrations, config)
    try:
        scrape = scrape_config(f"127.0.0.1:{running.metrics_port}")
        (job,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "histosynth"]
        job["static_configs"][0].pop("labels")
        async with grpc.aio.insecure_channel(running.address) as channel:
            for name in SERVICES:
                assert await channel.unary_unary(f"/{name}/Echo")(b"x", timeout=5) == b"x"
        with running_prometheus(scrape, tmp_path) as base:
            deadline = time.monotonic() + 30
            found: dict[str, str] = {}
            # The process-wide registry may also hold other tests' services: check ours, ignore the rest.
            while time.monotonic() < deadline and not set(SERVICES) <= set(found):
                result = await asyncio.to_thread(
                    instant_query, base, 'histosynth_grpc_requests_total{service=~"histosynth.v1.*"}')
                found = {sample["metric"]["service"]: sample["metric"].get("histosynth_service", "") for sample in result}
                await asyncio.sleep(0.5)
        assert {name: found.get(name) for name in SERVICES} == SERVICES
    finally:
        await running.stop()
