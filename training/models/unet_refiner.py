"""pix2pix U-Net generator (coarse tissue mask -> fine tissue mask) and its conditional 70x70 PatchGAN.

Follows Isola et al. 2017 (pix2pix) as used by PriorPath for the coarse-to-fine mask step:
encoder of 4x4 stride-2 convs (LeakyReLU 0.2), decoder of 4x4 stride-2 transposed convs (ReLU) with skip
connections that concatenate encoder features, dropout 0.5 in the three innermost decoder blocks (active only
in training; the exported model is deterministic), tanh output in [-1, 1].
Differences from the paper, and why: instance norm instead of batch norm (batch size 1 on CPU, and eval
behaviour then equals training behaviour, so ONNX export matches what was trained); a configurable depth
(default 7 downsamplings -> inputs must be multiples of 128 px) and a channel cap to keep weights < 30 MB.
"""

from __future__ import annotations

import torch
from torch import nn


def init_weights(module: nn.Module) -> None:
    """pix2pix/pix2pixHD init: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class UNetBlock(nn.Module):
    """One encoder level + (recursively) everything inside it + the matching decoder level."""

    def __init__(self, outer_ch: int, inner_ch: int, in_ch: int | None = None, submodule: nn.Module | None = None,
                 outermost: bool = False, innermost: bool = False, dropout: bool = False):
        super().__init__()
        self.outermost = outermost
        in_ch = outer_ch if in_ch is None else in_ch
        down = [nn.Conv2d(in_ch, inner_ch, 4, stride=2, padding=1)]
        if outermost:
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner_ch * 2, outer_ch, 4, stride=2, padding=1), nn.Tanh()]
            layers = down + [submodule] + up
        elif innermost:
            # innermost level is 1x1 at the training crop: no norm there (instance norm of one pixel is zero)
            down = [nn.LeakyReLU(0.2, True)] + down
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner_ch, outer_ch, 4, stride=2, padding=1),
                  nn.InstanceNorm2d(outer_ch)]
            layers = down + up
        else:
            down = [nn.LeakyReLU(0.2, True)] + down + [nn.InstanceNorm2d(inner_ch)]
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner_ch * 2, outer_ch, 4, stride=2, padding=1),
                  nn.InstanceNorm2d(outer_ch)]
            layers = down + [submodule] + up + ([nn.Dropout(0.5)] if dropout else [])
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], dim=1)


class UNetGenerator(nn.Module):
    """U-Net with `num_downs` stride-2 levels; H and W must be multiples of 2**num_downs."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 24, num_downs: int = 7,
                 max_mult: int = 8):
        super().__init__()
        assert num_downs >= 5, "pix2pix U-Net needs >= 5 levels (4 widening levels + the innermost)"
        self.size_multiple = 2 ** num_downs
        top = ngf * max_mult
        block = UNetBlock(top, top, innermost=True)
        for _ in range(num_downs - 5):  # constant-width inner levels, dropout as in pix2pix
            block = UNetBlock(top, top, submodule=block, dropout=True)
        mults = [m for m in (4, 2, 1) if m < max_mult] if max_mult > 4 else [max_mult // 2, max_mult // 4, 1]
        outer = top
        for mult in mults:
            block = UNetBlock(ngf * mult, outer, submodule=block)
            outer = ngf * mult
        self.model = UNetBlock(out_channels, ngf, in_ch=in_channels, submodule=block, outermost=True)
        init_weights(self)

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        return self.model(coarse)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (n_layers=3) on concat(condition, image); returns a map of real/fake scores."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1), nn.InstanceNorm2d(out),
                       nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat([condition, image], dim=1))
