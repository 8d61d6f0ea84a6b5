"""Every histosynth service in ONE process, each on its own port, sharing model hosts.

``histosynth serve --all``, the CLI's embedded mode and integration tests use this. The
refinement and rendering ModelHosts are created once and shared with generation, so a
Render call and a generation job feed the same dynamic batchers (one queue per model,
one set of runtime instances) instead of loading every model twice.

Ports: ``ports`` maps a service to its port (0 = any free port). Only the first server
gets the Prometheus endpoint: every metric lives on one registry, so one scrape sees all.
Scoring joins when ``services/scoring/servicer.py`` is present; its encoder/segmenter host also
serves generation's quality gate (``min_consistency``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from services.core.config import ServerConfig
from services.core.grpc_server import RunningServer, start_server
from services.core.model_store import ModelStore
from services.diffusion.pipeline import DiffusionSettings
from services.generation import servicer as generation_servicer
from services.mask_refinement import servicer as refinement_servicer
from services.mask_rendering import servicer as rendering_servicer
from services.model_host import HostSettings, ModelHost
from services.servicer_common import report_readiness

_log = logging.getLogger(__name__)

SERVICE_ORDER: Final = ("refinement", "rendering", "generation", "scoring")
# Offsets from the base port (config.port) when ports are not given one by one.
PORT_OFFSETS: Final = {name: offset for offset, name in enumerate(SERVICE_ORDER)}


def scoring_available() -> bool:
    return importlib.util.find_spec("services.scoring.servicer") is not None


def available_services() -> tuple[str, ...]:
    return tuple(name for name in SERVICE_ORDER if name != "scoring" or scoring_available())


def default_ports(base_port: int, services: Sequence[str]) -> dict[str, int]:
    return {name: (0 if base_port == 0 else base_port + PORT_OFFSETS[name]) for name in services}


@dataclass
class AllInOne:
    """Running servers by service name, and the shared hosts; ``stop`` drains all of them."""

    config: ServerConfig
    servers: dict[str, RunningServer] = field(default_factory=dict)
    hosts: list[ModelHost] = field(default_factory=list)
    stack: generation_servicer.GenerationStack | None = None

    @property
    def addresses(self) -> dict[str, str]:
        return {name: server.address for name, server in self.servers.items()}

    async def stop(self, grace: float | None = None) -> None:
        await asyncio.gather(*(server.stop(grace) for server in self.servers.values()), return_exceptions=True)
        if self.stack is not None:
            await self.stack.jobs.close()
        await asyncio.gather(*(host.stop() for host in self.hosts), return_exceptions=True)

    async def wait_for_termination(self) -> None:
        await asyncio.gather(*(server.wait_for_termination() for server in self.servers.values()))


async def start_all(
    config: ServerConfig,
    services: Sequence[str] | None = None,
    ports: Mapping[str, int] | None = None,
    store: ModelStore | None = None,
) -> AllInOne:
    """Load models and start one server per service; on any failure everything started is stopped."""
    services = tuple(services) if services else available_services()
    unknown = sorted(set(services) - set(SERVICE_ORDER))
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}; valid: {list(SERVICE_ORDER)}")
    if "scoring" in services and not scoring_available():
        raise ValueError("service 'scoring' is not available in this build (services/scoring/servicer.py is missing)")
    ports = dict(ports) if ports is not None else default_ports(config.port, services)
    store = ModelStore(config.model_store) if store is None else store
    running = AllInOne(config=config)
    needs_render = {"rendering", "generation"} & set(services)
    needs_refine = {"refinement", "generation"} & set(services)
    render_host = rendering_servicer.create_host(config, store) if needs_render else None
    refine_host = refinement_servicer.create_host(config, store) if needs_refine else None
    scoring = importlib.import_module("services.scoring.servicer") if "scoring" in services else None
    # Scoring's host (encoders + segmenters) doubles as generation's quality-gate host.
    score_host = scoring.create_host(config, store) if scoring is not None else None
    if "generation" in services and score_host is None:
        score_host = ModelHost(store, ("segmenter",), HostSettings.from_server_config(config))
    try:
        for host in (refine_host, render_host, score_host):
            if host is not None:
                running.hosts.append(host)
                await host.start()
        metrics_port = config.metrics_port
        for name in SERVICE_ORDER:
            if name not in services:
                continue
            server_config = dataclasses.replace(config, port=ports[name], metrics_port=metrics_port)
            metrics_port = None  # one /metrics endpoint for the whole process
            if name == "refinement":
                assert refine_host is not None
                server = await start_server(refinement_servicer.registrations(refine_host), server_config)
            elif name == "rendering":
                assert render_host is not None
                diffusion = DiffusionSettings.from_server_config(config)  # HISTOSYNTH_DIFFUSION_*
                server = await start_server(
                    rendering_servicer.registrations(render_host, diffusion=diffusion), server_config
                )
            elif name == "generation":
                assert render_host is not None and refine_host is not None and score_host is not None
                running.stack = generation_servicer.create_stack(
                    server_config, store, render_host=render_host, refine_host=refine_host, segment_host=score_host
                )
                server = await start_server(generation_servicer.registrations(running.stack), server_config)
            else:
                assert scoring is not None and score_host is not None
                server = await start_server(scoring.registrations(score_host), server_config)
            running.servers[name] = server
            await report_readiness(server, {
                "refinement": [refine_host], "rendering": [render_host], "scoring": [score_host],
                "generation": [refine_host, render_host, score_host],
            }[name])
    except BaseException:
        await running.stop(grace=0)
        raise
    _log.info("all-in-one serving", extra={"addresses": running.addresses})
    return running


class BackgroundServers:
    """:func:`start_all` on its own event loop in a daemon thread, for synchronous callers (the CLI).

    ``with BackgroundServers(config) as servers: servers.addresses[...]``; leaving the block
    drains and stops everything.
    """

    def __init__(
        self,
        config: ServerConfig,
        services: Sequence[str] | None = None,
        ports: Mapping[str, int] | None = None,
    ) -> None:
        self._config = config
        self._services = services
        self._ports = ports
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="histosynth-servers", daemon=True)
        self._running: AllInOne | None = None

    @property
    def addresses(self) -> dict[str, str]:
        assert self._running is not None, "servers are not started"
        return self._running.addresses

    def start(self) -> BackgroundServers:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_all(self._config, self._services, self._ports), self._loop)
        try:
            self._running = future.result()
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self, grace: float | None = 2.0) -> None:
        if self._running is not None:
            asyncio.run_coroutine_threadsafe(self._running.stop(grace), self._loop).result()
            self._running = None
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
