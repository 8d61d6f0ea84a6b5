"""model_store/<name>/<version> -> <out>/<name>.mar, a TorchServe model archive (an optional output; DESIGN.md).

`python -m training.export.torchserve_archive [--store-root model_store] [--out dist/torchserve] [--model NAME
[--version V]] [--batch-size N] [--max-batch-delay-ms MS]`

Each archive holds the version's ONNX file as the serialized file, deploy/torchserve/handler.py (ONNX Runtime,
tensor in / tensor out; its docstring defines the JSON wire format), our manifest.yaml and MODEL_CARD.md as
extra files, and a TorchServe model config (one CPU worker, request batching). Only ``format: onnx`` models
are archived; the manifest is validated and the file's sha256 verified (ModelStore) before packing, so an
archive never carries a model the services would refuse.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from services.core.model_store import ModelManifest, ModelStore

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
HANDLER: Final = REPO_ROOT / "deploy" / "torchserve" / "handler.py"
MODEL_CARD: Final = "MODEL_CARD.md"
ARCHIVABLE_FORMATS: Final = ("onnx",)


@dataclass(frozen=True)
class ArchiveSettings:
    """TorchServe model-config values written into each archive."""

    # Requests TorchServe gathers into one handler call; None = the manifest's max_batch_size.
    batch_size: int | None = None
    max_batch_delay_ms: int = 20
    response_timeout_s: int = 120

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must be >= 0, got {self.max_batch_delay_ms!r}")


def model_config(manifest: ModelManifest, settings: ArchiveSettings) -> dict[str, object]:
    """TorchServe's per-model config (model-config.yaml inside the archive)."""
    return {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": settings.batch_size or manifest.max_batch_size,
        "maxBatchDelay": settings.max_batch_delay_ms,
        "responseTimeout": settings.response_timeout_s,
        "deviceType": "cpu",
    }


def build_archive(manifest: ModelManifest, out_dir: Path, settings: ArchiveSettings = ArchiveSettings()) -> Path:
    """Pack one validated model version into ``out_dir/<name>.mar`` (overwriting) and return its path."""
    if manifest.format not in ARCHIVABLE_FORMATS:
        raise ValueError(
            f"{manifest.manifest_path}: format {manifest.format!r} cannot be archived for TorchServe; "
            f"archivable formats: {', '.join(ARCHIVABLE_FORMATS)}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    version_dir = manifest.manifest_path.parent
    extra_files = [manifest.manifest_path]
    if (version_dir / MODEL_CARD).is_file():
        extra_files.append(version_dir / MODEL_CARD)
    with tempfile.TemporaryDirectory(prefix="torchserve-config-") as scratch:
        config_path = Path(scratch) / "model-config.yaml"
        config_path.write_text(yaml.safe_dump(model_config(manifest, settings), sort_keys=False))
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", manifest.name,
            "--version", manifest.version,
            "--serialized-file", str(manifest.path),
            "--handler", str(HANDLER),
            "--extra-files", ",".join(str(path) for path in extra_files),
            "--config-file", str(config_path),
            "--export-path", str(out_dir),
            "--force",
        ]  # fmt: skip
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
    archive = out_dir / f"{manifest.name}.mar"
    if finished.returncode != 0 or not archive.is_file():
        raise RuntimeError(
            f"torch-model-archiver failed for {manifest.name}/{manifest.version} "
            f"(exit {finished.returncode}): {finished.stderr.strip() or finished.stdout.strip()}"
        )
    return archive


def build_archives(
    store: ModelStore,
    out_dir: Path,
    names: list[str] | None = None,
    version: str | None = None,
    settings: ArchiveSettings = ArchiveSettings(),
) -> list[Path]:
    """Archive the latest (or ``version``) of each named model, or of every archivable model when None."""
    if names is None:
        manifests = [store.get(name) for name in store.list_models()]
        manifests = [manifest for manifest in manifests if manifest.format in ARCHIVABLE_FORMATS]
    else:
        manifests = [store.get(name, version) for name in names]
    return [build_archive(manifest, out_dir, settings) for manifest in manifests]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.export.torchserve_archive", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--store-root", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "dist" / "torchserve")
    parser.add_argument("--model", action="append", dest="models", help="model name (repeatable); default: all")
    parser.add_argument("--version", help="version to archive (with one --model); default: the latest")
    parser.add_argument("--batch-size", type=int, help="TorchServe batchSize; default: the manifest's max_batch_size")
    parser.add_argument("--max-batch-delay-ms", type=int, default=ArchiveSettings.max_batch_delay_ms)
    args = parser.parse_args(argv)
    if args.version is not None and (args.models is None or len(args.models) != 1):
        parser.error("--version needs exactly one --model")
    settings = ArchiveSettings(batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms)
    for archive in build_archives(ModelStore(args.store_root), args.out, args.models, args.version, settings):
        print(f"{archive} ({archive.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
