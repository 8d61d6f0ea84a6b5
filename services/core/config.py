"""Typed, frozen server settings read once from ``HISTOSYNTH_*`` environment variables.

Every field of a settings dataclass is one variable: field ``max_batch_size`` is
``HISTOSYNTH_MAX_BATCH_SIZE``. Each field documents itself (``metadata["doc"]``) and may
carry a check; a bad value raises ConfigError naming the variable and the value, so a
typo in a Helm chart fails at start-up instead of at the first request.

Services with settings of their own declare another frozen dataclass with the same
field conventions and load it with :func:`load_settings`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, Union

from services.core.logging import LOG_FORMATS
from services.core.runtimes.base import RuntimeOptions, parse_device

ENV_PREFIX: Final = "HISTOSYNTH_"
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Values that switch off an optional setting (e.g. HISTOSYNTH_METRICS_PORT=off).
_NONE_WORDS: Final = frozenset({"", "none", "off", "disabled"})
_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})

Check = Callable[[Any], "str | None"]  # returns a problem description, or None when fine
SettingsT = TypeVar("SettingsT")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the variable (or field) and the value."""


def setting(default: Any, doc: str, check: Check | None = None) -> Any:
    """Declare a settings field with its documentation and an optional value check."""
    return field(default=default, metadata={"doc": doc, "check": check})


# ----------------------------------------------------------------------- checks
def _at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be >= {minimum}"


def _port(value: int | None) -> str | None:
    if value is None or 0 <= value <= 65535:
        return None
    return "must be a TCP port in 0..65535 (0 picks a free port)"


DERIVED_METRICS_PORT = -1  # metrics_port's default: derive it from the gRPC port
METRICS_PORT_BASE = 9464  # the metrics port of the default gRPC port 50051 (Prometheus' exporter range)
DEFAULT_GRPC_PORT = 50051


def derived_metrics_port(grpc_port: int) -> int:
    """50051 -> 9464 and so on upwards; 0 (a free gRPC port) -> 0 (a free metrics port)."""
    if grpc_port == 0:
        return 0
    offset = DEFAULT_GRPC_PORT - METRICS_PORT_BASE
    return grpc_port - offset if grpc_port > offset else grpc_port + 10000


DERIVED_HTTP_PORT = -1  # http_port's default: derive it from the gRPC port
HTTP_PORT_BASE = 8000  # the KServe v2 REST port of the default gRPC port 50051 (Triton's HTTP port)


def derived_http_port(grpc_port: int) -> int:
    """50051 -> 8000 and so on upwards (as the metrics port is derived); 0 (a free gRPC port) -> 0.

    gRPC ports whose offset port would fall below 1024 (privileged) map to gRPC port + 20000 instead
    (+ 20000, not the metrics port's + 10000, so the two derived ports of one server never meet)."""
    if grpc_port == 0:
        return 0
    port = grpc_port - (DEFAULT_GRPC_PORT - HTTP_PORT_BASE)
    return port if port >= 1024 else grpc_port + 20000


def _devices(value: tuple[str, ...]) -> str | None:
    if not value:
        return "needs at least one device"
    for device in value:
        try:
            parse_device(device)
        except ValueError as error:
            return str(error)
    if len(set(value)) != len(value):
        return "lists a device twice"
    return None


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _memory_budget(value: str | None) -> str | None:
    from services.core.memory import memory_budget_problem  # memory imports errors only; keep config light

    return memory_budget_problem(value)


def _runtime_choice(value: str | None) -> str | None:
    from services.core.runtimes.selection import ENGINE_CHOICES, parse_choice

    try:
        parse_choice(value, ENGINE_CHOICES, "runtime")
    except ValueError as error:
        return str(error)
    return None


def _precision_choice(value: str | None) -> str | None:
    from services.core.runtimes.base import PRECISIONS
    from services.core.runtimes.selection import parse_choice

    try:
        parse_choice(value, PRECISIONS, "precision")
    except ValueError as error:
        return str(error)
    return None


