"""Structured logging: one JSON object per line with ts, level, logger, msg and extra fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from services.core.logging import configure_logging


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
