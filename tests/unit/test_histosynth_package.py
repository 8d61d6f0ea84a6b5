"""histosynth/__init__.py: one top-level import package, and `services`/`training`/`clients` as aliases of it.

The layouts are built from small stand-in packages in a temporary directory and run in a fresh interpreter
with ``-S`` (no site-packages, so neither the dev venv's editable install nor anything else can supply a
``services`` package): an installed wheel (``histosynth/services/...``) and a checkout (``histosynth/`` beside
``services/``). tests/integration/test_fresh_install.py does the same with the real wheel.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Stand-ins for the real packages: each module counts its executions in a list on `sys`, so a second copy shows.
STAND_INS = {
    "services/__init__.py": "import sys\nsys.executions = getattr(sys, 'executions', []) + [__name__]\n",
    "services/core/__init__.py": "import sys\nsys.executions.append(__name__)\n",
    "services/core/metrics.py": (
        "import sys\nsys.executions.append(__name__)\n"
        "class Registry:\n    pass\n"
        "REGISTRY = Registry()\n"
    ),
    "services/scoring/__init__.py": "",
    "services/scoring/servicer.py": "import sys\nsys.executions.append(__name__)\n",
    "services/tool/__init__.py": "",
    "services/tool/__main__.py": (
        "import sys\nfrom services.core.metrics import REGISTRY\n"
        "print('tool main', __name__, type(REGISTRY).__module__)\n"
    ),
    "training/__init__.py": "raise ImportError('training needs torch')\n",  # as the real one without the extra
    "clients/__init__.py": "",
    "clients/cli.py": (
        "import importlib, sys\n"
        "from services.core import metrics\n"
        "from services.core.metrics import Registry\n"
        "def main():\n"
        "    servicer = importlib.import_module('services.scoring.servicer')\n"
        "    print('cli main', metrics.__name__, servicer.__name__)\n"
        "    return 0\n"
    ),
}


def _write(root: Path, prefix: str = "") -> None:
    for relative, text in STAND_INS.items():
        path = root / prefix / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    package = root / "histosynth"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "__main__.py"):
        shutil.copy2(REPO_ROOT / "histosynth" / name, package / name)


@pytest.fixture
def wheel_layout(tmp_path: Path) -> Path:
    """site-packages of an installed wheel: histosynth/{__init__,__main__}.py, histosynth/services/..."""
    site = tmp_path / "site"
    _write(site, "histosynth")
    return site


@pytest.fixture
def checkout_layout(tmp_path: Path) -> Path:
    """A checkout: histosynth/ beside services/, training/, clients/."""
    checkout = tmp_path / "checkout"
    _write(checkout)
    return checkout


def _python(*args: str, path: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    environment = {"PYTHONPATH": ":".join(map(str, path)), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=60)


def _report(code: str, path: list[Path], cwd: Path) -> dict:
    done = _python("-c", code, path=path, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


ALIASES = """
import importlib, json, sys
import histosynth
import services.core.metrics as short
import histosynth.services.core.metrics as long
from services.core.metrics import Registry
from histosynth.services.core import metrics
servicer = importlib.import_module("services.scoring.servicer")
print(json.dumps({
    "same": short is long is metrics and servicer is sys.modules["histosynth.services.scoring.servicer"],
    "isinstance": isinstance(long.REGISTRY, Registry),
    "executions": sys.executions,
    "spec": short.__spec__.name, "name": short.__name__, "file": short.__file__,
    "parent_attribute": sys.modules["services"].core is sys.modules["histosynth.services.core"],
    "finder": repr(sys.meta_path[0]),
    "found": importlib.util.find_spec("services.scoring.servicer") is not None,
    "missing": importlib.util.find_spec("services.scoring.nothing_here") is None,
}))
"""


def test_installed_package_aliases_the_short_names(wheel_layout: Path, tmp_path: Path) -> None:
    report = _report(ALIASES, [wheel_layout], tmp_path / "elsewhere")
    assert report["same"] and report["isinstance"] and report["parent_attribute"]
    # Each module ran once, under its real (installed) name: no second copy behind the alias.
    assert report["executions"] == ["histosynth.services", "histosynth.services.core",
                                    "histosynth.services.core.metrics", "histosynth.services.scoring.servicer"]
    assert report["spec"] == report["name"] == "histosynth.services.core.metrics"
    assert Path(report["file"]).is_relative_to(wheel_layout / "histosynth" / "services")
    assert report["finder"].startswith("AliasFinder({'services': 'histosynth.services'")
    assert report["found"] and report["missing"]


def test_installed_package_puts_no_generic_top_level_names(wheel_layout: Path, tmp_path: Path) -> None:
    """Without `import histosynth`, `services` does not exist: the wheel adds only one top-level name."""
    for name in ("services", "clients", "training"):
        done = _python("-c", f"import {name}", path=[wheel_layout], cwd=tmp_path / "elsewhere")
        assert done.returncode == 1 and f"ModuleNotFoundError: No module named '{name}'" in done.stderr


def test_installed_package_wins_over_another_services_on_the_path(wheel_layout: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "services").mkdir(parents=True)
    (other / "services" / "__init__.py").write_text("OTHER = True\n")
    report = _report("import json, histosynth, services\nprint(json.dumps({'file': services.__file__}))",
                     [other, wheel_layout], tmp_path / "elsewhere")
    assert Path(report["file"]).is_relative_to(wheel_layout)
    # Another `services` imported first cannot be replaced: a clear error, not a silent mix of the two.
    done = _python("-c", "import services, histosynth", path=[other, wheel_layout], cwd=tmp_path / "elsewhere")
    assert done.returncode == 1 and "already imported another 'services' package" in done.stderr


def test_installed_entry_points(wheel_layout: Path, tmp_path: Path) -> None:
    """The console script's target, `python -m histosynth` and `python -m histosynth.services.<x>`."""
    elsewhere = tmp_path / "elsewhere"
    script = _python("-c", "import sys; from histosynth.clients.cli import main; sys.exit(main())",
                     path=[wheel_layout], cwd=elsewhere)
    assert script.returncode == 0, script.stderr
    assert script.stdout.strip() == "cli main histosynth.services.core.metrics histosynth.services.scoring.servicer"
    module = _python("-m", "histosynth", path=[wheel_layout], cwd=elsewhere)
    assert module.returncode == 0 and module.stdout == script.stdout, module.stderr
    tool = _python("-m", "histosynth.services.tool", path=[wheel_layout], cwd=elsewhere)
    assert tool.returncode == 0, tool.stderr
    assert tool.stdout.strip() == "tool main __main__ histosynth.services.core.metrics"


