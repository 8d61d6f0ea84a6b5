"""Per-sample files on disk: the one writer shared by the server's sink_uri and the CLI.

Per sample ``NNNNNN`` (zero-padded index) in one directory:
  NNNNNN_image.png      RGB image
  NNNNNN_mask.png       uint8 class ids
  NNNNNN_instances.png  uint16 instance ids (0 = none; all zero when the tissue has none)
  NNNNNN.json           stratum, class names, scores, provenance — written LAST

Every file is written to a temporary name and renamed into place (atomic on POSIX), and
the JSON comes last, so "NNNNNN.json exists" means the sample is complete: a resumed run
skips exactly those indices and redoes any half-written sample.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import cv2
import numpy as np

from services.core.errors import InvalidInputError, clip
from services.core.png import encode_label_png

_FINISHED: Final = re.compile(r"^(\d{6,})\.json$")
INDEX_DIGITS: Final = 6


SINK_ROOT_ENV: Final = "HISTOSYNTH_SINK_ROOT"
# Below POSIX NAME_MAX (255 bytes) with room for the temporary-file prefix, and a bound on the whole path.
MAX_SINK_COMPONENT_BYTES: Final = 200
MAX_SINK_URI_CHARS: Final = 1024


def default_sink_root() -> Path:
    """Where a server may write sinks: ``$HISTOSYNTH_SINK_ROOT``, else ``./sinks`` under its working dir.

    A remote client names the sink, so without a root it could make the server write anywhere
    its user can (e.g. over its own model store); every sink is confined below this directory.
    """
    return Path(os.environ.get(SINK_ROOT_ENV) or Path.cwd() / "sinks")


def sink_path(uri: str, root: Path | None = None) -> Path:
    """A local directory from a path or ``file://`` URI, confined below ``root``.

    Relative paths are taken below ``root`` (default ``default_sink_root()``); absolute ones
    must already lie inside it. Other schemes are refused by name.
    """
    path = _local_path(uri)
    base = (root or default_sink_root()).resolve()
    resolved = (base / path).resolve()  # an absolute `path` replaces `base` here
    if not resolved.is_relative_to(base):
        raise InvalidInputError(
            f"sink_uri: {clip(uri)} lies outside this server's sink root {str(base)!r}; send a path below it "
            f"(relative paths are taken below it; operators set it with {SINK_ROOT_ENV})"
        )
    return resolved


def _local_path(uri: str) -> Path:
    if len(uri) > MAX_SINK_URI_CHARS:
        raise InvalidInputError(
            f"sink_uri: {len(uri)} characters, more than the limit of {MAX_SINK_URI_CHARS}; use a shorter path"
        )
    if "\x00" in uri:
        raise InvalidInputError("sink_uri: contains a NUL byte; send a plain local path or file:// URI")
    if any(not char.isprintable() for char in uri):
        raise InvalidInputError(
            "sink_uri: contains control characters (newline, tab, ...); send a plain local path or file:// URI"
        )
    try:
        parsed = urlparse(uri)
    except ValueError as error:  # e.g. "Invalid IPv6 URL" for an unclosed '['
        raise InvalidInputError(
            f"sink_uri: {clip(uri)} is not a valid URI ({error}); use a local path or file:// URI"
        ) from None
    if parsed.scheme in ("", "file"):
        text = parsed.path if parsed.scheme == "file" else uri
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise InvalidInputError(
                f"sink_uri: file:// URI names host {clip(parsed.netloc)}; only local paths (file:///path) are supported"
            )
        parts = [part for part in text.split("/") if part]
        if not parts:
            raise InvalidInputError(
                f"sink_uri: {clip(uri)} names no directory (the sink root itself is not a sink); "
                "send a directory name such as 'run-1'"
            )
        for part in parts:
            if part in (".", ".."):
                raise InvalidInputError(
                    f"sink_uri: {clip(uri)} has a {part!r} path component; name the directory directly"
                )
            if len(part.encode("utf-8", "surrogateescape")) > MAX_SINK_COMPONENT_BYTES:
                raise InvalidInputError(
                    f"sink_uri: path component {clip(part)} is longer than {MAX_SINK_COMPONENT_BYTES} bytes; "
                    "use shorter directory names"
                )
        return Path(text)
    raise InvalidInputError(
        f"sink_uri: scheme {clip(parsed.scheme)} is not supported by this server; use a local path or file:// URI"
    )


def sample_stem(index: int) -> str:
    return f"{index:0{INDEX_DIGITS}d}"


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class SampleWriter:
    """Writes samples into ``root`` (created if missing) and reports which are finished."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def finished_indices(self) -> set[int]:
        return {int(m.group(1)) for p in self.root.iterdir() if (m := _FINISHED.match(p.name))}

    def paths(self, index: int) -> dict[str, Path]:
        stem = sample_stem(index)
        return {
            "image": self.root / f"{stem}_image.png",
            "mask": self.root / f"{stem}_mask.png",
            "instances": self.root / f"{stem}_instances.png",
            "json": self.root / f"{stem}.json",
        }

    def write(
        self,
        index: int,
        image_png: bytes,
        class_map: np.ndarray,
        instances: np.ndarray | None,
        record: Mapping[str, Any],
    ) -> Path:
        """Write one sample; returns the JSON path. ``record`` must be JSON-serialisable."""
        paths = self.paths(index)
        _atomic_write(paths["image"], image_png)
        _atomic_write(paths["mask"], encode_label_png(class_map, np.uint8))
        if instances is None:
            instances = np.zeros(class_map.shape, np.uint16)
        if int(instances.max(initial=0)) > np.iinfo(np.uint16).max:
            raise ValueError(f"sample {index}: instance ids above 65535 cannot be stored as uint16 PNG")
        _atomic_write(paths["instances"], encode_label_png(instances, np.uint16))
        body = dict(record)
        body.setdefault("index", index)
        body["files"] = {key: path.name for key, path in paths.items() if key != "json"}
        _atomic_write(paths["json"], (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
        return paths["json"]


def read_label_png(path: Path | str) -> np.ndarray:
    """A mask/instances PNG as stored (uint8 or uint16), unchanged."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise FileNotFoundError(f"cannot read {path}")
    return array
