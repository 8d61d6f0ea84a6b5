"""`histosynth models list / verify` on real manifest trees: ok, changed file, missing file, broken manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.cli import main
from clients.model_audit import audit_store
from tests.fixtures.tiny_model import write_tiny_model


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    write_tiny_model(root, name="alpha", version="1")
    write_tiny_model(root, name="alpha", version="10")
    write_tiny_model(root, name="beta", version="2")
    return root


def test_intact_store_lists_and_verifies(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert [(c.key, c.status) for c in audit_store(store)] == [
        ("alpha/1", "ok"), ("alpha/10", "ok"), ("beta/2", "ok")]
    assert main(["models", "list", "--model-store", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["NAME", "VERSION", "KIND", "FORMAT", "SIZE", "SHA256"]
    assert lines[2].split()[:4] == ["alpha", "1", "test", "onnx"] and lines[2].split()[-1] == "ok"
    assert main(["models", "verify", "--model-store", str(store)]) == 0
    assert "all 3 model versions" in capsys.readouterr().out


def test_verify_reports_every_problem_and_fails(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(store / "alpha" / "10" / "model.onnx", "ab") as stream:
        stream.write(b"\0")  # a truncated or swapped copy changes the hash
    (store / "beta" / "2" / "model.onnx").unlink()
    (store / "gamma" / "3").mkdir(parents=True)  # a version without a manifest: servers skip it
    write_tiny_model(store, name="delta", version="1")
    (store / "delta" / "1" / "manifest.yaml").write_text("name: [unclosed\n")
    assert main(["models", "verify", "--model-store", str(store)]) == 1
    captured = capsys.readouterr()
    lines = {line.split()[1]: line.split()[0] for line in captured.out.splitlines()}
    assert lines == {"alpha/1": "ok", "alpha/10": "MISMATCH", "beta/2": "MISSING", "delta/1": "INVALID",
                     "gamma/3": "INVALID"}
    assert "4 of 5 model versions" in captured.err and "alpha/10, beta/2, delta/1, gamma/3" in captured.err
    assert main(["models", "list", "--model-store", str(store)]) == 0  # list informs; verify is the check
    assert "MISMATCH" in capsys.readouterr().out


def test_empty_store_does_not_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "verify", "--model-store", str(tmp_path)]) == 1
    assert "no models in" in capsys.readouterr().err
