"""Transport security and caller authentication for every histosynth gRPC server.

Three independent layers, all configured in ServerConfig (HISTOSYNTH_* variables):

* TLS (``tls_cert`` + ``tls_key``): the server listens on a TLS port only; plaintext
  clients fail the handshake.
* Mutual TLS (``tls_client_ca``, ``tls_require_client_cert``): client certificates are
  verified against the CA; when required, a client without one fails the handshake.
* Bearer token (``auth_token_file``): every call must carry metadata
  ``authorization: Bearer <token>``; others get UNAUTHENTICATED. The token comes from a
  file (a mounted Kubernetes Secret), never from the environment, and is never logged.
  grpc.health.v1.Health is always open, because kubelet gRPC probes cannot send
  metadata; reflection is open only with ``auth_open_reflection``.

Binding a non-loopback address with neither TLS nor a token is refused unless
``allow_insecure_bind`` says the network is protected some other way (a service mesh
terminating mTLS, a private network). Weaker exposed setups start with a warning: a token
over plaintext (anyone on the path can read and replay it), and TLS with neither required
client certificates nor a token (encrypted, but anyone who reaches the port can call).

Files are read once, at start-up, and a missing, unreadable or malformed one raises
ConfigError naming the variable and the path, so a bad Secret mount fails the rollout
instead of the first call.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from services.core import metrics
from services.core.config import ENV_PREFIX, ConfigError, ServerConfig, env_name

_log = logging.getLogger(__name__)

AUTHORIZATION_METADATA_KEY: Final = "authorization"
BEARER_PREFIX: Final = "bearer "
# Short tokens can be guessed; 16 characters of a URL-safe secret are ~96 bits.
MIN_TOKEN_LENGTH: Final = 16
TOKEN_HINT: Final = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
LOOPBACK_NAMES: Final = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes read from the configured files."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    require_client_cert: bool

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.require_client_cert,
        )


def _read_file(field_name: str, path: Path, what: str) -> bytes:
    variable = env_name(ENV_PREFIX, field_name)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{variable}={str(path)!r}: no such file; point it at the {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{variable}={str(path)!r}: is a directory; point it at the {what} file") from None
    except OSError as error:
        raise ConfigError(
            f"{variable}={str(path)!r}: cannot read the {what} ({error.strerror}); check the file's permissions"
        ) from None
    if not data.strip():
        raise ConfigError(f"{variable}={str(path)!r}: the file is empty; it should hold the {what}")
    return data


def _read_pem(field_name: str, path: Path, label: str, what: str) -> bytes:
    """Read a PEM file and check it holds a block whose type ends with ``label``."""
    data = _read_file(field_name, path, what)
    marker = f"{label}-----".encode()
    has_block = any(
        line.startswith(b"-----BEGIN ") and line.rstrip().endswith(marker) for line in data.splitlines()
    )
    if not has_block:
        raise ConfigError(
            f"{env_name(ENV_PREFIX, field_name)}={str(path)!r}: not a PEM {what} (no "
            f"'-----BEGIN ...{label}-----' block); convert DER files with openssl first"
        )
    return data


def load_tls_material(config: ServerConfig) -> TlsMaterial | None:
    """The TLS files of ``config`` read and sanity-checked, or None when TLS is off."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    certificate = _read_pem("tls_cert", config.tls_cert, "CERTIFICATE", "server certificate chain")
    key = _read_pem("tls_key", config.tls_key, "PRIVATE KEY", "server private key")
    check_key_matches_certificate(config.tls_cert, config.tls_key)
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read_pem("tls_client_ca", config.tls_client_ca, "CERTIFICATE", "client CA bundle")
    return TlsMaterial(certificate, key, client_ca, config.tls_require_client_cert)


