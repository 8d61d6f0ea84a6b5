"""Issue 16.2: a wheel of this checkout, installed into a NEW venv, serves and renders from outside the checkout.

What a user does is ``pip install '.[serve]'`` in a fresh venv, then ``histosynth serve --all`` in some
other directory. Downloading the serving stack (onnxruntime, openvino, opencv, scipy, ...: hundreds of MB)
from the index on every CI run would make this test slow and dependent on the network, so it splits the
install in two and checks each half:

* the project: a wheel is built from a copy of the working tree (``pip wheel --no-build-isolation``, with
  the dev venv's setuptools; isolation would fetch setuptools from the index) and installed ``--no-deps``
  into a venv made with ``python -m venv --without-pip`` (pip runs from the dev venv with ``--python``).
  That venv sees nothing of the checkout: it runs from a temporary directory, with no PYTHONPATH, so every
  import of ``services``/``clients`` must come from the wheel, and a file the wheel lacks (a spec, a
  generated stub) fails here as it would for a user. The wheel installs one top-level import package,
  ``histosynth`` (``histosynth/services``, ``histosynth/clients``, ``histosynth/training``); ``services`` and
  the others exist only as aliases that ``import histosynth`` installs (histosynth/__init__.py);
* the dependencies: a ``.pth`` file added after the install puts the dev venv's site-packages (the locked
  versions) behind the new venv's own. The wheel's own Requires-Dist (base install + ``serve`` extra) must
  be met by them, and every third-party module that importing the served code pulls in must belong to a
  distribution in that requirement closure, so a dependency missing from pyproject (present in the dev
  venv only through the dev lock) cannot hide behind the shared site-packages.

The ``.pth`` line adds a directory; ``.pth`` files inside it (the dev venv's editable install of this
checkout) are not processed, which the tests check by asserting where ``services`` is imported from.
Not marked slow: ``make test`` (CI) runs it; it takes about 20 s (one wheel build, one server start).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_STORE = REPO_ROOT / "model_store"
# What the wheel is built from: the packaging file, the `histosynth` package and the three top-level packages it
# installs as histosynth.services, histosynth.clients and histosynth.training (no tests, no models).
SOURCES = ("pyproject.toml", "histosynth", "services", "clients", "training")
SUBPACKAGES = ("services", "clients", "training")
SERVE_TIMEOUT_S = 120.0
SERVE_ALL = {"refinement", "rendering", "generation", "scoring"}
# Imports in services/ and clients/ that histosynth[serve] may lack: each sits in a function behind a
# clear error (an extra's name, or a runtime's install hint), never at module level.
OPTIONAL_IMPORTS = {
    "torch": "format 'torchscript' (train extra)",
    "tensorrt": "format 'tensorrt_plan' (NVIDIA images)",
    "cuda": "format 'tensorrt_plan' (cuda-python, NVIDIA images)",
    "pynvml": "GPU metrics when nvidia-ml-py is present",
    "fsspec": "histosynth augment (augment extra)",
    "pyarrow": "histosynth augment --format parquet (augment extra)",
    "ray": "histosynth augment --engine ray (augment extra)",
    "botocore": "histosynth augment --engine ray to s3:// (augment extra, via s3fs)",
}


@dataclass(frozen=True)
class Install:
    wheel: Path
    python: Path
    histosynth: Path
    site_packages: Path
    outside: Path  # a working directory with no model_store and no checkout
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.histosynth), *args], cwd=self.outside, env={**self.env, **env},
            capture_output=True, text=True, timeout=timeout,
        )

    def python_code(self, code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), "-c", code, *args], cwd=self.outside, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )


def _run(command: list[str], cwd: Path, timeout: float = 180.0) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    root = tmp_path_factory.mktemp("fresh_install")
    source = root / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    quiet_pip = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    wheels = root / "dist"
    # --no-index: nothing is fetched; the build needs only the dev venv's setuptools, the install nothing.
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps", "--no-build-isolation",
          "-w", str(wheels), str(source)], cwd=root)
    (wheel,) = wheels.glob("histosynth-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
                           "--no-deps", str(wheel)], cwd=root, env=quiet_pip, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip())
    # After the install, so pip saw a clean environment: the dev venv's packages as the dependencies.
    dev_paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_packages / "zz_histosynth_test_dependencies.pth").write_text("\n".join(dev_paths) + "\n")

    outside = root / "elsewhere"
    (outside / "home").mkdir(parents=True)
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith("HISTOSYNTH_") and key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "XDG_DATA_HOME"}
    }
    # HOME without ~/.local/share/histosynth: only the flag or the variable can name a store.
    env.update(HOME=str(outside / "home"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               HISTOSYNTH_LOG_FORMAT="json")
    return Install(wheel, python, venv / "bin" / "histosynth", site_packages, outside, env)


def test_wheel_carries_what_serving_reads_at_run_time(install: Install) -> None:
    names = set(zipfile.ZipFile(install.wheel).namelist())
    for spec in (REPO_ROOT / "clients" / "specs").glob("*.yaml"):
        assert f"histosynth/clients/specs/{spec.name}" in names
    for config in (REPO_ROOT / "training" / "configs").glob("*.yaml"):
        assert f"histosynth/training/configs/{config.name}" in names
    generated = [f"histosynth/{path.relative_to(REPO_ROOT).as_posix()}"
                 for path in (REPO_ROOT / "services" / "_generated").rglob("*") if path.suffix in (".py", ".pyi")]
    assert generated and set(generated) <= names
    metadata = zipfile.ZipFile(install.wheel).read(
        next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
    assert "Provides-Extra: serve" in metadata and "Provides-Extra: augment" in metadata


def test_wheel_installs_one_top_level_package(install: Install) -> None:
    """Only `histosynth/` (and the .dist-info) in site-packages; every package of the checkout is inside it."""
    wheel = zipfile.ZipFile(install.wheel)
    names = set(wheel.namelist())
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"histosynth"}
    top_level = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["histosynth"]
    # pyproject.toml lists the packages by hand (a mapped directory cannot be found): none may be missing.
    packages = [init.relative_to(REPO_ROOT).as_posix() for name in SUBPACKAGES
                for init in (REPO_ROOT / name).rglob("__init__.py") if "__pycache__" not in init.parts]
    assert packages and not [path for path in packages if f"histosynth/{path}" not in names]
    entry_points = wheel.read(top_level.replace("top_level.txt", "entry_points.txt")).decode()
    assert "histosynth = histosynth.clients.cli:main" in entry_points
    for name in SUBPACKAGES:  # no generic top-level names: they exist only as aliases after `import histosynth`
        done = install.python_code(f"import {name}")
        assert done.returncode == 1 and f"No module named '{name}'" in done.stderr, done.stderr
    done = install.python_code(
        "import histosynth, services.core.model_store as short, histosynth.services.core.model_store as long;"
        "import clients.cli, histosynth.clients.cli; print(short is long, clients.cli is histosynth.clients.cli)")
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], done.stderr
    help_text = subprocess.run([str(install.python), "-m", "histosynth", "--help"], cwd=install.outside,
                               env=install.env, capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: histosynth"), help_text.stderr


def test_installed_code_comes_from_the_wheel_and_its_requirements_are_met(install: Install) -> None:
    """histosynth[serve]'s requirement closure is installed, and covers every module its code imports."""
    code = """
import ast, importlib, importlib.metadata as md, json, pkgutil, sys
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import histosynth
import histosynth.clients as clients, histosynth.clients.cli, histosynth.services as services
site = Path(sys.argv[1])
problems, allowed, seen = [], set(), set()
stack = [(md.Distribution.at(next(site.glob("histosynth-*.dist-info"))), ("serve",))]
while stack:  # the requirement closure of histosynth[serve], with the versions installed
    dist, extras = stack.pop()
    allowed.add(canonicalize_name(dist.metadata["Name"]))
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        try:
            found = md.distribution(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{req} (needed by {dist.metadata['Name']}) not installed")
            continue
        if not req.specifier.contains(found.version, prereleases=True):
            problems.append(f"{req} but {found.version} installed")
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key not in seen:
            seen.add(key)
            stack.append((found, key[1]))
imported = set()
for package in (services, clients):  # every module must import here, and every import statement is checked
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for node in ast.walk(ast.parse(Path(module.__file__).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
owners = md.packages_distributions()
optional = set(json.loads(sys.argv[2]))
for name in sorted(imported - set(sys.stdlib_module_names) - {"histosynth", "services", "clients"} - optional):
    dists = {canonicalize_name(d) for d in owners.get(name, [])}
    if not dists & allowed:
        problems.append(f"the code imports {name} (distribution {sorted(dists) or 'not installed'}), "
                        "which histosynth[serve] does not require")
print(json.dumps({"services": services.__file__, "cli": clients.cli.__file__, "problems": problems,
                  "specs": sorted(p.name for p in clients.cli.SPECS_DIR.glob("*.yaml"))}))
"""
    done = install.python_code(code, str(install.site_packages), json.dumps(sorted(OPTIONAL_IMPORTS)))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for module in ("services", "cli"):
        assert Path(report[module]).is_relative_to(install.site_packages), report
    assert report["problems"] == [], "\n".join(report["problems"])
    assert report["specs"] == sorted(p.name for p in (REPO_ROOT / "clients" / "specs").glob("*.yaml"))


