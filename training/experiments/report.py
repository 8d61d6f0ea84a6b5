"""Shared plumbing for `make experiment-<name>`: score image sets through the real scoring service, write reports.

Every experiment writes ``reports/<name>/`` with ``report.json`` (all numbers + how they were made),
``README.md`` (the human summary, numbers first) and PNG image grids. Scores come from the scoring service
over loopback gRPC (``ScoreImages``), the same path a user would call, so the report names the extractor
(model, version, sha256) the service says it used.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from services._generated.histosynth.v1 import scoring_pb2, scoring_pb2_grpc
from services.all_in_one import BackgroundServers
from services.core.config import ServerConfig
from services.tensor_codec import array_to_tensor
from training.provenance import git_commit

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORTS_ROOT = REPO_ROOT / "reports"
# Images per ScoreImages message: 64 x 256 x 256 x 3 bytes = 12.6 MB, well under the message limit.
_CHUNK = 64


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 4) -> np.ndarray:
    """Rows of uint8 HxW or HxWx3 tiles (sizes may differ per tile; each cell is the largest) -> one RGB image."""
    tiles = [[t if t.ndim == 3 else np.repeat(t[..., None], 3, axis=2) for t in row] for row in rows]
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    cols = max(len(row) for row in tiles)
    grid = np.full((len(tiles) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + tile.shape[0], x:x + tile.shape[1]] = tile[..., :3]
    return grid


def colorize_classes(class_map: np.ndarray, num_classes: int) -> np.ndarray:
    """uint8 class ids -> RGB with a fixed palette (0 = black), for grids."""
    palette = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                        [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], np.uint8)
    if num_classes > len(palette):
        raise ValueError(f"colorize_classes supports up to {len(palette)} classes, got {num_classes}")
    return palette[np.clip(class_map, 0, num_classes - 1)]


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
            "n": int(array.size), "values": [float(v) for v in array]}


def machine() -> dict[str, Any]:
    """Where a report was made. CPU model and bf16 instruction sets are recorded because bf16 training numbers are
    bit-identical on the same CPU type but differ across types (oneDNN picks other bf16 kernels, e.g. AMX)."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor() or "unknown",
            **cpu_identity()}


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """{"cpu_model", "bf16_isa"} from /proc/cpuinfo ("unknown" and [] where it cannot be read)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"cpu_model": "unknown", "bf16_isa": []}
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"cpu_model": model, "bf16_isa": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})}


@dataclass
class ExperimentReport:
    """Collects results, then writes report.json + README.md (+ grids) under reports/<name>/."""

    name: str
    command: str
    out_dir: Path
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def save_grid(self, filename: str, rows: Sequence[Sequence[np.ndarray]]) -> str:
        Image.fromarray(make_grid(rows)).save(self.out_dir / filename, optimize=True)
        return filename

    def write(self, markdown: str) -> Path:
        """``markdown``: the body (findings, tables, grid links); a header with the command and machine is added."""
        payload = {
            "experiment": self.name,
            "command": self.command,
            "code_version": git_commit(include_untracked=False),
            "machine": machine(),
            "wall_seconds": round(time.time() - self.started, 1),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": self.results,
        }
        (self.out_dir / "report.json").write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable))
        header = (f"# Experiment: {self.name}\n\nReproduce: `{self.command}` (writes this folder). "
                  f"Code {payload['code_version']}, {payload['machine']['cpus']} CPUs "
                  f"({payload['machine']['cpu_model']}; bf16: {', '.join(payload['machine']['bf16_isa']) or 'none'}), "
                  f"{payload['wall_seconds']} s wall. All numbers: `report.json`.\n\n")
        path = self.out_dir / "README.md"
        path.write_text(header + markdown.rstrip() + "\n")
        for grid in self.out_dir.glob("*.png"):
            shrink_png(grid)
        return path


def shrink_png(path: Path, min_bytes: int = 300_000) -> None:
    """Re-save a large RGB grid with a 256-colour palette: about half the bytes, no visible change for a
    figure, and reports are committed to the repo (numbers live in report.json, not in pixels)."""
    if path.stat().st_size < min_bytes:
        return
    with Image.open(path) as image:
        if image.mode == "P":
            return
        rgb = image.convert("RGB")
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass(frozen=True)
class ScoreOptions:
    """ScoreImages options; extractor "" = the shipped histology encoder."""

    extractor: str = ""
    kid_subsets: int = 100
    kid_subset_size: int = 0       # 0 = half the smaller set (so subsets differ)
    pr_k: int = 3
    fid_bootstrap: int = 0
    seed: int = 0


class ScoringSession:
    """The scoring service on loopback (in-process, its own thread), called over real gRPC.

    ``with ScoringSession() as scorer: scores = scorer.score(real_uint8_nhwc, synthetic_uint8_nhwc)``
    """

    def __init__(self, model_store: Path = REPO_ROOT / "model_store", config: ServerConfig | None = None) -> None:
        base = config or ServerConfig.from_env()
        # No /metrics listener: an experiment is a batch job, and a fixed port could collide.
        self._config = replace(base, model_store=model_store, metrics_port=None)
        self._servers = BackgroundServers(self._config, services=["scoring"], ports={"scoring": 0})
        self._channel: grpc.Channel | None = None

    def __enter__(self) -> ScoringSession:
        self._servers.start()
        limit = 256 * 1024 * 1024
        self._channel = grpc.insecure_channel(self._servers.addresses["scoring"], options=[
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._channel is not None:
            self._channel.close()
        self._servers.stop()

    def score(self, real: np.ndarray, synthetic: np.ndarray, options: ScoreOptions = ScoreOptions()) -> dict[str, Any]:
        """Two uint8 [N,H,W,3] sets -> FID, KID, precision/recall and the extractor that made the features.

        Streams both sets through ScoreImageStream in chunks, so sets of any size fit the message limit.
        """
        assert self._channel is not None, "use ScoringSession as a context manager"
        stub = scoring_pb2_grpc.ScoringStub(self._channel)
        subset = options.kid_subset_size or max(2, min(len(real), len(synthetic)) // 2)
        proto_options = scoring_pb2.DistributionOptions(
            extractor=options.extractor, kid_subsets=options.kid_subsets, kid_subset_size=subset,
            pr_k=options.pr_k, fid_bootstrap=options.fid_bootstrap, seed=options.seed)

        def batches():  # noqa: ANN202 - request iterator
            first = True
            for role, images in ((scoring_pb2.IMAGE_SET_ROLE_REAL, real), (scoring_pb2.IMAGE_SET_ROLE_SYNTHETIC, synthetic)):
                for start in range(0, len(images), _CHUNK):
                    chunk = np.ascontiguousarray(images[start:start + _CHUNK], dtype=np.uint8)
                    yield scoring_pb2.ImageBatch(options=proto_options if first else None, role=role,
                                                 images=scoring_pb2.ImageSet(images=array_to_tensor(chunk)))
                    first = False

        response = stub.ScoreImageStream(batches(), timeout=1800)
        return scores_to_dict(response)

    def score_masks(self, real: np.ndarray, synthetic: np.ndarray, class_ids: Sequence[int] = (),
                    connectivity: int = 8, bins: int = 20, include_background: bool = False,
                    include_border_objects: bool = False) -> dict[str, Any]:
        """ScoreMasks (PriorPath shape statistics): per class, KS / Jensen-Shannon of pooled per-object features
        and of per-mask image features; the dict has the shape of services.scoring.mask_stats
        MaskSetComparison.as_dict()."""
        assert self._channel is not None, "use ScoringSession as a context manager"
        response = scoring_pb2_grpc.ScoringStub(self._channel).ScoreMasks(scoring_pb2.ScoreMasksRequest(
            real_masks=array_to_tensor(np.ascontiguousarray(real, np.uint8)),
            synthetic_masks=array_to_tensor(np.ascontiguousarray(synthetic, np.uint8)),
            class_ids=list(class_ids), connectivity=connectivity, bins=bins, include_background=include_background,
            include_border_objects=include_border_objects), timeout=600)
        return mask_scores_to_dict(response)


def mask_scores_to_dict(response: Any) -> dict[str, Any]:
    """A MaskScores message as the dict MaskSetComparison.as_dict() writes (None for an unset mean)."""

    def optional(message: Any, name: str) -> float | None:
        return getattr(message, name) if message.HasField(name) else None

    object_features = [f for f in response.features if f.group == "object"]
    return {
        "mean_ks": optional(response, "mean_ks"), "mean_js": optional(response, "mean_js"),
        "image_mean_ks": response.image_mean_ks, "image_mean_js": response.image_mean_js,
        "real_count": int(response.real_count), "synthetic_count": int(response.synthetic_count),
        "real_objects": int(response.real_objects), "synthetic_objects": int(response.synthetic_objects),
        "compared_classes": [c.class_id for c in response.classes if c.status == "compared"],
        "missing_classes": list(response.missing_class_ids),
        "features_ks_p_below_0.05": int(sum(f.ks_pvalue < 0.05 for f in object_features)),
        "bins": int(response.bins), "connectivity": int(response.connectivity),
        "include_border_objects": bool(response.include_border_objects),
        "classes": {
            str(c.class_id): {
                "status": c.status, "real_objects": int(c.real_objects), "synthetic_objects": int(c.synthetic_objects),
                "real_border_objects": int(c.real_border_objects),
                "synthetic_border_objects": int(c.synthetic_border_objects),
                "real_masks_with_class": int(c.real_masks_with_class),
                "synthetic_masks_with_class": int(c.synthetic_masks_with_class),
                "mean_ks": optional(c, "mean_ks"), "mean_js": optional(c, "mean_js"),
                "image_mean_ks": c.image_mean_ks, "image_mean_js": c.image_mean_js,
            }
            for c in response.classes
        },
        "per_feature": {
            f.name: {"group": f.group, "class_id": f.class_id, "feature": f.feature, "ks": f.ks_statistic,
                     "ks_p": f.ks_pvalue, "js": f.js_divergence, "kl_smoothed": f.kl_divergence,
                     "real_n": int(f.real_n), "synthetic_n": int(f.synthetic_n), "real_mean": f.real_mean,
                     "synthetic_mean": f.synthetic_mean}
            for f in response.features
        },
    }


def scores_to_dict(scores: Any) -> dict[str, Any]:
    extractor = scores.extractor
    out = {
        "fid": scores.fid,
        "kid_mean": scores.kid_mean,
        "kid_std": scores.kid_std,
        "kid_subsets": scores.kid_subsets,
        "kid_subset_size": scores.kid_subset_size,
        "precision": scores.precision,
        "recall": scores.recall,
        "pr_k": scores.pr_k,
        "real_count": scores.real_count,
        "synthetic_count": scores.synthetic_count,
        "extractor": {"name": extractor.model.name, "version": extractor.model.version,
                      "sha256": extractor.model.sha256, "family": extractor.family,
                      "standard_fid": extractor.standard_fid, "description": extractor.description},
    }
    if scores.HasField("fid_ci"):
        out["fid_ci"] = {"low": scores.fid_ci.low, "high": scores.fid_ci.high, "level": scores.fid_ci.level}
    return out


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A markdown table; floats rounded to ``digits`` significant decimals."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
        return str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summarize(values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, Any]]:
    return {key: mean_std(list(v)) for key, v in values.items()}
