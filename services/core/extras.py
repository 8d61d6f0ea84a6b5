"""Optional features and the pip extras that enable them (pyproject ``[project.optional-dependencies]``).

A feature whose packages are missing must say which extra to install instead of dying on a
``ModuleNotFoundError`` from deep inside a library call. :func:`require_extra` checks the
modules up front (``find_spec`` only: nothing heavy such as ray or torch is imported) and
raises :class:`MissingExtraError`, an ImportError whose message is the fix.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from typing import Final

DISTRIBUTION: Final = "histosynth"
# Extra -> what it enables; keep in step with pyproject.toml and the README's install section.
EXTRAS: Final[Mapping[str, str]] = {
    "serve": "the gRPC services and `histosynth serve` (the base install already has every serving dependency)",
    "augment": "`histosynth augment`: WebDataset/Parquet shards on local paths or fsspec URIs, optionally on Ray",
    "train": "training/: training, ONNX export and the science reports (torch, diffusers, onnx)",
}


class MissingExtraError(ImportError):
    """A feature needs packages of an extra that is not installed; the message names the extra."""

    def __init__(self, extra: str, feature: str, missing: Iterable[str]) -> None:
        if extra not in EXTRAS:
            raise ValueError(f"unknown extra {extra!r}; valid: {', '.join(EXTRAS)}")
        self.extra = extra
        self.missing = tuple(missing)
        super().__init__(
            f"{feature} needs {', '.join(self.missing)} (not installed), from the {extra!r} extra: "
            f"pip install '{DISTRIBUTION}[{extra}]'"
        )


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The top-level modules of ``modules`` that cannot be imported here."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or a half-initialised module
            found = False
        if not found:
            missing.append(module)
    return missing


def require_extra(extra: str, feature: str, modules: Iterable[str]) -> None:
    """Raise MissingExtraError when any of ``modules`` (import names) is missing for ``feature``."""
    missing = missing_modules(modules)
    if missing:
        raise MissingExtraError(extra, feature, missing)