def test_missing_model_store_is_one_clean_line(install: Install) -> None:
    done = install.run("serve", "--all")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    for named in ("--model-store", "HISTOSYNTH_MODEL_STORE", str(install.outside / "model_store"),
                  str(install.outside / "home" / ".local" / "share" / "histosynth" / "model_store")):
        assert named in done.stderr


def test_models_verify_passes_on_the_shipped_store(install: Install) -> None:
    done = install.run("models", "verify", HISTOSYNTH_MODEL_STORE=str(MODEL_STORE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "match their manifests" in done.stdout
    listed = install.run("models", "list", "--model-store", str(MODEL_STORE))
    assert listed.returncode == 0 and "renderer-he-glands" in listed.stdout


@pytest.fixture
def served(install: Install, tmp_path: Path) -> Iterator[dict[str, str]]:
    """`histosynth serve --all` from outside the checkout; yields service -> address once it printed them.

    The server's log goes to a file, not a pipe: an undrained pipe fills up and blocks the server.
    """
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(install.histosynth), "serve", "--all", "--port", "0", "--model-store", str(MODEL_STORE)],
            cwd=install.outside, env=install.env, stdout=subprocess.PIPE, stderr=log, text=True,
        )
    try:
        addresses = _read_addresses(process)
        assert set(addresses) == SERVE_ALL, f"serve did not come up: {addresses}\n{log_path.read_text()[-3000:]}"
        yield addresses
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _read_addresses(process: subprocess.Popen[str]) -> dict[str, str]:
    """The 'name: host:port' lines serve prints once every service is up (then 'metrics: ...' and more).

    A reader thread does the blocking readline: select() on a buffered text pipe misses lines that the
    first read already pulled into the buffer. The thread ends when the process closes stdout.
    """
    lines: queue.Queue[str] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    addresses: dict[str, str] = {}
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while len(addresses) < len(SERVE_ALL) and process.poll() is None:
        try:
            line = lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() >= deadline:
                break
            continue
        name, _, value = line.strip().partition(": ")
        if name in SERVE_ALL:
            addresses[name] = value
    return addresses


