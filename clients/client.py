"""Typed Python client for the histosynth services: numpy in, numpy out.

    from clients.client import HistosynthClient
    with HistosynthClient("127.0.0.1:50051") as client:          # one target for every service
        fine = client.refine(coarse_masks).fine_masks
        images = client.render(class_maps, model="renderer-he-nuclei").images
        for sample in client.generate(spec):                      # GenerationSpec or YAML-style dict
            sample.image, sample.mask, sample.scores

Services on separate ports (``histosynth serve --all``) are reached by passing
``targets={"refinement": ..., "rendering": ..., "generation": ...}``. Servers started with TLS
and/or a bearer token (HISTOSYNTH_TLS_*, HISTOSYNTH_AUTH_TOKEN_FILE) are reached with
``HistosynthClient(target, channel_credentials=tls_credentials(ca_file, cert_file, key_file),
token=...)``. Errors arrive as
``grpc.RpcError`` with the server's status code and actionable message.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

from services import tensor_codec
from services._generated.histosynth.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    mask_refinement_pb2,
    mask_refinement_pb2_grpc,
    mask_rendering_pb2,
    mask_rendering_pb2_grpc,
)
from services.diffusion.pipeline import DiffusionOptions
from services.generation.spec import FractionRange, GenerationSpec, StratumSpec

SERVICES = ("refinement", "rendering", "generation")
JOB_STATES = {
    generation_pb2.JOB_STATE_UNSPECIFIED: "unspecified",
    generation_pb2.JOB_STATE_QUEUED: "queued",
    generation_pb2.JOB_STATE_RUNNING: "running",
    generation_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    generation_pb2.JOB_STATE_FAILED: "failed",
    generation_pb2.JOB_STATE_CANCELLED: "cancelled",
}
_MESSAGE_LIMIT = 64 * 1024 * 1024


# ------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class RefineOutput:
    fine_masks: np.ndarray  # uint8 [N, H, W]
    noise_labels: np.ndarray | None
    model: ModelInfo


@dataclass(frozen=True)
class RenderOutput:
    images: np.ndarray  # uint8 [N, H, W, 3] RGB
    model: ModelInfo


@dataclass(frozen=True)
class NucleiMasksOutput:
    class_maps: np.ndarray  # uint8 [N, H, W]; ids name class_names
    instance_maps: np.ndarray  # int32 [N, H, W]; 0 = none
    class_names: tuple[str, ...]
    model: ModelInfo


_DIFFUSION_SCHEDULERS = {
    None: mask_rendering_pb2.DIFFUSION_SCHEDULER_UNSPECIFIED,
    "ddim": mask_rendering_pb2.DIFFUSION_SCHEDULER_DDIM,
    "dpmsolver++": mask_rendering_pb2.DIFFUSION_SCHEDULER_DPM_SOLVER_PP,
}


def diffusion_options(
    steps: int | None, scheduler: str | None, guidance_scale: float | None
) -> mask_rendering_pb2.DiffusionOptions:
    """None = the model's default for each; scheduler is "ddim" or "dpmsolver++"."""
    if scheduler not in _DIFFUSION_SCHEDULERS:
        valid = [name for name in _DIFFUSION_SCHEDULERS if name]
        raise ValueError(f"scheduler {scheduler!r} is unknown; valid: {valid} (or None for the model's default)")
    options = mask_rendering_pb2.DiffusionOptions(steps=steps or 0, scheduler=_DIFFUSION_SCHEDULERS[scheduler])
    if guidance_scale is not None:
        options.guidance_scale = guidance_scale
    return options


