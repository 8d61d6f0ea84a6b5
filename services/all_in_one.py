"""Every histosynth service in ONE process, each on its own port, sharing model hosts.

``histosynth serve --all``, the CLI's embedded mode and integration tests use this. The
refinement and rendering ModelHosts are created once and shared with generation, so a
Render call and a generation job feed the same dynamic batchers (one queue per model,
one set of runtime instances) instead of loading every model twice.

Ports: ``ports`` maps a service to its port (0 = any free port). Only the first server
gets the Prometheus endpoint: every metric lives on one registry, so one scrape sees all.
Scoring joins when ``services/scoring/servicer.py`` is present; its encoder/segmenter host also
serves generation's quality gate (``min_consistency``).

This module is the composition root of the embedded mode: it alone builds every service's
pipeline and hands the rendering/refinement pipelines to generation's in-process provider
(services.generation.models.InProcessModels); the services never import each other. With
HISTOSYNTH_GENERATION_RENDERING_ADDRESS set, generation here calls those peers instead and loads
no renderer, refiner or segmenter for itself (services.generation.remote).
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

from services.core.config import DERIVED_HTTP_PORT, ServerConfig
from services.core.grpc_server import RunningServer, start_server
from services.core.logging import install_grpc_shutdown_race_filter
from services.core.model_store import ModelStore
from services.diffusion.pipeline import DiffusionSettings, shared_pipeline
from services.generation import servicer as generation_servicer
from services.generation.models import InProcessModels
from services.generation.remote import GenerationSettings
from services.mask_refinement import servicer as refinement_servicer
from services.mask_refinement.pipeline import RefinementPipeline
from services.mask_rendering import servicer as rendering_servicer
from services.mask_rendering.pipeline import RenderingPipeline
from services.scoring.consistency import ConsistencyScorer
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


def http_port(config: ServerConfig, service: str) -> int | None:
    """A service's KServe REST port: derived from its own gRPC port by default; an explicit
    HISTOSYNTH_HTTP_PORT is the base, plus the service's offset, so the servers never share one."""
    if config.http_port in (None, 0, DERIVED_HTTP_PORT):
        return config.http_port
    return config.http_port + PORT_OFFSETS[service]


def create_stack(
    config: ServerConfig,
    store: ModelStore | None = None,
    *,
    render_host: ModelHost | None = None,
    refine_host: ModelHost | None = None,
    segment_host: ModelHost | None = None,
    concurrency: int = 4,
    max_jobs: int = 256,
) -> generation_servicer.GenerationStack:
    """The embedded generation stack: renderers, refiner and segmenters in this process (built, not started).

    Pass existing hosts to share batchers with the other services of the process (``segment_host``
    must host kind "segmenter", e.g. the Scoring service's host).
    """
    store = ModelStore(config.model_store) if store is None else store
    render_host = render_host or rendering_servicer.create_host(config, store)
    refine_host = refine_host or refinement_servicer.create_host(config, store)
    segment_host = segment_host or ModelHost(store, ("segmenter",), HostSettings.from_server_config(config))
    # One diffusion pipeline per host: when the rendering service shares render_host it already made it
    # (with the same settings), so generated samples and Render calls join the same step-level batches.
    diffusion = shared_pipeline(render_host, DiffusionSettings.from_server_config(config))
    models = InProcessModels(RenderingPipeline(render_host, diffusion=diffusion), RefinementPipeline(refine_host))
    return generation_servicer.build_stack(
        config, models, scorer=ConsistencyScorer(segment_host), hosts=(render_host, refine_host, segment_host),
        concurrency=concurrency, max_jobs=max_jobs,
    )


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
            if self.stack.peers is not None:
                await self.stack.peers.close()
        await asyncio.gather(*(host.stop() for host in self.hosts), return_exceptions=True)

    async def wait_for_termination(self) -> None:
        await asyncio.gather(*(server.wait_for_termination() for server in self.servers.values()))


async def start_all(
    config: ServerConfig,
    services: Sequence[str] | None = None,
    ports: Mapping[str, int] | None = None,
    store: ModelStore | None = None,
    generation: GenerationSettings | None = None,
) -> AllInOne:
    """Load models and start one server per service; on any failure everything started is stopped.

    ``generation`` (default: HISTOSYNTH_GENERATION_* variables) with peer addresses makes the
    generation server here call those peers instead of this process's models."""
    services = tuple(services) if services else available_services()
    unknown = sorted(set(services) - set(SERVICE_ORDER))
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}; valid: {list(SERVICE_ORDER)}")
    if "scoring" in services and not scoring_available():
        raise ValueError("service 'scoring' is not available in this build (services/scoring/servicer.py is missing)")
    ports = dict(ports) if ports is not None else default_ports(config.port, services)
    store = ModelStore(config.model_store) if store is None else store
    running = AllInOne(config=config)
    generation = GenerationSettings.from_env() if generation is None else generation
    embedded_generation = "generation" in services and not generation.remote
    needs_render = "rendering" in services or embedded_generation
    needs_refine = "refinement" in services or embedded_generation
    render_host = rendering_servicer.create_host(config, store) if needs_render else None
    refine_host = refinement_servicer.create_host(config, store) if needs_refine else None
    scoring = importlib.import_module("services.scoring.servicer") if "scoring" in services else None
    # Scoring's host (encoders + segmenters) doubles as generation's quality-gate host.
    score_host = scoring.create_host(config, store) if scoring is not None else None
    if embedded_generation and score_host is None:
        score_host = ModelHost(store, ("segmenter",), HostSettings.from_server_config(config))
    try:
        for host in (refine_host, render_host, score_host):
            if host is not None:
                running.hosts.append(host)
                await host.start()
        metrics_port = config.resolved_metrics_port  # derived from the base port (--port) unless set
        for name in SERVICE_ORDER:
            if name not in services:
                continue
            server_config = dataclasses.replace(
                config, port=ports[name], metrics_port=metrics_port, http_port=http_port(config, name)
            )
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
            elif name == "generation" and not embedded_generation:
                running.stack = generation_servicer.create_remote_stack(server_config, generation)
                server = await start_server(generation_servicer.registrations(running.stack), server_config)
            elif name == "generation":
                assert render_host is not None and refine_host is not None and score_host is not None
                running.stack = create_stack(
                    server_config, store, render_host=render_host, refine_host=refine_host, segment_host=score_host
                )
                server = await start_server(generation_servicer.registrations(running.stack), server_config)
            else:
                assert scoring is not None and score_host is not None
                server = await start_server(scoring.registrations(score_host), server_config)
            running.servers[name] = server
            await report_readiness(server, {
                "refinement": [refine_host], "rendering": [render_host], "scoring": [score_host],
                "generation": [refine_host, render_host, score_host] if embedded_generation else [],
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
        generation: GenerationSettings | None = None,
    ) -> None:
        self._config = config
        self._services = services
        self._ports = ports
        self._generation = generation
        install_grpc_shutdown_race_filter()  # the CLI may not configure logging; see the filter's docstring
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="histosynth-servers", daemon=True)
        self._running: AllInOne | None = None

    @property
    def addresses(self) -> dict[str, str]:
        assert self._running is not None, "servers are not started"
        return self._running.addresses

    @property
    def running(self) -> AllInOne:
        assert self._running is not None, "servers are not started"
        return self._running

    def start(self) -> BackgroundServers:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_all(self._config, self._services, self._ports, generation=self._generation), self._loop)
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
