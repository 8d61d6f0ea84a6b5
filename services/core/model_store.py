"""The model repository on disk: ``<root>/<name>/<version>/manifest.yaml`` plus the model file.

The manifest (contract: notes/MANIFEST.md, written by training/export) is the single
source of a model's names, shapes, dtypes, format and pre/post-processing metadata.
Every key is checked when a manifest is read, and a bad one is reported with the
key and the file; the model file's sha256 is verified before anyone loads it, so a
half-copied or swapped file is refused instead of served.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from services.core.errors import HistosynthError, ModelNotFoundError
from services.core.runtimes.base import TensorSpec
from services.core.runtimes.registry import RUNTIMES

_log = logging.getLogger(__name__)

MANIFEST_FILE: Final = "manifest.yaml"
MODEL_KINDS: Final = ("refiner", "renderer", "patch_generator", "encoder", "segmenter", "denoiser", "test")
# Every manifest key -> the Python type its value must have (YAML-decoded).
MANIFEST_KEYS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "name": str,
    "version": str,
    "kind": str,
    "format": str,
    "file": str,
    "sha256": str,
    "max_batch_size": int,
    "inputs": list,
    "outputs": list,
    "metadata": dict,
    "provenance": dict,
    "metrics": dict,
}
TENSOR_KEYS: Final = ("name", "dtype", "shape")
_VERSION_PATTERN: Final = re.compile(r"^[1-9][0-9]*$")
_SHA256_PATTERN: Final = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK_BYTES: Final = 1 << 20


class ManifestError(HistosynthError):
    """A manifest or model file breaks the contract; the message names the key and the file."""

    default_status = "FAILED_PRECONDITION"
    reason = "invalid_manifest"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ChecksumMismatchError(ManifestError):
    """The model file's sha256 differs from the manifest's: the file is not the one exported."""

    reason = "checksum_mismatch"


@dataclass(frozen=True)
class ModelManifest:
    """One model version as its manifest describes it; ``path`` is the model file."""

    name: str
    version: str
    kind: str
    format: str
    file: str
    sha256: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    directory: Path
    # Free-form sections; excluded from hashing so a manifest can key a dict.
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    provenance: Mapping[str, Any] = field(default_factory=dict, hash=False)
    metrics: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def path(self) -> Path:
        return self.directory / self.file

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_FILE

    @property
    def key(self) -> str:
        """``name/version``: how logs and errors name a model version."""
        return f"{self.name}/{self.version}"


def _type_name(expected: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "a mapping"}
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def _is_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    # YAML `true` is a bool, and bool is an int subclass: never accept it as a number.
    if isinstance(value, bool) and expected is not bool:
        return False
    return isinstance(value, expected)


def _parse_tensors(raw: list[Any], key: str, source: Path) -> tuple[TensorSpec, ...]:
    if not raw:
        raise ManifestError(f"{source}: key {key!r} must list at least one tensor")
    specs = []
    for position, entry in enumerate(raw):
        where = f"{key}[{position}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{source}: key {where!r} must be a mapping with keys {list(TENSOR_KEYS)}")
        missing = [name for name in TENSOR_KEYS if name not in entry]
        unknown = sorted(set(entry) - set(TENSOR_KEYS))
        if missing:
            raise ManifestError(f"{source}: key {where!r} misses {missing}")
        if unknown:
            raise ManifestError(f"{source}: key {where!r} has unknown keys {unknown}; valid: {list(TENSOR_KEYS)}")
        if not isinstance(entry["shape"], list):
            raise ManifestError(f"{source}: key '{where}.shape' must be a list, got {entry['shape']!r}")
        try:
            spec = TensorSpec(name=entry["name"], dtype=entry["dtype"], shape=tuple(entry["shape"]))
        except ValueError as error:
            raise ManifestError(f"{source}: key {where!r}: {error}") from None
        if not spec.shape:
            raise ManifestError(f"{source}: key '{where}.shape' must have a batch axis first")
        specs.append(spec)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ManifestError(f"{source}: key {key!r} repeats a tensor name: {names}")
    return tuple(specs)


def parse_manifest(manifest_path: Path) -> ModelManifest:
    """Read and validate one manifest.yaml (without verifying the model file's checksum)."""
    manifest_path = Path(manifest_path)
    try:
        raw = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: manifest file does not exist") from None
    except yaml.YAMLError as error:
        raise ManifestError(f"{manifest_path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{manifest_path}: must be a YAML mapping, got {type(raw).__name__}")

    missing = [key for key in MANIFEST_KEYS if key not in raw]
    if missing:
        raise ManifestError(f"{manifest_path}: missing required key(s) {missing}")
    unknown = sorted(set(raw) - set(MANIFEST_KEYS))
    if unknown:
        raise ManifestError(f"{manifest_path}: unknown key(s) {unknown}; valid: {list(MANIFEST_KEYS)}")
    for key, expected in MANIFEST_KEYS.items():
        if not _is_type(raw[key], expected):
            hint = " (quote it: version: \"1\")" if key == "version" else ""
            raise ManifestError(
                f"{manifest_path}: key {key!r} must be {_type_name(expected)}, got {raw[key]!r}{hint}"
            )

    directory = manifest_path.parent
    if raw["name"] != directory.parent.name:
        raise ManifestError(
            f"{manifest_path}: key 'name' is {raw['name']!r} but the model directory is {directory.parent.name!r}"
        )
    if raw["version"] != directory.name:
        raise ManifestError(
            f"{manifest_path}: key 'version' is {raw['version']!r} but the version directory is {directory.name!r}"
        )
    if raw["kind"] not in MODEL_KINDS:
        raise ManifestError(f"{manifest_path}: key 'kind' is {raw['kind']!r}; valid: {', '.join(MODEL_KINDS)}")
    if raw["format"] not in RUNTIMES:
        raise ManifestError(f"{manifest_path}: key 'format' is {raw['format']!r}; valid: {', '.join(RUNTIMES)}")
    file_path = Path(raw["file"])
    if not raw["file"] or file_path.is_absolute() or ".." in file_path.parts:
        raise ManifestError(
            f"{manifest_path}: key 'file' is {raw['file']!r}; it must be a path inside the version directory"
        )
    if not _SHA256_PATTERN.match(raw["sha256"]):
        raise ManifestError(f"{manifest_path}: key 'sha256' is {raw['sha256']!r}, not 64 lowercase hex digits")
    if raw["max_batch_size"] < 1:
        raise ManifestError(f"{manifest_path}: key 'max_batch_size' is {raw['max_batch_size']!r}, must be >= 1")

    inputs = _parse_tensors(raw["inputs"], "inputs", manifest_path)
    outputs = _parse_tensors(raw["outputs"], "outputs", manifest_path)
    for key, specs in (("inputs", inputs), ("outputs", outputs)):
        for spec in specs:
            # Axis 0 is the batch axis; a fixed one only fits a model that never batches.
            if isinstance(spec.shape[0], int) and not (spec.shape[0] == 1 == raw["max_batch_size"]):
                raise ManifestError(
                    f"{manifest_path}: key {key!r}: tensor {spec.name!r} has fixed batch axis "
                    f"{spec.shape[0]}; name it (e.g. 'batch') or set max_batch_size: 1 with size 1"
                )
    return ModelManifest(
        name=raw["name"],
        version=raw["version"],
        kind=raw["kind"],
        format=raw["format"],
        file=raw["file"],
        sha256=raw["sha256"],
        max_batch_size=raw["max_batch_size"],
        inputs=inputs,
        outputs=outputs,
        directory=directory,
        metadata=raw["metadata"],
        provenance=raw["provenance"],
        metrics=raw["metrics"],
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ModelStore:
    """Read-only view of a model repository; thread-safe.

    ``get`` returns a validated manifest whose model file matches its checksum. Hashes
    are cached by (path, mtime, size), so a large model is hashed once per change,
    not once per instance loaded.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"model store root {self.root} is not a directory: set HISTOSYNTH_MODEL_STORE "
                "(the histosynth CLI also takes --model-store; services/core/store_location.py)"
            )
        self._hash_cache: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()

    def list_models(self) -> list[str]:
        """Names of models with at least one version directory, sorted."""
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and self._version_dirs(entry)
        )

    def versions(self, name: str) -> list[str]:
        """Version strings of ``name`` in ascending numeric order; unknown model raises."""
        model_dir = self.root / name
        versions = self._version_dirs(model_dir) if self._is_model_name(name) else []
        if not versions:
            raise ModelNotFoundError(name, None, self.list_models())
        return versions

    def get(self, name: str, version: str | int | None = None) -> ModelManifest:
        """The manifest of ``name`` at ``version`` (latest integer version when None), checksum verified."""
        versions = self.versions(name)
        chosen = versions[-1] if version is None else str(version)
        if chosen not in versions:
            raise ModelNotFoundError(name, chosen, [f"{name}/{known}" for known in versions])
        manifest = parse_manifest(self.root / name / chosen / MANIFEST_FILE)
        self.verify_checksum(manifest)
        return manifest

    def verify_checksum(self, manifest: ModelManifest) -> None:
        path = manifest.path
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ManifestError(
                f"{manifest.manifest_path}: key 'file' names {manifest.file!r}, which does not exist"
            ) from None
        cache_key = (path.resolve(), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            actual = self._hash_cache.get(cache_key)
        if actual is None:
            actual = file_sha256(path)
            with self._lock:
                self._hash_cache[cache_key] = actual
        if actual != manifest.sha256:
            raise ChecksumMismatchError(
                f"{manifest.manifest_path}: sha256 of {manifest.file} is {actual}, manifest says "
                f"{manifest.sha256}; the file was changed or copied incompletely (re-export or re-copy it)"
            )

    @staticmethod
    def _is_model_name(name: str) -> bool:
        return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")

    @staticmethod
    def _version_dirs(model_dir: Path) -> list[str]:
        if not model_dir.is_dir():
            return []
        versions = [
            entry.name
            for entry in model_dir.iterdir()
            if entry.is_dir() and _VERSION_PATTERN.match(entry.name) and (entry / MANIFEST_FILE).is_file()
        ]
        return sorted(versions, key=int)
