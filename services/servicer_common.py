"""Small proto <-> domain helpers shared by the servicers (the only modules that touch protobuf)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc

from services._generated.histosynth.v1 import common_pb2
from services.core.config import ServerConfig
from services.core.errors import InvalidInputError
from services.core.grpc_server import RunningServer, ServiceRegistration, start_server
from services.core.model_store import ModelStore
from services.model_host import HostSettings, ModelHost, ModelRef

_log = logging.getLogger(__name__)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as absolute ``time.monotonic()`` seconds (what the batcher takes), or None."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining)


def model_ref_to_proto(ref: ModelRef) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=ref.name, version=ref.version, sha256=ref.sha256)


def require_field(request: object, field: str, what: str) -> None:
    """Refuse a request whose message field ``field`` is unset; ``what`` says what to send."""
    if not request.HasField(field):  # type: ignore[attr-defined]
        raise InvalidInputError(f"{field} is required: send {what}")


def create_host(config: ServerConfig, store: ModelStore | None, kinds: Sequence[str]) -> ModelHost:
    """A model host over ``config.model_store`` (or ``store``) serving the model ``kinds`` of one service."""
    store = ModelStore(config.model_store) if store is None else store
    return ModelHost(store, kinds, HostSettings.from_server_config(config))


async def start_with_host(
    host: ModelHost, registrations: Sequence[ServiceRegistration], config: ServerConfig
) -> tuple[RunningServer, ModelHost]:
    """Start serving ``registrations`` over an already started ``host``; the host stops with the server.

    If the server cannot start (e.g. the port is taken) the host is stopped here, so no
    runtime or batcher thread outlives a failed start.
    """
    try:
        running = await start_server(registrations, config, shutdown_hooks=[host.stop])
    except BaseException:
        await host.stop(drain=False)
        raise
    await report_readiness(running, [host])
    return running, host


async def report_readiness(running: RunningServer, hosts: Sequence[ModelHost]) -> bool:
    """Health tells the truth: NOT_SERVING (every service and the server as a whole) when a model of
    ``hosts`` cannot serve as configured, unless HISTOSYNTH_STRICT_MODELS=0. Returns whether it serves."""
    problems = {key: problem for host in hosts for key, problem in host.readiness_problems.items()}
    if all(host.serving for host in hosts):
        return True
    for name in (*running.service_names, ""):
        await running.set_serving(name, False)
    _log.error(
        "health NOT_SERVING on %s: model(s) %s cannot serve as configured; fix them, or set "
        "HISTOSYNTH_STRICT_MODELS=0 to serve the others anyway",
        running.address,
        ", ".join(sorted(problems)),
        extra={"models": sorted(problems), "problems": problems},
    )
    return False
