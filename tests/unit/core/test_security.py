"""TLS, mutual TLS and bearer-token auth on real gRPC servers over loopback.

A CA, a server certificate (for 127.0.0.1 / localhost), a client certificate and a
certificate from a second, untrusted CA are generated at test time with ``cryptography``;
every check goes through the real server bootstrap (start_server), real handshakes and real
metadata on the wire.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.core.config import ConfigError, ServerConfig
from services.core.grpc_server import RunningServer, ServiceRegistration, start_server
from services.core.security import BearerTokenInterceptor, bearer_token, check_bind_exposure, is_loopback

x509 = pytest.importorskip("cryptography.x509", reason="test certificates are generated with `cryptography`")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SERVICE = "histosynth.test.Echo"
TOKEN = "s3cret-token-for-tests-0123456789"


# ------------------------------------------------------------------ certificates
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the server does not trust
    rogue_key: Path

    def read(self, *paths: Path) -> list[bytes]:
        return [path.read_bytes() for path in paths]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("histosynth test CA", ca_key, None, ca_key, ca=True)
    rogue_ca = _certificate("rogue CA", rogue_ca_key, None, rogue_ca_key, ca=True)
    files: dict[str, bytes] = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    for stem, issuer, issuer_key, server in (
        ("server", ca, ca_key, True),
        ("client", ca, ca_key, False),
        ("rogue", rogue_ca, rogue_ca_key, False),
    ):
        key = _key()
        cert = _certificate(f"histosynth {stem}", key, issuer.subject, issuer_key, server=server)
        files[f"{stem}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{stem}.key"] = _pem_key(key)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return Pki(
        ca=root / "ca.pem", server_cert=root / "server.pem", server_key=root / "server.key",
        client_cert=root / "client.pem", client_key=root / "client.key",
        rogue_cert=root / "rogue.pem", rogue_key=root / "rogue.key",
    )


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")  # a trailing newline, as `echo` or a Secret editor leaves it
    return path


# ---------------------------------------------------------------------- servers
class EchoServicer:
    async def Echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def Count(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for index in range(int(request.decode())):
            yield str(index).encode()


def _add_echo(servicer: EchoServicer, server: grpc.aio.Server) -> None:
    identity = lambda payload: payload  # noqa: E731  raw bytes in and out
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            servicer.Echo, request_deserializer=identity, response_serializer=identity
        ),
        "Count": grpc.unary_stream_rpc_method_handler(
            servicer.Count, request_deserializer=identity, response_serializer=identity
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _config(**overrides: object) -> ServerConfig:
    settings: dict[str, object] = dict(
        host="127.0.0.1", port=0, metrics_port=None, drain_grace_s=0.5, log_format="text"
    )
    settings.update(overrides)
    return ServerConfig(**settings)  # type: ignore[arg-type]


async def _start(**overrides: object) -> RunningServer:
    return await start_server([ServiceRegistration(_add_echo, EchoServicer(), SERVICE)], _config(**overrides))


def _tls_channel(address: str, root: bytes, key: bytes | None = None, cert: bytes | None = None,
                 call: grpc.CallCredentials | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
    if call is not None:
        credentials = grpc.composite_channel_credentials(credentials, call)
    return grpc.aio.secure_channel(address, credentials)


async def _echo(channel: grpc.aio.Channel, payload: bytes = b"ping", metadata: tuple = ()) -> bytes:
    call = channel.unary_unary(f"/{SERVICE}/Echo")
    return await call(payload, timeout=5, metadata=metadata or None)


# -------------------------------------------------------------------------- TLS
async def test_tls_call_works_and_plaintext_client_is_refused(pki: Pki) -> None:
    running = await _start(tls_cert=pki.server_cert, tls_key=pki.server_key)
    try:
        assert running.tls_enabled and not running.auth_enabled
        (ca,) = pki.read(pki.ca)
        async with _tls_channel(running.address, ca) as channel:
            assert await _echo(channel) == b"ping"
        async with grpc.aio.insecure_channel(running.address) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _echo(plaintext)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(grace=0)


async def test_client_that_does_not_trust_the_server_ca_is_refused(pki: Pki) -> None:
    running = await _start(tls_cert=pki.server_cert, tls_key=pki.server_key)
    try:
        (rogue_as_root,) = pki.read(pki.rogue_cert)
        async with _tls_channel(running.address, rogue_as_root) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _echo(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(grace=0)


async def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(pki: Pki) -> None:
    running = await _start(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca, tls_require_client_cert=True
    )
    try:
        ca, client_key, client_cert, rogue_key, rogue_cert = pki.read(
            pki.ca, pki.client_key, pki.client_cert, pki.rogue_key, pki.rogue_cert
        )
        async with _tls_channel(running.address, ca) as no_cert:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _echo(no_cert)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        async with _tls_channel(running.address, ca, rogue_key, rogue_cert) as untrusted_cert:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _echo(untrusted_cert)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        async with _tls_channel(running.address, ca, client_key, client_cert) as with_cert:
            assert await _echo(with_cert, b"mtls") == b"mtls"
    finally:
        await running.stop(grace=0)


async def test_optional_client_certificate_lets_both_kinds_of_client_in(pki: Pki) -> None:
    running = await _start(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    try:
        ca, client_key, client_cert = pki.read(pki.ca, pki.client_key, pki.client_cert)
        async with _tls_channel(running.address, ca) as no_cert:
            assert await _echo(no_cert) == b"ping"
        async with _tls_channel(running.address, ca, client_key, client_cert) as with_cert:
            assert await _echo(with_cert) == b"ping"
    finally:
        await running.stop(grace=0)


# ------------------------------------------------------------------------ token
def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_bearer_token_is_required_for_api_calls_but_not_for_health(token_file: Path) -> None:
    running = await _start(auth_token_file=token_file)
    try:
        assert running.auth_enabled
        async with grpc.aio.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await _echo(channel)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <token>" in missing.value.details()
            assert "HISTOSYNTH_AUTH_TOKEN_FILE" in missing.value.details()

            for wrong in (TOKEN[:-1], TOKEN + "x", TOKEN.upper(), ""):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _echo(channel, metadata=_bearer(wrong))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, wrong
                assert TOKEN not in refused.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as other_scheme:
                await _echo(channel, metadata=(("authorization", f"Basic {TOKEN}"),))
            assert other_scheme.value.code() == grpc.StatusCode.UNAUTHENTICATED

            assert await _echo(channel, b"ok", metadata=_bearer(TOKEN)) == b"ok"
            # The scheme name is case-insensitive (RFC 7235), the token is not.
            assert await _echo(channel, b"ok", metadata=(("authorization", f"bearer {TOKEN}"),)) == b"ok"

            count = channel.unary_stream(f"/{SERVICE}/Count")
            with pytest.raises(grpc.aio.AioRpcError) as stream_refused:
                [item async for item in count(b"3", timeout=5)]
            assert stream_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert [item async for item in count(b"3", timeout=5, metadata=_bearer(TOKEN))] == [b"0", b"1", b"2"]

            # kubelet gRPC probes send no metadata: health must answer without the token.
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop(grace=0)


async def _list_services(channel: grpc.aio.Channel, metadata: tuple = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), timeout=5, metadata=metadata or None)
    names = []
    async for response in responses:
        names.extend(service.name for service in response.list_services_response.service)
    return names


async def test_reflection_needs_the_token_unless_opened(token_file: Path) -> None:
    protected = await _start(auth_token_file=token_file)
    try:
        async with grpc.aio.insecure_channel(protected.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _list_services(channel)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert SERVICE in await _list_services(channel, _bearer(TOKEN))
    finally:
        await protected.stop(grace=0)
    opened = await _start(auth_token_file=token_file, auth_open_reflection=True)
    try:
        async with grpc.aio.insecure_channel(opened.address) as channel:
            assert SERVICE in await _list_services(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _echo(channel)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await opened.stop(grace=0)


async def test_tls_with_token_uses_call_credentials(pki: Pki, token_file: Path) -> None:
    running = await _start(tls_cert=pki.server_cert, tls_key=pki.server_key, auth_token_file=token_file)
    try:
        (ca,) = pki.read(pki.ca)
        async with _tls_channel(running.address, ca, call=grpc.access_token_call_credentials(TOKEN)) as channel:
            assert await _echo(channel) == b"ping"
        async with _tls_channel(running.address, ca) as without_token:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _echo(without_token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await running.stop(grace=0)


def test_bearer_token_parsing() -> None:
    assert bearer_token(None) is None
    assert bearer_token([("x-other", "1")]) is None
    assert bearer_token([("Authorization", "Bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", b"BEARER abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    interceptor = BearerTokenInterceptor(TOKEN, ())
    assert interceptor.accepts([("authorization", f"Bearer {TOKEN}")]) is None
    assert "missing" in (interceptor.accepts([]) or "")
    assert "invalid" in (interceptor.accepts([("authorization", "Bearer nope")]) or "")


# ------------------------------------------------------------------- the client
async def test_python_client_speaks_tls_and_token(pki: Pki, token_file: Path, tmp_path: Path) -> None:
    """clients.client.HistosynthClient against a real refinement server with mTLS + token."""
    from clients.client import HistosynthClient, tls_credentials
    from services.core.model_store import ModelStore
    from services.mask_refinement import servicer as refinement
    from tests.fixtures.service_models import write_service_store

    store = write_service_store(tmp_path / "model_store")
    config = _config(
        model_store=store, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
        tls_require_client_cert=True, auth_token_file=token_file,
    )
    running, _host = await refinement.start(config, ModelStore(store))
    masks = np.zeros((1, 16, 16), np.uint8)
    masks[:, 4:12, 4:12] = 1
    try:
        credentials = tls_credentials(pki.ca, pki.client_cert, pki.client_key)

        def call(**options: object) -> object:
            with HistosynthClient(running.address, timeout=10, **options) as client:  # type: ignore[arg-type]
                return client.refine(masks).fine_masks

        fine = await asyncio.to_thread(call, channel_credentials=credentials, token=TOKEN)
        assert fine.shape == masks.shape
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(call, channel_credentials=credentials)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client = HistosynthClient(running.address, channel_credentials=credentials, token=TOKEN)
        assert TOKEN not in repr(client)
    finally:
        await running.stop(grace=0)


async def test_python_client_sends_token_over_plaintext_loopback(token_file: Path, tmp_path: Path) -> None:
    from clients.client import HistosynthClient
    from services.core.model_store import ModelStore
    from services.mask_refinement import servicer as refinement
    from tests.fixtures.service_models import write_service_store

    store = write_service_store(tmp_path / "model_store")
    running, _host = await refinement.start(_config(model_store=store, auth_token_file=token_file), ModelStore(store))
    try:
        def call(token: str | None) -> np.ndarray:
            with HistosynthClient(running.address, timeout=10, token=token) as client:
                return client.refine(np.ones((8, 8), np.uint8)).fine_masks

        assert (await asyncio.to_thread(call, TOKEN)).shape == (1, 8, 8)
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(call, "wrong-token-0123456789")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await running.stop(grace=0)


# ------------------------------------------------------- configuration errors
def test_tls_settings_must_come_in_consistent_sets(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="HISTOSYNTH_TLS_CERT is set but not its pair"):
        _config(tls_cert=pki.server_cert)
    with pytest.raises(ConfigError, match="HISTOSYNTH_TLS_KEY is set but not its pair"):
        _config(tls_key=pki.server_key)
    with pytest.raises(ConfigError, match="HISTOSYNTH_TLS_CLIENT_CA.*need a TLS server"):
        _config(tls_client_ca=pki.ca)
    with pytest.raises(ConfigError, match="HISTOSYNTH_TLS_REQUIRE_CLIENT_CERT=true needs HISTOSYNTH_TLS_CLIENT_CA"):
        _config(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_require_client_cert=True)


def test_security_settings_read_from_the_environment(pki: Pki, token_file: Path) -> None:
    config = ServerConfig.from_env(
        environ={
            "HISTOSYNTH_TLS_CERT": str(pki.server_cert),
            "HISTOSYNTH_TLS_KEY": str(pki.server_key),
            "HISTOSYNTH_TLS_CLIENT_CA": str(pki.ca),
            "HISTOSYNTH_TLS_REQUIRE_CLIENT_CERT": "true",
            "HISTOSYNTH_AUTH_TOKEN_FILE": str(token_file),
            "HISTOSYNTH_AUTH_OPEN_REFLECTION": "1",
            "HISTOSYNTH_ALLOW_INSECURE_BIND": "no",
        }
    )
    assert config.tls_cert == pki.server_cert and config.tls_enabled
    assert config.tls_require_client_cert and config.auth_open_reflection and not config.allow_insecure_bind
    assert config.auth_token_file == token_file
    assert ServerConfig.from_env(environ={"HISTOSYNTH_TLS_CERT": "off"}).tls_cert is None


@pytest.mark.parametrize(
    ("setting", "content", "problem"),
    [
        ("tls_cert", None, "HISTOSYNTH_TLS_CERT=.*no such file"),
        ("tls_cert", b"", "HISTOSYNTH_TLS_CERT=.*the file is empty"),
        ("tls_cert", b"\x30\x82\x01\x0a binary DER", "HISTOSYNTH_TLS_CERT=.*not a PEM server certificate"),
        ("tls_key", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
         "HISTOSYNTH_TLS_KEY=.*not a PEM server private key"),
    ],
)
async def test_bad_tls_files_stop_the_start_naming_the_variable(
    pki: Pki, tmp_path: Path, setting: str, content: bytes | None, problem: str
) -> None:
    bad = tmp_path / "bad.pem"
    if content is not None:
        bad.write_bytes(content)
    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, setting: bad}
    with pytest.raises(ConfigError, match=problem):
        await _start(**files)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file"),
        (b"\n", "the file is empty"),
        (b"short\n", "fewer than 16"),
        (b"two words in one token file\n", "whitespace or control characters"),
        ("t\u00f6ken-with-umlaut-0123456789".encode(), "printable ASCII"),
    ],
)
async def test_bad_token_file_stops_the_start(tmp_path: Path, content: bytes | None, problem: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"HISTOSYNTH_AUTH_TOKEN_FILE=.*{problem}") as caught:
        await _start(auth_token_file=path)
    if content and content.strip():
        assert content.decode(errors="replace").strip() not in str(caught.value)  # never echo the secret


async def test_token_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        await _start(auth_token_file=tmp_path)


# --------------------------------------------------------------- bind exposure
def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.internal", "192.168.1.2"):
        assert not is_loopback(host), host


async def test_exposed_bind_without_tls_or_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="HISTOSYNTH_HOST='0.0.0.0' exposes .*HISTOSYNTH_ALLOW_INSECURE_BIND=1"):
        await _start(host="0.0.0.0")


def test_exposed_bind_warnings(pki: Pki, token_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.core.security")
    check_bind_exposure(_config(host="0.0.0.0", allow_insecure_bind=True), tls=False, auth=False)
    assert "INSECURE" in caplog.text
    caplog.clear()
    check_bind_exposure(_config(host="0.0.0.0"), tls=False, auth=True)
    assert "plaintext" in caplog.text
    caplog.clear()
    check_bind_exposure(_config(host="0.0.0.0"), tls=True, auth=False)
    assert "any client that reaches this port can call" in caplog.text
    caplog.clear()
    check_bind_exposure(_config(host="0.0.0.0"), tls=True, auth=True)
    check_bind_exposure(_config(host="0.0.0.0"), tls=True, auth=False, client_certs=True)
    check_bind_exposure(_config(host="127.0.0.1"), tls=False, auth=False)
    assert caplog.text == ""


async def test_open_channel_adds_the_token_to_streaming_calls_too(token_file: Path) -> None:
    from clients.client import open_channel

    running = await _start(auth_token_file=token_file)
    try:
        def count(token: str | None) -> tuple[list[bytes], object]:
            with open_channel(running.address, token=token) as channel:
                call = channel.unary_stream(f"/{SERVICE}/Count")(b"3", timeout=5)
                return list(call), call.initial_metadata()

        items, metadata = await asyncio.to_thread(count, TOKEN)
        assert items == [b"0", b"1", b"2"] and metadata is not None
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(count, None)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await running.stop(grace=0)


# ------------------------------------------------------------- issue 14 regressions
async def test_tls_key_of_another_certificate_is_named_as_a_mismatch(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="HISTOSYNTH_TLS_KEY=.*is not the private key of the certificate") as caught:
        await _start(tls_cert=pki.server_cert, tls_key=pki.client_key)
    assert "cannot bind" not in str(caught.value)


async def test_with_a_token_unknown_methods_are_unauthenticated_not_unimplemented(token_file: Path) -> None:
    running = await _start(auth_token_file=token_file)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            for method in (f"/{SERVICE}/NoSuchMethod", "/histosynth.v1.Secret/Probe", f"/{SERVICE}/Echo"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary(method)(b"x", timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            # A streaming call is refused on its headers. The client writes by hand and tolerates a
            # failed write: with a request iterator, grpc.aio turns a write that loses the race with
            # the server's early status into a client-side INTERNAL, which hides the real status.
            call = channel.stream_stream("/histosynth.v1.Secret/Stream")(timeout=5)
            try:
                await call.write(b"a")
                await call.done_writing()
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
                pass
            assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
            # With the token, an unknown method is UNIMPLEMENTED as usual.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(f"/{SERVICE}/NoSuchMethod")(
                    b"x", timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),)
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.stop(0)
