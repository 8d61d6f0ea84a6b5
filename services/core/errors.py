"""Domain errors of the serving core.

Each error carries the gRPC status *name* as a plain string (``"RESOURCE_EXHAUSTED"``)
because services.core imports neither protobuf nor grpc; the server maps the name
to ``grpc.StatusCode[name]`` at the edge. Each also carries a short, stable
``reason`` used as the ``reason`` label of histosynth_model_requests_total.

Messages are written for the caller: they say what happened and what to do next.
"""

from __future__ import annotations

from typing import ClassVar, Final

# The gRPC status names the core may produce; anything else is a programming error.
GRPC_STATUS_NAMES: Final = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)


class HistosynthError(Exception):
    """Base of every error the core reports to a caller.

    ``status`` is a gRPC status code name (see GRPC_STATUS_NAMES); subclasses fix it.
    """

    default_status: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "internal"

    def __init__(self, message: str, status: str | None = None) -> None:
        status = self.default_status if status is None else status
        if status not in GRPC_STATUS_NAMES:
            raise ValueError(
                f"unknown gRPC status name {status!r}; valid names: {sorted(GRPC_STATUS_NAMES)}"
            )
        super().__init__(message)
        self.message = message
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status!r})"


class QueueFullError(HistosynthError):
    """The batcher queue is at capacity; the caller should back off and retry."""

    default_status = "RESOURCE_EXHAUSTED"
    reason = "queue_full"

    def __init__(self, model: str, max_queue_size: int) -> None:
        super().__init__(
            f"model {model!r} queue is full ({max_queue_size} requests waiting); "
            "retry with exponential backoff, send fewer concurrent requests, "
            "or add replicas / raise max_queue_size"
        )
        self.model = model
        self.max_queue_size = max_queue_size


class DeadlineExceededError(HistosynthError):
    """The request's deadline passed before its result was ready."""

    default_status = "DEADLINE_EXCEEDED"
    reason = "deadline_exceeded"

    def __init__(self, model: str, waited_s: float, *, computing: bool = False) -> None:
        where = (
            "while its batch was computing; the result was discarded"
            if computing
            else "before it was computed; it was dropped from the queue"
        )
        super().__init__(
            f"model {model!r}: deadline passed after {waited_s * 1000:.1f} ms, {where}; "
            "set a longer deadline, or retry when the server is less loaded"
        )
        self.model = model
        self.waited_s = waited_s
        self.computing = computing


class BatchFailedError(HistosynthError):
    """The runtime raised while computing the batch this request was part of."""

    default_status = "INTERNAL"
    reason = "batch_failed"

    def __init__(self, model: str, cause: BaseException) -> None:
        super().__init__(
            f"model {model!r}: inference failed for the batch containing this request: "
            f"{type(cause).__name__}: {cause}; retrying may succeed, and if it keeps failing "
            "report it with the server logs"
        )
        self.model = model
        self.cause = cause
        self.__cause__ = cause


class InvalidInputError(HistosynthError):
    """The request itself is malformed (names, shapes, dtypes, sizes); do not retry as is."""

    default_status = "INVALID_ARGUMENT"
    reason = "invalid_input"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ModelNotFoundError(HistosynthError):
    """No model/version of that name is loaded."""

    default_status = "NOT_FOUND"
    reason = "model_not_found"

    def __init__(self, model: str, version: str | None, available: list[str] | tuple[str, ...]) -> None:
        wanted = model if version is None else f"{model}/{version}"
        super().__init__(
            f"model {clip(wanted)} is not loaded; available: {sorted(available)}; "
            "check the name and version in your request"
        )
        self.model = model
        self.version = version
        self.available = tuple(available)


class UnavailableError(HistosynthError):
    """The server is not accepting work right now (draining, stopped); retry elsewhere or later."""

    default_status = "UNAVAILABLE"
    reason = "unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)


# A caller-supplied value echoed into a message is cut to this many characters: a 100 KB job id or
# model name must not turn a NOT_FOUND into a status-details-too-large failure (or fill the logs).
ECHO_LIMIT: Final = 64


def clip(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with the full length noted."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
