"""Which engine and precision serve each model, and the precision checks that allow a reduced precision.

Engine (for manifests of format ``onnx``; other formats have one engine each):
  ``onnxruntime``  the portable default: CPU, CUDA, TensorRT providers; fp32; bit-identical rows at any batch.
  ``openvino``     the CPU fast path (services/core/runtimes/openvino.py), fp32 or bf16.
  ``auto``         openvino where the package is installed, else onnxruntime.

Precision: ``fp32`` (default) or ``bf16``. A reduced precision is served only when the model's
precision check passed for that engine and precision on that very model file: the check lives
beside the manifest in ``precision_checks.yaml`` (written by ``scripts/check_precision.py``:
held-back inputs, outputs of the candidate against ONNX Runtime fp32, tolerances stated in the
file), and names the model file's sha256, so a re-exported model needs a new check. Without a
passing check the model does not load (ModelLoadError: the server says NOT_SERVING and names it).

Where a model's choice comes from, first match wins:
  1. ``HISTOSYNTH_RUNTIME`` / ``HISTOSYNTH_PRECISION`` entries naming the model (``mask-refiner=openvino``);
  2. their bare entry, for every model (``openvino``);
  3. the manifest's ``metadata.serving`` (``{runtime: openvino, precision: bf16}``);
  4. onnxruntime, fp32.
Both settings take a comma-separated list: ``openvino,mask-refiner=onnxruntime``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import yaml

from services.core.runtimes.base import PRECISIONS, ModelLoadError
from services.core.runtimes.openvino import openvino_version

if TYPE_CHECKING:
    from services.core.model_store import ModelManifest

ONNX_ENGINES: Final = ("onnxruntime", "openvino")
ENGINE_CHOICES: Final = (*ONNX_ENGINES, "auto")
CHECKS_FILE: Final = "precision_checks.yaml"
DEFAULT_ENGINE: Final = "onnxruntime"
DEFAULT_PRECISION: Final = "fp32"


@dataclass(frozen=True)
class Choice:
    """A setting's value: one default for every model and per-model overrides."""

    default: str | None = None
    per_model: tuple[tuple[str, str], ...] = ()

    def for_model(self, name: str) -> str | None:
        for model, value in self.per_model:
            if model == name:
                return value
        return self.default


def parse_choice(text: str | None, valid: tuple[str, ...], variable: str) -> Choice:
    """``"openvino,mask-refiner=onnxruntime"`` -> Choice; a bad value raises ValueError naming it."""
    if text is None or not text.strip():
        return Choice()
    default: str | None = None
    per_model: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        model, _, value = item.rpartition("=")
        value = value.strip().lower()
        if value not in valid:
            raise ValueError(f"{variable}: {value!r} in {item!r} is not one of {', '.join(valid)}")
        if model:
            per_model.append((model.strip(), value))
        elif default is not None:
            raise ValueError(f"{variable}: two defaults ({default!r}, {value!r}); name the model for the second")
        else:
            default = value
    return Choice(default, tuple(per_model))


@dataclass(frozen=True)
class RuntimeSelection:
    """HISTOSYNTH_RUNTIME and HISTOSYNTH_PRECISION, parsed."""

    runtime: Choice = Choice()
    precision: Choice = Choice()

    @classmethod
    def from_settings(cls, runtime: str | None, precision: str | None) -> RuntimeSelection:
        return cls(parse_choice(runtime, ENGINE_CHOICES, "HISTOSYNTH_RUNTIME"),
                   parse_choice(precision, PRECISIONS, "HISTOSYNTH_PRECISION"))

    def resolve(self, manifest: ModelManifest) -> tuple[str, str]:
        """(engine, precision) for ``manifest``; ``auto`` is resolved against what is installed."""
        serving = manifest.metadata.get("serving") or {}
        if not isinstance(serving, Mapping):
            raise ModelLoadError(f"{manifest.manifest_path}: metadata.serving must be a mapping, got {serving!r}")
        engine = self.runtime.for_model(manifest.name) or str(serving.get("runtime") or DEFAULT_ENGINE)
        precision = self.precision.for_model(manifest.name) or str(serving.get("precision") or DEFAULT_PRECISION)
        if engine not in ENGINE_CHOICES:
            raise ModelLoadError(f"{manifest.manifest_path}: runtime {engine!r}; valid: {', '.join(ENGINE_CHOICES)}")
        if precision not in PRECISIONS:
            raise ModelLoadError(f"{manifest.manifest_path}: precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if manifest.format != "onnx":
            if precision != DEFAULT_PRECISION:
                raise ModelLoadError(f"model {manifest.key}: format {manifest.format!r} is served at fp32 only, "
                                     f"not {precision!r} (reduced precisions are for ONNX models on openvino)")
            return manifest.format, precision
        if engine == "auto":
            engine = "openvino" if openvino_version() is not None else "onnxruntime"
        return engine, precision


# ------------------------------------------------------------------ precision checks
def checks_path(manifest: ModelManifest) -> Path:
    return manifest.directory / CHECKS_FILE


def read_checks(manifest: ModelManifest) -> list[dict[str, Any]]:
    """The recorded checks of this model file (entries for another sha256 are ignored)."""
    path = checks_path(manifest)
    if not path.is_file():
        return []
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ModelLoadError(f"{path}: not valid YAML: {error}") from None
    checks = raw.get("checks") if isinstance(raw, Mapping) else None
    if not isinstance(checks, list):
        raise ModelLoadError(f"{path}: expected a mapping with a 'checks' list")
    return [check for check in checks if isinstance(check, Mapping) and check.get("sha256") == manifest.sha256]


def passing_check(manifest: ModelManifest, engine: str, precision: str) -> dict[str, Any] | None:
    for check in read_checks(manifest):
        if check.get("runtime") == engine and check.get("precision") == precision and check.get("passed") is True:
            return dict(check)
    return None


def require_precision_check(manifest: ModelManifest, engine: str, precision: str) -> dict[str, Any] | None:
    """None for fp32; for a reduced precision the passing check, else ModelLoadError saying how to run one."""
    if precision == DEFAULT_PRECISION:
        return None
    check = passing_check(manifest, engine, precision)
    if check is None:
        recorded = [f"{c.get('runtime')}/{c.get('precision')}: {'passed' if c.get('passed') else 'FAILED'}"
                    for c in read_checks(manifest)]
        raise ModelLoadError(
            f"model {manifest.key}: precision {precision} on {engine} has no passing precision check for this "
            f"model file (sha256 {manifest.sha256[:12]}...) in {checks_path(manifest)} "
            f"(recorded: {', '.join(recorded) or 'none'}); run scripts/check_precision.py --model {manifest.name} "
            f"--runtime {engine} --precision {precision}, or serve it at fp32"
        )
    return check


def record_check(manifest: ModelManifest, check: Mapping[str, Any]) -> Path:
    """Add ``check`` to the file beside the manifest, replacing an earlier one for the same file/engine/precision."""
    path = checks_path(manifest)
    raw: dict[str, Any] = {}
    if path.is_file():
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    kept = [
        c for c in raw.get("checks") or []
        if not (c.get("sha256") == check["sha256"] and c.get("runtime") == check["runtime"]
                and c.get("precision") == check["precision"])
    ]
    document = {
        "model": manifest.name,
        "about": "Reduced-precision checks of this model version (scripts/check_precision.py). The serving "
        "runtime loads a precision other than fp32 only with a passing entry for its runtime, precision "
        "and the model file's sha256 (services/core/runtimes/selection.py).",
        "checks": [*kept, dict(check)],
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False, width=110), encoding="utf-8")
    return path
