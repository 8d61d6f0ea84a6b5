"""Small proto <-> domain helpers shared by the servicers (the only modules that touch protobuf)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc

from services._generated.histosynth.v1 import common_pb2, mask_rendering_pb2
from services.core.config import ServerConfig
from services.core.errors import InvalidInputError
from services.core.grpc_server import RunningServer, ServiceRegistration, start_server
from services.core.model_info import MaskGeneratorInfo, RefinerInfo, RendererInfo
from services.core.model_store import ModelStore
from services.diffusion.pipeline import DiffusionOptions, check_options
from services.diffusion.schedulers import DDIM, DPM_SOLVER_PP
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


SCHEDULERS = {
    mask_rendering_pb2.DIFFUSION_SCHEDULER_UNSPECIFIED: None,
    mask_rendering_pb2.DIFFUSION_SCHEDULER_DDIM: DDIM,
    mask_rendering_pb2.DIFFUSION_SCHEDULER_DPM_SOLVER_PP: DPM_SOLVER_PP,
}
SCHEDULER_TO_PROTO = {name: value for value, name in SCHEDULERS.items() if name is not None}


def diffusion_options(message: mask_rendering_pb2.DiffusionOptions) -> DiffusionOptions:
    """Wire options -> DiffusionOptions (0 / unspecified / unset = the model's manifest default).

    Render, GenerateNucleiMasks and Generation's spec.diffusion share these rules."""
    if message.scheduler not in SCHEDULERS:
        raise InvalidInputError(
            f"diffusion.scheduler: unknown value {message.scheduler}; valid: "
            f"{[mask_rendering_pb2.DiffusionScheduler.Name(value) for value in SCHEDULERS]}"
        )
    steps = int(message.steps) or None
    guidance = float(message.guidance_scale) if message.HasField("guidance_scale") else None
    check_options(steps, guidance)
    return DiffusionOptions(steps=steps, scheduler=SCHEDULERS[message.scheduler], guidance_scale=guidance)


def diffusion_options_to_proto(options: DiffusionOptions) -> mask_rendering_pb2.DiffusionOptions:
    """The inverse of :func:`diffusion_options` (a caller forwarding options to MaskRendering)."""
    message = mask_rendering_pb2.DiffusionOptions(steps=options.steps or 0)
    if options.scheduler is not None:
        message.scheduler = SCHEDULER_TO_PROTO[options.scheduler]
    if options.guidance_scale is not None:
        message.guidance_scale = float(options.guidance_scale)
    return message


def description_to_proto(
    info: RendererInfo | MaskGeneratorInfo | RefinerInfo, kind: str, role: str = ""
) -> common_pb2.ModelDescription:
    message = common_pb2.ModelDescription(model=model_ref_to_proto(info.ref), kind=kind, role=role)
    if isinstance(info, RendererInfo):
        message.class_names.extend(info.class_names)
        if info.noise_spacing is not None:
            message.noise_spacing = float(info.noise_spacing)
        message.uses_instance_edges = info.uses_instance_edges
        message.stain = info.stain
        message.stain_sources.extend(info.stain_sources)
    elif isinstance(info, MaskGeneratorInfo):
        message.class_names.extend(info.class_names)
        message.type_names.extend(info.type_names)
    else:
        message.guided = info.guided
    return message


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
