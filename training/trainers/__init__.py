"""Trainers (GANs + the supervised scoring models); the dict in get_trainer maps a config's `trainer` key to its class."""

from __future__ import annotations


def get_trainer(name: str):
    from training.trainers.pix2pix_trainer import Pix2PixTrainer
    from training.trainers.pix2pixhd_trainer import Pix2PixHDTrainer
    from training.trainers.cgan_trainer import CGANTrainer
    from training.trainers.scoring_trainers import EncoderTrainer, SegmenterTrainer

    trainers = {"pix2pix": Pix2PixTrainer, "pix2pixhd": Pix2PixHDTrainer, "cgan": CGANTrainer,
                "encoder": EncoderTrainer, "segmenter": SegmenterTrainer}
    if name not in trainers:
        raise ValueError(f"unknown trainer {name!r}; valid trainers: {sorted(trainers)}")
    return trainers[name]
