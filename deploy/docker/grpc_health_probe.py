"""Container health check: one grpc.health.v1 ``Check`` against the server in this container.

Docker's HEALTHCHECK runs it; Kubernetes runs it as an exec probe when the server speaks TLS
(kubelet's native gRPC probe is plaintext only). Exit status 0 when the answer is SERVING,
1 otherwise (NOT_SERVING while models load or during a drain, unreachable, handshake refused,
timeout), with one line on stderr saying why.

The target comes from the variables the server reads (HISTOSYNTH_HOST, HISTOSYNTH_PORT); a
wildcard bind address (0.0.0.0, ::) is probed on loopback. When the server has TLS
(HISTOSYNTH_TLS_CERT set) the probe dials TLS too:

* ``--tls-ca`` is the CA bundle to verify the server with; by default the server's own
  certificate (HISTOSYNTH_TLS_CERT) is the trust anchor, which gRPC accepts, so a pod needs
  nothing beyond the certificate it already serves;
* ``--tls-server-name`` is a name in that certificate (default ``localhost``), since the probe
  dials an IP address;
* with HISTOSYNTH_TLS_REQUIRE_CLIENT_CERT the probe needs a client certificate the server
  accepts: ``--tls-client-cert``/``--tls-client-key``, by default the server's own pair
  (which works when it was issued for client authentication too).

Health is always open to callers without a bearer token (services/core/security.py), so no
token is needed. The service name is the first argument; empty (the default) asks for the
server's overall status.

    python grpc_health_probe.py [SERVICE] [--timeout S] [--tls-ca PEM] [--tls-server-name NAME]

Standalone on purpose: it imports only grpcio and grpcio-health-checking, so it works from
any directory in the image and needs nothing of the project on sys.path.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_HOST = "127.0.0.1"  # ServerConfig.host default
DEFAULT_PORT = "50051"  # ServerConfig.port default
DEFAULT_TLS_SERVER_NAME = "localhost"
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]"})
_NONE_WORDS = frozenset({"", "none", "off", "disabled"})  # as services/core/config.py reads them
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class ProbeTls:
    """What the probe needs to dial a TLS server: trust anchors, the name to verify, maybe a client pair."""

    root_certificates: Path
    server_name: str
    client_cert: Path | None = None
    client_key: Path | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates.read_bytes(),
            private_key=None if self.client_key is None else self.client_key.read_bytes(),
            certificate_chain=None if self.client_cert is None else self.client_cert.read_bytes(),
        )


def _setting(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(f"HISTOSYNTH_{name}", "").strip()
    return None if value.lower() in _NONE_WORDS else value


def probe_target(environ: Mapping[str, str]) -> str:
    """``host:port`` the local server listens on, per its HISTOSYNTH_* settings."""
    host = _setting(environ, "HOST") or DEFAULT_HOST
    port = _setting(environ, "PORT") or DEFAULT_PORT
    if host in _WILDCARD_HOSTS:
        host = DEFAULT_HOST
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def probe_tls(environ: Mapping[str, str], args: argparse.Namespace) -> ProbeTls | None:
    """TLS settings for the probe, or None when the server (per its settings) serves plaintext."""
    server_cert = _setting(environ, "TLS_CERT")
    if server_cert is None:
        return None
    client_cert, client_key = args.tls_client_cert, args.tls_client_key
    requires_client_cert = (_setting(environ, "TLS_REQUIRE_CLIENT_CERT") or "").lower() in _TRUE_WORDS
    if requires_client_cert and client_cert is None:
        client_cert, client_key = server_cert, _setting(environ, "TLS_KEY")
    return ProbeTls(
        root_certificates=Path(args.tls_ca or server_cert),
        server_name=args.tls_server_name,
        client_cert=None if client_cert is None else Path(client_cert),
        client_key=None if client_key is None else Path(client_key),
    )


def check(target: str, service: str = "", timeout_s: float = 3.0, tls: ProbeTls | None = None) -> tuple[bool, str]:
    """(serving, description) for one Check call; never raises for RPC or certificate-file failures."""
    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        try:
            credentials = tls.channel_credentials()
        except OSError as error:
            return False, f"{target}: cannot read a TLS file for the probe: {error}"
        channel = grpc.secure_channel(target, credentials, options=(("grpc.ssl_target_name_override", tls.server_name),))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            return False, f"{target} service={service!r}: {error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{target} service={service!r}: {status}"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="grpc.health.v1 Check against the local histosynth server")
    parser.add_argument("service", nargs="?", default="", help="service name; empty = overall status")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up (default 3)")
    parser.add_argument("--tls-ca", help="PEM CA bundle to verify the server with (default: HISTOSYNTH_TLS_CERT)")
    parser.add_argument("--tls-server-name", default=DEFAULT_TLS_SERVER_NAME,
                        help=f"name to verify in the server certificate (default {DEFAULT_TLS_SERVER_NAME})")
    parser.add_argument("--tls-client-cert", help="PEM client certificate for mutual TLS")
    parser.add_argument("--tls-client-key", help="PEM key of --tls-client-cert")
    args = parser.parse_args(argv)
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        parser.error("--tls-client-cert and --tls-client-key go together")
    environ = os.environ if environ is None else environ
    serving, description = check(probe_target(environ), args.service, args.timeout, probe_tls(environ, args))
    if not serving:
        print(f"unhealthy: {description}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
