"""Denoisers for the two diffusion models of issue #9, each with the exported signature
`forward(sample, timestep, condition) -> model_output` (notes/DIFFUSION_CONTRACT.md).

- SpadeUNet (renderer, NASDM / SDM style): the encoder sees only the noisy image; every decoder residual block
  normalises with SPADE - parameter-free GroupNorm, then a per-pixel scale and shift predicted from the class +
  edge condition at that resolution - so the layout steers the denoising at every scale.
- ConcatUNet (renderer baseline): diffusers UNet2DModel with the condition concatenated to the noisy image.
- MaskGeneratorUNet: diffusers UNet2DModel whose time embedding gets a learned linear map of the multi-hot
  nuclei-type vector (+ null flag) added (NASDM: t_updated = t + f(y)), via class_embed_type="identity".

Timesteps are per-row float tensors [batch] so one ONNX call can hold rows at different steps.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from torch import nn


class SpadeNorm(nn.Module):
    """SPADE: GroupNorm(affine=False)(x) * (1 + gamma(c)) + beta(c), gamma/beta 3x3 convs of the condition
    features of this resolution. gamma/beta start at zero, so an untrained block is a plain GroupNorm."""

    def __init__(self, channels: int, hidden: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False, eps=1e-6)
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, cond_features: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (1.0 + self.gamma(cond_features)) + self.beta(cond_features)


class SpadeResBlock(nn.Module):
    """Residual block with SPADE norms; the time embedding scales/shifts after the second norm (scale-shift)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, hidden: int, groups: int) -> None:
        super().__init__()
        self.norm1 = SpadeNorm(in_channels, hidden, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.norm2 = SpadeNorm(out_channels, hidden, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cond_features: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, cond_features)))
        scale, shift = self.time_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h, cond_features) * (1.0 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SpadeUNet(nn.Module):
    """Encoder (diffusers ResnetBlock2D, one per level, then a strided-conv downsample) -> mid (ResNet + attention + ResNet at the lowest level,
    the only attention) -> decoder (two SpadeResBlocks per level, each consuming one skip: the level's ResNet output and the
    downsampled map of the level above / conv_in, as diffusers' skip layout). The condition pyramid
    is average-pooled (keeps thin edge lines as partial values instead of dropping them like nearest would)."""

    def __init__(self, sample_channels: int = 3, condition_channels: int = 6,
                 channels: Sequence[int] = (32, 64, 128), spade_hidden: int = 32, groups: int = 8,
                 attention_head_dim: int = 32) -> None:
        super().__init__()
        channels = list(channels)
        temb = channels[0] * 4
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.conv_in = nn.Conv2d(sample_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [channels[0]]
        previous = channels[0]
        for level, width in enumerate(channels):
            self.down_blocks.append(ResnetBlock2D(in_channels=previous, out_channels=width, temb_channels=temb,
                                                  groups=groups))
            skip_channels.append(width)
            previous = width
            if level < len(channels) - 1:
                self.downsamplers.append(Downsample2D(width, use_conv=True, padding=1))
                skip_channels.append(width)  # the downsampled map is a skip too (as in diffusers' UNet2DModel)
        self.mid = UNetMidBlock2D(in_channels=previous, temb_channels=temb, resnet_groups=groups,
                                  attention_head_dim=attention_head_dim, add_attention=True)
        # One shared condition embedding per resolution (computed once, used by every SPADE norm of that level).
        self.cond_embed = nn.ModuleList(
            nn.Sequential(nn.Conv2d(condition_channels, spade_hidden, 3, padding=1), nn.SiLU()) for _ in channels)
        self.up_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(len(channels))):
            width = channels[level]
            blocks = nn.ModuleList()
            for _ in range(2):
                blocks.append(SpadeResBlock(previous + skip_channels.pop(), width, temb, spade_hidden, groups))
                previous = width
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamplers.append(Upsample2D(width, use_conv=True))
        self.norm_out = nn.GroupNorm(groups, previous, eps=1e-6)
        self.conv_out = nn.Conv2d(previous, sample_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(self.time_proj(timestep.reshape(-1)).to(sample.dtype))
        h = self.conv_in(sample)
        skips = [h]
        for level, block in enumerate(self.down_blocks):
            h = block(h, temb)
            skips.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                skips.append(h)
        h = self.mid(h, temb)
        pyramid = [condition]
        for _ in range(len(self.down_blocks) - 1):
            pyramid.append(F.avg_pool2d(pyramid[-1], 2))
        for i, blocks in enumerate(self.up_blocks):
            level = len(self.up_blocks) - 1 - i
            features = self.cond_embed[level](pyramid[level])
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb, features)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _unet2d(in_channels: int, out_channels: int, channels: Sequence[int], groups: int, attention_head_dim: int,
            **extra: Any) -> UNet2DModel:
    """diffusers UNet2DModel with plain ResNet levels and attention only in the mid block (lowest level)."""
    levels = len(channels)
    return UNet2DModel(in_channels=in_channels, out_channels=out_channels, block_out_channels=tuple(channels),
                       down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                       layers_per_block=1, norm_num_groups=groups, attention_head_dim=attention_head_dim,
                       add_attention=True, **extra)


class ConcatUNet(nn.Module):
    """Renderer baseline: UNet2DModel on concat(noisy image, condition)."""

    def __init__(self, sample_channels: int = 3, condition_channels: int = 6,
                 channels: Sequence[int] = (32, 64, 128), groups: int = 8, attention_head_dim: int = 32) -> None:
        super().__init__()
        self.unet = _unet2d(sample_channels + condition_channels, sample_channels, channels, groups,
                            attention_head_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([sample, condition], dim=1), timestep.reshape(-1), return_dict=False)[0]


class MaskGeneratorUNet(nn.Module):
    """Mask generator: UNet2DModel; condition [batch, K+1] (multi-hot + null flag) -> Linear -> added to the
    time embedding (class_embed_type="identity" passes our embedding through unchanged)."""

    def __init__(self, sample_channels: int = 6, condition_dim: int = 5, channels: Sequence[int] = (32, 64, 128),
                 groups: int = 8, attention_head_dim: int = 32) -> None:
        super().__init__()
        self.unet = _unet2d(sample_channels, sample_channels, channels, groups, attention_head_dim,
                            class_embed_type="identity")
        self.condition_embedding = nn.Linear(condition_dim, channels[0] * 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep.reshape(-1), class_labels=self.condition_embedding(condition),
                         return_dict=False)[0]


ARCHITECTURES = {"spade_unet": SpadeUNet, "concat_unet": ConcatUNet, "mask_unet": MaskGeneratorUNet}


def build_denoiser(model_config: Mapping[str, Any]) -> nn.Module:
    """config `model: {arch: spade_unet | concat_unet | mask_unet, ...constructor kwargs}`."""
    kwargs = dict(model_config)
    arch = kwargs.pop("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown denoiser arch {arch!r}; valid: {sorted(ARCHITECTURES)}")
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    return ARCHITECTURES[arch](**kwargs)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
