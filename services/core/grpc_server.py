"""gRPC server bootstrap shared by every histosynth service.

One call wires what each service would otherwise repeat: grpc.health.v1 health checking
(one status per service), server reflection (grpcurl / grpc_cli work without .proto
files), message size limits, an interceptor that records the histosynth_grpc_* metrics
and turns domain errors into gRPC status codes, the Prometheus endpoint, and a graceful
drain on SIGTERM/SIGINT so a rolling update never cuts a render off mid-way:

1. health flips to NOT_SERVING for every service, so load balancers stop routing here;
2. new calls are refused with UNAVAILABLE (clients retry on another replica);
3. calls already running get up to ``drain_grace_s`` to finish;
4. the server stops, cancelling whatever is still running.

Health and reflection keep answering during the drain (a probe must be able to see
NOT_SERVING) and are left out of the call metrics, which would otherwise mostly count probes.

Security (services.core.security, configured by HISTOSYNTH_TLS_* / HISTOSYNTH_AUTH_*): the port
is TLS-only when a certificate is configured (optionally mutual TLS), a bearer-token
interceptor runs before everything else when a token file is configured (health always
open for kubelet probes; reflection only with HISTOSYNTH_AUTH_OPEN_REFLECTION), and a
non-loopback bind with neither is refused unless HISTOSYNTH_ALLOW_INSECURE_BIND=1.
The metrics endpoint stays plaintext HTTP without auth (Prometheus convention; it
exposes counters only): keep it on a port only the scraper can reach.

A registration with ``http`` routes (KServe v2's REST binding) also gets an HTTP companion on
HISTOSYNTH_HTTP_PORT (services.core.http_server): same loop, same TLS and token, and its calls
count in the drain like gRPC calls.

Usage from a service's ``__main__``::

    config = ServerConfig.from_env()
    asyncio.run(serve([ServiceRegistration(add_FooServicer_to_server, FooServicer(...),
                                           "histosynth.v1.Foo")], config))
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core import http_server, metrics, security
from services.core.config import ServerConfig
from services.core.errors import HistosynthError, InvalidInputError
from services.core.logging import configure_logging

_log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME: Final = health.SERVICE_NAME
REFLECTION_SERVICE_NAME: Final = reflection.SERVICE_NAME
# Served during a drain and kept out of the call metrics (see module docstring).
INFRASTRUCTURE_SERVICES: Final = frozenset({HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME})
# After the last handler returns, how long gRPC may take to send the remaining replies before stop().
RESPONSE_FLUSH_GRACE_S: Final = 1.0
DRAINING_MESSAGE: Final = "server is shutting down and accepts no new calls; retry on another replica"
# REST health paths: open without a token (like grpc.health for probes); liveness also answers while draining.
HTTP_HEALTH_PATHS: Final = ("/v2/health/live", "/v2/health/ready")
# Status details are bounded: a message that echoes a huge input must not itself fail the reply.
MAX_STATUS_DETAILS_CHARS: Final = 2000

ShutdownHook = Callable[[], "Awaitable[None] | None"]


class ServiceRegistration(NamedTuple):
    """One gRPC service to serve: a plain tuple works too.

    ``add_to_server`` is the generated ``add_<Name>Servicer_to_server`` (or any callable
    ``(servicer, server)`` that adds handlers); ``service_name`` is the full proto name,
    e.g. ``histosynth.v1.MaskRendering``, used for health and reflection. ``http``: routes of the
    service's REST binding (KServe v2), served on the HTTP companion port (HISTOSYNTH_HTTP_PORT).
    """

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    service_name: str
    http: http_server.HttpRoutes | None = None


def split_method(full_method: str) -> tuple[str, str]:
    """``/histosynth.v1.Scoring/Score`` -> (``histosynth.v1.Scoring``, ``Score``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or full_method


def status_code_for(error: HistosynthError) -> grpc.StatusCode:
    """The gRPC status for a domain error; an unknown status name is a bug, reported as INTERNAL."""
    try:
        return grpc.StatusCode[error.status]
    except KeyError:
        return grpc.StatusCode.INTERNAL


def _code_of(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The status a handler set itself (set_code or abort), else ``default``."""
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code
    # Some grpc versions report the raw integer; map it back by value.
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return default


class _DrainState:
    """Counts calls in flight so a drain knows when the last one has finished."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.forced = asyncio.Event()  # a second signal: stop without waiting out the grace

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class _RequestDecoder:
    """Deserialises request bytes, turning a malformed message into InvalidInputError.

    Any exception a generated deserializer raises (protobuf's DecodeError, ...) means the
    bytes are not the method's request message; services.core imports no protobuf, so it is
    caught by the base class. Handlers must consume streamed requests through their request
    iterator (``context.read()`` would see raw bytes).
    """

    def __init__(self, deserializer: Callable[[bytes], Any] | None, full_method: str) -> None:
        self._deserializer = deserializer
        self._method = full_method

    def one(self, raw: Any) -> Any:
        if self._deserializer is None:
            return raw
        try:
            return self._deserializer(raw)
        except Exception as error:
            raise InvalidInputError(
                f"the request body ({len(raw)} bytes) is not a valid request message for {self._method}: "
                f"{type(error).__name__}: {error}; check that the client uses this server's .proto files"
            ) from None

    async def stream(self, raw_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for raw in raw_iterator:
            yield self.one(raw)


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls while draining, decodes requests, records call metrics, maps exceptions to status codes.

    A request that does not parse as its method's message is INVALID_ARGUMENT (see _RequestDecoder).

    A HistosynthError becomes its own status (``error.status``) with its message; any
    other exception becomes INTERNAL with the exception named, is logged with its
    traceback, and leaves the server serving.
    """

    def __init__(self, state: _DrainState) -> None:
        self._state = state

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, method = split_method(handler_call_details.method)
        if handler is None or service in INFRASTRUCTURE_SERVICES:
            return handler
        # Requests are decoded inside the wrapper (the handlers get no deserializer), so bytes
        # that are not a valid message answer INVALID_ARGUMENT through the same error path as
        # every other bad input, instead of grpc's generic UNKNOWN.
        decode = _RequestDecoder(handler.request_deserializer, f"{service}/{method}")
        streaming_request = handler.stream_unary is not None or handler.stream_stream is not None
        prepare = decode.stream if streaming_request else decode.one
        if handler.unary_unary is not None or handler.stream_unary is not None:
            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )
            return make(
                self._wrap_unary_response(handler.unary_unary or handler.stream_unary, service, method, prepare),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        behavior = handler.unary_stream or handler.stream_stream
        wrap = self._wrap_generator if inspect.isasyncgenfunction(behavior) else self._wrap_writer
        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return make(
            wrap(behavior, service, method, prepare),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary_response(
        self, behavior: Callable[..., Any], service: str, method: str, prepare: Callable[[Any], Any]
    ) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._served(service, method, context):
                result = behavior(prepare(request), context)
                if inspect.isawaitable(result):
                    result = await result
                return result

        return call

    def _wrap_generator(
        self, behavior: Callable[..., Any], service: str, method: str, prepare: Callable[[Any], Any]
    ) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._served(service, method, context):
                async for response in behavior(prepare(request), context):
                    yield response

        return call

    def _wrap_writer(
        self, behavior: Callable[..., Any], service: str, method: str, prepare: Callable[[Any], Any]
    ) -> Any:
        """Streaming handlers that ``await context.write(...)`` (or return a sync iterable)."""

        async def call(request: Any, context: grpc.aio.ServicerContext) -> None:
            async with self._served(service, method, context):
                result = behavior(prepare(request), context)
                if inspect.isawaitable(result):
                    await result
                elif result is not None:
                    for response in result:
                        await context.write(response)

        return call

    @contextlib.asynccontextmanager
    async def _served(
        self, service: str, method: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        if self._state.draining:
            metrics.GRPC_REQUESTS.labels(service, method, grpc.StatusCode.UNAVAILABLE.name).inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        started = time.perf_counter()
        inflight_gauge = metrics.GRPC_INFLIGHT_REQUESTS.labels(service)
        inflight_gauge.inc()
        self._state.enter()
        code = grpc.StatusCode.OK
        try:
            yield
            code = _code_of(context, grpc.StatusCode.OK)
        except HistosynthError as error:
            code = status_code_for(error)
            if code == grpc.StatusCode.INTERNAL:
                log_id = _new_log_id()
                _log.error(
                    "call failed [log id %s]: %s",
                    log_id,
                    error.message,
                    exc_info=error.__cause__ is not None,
                    extra={"service": service, "method": method, "code": code.name,
                           "reason": error.reason, "peer": context.peer(), "log_id": log_id},
                )
                await context.abort(code, internal_error_message(service, method, log_id))
            _log.info(
                "call failed: %s",
                bounded_details(error.message),
                extra={"service": service, "method": method, "code": code.name,
                       "reason": error.reason, "peer": context.peer()},
            )
            await context.abort(code, bounded_details(error.message))
        except grpc.aio.AbortError:  # the handler aborted with a status of its own choosing
            code = _code_of(context, grpc.StatusCode.UNKNOWN)
            raise
        except (asyncio.CancelledError, GeneratorExit):  # client went away or deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log_id = _new_log_id()
            _log.exception(
                "unexpected error in %s/%s [log id %s]",
                service,
                method,
                log_id,
                extra={"service": service, "method": method, "code": code.name, "peer": context.peer(),
                       "log_id": log_id},
            )
            # Exception text can hold paths, library internals or other callers' data: it stays in the log.
            await context.abort(code, internal_error_message(service, method, log_id))
        finally:
            inflight_gauge.dec()
            self._state.leave()
            metrics.GRPC_REQUEST_DURATION.labels(service, method).observe(time.perf_counter() - started)
            metrics.GRPC_REQUESTS.labels(service, method, code.name).inc()


def _new_log_id() -> str:
    return uuid.uuid4().hex[:12]


def internal_error_message(service: str, method: str, log_id: str) -> str:
    """What a remote caller learns about an internal error: where, and the id that finds it in the log."""
    return (
        f"internal error in {service}/{method} (log id {log_id}); retrying may succeed, and if it keeps "
        "failing report the log id to the server's operators"
    )


def bounded_details(message: str, limit: int = MAX_STATUS_DETAILS_CHARS) -> str:
    """``message`` cut to ``limit`` characters, saying so."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... (message cut at {limit} of {len(message)} characters)"


class RunningServer:
    """Handle on a started server: its bound port, health control and shutdown.

    ``stop``/``drain`` run the graceful drain described in the module docstring; they
    are idempotent and concurrent calls wait for the same drain.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        host: str,
        port: int,
        service_names: tuple[str, ...],
        health_servicer: health.aio.HealthServicer,
        state: _DrainState,
        metrics_server: metrics.MetricsHttpServer | None,
        default_grace_s: float,
        http: http_server.RunningHttpServer | None = None,
        shutdown_hooks: Sequence[ShutdownHook] = (),
        *,
        tls_enabled: bool = False,
        auth_enabled: bool = False,
    ) -> None:
        self.server = server
        self.tls_enabled = tls_enabled  # clients must dial with TLS channel credentials
        self.auth_enabled = auth_enabled  # calls other than health (and maybe reflection) need the token
        self.host = host
        self.port = port
        self.service_names = service_names
        self.health = health_servicer
        self.metrics_server = metrics_server
        self.http = http
        self.default_grace_s = default_grace_s
        self._state = state
        self._shutdown_hooks = list(shutdown_hooks)
        self._drain_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        """``host:port`` to dial (IPv6 hosts bracketed)."""
        return _host_port(self.host, self.port)

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    @property
    def http_port(self) -> int | None:
        """The KServe v2 REST port (None when no service here has a REST binding, or it is off)."""
        return None if self.http is None else self.http.port

    @property
    def draining(self) -> bool:
        return self._state.draining

    @property
    def in_flight(self) -> int:
        return self._state.in_flight

    async def set_serving(self, service_name: str, serving: bool) -> None:
        """Report one service healthy or not (e.g. its model failed to load); ignored while draining."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(service_name, status)

    def force_stop(self) -> None:
        """Cut a running drain short: whatever is still in flight is cancelled now."""
        self._state.forced.set()

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; ``grace`` defaults to the configured drain_grace_s."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(
                self._drain(self.default_grace_s if grace is None else grace)
            )
        await asyncio.shield(self._drain_task)

    drain = stop

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()

    async def _drain(self, grace: float) -> None:
        started = time.perf_counter()
        self._state.draining = True
        _log.info(
            "draining: health NOT_SERVING, refusing new calls",
            extra={"in_flight": self._state.in_flight, "grace_s": grace},
        )
        await self.health.enter_graceful_shutdown()
        idle = asyncio.ensure_future(self._state.idle.wait())
        forced = asyncio.ensure_future(self._state.forced.wait())
        try:
            await asyncio.wait({idle, forced}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            forced.cancel()
        if self._state.in_flight:
            _log.warning(
                "drain grace over, cancelling calls still in flight",
                extra={"in_flight": self._state.in_flight, "grace_s": grace},
            )
        # In-flight work is done (or given up on). A handler counts as done when it returns, a moment
        # before gRPC has sent its response, so stop(0) here could cut off the last replies under load
        # ("Cancelling all calls"). A short flush grace lets those go out; what else remains are long-lived
        # health watches, which must not hold the shutdown for the rest of the grace period.
        remaining = max(0.0, grace - (time.perf_counter() - started))
        flush = 0.0 if self._state.forced.is_set() else min(RESPONSE_FLUSH_GRACE_S, remaining)
        await self.server.stop(flush)
        if self.http is not None:  # its calls were counted in flight above, so none is cut off here
            await self.http.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        for hook in self._shutdown_hooks:
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                _log.exception("shutdown hook %r failed", hook)
        self._stopped.set()
        _log.info("server stopped", extra={"drain_s": round(time.perf_counter() - started, 3)})


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


async def start_server(
    registrations: Sequence[ServiceRegistration | tuple[Any, Any, str]],
    config: ServerConfig,
    *,
    shutdown_hooks: Sequence[ShutdownHook] = (),
) -> RunningServer:
    """Build, bind and start the server; returns once it accepts calls.

    Binds ``config.host:config.port`` (port 0 picks a free one, see ``RunningServer.port``)
    and starts the metrics endpoint unless ``config.metrics_port`` is None, and the REST companion
    (services.core.http_server) when a registration has ``http`` routes and HISTOSYNTH_HTTP_PORT is not off.
    """
    registrations = [ServiceRegistration(*registration) for registration in registrations]
    names = [registration.service_name for registration in registrations]
    if len(set(names)) != len(names):
        raise ValueError(f"service registered twice: {names}")

    # Read every security file before binding anything: a bad mount fails here, with its variable named.
    tls = security.load_tls_material(config)
    token = None if config.auth_token_file is None else security.read_token_file(config.auth_token_file)
    security.check_bind_exposure(
        config,
        tls=tls is not None,
        auth=token is not None,
        client_certs=tls is not None and tls.require_client_cert,
    )

    state = _DrainState()
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if token is not None:
        open_services = {HEALTH_SERVICE_NAME}
        if config.auth_open_reflection:
            open_services.add(REFLECTION_SERVICE_NAME)
        # First, so an unauthenticated call is refused before it counts as in flight or is parsed.
        interceptors.append(security.BearerTokenInterceptor(token, open_services))
    interceptors.append(ServingInterceptor(state))
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Two servers must never share a port silently (a stale replica would take calls).
            ("grpc.so_reuseport", 0),
        ],
    )
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME), server)

    address = _host_port(config.host, config.port)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.server_credentials())
    except RuntimeError as error:
        raise OSError(f"cannot bind gRPC server to {address}: {error}") from error
    if port == 0:  # older grpc versions report a failed bind this way
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    metrics_server = None
    metrics_port = config.resolved_metrics_port  # derived from config.port unless set
    if metrics_port is not None:
        try:
            metrics_server = metrics.start_metrics_http_server(config.host, metrics_port)
        except BaseException:
            await server.stop(None)
            raise
    http = None
    routes = [registration.http for registration in registrations if registration.http is not None]
    http_port = config.resolved_http_port  # derived from config.port unless set
    if routes and http_port is not None:
        try:
            http = await http_server.start_http_server(
                routes, config.host, http_port, gate=state, max_body_bytes=config.max_message_bytes, token=token,
                tls=None if tls is None else http_server.ssl_context(tls, str(config.tls_cert), str(config.tls_key)),
                open_paths=HTTP_HEALTH_PATHS, drain_open_paths=HTTP_HEALTH_PATHS[:1],
            )
        except BaseException:
            if metrics_server is not None:
                metrics_server.close()
            await server.stop(None)
            raise
    _log.info(
        "gRPC server listening",
        extra={
            "address": _host_port(config.host, port),
            "services": names,
            "metrics_port": None if metrics_server is None else metrics_server.port,
            "http_port": None if http is None else http.port,
            "tls": "off" if tls is None else ("mutual" if tls.client_ca is not None else "server"),
            "client_cert_required": tls is not None and tls.require_client_cert,
            "auth": "bearer-token" if token is not None else "off",
        },
    )
    return RunningServer(
        server=server,
        host=config.host,
        port=port,
        service_names=tuple(names),
        health_servicer=health_servicer,
        state=state,
        metrics_server=metrics_server,
        default_grace_s=config.drain_grace_s,
        http=http,
        shutdown_hooks=shutdown_hooks,
        tls_enabled=tls is not None,
        auth_enabled=token is not None,
    )


async def serve(
    registrations: Sequence[ServiceRegistration | tuple[Any, Any, str]],
    config: ServerConfig,
    *,
    shutdown_hooks: Sequence[ShutdownHook] = (),
    stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    on_started: Callable[[RunningServer], None] | None = None,
) -> None:
    """Configure logging, start the server and run until a stop signal has drained it.

    The first SIGTERM/SIGINT starts the graceful drain; a second one cancels what is
    still in flight and stops at once. ``on_started`` receives the running server
    (its bound port, health control) once it accepts calls.
    """
    configure_logging(config.log_level, config.log_format)
    running = await start_server(registrations, config, shutdown_hooks=shutdown_hooks)
    if on_started is not None:
        on_started(running)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop_requested.is_set():
            _log.warning("second %s: stopping without waiting for calls in flight", signum.name)
            running.force_stop()
            return
        _log.info("received %s", signum.name)
        stop_requested.set()

    for signum in stop_signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        # Stop on a signal, or when something else (a test, a fatal hook) stopped the server.
        waiters = {
            asyncio.ensure_future(stop_requested.wait()),
            asyncio.ensure_future(running.wait_for_termination()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        await running.stop()
    finally:
        for signum in stop_signals:
            loop.remove_signal_handler(signum)
