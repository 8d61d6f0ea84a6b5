"""training/export/torchserve_archive.py: model_store versions -> TorchServe .mar files (real torch-model-archiver)."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from services.core.model_store import ModelStore
from tests.fixtures.service_models import REFINER_NAME, RENDERER_NAME, write_service_store

pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
from training.export.torchserve_archive import (  # noqa: E402
    HANDLER,
    ArchiveSettings,
    build_archive,
    build_archives,
    main,
)

pytestmark = pytest.mark.torch


def read_archive(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_every_model_is_archived_at_its_latest_version(tmp_path: Path) -> None:
    store = ModelStore(write_service_store(tmp_path / "store"))
    archives = build_archives(store, tmp_path / "out")

    assert sorted(path.name for path in archives) == sorted(f"{name}.mar" for name in (REFINER_NAME, RENDERER_NAME))
    refiner = store.get(REFINER_NAME)  # version 2, the latest
    files = read_archive(tmp_path / "out" / f"{REFINER_NAME}.mar")
    assert files["model.onnx"] == refiner.path.read_bytes()
    assert files["manifest.yaml"] == refiner.manifest_path.read_bytes()
    assert files["handler.py"] == HANDLER.read_bytes()
    mar_manifest = json.loads(files["MAR-INF/MANIFEST.json"])
    assert mar_manifest["model"]["modelName"] == REFINER_NAME
    assert mar_manifest["model"]["modelVersion"] == refiner.version == "2"
    assert mar_manifest["model"]["serializedFile"] == "model.onnx"
    config = yaml.safe_load(files["model-config.yaml"])
    assert config["batchSize"] == refiner.max_batch_size
    assert (config["minWorkers"], config["maxWorkers"], config["deviceType"]) == (1, 1, "cpu")


def test_cli_archives_one_pinned_version_with_batch_settings(tmp_path: Path) -> None:
    root = write_service_store(tmp_path / "store")
    out = tmp_path / "out"
    argv = ["--store-root", str(root), "--out", str(out), "--model", REFINER_NAME, "--version", "1"]
    assert main([*argv, "--batch-size", "2", "--max-batch-delay-ms", "7"]) == 0

    assert [path.name for path in out.iterdir()] == [f"{REFINER_NAME}.mar"]
    files = read_archive(out / f"{REFINER_NAME}.mar")
    assert yaml.safe_load(files["manifest.yaml"])["version"] == "1"
    config = yaml.safe_load(files["model-config.yaml"])
    assert (config["batchSize"], config["maxBatchDelay"]) == (2, 7)


def test_version_without_exactly_one_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_service_store(tmp_path / "store")
    with pytest.raises(SystemExit):
        main(["--store-root", str(root), "--out", str(tmp_path / "out"), "--version", "1"])
    assert "--version needs exactly one --model" in capsys.readouterr().err


def test_non_onnx_model_is_refused_naming_the_format(tmp_path: Path) -> None:
    manifest = ModelStore(write_service_store(tmp_path / "store")).get(RENDERER_NAME)
    with pytest.raises(ValueError, match="'torchscript' cannot be archived"):
        build_archive(dataclasses.replace(manifest, format="torchscript"), tmp_path / "out")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ArchiveSettings(batch_size=0)
