"""Fixtures shared by every test directory; keep this generic (area-specific ones live beside their tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_model import write_tiny_model


@pytest.fixture
def tiny_model_store(tmp_path: Path) -> Path:
    """A model_store root holding the real ONNX model ``tiny`` (y = 2x + 1) at versions 1 and 2."""
    root = tmp_path / "model_store"
    write_tiny_model(root, version="1")
    write_tiny_model(root, version="2")
    return root


@pytest.fixture(autouse=True)
def sink_root_under_pytest_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation servers confine sinks below HISTOSYNTH_SINK_ROOT: let tests write below pytest's tmp dir."""
    monkeypatch.setenv("HISTOSYNTH_SINK_ROOT", str(tmp_path_factory.getbasetemp()))
