"""deploy/docker/grpc_health_probe.py (the images' HEALTHCHECK, the chart's TLS exec probe) against real servers.

The probe runs as the container runs it: a separate Python process that reads the server's
HISTOSYNTH_* variables, exit status 0 only for SERVING. Plaintext, bearer-token and TLS / mutual
TLS servers are started on loopback; certificates come from the openssl command line.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.core.config import ServerConfig
from services.core.grpc_server import RunningServer, ServiceRegistration, start_server

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "deploy" / "docker" / "grpc_health_probe.py"
SERVICE = "histosynth.test.Probed"


def _add_nothing(servicer: object, server: grpc.aio.Server) -> None:
    """A registration with no handlers: only its health status matters here."""


async def _start(**overrides: object) -> RunningServer:
    settings: dict[str, object] = dict(host="127.0.0.1", port=0, metrics_port=None, log_format="text", drain_grace_s=0.2)
    settings.update(overrides)
    config = ServerConfig(**settings)  # type: ignore[arg-type]
    return await start_server([ServiceRegistration(_add_nothing, object(), SERVICE)], config)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    running = await _start()
    try:
        yield running
    finally:
        await running.stop()


async def probe(port: int, *args: str, host: str = "0.0.0.0", **settings: str) -> tuple[int, str]:
    """Run the probe in its own process (the server keeps running on this event loop meanwhile)."""
    environ = {"HISTOSYNTH_HOST": host, "HISTOSYNTH_PORT": str(port), "PATH": "/usr/bin:/bin"}
    environ.update({f"HISTOSYNTH_{name.upper()}": value for name, value in settings.items()})
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), *args, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


# ------------------------------------------------------------------------------ plaintext
async def test_serving_server_is_healthy_through_the_wildcard_address(server: RunningServer) -> None:
    # HISTOSYNTH_HOST=0.0.0.0 (what the image sets) is probed on loopback.
    assert await probe(server.port) == (0, "")
    assert await probe(server.port, SERVICE) == (0, "")


async def test_not_serving_and_unknown_services_are_unhealthy(server: RunningServer) -> None:
    await server.set_serving(SERVICE, False)
    code, message = await probe(server.port, SERVICE)
    assert code == 1 and "NOT_SERVING" in message
    code, message = await probe(server.port, "histosynth.v1.Nope")
    assert code == 1 and "NOT_FOUND" in message


async def test_draining_server_is_unhealthy(server: RunningServer) -> None:
    await server.health.enter_graceful_shutdown()  # what the first SIGTERM does
    code, message = await probe(server.port, host="127.0.0.1")
    assert code == 1 and "NOT_SERVING" in message


async def test_nothing_listening_is_unhealthy() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        code, message = await probe(port, "--timeout", "2")
    assert code == 1 and "UNAVAILABLE" in message


async def test_token_protected_server_keeps_health_open(tmp_path: Path) -> None:
    """Kubelet's native gRPC probe sends no metadata; the chart relies on health needing no token."""
    token_file = tmp_path / "token"
    token_file.write_text("probe-test-token-0123456789abcdef\n")
    running = await _start(auth_token_file=token_file)
    try:
        assert await probe(running.port, auth_token_file=str(token_file)) == (0, "")
    finally:
        await running.stop()


# ------------------------------------------------------------------------------------ TLS
@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path  # SAN localhost + 127.0.0.1, usable for server and client authentication
    server_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is needed to make test certificates")
    root = tmp_path_factory.mktemp("probe_pki")
    ec_key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=histosynth probe test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=root)
    _openssl("req", *ec_key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=histosynth", cwd=root)
    (root / "server.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", "server.ext", cwd=root)
    return Certificates(ca=root / "ca.pem", server_cert=root / "server.pem", server_key=root / "server.key")


async def test_tls_server_is_probed_over_tls(certificates: Certificates) -> None:
    running = await _start(tls_cert=certificates.server_cert, tls_key=certificates.server_key)
    tls = {"tls_cert": str(certificates.server_cert), "tls_key": str(certificates.server_key)}
    try:
        assert await probe(running.port, "--tls-ca", str(certificates.ca), **tls) == (0, "")
        # Without a CA the probe trusts the server's own certificate (what a pod has at hand).
        assert await probe(running.port, **tls) == (0, "")
        # A name the certificate does not carry fails verification, and the probe says so.
        code, message = await probe(running.port, "--tls-server-name", "elsewhere.example", **tls)
        assert code == 1 and "UNAVAILABLE" in message
        # A plaintext probe (server settings without TLS) cannot talk to a TLS-only port.
        code, _ = await probe(running.port, "--timeout", "2")
        assert code == 1
    finally:
        await running.stop()


async def test_mutual_tls_server_accepts_the_probe_with_the_pods_own_certificate(certificates: Certificates) -> None:
    running = await _start(tls_cert=certificates.server_cert, tls_key=certificates.server_key,
                           tls_client_ca=certificates.ca, tls_require_client_cert=True)
    tls = {"tls_cert": str(certificates.server_cert), "tls_key": str(certificates.server_key),
           "tls_client_ca": str(certificates.ca)}
    try:
        assert await probe(running.port, "--tls-ca", str(certificates.ca), tls_require_client_cert="true", **tls) == (0, "")
        # Told the server does not require a client certificate, the probe offers none and is refused.
        code, _ = await probe(running.port, "--tls-ca", str(certificates.ca), "--timeout", "2", **tls)
        assert code == 1
    finally:
        await running.stop()


async def test_unreadable_tls_file_is_reported() -> None:
    code, message = await probe(50051, tls_cert="/nonexistent/tls.crt", tls_key="/nonexistent/tls.key")
    assert code == 1 and "cannot read a TLS file" in message
