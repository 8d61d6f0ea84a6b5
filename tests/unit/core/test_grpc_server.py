"""Real gRPC over loopback: health, reflection, size limits, status mapping, metrics, drain.

The test service uses grpc's generic handlers with raw bytes, so no .proto is needed
and every call still goes through the real server, interceptor and wire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.core import metrics
from services.core.config import ServerConfig
from services.core.errors import BatchFailedError, InvalidInputError, QueueFullError
from services.core.grpc_server import (
    HEALTH_SERVICE_NAME,
    REFLECTION_SERVICE_NAME,
    RunningServer,
    ServiceRegistration,
    serve,
    start_server,
)

SERVICE = "histosynth.test.Echo"
MAX_MESSAGE_BYTES = 64 * 1024
pytestmark = pytest.mark.timeout(60)


class EchoServicer:
    """Byte-level test service: each method exercises one server behaviour."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()  # b"hold" calls run until the test sets this

    async def Echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def Slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.slow_started.set()
        if request == b"hold":
            await self.release.wait()
        else:
            await asyncio.sleep(float(request.decode()))
        return b"slow done"

    async def Fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"invalid":
            raise InvalidInputError("tile_size -3 must be positive")
        if request == b"queue":
            raise QueueFullError("renderer", 4)
        if request == b"abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler said no")
        if request == b"batch":
            raise BatchFailedError("renderer", OSError("/srv/secret/model.onnx: disk on fire"))
        raise ValueError("something broke")

    async def Big(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"x" * int(request.decode())

    async def Count(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for index in range(int(request.decode())):
            yield str(index).encode()


def _add_echo(servicer: EchoServicer, server: grpc.aio.Server) -> None:
    identity = lambda payload: payload  # noqa: E731  raw bytes in and out
    unary = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=identity, response_serializer=identity
        )
        for name in ("Echo", "Slow", "Fail", "Big")
    }
    unary["Count"] = grpc.unary_stream_rpc_method_handler(
        servicer.Count, request_deserializer=identity, response_serializer=identity
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, unary),))


def _config(**overrides: object) -> ServerConfig:
    values: dict[str, object] = {
        "port": 0,
        "metrics_port": None,
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "drain_grace_s": 5.0,
    }
    values.update(overrides)
    return ServerConfig.from_env(overrides=values, environ={})


@pytest.fixture
async def echo() -> AsyncIterator[tuple[RunningServer, EchoServicer, grpc.aio.Channel]]:
    servicer = EchoServicer()
    running = await start_server([ServiceRegistration(_add_echo, servicer, SERVICE)], _config())
    # The client accepts more than the server may send, so the server's limit is what is tested.
    channel = grpc.aio.insecure_channel(
        running.address, options=[("grpc.max_receive_message_length", 16 * MAX_MESSAGE_BYTES)]
    )
    try:
        yield running, servicer, channel
    finally:
        await channel.close()
        await running.stop(0)


def _unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/{method}")


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return response.status


def _requests(code: str, method: str = "Fail") -> float:
    value = metrics.REGISTRY.get_sample_value(
        "histosynth_grpc_requests_total", {"service": SERVICE, "method": method, "code": code}
    )
    return value or 0.0


async def _eventually_requests(expected: float, code: str, method: str = "Fail") -> float:
    """The counter may be bumped just after the client saw an aborted call's status."""
    for _ in range(200):
        if _requests(code, method) >= expected:
            break
        await asyncio.sleep(0.01)
    return _requests(code, method)


async def test_echo_round_trip_and_binds_loopback(echo) -> None:
    running, _, channel = echo
    assert running.host == "127.0.0.1" and running.port > 0
    assert await _unary(channel, "Echo")(b"hello", timeout=5) == b"hello"