@dataclass(frozen=True)
class ClientSample:
    job_id: str
    index: int
    stratum: str
    image_png: bytes
    mask: np.ndarray  # uint8 [H, W]
    instances: np.ndarray | None  # uint16/int32 [H, W]
    scores: dict[str, float]
    class_names: tuple[str, ...]
    provenance: dict[str, Any]

    @property
    def image(self) -> np.ndarray:
        """Decoded RGB uint8 [H, W, 3]."""
        bgr = cv2.imdecode(np.frombuffer(self.image_png, np.uint8), cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str
    completed: int
    total: int
    rejected: int
    error: str
    sink_uri: str

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


# ------------------------------------------------------------------------ spec I/O
_SPEC_KEYS = {
    "count", "tissue", "height", "width", "strata", "tolerance", "seed", "noise_spacing", "refine",
    "min_consistency", "sink_uri", "model_versions", "diffusion",
}
_STRATUM_KEYS = {
    "label", "weight", "class_fractions", "class_fraction_ranges", "positive_proportion", "nuclear_fraction",
    "nuclei_types",
}
_DIFFUSION_KEYS = {"steps", "scheduler", "guidance_scale"}


def _range_from(value: Any, where: str) -> FractionRange:
    if isinstance(value, (int, float)):
        return FractionRange(float(value), float(value))
    if isinstance(value, Sequence) and len(value) == 2:
        return FractionRange(float(value[0]), float(value[1]))
    if isinstance(value, Mapping) and set(value) == {"min", "max"}:
        return FractionRange(float(value["min"]), float(value["max"]))
    raise ValueError(f"{where}: expected [min, max] or {{min: .., max: ..}}, got {value!r}")


def spec_from_dict(data: Mapping[str, Any], count: int | None = None) -> GenerationSpec:
    """A GenerationSpec from the YAML layout of clients/specs/*.yaml; ``count`` overrides the file's."""
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"spec: unknown key(s) {unknown}; valid: {sorted(_SPEC_KEYS)}")
    strata = []
    for position, raw in enumerate(data.get("strata") or []):
        where = f"strata[{position}]"
        bad = sorted(set(raw) - _STRATUM_KEYS)
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; valid: {sorted(_STRATUM_KEYS)}")
        strata.append(
            StratumSpec(
                label=str(raw.get("label", f"stratum-{position}")),
                weight=float(raw.get("weight", 1.0)),
                class_fractions={str(k): float(v) for k, v in (raw.get("class_fractions") or {}).items()},
                class_fraction_ranges={
                    str(k): _range_from(v, f"{where}.class_fraction_ranges[{k!r}]")
                    for k, v in (raw.get("class_fraction_ranges") or {}).items()
                },
                positive_proportion=None if raw.get("positive_proportion") is None
                else _range_from(raw["positive_proportion"], f"{where}.positive_proportion"),
                nuclear_fraction=None if raw.get("nuclear_fraction") is None
                else _range_from(raw["nuclear_fraction"], f"{where}.nuclear_fraction"),
                nuclei_types=tuple(str(t) for t in raw.get("nuclei_types") or ()),
            )
        )
    if "tissue" not in data:
        raise ValueError("spec: 'tissue' is required (nuclei, glands or ihc)")
    total = count if count is not None else data.get("count")
    if total is None:
        raise ValueError("spec: 'count' is required (in the file or as --count)")
    return GenerationSpec(
        count=int(total),
        tissue=str(data["tissue"]),
        height=int(data.get("height", 256)),
        width=int(data.get("width", 256)),
        strata=tuple(strata),
        tolerance=float(data.get("tolerance", 0.02)),
        seed=int(data.get("seed", 0)),
        noise_spacing=float(data.get("noise_spacing", 0.0)),
        refine=bool(data.get("refine", False)),
        min_consistency=float(data.get("min_consistency", 0.0)),
        sink_uri=str(data.get("sink_uri", "")),
        model_versions={str(k): str(v) for k, v in (data.get("model_versions") or {}).items()},
        diffusion=_diffusion_from(data.get("diffusion") or {}),
    )


