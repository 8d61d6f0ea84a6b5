"""Standard-FID InceptionV3 (the pytorch-fid network for pt_inception-2015-12-05 weights) -> model_store ONNX.

    python -m training.export.fid_inception --weights /path/to/pt_inception-2015-12-05-6726825d.pth \
        [--expected-sha256 <64 hex>] [--name fid-inception-v3] [--version 1] [--store-root model_store]

The weights are NOT downloaded and NOT shipped: the user provides the file. Its sha256 is always computed and
recorded. Checksum rules:
  * the published file name carries the torch.hub hash convention: the 8 hex digits after the last "-" are the
    start of the file's sha256 (`6726825d`). A file whose digest starts with that prefix is the published
    weights -> metadata `standard_fid: true`.
  * `--expected-sha256` (64 hex) is checked exactly when given; a mismatch is refused.
  * a file that matches neither is refused, unless the caller passes an explicit expected sha256 for it (e.g.
    a re-saved copy or test weights); such an export is marked `standard_fid: false`, because FID numbers are
    only comparable with the literature when the published weights are used.

Architecture (Szegedy et al. 2016, InceptionV3 as in the 2015-12-05 TensorFlow graph that the original FID code
used). The TF graph differs from torchvision's ImageNet InceptionV3 in three places, which is why FID needs its
own blocks:
  * the average-pool branches of the 35x35 (A), 17x17 (C) blocks and the first 8x8 block (Mixed_7b) exclude the
    zero padding from the average (count_include_pad=False);
  * the last 8x8 block (Mixed_7c) pools its pool branch with a 3x3 MAX pool (stride 1, pad 1), not an average;
  * the classifier has 1008 outputs (the TF graph's label space), kept here only so the state dict loads.
Output `features` = the 2048-d global average pool after Mixed_7c ("pool3").

Pre-processing, inside the graph (pytorch-fid's): input float32 [batch, 3, H, W] RGB in [0, 255] (uint8 cast to
float) -> x / 255 -> bilinear resize to 299x299 (align_corners=False, no antialias) -> 2x - 1. torch-fidelity uses
the same weights but a TF1-style bilinear resize and (x - 128) / 128; the two give slightly different FIDs, this
graph reproduces pytorch-fid's numbers.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from services.core.model_store import file_sha256
from training.export.onnx_export import export_to_model_store, hardware_string
from training.provenance import git_commit

PUBLISHED_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub convention: the hex run in the file name is the prefix of the file's sha256.
PUBLISHED_SHA256_PREFIX = "6726825d"
FID_INPUT_SIZE = 299
FID_FEATURE_DIM = 2048
FID_NUM_CLASSES = 1008
BN_EPS = 0.001  # the TF graph's batch-norm epsilon


class WeightsChecksumError(ValueError):
    """The weights file is not the one the caller (or the published name) says it is."""


# ============================================================================================= architecture
class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; attribute names match the published state dict."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_excluding_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_excluding_padding(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 / 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool_excluding_padding(x)),
        ], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                          F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `pool` = "avg" (Mixed_7b) or "max" (Mixed_7c, the TF graph's quirk)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = _avg_pool_excluding_padding(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(single), self.branch3x3_2b(single)], dim=1),
            torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], dim=1),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """forward(image float [B, 3, H, W] in [0, 255]) -> pool3 features [B, 2048]."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FID_FEATURE_DIM, FID_NUM_CLASSES)  # unused by FID; present so the state dict loads

    @staticmethod
    def preprocess(image: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(image / 255.0, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(image)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


# ============================================================================================= weights
@dataclass(frozen=True)
class WeightsInfo:
    path: str
    sha256: str
    published: bool  # digest starts with the published prefix -> the standard FID weights


def verify_weights_file(path: Path | str, expected_sha256: str | None = None) -> WeightsInfo:
    """Check the file's sha256 (rules in the module docstring); raise WeightsChecksumError with both digests."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights file not found: {path} (expected a local copy of "
                                f"{PUBLISHED_WEIGHTS_FILE}; this project does not download it)")
    if expected_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        raise ValueError(f"expected_sha256 must be 64 hex digits, got {expected_sha256!r}")
    digest = file_sha256(path)
    published = digest.startswith(PUBLISHED_SHA256_PREFIX)
    if expected_sha256 is not None:
        if digest != expected_sha256.lower():
            raise WeightsChecksumError(f"sha256 of {path} is {digest}, expected {expected_sha256.lower()}; "
                                       "refusing to load a weights file that is not the one you named")
    elif not published:
        raise WeightsChecksumError(
            f"sha256 of {path} is {digest}, which does not start with {PUBLISHED_SHA256_PREFIX!r}, the published "
            f"checksum prefix of {PUBLISHED_WEIGHTS_FILE}: this is not the standard FID Inception file. Pass "
            "expected_sha256 (--expected-sha256) with this file's full digest to export it anyway; it will be "
            "marked standard_fid: false")
    return WeightsInfo(path=str(path), sha256=digest, published=published)


def load_fid_state_dict(model: FIDInceptionV3, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict load, tolerating only what old checkpoints legitimately lack or carry extra:
    BatchNorm `num_batches_tracked` buffers (newer torch only) and an auxiliary classifier (`AuxLogits.*`)."""
    state = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights do not fit the FID InceptionV3: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                         f" ({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
                         f" ({len(unexpected)})")
    wrong_shape = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if wrong_shape:
        raise ValueError(f"weights with wrong shapes (key, file, model): {wrong_shape[:5]}")
    model.load_state_dict(state, strict=True)


def load_fid_inception(weights_path: Path | str, expected_sha256: str | None = None
                       ) -> tuple[FIDInceptionV3, WeightsInfo]:
    info = verify_weights_file(weights_path, expected_sha256)
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{weights_path} holds a {type(state_dict).__name__}, expected a state dict")
    model = FIDInceptionV3()
    load_fid_state_dict(model, state_dict)
    return model.eval(), info


# ============================================================================================= export
def export_fid_inception(weights_path: Path | str, *, store_root: Path | str = Path("model_store"),
                         name: str = "fid-inception-v3", version: str | int = 1,
                         expected_sha256: str | None = None,
                         parity_sizes=((299, 299), (256, 256)), max_batch_size: int = 32, atol: float = 1e-3,
                         overwrite: bool = False) -> Path:
    model, info = load_fid_inception(weights_path, expected_sha256)
    metadata = {
        "feature": "pool3",
        "feature_dim": FID_FEATURE_DIM,
        "standard_fid": info.published,
        "input_range": [0.0, 255.0],
        "input_layout": "NCHW RGB float32",
        "resize": {"size": [FID_INPUT_SIZE, FID_INPUT_SIZE], "method": "bilinear", "align_corners": False,
                   "antialias": False, "inside_graph": True},
        "normalisation_inside_graph": "x / 255 -> resize -> 2x - 1 (pytorch-fid)",
        "weights_file": Path(info.path).name,
        "weights_sha256": info.sha256,
    }
    provenance = {
        "training_commit": git_commit(),  # nothing trained here: the code that converted the user's weights
        "config": {"architecture": "FIDInceptionV3 (pytorch-fid blocks)", "weights_file": Path(info.path).name,
                   "weights_sha256": info.sha256, "expected_sha256": expected_sha256,
                   "published_sha256_prefix": PUBLISHED_SHA256_PREFIX},
        "seed": 0,
        "data": ["ImageNet (TensorFlow inception-2015-12-05 graph, ported to PyTorch by pytorch-fid)"],
        "steps": 0,
        "train_seconds": 0.0,
        "hardware": hardware_string(),
    }
    return export_to_model_store(
        model, (torch.zeros(1, 3, FID_INPUT_SIZE, FID_INPUT_SIZE),), name=name, version=version, kind="encoder",
        input_names=["image"], output_names=["features"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}},
        metadata=metadata, provenance=provenance, metrics={"weights_published": info.published},
        store_root=store_root, parity_sizes=parity_sizes, atol=atol, max_batch_size=max_batch_size,
        overwrite=overwrite)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help=f"local copy of {PUBLISHED_WEIGHTS_FILE}")
    parser.add_argument("--expected-sha256", default=None, help="full sha256 to require (recorded in provenance)")
    parser.add_argument("--name", default="fid-inception-v3")
    parser.add_argument("--version", default="1")
    parser.add_argument("--store-root", type=Path, default=Path("model_store"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = export_fid_inception(args.weights, store_root=args.store_root, name=args.name, version=args.version,
                               expected_sha256=args.expected_sha256, overwrite=args.overwrite)
    print(f"exported {args.name} v{args.version} -> {out}")
    return out


if __name__ == "__main__":
    main()
