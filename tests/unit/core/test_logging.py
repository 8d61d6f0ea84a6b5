"""Structured logging: one JSON object per line with ts, level, logger, msg and extra fields."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import socket
from collections.abc import Callable, Iterator

import pytest

from services.core.logging import configure_logging, install_grpc_shutdown_race_filter


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_fixed_keys_and_extras(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    log = logging.getLogger("histosynth.test")
    log.debug("hidden below INFO")
    log.info("model %s loaded", "tiny", extra={"version": "2", "device": "cpu", "msg_count": 1})
    try:
        raise ValueError("bad tile")
    except ValueError:
        log.exception("render failed", extra={"level": "clashes with a fixed key"})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["level"] == "INFO" and first["logger"] == "histosynth.test"
    assert first["msg"] == "model tiny loaded"
    assert (first["version"], first["device"], first["msg_count"]) == ("2", "cpu", 1)
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "ERROR" and second["extra_level"] == "clashes with a fixed key"
    assert "ValueError: bad tile" in second["exc"]


def test_reconfiguring_replaces_its_own_handler(root_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "json", first)
    configure_logging("WARNING", "text", second)
    logging.getLogger("histosynth.test").warning("queue full", extra={"model": "tiny"})
    assert first.getvalue() == ""
    assert "WARNING histosynth.test: queue full model='tiny'" in second.getvalue()


def test_unknown_format_is_refused(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging("INFO", "xml")  # type: ignore[arg-type]


class PollerCompletionQueue:
    """Named like grpc's poller; its reader reads its wake-up socket after the socket was closed, as grpc's does."""

    def __init__(self) -> None:
        self.read_socket, write_socket = socket.socketpair()
        write_socket.close()
        self.read_socket.close()

    def _handle_events(self) -> None:
        self.read_socket.recv(1)  # OSError: [Errno 9] Bad file descriptor

    def _handle_events_other_error(self) -> None:
        raise OSError(errno.EPIPE, "Broken pipe")


def _asyncio_records(callback: Callable[[], None], caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    install_grpc_shutdown_race_filter()
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.DEBUG):
            loop.call_soon(callback)
            loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    return [r for r in caplog.records if r.name == "asyncio"]


def test_grpc_poller_shutdown_race_is_logged_at_debug_not_as_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert _asyncio_records(PollerCompletionQueue()._handle_events, caplog) == []
    assert any("grpc aio poller woke on its closed socket" in r.getMessage() for r in caplog.records)


def test_the_race_is_recognised_when_the_reader_was_removed_first(caplog: pytest.LogCaptureFixture) -> None:
    # grpc's real shutdown removes the reader (cancelling its handle) before the callback raises, so asyncio's
    # message reads "Exception in callback None()" / "<Handle cancelled>" and names no function (seen in `make run`).
    install_grpc_shutdown_race_filter()
    loop = asyncio.new_event_loop()
    read_socket, write_socket = socket.socketpair()
    write_socket.send(b"x")

    class PollerCompletionQueue:
        def _handle_events(self) -> None:
            loop.remove_reader(read_socket.fileno())
            read_socket.close()
            read_socket.recv(1)  # OSError: [Errno 9] Bad file descriptor

    try:
        with caplog.at_level(logging.DEBUG):
            loop.add_reader(read_socket.fileno(), PollerCompletionQueue()._handle_events)
            loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()
        write_socket.close()
    assert [r for r in caplog.records if r.name == "asyncio"] == []
    assert any("grpc aio poller woke on its closed socket" in r.getMessage() for r in caplog.records)


def test_other_callback_errors_are_still_reported(caplog: pytest.LogCaptureFixture) -> None:
    def unrelated() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    for callback in (unrelated, PollerCompletionQueue()._handle_events_other_error):
        caplog.clear()
        records = _asyncio_records(callback, caplog)
        assert len(records) == 1 and records[0].levelno == logging.ERROR