def _diffusion_from(raw: Mapping[str, Any]) -> DiffusionOptions:
    """A spec's ``diffusion`` block; missing keys = the model's manifest default."""
    unknown = sorted(set(raw) - _DIFFUSION_KEYS)
    if unknown:
        raise ValueError(f"diffusion: unknown key(s) {unknown}; valid: {sorted(_DIFFUSION_KEYS)}")
    scheduler = None if raw.get("scheduler") is None else str(raw["scheduler"])
    if scheduler not in _DIFFUSION_SCHEDULERS:
        valid = [name for name in _DIFFUSION_SCHEDULERS if name]
        raise ValueError(f"diffusion.scheduler: {scheduler!r} is unknown; valid: {valid}")
    guidance = raw.get("guidance_scale")
    return DiffusionOptions(
        steps=int(raw.get("steps") or 0) or None,  # 0, like the wire's 0, = the model's default
        scheduler=scheduler,
        guidance_scale=None if guidance is None else float(guidance),
    )


def _range_proto(span: FractionRange) -> generation_pb2.FractionRange:
    return generation_pb2.FractionRange(min=span.low, max=span.high)


def request_from_spec(spec: GenerationSpec, indices: Sequence[int] | None = None) -> generation_pb2.GenerateRequest:
    message = generation_pb2.GenerationSpec(
        count=spec.count,
        tissue=spec.tissue,
        height=spec.height,
        width=spec.width,
        tolerance=spec.tolerance,
        seed=spec.seed,
        noise_spacing=spec.noise_spacing,
        refine=spec.refine,
        min_consistency=spec.min_consistency,
        sink_uri=spec.sink_uri,
    )
    for stratum in spec.strata:
        entry = message.strata.add(label=stratum.label, weight=stratum.weight)
        entry.class_fractions.update(stratum.class_fractions)
        for name, span in stratum.class_fraction_ranges.items():
            entry.class_fraction_ranges[name].CopyFrom(_range_proto(span))
        if stratum.positive_proportion is not None:
            entry.positive_proportion.CopyFrom(_range_proto(stratum.positive_proportion))
        if stratum.nuclear_fraction is not None:
            entry.nuclear_fraction.CopyFrom(_range_proto(stratum.nuclear_fraction))
        entry.nuclei_types.extend(stratum.nuclei_types)
    if spec.diffusion != DiffusionOptions():
        sampling = spec.diffusion
        message.diffusion.CopyFrom(diffusion_options(sampling.steps, sampling.scheduler, sampling.guidance_scale))
    if spec.coarse_masks is not None:
        message.coarse_masks.CopyFrom(tensor_codec.array_to_tensor(np.asarray(spec.coarse_masks, np.uint8)))
    return generation_pb2.GenerateRequest(
        spec=message, model_versions=dict(spec.model_versions), indices=list(indices or [])
    )


def _model(ref: Any) -> ModelInfo:
    return ModelInfo(ref.name, ref.version, ref.sha256)


def _job(message: generation_pb2.Job) -> JobStatus:
    return JobStatus(
        job_id=message.job_id,
        state=JOB_STATES.get(message.state, str(message.state)),
        completed=message.completed,
        total=message.total,
        rejected=message.rejected,
        error=message.error,
        sink_uri=message.sink_uri,
    )


def sample_from_proto(message: generation_pb2.Sample) -> ClientSample:
    provenance = message.provenance
    instances = None
    if message.HasField("instances") and message.instances.shape:
        instances = np.array(tensor_codec.tensor_to_array(message.instances, "instances"))
    return ClientSample(
        job_id=message.job_id,
        index=message.index,
        stratum=message.stratum,
        image_png=message.image_png,
        mask=np.array(tensor_codec.tensor_to_array(message.mask, "mask")),
        instances=instances,
        scores=dict(message.scores),
        class_names=tuple(message.class_names),
        provenance={
            "models": [{"name": m.name, "version": m.version, "sha256": m.sha256} for m in provenance.models],
            "seed": provenance.seed,
            "code_version": provenance.code_version,
            "parameters": json.loads(provenance.parameters_json) if provenance.parameters_json else {},
            "backend": provenance.backend,
        },
    )


# ---------------------------------------------------------------------- transport
def tls_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: ``ca_file`` verifies the server (None = system roots);
    ``cert_file`` + ``key_file`` are this client's certificate for servers that require mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("give cert_file and key_file together (the client certificate and its key), or neither")

    def read(path: str | Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file), private_key=read(key_file), certificate_chain=read(cert_file)
    )


