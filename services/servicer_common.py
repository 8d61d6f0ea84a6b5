"""Small proto <-> domain helpers shared by the servicers (the only modules that touch protobuf)."""

from __future__ import annotations

import time

import grpc

from services._generated.histosynth.v1 import common_pb2
from services.core.errors import InvalidInputError
from services.model_host import ModelRef


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as absolute ``time.monotonic()`` seconds (what the batcher takes), or None."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining)


def model_ref_to_proto(ref: ModelRef) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=ref.name, version=ref.version, sha256=ref.sha256)


def require_field(request: object, field: str, what: str) -> None:
    """Refuse a request whose message field ``field`` is unset; ``what`` says what to send."""
    if not request.HasField(field):  # type: ignore[attr-defined]
        raise InvalidInputError(f"{field} is required: send {what}")