async def test_health_reports_each_service_serving(echo) -> None:
    _, _, channel = echo
    assert await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(channel, "") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _health(channel, "histosynth.v1.NoSuchService")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_set_serving_flips_one_service(echo) -> None:
    running, _, channel = echo
    await running.set_serving(SERVICE, False)
    assert await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.set_serving(SERVICE, True)
    assert await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_registered_services(echo) -> None:
    _, _, channel = echo
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    responses = [response async for response in call]
    names = {service.name for service in responses[0].list_services_response.service}
    assert names == {SERVICE, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME}


async def test_oversized_request_is_resource_exhausted(echo) -> None:
    _, _, channel = echo
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _unary(channel, "Echo")(b"x" * (MAX_MESSAGE_BYTES + 1), timeout=5)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_oversized_response_is_resource_exhausted(echo) -> None:
    _, _, channel = echo
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _unary(channel, "Big")(str(MAX_MESSAGE_BYTES + 1).encode(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _unary(channel, "Big")(b"1000", timeout=5) == b"x" * 1000


@pytest.mark.parametrize(
    ("request_bytes", "code", "detail"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "tile_size -3 must be positive"),
        (b"queue", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
        (b"abort", grpc.StatusCode.PERMISSION_DENIED, "handler said no"),
        (b"crash", grpc.StatusCode.INTERNAL, "internal error in histosynth.test.Echo/Fail (log id "),
        (b"batch", grpc.StatusCode.INTERNAL, "internal error in histosynth.test.Echo/Fail (log id "),
    ],
)
async def test_errors_map_to_status_codes_and_are_counted(echo, request_bytes, code, detail) -> None:
    _, _, channel = echo
    before = _requests(code.name)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _unary(channel, "Fail")(request_bytes, timeout=5)
    assert raised.value.code() == code
    assert detail in raised.value.details()
    # Exception text (paths, library internals) stays in the server log.
    assert "something broke" not in raised.value.details() and "/srv/secret" not in raised.value.details()
    assert await _eventually_requests(before + 1, code.name) == before + 1
    # A failed call, even an unexpected exception, leaves the server serving.
    assert await _unary(channel, "Echo")(b"still here", timeout=5) == b"still here"


async def test_success_metrics_and_streaming(echo) -> None:
    _, _, channel = echo
    before = _requests("OK", "Count")
    responses = [item async for item in channel.unary_stream(f"/{SERVICE}/Count")(b"3", timeout=5)]
    assert responses == [b"0", b"1", b"2"]
    assert _requests("OK", "Count") == before + 1
    duration_count = metrics.REGISTRY.get_sample_value(
        "histosynth_grpc_request_duration_seconds_count", {"service": SERVICE, "method": "Count"}
    )
    assert duration_count and duration_count >= 1
    assert metrics.REGISTRY.get_sample_value("histosynth_grpc_inflight_requests", {"service": SERVICE}) == 0


async def test_drain_finishes_in_flight_and_refuses_new_calls(echo) -> None:
    running, servicer, channel = echo
    slow_call = asyncio.ensure_future(_unary(channel, "Slow")(b"hold", timeout=20))
    await asyncio.wait_for(servicer.slow_started.wait(), 5)
    assert running.in_flight == 1

    stopping = asyncio.ensure_future(running.stop(grace=15))
    while not running.draining:
        await asyncio.sleep(0.01)
    assert await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _unary(channel, "Echo")(b"too late", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not stopping.done() and not slow_call.done()

    servicer.release.set()
    assert await slow_call == b"slow done"
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _unary(channel, "Echo")(b"after stop", timeout=2)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_drain_cancels_calls_that_outlive_the_grace(echo) -> None:
    running, servicer, channel = echo
    slow_call = asyncio.ensure_future(_unary(channel, "Slow")(b"30", timeout=40))
    await asyncio.wait_for(servicer.slow_started.wait(), 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await running.stop(grace=0.3)
    assert loop.time() - started < 5
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await slow_call
    assert raised.value.code() != grpc.StatusCode.OK


async def test_metrics_endpoint_serves_grpc_metrics() -> None:
    running = await start_server(
        [ServiceRegistration(_add_echo, EchoServicer(), SERVICE)], _config(metrics_port=0)
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            await _unary(channel, "Echo")(b"x", timeout=5)
        assert running.metrics_port and running.metrics_port > 0
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert f'histosynth_grpc_requests_total{{code="OK",method="Echo",service="{SERVICE}"}}' in body
    finally:
        await running.stop(0)


async def test_duplicate_registration_is_refused() -> None:
    registration = ServiceRegistration(_add_echo, EchoServicer(), SERVICE)
    with pytest.raises(ValueError, match="registered twice"):
        await start_server([registration, registration], _config())


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """serve() configures the root logger; put it back for the tests after this one."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_serve_drains_on_sigterm(restore_logging) -> None:
    started: list[RunningServer] = []
    hook_ran = asyncio.Event()
    task = asyncio.ensure_future(
        serve(
            [(_add_echo, EchoServicer(), SERVICE)],
            _config(log_format="text"),
            shutdown_hooks=[hook_ran.set],
            on_started=started.append,
        )
    )
    while not started:
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(started[0].address) as channel:
        assert await _unary(channel, "Echo")(b"up", timeout=5) == b"up"
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 10)
    assert hook_ran.is_set()
    assert started[0].draining


# ------------------------------------------------- admission and request decoding
async def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted() -> None:
    servicer = EchoServicer()
    running = await start_server(
        [ServiceRegistration(_add_echo, servicer, SERVICE)], _config(max_concurrent_rpcs=2)
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            held = [asyncio.ensure_future(_unary(channel, "Slow")(b"hold", timeout=10)) for _ in range(2)]
            for _ in range(200):
                if running.in_flight == 2:
                    break
                await asyncio.sleep(0.01)
            assert running.in_flight == 2
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _unary(channel, "Echo")(b"one too many", timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            servicer.release.set()
            assert await asyncio.gather(*held) == [b"slow done", b"slow done"]
            assert await _unary(channel, "Echo")(b"room again", timeout=5) == b"room again"
    finally:
        await running.stop(0)


class _StrictMessage:
    """A request type whose parser refuses anything but ASCII digits, like a protobuf DecodeError."""

    @staticmethod
    def parse(payload: bytes) -> int:
        if not payload.isdigit():
            raise ValueError(f"not a number: {payload[:10]!r}")
        return int(payload)


def _add_strict(servicer: object, server: grpc.aio.Server) -> None:
    async def double(number: int, context: grpc.aio.ServicerContext) -> bytes:
        return str(2 * number).encode()

    async def total(numbers: AsyncIterator[int], context: grpc.aio.ServicerContext) -> bytes:
        return str(sum([number async for number in numbers])).encode()

    handlers = {
        "Double": grpc.unary_unary_rpc_method_handler(
            double, request_deserializer=_StrictMessage.parse, response_serializer=lambda payload: payload
        ),
        "Total": grpc.stream_unary_rpc_method_handler(
            total, request_deserializer=_StrictMessage.parse, response_serializer=lambda payload: payload
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("histosynth.test.Strict", handlers),))


async def test_undecodable_requests_are_invalid_argument_not_unknown() -> None:
    running = await start_server([ServiceRegistration(_add_strict, object(), "histosynth.test.Strict")], _config())
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            double = channel.unary_unary("/histosynth.test.Strict/Double")
            assert await double(b"21", timeout=5) == b"42"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await double(b"\xff\x00garbage", timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid request message for histosynth.test.Strict/Double" in refused.value.details()

            total = channel.stream_unary("/histosynth.test.Strict/Total")
            assert await total(iter([b"1", b"2", b"3"]), timeout=5) == b"6"
            with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
                await total(iter([b"1", b"oops"]), timeout=5)
            assert refused_stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert await double(b"5", timeout=5) == b"10"  # still serving
    finally:
        await running.stop(0)