def test_serve_all_renders_from_outside_the_checkout(install: Install, served: dict[str, str]) -> None:
    assert set(served) == SERVE_ALL
    code = """
import io, json, sys
import grpc, numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
import histosynth.clients.client
from histosynth.clients.client import HistosynthClient
address = sys.argv[1]
with grpc.insecure_channel(address) as channel:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
mask = np.ones((1, 128, 128), np.uint8)
mask[0, 32:96, 32:96] = 2
with HistosynthClient(targets={"rendering": address}, timeout=60) as client:
    out = client.render(mask, model="renderer-he-glands", seed=3)
image = out.images
buffer = io.BytesIO()
Image.fromarray(image[0]).save(buffer, format="PNG")
png = buffer.getvalue()
print(json.dumps({"health": int(health.status), "shape": list(image.shape), "dtype": str(image.dtype),
                  "std": float(image.std()), "png": png[:8].hex(), "model": out.model.name,
                  "client": histosynth.clients.client.__file__}))
"""
    done = install.python_code(code, served["rendering"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["health"] == 1  # SERVING
    assert report["shape"] == [1, 128, 128, 3] and report["dtype"] == "uint8"
    assert report["std"] > 1.0  # an image, not a constant fill
    assert report["png"] == "89504e470d0a1a0a"
    assert report["model"] == "renderer-he-glands"
    assert Path(report["client"]).is_relative_to(install.site_packages)
