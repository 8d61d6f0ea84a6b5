"""Structured logging for every service: one JSON object per line, or plain text for humans.

JSON lines carry ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``msg``
and every ``extra=`` field given at the call site, so log pipelines can filter on
e.g. ``model`` or ``peer`` without parsing messages::

    log.info("model loaded", extra={"model": "renderer-he", "version": "1", "device": "cpu"})
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Final, Literal, TextIO

LOG_FORMATS: Final = ("json", "text")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The ``extra=`` fields attached to a record, in insertion order."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_RECORD_ATTRIBUTES and not key.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line; non-JSON extras are stringified."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            # An extra must not overwrite the fixed keys log pipelines rely on.
            entry[key if key not in entry else f"extra_{key}"] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: msg key=value ...`` for reading in a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{key}={value!r}" for key, value in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class _HistosynthHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installed, so reconfiguring replaces it."""


def configure_logging(
    level: str | int = "INFO",
    log_format: Literal["json", "text"] = "json",
    stream: TextIO | None = None,
) -> None:
    """Route the root logger to ``stream`` (stderr by default) in the chosen format.

    Idempotent: calling it again replaces the handler it installed before and leaves
    handlers installed by others (pytest's capture, for one) alone.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; valid: {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _HistosynthHandler):
            root.removeHandler(handler)
    handler = _HistosynthHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    install_grpc_shutdown_race_filter()


class _GrpcAioShutdownRaceFilter(logging.Filter):
    """Drops asyncio's "Exception in callback" report of grpc aio's poller shutdown race.

    grpc aio shares one completion-queue poller between every event loop of the process and
    closes its wake-up socket when the last aio server or channel goes away, from whichever
    thread drops it. A loop in another thread (the all-in-one servers' loop, say) may already
    have that socket's readiness queued, so its reader callback runs once on a closed fd and
    raises EBADF after everything has stopped. Nothing is lost -- no call is in flight by then
    -- but the traceback reads like a crash, so it is logged at DEBUG instead. Any other
    callback error, or any other errno, is reported as before.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno == errno.EBADF and _raised_in_grpc_poller_reader(exc):
            logging.getLogger(__name__).debug(
                "grpc aio poller woke on its closed socket after shutdown (harmless; nothing in flight)"
            )
            return False
        return True


def _raised_in_grpc_poller_reader(exc: BaseException) -> bool:
    """Whether ``exc`` passed through ``PollerCompletionQueue._handle_events``. Judged by the traceback, not by
    asyncio's message: grpc removes the reader before the callback raises, which cancels the handle, and a
    cancelled handle's message reads "Exception in callback None()" with no function name in it."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code  # Cython frames carry the dotted name in co_name, Python ones in co_qualname
        if any(name.endswith("PollerCompletionQueue._handle_events") for name in (code.co_name, code.co_qualname)):
            return True
        tb = tb.tb_next
    return False


_GRPC_SHUTDOWN_RACE_FILTER: Final = _GrpcAioShutdownRaceFilter()


def install_grpc_shutdown_race_filter() -> None:
    """Attach the filter to the ``asyncio`` logger (idempotent; every loop of the process logs there)."""
    asyncio_logger = logging.getLogger("asyncio")
    if _GRPC_SHUTDOWN_RACE_FILTER not in asyncio_logger.filters:
        asyncio_logger.addFilter(_GRPC_SHUTDOWN_RACE_FILTER)
