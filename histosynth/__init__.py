"""histosynth: the one top-level import package the wheel installs.

The checkout keeps ``services/``, ``training/`` and ``clients/`` at its top level, and the code imports itself by
those names (``from services.core.model_store import ModelStore``, ``python -m services.mask_rendering``). The wheel
installs them as ``histosynth.services``, ``histosynth.training`` and ``histosynth.clients`` instead (pyproject.toml
maps the directories there), so that it puts no generic top-level names into site-packages.

Importing this package (which Python does before any ``histosynth.<x>`` import) reconciles the two spellings with
an import alias, decided once per subpackage from where its code is found:

* installed (a wheel, or an editable install run outside the checkout): ``histosynth.services`` is the real package
  and ``services``, ``services.<anything>`` become aliases of it. A bare ``import services`` in a fresh interpreter
  still fails: the aliases exist only once ``histosynth`` has been imported;
* a checkout on ``sys.path`` (``python -m services.x``, the tests, ``make run``): ``services`` is the real package
  and ``histosynth.services...`` becomes the alias, so ``python -m histosynth`` and ``from histosynth.clients.client
  import HistosynthClient`` work from a checkout too.

An alias is the same module object as its target, never a second copy (a second copy would register the Prometheus
metrics twice and break isinstance checks): ``sys.modules["services.core"] is sys.modules["histosynth.services.core"]``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import CodeType, ModuleType

__version__ = "0.1.0"  # the distribution's version (pyproject.toml reads it from here)
__all__ = ["SUBPACKAGES", "__version__", "alias_targets"]

# The checkout's top-level packages, installed as histosynth.<name>.
SUBPACKAGES = ("services", "training", "clients")


class _AliasLoader(importlib.abc.Loader):
    """Loads an alias by importing its target, once, under the target's name, and returning that module."""

    def __init__(self, target: str, target_spec: importlib.machinery.ModuleSpec) -> None:
        self.target = target
        self.target_spec = target_spec
        self._own_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Nothing to run (create_module imported the target); the import system overwrote module.__spec__ with the
        # alias's spec after create_module: the module keeps its own.
        module.__spec__ = self._own_spec

    def get_code(self, fullname: str) -> CodeType | None:  # runpy: `python -m <alias>` runs the target's code
        loader = self.target_spec.loader
        get_code = getattr(loader, "get_code", None)
        return None if get_code is None else get_code(self.target)

    def is_package(self, fullname: str) -> bool:
        return self.target_spec.submodule_search_locations is not None


class AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``alias`` and ``alias.<anything>`` to the module objects of ``target`` and ``target.<anything>``."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = dict(aliases)  # alias prefix -> target prefix

    def target_of(self, fullname: str) -> str | None:
        for alias, target in self.aliases.items():
            if fullname == alias or fullname.startswith(alias + "."):
                return target + fullname[len(alias):]
        return None

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        name = self.target_of(fullname)
        if name is None:
            return None
        module = sys.modules.get(name)
        real = getattr(module, "__spec__", None) if module is not None else importlib.util.find_spec(name)
        if real is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(name, real), origin=real.origin,
                                              is_package=real.submodule_search_locations is not None)
        if real.submodule_search_locations is not None:
            spec.submodule_search_locations = list(real.submodule_search_locations)
        return spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.aliases!r})"


def _location(spec: importlib.machinery.ModuleSpec | None) -> Path | None:
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(spec.origin).resolve().parent if spec.origin else None


def _find(name: str) -> importlib.machinery.ModuleSpec | None:
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__spec__", None)
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def alias_targets() -> dict[str, str]:
    """alias -> real package for each of SUBPACKAGES, from where their code is found (see the module docstring)."""
    aliases: dict[str, str] = {}
    for name in SUBPACKAGES:
        nested, top = _find(f"{__name__}.{name}"), _find(name)
        if nested is None:  # a checkout (histosynth/ beside services/): the top-level package is the real one
            if top is not None:
                aliases[f"{__name__}.{name}"] = name
        elif top is not None and _location(top) == _location(nested):
            # A checkout on sys.path with an editable install of it (`make install`): one directory under two names,
            # and the checkout's spelling is the real one (histosynth.<name> cannot have been imported before this).
            aliases[f"{__name__}.{name}"] = name
        else:  # installed: histosynth.<name> is the real package
            if name in sys.modules:
                raise ImportError(
                    f"histosynth's code imports itself as {name!r}, but this process already imported another "
                    f"{name!r} package ({_location(top)}); import histosynth before it, or run it in its own process")
            aliases[name] = f"{__name__}.{name}"
    return aliases


def _install() -> None:
    if any(isinstance(finder, AliasFinder) for finder in sys.meta_path):
        return
    aliases = alias_targets()
    if aliases:
        # First on the meta path: an installed histosynth's `services` must win over any other `services` on sys.path.
        sys.meta_path.insert(0, AliasFinder(aliases))


_install()