def check_key_matches_certificate(cert_path: Path, key_path: Path) -> None:
    """ConfigError when the key cannot be used with the certificate (a mismatched pair, an encrypted key).

    gRPC itself only reports such a pair as a failure to add the port ("cannot bind"), which sends
    operators looking for a port conflict; OpenSSL (the stdlib ssl module) names the real problem.
    """
    cert_variable, key_variable = env_name(ENV_PREFIX, "tls_cert"), env_name(ENV_PREFIX, "tls_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def no_password() -> bytes:  # never prompt on a terminal for an encrypted key
        raise ConfigError(
            f"{key_variable}={str(key_path)!r}: the private key is encrypted; gRPC needs an unencrypted key "
            "(decrypt it with openssl and keep the file readable by the server user only)"
        )

    try:
        context.load_cert_chain(str(cert_path), str(key_path), password=no_password)
    except ssl.SSLError as error:
        reason = (error.reason or str(error)).upper()
        if "MISMATCH" in reason:
            raise ConfigError(
                f"{key_variable}={str(key_path)!r} is not the private key of the certificate in "
                f"{cert_variable}={str(cert_path)!r} (key values mismatch); point both at the same pair"
            ) from None
        raise ConfigError(
            f"{cert_variable}={str(cert_path)!r} / {key_variable}={str(key_path)!r}: OpenSSL cannot use this "
            f"certificate and key ({error.reason or error}); check that the key belongs to the certificate"
        ) from None


def read_token_file(path: Path, field_name: str = "auth_token_file") -> str:
    """The bearer token in ``path`` (surrounding whitespace and newline removed)."""
    variable = env_name(ENV_PREFIX, field_name)
    raw = _read_file(field_name, path, "bearer token")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}={str(path)!r}: the token must be printable ASCII; {TOKEN_HINT}") from None
    if any(not char.isprintable() or char.isspace() for char in token):
        raise ConfigError(
            f"{variable}={str(path)!r}: the token holds whitespace or control characters (one token, one line); "
            f"{TOKEN_HINT}"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{variable}={str(path)!r}: the token is {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}; "
            f"{TOKEN_HINT}"
        )
    return token


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the port to this machine only (unknown names count as exposed)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind_exposure(config: ServerConfig, *, tls: bool, auth: bool, client_certs: bool = False) -> None:
    """Refuse (or warn about) a non-loopback bind that lets the network in unprotected.

    ``auth``: a bearer token is required; ``client_certs``: TLS requires client certificates.
    """
    if is_loopback(config.host):
        return
    host_variable = env_name(ENV_PREFIX, "host")
    if not tls and not auth:
        if not config.allow_insecure_bind:
            raise ConfigError(
                f"{host_variable}={config.host!r} exposes the server to the network with neither TLS nor "
                f"authentication; set {env_name(ENV_PREFIX, 'tls_cert')}/{env_name(ENV_PREFIX, 'tls_key')} "
                f"and/or {env_name(ENV_PREFIX, 'auth_token_file')}, bind 127.0.0.1, or set "
                f"{env_name(ENV_PREFIX, 'allow_insecure_bind')}=1 if the network is protected another way "
                "(e.g. a service mesh with mTLS)"
            )
        _log.warning(
            "INSECURE: serving plaintext gRPC without authentication on %s (%s=1); anyone who can reach "
            "this port can call every API",
            config.host,
            env_name(ENV_PREFIX, "allow_insecure_bind"),
        )
    elif tls and not auth and not client_certs:
        _log.warning(
            "TLS without caller authentication on %s: traffic is encrypted, but any client that reaches this "
            "port can call every API; set %s or %s=true to restrict callers",
            config.host,
            env_name(ENV_PREFIX, "auth_token_file"),
            env_name(ENV_PREFIX, "tls_require_client_cert"),
        )
    elif auth and not tls:
        _log.warning(
            "bearer tokens travel in plaintext on %s: anyone on the network path can read and replay them; "
            "set %s/%s to serve TLS",
            config.host,
            env_name(ENV_PREFIX, "tls_cert"),
            env_name(ENV_PREFIX, "tls_key"),
        )


def _token_digest(token: str | bytes) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the token length too.
    data = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in call metadata, or None."""
    for entry in metadata or ():
        key, value = entry[0], entry[1]
        if key.lower() != AUTHORIZATION_METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if value[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            return value[len(BEARER_PREFIX):].strip()
        return ""  # an authorization entry of another scheme: present but unusable
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with the configured bearer token; ``open_services`` need none.

    Refused calls get UNAUTHENTICATED before their request is even deserialised, and are
    counted in histosynth_grpc_requests_total{code="UNAUTHENTICATED"}.
    """

    def __init__(self, token: str, open_services: Iterable[str]) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._digest = _token_digest(token)
        self._open = frozenset(open_services)

    def accepts(self, metadata: Iterable[Any] | None) -> str | None:
        """None when ``metadata`` carries the right token, else the message for the caller."""
        presented = bearer_token(metadata)
        if presented is None:
            return (
                "missing bearer token: send call metadata 'authorization: Bearer <token>' with the token "
                f"from the server's {env_name(ENV_PREFIX, 'auth_token_file')} (clients.client.HistosynthClient(token=...))"
            )
        if not hmac.compare_digest(_token_digest(presented), self._digest):
            return (
                "invalid bearer token: the 'authorization: Bearer <token>' metadata does not match the server's "
                "token; check which Secret your client reads (tokens are compared exactly, case-sensitive)"
            )
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        from services.core.grpc_server import split_method  # grpc_server imports this module

        service, method = split_method(handler_call_details.method)
        if service in self._open:
            return await continuation(handler_call_details)
        problem = self.accepts(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        # Unknown methods are refused the same way: answering UNIMPLEMENTED before the token check
        # would let an anonymous caller enumerate the API. (The lookup only keeps made-up method
        # names out of the metric labels.)
        if await continuation(handler_call_details) is None:
            service, method = "unknown", "unknown"
        metrics.GRPC_REQUESTS.labels(service, method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
        return _refusing_handler(problem, service, method)


def _refusing_handler(message: str, service: str, method: str) -> grpc.RpcMethodHandler:
    """A handler that aborts with UNAUTHENTICATED without reading the request.

    It is registered as stream-stream: on the wire every gRPC call is a stream, so it answers
    unary and streaming calls (and methods that do not exist) alike, and no request bytes of an
    unauthenticated caller are ever parsed.
    """

    async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        _log.warning(
            "refused unauthenticated call to %s/%s",
            service[:200],
            method[:200],
            extra={"service": service[:200], "method": method[:200], "code": "UNAUTHENTICATED",
                   "peer": context.peer()},
        )
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(refuse)
