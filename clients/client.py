"""Typed Python client for the histosynth services: numpy in, numpy out.

    from clients.client import HistosynthClient
    with HistosynthClient(base_port=50051) as client:             # `histosynth serve --all` on 127.0.0.1
        fine = client.refine(coarse_masks).fine_masks
        images = client.render(class_maps, model="renderer-he-nuclei").images
        for sample in client.generate("clients/specs/nuclei.yaml"):   # spec file, GenerationSpec or dict
            sample.image, sample.mask, sample.scores
            sample.save("out/")                                    # image/mask/instances PNGs + JSON
        client.consistency(images, class_maps, renderer="renderer-he-nuclei").miou

``base_port`` reaches the ports ``serve --all`` uses (base + SERVE_ALL_PORT_OFFSETS[service], on ``target``'s
host, default 127.0.0.1); ``targets={"refinement": ..., "rendering": ..., "generation": ..., "scoring": ...}``
names one address per service; a lone ``target`` serves every service (one server hosting them all, or a
proxy in front). Servers started with TLS
and/or a bearer token (HISTOSYNTH_TLS_*, HISTOSYNTH_AUTH_TOKEN_FILE) are reached with
``HistosynthClient(target, channel_credentials=tls_credentials(ca_file, cert_file, key_file),
token=...)``. Errors arrive as :class:`HistosynthRpcError` subclasses by status (InvalidArgument,
NotFound, ResourceExhausted, Unavailable, ...): still ``grpc.RpcError`` with ``code()`` and
``details()`` (the server's actionable message), so either can be caught.
"""

from __future__ import annotations

import functools
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
    scoring_pb2,
    scoring_pb2_grpc,
)
from services.diffusion.pipeline import DiffusionOptions
from services.generation.spec import FractionRange, GenerationSpec, StratumSpec

SERVICES = ("refinement", "rendering", "generation", "scoring")
# `histosynth serve --all` ports: base + offset (services.all_in_one.PORT_OFFSETS; a test keeps them equal).
SERVE_ALL_PORT_OFFSETS = {"refinement": 0, "rendering": 1, "generation": 2, "scoring": 3}
JOB_STATES = {
    generation_pb2.JOB_STATE_UNSPECIFIED: "unspecified",
    generation_pb2.JOB_STATE_QUEUED: "queued",
    generation_pb2.JOB_STATE_RUNNING: "running",
    generation_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    generation_pb2.JOB_STATE_FAILED: "failed",
    generation_pb2.JOB_STATE_CANCELLED: "cancelled",
}
_MESSAGE_LIMIT = 64 * 1024 * 1024


# -------------------------------------------------------------------------- errors
class HistosynthRpcError(grpc.RpcError, Exception):
    """A call failed: ``code()`` is the gRPC status, ``details()`` the server's message (what to do next)."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {details}")
        self._code, self._details, self.method = code, details, method

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InvalidArgumentError(HistosynthRpcError, ValueError):
    """The request is malformed (shape, dtype, spec field); fix it, do not retry as is."""


class NotFoundError(HistosynthRpcError, LookupError):
    """Unknown model, version or job."""


class FailedPreconditionError(HistosynthRpcError):
    """The server lacks what the request needs (a peer service, a segmenter for the gate)."""


class ResourceExhaustedError(HistosynthRpcError):
    """Queue full, memory budget or message size exceeded: back off, send less, or add replicas."""


class UnavailableError(HistosynthRpcError, ConnectionError):
    """The server (or one of its peers) cannot be reached or is draining: retry later or elsewhere."""


class DeadlineExceededError(HistosynthRpcError, TimeoutError):
    """The call's deadline passed."""


class UnauthenticatedError(HistosynthRpcError, PermissionError):
    """Missing or wrong bearer token / client certificate."""


class CancelledError(HistosynthRpcError):
    """The call or its job was cancelled."""


