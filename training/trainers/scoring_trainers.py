"""Supervised trainers for the scoring models: `encoder` (histology-encoder) and `segmenter` (tissue segmenters).

Same run-directory conventions as the GAN trainers (base.py): <out>/latest.pt (atomic, resumable), losses.jsonl,
config.json, splits.json; a time budget shrinks the step count to what the measured speed reaches, so the cosine
learning-rate decay still ends at its floor instead of being cut off mid-way.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data.scoring_data import (
    ENCODER_CLASSES,
    TISSUE_TYPES,
    EncoderBatchSampler,
    SegmenterBatchSampler,
    load_patch_records,
    load_scheme_records,
    records_by_split_names,
    segmentation_scheme,
    split_per_dataset,
)
from training.data.shared_layout import load_records
from training.models.histology_encoder import EncoderConfig, HistologyEncoder
from training.models.tissue_segmenter import SegmenterConfig, TissueSegmenter
from training.trainers.base import (
    CHECKPOINT_NAME,
    TrainState,
    restore_rng_states,
    rng_states,
    save_atomically,
    seed_everything,
)

WARMUP_STEPS = 20


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 255] (the models' serving input range)."""
    if not images.flags.writeable:  # PIL-backed arrays are read-only; torch.from_numpy wants writable memory
        images = images.copy()
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()