def test_a_subpackage_that_fails_to_import_fails_under_both_names(wheel_layout: Path, tmp_path: Path) -> None:
    """`import histosynth` does not import the subpackages; importing one runs it (training: its extra check)."""
    done = _python("-c", "import histosynth, sys; assert 'histosynth.training' not in sys.modules; import training",
                   path=[wheel_layout], cwd=tmp_path / "elsewhere")
    assert done.returncode == 1 and "ImportError: training needs torch" in done.stderr


def test_checkout_keeps_the_short_names_real(checkout_layout: Path) -> None:
    """In a checkout `services` is the real package and `histosynth.services` the alias (no second copy)."""
    code = ALIASES.replace('sys.modules["histosynth.services.scoring.servicer"]', 'sys.modules["services.scoring.servicer"]')
    report = _report(code, [], checkout_layout)  # the working directory is on sys.path, as for `python -m`
    assert report["same"] and report["isinstance"]
    assert report["executions"] == ["services", "services.core", "services.core.metrics", "services.scoring.servicer"]
    assert report["spec"] == report["name"] == "services.core.metrics"
    assert report["finder"].startswith("AliasFinder({'histosynth.services': 'services'")
    # `python -m histosynth` and `python -m histosynth.services.<x>` work from a checkout too.
    module = _python("-m", "histosynth", path=[], cwd=checkout_layout)
    assert module.returncode == 0 and module.stdout.strip() == "cli main services.core.metrics services.scoring.servicer"
    tool = _python("-m", "histosynth.services.tool", path=[], cwd=checkout_layout)
    assert tool.returncode == 0 and tool.stdout.strip() == "tool main __main__ services.core.metrics", tool.stderr
    direct = _python("-m", "services.tool", path=[], cwd=checkout_layout)
    assert direct.returncode == 0 and direct.stdout == tool.stdout, direct.stderr


EDITABLE = """
import sys
from importlib.util import spec_from_file_location
ROOT = sys.argv[1]
MAPPING = {"histosynth": ROOT + "/histosynth", "histosynth.services": ROOT + "/services",
           "histosynth.training": ROOT + "/training", "histosynth.clients": ROOT + "/clients"}

class Editable:  # what `pip install -e .` (setuptools' editable finder) appends to sys.meta_path
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in MAPPING:
            return spec_from_file_location(fullname, MAPPING[fullname] + "/__init__.py",
                                           submodule_search_locations=[MAPPING[fullname]])
        return None

sys.meta_path.append(Editable)
"""


def test_editable_install_of_a_checkout(checkout_layout: Path, tmp_path: Path) -> None:
    """`make install` (pip install -e .): outside the checkout `histosynth` is the real name, inside it `services`."""
    code = EDITABLE + ALIASES.replace("import importlib, json, sys\n", "import importlib, json\n")
    done = _python("-c", code, str(checkout_layout), path=[], cwd=tmp_path / "elsewhere")
    assert done.returncode == 0, done.stderr
    outside = json.loads(done.stdout)
    assert outside["same"] and outside["isinstance"]
    assert outside["executions"] == ["histosynth.services", "histosynth.services.core",
                                     "histosynth.services.core.metrics", "histosynth.services.scoring.servicer"]
    assert Path(outside["file"]).is_relative_to(checkout_layout / "services")
    code = code.replace('sys.modules["histosynth.services.scoring.servicer"]', 'sys.modules["services.scoring.servicer"]')
    done = _python("-c", code, str(checkout_layout), path=[], cwd=checkout_layout)
    assert done.returncode == 0, done.stderr
    inside = json.loads(done.stdout)
    assert inside["same"] and inside["isinstance"]
    assert inside["executions"] == ["services", "services.core", "services.core.metrics", "services.scoring.servicer"]
    assert inside["finder"].startswith("AliasFinder({'histosynth.services': 'services'")


def test_this_checkout_resolves_both_spellings_to_one_module() -> None:
    """The real tree, in this process (the checkout is on sys.path): histosynth.<x> is the module <x>."""
    histosynth = importlib.import_module("histosynth")
    import clients.client
    import services.core.model_store

    assert importlib.import_module("histosynth.clients.client") is clients.client
    assert importlib.import_module("histosynth.services.core.model_store") is services.core.model_store
    assert services.core.model_store.__spec__.name == "services.core.model_store"
    assert histosynth.__version__ and histosynth.SUBPACKAGES == ("services", "training", "clients")