ERRORS_BY_STATUS: dict[grpc.StatusCode, type[HistosynthRpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: UnauthenticatedError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def typed_error(error: grpc.RpcError, method: str = "") -> HistosynthRpcError:
    """The typed error of a failed call (HistosynthRpcError for statuses without a subclass)."""
    if isinstance(error, HistosynthRpcError):
        return error
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    return ERRORS_BY_STATUS.get(code, HistosynthRpcError)(code, details, method)


def _typed_errors(method: Any) -> Any:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as error:
            raise typed_error(error, method.__name__) from None

    return call


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

    def record(self) -> dict[str, Any]:
        """The sample's JSON metadata (what save() and `histosynth generate` write beside the PNGs)."""
        return {
            "index": self.index,
            "stratum": self.stratum,
            "class_names": list(self.class_names),
            "scores": dict(sorted(self.scores.items())),
            "provenance": self.provenance,
        }

    def save(self, directory: str | Path) -> Path:
        """Write NNNNNN_image.png (the server's PNG bytes, unchanged), NNNNNN_mask.png (uint8),
        NNNNNN_instances.png (uint16) and NNNNNN.json (last) into ``directory``; returns the JSON path.
        The layout of a server sink and of `histosynth generate`, so the same readers work."""
        from services.generation.sink import SampleWriter

        return SampleWriter(directory).write(self.index, self.image_png, self.mask, self.instances, self.record())


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
    "min_consistency", "sink_uri", "model_versions", "diffusion", "stain_variation", "stain_source",
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
        stain_variation=bool(data.get("stain_variation", False)),
        stain_source=str(data.get("stain_source", "")),
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
        stain_variation=spec.stain_variation,
        stain_source=spec.stain_source,
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


SpecLike = GenerationSpec | Mapping[str, Any] | str | Path


def load_spec_file(path: str | Path) -> GenerationSpec:
    """A YAML spec file (the format of clients/specs/*.yaml) as a GenerationSpec; errors name the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ValueError(f"spec file {str(path)!r}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ValueError(f"spec file {str(path)!r}: not valid YAML ({error})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"spec file {str(path)!r}: expected a mapping of spec fields, got {type(data).__name__}")
    try:
        return spec_from_dict(data)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"spec file {str(path)!r}: {error}") from None


def as_spec(spec: SpecLike) -> GenerationSpec:
    if isinstance(spec, GenerationSpec):
        return spec
    if isinstance(spec, (str, Path)):
        return load_spec_file(spec)
    return spec_from_dict(spec)


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


@dataclass(frozen=True)
class ConsistencyOutput:
    miou: np.ndarray  # float64 [N]: per image, mean IoU over the classes present in mask or prediction
    passed: np.ndarray  # bool [N]: miou >= min_miou
    mean_miou: float
    segmenter: ModelInfo
    predictions: np.ndarray | None  # uint8 [N, H, W] segmenter class maps, when asked for


def _image_set(images: np.ndarray | Sequence[bytes]) -> scoring_pb2.ImageSet:
    """uint8 [N, H, W, 3] (or [H, W, 3]) RGB arrays, or a list of PNG bytes."""
    if isinstance(images, np.ndarray):
        return scoring_pb2.ImageSet(images=tensor_codec.array_to_tensor(np.asarray(images, np.uint8)))
    return scoring_pb2.ImageSet(png_images=list(images))


def _message_dict(message: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


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
    # `histosynth serve --all --port BASE`: every service at BASE + SERVE_ALL_PORT_OFFSETS[service] on
    # ``target``'s host (``target`` is then a host name, default 127.0.0.1); ``targets`` still win.
    base_port: int | None = None
    # TLS / mutual TLS to servers started with HISTOSYNTH_TLS_*: see tls_credentials(); None = plaintext.
    channel_credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)
    # Bearer token for servers started with HISTOSYNTH_AUTH_TOKEN_FILE, sent on every call as
    # 'authorization: Bearer <token>'. Kept out of repr() so it never lands in a log line.
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(SERVICES))
        if unknown:
            raise ValueError(f"targets: unknown service(s) {unknown}; valid: {list(SERVICES)}")
        if self.base_port is not None:
            if not 0 < self.base_port <= 65535 - max(SERVE_ALL_PORT_OFFSETS.values()):
                raise ValueError(f"base_port={self.base_port}: must leave room for every service's port")
            host = self.target or "127.0.0.1"
            if ":" in host and not host.startswith("["):
                raise ValueError(f"with base_port, target is a host name without a port, got {host!r}")
            derived = {name: f"{host}:{self.base_port + offset}" for name, offset in SERVE_ALL_PORT_OFFSETS.items()}
            self.targets = {**derived, **dict(self.targets)}
            self.target = ""
        if not self.target and not self.targets:
            raise ValueError("give a target 'host:port', base_port (serve --all), or targets per service")
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
    @_typed_errors
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

    @_typed_errors
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
        stain_variation: bool = False,
        stain_source: str = "",
        timeout: float | None = None,
    ) -> RenderOutput:
        """``steps``/``scheduler``/``guidance_scale`` apply to diffusion renderers (None = model default).
        ``stain_variation`` gives each render the H&E levels of a real training crop (models with a stain bank),
        drawn among ``stain_source``'s crops (e.g. "monuseg"; "" = all)."""
        request = mask_rendering_pb2.RenderRequest(
            model=model, model_version=version, seed=seed, noise_spacing=noise_spacing,
            stain_variation=stain_variation, stain_source=stain_source,
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

    @_typed_errors
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

    # ---------------------------------------------------------------- scoring
    def _scoring(self) -> scoring_pb2_grpc.ScoringStub:
        return scoring_pb2_grpc.ScoringStub(self._channel("scoring"))

    @_typed_errors
    def score_images(
        self,
        real: np.ndarray | Sequence[bytes],
        synthetic: np.ndarray | Sequence[bytes],
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """FID / KID / precision-recall of ``synthetic`` against ``real`` (uint8 [N, H, W, 3] or PNG bytes).

        ``options``: DistributionOptions fields (extractor, kid_subsets, bootstrap, seed, ...). Returns the
        DistributionScores message as a dict (field names as in scoring.proto)."""
        request = scoring_pb2.ScoreImagesRequest(
            real=_image_set(real), synthetic=_image_set(synthetic), options=scoring_pb2.DistributionOptions(**options)
        )
        return _message_dict(self._scoring().ScoreImages(request, timeout=self._timeout(timeout)))

    @_typed_errors
    def score_masks(
        self, real_masks: np.ndarray, synthetic_masks: np.ndarray, *, timeout: float | None = None, **options: Any
    ) -> dict[str, Any]:
        """Per-object shape statistics of two mask sets (KS / Jensen-Shannon per feature and class).

        ``options``: ScoreMasksRequest fields (class_ids, connectivity, bins, ...); returns MaskScores as a dict."""
        request = scoring_pb2.ScoreMasksRequest(
            real_masks=tensor_codec.array_to_tensor(np.asarray(real_masks)),
            synthetic_masks=tensor_codec.array_to_tensor(np.asarray(synthetic_masks)),
            **options,
        )
        return _message_dict(self._scoring().ScoreMasks(request, timeout=self._timeout(timeout)))

    @_typed_errors
    def consistency(
        self,
        images: np.ndarray | Sequence[bytes],
        conditioning_masks: np.ndarray,
        *,
        renderer: str = "",
        segmenter: str = "",
        segmenter_version: str = "",
        min_miou: float = 0.0,
        return_predictions: bool = False,
        timeout: float | None = None,
    ) -> ConsistencyOutput:
        """Does a segmenter find each image's conditioning mask again? (mIoU per image; the generation gate)."""
        request = scoring_pb2.ConsistencyRequest(
            images=_image_set(images),
            conditioning_masks=tensor_codec.array_to_tensor(np.asarray(conditioning_masks)),
            renderer=renderer, segmenter=segmenter, segmenter_version=segmenter_version, min_miou=min_miou,
            return_predictions=return_predictions,
        )
        response = self._scoring().Consistency(request, timeout=self._timeout(timeout))
        predictions = None
        if response.HasField("predictions") and response.predictions.shape:
            predictions = np.array(tensor_codec.tensor_to_array(response.predictions, "predictions"))
        return ConsistencyOutput(
            miou=np.array(response.miou, np.float64), passed=np.array(response.passed, bool),
            mean_miou=float(response.mean_miou), segmenter=_model(response.segmenter), predictions=predictions,
        )

    @_typed_errors
    def tumor_proportion(
        self,
        class_maps: np.ndarray,
        *,
        positive_id: int,
        negative_id: int,
        instance_maps: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """PD-L1 / Ki67 tumour proportion score and clinical bin per map (cells counted with instance maps)."""
        request = scoring_pb2.TumorProportionRequest(
            class_maps=tensor_codec.array_to_tensor(np.asarray(class_maps)),
            classes=scoring_pb2.TpsClasses(positive_class_id=positive_id, negative_class_id=negative_id),
        )
        if instance_maps is not None:
            request.instance_maps.CopyFrom(tensor_codec.array_to_tensor(np.asarray(instance_maps)))
        response = self._scoring().TumorProportion(request, timeout=self._timeout(timeout))
        return [_message_dict(score) for score in response.scores]

    def _generation(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self._channel("generation"))

    def generate_call(
        self,
        spec: SpecLike,
        *,
        indices: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> grpc.Call:
        """The raw streaming call (iterate it for proto Samples; ``.cancel()`` stops the job)."""
        spec = as_spec(spec)
        return self._generation().Generate(request_from_spec(spec, indices), timeout=self._timeout(timeout))

    def generate(
        self,
        spec: SpecLike,
        *,
        indices: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> Iterator[ClientSample]:
        """Stream the job's samples; stopping the iteration (or closing it) cancels the job on the server.

        ``spec``: a GenerationSpec, a YAML-style dict, or the path of a YAML spec file (clients/specs/)."""
        call = self.generate_call(spec, indices=indices, timeout=timeout)
        try:
            try:
                for message in call:
                    yield sample_from_proto(message)
            except grpc.RpcError as error:
                raise typed_error(error, "generate") from None
        finally:
            call.cancel()  # no-op when the stream already finished

    @_typed_errors
    def submit_job(self, spec: SpecLike, *, timeout: float | None = None) -> JobStatus:
        spec = as_spec(spec)
        return _job(self._generation().SubmitJob(request_from_spec(spec), timeout=self._timeout(timeout)))

    @_typed_errors
    def get_job(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        return _job(self._generation().GetJob(generation_pb2.GetJobRequest(job_id=job_id), timeout=self._timeout(timeout)))

    @_typed_errors
    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        return _job(
            self._generation().CancelJob(generation_pb2.CancelJobRequest(job_id=job_id), timeout=self._timeout(timeout))
        )