class _ClientCallDetails(
    namedtuple("_ClientCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerTokenMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds 'authorization: Bearer <token>' to every call on a plaintext channel.

    (On TLS channels grpc's access-token call credentials do this; grpc refuses those
    over plaintext, which is why this interceptor exists.)
    """

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _ClientCallDetails:
        return _ClientCallDetails(
            details.method, details.timeout, [*(details.metadata or ()), self._entry],
            details.credentials, details.wait_for_ready, details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    address: str,
    *,
    channel_credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A blocking channel to ``address``: TLS when ``channel_credentials`` is given, with ``token`` on every call."""
    options = [
        ("grpc.max_send_message_length", _MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
    ]
    if channel_credentials is not None:
        if token:
            channel_credentials = grpc.composite_channel_credentials(
                channel_credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(address, channel_credentials, options=options)
    channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _BearerTokenMetadata(token)) if token else channel


# -------------------------------------------------------------------------- client
@dataclass
class HistosynthClient:
    """Blocking client; ``target`` serves every service unless ``targets`` names one per service."""

    target: str = ""
    targets: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None  # default per-call deadline in seconds
    # TLS / mutual TLS to servers started with HISTOSYNTH_TLS_*: see tls_credentials(); None = plaintext.
    channel_credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)
    # Bearer token for servers started with HISTOSYNTH_AUTH_TOKEN_FILE, sent on every call as
    # 'authorization: Bearer <token>'. Kept out of repr() so it never lands in a log line.
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(SERVICES))
        if unknown:
            raise ValueError(f"targets: unknown service(s) {unknown}; valid: {list(SERVICES)}")
        if not self.target and not self.targets:
            raise ValueError("give a target 'host:port' (or targets per service)")
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, service: str) -> grpc.Channel:
        address = self.targets.get(service) or self.target
        if not address:
            raise ValueError(f"no target for service {service!r}; pass target= or targets[{service!r}]")
        if address not in self._channels:
            self._channels[address] = open_channel(
                address, channel_credentials=self.channel_credentials, token=self.token
            )
        return self._channels[address]

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> HistosynthClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def refine(
        self,
        coarse_masks: np.ndarray,
        *,
        stain: str = "",
        model: str = "",
        version: str = "",
        noise_spacing: float = 0.0,
        seed: int = 0,
        guide_masks: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> RefineOutput:
        """``guide_masks``: optional {0, 1} region layout per coarse mask (mask-refiner v2: glands)."""
        stub = mask_refinement_pb2_grpc.MaskRefinementStub(self._channel("refinement"))
        request = mask_refinement_pb2.RefineRequest(
            coarse_masks=tensor_codec.array_to_tensor(np.asarray(coarse_masks, np.uint8)),
            stain=stain, model=model, model_version=version, noise_spacing=noise_spacing, seed=seed,
        )
        if guide_masks is not None:
            request.guide_masks.CopyFrom(tensor_codec.array_to_tensor(np.asarray(guide_masks, np.uint8)))
        response = stub.Refine(request, timeout=self._timeout(timeout))
        noise = None
        if response.HasField("noise_labels") and response.noise_labels.shape:
            noise = np.array(tensor_codec.tensor_to_array(response.noise_labels, "noise_labels"))
        return RefineOutput(
            fine_masks=np.array(tensor_codec.tensor_to_array(response.fine_masks, "fine_masks")),
            noise_labels=noise,
            model=_model(response.model),
        )

    def render(
        self,
        class_masks: np.ndarray,
        *,
        model: str,
        version: str = "",
        instance_maps: np.ndarray | None = None,
        noise_labels: np.ndarray | None = None,
        seed: int = 0,
        noise_spacing: float = 0.0,
        steps: int | None = None,
        scheduler: str | None = None,
        guidance_scale: float | None = None,
        timeout: float | None = None,
    ) -> RenderOutput:
        """``steps``/``scheduler``/``guidance_scale`` apply to diffusion renderers (None = model default)."""
        request = mask_rendering_pb2.RenderRequest(
            model=model, model_version=version, seed=seed, noise_spacing=noise_spacing,
            class_masks=tensor_codec.array_to_tensor(np.asarray(class_masks, np.uint8)),
            encoding=mask_rendering_pb2.IMAGE_ENCODING_RAW,
            diffusion=diffusion_options(steps, scheduler, guidance_scale),
        )
        if instance_maps is not None:
            request.instance_maps.CopyFrom(tensor_codec.array_to_tensor(np.asarray(instance_maps)))
        if noise_labels is not None:
            request.noise_labels.CopyFrom(tensor_codec.array_to_tensor(np.asarray(noise_labels, np.uint8)))
        stub = mask_rendering_pb2_grpc.MaskRenderingStub(self._channel("rendering"))
        response = stub.Render(request, timeout=self._timeout(timeout))
        return RenderOutput(
            images=np.array(tensor_codec.tensor_to_array(response.images, "images")), model=_model(response.model)
        )

    def generate_nuclei_masks(
        self,
        types: Sequence[str] = (),
        count: int = 1,
        *,
        model: str = "nuclei-mask-generator",
        version: str = "",
        seed: int = 0,
        steps: int | None = None,
        scheduler: str | None = None,
        guidance_scale: float | None = None,
        size: tuple[int, int] | None = None,
        timeout: float | None = None,
    ) -> NucleiMasksOutput:
        """``count`` nuclei masks with the given types present (e.g. ["inflammatory", "epithelial"]).

        Feed the result to ``render(class_maps, instance_maps=..., model="renderer-diffusion-nuclei")``
        to get matching images. Mask i uses seed + i.
        """
        height, width = size or (0, 0)
        request = mask_rendering_pb2.GenerateNucleiMasksRequest(
            model=model, model_version=version, types=list(types), count=count, seed=seed,
            diffusion=diffusion_options(steps, scheduler, guidance_scale), height=height, width=width,
        )
        stub = mask_rendering_pb2_grpc.MaskRenderingStub(self._channel("rendering"))
        response = stub.GenerateNucleiMasks(request, timeout=self._timeout(timeout))
        return NucleiMasksOutput(
            class_maps=np.array(tensor_codec.tensor_to_array(response.class_maps, "class_maps")),
            instance_maps=np.array(tensor_codec.tensor_to_array(response.instance_maps, "instance_maps")),
            class_names=tuple(response.class_names),
            model=_model(response.model),
        )

    def _generation(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self._channel("generation"))

    def generate_call(
        self,
        spec: GenerationSpec | Mapping[str, Any],
        *,
        indices: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> grpc.Call:
        """The raw streaming call (iterate it for proto Samples; ``.cancel()`` stops the job)."""
        spec = spec if isinstance(spec, GenerationSpec) else spec_from_dict(spec)
        return self._generation().Generate(request_from_spec(spec, indices), timeout=self._timeout(timeout))

    def generate(
        self,
        spec: GenerationSpec | Mapping[str, Any],
        *,
        indices: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> Iterator[ClientSample]:
        """Stream the job's samples; stopping the iteration (or closing it) cancels the job on the server."""
        call = self.generate_call(spec, indices=indices, timeout=timeout)
        try:
            for message in call:
                yield sample_from_proto(message)
        finally:
            call.cancel()  # no-op when the stream already finished

    def submit_job(self, spec: GenerationSpec | Mapping[str, Any], *, timeout: float | None = None) -> JobStatus:
        spec = spec if isinstance(spec, GenerationSpec) else spec_from_dict(spec)
        return _job(self._generation().SubmitJob(request_from_spec(spec), timeout=self._timeout(timeout)))

    def get_job(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        return _job(self._generation().GetJob(generation_pb2.GetJobRequest(job_id=job_id), timeout=self._timeout(timeout)))

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        return _job(
            self._generation().CancelJob(generation_pb2.CancelJobRequest(job_id=job_id), timeout=self._timeout(timeout))
        )
