"""A feature whose extra is missing names the extra to install, not a ModuleNotFoundError."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from services.core.extras import EXTRAS, MissingExtraError, missing_modules, require_extra

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_missing_module_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # how Python marks a module as not importable
    assert missing_modules(["yaml", "pyarrow", "no_such_module_xyz"]) == ["pyarrow", "no_such_module_xyz"]
    with pytest.raises(MissingExtraError) as raised:
        require_extra("augment", "histosynth augment", ["yaml", "pyarrow"])
    assert str(raised.value) == (
        "histosynth augment needs pyarrow (not installed), from the 'augment' extra: pip install 'histosynth[augment]'"
    )
    assert isinstance(raised.value, ImportError) and raised.value.missing == ("pyarrow",)
    require_extra("augment", "histosynth augment", ["yaml"])  # present: no error


def test_every_documented_extra_is_declared() -> None:
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(declared)
    with pytest.raises(ValueError, match="unknown extra"):
        MissingExtraError("nope", "x", ["y"])


def test_augment_checks_only_what_the_run_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from clients.augment import require_augment_packages

    for module in ("pyarrow", "ray", "s3fs"):
        monkeypatch.setitem(sys.modules, module, None)
    require_augment_packages("out/local", ["webdataset"], "local")  # fsspec only
    with pytest.raises(MissingExtraError, match=r"needs pyarrow, ray, s3fs .*histosynth\[augment\]"):
        require_augment_packages("s3://bucket/x", ["webdataset", "parquet"], "ray")


def test_augment_command_fails_before_loading_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No model store exists here: the extra check must come first, as one line on stderr."""
    from clients.cli import main

    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("HISTOSYNTH_MODEL_STORE", raising=False)
    assert main(["augment", "--spec", "nuclei", "--out", str(tmp_path / "o"), "--count", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("histosynth augment: error: histosynth augment needs fsspec (not installed), "
                     "from the 'augment' extra: pip install 'histosynth[augment]'")
