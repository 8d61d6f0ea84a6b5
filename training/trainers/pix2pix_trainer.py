"""pix2pix trainer for the coarse -> fine tissue-mask refiner (PriorPath).

Data: GlaS images; fine = tissue_mask(image, "he") (grayscale < 204); coarse = PriorPath's opening 5x5 then
closing 10x10, or (v2) a recipe drawn per sample from `data.coarsenings` (training.data.coarsening). Optional
generator inputs (v2): the gland layout as a guide channel (`data.guide`) and a N(0, 1) noise channel
(`data.noise`). Objective: LSGAN + lambda_l1 * L1 (pix2pix); D sees concat(condition, fine) where the condition
is the coarse mask (+ guide), never the noise.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from training.data.coarsening import Coarsening
from training.data.datasets import CoarseToFineDataset
from training.data.shared_layout import load_records, split_records
from training.losses import l1_reconstruction_loss, lsgan_loss
from training.models.unet_refiner import PatchDiscriminator, UNetGenerator
from training.trainers.base import GanTrainer, to_uint8_image


def input_channel_names(data: Mapping[str, Any]) -> list[str]:
    """Generator input channels in order; the export's manifest records the same list."""
    return ["coarse"] + (["guide"] if data.get("guide") else []) + (["noise"] if data.get("noise") else [])


def condition_channel_names(data: Mapping[str, Any]) -> list[str]:
    return [name for name in input_channel_names(data) if name != "noise"]


def coarsening_recipes(data: Mapping[str, Any]) -> list[Coarsening]:
    return [Coarsening(**recipe) for recipe in data.get("coarsenings") or ()]


def build_generator(config: Mapping[str, Any]) -> UNetGenerator:
    channels = len(input_channel_names(config["data"]))
    return UNetGenerator(in_channels=channels, out_channels=1, **config["generator"])


def set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class Pix2PixTrainer(GanTrainer):
    def build(self) -> None:
        data = self.config["data"]
        records = [r for name in data["datasets"] for r in load_records(self.data_root, name)]
        split = split_records(records, tuple(data["split_fractions"]), int(data.get("split_seed", self.seed)))
        self.splits = {k: sorted({r.group for r in v}) for k, v in split.items()}

        def dataset(recs, seed, length):
            return CoarseToFineDataset(recs, crop=int(data["crop"]), stain=data.get("stain", "he"),
                                       open_size=int(data.get("open_size", 5)),
                                       close_size=int(data.get("close_size", 10)),
                                       seed=seed, length=length, cache=True,
                                       coarsenings=coarsening_recipes(data), guide=bool(data.get("guide")),
                                       guide_dropout=float(data.get("guide_dropout", 0.0)),
                                       noise=bool(data.get("noise")))

        self.train_set = dataset(split["train"], self.seed, int(data.get("epoch_length", 1000)))
        self.preview_set = dataset(split["val"] or split["train"], self.seed + 1, 4)
        self.test_records = split["test"]
        self.test_set = dataset(split["test"], self.seed + 2, 6) if split["test"] else None
        self.generator = build_generator(self.config)
        self.input_names = input_channel_names(data)
        self.condition_names = condition_channel_names(data)
        self.discriminator = PatchDiscriminator(in_channels=len(self.condition_names) + 1,
                                                **self.config["discriminator"])
        self.lambda_l1 = float(self.train_cfg.get("lambda_l1", 100.0))

    def generator_input(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([batch[name] for name in self.input_names], dim=1)

    def _tensors(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G input, D condition, fine target), channels_last."""
        inputs = self.generator_input(batch).contiguous(memory_format=torch.channels_last)
        condition = torch.cat([batch[name] for name in self.condition_names], dim=1)
        condition = condition.contiguous(memory_format=torch.channels_last)
        return inputs, condition, batch["fine"].contiguous(memory_format=torch.channels_last)

    def _update_discriminator(self, condition: torch.Tensor, fine: torch.Tensor, fake: torch.Tensor
                              ) -> dict[str, float]:
        """One LSGAN D step (PatchGAN on condition + mask)."""
        set_requires_grad(self.discriminator, True)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            loss_d_fake = lsgan_loss(self.discriminator(condition, fake.detach()).float(), False)
            loss_d_real = lsgan_loss(self.discriminator(condition, fine).float(), True)
        (0.5 * (loss_d_fake + loss_d_real)).backward()
        self.opt_d.step()
        return {"d_real": loss_d_real.item(), "d_fake": loss_d_fake.item()}

    def discriminator_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        inputs, condition, fine = self._tensors(batch)
        with torch.no_grad(), self.autocast():
            fake = self.generator(inputs)
        return self._update_discriminator(condition, fine, fake)

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        inputs, condition, fine = self._tensors(batch)
        with self.autocast():
            fake = self.generator(inputs)
        d_losses = self._update_discriminator(condition, fine, fake)

        set_requires_grad(self.discriminator, False)  # G step: no D parameter gradients needed
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            loss_g_gan = lsgan_loss(self.discriminator(condition, fake).float(), True)
        loss_g_l1 = l1_reconstruction_loss(fake.float(), fine, self.lambda_l1)
        (loss_g_gan + loss_g_l1).backward()
        self.opt_g.step()
        return {**d_losses, "g_gan": loss_g_gan.item(), "g_l1": loss_g_l1.item()}

    def visual_row(self, sample: Mapping[str, torch.Tensor], fake: torch.Tensor) -> list[np.ndarray]:
        # thresholded output is what serving hands on (a binary mask); show raw tanh output next to it
        binary = torch.where(fake > 0, 1.0, -1.0)
        return [to_uint8_image(sample["coarse"]), to_uint8_image(sample["fine"]), to_uint8_image(fake),
                to_uint8_image(binary)]
