"""Per-request memory admission: every model call has a cost before it runs (DESIGN.md, convention 15).

A model's working memory for one call grows with its input: activations with the pixels of each
row, self-attention with the square of its tokens, plus a fixed part per row. The manifest says how,
under ``metadata.memory``::

    memory:
      bytes_per_pixel: 2200     # activations per input pixel (H x W) of one row
      bytes_per_token2: 36      # attention: per (tokens)^2 of one row, summed over heads and layers
      token_stride: 4           # attention tokens are (H / stride) x (W / stride)
      bytes_per_row: 1048576    # per row, whatever its size

A manifest without that block gets a derived default (:func:`derived_memory_model`): activations
from the tensors' channel counts, and attention (only when the graph has a Softmax) from the
architecture its provenance records, else a conservative full-resolution guess.

Admission (:class:`MemoryBudget`) checks each call's estimate against the per-process budget
(``HISTOSYNTH_MEMORY_BUDGET``, default :func:`default_memory_budget`): one call whose estimate alone
exceeds it is refused with RESOURCE_EXHAUSTED naming the limit; calls in flight hold their estimate
until they end, and a call that would push the total past the budget is refused too (retry later).
Every budget of a process shares one ledger, so the four services of ``serve --all`` share one budget.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from services.core.errors import HistosynthError

_log = logging.getLogger(__name__)

MEMORY_BUDGET_ENV: Final = "HISTOSYNTH_MEMORY_BUDGET"
# Share of the cgroup / host memory the default budget allows for request working memory: the rest
# holds the interpreter, the loaded models, ONNX Runtime's arenas and the kernel's page cache.
DEFAULT_BUDGET_FRACTION: Final = 0.75
# Derived defaults, calibrated on the shipped models (CPU, ONNX Runtime 1.32; peak RSS per row):
# pix2pixHD renderer 576 B/pixel, segmenter 620, SPADE U-Net denoiser 2200 for 12 I/O channels, so
# 64 bytes of activation per I/O channel (x 4 bytes) covers each with a 1.4-3.5x margin.
ACTIVATION_BYTES_PER_IO_CHANNEL: Final = 4 * 64
DEFAULT_BYTES_PER_ROW: Final = 1 << 20
# Attention scores and softmax output, float32, per head: 2 x 4 bytes per token pair (+ margin).
ATTENTION_BYTES_PER_HEAD: Final = 9
# Without architecture provenance: 8 heads at full resolution (deliberately pessimistic).
UNKNOWN_ATTENTION_HEADS: Final = 8
_UNITS: Final = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                 "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
                 "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
_SIZE: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class MemoryBudgetExceededError(HistosynthError):
    """A request's estimated working memory does not fit the server's memory budget."""

    default_status = "RESOURCE_EXHAUSTED"
    reason = "memory_budget"


def parse_bytes(text: str) -> int:
    """``"6GiB"``, ``"6000M"``, ``"6442450944"`` -> bytes; ValueError naming the accepted forms."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size; write bytes or a number with a unit: 512MiB, 6GiB, 6G, 6000M"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def host_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_memory_limit() -> int | None:
    """This process' cgroup memory limit (v2 memory.max, else v1 memory.limit_in_bytes), or None."""
    candidates = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    try:  # the process' own cgroup (v2), when it is not the mount's root
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[2] not in ("", "/"):
                candidates.insert(0, Path("/sys/fs/cgroup") / parts[2].lstrip("/") / "memory.max")
    except OSError:
        pass
    limits = [value for value in (_read_int(path) for path in candidates) if value is not None]
    # v1 reports "no limit" as a huge number (about 2**63): ignore anything above the host's memory.
    host = host_memory_bytes()
    limits = [value for value in limits if host is None or value < host]
    return min(limits) if limits else None


def default_memory_budget() -> int:
    """75% of the cgroup's memory.max, or of the host's MemTotal when there is no cgroup limit."""
    available = cgroup_memory_limit() or host_memory_bytes() or 8 * 2**30
    return int(available * DEFAULT_BUDGET_FRACTION)


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


