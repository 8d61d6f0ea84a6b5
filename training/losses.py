"""GAN losses shared by the pix2pix and pix2pixHD trainers.

LSGAN (Mao et al. 2017): MSE of discriminator scores against 1 (real) / 0 (fake), used by both papers'
discriminators. Feature matching (pix2pixHD eq. 4): L1 between discriminator features of the real and the
generated image, every layer but the score map, weighted 4/(n_layers+1) per layer and 1/num_scales per scale,
times lambda_feat (10 in pix2pixHD). L1 reconstruction for pix2pix with lambda 100. No VGG loss: no pretrained
weights can be downloaded here.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Scores = torch.Tensor | Sequence[Sequence[torch.Tensor]]


def _score_maps(scores: Scores) -> list[torch.Tensor]:
    """A single PatchGAN gives one score map; a multiscale D gives feature lists whose last entry is the score."""
    if isinstance(scores, torch.Tensor):
        return [scores]
    return [features[-1] for features in scores]


def lsgan_loss(scores: Scores, target_is_real: bool) -> torch.Tensor:
    """Sum over scales of mean((D - target)^2)."""
    target = 1.0 if target_is_real else 0.0
    return sum(F.mse_loss(s, torch.full_like(s, target)) for s in _score_maps(scores))


def feature_matching_loss(fake_features: Sequence[Sequence[torch.Tensor]],
                          real_features: Sequence[Sequence[torch.Tensor]], lambda_feat: float = 10.0) -> torch.Tensor:
    num_scales = len(fake_features)
    loss = fake_features[0][0].new_zeros(())
    for fake_scale, real_scale in zip(fake_features, real_features):
        n_layers = len(fake_scale) - 1  # last entry is the score map
        layer_weight = 4.0 / n_layers  # pix2pixHD: 4 / (n_layers_D + 1), where its n_layers excludes the first conv
        for fake, real in zip(fake_scale[:-1], real_scale[:-1]):
            loss = loss + (1.0 / num_scales) * layer_weight * F.l1_loss(fake, real.detach())
    return loss * lambda_feat


def l1_reconstruction_loss(fake: torch.Tensor, real: torch.Tensor, lambda_l1: float = 100.0) -> torch.Tensor:
    return F.l1_loss(fake, real) * lambda_l1


def mask_consistency_loss(logits: torch.Tensor, class_map: torch.Tensor,
                          allowed: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean -log P(the segmenter finds what the mask says) over pixels, for a frozen segmenter run on a render.

    `allowed[c]` = the segmenter classes that count as renderer class c (e.g. an untyped MoNuSeg nucleus is any
    of the four CoNSeP types), so P = the sum of those classes' probabilities (a logsumexp of log-probabilities).
    The gradient reaches the renderer through the segmenter: renders whose nuclei a segmenter cannot find where
    the mask puts them cost more, which is exactly what makes a render useless as training data.
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    num_segmenter_classes = logits.shape[1]
    membership = torch.full((len(allowed), num_segmenter_classes), float("-inf"), device=logits.device)
    for renderer_class, segmenter_classes in enumerate(allowed):
        membership[renderer_class, list(segmenter_classes)] = 0.0
    # [B, R, S, H, W] would be large; gather per renderer class instead: mask[b, h, w] = membership[class_map]
    per_pixel_mask = membership[class_map.long()].permute(0, 3, 1, 2)  # [B, S, H, W], 0 or -inf
    log_p = torch.logsumexp(log_probs + per_pixel_mask, dim=1)
    return -log_p.mean()


def nucleus_area_loss(logits: torch.Tensor, class_map: torch.Tensor, floor_pixels: float = 64.0) -> torch.Tensor:
    """Relative error of the nucleus area a frozen segmenter sees in a render vs the mask's, mean over images.

    Area seen = the sum over pixels of P(not background) (segmenter class 0 is background in both nuclei schemes);
    mask area = the pixels of renderer classes > 0. Why: renderers trained longer with the consistency terms drew
    nuclei smaller than their masks (candidates v4 and v6: a segmenter trained on their renders alone predicted
    0.74-1.01 of the true nucleus pixels while counting objects right), which per-pixel cross-entropy tolerates as
    long as the pixels still lean "nucleus". |seen - mask| / (mask + floor) asks the whole nucleus to be drawn; the
    floor keeps images with (almost) no nuclei from dominating.
    """
    nucleus = 1.0 - F.softmax(logits.float(), dim=1)[:, 0]
    seen = nucleus.flatten(1).sum(1)
    mask = (class_map > 0).flatten(1).sum(1).float()
    return ((seen - mask).abs() / (mask + floor_pixels)).mean()


def boundary_consistency_loss(logits: torch.Tensor, target: torch.Tensor, boundary_weight: float = 2.0) -> torch.Tensor:
    """Boundary-weighted cross-entropy of a frozen 3-class nucleus segmenter run on a render.

    `logits` [B, 3, H, W] come from a segmenter trained on real tiles to predict background / nucleus interior /
    inner boundary of each instance (scheme `nuclei_boundary`); `target` [B, H, W] is that 3-class map of the mask
    the render was conditioned on (training/data/instance_targets.three_class_target). Why: the type-class
    mask_consistency_loss only asks nucleus pixels to look like nucleus, so two touching nuclei may render as one
    blob; a downstream segmenter trained on such renders learns weak boundaries and merges touching nuclei (higher
    pixel Dice, lower object F1 / AJI on the benchmark). Here the render must show the separation the instance map
    says is there. Class weights (1, 1, boundary_weight) with the weighted mean sum(w * nll) / sum(w) are exactly
    the downstream segmenter's loss (boundary weight 2, training/experiments/downstream.py), so the renderer is
    scored as the benchmark's segmenter will learn from it.
    """
    if logits.shape[1] != 3:
        raise ValueError(f"boundary_consistency_loss expects 3-class logits, got {logits.shape[1]} classes")
    weights = torch.tensor([1.0, 1.0, float(boundary_weight)], device=logits.device)
    return F.cross_entropy(logits.float(), target.long(), weight=weights)
