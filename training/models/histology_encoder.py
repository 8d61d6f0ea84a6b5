"""Small ResNet-style histology encoder: the feature extractor for FID/KID/precision-recall on H&E and IHC tiles.

Serving contract (also written into the manifest metadata by training/export/scoring_models.py):
    input  `image`    float32 [batch, 3, H, W], RGB, values in the uint8 range [0, 255] (any H, W >= 16)
    inside the graph: bilinear resize to input_size x input_size (align_corners=False, no antialias, i.e. ONNX
                      Resize linear/half_pixel), then x / 127.5 - 1
    output `features` float32 [batch, feature_dim]: global-average-pooled last stage (after ReLU), NOT normalised;
                      FID/KID use it as is, L2-normalise it for cosine similarity or precision/recall if wanted
    output `logits`   float32 [batch, num_classes]: tissue grade/organ classifier (Inception-Score-like numbers)

Why the resize is inside the graph: the scoring service then feeds any tile size and gets features measured at the
scale the network was trained at; one fewer pre-processing step to get wrong in serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    num_classes: int
    num_tissue_types: int
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_stage: int = 1
    input_size: int = 128


class ResidualBlock(nn.Module):
    """Pre-activation-free basic block (conv-BN-ReLU-conv-BN + shortcut, ReLU); stride 2 halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class HistologyEncoder(nn.Module):
    """forward(image in [0, 255]) -> (features [B, widths[-1]], logits [B, num_classes]).

    `tissue_logits(features)` is the training-only auxiliary head (which source/stain a tile comes from); it is
    not exported.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        # Stride-2 stem: 128 px input -> 64 px maps, where a 40x nucleus is still several pixels wide.
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages = []
        in_channels = widths[0]
        for i, width in enumerate(widths):
            for j in range(config.blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(ResidualBlock(in_channels, width, stride))
                in_channels = width
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], config.num_classes)
        self.tissue_head = nn.Linear(widths[-1], config.num_tissue_types)

    @property
    def feature_dim(self) -> int:
        return self.config.widths[-1]

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        x = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        return x / 127.5 - 1.0

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.preprocess(image)))
        return x.mean(dim=(2, 3))

    def tissue_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.tissue_head(features)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(image)
        return features, self.classifier(features)
