"""Small U-Net that predicts the class map a rendered image was conditioned on (mask-image consistency scoring).

Serving contract (written into the manifest metadata by training/export/scoring_models.py):
    input  `image`  float32 [batch, 3, H, W], RGB in the uint8 range [0, 255]; H and W multiples of
                    2 ** depth (8 by default) - pad (reflect) and crop the output back otherwise.
                    A renderer output x in [-1, 1] becomes (x + 1) * 127.5.
    inside the graph: x / 127.5 - 1
    output `logits` float32 [batch, num_classes, H, W]; argmax over axis 1 is the predicted class map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SegmenterConfig:
    num_classes: int
    base_channels: int = 16
    depth: int = 3  # number of 2x downsamplings

    @property
    def size_multiple(self) -> int:
        return 2 ** self.depth


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class TissueSegmenter(nn.Module):
    """U-Net: `depth` max-pool downsamplings, channels doubling from base_channels, bilinear upsampling + skip
    concatenation on the way up (no transposed convs: no checkerboard, fewer parameters)."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2 ** i for i in range(config.depth + 1)]
        self.down = nn.ModuleList([_double_conv(3, widths[0])] +
                                  [_double_conv(widths[i - 1], widths[i]) for i in range(1, len(widths))])
        self.up = nn.ModuleList([_double_conv(widths[i + 1] + widths[i], widths[i])
                                 for i in reversed(range(config.depth))])
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image / 127.5 - 1.0
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
