"""`histosynth models list` / `histosynth models verify`: what a model store holds, and whether it is intact.

    histosynth models list   [--model-store DIR]   # name, version, kind, format, size, sha256 ok?
    histosynth models verify [--model-store DIR]   # exit 1 unless every model file matches its manifest

Both read every ``<name>/<version>/`` directory of the store (found like ``serve`` finds it:
services.core.store_location) and recompute each model file's sha256, the same check the servers
run before loading a model. verify exists so a copied or downloaded store can be checked before it
is deployed (a server would otherwise start NOT_SERVING); it also reports version directories the
servers would skip (no manifest.yaml) or refuse (a manifest that breaks the contract).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from services.core.model_store import MANIFEST_FILE, ManifestError, file_sha256, parse_manifest

Status = Literal["ok", "mismatch", "missing", "invalid"]
# How list shows each status in its sha256 column, and verify at the start of a line.
STATUS_LABELS: Final[dict[str, str]] = {
    "ok": "ok", "mismatch": "MISMATCH", "missing": "MISSING", "invalid": "INVALID",
}


@dataclass(frozen=True)
class ModelCheck:
    """One version directory of the store and the result of checking it."""

    name: str
    version: str
    status: Status
    detail: str = ""  # what is wrong (empty when ok)
    kind: str = "?"
    format: str = "?"
    file: str = ""
    size_bytes: int | None = None
    sha256: str = ""  # the manifest's

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _is_version(name: str) -> bool:
    # The store's rule (services.core.model_store): positive integers without leading zeros.
    return name.isdigit() and not name.startswith("0")


def version_dirs(root: Path) -> list[Path]:
    """Every ``<name>/<version>`` directory under ``root``, by name then numeric version."""
    found = []
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        versions = [entry for entry in model_dir.iterdir() if entry.is_dir() and _is_version(entry.name)]
        found.extend(sorted(versions, key=lambda entry: int(entry.name)))
    return found


def check_version_dir(directory: Path) -> ModelCheck:
    """Parse the manifest and compare the model file's sha256 with it."""
    name, version = directory.parent.name, directory.name
    if not (directory / MANIFEST_FILE).is_file():
        return ModelCheck(name, version, "invalid", f"no {MANIFEST_FILE} in {directory} (servers skip this version)")
    try:
        manifest = parse_manifest(directory / MANIFEST_FILE)
    except ManifestError as error:
        # One line per version: YAML parser messages span several.
        return ModelCheck(name, version, "invalid", " ".join(str(error).split()))
    known = dict(kind=manifest.kind, format=manifest.format, file=manifest.file, sha256=manifest.sha256)
    if not manifest.path.is_file():
        return ModelCheck(name, version, "missing", f"{manifest.path} does not exist (manifest key 'file')", **known)
    size = manifest.path.stat().st_size
    actual = file_sha256(manifest.path)
    if actual != manifest.sha256:
        return ModelCheck(
            name, version, "mismatch",
            f"sha256 of {manifest.path} is {actual}, manifest says {manifest.sha256} (re-copy or re-export it)",
            size_bytes=size, **known,
        )
    return ModelCheck(name, version, "ok", size_bytes=size, **known)


def audit_store(root: Path) -> list[ModelCheck]:
    return [check_version_dir(directory) for directory in version_dirs(root)]


def _size(size_bytes: int | None) -> str:
    return "-" if size_bytes is None else f"{size_bytes / 1e6:.1f} MB"


def format_table(checks: Sequence[ModelCheck]) -> list[str]:
    rows = [("NAME", "VERSION", "KIND", "FORMAT", "SIZE", "SHA256")]
    rows += [(c.name, c.version, c.kind, c.format, _size(c.size_bytes), STATUS_LABELS[c.status]) for c in checks]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


# ------------------------------------------------------------------------------ CLI
def _store(args: argparse.Namespace) -> Path:
    from services.core.store_location import locate_model_store

    return locate_model_store(args.model_store)


def cmd_models_list(args: argparse.Namespace) -> int:
    root = _store(args)
    checks = audit_store(root)
    print(f"model store: {root.resolve()}")
    if not checks:
        print("no models (expected <name>/<version>/manifest.yaml directories)")
        return 0
    for line in format_table(checks):
        print(line)
    for check in checks:
        if not check.ok:
            print(f"{check.key}: {check.detail}", file=sys.stderr)
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    root = _store(args)
    checks = audit_store(root)
    if not checks:
        print(f"no models in {root.resolve()} (expected <name>/<version>/manifest.yaml directories)", file=sys.stderr)
        return 1
    width = max(len(check.key) for check in checks)
    for check in checks:
        what = f"{check.file}  sha256 {check.sha256[:16]}" if check.ok else check.detail
        print(f"{STATUS_LABELS[check.status]:<9} {check.key:<{width}}  {what}")
    failed = [check.key for check in checks if not check.ok]
    if failed:
        print(f"{len(failed)} of {len(checks)} model versions in {root.resolve()} failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    print(f"all {len(checks)} model versions in {root.resolve()} match their manifests")
    return 0


def add_models_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    models = commands.add_parser("models", help="list the model store, or verify every model file's sha256")
    actions = models.add_subparsers(dest="models_command", required=True)
    for action, func, text in (
        ("list", cmd_models_list, "name, version, kind, format, size and whether the sha256 matches"),
        ("verify", cmd_models_verify, "recompute every model file's sha256; exit 1 on a mismatch or missing file"),
    ):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("--model-store", help="model repository root (default: HISTOSYNTH_MODEL_STORE, "
                                                  "./model_store, ~/.local/share/histosynth/model_store)")
        parser.set_defaults(func=func)
