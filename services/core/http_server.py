"""An HTTP/1.1 companion of a gRPC server, for protocols that also have a REST binding (KServe v2).

It runs on the gRPC server's own asyncio loop (aiohttp), so REST handlers await the same
pipelines, batchers and memory admission as gRPC calls. What the gRPC side enforces holds here
too, from the same settings:

* TLS: the certificate and key of HISTOSYNTH_TLS_CERT/_KEY; with HISTOSYNTH_TLS_CLIENT_CA client
  certificates are verified (and required with HISTOSYNTH_TLS_REQUIRE_CLIENT_CERT);
* bearer token: every path but the ``open_paths`` (health, for probes) needs
  ``Authorization: Bearer <token>``, else 401;
* drain: calls count in the gRPC server's in-flight set, so a drain waits for them; while draining
  new calls get 503 (paths in ``drain_open_paths`` still answer, so liveness stays true);
* bodies above HISTOSYNTH_MAX_MESSAGE_BYTES get 413;
* domain errors become HTTP statuses (INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, ...)
  with Triton's error body ``{"error": "<message>"}``; unexpected errors answer 500 with a log id only.

Protocol routes come from the services (an ``HttpRoutes`` callable adds them to the app): this
module knows no protocol and no protobuf.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from aiohttp import web

from services.core import metrics
from services.core.errors import HistosynthError
from services.core.security import BearerTokenInterceptor, TlsMaterial

_log = logging.getLogger(__name__)

HttpRoutes = Callable[[web.Application], None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# gRPC status name -> HTTP status (KServe's / grpc-gateway's mapping).
HTTP_STATUS: Final = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "FAILED_PRECONDITION": 412,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
DRAINING_MESSAGE: Final = "server is shutting down and accepts no new calls; retry on another replica"
# After a drain every handler has returned; this only bounds closing idle keep-alive connections.
SHUTDOWN_TIMEOUT_S: Final = 1.0


class CallGate(Protocol):
    """The gRPC server's drain state: REST calls are refused while draining and counted in flight."""

    draining: bool

    def enter(self) -> None: ...

    def leave(self) -> None: ...


def error_response(status: int, message: str) -> web.Response:
    """Triton's REST error shape, which tritonclient.http reads into InferenceServerException."""
    return web.json_response({"error": message}, status=status)


@dataclass
class RunningHttpServer:
    runner: web.AppRunner
    host: str
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


def ssl_context(tls: TlsMaterial, cert_path: str, key_path: str) -> ssl.SSLContext:
    """The gRPC port's TLS settings as an ssl.SSLContext (the files were validated by security.load_tls_material)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    if tls.client_ca is not None:
        context.load_verify_locations(cadata=tls.client_ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def _middlewares(
    gate: CallGate, token: str | None, open_paths: frozenset[str], drain_open_paths: frozenset[str], max_body: int
) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    checker = None if token is None else BearerTokenInterceptor(token, ())

    @web.middleware
    async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every REST call in histosynth_http_* (as gRPC calls are in histosynth_grpc_*), refusals included."""
        started = time.perf_counter()
        route, method = route_label(request), request.method
        code = "499"  # the client went away before an answer
        metrics.HTTP_INFLIGHT_REQUESTS.inc()
        try:
            response = await handler(request)
            code = str(response.status)
            return response
        except web.HTTPException as error:  # raised by aiohttp itself (e.g. 404/405 before any handler ran)
            code = str(error.status)
            raise
        except Exception:  # CancelledError is not an Exception: a client that went away keeps "499"
            code = "500"
            raise
        finally:
            metrics.HTTP_INFLIGHT_REQUESTS.dec()
            metrics.HTTP_REQUEST_DURATION.labels(route, method).observe(time.perf_counter() - started)
            metrics.HTTP_REQUESTS.labels(route, method, code).inc()

    @web.middleware
    async def serve(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if checker is not None and path not in open_paths:
            header = request.headers.get("Authorization")
            problem = checker.accepts([] if header is None else [("authorization", header)])
            if problem is not None:  # the gRPC wording, told in HTTP terms
                return error_response(401, problem.replace("call metadata", "HTTP header").replace("' metadata", "' header"))
        if gate.draining and path not in drain_open_paths:
            return error_response(503, DRAINING_MESSAGE)
        if request.content_length is not None and request.content_length > max_body:
            return error_response(413, f"request body of {request.content_length} bytes is larger than the "
                                       f"limit of {max_body} (HISTOSYNTH_MAX_MESSAGE_BYTES); send smaller tensors")
        gate.enter()
        try:
            return await handler(request)
        except HistosynthError as error:
            status = HTTP_STATUS.get(error.status, 500)
            if status == 500:
                return _internal(request, error)
            _log.info("HTTP call failed: %s", error.message[:2000],
                      extra={"path": path[:200], "code": error.status, "reason": error.reason})
            return error_response(status, error.message[:2000])
        except web.HTTPException as error:
            if error.status == 413:
                return error_response(413, f"request body is larger than the limit of {max_body} bytes "
                                           "(HISTOSYNTH_MAX_MESSAGE_BYTES); send smaller tensors")
            if error.status >= 400:
                return error_response(error.status, f"{error.reason}: {request.method} {path[:200]}")
            raise
        except asyncio.CancelledError:  # the client went away
            raise
        except Exception as error:  # noqa: BLE001 - answered with a log id, text stays in the log
            return _internal(request, error)
        finally:
            gate.leave()

    return [observed, serve]


def route_label(request: web.Request) -> str:
    """The matched route's pattern (bounded label values), or "unmatched" for paths no route serves."""
    resource = request.match_info.route.resource
    return "unmatched" if resource is None else resource.canonical


def _internal(request: web.Request, error: BaseException) -> web.Response:
    log_id = uuid.uuid4().hex[:12]
    _log.error("HTTP call %s %s failed [log id %s]", request.method, request.path[:200], log_id,
               exc_info=error, extra={"log_id": log_id})
    return error_response(500, f"internal error in {request.method} {request.path[:200]} (log id {log_id}); "
                               "retrying may succeed, and if it keeps failing report the log id to the operators")


async def start_http_server(
    routes: Sequence[HttpRoutes],
    host: str,
    port: int,
    *,
    gate: CallGate,
    max_body_bytes: int,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
    open_paths: Sequence[str] = (),
    drain_open_paths: Sequence[str] = (),
) -> RunningHttpServer:
    """Bind ``host:port`` (0 = a free port) and serve ``routes``; returns once it accepts connections."""
    app = web.Application(
        middlewares=_middlewares(gate, token, frozenset(open_paths), frozenset(drain_open_paths), max_body_bytes),
        client_max_size=max_body_bytes,
    )
    for add_routes in routes:
        add_routes(app)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls, reuse_port=False)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise OSError(f"cannot bind the KServe v2 REST server to {host}:{port} (HISTOSYNTH_HTTP_PORT): {error}") from error
    bound = int(runner.addresses[0][1])
    _log.info("HTTP server listening", extra={"address": f"{host}:{bound}", "tls": tls is not None,
                                              "auth": "bearer-token" if token else "off"})
    return RunningHttpServer(runner=runner, host=host, port=bound)