# ------------------------------------------------------------------------ memory model
@dataclass(frozen=True)
class MemoryModel:
    """How one model's working memory scales with a call of ``rows`` x H x W."""

    bytes_per_pixel: float
    bytes_per_token2: float = 0.0
    token_stride: int = 1
    bytes_per_row: float = DEFAULT_BYTES_PER_ROW
    source: str = "manifest"

    def __post_init__(self) -> None:
        for name in ("bytes_per_pixel", "bytes_per_token2", "bytes_per_row"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"memory.{name} must be a number >= 0, got {value!r}")
        if isinstance(self.token_stride, bool) or not isinstance(self.token_stride, int) or self.token_stride < 1:
            raise ValueError(f"memory.token_stride must be an integer >= 1, got {self.token_stride!r}")

    @property
    def has_attention(self) -> bool:
        return self.bytes_per_token2 > 0

    def per_row(self, height: int, width: int) -> float:
        tokens = math.ceil(height / self.token_stride) * math.ceil(width / self.token_stride)
        return self.bytes_per_row + self.bytes_per_pixel * height * width + self.bytes_per_token2 * tokens * tokens

    def estimate(self, rows: int, height: int, width: int) -> int:
        """Estimated working memory, in bytes, of one call of ``rows`` rows of ``height`` x ``width``."""
        return int(math.ceil(max(0, rows) * self.per_row(height, width)))

    def rows_within(self, budget_bytes: int, height: int, width: int) -> int:
        """The most rows of ``height`` x ``width`` whose estimate fits ``budget_bytes`` (0 when not even one)."""
        return max(0, int(budget_bytes // max(1.0, self.per_row(height, width))))

    @classmethod
    def from_metadata(cls, raw: Mapping[str, Any]) -> MemoryModel:
        known = {"bytes_per_pixel", "bytes_per_token2", "token_stride", "bytes_per_row"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"memory: unknown key(s) {unknown}; valid: {sorted(known)}")
        if "bytes_per_pixel" not in raw:
            raise ValueError("memory: bytes_per_pixel is required")
        return cls(
            bytes_per_pixel=raw["bytes_per_pixel"],
            bytes_per_token2=raw.get("bytes_per_token2", 0.0),
            token_stride=raw.get("token_stride", 1),
            bytes_per_row=raw.get("bytes_per_row", DEFAULT_BYTES_PER_ROW),
        )


def _channels(shape: tuple[Any, ...]) -> int:
    """Per-pixel channels of a [batch, C, H, W] tensor; 0 for vectors (timesteps, embeddings), which do not
    scale with the field."""
    if len(shape) < 3:
        return 0
    return shape[1] if isinstance(shape[1], int) else 1


def graph_has_attention(path: Path) -> bool:
    """Whether an ONNX file's graph holds a Softmax / Attention node (its op_type strings are stored verbatim)."""
    try:
        with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"Softmax") >= 0 or data.find(b"\x12\x09Attention") >= 0
    except (OSError, ValueError):
        return False


def derived_memory_model(manifest: Any) -> MemoryModel:
    """A default for a manifest without ``metadata.memory`` (see the module docstring)."""
    channels = sum(_channels(spec.shape) for spec in manifest.inputs) + sum(
        _channels(spec.shape) for spec in manifest.outputs
    )
    bytes_per_pixel = float(ACTIVATION_BYTES_PER_IO_CHANNEL * max(1, channels))
    bytes_per_token2, stride = 0.0, 1
    if manifest.format == "onnx" and graph_has_attention(manifest.path):
        model = ((manifest.provenance or {}).get("config") or {}).get("model") or {}
        widths, head_dim = model.get("channels"), model.get("attention_head_dim")
        if isinstance(widths, list) and widths and all(isinstance(w, int) and w > 0 for w in widths) \
                and isinstance(head_dim, int) and head_dim > 0:
            # diffusers-style U-Nets here attend only at the lowest level, one downsample per extra level.
            stride = 2 ** (len(widths) - 1)
            heads = max(1, widths[-1] // head_dim)
        else:
            heads = UNKNOWN_ATTENTION_HEADS
        bytes_per_token2 = float(ATTENTION_BYTES_PER_HEAD * heads)
    return MemoryModel(bytes_per_pixel, bytes_per_token2, stride, DEFAULT_BYTES_PER_ROW, source="derived")


def memory_model_for(manifest: Any) -> MemoryModel:
    """The manifest's ``metadata.memory`` when present (ValueError naming the key when malformed), else derived."""
    raw = (manifest.metadata or {}).get("memory")
    if raw is None:
        return derived_memory_model(manifest)
    if not isinstance(raw, Mapping):
        raise ValueError(f"model {manifest.key}: metadata.memory must be a mapping, got {raw!r}")
    try:
        return MemoryModel.from_metadata(raw)
    except ValueError as error:
        raise ValueError(f"model {manifest.key}: metadata.{error}") from None


def spatial_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of a [batch, C, H, W] array; (1, 1) for tensors without two spatial axes."""
    if len(shape) >= 4:
        return int(shape[-2]), int(shape[-1])
    return 1, 1


# ---------------------------------------------------------------------------- budget
class _Ledger:
    """Bytes reserved by calls in flight, process-wide."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_use = 0
        self.peak = 0


_LEDGER: Final = _Ledger()


class MemoryBudget:
    """Admission against ``limit_bytes``; every budget of the process shares one ledger of bytes in use."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        limit = default_memory_budget() if limit_bytes is None else int(limit_bytes)
        if limit < 1:
            raise ValueError(f"memory budget must be >= 1 byte, got {limit}")
        self.limit = limit

    @property
    def in_use(self) -> int:
        return _LEDGER.in_use

    @staticmethod
    def peak_in_use() -> int:
        """Most bytes held at once since start-up (or the last reset_peak)."""
        return _LEDGER.peak

    @staticmethod
    def reset_peak() -> None:
        with _LEDGER.lock:
            _LEDGER.peak = _LEDGER.in_use

    @property
    def available(self) -> int:
        return max(0, self.limit - _LEDGER.in_use)

    def describe_limit(self) -> str:
        return f"{format_bytes(self.limit)} ({MEMORY_BUDGET_ENV})"

    def check(self, estimate: int, what: str) -> None:
        """RESOURCE_EXHAUSTED when ``estimate`` alone exceeds the budget (nothing is reserved)."""
        if estimate > self.limit:
            raise MemoryBudgetExceededError(
                f"{what} needs an estimated {format_bytes(estimate)} of working memory, more than this server's "
                f"memory budget of {self.describe_limit()}; send fewer rows or a smaller size"
            )

    @contextmanager
    def reserve(self, estimate: int, what: str, *, force: bool = False) -> Iterator[None]:
        """Hold ``estimate`` bytes while the block runs.

        Refused (RESOURCE_EXHAUSTED) when it exceeds the budget, or when it does not fit beside the
        calls in flight; ``force`` skips the second check for work already admitted (it still counts).
        """
        self.check(estimate, what)
        with _LEDGER.lock:
            if not force and _LEDGER.in_use + estimate > self.limit:
                in_use = _LEDGER.in_use
                raise MemoryBudgetExceededError(
                    f"{what} needs an estimated {format_bytes(estimate)} of working memory and "
                    f"{format_bytes(in_use)} of this server's memory budget of {self.describe_limit()} is held "
                    "by calls in flight; retry with backoff, or send a smaller request"
                )
            _LEDGER.in_use += estimate
            _LEDGER.peak = max(_LEDGER.peak, _LEDGER.in_use)
        try:
            yield
        finally:
            with _LEDGER.lock:
                _LEDGER.in_use -= estimate


def budget_from_setting(value: str | None) -> MemoryBudget:
    """The budget for a HISTOSYNTH_MEMORY_BUDGET value (None = the default)."""
    return MemoryBudget(None if value is None else parse_bytes(value))


def memory_budget_problem(value: str | None) -> str | None:
    """Config check for HISTOSYNTH_MEMORY_BUDGET."""
    if value is None:
        return None
    try:
        size = parse_bytes(value)
    except ValueError as error:
        return str(error)
    return None if size >= 1 << 20 else "must be at least 1MiB"


__all__ = [
    "MEMORY_BUDGET_ENV",
    "MemoryBudget",
    "MemoryBudgetExceededError",
    "MemoryModel",
    "budget_from_setting",
    "default_memory_budget",
    "memory_model_for",
    "parse_bytes",
    "spatial_size",
]

