"""Start and stop a private TorchServe on loopback: every listener on 127.0.0.1 at a free port.

Used by tests/integration/test_torchserve.py and bench/bench_serving.py. ``start`` writes the shipped
deploy/torchserve/config.properties with its REST (inference, management, metrics) and gRPC listeners moved to
free loopback ports, runs
`torchserve --start --ncs --disable-token-auth` with TorchServe's pid file, worker sockets and logs under
``work_dir``, and waits until each model has a READY worker (/ping says Healthy before the worker has
loaded the model). ``stop`` runs `torchserve --stop` and waits for the frontend and its workers to exit,
killing what is left after ``timeout_s``. Needs psutil, which comes with torchserve.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


SHIPPED_CONFIG = Path(__file__).with_name("config.properties")


def shipped_config(path: Path = SHIPPED_CONFIG) -> dict[str, str]:
    """deploy/torchserve/config.properties as {key: value} (comments and blank lines dropped)."""
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def torchserve_executable() -> str | None:
    """The torchserve launcher next to this interpreter (a venv), else on PATH."""
    return shutil.which("torchserve", path=str(Path(sys.executable).parent)) or shutil.which("torchserve")


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they differ, then released for TorchServe)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


@dataclass
class TorchServe:
    """A running TorchServe frontend started by ``start``; ``stop`` (or the context manager) ends it."""

    executable: str
    work_dir: Path
    inference_port: int
    management_port: int
    frontend: psutil.Process
    launch: dict[str, Any] = field(repr=False)

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def prediction_url(self, model: str) -> str:
        return f"{self.inference_url}/predictions/{model}"

    def logs(self, tail_chars: int = 3000) -> str:
        return "\n".join(path.read_text()[-tail_chars:] for path in sorted(self.work_dir.glob("**/*.log")))

    def stop(self, timeout_s: float = 20.0) -> list[int]:
        """`torchserve --stop`, then wait for the frontend and its Python workers; returns pids that had to be killed."""
        workers = self.frontend.children(recursive=True) if self.frontend.is_running() else []
        with (self.work_dir / "torchserve-console.log").open("a") as output:
            subprocess.run([self.executable, "--stop"], stdout=output, stderr=subprocess.STDOUT, **self.launch)
        # --stop only signals the frontend: wait for it and its workers, so nothing outlives the caller.
        _, alive = psutil.wait_procs([self.frontend, *workers], timeout=timeout_s)
        for process in alive:
            process.kill()
        return [process.pid for process in alive]

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_until_ready(server: TorchServe, models: list[str], timeout_s: float) -> None:
    """Wait for /ping Healthy and a READY worker for every model; raise with the logs otherwise."""
    started = time.monotonic()
    pending = list(models)
    while time.monotonic() - started < timeout_s and server.frontend.is_running():
        try:
            if get_json(f"{server.inference_url}/ping") == {"status": "Healthy"}:
                for model in list(pending):
                    (described,) = get_json(f"{server.management_url}/models/{model}")  # type: ignore[misc]
                    if any(worker["status"] == "READY" for worker in described["workers"]):
                        pending.remove(model)
            if not pending:
                return
        except (urllib.error.URLError, ConnectionError, ValueError):
            pass  # frontend not listening yet, or model not registered yet
        time.sleep(0.2)
    raise RuntimeError(f"TorchServe has no READY worker for {pending} after {timeout_s} s; logs:\n{server.logs()}")


def start(
    model_store: Path,
    archives: dict[str, str],
    work_dir: Path,
    ready_timeout_s: float = 45.0,
    max_message_bytes: int = 512 * 1024 * 1024,
) -> TorchServe:
    """Start TorchServe serving ``archives`` ({model name: .mar file name in model_store}), one worker each."""
    executable = torchserve_executable()
    if executable is None:
        raise RuntimeError("torchserve is not installed (pip install torchserve==0.12.0)")
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "config.properties"
    settings = shipped_config()
    settings.update({
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": str(grpc_inference),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": str(grpc_management),
        "max_request_size": str(max_message_bytes),
        "max_response_size": str(max_message_bytes),
    })
    config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    # TorchServe keeps its pid file, worker sockets and logs under TMPDIR/TEMP and LOG_LOCATION:
    # point them all into work_dir so parallel runs and the repository stay untouched.
    log_dir = work_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    run_dir = work_dir / "run"
    run_dir.mkdir(exist_ok=True)
    env = dict(
        os.environ, TMPDIR=str(run_dir), TEMP=str(run_dir), LOG_LOCATION=str(log_dir), METRICS_LOCATION=str(log_dir)
    )
    launch: dict[str, Any] = dict(cwd=work_dir, env=env, timeout=30, check=False)
    command = [
        executable, "--start", "--ncs", "--disable-token-auth", "--model-store", str(model_store),
        "--models", *(f"{name}={file}" for name, file in archives.items()), "--ts-config", str(config),
    ]  # fmt: skip
    # The frontend inherits the launcher's stdout, so a pipe would never reach EOF: write both to a file.
    console = work_dir / "torchserve-console.log"
    with console.open("w") as output:
        launched = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, **launch)
    if launched.returncode != 0:
        raise RuntimeError(f"torchserve --start exited {launched.returncode}:\n{console.read_text()}")
    try:
        frontend = psutil.Process(int((run_dir / ".model_server.pid").read_text().strip()))
    except (FileNotFoundError, ValueError, psutil.Error) as error:
        raise RuntimeError(f"torchserve --start exited 0 but left no frontend pid ({error}):\n"
                           f"{console.read_text()}") from error
    server = TorchServe(executable, work_dir, inference, management, frontend, launch)
    try:
        wait_until_ready(server, list(archives), ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server
