"""Class-conditioned latent-to-image GAN for 128x128 H&E patches (one file, read top to bottom).

Follows the latent-to-image cGAN of Andrei & Ionescu (2025, "Synthetic histopathology lymphocyte images
augmentation using conditional GANs", shared/papers/cgan-lymphocyte-latent-to-image.txt) where the paper is
specific, and DCGAN / SNGAN practice where it is not:

Generator (paper: "a concatenate layer is used for the latent vector and the labels, and the result is reshaped
and used as input for the first deconvolutional layer"; "5 deconvolutional layers, kernel (4,4), stride 2";
"LeakyReLU 0.2"; "the last ... uses hyperbolic tangent"):
    [z (latent_dim) ; class embedding] -> Linear -> reshape to C0 x 4 x 4
    -> 5 x ConvTranspose(k4, s2, p1): 4 -> 8 -> 16 -> 32 -> 64 -> 128 px, LeakyReLU(0.2) between, tanh at the end.
  Deviations, and why: the paper uses 128 filters in every layer; we taper the widths (wide at 4x4, narrow at 64x64)
  because the cost of a 128-filter layer at 64x64 and 128x128 dominates and we train on 1 CPU thread. BatchNorm
  after each hidden deconvolution (DCGAN) because it makes the first few thousand CPU steps far more stable; at
  export the model is in eval mode, so every sample is independent of its batch (serving determinism).
  A learned embedding concatenated to z equals the paper's one-hot concatenation followed by the first linear map.

Discriminator (paper: "5 convolutional blocks ... 4x4, stride 2, followed by LeakyReLU; the last convolution
layer is flattened and then fed into a sigmoid output"; "symmetrically conditioned"):
    x (3 x 128 x 128) -> 5 x [Conv(k4, s2, p1), LeakyReLU(0.2)]: 128 -> 64 -> 32 -> 16 -> 8 -> 4 px -> flatten h
    logit = w . h + b + <embed(y), h>            (projection discriminator, Miyato & Koyama 2018)
  The projection term is how the class conditions D (instead of concatenating label maps to the input); spectral
  normalisation on every layer keeps D Lipschitz-bounded so the paper's Adam(2e-4, beta1=0.5) stays stable.
  The sigmoid lives in the loss (BCE-with-logits), which is the paper's cross-entropy in a numerically safe form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

IMAGE_SIZE = 128
IMAGE_CHANNELS = 3
_START_SIZE = 4  # 4 * 2**5 == 128: five stride-2 layers span 4x4 <-> 128x128


@dataclass(frozen=True)
class PatchGANConfig:
    """Architecture hyper-parameters (all saved in checkpoints and the exported manifest)."""

    num_classes: int
    latent_dim: int = 128
    class_embed_dim: int = 64
    # Input channels of the five generator deconvolutions (4, 8, 16, 32, 64 px); output is always 3 channels.
    generator_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 16)
    # Output channels of the five discriminator convolutions (64, 32, 16, 8, 4 px).
    discriminator_channels: tuple[int, int, int, int, int] = (16, 32, 64, 128, 256)
    leaky_slope: float = 0.2

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.generator_channels) != 5 or len(self.discriminator_channels) != 5:
            raise ValueError(
                "generator_channels and discriminator_channels need 5 entries each (5 stride-2 layers), got "
                f"{self.generator_channels} and {self.discriminator_channels}"
            )


class PatchGenerator(nn.Module):
    """(z [B, latent_dim] float32, class_id [B] int64) -> image [B, 3, 128, 128] in [-1, 1]."""

    def __init__(self, config: PatchGANConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.generator_channels
        self.class_embedding = nn.Embedding(config.num_classes, config.class_embed_dim)
        self.project = nn.Linear(config.latent_dim + config.class_embed_dim, widths[0] * _START_SIZE * _START_SIZE)
        self.project_norm = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        for in_channels, out_channels in zip(widths[:-1], widths[1:]):
            layers += [
                nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(config.leaky_slope),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], IMAGE_CHANNELS, 4, stride=2, padding=1), nn.Tanh()]
        self.upsample = nn.Sequential(*layers)
        self.act = nn.LeakyReLU(config.leaky_slope)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        conditioned = torch.cat([z, self.class_embedding(class_id)], dim=1)
        h = self.project(conditioned).view(z.shape[0], self.config.generator_channels[0], _START_SIZE, _START_SIZE)
        return self.upsample(self.act(self.project_norm(h)))


class PatchDiscriminator(nn.Module):
    """(image [B, 3, 128, 128], class_id [B]) -> real/fake logit [B] (projection discriminator)."""

    def __init__(self, config: PatchGANConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        in_channels = IMAGE_CHANNELS
        for out_channels in config.discriminator_channels:
            blocks += [
                spectral_norm(nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)),
                nn.LeakyReLU(config.leaky_slope),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        feature_dim = config.discriminator_channels[-1] * _START_SIZE * _START_SIZE
        self.unconditional_head = spectral_norm(nn.Linear(feature_dim, 1))
        self.class_projection = spectral_norm(nn.Embedding(config.num_classes, feature_dim))

    def forward(self, image: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        h = self.features(image).flatten(1)
        return self.unconditional_head(h).squeeze(1) + (self.class_projection(class_id) * h).sum(dim=1)


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) weights, BatchNorm gamma ~ N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def parameter_bytes(module: nn.Module) -> int:
    """fp32 size of the parameters and buffers (what the exported ONNX file roughly weighs)."""
    return sum(t.numel() * 4 for t in list(module.parameters()) + list(module.buffers()))
