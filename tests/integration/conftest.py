"""Real refinement and rendering servers on loopback (port 0), over small real conv ONNX models.

Servers are module-scoped (one per test module, on that module's event loop): starting one
loads its models, and the tests only read from it, so sharing keeps the suite fast. Modules
using them set ``pytestmark = pytest.mark.asyncio(loop_scope="module")``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from services.core.config import ServerConfig
from services.core.grpc_server import RunningServer
from services.core.model_store import ModelStore
from services.mask_refinement import servicer as refinement
from services.mask_rendering import servicer as rendering
from services.model_host import ModelHost
from tests.fixtures.service_models import write_service_store


@dataclass
class LiveServer:
    running: RunningServer
    host: ModelHost
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return self.running.address


def server_config(store: Path, **overrides: object) -> ServerConfig:
    settings: dict[str, object] = dict(
        model_store=store,
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        http_port=0,  # a free port: one derived from an explicit gRPC port could be taken on a shared machine
        max_queue_delay_ms=2.0,
        max_message_bytes=8 * 1024 * 1024,
        drain_grace_s=1.0,
        log_format="text",
    )
    settings.update(overrides)
    return ServerConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_service_store(tmp_path_factory.mktemp("service_store") / "model_store")


ServiceStarter = Callable[[ServerConfig, ModelStore], Awaitable[tuple[RunningServer, ModelHost]]]


async def live_server(start: ServiceStarter, store: Path, **overrides: object) -> AsyncIterator[LiveServer]:
    """Start a service (its servicer module's ``start``) on loopback; stop it when the generator closes."""
    running, host = await start(server_config(store, **overrides), ModelStore(store))
    channel = grpc.aio.insecure_channel(running.address)
    try:
        yield LiveServer(running, host, channel)
    finally:
        await channel.close()
        await running.stop(grace=0.5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def refinement_server(module_store: Path) -> AsyncIterator[LiveServer]:
    async for server in live_server(refinement.start, module_store):
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rendering_server(module_store: Path) -> AsyncIterator[LiveServer]:
    async for server in live_server(rendering.start, module_store):
        yield server
