"""pix2pixHD global generator G1 (semantic label map -> RGB) and the 2-scale PatchGAN discriminator.

Follows Wang et al. 2018 (pix2pixHD) as used by the noise-frequency paper (G1 only, K=2 discriminators):
G1 = reflect-pad conv7 -> n_downsample x (conv3 stride 2) -> n_blocks residual blocks -> n_downsample x
(transposed conv3 stride 2) -> reflect-pad conv7 -> tanh, instance norm (no affine) + ReLU throughout.
Each discriminator is a PatchGAN (n_layers=3, LeakyReLU 0.2) that returns every intermediate feature map so
the trainer can compute the feature-matching loss; the second one sees the input downsampled by 2.
Sizes differ from the paper to fit < 30 MB of weights and CPU training (ngf 32, 3 downsamplings, few blocks);
inputs must be multiples of 2**n_downsample px.

``downsample_padding="reflect"`` pads the strided convs by reflection instead of zeros (the default, which shipped
weights were trained with). On even sizes a stride-2 conv3 with zero padding 1 reads padding only at the top and
left, so the net can locate those two borders: renderer-he-nuclei v3 draws a faint frame about 40 px inside the top
and left edges of every 256 px render. The option changes no weight shape or name, so shipped weights load into it.

``upsample="resize"`` replaces each transposed conv3 stride 2 by nearest-neighbour upsampling x2 then a reflect-padded
conv3 (Odena et al. 2016, "Deconvolution and checkerboard artifacts"). A stride-2 transposed conv3 sums one kernel
tap into even output rows/columns and two into odd ones, so even a uniform input comes out as a period-2 grid: the
checkerboard every shipped renderer draws. Resize-conv weighs every output pixel alike. Its weights differ in shape
([out, in, 3, 3] vs [in, out, 3, 3]), so it trains from scratch, never from transposed-conv weights.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.unet_refiner import init_weights


class ResnetBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _upsample_x2(in_ch: int, out_ch: int, mode: str) -> list[nn.Module]:
    if mode == "resize":
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), nn.Conv2d(in_ch, out_ch, 3)]
    return [nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1)]


class GlobalGenerator(nn.Module):
    def __init__(self, in_channels: int, out_channels: int = 3, ngf: int = 32, n_downsample: int = 3,
                 n_blocks: int = 4, downsample_padding: str = "zeros", upsample: str = "transposed"):
        super().__init__()
        if downsample_padding not in ("zeros", "reflect"):
            raise ValueError(f"downsample_padding must be 'zeros' or 'reflect', got {downsample_padding!r}")
        if upsample not in ("transposed", "resize"):
            raise ValueError(f"upsample must be 'transposed' or 'resize', got {upsample!r}")
        self.size_multiple = 2 ** n_downsample
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), nn.InstanceNorm2d(ngf),
                                   nn.ReLU(True)]
        ch = ngf
        for _ in range(n_downsample):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, padding_mode=downsample_padding),
                       nn.InstanceNorm2d(ch * 2), nn.ReLU(True)]
            ch *= 2
        layers += [ResnetBlock(ch) for _ in range(n_blocks)]
        for _ in range(n_downsample):
            layers += [*_upsample_x2(ch, ch // 2, upsample), nn.InstanceNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        return self.model(label)


class NLayerDiscriminator(nn.Module):
    """PatchGAN with kernel 4, padding 2 (pix2pixHD); forward returns [feat_1, ..., feat_n, score_map]."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        stages = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, stride=2, padding=2), nn.LeakyReLU(0.2, True))]
        ch = ndf
        for n in range(1, n_layers + 1):
            out = min(ch * 2, 512)
            stride = 2 if n < n_layers else 1
            stages.append(nn.Sequential(nn.Conv2d(ch, out, 4, stride=stride, padding=2), nn.InstanceNorm2d(out),
                                        nn.LeakyReLU(0.2, True)))
            ch = out
        stages.append(nn.Sequential(nn.Conv2d(ch, 1, 4, stride=1, padding=2)))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """K PatchGANs at scales 1, 1/2, ...; returns one feature list per scale (full resolution first)."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, num_scales: int = 2):
        super().__init__()
        self.scales = nn.ModuleList(NLayerDiscriminator(in_channels, ndf, n_layers) for _ in range(num_scales))
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        init_weights(self)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        x = torch.cat([condition, image], dim=1)
        outputs = []
        for i, disc in enumerate(self.scales):
            if i > 0:
                x = self.downsample(x)
            outputs.append(disc(x))
        return outputs
