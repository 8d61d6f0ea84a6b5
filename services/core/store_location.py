"""Where the model store is: ``--model-store``, else ``HISTOSYNTH_MODEL_STORE``, else a default directory.

An installed ``histosynth`` runs from any directory, and the wheel carries no models, so the
store has to be found rather than assumed to be ``./model_store``. The order:

1. ``--model-store DIR`` (the command line wins);
2. ``HISTOSYNTH_MODEL_STORE`` (how containers and the Helm chart configure it);
3. ``./model_store`` in the working directory (a checkout: ``make run``, ``histosynth serve`` at the root);
4. ``$XDG_DATA_HOME/histosynth/model_store`` (``~/.local/share/histosynth/model_store`` when
   XDG_DATA_HOME is unset): a per-user copy for installs used from anywhere.

An explicit choice (1 or 2) that is not a directory is an error, never a silent fall-through
to a default, so a typo cannot serve some other set of models. The error is one line naming
the flag, the variable and every path tried.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

MODEL_STORE_ENV: Final = "HISTOSYNTH_MODEL_STORE"
MODEL_STORE_FLAG: Final = "--model-store"
STORE_DIR_NAME: Final = "model_store"
_LAYOUT: Final = "a directory of <name>/<version>/manifest.yaml"


class ModelStoreNotFoundError(FileNotFoundError):
    """No model store where the flag, the variable or the defaults point; the message says what was tried."""


def default_store_paths(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The defaults, in the order they are tried: ./model_store, then the per-user data directory."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    data_home = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "share")
    return (cwd / STORE_DIR_NAME, Path(data_home) / "histosynth" / STORE_DIR_NAME)


def locate_model_store(
    flag: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Path:
    """The model store directory to serve from; raises ModelStoreNotFoundError naming what was tried."""
    environ = os.environ if environ is None else environ
    from_env = environ.get(MODEL_STORE_ENV, "").strip()
    if flag is not None and str(flag).strip():
        return _explicit(Path(flag), f"{MODEL_STORE_FLAG} {flag}")
    if from_env:
        return _explicit(Path(from_env), f"{MODEL_STORE_ENV}={from_env}")
    tried = default_store_paths(cwd, environ)
    for candidate in tried:
        if candidate.is_dir():
            return candidate
    raise ModelStoreNotFoundError(
        f"no model store found: {MODEL_STORE_FLAG} not given, {MODEL_STORE_ENV} not set, and none of the defaults "
        f"exists ({', '.join(str(path) for path in tried)}); pass {MODEL_STORE_FLAG} DIR or set "
        f"{MODEL_STORE_ENV}=DIR ({_LAYOUT})"
    )


def _explicit(path: Path, source: str) -> Path:
    if path.is_dir():
        return path
    problem = "does not exist" if not path.exists() else "is not a directory"
    raise ModelStoreNotFoundError(
        f"model store {path} (from {source}) {problem}; pass {MODEL_STORE_FLAG} DIR or set {MODEL_STORE_ENV}=DIR "
        f"({_LAYOUT}); without either, ./{STORE_DIR_NAME} and the per-user data directory are tried"
    )