class SupervisedTrainer:
    """Subclasses implement build() (sets self.model, self.splits) and train_step(step) -> losses."""

    model: nn.Module

    def __init__(self, config: Mapping[str, Any], out_dir: Path, data_root: Path, steps: int | None = None,
                 time_budget_s: float | None = None) -> None:
        self.config = json.loads(json.dumps(dict(config)))  # deep, plain copy (stored in the checkpoint)
        self.train_cfg = self.config["train"]
        if steps is not None:
            self.train_cfg["steps"] = int(steps)
        self.total_steps = int(self.train_cfg["steps"])
        self.max_steps = self.total_steps  # a time budget may lower total_steps, never above this
        self.out_dir = Path(out_dir)
        self.data_root = Path(data_root)
        self.time_budget_s = time_budget_s
        self.seed = int(self.config.get("seed", 0))
        torch.set_num_threads(int(self.train_cfg.get("num_threads", 1)))
        seed_everything(self.seed)
        self.splits: dict[str, list[str]] = {}
        self.build()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(self.train_cfg.get("lr", 1e-3)),
                                           weight_decay=float(self.train_cfg.get("weight_decay", 1e-4)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.state = TrainState()

    # ------------------------------------------------------------------------------------- hooks
    def build(self) -> None:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- machinery
    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine to 5 % of the base rate at total_steps (read live: budgets shrink it)."""
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = min(1.0, (step - WARMUP_STEPS) / max(1, self.total_steps - WARMUP_STEPS))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save_checkpoint(self) -> Path:
        payload = {
            **self.state.checkpoint_fields(),
            "total_steps": self.total_steps,
            "config": self.config,
            "splits": self.splits,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states(),
            "hardware_threads": torch.get_num_threads(),
        }
        return save_atomically(payload, self.checkpoint_path())

    def maybe_resume(self) -> bool:
        path = self.checkpoint_path()
        if not path.is_file():
            return False
        payload = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        restore_rng_states(payload["rng"])
        self.total_steps = max(int(payload.get("total_steps", self.total_steps)), self.total_steps)
        self.state = TrainState.from_checkpoint(payload)
        return True

    def _fit_steps_to_budget(self, start: float, recent: list[tuple[int, float]], log) -> None:
        """Every 20 steps, set total_steps to what the rest of the budget reaches at the speed of the last ~100
        steps (the shared host's load changes within minutes; the first steps also pay for image decoding), never
        above the configured steps."""
        if self.time_budget_s is None or self.state.step % 20:
            return
        now = time.perf_counter()
        recent.append((self.state.step, now))
        del recent[:-6]
        if len(recent) < 2:
            return
        (first_step, first_t), (last_step, last_t) = recent[0], recent[-1]
        seconds_per_step = (last_t - first_t) / max(1, last_step - first_step)
        remaining = self.time_budget_s - (now - start) - 10.0
        reachable = self.state.step + int(max(0.0, remaining) / seconds_per_step)
        total = max(self.state.step + 1, min(self.max_steps, reachable))
        if total != self.total_steps:
            self.total_steps = total
            self.train_cfg["steps"] = total
            log.write(json.dumps({"event": "steps_rescheduled", "step": self.state.step, "total_steps": total,
                                  "seconds_per_step": round(seconds_per_step, 4)}) + "\n")

    def fit(self) -> TrainState:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        self.state.note_code_version()
        (self.out_dir / "config.json").write_text(json.dumps(self.config, indent=2))
        (self.out_dir / "splits.json").write_text(json.dumps(self.splits, indent=2))
        log_every = int(self.train_cfg.get("log_every", 10))
        checkpoint_every = int(self.train_cfg.get("checkpoint_every", 100))
        start = time.perf_counter()
        seconds_at_start = self.state.train_seconds
        recent: list[tuple[int, float]] = []
        running: dict[str, list[float]] = {}
        self.model.train()
        with open(self.out_dir / "losses.jsonl", "a") as log:
            if resumed:
                log.write(json.dumps({"event": "resumed", "step": self.state.step}) + "\n")
            while self.state.step < self.total_steps:
                if self.time_budget_s is not None and time.perf_counter() - start > self.time_budget_s:
                    log.write(json.dumps({"event": "time_budget_reached", "step": self.state.step}) + "\n")
                    break
                losses = self.train_step(self.state.step)
                self.scheduler.step()
                self.state.step += 1
                self.state.train_seconds = seconds_at_start + time.perf_counter() - start
                for key, value in losses.items():
                    running.setdefault(key, []).append(value)
                if self.state.step % log_every == 0 or self.state.step == self.total_steps:
                    record = {"step": self.state.step, "seconds": round(self.state.train_seconds, 2),
                              "lr": self.optimizer.param_groups[0]["lr"],
                              **{k: float(np.mean(v)) for k, v in running.items()}}
                    running.clear()
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.state.step % checkpoint_every == 0:
                    self.save_checkpoint()
                self._fit_steps_to_budget(start, recent, log)
        self.save_checkpoint()
        return self.state


# ============================================================================================= encoder
def build_encoder(config: Mapping[str, Any]) -> HistologyEncoder:
    model_cfg = config["model"]
    return HistologyEncoder(EncoderConfig(
        num_classes=len(ENCODER_CLASSES), num_tissue_types=len(TISSUE_TYPES),
        widths=tuple(model_cfg.get("widths", (32, 64, 128, 256))),
        blocks_per_stage=int(model_cfg.get("blocks_per_stage", 1)),
        input_size=int(model_cfg.get("input_size", 128))))


def encoder_splits(data_root: Path, data_cfg: Mapping[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """(patch splits, other-dataset splits), each {train, val, test}, grouped by patient / source tile."""
    fractions, seed = data_cfg["split_fractions"], int(data_cfg.get("split_seed", 0))
    patches = split_per_dataset(load_patch_records(data_root), fractions, seed)
    others: list = []
    for dataset in data_cfg.get("tissue_type_datasets", []):
        others.extend(load_records(data_root, dataset))
    other_fractions = data_cfg.get("tissue_type_split_fractions", {})
    other_splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for dataset in sorted({r.dataset for r in others}):
        part = split_per_dataset([r for r in others if r.dataset == dataset],
                                 other_fractions.get(dataset, fractions), seed)
        for name, rows in part.items():
            other_splits[name].extend(rows)
    return patches, other_splits


class EncoderTrainer(SupervisedTrainer):
    def build(self) -> None:
        data_cfg = self.config["data"]
        self.patch_splits, self.other_splits = encoder_splits(self.data_root, data_cfg)
        self.splits = {"patches": records_by_split_names(self.patch_splits),
                       "tissue_type": records_by_split_names(self.other_splits)}
        self.sampler = EncoderBatchSampler(self.patch_splits["train"], self.other_splits["train"],
                                           batch_size=int(self.train_cfg["batch_size"]), seed=self.seed,
                                           other_fraction=float(data_cfg.get("other_fraction", 0.25)),
                                           jitter=int(data_cfg.get("jitter", 32)))
        self.model = build_encoder(self.config)
        self.tissue_weight = float(self.train_cfg.get("tissue_weight", 0.5))

    def train_step(self, step: int) -> dict[str, float]:
        images, classes, tissues = self.sampler.batch(step)
        x = images_to_tensor(images)
        classes_t, tissues_t = torch.from_numpy(classes), torch.from_numpy(tissues)
        features, logits = self.model(x)
        labelled = classes_t >= 0
        class_loss = F.cross_entropy(logits[labelled], classes_t[labelled])
        tissue_loss = F.cross_entropy(self.model.tissue_logits(features), tissues_t)
        loss = class_loss + self.tissue_weight * tissue_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        accuracy = (logits[labelled].argmax(1) == classes_t[labelled]).float().mean()
        return {"loss": loss.item(), "class_ce": class_loss.item(), "tissue_ce": tissue_loss.item(),
                "class_acc": accuracy.item()}


# ============================================================================================= segmenter
def build_segmenter(config: Mapping[str, Any]) -> TissueSegmenter:
    scheme = segmentation_scheme(config["data"]["scheme"])
    model_cfg = config["model"]
    return TissueSegmenter(SegmenterConfig(num_classes=len(scheme.class_names),
                                           base_channels=int(model_cfg.get("base_channels", 16)),
                                           depth=int(model_cfg.get("depth", 3))))


def segmenter_splits(data_root: Path, data_cfg: Mapping[str, Any]) -> dict[str, list]:
    scheme = segmentation_scheme(data_cfg["scheme"])
    return split_per_dataset(load_scheme_records(data_root, scheme), data_cfg["split_fractions"],
                             int(data_cfg.get("split_seed", 0)), held_back=data_cfg.get("held_back"))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, partial: torch.Tensor,
                      foreground_classes: tuple[int, ...], dice_weight: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy (+ soft Dice on fully labelled items).

    Items flagged `partial` only know nucleus (target > 0) vs background: their nucleus pixels are scored by
    log P(any foreground class) = logsumexp of the foreground log-probabilities, so untyped MoNuSeg nuclei teach
    "nucleus" without claiming any CoNSeP type.
    """
    log_probs = F.log_softmax(logits, dim=1)
    target = target.long()
    full_nll = -log_probs.gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
    if partial.any():
        foreground = torch.logsumexp(log_probs[:, list(foreground_classes)], dim=1)
        partial_nll = torch.where(target > 0, -foreground, -log_probs[:, 0])
        nll = torch.where(partial.view(-1, 1, 1), partial_nll, full_nll)
    else:
        nll = full_nll
    ce = nll.mean()
    parts = {"ce": ce.item()}
    loss = ce
    full = ~partial
    if dice_weight > 0 and full.any():
        probs = log_probs[full].exp()
        onehot = F.one_hot(target[full], logits.shape[1]).permute(0, 3, 1, 2).float()
        intersection = (probs * onehot).sum(dim=(0, 2, 3))
        denominator = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
        present = onehot.sum(dim=(0, 2, 3)) > 0  # classes absent from the batch would only add noise
        dice = (2 * intersection + 1.0) / (denominator + 1.0)
        dice_loss = 1.0 - dice[present].mean()
        loss = loss + dice_weight * dice_loss
        parts["dice_loss"] = dice_loss.item()
    return loss, parts


class SegmenterTrainer(SupervisedTrainer):
    def build(self) -> None:
        data_cfg = self.config["data"]
        self.scheme = segmentation_scheme(data_cfg["scheme"])
        self.record_splits = segmenter_splits(self.data_root, data_cfg)
        self.splits = records_by_split_names(self.record_splits)
        self.sampler = SegmenterBatchSampler(self.record_splits["train"], self.scheme,
                                             batch_size=int(self.train_cfg["batch_size"]),
                                             crop=int(data_cfg["crop"]), seed=self.seed)
        self.model = build_segmenter(self.config)
        self.dice_weight = float(self.train_cfg.get("dice_weight", 0.5))

    def train_step(self, step: int) -> dict[str, float]:
        images, targets, partial = self.sampler.batch(step)
        logits = self.model(images_to_tensor(images))
        loss, parts = segmentation_loss(logits, torch.from_numpy(targets), torch.from_numpy(partial),
                                        self.scheme.foreground_classes, self.dice_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), **parts}