# --------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ServerConfig:
    """Settings shared by every histosynth gRPC service."""

    model_store: Path = setting(
        Path("model_store"),
        "Root of the model repository, laid out as <name>/<version>/manifest.yaml.",
    )
    devices: tuple[str, ...] = setting(
        ("cpu",),
        "Comma-separated devices to load model instances on, in preference order "
        "(e.g. 'cuda:0,cpu'). A device that cannot be used falls back to CPU and is reported.",
        _devices,
    )
    instances_per_device: int = setting(
        1, "Runtime instances (sessions) per device; on CPU one instance with more threads is faster.",
        _at_least(1),
    )
    max_batch_size: int = setting(
        8, "Largest merged batch the dynamic batcher sends to a runtime; a model's manifest "
        "max_batch_size caps it further.", _at_least(1),
    )
    max_queue_delay_ms: float = setting(
        5.0, "How long the batcher waits for more requests to fill a batch, in milliseconds.",
        _at_least(0.0),
    )
    dispatch_when_idle: bool = setting(
        True,
        "Send a request to its model at once when the model computes nothing, instead of waiting up to "
        "HISTOSYNTH_MAX_QUEUE_DELAY_MS for more requests; requests arriving while it computes still gather "
        "into the next batch. false = always wait (Triton's behaviour).",
    )
    max_queue_size: int = setting(
        256, "Requests waiting per model beyond which new ones are refused with RESOURCE_EXHAUSTED.",
        _at_least(1),
    )
    host: str = setting(
        "127.0.0.1",
        "Address the gRPC, KServe REST and metrics servers bind to. Loopback by default: exposing the "
        "service (e.g. 0.0.0.0 in a container) must be a deliberate setting.",
        _non_empty,
    )
    port: int = setting(50051, "gRPC port; 0 picks a free port.", _port)
    metrics_port: int | None = setting(
        -1,
        "Prometheus /metrics HTTP port; 0 picks a free port, 'off' disables the endpoint. -1 (default) derives "
        "it from HISTOSYNTH_PORT / --port: gRPC port - 40587 (50051 -> 9464, 50052 -> 9465, ...; gRPC ports "
        "below 40588: + 10000), so servers started on different gRPC ports never fight over one metrics port.",
        lambda value: None if value == DERIVED_METRICS_PORT else _port(value),
    )
    http_port: int | None = setting(
        -1,
        "KServe v2 REST (HTTP/JSON + binary tensors) port of a server that speaks KServe v2 (refinement, "
        "rendering), served by the same process and event loop as gRPC, with the same TLS and token; 0 picks "
        "a free port, 'off' disables it. -1 (default) derives it from HISTOSYNTH_PORT / --port: gRPC port - "
        "42051 (50051 -> 8000, 50052 -> 8001, ...; where that is below 1024: gRPC port + 20000). `serve --all` "
        "with an explicit port adds each service's port offset to it.",
        lambda value: None if value == DERIVED_HTTP_PORT else _port(value),
    )
    max_message_bytes: int = setting(
        64 * 1024 * 1024,
        "Largest gRPC message sent or received, in bytes; bigger requests fail with RESOURCE_EXHAUSTED.",
        _at_least(1024),
    )
    max_concurrent_rpcs: int | None = setting(
        1024,
        "Calls (unary and streaming, health watches included) the server handles at once; beyond it gRPC "
        "refuses new calls with RESOURCE_EXHAUSTED before they are read, so overload cannot pile up "
        "unbounded work in memory ahead of the model queues. 'off' removes the bound.",
        lambda value: None if value is None or value >= 1 else "must be >= 1 (or 'off')",
    )
    intra_op_threads: int = setting(
        0, "Threads inside one operator of a runtime (ONNX Runtime intra-op pool); 0 = library default.",
        _at_least(0),
    )
    runtime: str | None = setting(
        None,
        "Engine for ONNX models: onnxruntime (default), openvino (CPU fast path) or auto (openvino where "
        "installed); per model with name=engine, comma-separated (e.g. 'openvino,mask-refiner=onnxruntime'). "
        "Unset: the manifest's metadata.serving.runtime, else onnxruntime.",
        _runtime_choice,
    )
    precision: str | None = setting(
        None,
        "Inference precision: fp32 (default) or bf16, per model with name=precision like HISTOSYNTH_RUNTIME. "
        "A model loads at bf16 only with a passing check for its runtime in precision_checks.yaml beside its "
        "manifest (scripts/check_precision.py); otherwise it is NOT_SERVING. Unset: metadata.serving.precision.",
        _precision_choice,
    )
    drain_grace_s: float = setting(
        10.0, "On SIGTERM/SIGINT: seconds in-flight calls get to finish before the server stops.",
        _at_least(0.0),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = setting(
        "INFO", f"Root log level: one of {', '.join(LOG_LEVELS)}."
    )
    log_format: Literal["json", "text"] = setting(
        "json", f"Log line format: {' or '.join(LOG_FORMATS)} (JSON lines for log pipelines)."
    )
    # ------------------------------------------------------------------ security
    # Files are read once at start-up (start_server); a missing or malformed file stops
    # the server with an error naming the variable and the path.
    tls_cert: Path | None = setting(
        None,
        "PEM certificate chain the gRPC server presents; set together with HISTOSYNTH_TLS_KEY to serve "
        "TLS only (no plaintext port). 'off' (default) serves plaintext.",
    )
    tls_key: Path | None = setting(
        None, "PEM private key of HISTOSYNTH_TLS_CERT (keep it readable by the server user only)."
    )
    tls_client_ca: Path | None = setting(
        None,
        "PEM CA bundle that client certificates are verified against (mutual TLS); needs HISTOSYNTH_TLS_CERT. "
        "Without HISTOSYNTH_TLS_REQUIRE_CLIENT_CERT a client may still connect without a certificate.",
    )
    tls_require_client_cert: bool = setting(
        False,
        "Refuse TLS handshakes from clients without a certificate signed by HISTOSYNTH_TLS_CLIENT_CA (mTLS).",
    )
    auth_token_file: Path | None = setting(
        None,
        "File holding the bearer token every call must send as metadata 'authorization: Bearer <token>' "
        "(a file, e.g. a mounted Kubernetes Secret, so the token never sits in the environment or logs). "
        "grpc.health.v1.Health stays open for kubelet probes. Read at start; rotate by restarting.",
    )
    auth_open_reflection: bool = setting(
        False,
        "With HISTOSYNTH_AUTH_TOKEN_FILE set, also serve server reflection without a token "
        "(by default reflection needs the token like every API call: it lists the whole API).",
    )
    allow_insecure_bind: bool = setting(
        False,
        "Allow binding a non-loopback HISTOSYNTH_HOST with neither TLS nor a bearer token (e.g. behind a "
        "service mesh that terminates mTLS). Without it such a server refuses to start.",
    )

    # ------------------------------------------------------------ resource safety
    memory_budget: str | None = setting(
        None,
        "Per-process budget for request working memory, in bytes or with a unit (e.g. 6GiB, 6000M). Every "
        "model call is estimated from its manifest's memory model (metadata.memory: bytes per pixel, per "
        "attention token^2, per row; derived from the I/O tensors when absent) before it runs: a call whose "
        "estimate exceeds the budget, or does not fit beside the calls in flight, gets RESOURCE_EXHAUSTED "
        "naming this limit, and the diffusion engine packs no more rows than fit. Unset = 75% of the "
        "cgroup's memory.max, or of the host's MemTotal without a cgroup limit. All services of one process "
        "(histosynth serve --all) share it.",
        _memory_budget,
    )
    strict_models: bool = setting(
        True,
        "A model that fails its checksum, fails to load, or falls back from its requested device (e.g. "
        "cuda:0 -> cpu) makes its server's grpc.health NOT_SERVING (the log names the model; "
        "histosynth_model_not_serving_total counts it). 0/false: log it and serve the rest anyway.",
    )

    # ----------------------------------------------------------------- diffusion
    diffusion_step_batching: bool = setting(
        True,
        "Diffusion models: batch denoising steps of different requests (at different timesteps) into one "
        "denoiser call, so new requests join at the next step. false = request-level batching: a batch of "
        "requests runs start to finish and newcomers wait (the benchmark baseline).",
    )
    diffusion_max_rows: int | None = setting(
        None,
        "Diffusion models: most rows per denoiser call (classifier-free guidance takes 2 rows per sample); "
        "unset = the model manifest's max_batch_size.",
        lambda value: None if value is None or value >= 1 else "must be >= 1",
    )
    diffusion_max_active: int = setting(
        32,
        "Diffusion models: samples denoised concurrently per model; more wait in the admission queue "
        "(bounded by HISTOSYNTH_MAX_QUEUE_SIZE, beyond which RESOURCE_EXHAUSTED).",
        _at_least(1),
    )

    def __post_init__(self) -> None:
        check_settings(self)
        self._check_security_settings()

    def _check_security_settings(self) -> None:
        """Combinations that would silently serve less securely than asked for."""
        cert, key = env_name(ENV_PREFIX, "tls_cert"), env_name(ENV_PREFIX, "tls_key")
        if (self.tls_cert is None) != (self.tls_key is None):
            given = cert if self.tls_cert is not None else key
            raise ConfigError(f"{given} is set but not its pair: set both {cert} and {key}, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                f"{env_name(ENV_PREFIX, 'tls_client_ca')}={str(self.tls_client_ca)!r}: client certificates "
                f"need a TLS server; also set {cert} and {key}"
            )
        if self.tls_require_client_cert and self.tls_client_ca is None:
            raise ConfigError(
                f"{env_name(ENV_PREFIX, 'tls_require_client_cert')}=true needs "
                f"{env_name(ENV_PREFIX, 'tls_client_ca')} (the CA that signs accepted client certificates)"
            )

    @property
    def resolved_metrics_port(self) -> int | None:
        """The metrics port to bind: the explicit setting, or the one derived from ``port`` (see metrics_port)."""
        if self.metrics_port != DERIVED_METRICS_PORT:
            return self.metrics_port
        return derived_metrics_port(self.port)

    @property
    def resolved_http_port(self) -> int | None:
        """The KServe v2 REST port to bind: the explicit setting, or the one derived from ``port`` (see http_port)."""
        if self.http_port != DERIVED_HTTP_PORT:
            return self.http_port
        return derived_http_port(self.port)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_env(
        cls,
        prefix: str = ENV_PREFIX,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ServerConfig:
        """Read settings from ``environ`` (default os.environ); ``overrides`` (by field name) win."""
        return load_settings(cls, prefix=prefix, overrides=overrides, environ=environ)

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(intra_op_threads=self.intra_op_threads)


# ---------------------------------------------------------------------- loading
def env_name(prefix: str, field_name: str) -> str:
    return f"{prefix}{field_name.upper()}"


def describe_settings(cls: type, prefix: str = ENV_PREFIX) -> list[tuple[str, str, str]]:
    """(variable, default, doc) for each field: what ``--help`` or a README table shows."""
    rows = []
    for item in dataclasses.fields(cls):
        default = item.default
        if isinstance(default, tuple):
            default = ",".join(str(part) for part in default)
        rows.append((env_name(prefix, item.name), str(default), item.metadata.get("doc", "")))
    return rows


def check_settings(settings: Any, names: Mapping[str, str] | None = None) -> None:
    """Run every field's type check and value check; ``names`` maps fields to the labels used in errors."""
    hints = typing.get_type_hints(type(settings))
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        label = (names or {}).get(item.name, item.name)
        problem = _field_problem(item, value, hints[item.name])
        if problem is not None:
            raise ConfigError(f"{label}={value!r}: {problem}")


def load_settings(
    cls: type[SettingsT],
    prefix: str = ENV_PREFIX,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> SettingsT:
    """Build a frozen settings dataclass from environment variables plus overrides.

    Override values may be strings (parsed like the variable) or values of the field's type.
    """
    environ = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(cls)
    field_names = [item.name for item in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(field_names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid: {field_names}")

    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    shown: dict[str, Any] = {}  # the value as given, for error messages
    for name in field_names:
        variable = env_name(prefix, name)
        if name in overrides:
            raw, label = overrides[name], f"override {name}"
        elif variable in environ:
            raw, label = environ[variable], variable
        else:
            continue
        labels[name] = label
        shown[name] = raw
        if isinstance(raw, str):
            try:
                values[name] = _parse(raw, hints[name])
            except ValueError as error:
                raise ConfigError(f"{label}={raw!r}: {error}") from None
        else:
            values[name] = tuple(raw) if isinstance(raw, list) else raw

    # Check here, where the variable names are known, before the dataclass' own check.
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        if item.name in values:
            problem = _field_problem(item, values[item.name], hints[item.name])
            if problem is not None:
                raise ConfigError(f"{labels[item.name]}={shown[item.name]!r}: {problem}")
    return cls(**values)


def _field_problem(item: dataclasses.Field[Any], value: Any, annotation: Any) -> str | None:
    problem = _type_problem(value, annotation)
    if problem is None and item.metadata.get("check") is not None:
        problem = item.metadata["check"](value)
    return problem


def _parse(raw: str, annotation: Any) -> Any:
    """Parse one variable's text into the field's type; raises ValueError saying what was expected."""
    text = raw.strip()
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        if text.lower() in _NONE_WORDS:
            return None
        return _parse(text, inner[0])
    if origin is Literal:
        for choice in args:
            if text.lower() == str(choice).lower():
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if origin is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if annotation is bool:
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise ValueError("expected a boolean (true/false, 1/0, yes/no, on/off)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if annotation is Path:
        if not text:
            raise ValueError("expected a path")
        return Path(text).expanduser()
    if annotation is str:
        return text
    raise TypeError(f"settings field type {annotation!r} has no parser")


def _type_problem(value: Any, annotation: Any) -> str | None:
    """Why ``value`` is not of the field's type, or None; bools are not accepted as numbers."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        problems = [_type_problem(value, arg) for arg in args]
        return None if any(problem is None for problem in problems) else problems[-1]
    if annotation is type(None):
        return None if value is None else "expected nothing (None)"
    if origin is Literal:
        return None if value in args else f"expected one of {', '.join(map(str, args))}"
    if origin is tuple:
        if isinstance(value, tuple) and all(isinstance(part, args[0]) for part in value):
            return None
        return f"expected a tuple of {args[0].__name__}"
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "expected a number"
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "expected an integer"
    if isinstance(annotation, type):
        return None if isinstance(value, annotation) else f"expected {annotation.__name__}"
    return None
