"""ModelStore against real manifest trees on disk (built by tests/fixtures/tiny_model.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.core.errors import ModelNotFoundError
from services.core.model_store import (
    MANIFEST_KEYS,
    ChecksumMismatchError,
    ManifestError,
    ModelStore,
    parse_manifest,
)
from services.core.runtimes.base import TensorSpec
from tests.fixtures.tiny_model import write_tiny_model


_DELETE = object()  # marks a key _rewrite removes


def _rewrite(manifest_path: Path, **changes: Any) -> None:
    raw = yaml.safe_load(manifest_path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del raw[key]
        else:
            raw[key] = value
    manifest_path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_lists_models_and_versions_in_numeric_order(tmp_path: Path) -> None:
    for version in ("1", "2", "10"):
        write_tiny_model(tmp_path, version=version)
    write_tiny_model(tmp_path, name="other", version="3")
    (tmp_path / "tiny" / "draft").mkdir()  # not an integer: ignored
    (tmp_path / "empty-model").mkdir()  # no versions: not a model
    store = ModelStore(tmp_path)
    assert store.list_models() == ["other", "tiny"]
    assert store.versions("tiny") == ["1", "2", "10"]


def test_get_picks_latest_integer_version_unless_pinned(tmp_path: Path) -> None:
    for version in ("2", "10", "9"):
        write_tiny_model(tmp_path, version=version)
    store = ModelStore(tmp_path)
    assert store.get("tiny").version == "10"
    assert store.get("tiny", "9").version == "9"
    assert store.get("tiny", 2).version == "2"


def test_manifest_fields_are_typed(tiny_model_store: Path) -> None:
    manifest = ModelStore(tiny_model_store).get("tiny", "1")
    assert manifest.name == "tiny" and manifest.kind == "test" and manifest.format == "onnx"
    assert manifest.path == tiny_model_store / "tiny" / "1" / "model.onnx"
    assert manifest.key == "tiny/1"
    assert manifest.max_batch_size == 8
    assert manifest.inputs == (TensorSpec("x", "float32", ("batch", 3, "height", "width")),)
    assert manifest.outputs[0].name == "y"
    assert manifest.metadata["tile_size"] == 64
    assert manifest.provenance["seed"] == 0
    hash(manifest)  # usable as a dict key despite its free-form sections


def test_unknown_model_lists_what_exists(tiny_model_store: Path) -> None:
    with pytest.raises(ModelNotFoundError) as raised:
        ModelStore(tiny_model_store).get("renderer")
    assert raised.value.status == "NOT_FOUND"
    assert "'tiny'" in str(raised.value)


def test_unknown_version_lists_versions(tiny_model_store: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"tiny/1.*tiny/2"):
        ModelStore(tiny_model_store).get("tiny", "7")


def test_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ModelStore(tmp_path / "absent")


def test_checksum_mismatch_is_refused(tiny_model_store: Path) -> None:
    model_path = tiny_model_store / "tiny" / "2" / "model.onnx"
    model_path.write_bytes(model_path.read_bytes() + b"tampered")
    with pytest.raises(ChecksumMismatchError, match=r"sha256 of model\.onnx"):
        ModelStore(tiny_model_store).get("tiny")


def test_checksum_is_cached_until_the_file_changes(tiny_model_store: Path) -> None:
    store = ModelStore(tiny_model_store)
    store.get("tiny", "1")
    store.get("tiny", "1")
    assert len(store._hash_cache) == 1
    model_path = tiny_model_store / "tiny" / "1" / "model.onnx"
    model_path.write_bytes(model_path.read_bytes()[:-1] + b"\x00")
    stat = model_path.stat()
    os.utime(model_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(ChecksumMismatchError):
        store.get("tiny", "1")


def test_missing_model_file_names_the_key(tiny_model_store: Path) -> None:
    (tiny_model_store / "tiny" / "2" / "model.onnx").unlink()
    with pytest.raises(ManifestError, match=r"key 'file'.*does not exist"):
        ModelStore(tiny_model_store).get("tiny")


@pytest.mark.parametrize("key", list(MANIFEST_KEYS))
def test_missing_key_is_named_with_the_file(tiny_model_store: Path, key: str) -> None:
    manifest_path = tiny_model_store / "tiny" / "1" / "manifest.yaml"
    _rewrite(manifest_path, **{key: _DELETE})
    with pytest.raises(ManifestError) as raised:
        parse_manifest(manifest_path)
    assert f"missing required key(s) ['{key}']" in str(raised.value)
    assert str(manifest_path) in str(raised.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 1}, r"key 'version' must be a string.*quote it"),
        ({"version": "3"}, r"key 'version' is '3' but the version directory is '1'"),
        ({"name": "renderer"}, r"key 'name' is 'renderer'"),
        ({"kind": "painter"}, r"key 'kind' is 'painter'; valid: refiner"),
        ({"format": "savedmodel"}, r"key 'format' is 'savedmodel'; valid: onnx, torchscript, tensorrt_plan"),
        ({"file": "../other/model.onnx"}, r"key 'file'.*inside the version directory"),
        ({"sha256": "abc"}, r"key 'sha256' is 'abc'"),
        ({"max_batch_size": 0}, r"key 'max_batch_size' is 0"),
        ({"max_batch_size": True}, r"key 'max_batch_size' must be an integer"),
        ({"metadata": []}, r"key 'metadata' must be a mapping"),
        ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({"inputs": []}, r"key 'inputs' must list at least one tensor"),
        ({"inputs": [{"name": "x", "dtype": "float32"}]}, r"key 'inputs\[0\]' misses \['shape'\]"),
        (
            {"inputs": [{"name": "x", "dtype": "float33", "shape": ["batch", 3]}]},
            r"key 'inputs\[0\]'.*unknown dtype 'float33'",
        ),
        (
            {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", -3]}]},
            r"key 'inputs\[0\]'.*shape entry -3",
        ),
        (
            {"outputs": [{"name": "y", "dtype": "float32", "shape": [4, 3, "height", "width"]}]},
            r"key 'outputs'.*fixed batch axis 4",
        ),
    ],
)
def test_bad_values_are_named(tiny_model_store: Path, changes: dict[str, Any], message: str) -> None:
    manifest_path = tiny_model_store / "tiny" / "1" / "manifest.yaml"
    _rewrite(manifest_path, **changes)
    with pytest.raises(ManifestError, match=message) as raised:
        ModelStore(tiny_model_store).get("tiny", "1")
    assert str(manifest_path) in str(raised.value)


def test_not_yaml_mapping_is_refused(tiny_model_store: Path) -> None:
    manifest_path = tiny_model_store / "tiny" / "1" / "manifest.yaml"
    manifest_path.write_text("- just\n- a list\n")
    with pytest.raises(ManifestError, match="must be a YAML mapping"):
        parse_manifest(manifest_path)
