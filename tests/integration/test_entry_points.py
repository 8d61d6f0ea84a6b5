"""`python -m services.mask_refinement` / `python -m services.mask_rendering`: configured from
HISTOSYNTH_* variables, serve health + the domain API, and drain cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mask_refinement.servicer import SERVICE_NAME as REFINEMENT
from services.mask_rendering.servicer import SERVICE_NAME as RENDERING

REPO_ROOT = Path(__file__).resolve().parents[2]


async def read_listening_address(stream: asyncio.StreamReader, timeout_s: float = 30.0) -> str:
    """The bound address from the server's JSON log line 'gRPC server listening'."""
    async def scan() -> str:
        while line := await stream.readline():
            record = json.loads(line)
            if record.get("msg") == "gRPC server listening":
                return record["address"]
        raise AssertionError("server exited before it was listening")

    return await asyncio.wait_for(scan(), timeout_s)


@pytest.mark.parametrize("module, service", [("services.mask_refinement", REFINEMENT),
                                             ("services.mask_rendering", RENDERING)])
async def test_entry_point_serves_and_drains_on_sigterm(module: str, service: str, module_store: Path) -> None:
    environment = {
        **os.environ,
        "HISTOSYNTH_MODEL_STORE": str(module_store),
        "HISTOSYNTH_PORT": "0",
        "HISTOSYNTH_METRICS_PORT": "off",
        "HISTOSYNTH_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, cwd=REPO_ROOT, env=environment,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        address = await read_listening_address(process.stderr)
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
