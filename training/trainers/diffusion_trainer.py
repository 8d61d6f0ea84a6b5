"""Diffusion trainer (issue #9): mask-conditioned renderer and nuclei-mask generator on CoNSeP crops.

One loop for both (config `data.target`: "image" = renderer, x0 = RGB, spatial condition; "mask" = mask
generator, x0 = one-hot classes + boundary, multi-hot condition). Per step: t ~ U{0..T-1} per row, x_t =
DDPMScheduler.add_noise, target = v (get_velocity) or epsilon, MSE. Classifier-free guidance is trained by
replacing the condition of a random `cond_dropout` share of rows with the null condition (renderer: all zeros;
mask generator: [0,0,0,0,1]). AdamW + linear warmup, grad-norm clip, EMA of the weights (the EMA copy is what
gets exported). Checkpoints (atomic, every `checkpoint_every` steps and at the end) resume exactly.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from services.core.mask_ops import instance_edges
from training.data import diffusion_data as dd
from training.data.shared_layout import load_records, split_records
from training.models.diffusion_denoiser import build_denoiser, parameter_count
from training.trainers.base import (CHECKPOINT_NAME, TrainState, make_grid, restore_rng_states, rng_states,
                                    save_atomically, seed_everything)


def noise_scheduler(diffusion: Mapping[str, Any]) -> DDPMScheduler:
    """Training scheduler from config `diffusion:` (same keys as the manifest's metadata.diffusion)."""
    return DDPMScheduler(num_train_timesteps=int(diffusion.get("num_train_timesteps", 1000)),
                         beta_schedule=diffusion.get("beta_schedule", "squaredcos_cap_v2"),
                         beta_start=float(diffusion.get("beta_start", 1e-4)),
                         beta_end=float(diffusion.get("beta_end", 0.02)),
                         prediction_type=diffusion.get("prediction_type", "v_prediction"),
                         clip_sample=bool(diffusion.get("clip_sample", True)))


def ddim_scheduler(diffusion: Mapping[str, Any]) -> DDIMScheduler:
    return DDIMScheduler.from_config(noise_scheduler(diffusion).config)


def null_condition(target: str, condition: torch.Tensor) -> torch.Tensor:
    """The classifier-free-guidance unconditional input shaped like `condition`."""
    if target == "image":
        return torch.zeros_like(condition)
    null = torch.zeros_like(condition)
    null[:, -1] = 1.0
    return null


def drop_condition(target: str, condition: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each row's condition by the null condition with `probability` (CFG training)."""
    drop = torch.rand(condition.shape[0], generator=generator) < probability
    if not drop.any():
        return condition
    shape = (-1,) + (1,) * (condition.ndim - 1)
    return torch.where(drop.view(shape), null_condition(target, condition), condition)


@torch.no_grad()
def sample_ddim(model: torch.nn.Module, condition: torch.Tensor, shape: tuple[int, ...], diffusion: Mapping[str, Any],
                target: str, steps: int = 20, guidance_scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    """x0 samples [B, *shape] with diffusers' DDIMScheduler (eta 0) and CFG: uncond + s * (cond - uncond)."""
    scheduler = ddim_scheduler(diffusion)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((condition.shape[0], *shape), generator=generator)
    null = null_condition(target, condition)
    for t in scheduler.timesteps:
        timestep = torch.full((x.shape[0],), float(t))
        if guidance_scale == 1.0:
            out = model(x, timestep, condition)
        else:
            both = model(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([condition, null]))
            cond_out, uncond_out = both.chunk(2)
            out = uncond_out + guidance_scale * (cond_out - uncond_out)
        x = scheduler.step(out, t, x).prev_sample
    return x


class EMA:
    """Exponential moving average of parameters with the usual warmup decay min(decay, (1+n)/(10+n))."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def build_splits(config: Mapping[str, Any], data_root: Path) -> dict[str, list]:
    """CoNSeP records split by source tile (grouped), fractions/seed from config data."""
    data = config["data"]
    records = load_records(data_root, data.get("dataset", "consep"))
    return split_records(records, tuple(data.get("split_fractions", (0.8, 0.1, 0.1))), int(data.get("split_seed", 0)))


class DiffusionTrainer:
    """`fit()` trains until train.steps or the time budget; `checkpoint_path()` is <out>/latest.pt."""

    def __init__(self, config: Mapping[str, Any], out_dir: Path, data_root: Path, steps: int | None = None,
                 time_budget_s: float | None = None) -> None:
        self.config = copy.deepcopy(dict(config))
        self.train_cfg = self.config["train"]
        if steps is not None:
            self.train_cfg["steps"] = int(steps)
        self.total_steps = int(self.train_cfg["steps"])
        self.out_dir, self.data_root = Path(out_dir), Path(data_root)
        self.time_budget_s = time_budget_s
        self.seed = int(self.config.get("seed", 0))
        torch.set_num_threads(int(self.train_cfg.get("num_threads", 1)))
        seed_everything(self.seed)
        data = self.config["data"]
        self.target = data["target"]
        if self.target not in ("image", "mask"):
            raise ValueError(f"data.target must be 'image' or 'mask', got {self.target!r}")
        self.split_records = build_splits(self.config, self.data_root)
        self.splits = {name: sorted({r.group for r in recs}) for name, recs in self.split_records.items()}
        self.train_set = dd.DiffusionCrops(self.split_records["train"], int(data["source_crop"]), int(data["factor"]),
                                           seed=self.seed, length=int(data.get("epoch_length", 512)))
        self.model = build_denoiser(self.config["model"])
        self.ema = EMA(self.model, float(self.train_cfg.get("ema_decay", 0.999)))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(self.train_cfg.get("lr", 5e-4)),
                                           weight_decay=float(self.train_cfg.get("weight_decay", 0.0)))
        warmup = int(self.train_cfg.get("warmup_steps", 100))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.scheduler = noise_scheduler(self.config["diffusion"])
        self.generator = torch.Generator().manual_seed(self.seed + 17)
        self.state = TrainState()

    # ------------------------------------------------------------------------------------------- data
    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, condition) tensors for dataset indices."""
        items = [self.train_set[i] for i in indices]
        if self.target == "image":
            x0 = np.stack([it["image"] for it in items])
            cond = np.stack([it["condition"] for it in items])
        else:
            x0 = np.stack([it["mask"] for it in items])
            cond = np.stack([dd.mask_condition(it["types"]) for it in items])
        return torch.from_numpy(x0), torch.from_numpy(cond)

    def _batches(self):
        batch_size = int(self.train_cfg.get("batch_size", 16))
        epoch = self.state.step * batch_size // len(self.train_set)
        while True:
            self.train_set.set_epoch(epoch)
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield self.batch(order[start:start + batch_size].tolist())
            epoch += 1

    # ------------------------------------------------------------------------------------------- step
    def loss(self, model: torch.nn.Module, x0: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        target = (self.scheduler.get_velocity(x0, noise, timesteps)
                  if self.scheduler.config.prediction_type == "v_prediction" else noise)
        condition = drop_condition(self.target, condition, float(self.train_cfg.get("cond_dropout", 0.15)),
                                   self.generator)
        return F.mse_loss(model(x_t, timesteps.float(), condition), target)

    def train_step(self, x0: torch.Tensor, condition: torch.Tensor) -> float:
        loss = self.loss(self.model, x0, condition)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.train_cfg.get("grad_clip", 1.0)))
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.model)
        return float(loss.detach())

    # ------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save_checkpoint(self) -> Path:
        payload = {**self.state.checkpoint_fields(), "config": self.config,
                   "splits": self.splits, "model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                   "ema_updates": self.ema.updates, "optimizer": self.optimizer.state_dict(),
                   "lr_schedule": self.lr_schedule.state_dict(), "rng": rng_states(),
                   "generator": self.generator.get_state(), "parameters": parameter_count(self.model)}
        return save_atomically(payload, self.checkpoint_path())

    def maybe_resume(self) -> bool:
        if not self.checkpoint_path().is_file():
            return False
        payload = torch.load(self.checkpoint_path(), map_location="cpu", weights_only=False)
        self.model.load_state_dict(payload["model"])
        self.ema.model.load_state_dict(payload["ema"])
        self.ema.updates = int(payload["ema_updates"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.lr_schedule.load_state_dict(payload["lr_schedule"])
        restore_rng_states(payload["rng"])
        self.generator.set_state(payload["generator"])
        self.state = TrainState.from_checkpoint(payload)
        return True

    @torch.no_grad()
    def save_preview(self, path: Path, count: int = 4) -> Path:
        """DDIM 20 steps, guidance 2 with the EMA weights on the first training crops (a quick visual check)."""
        x0, cond = self.batch(list(range(count)))
        samples = sample_ddim(self.ema.model, cond, tuple(x0.shape[1:]), self.config["diffusion"], self.target,
                              steps=20, guidance_scale=2.0, seed=self.seed)
        rows = []
        for real, fake, c in zip(x0, samples, cond):
            if self.target == "image":
                rows.append([to_rgb(dd_class_map_of_condition(c)), to_uint8(real), to_uint8(fake)])
            else:
                rows.append([colorize_mask(real.numpy()), colorize_mask(fake.numpy())])
        Image.fromarray(make_grid(rows)).save(path)
        return path

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainState:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        self.state.note_code_version()
        (self.out_dir / "config.json").write_text(json.dumps(self.config, indent=2))
        (self.out_dir / "splits.json").write_text(json.dumps(self.splits, indent=2))
        log_every = int(self.train_cfg.get("log_every", 20))
        ckpt_every = int(self.train_cfg.get("checkpoint_every", 100))
        start, seconds_at_start = time.perf_counter(), self.state.train_seconds
        batches = self._batches()
        running: list[float] = []
        self.model.train()
        with open(self.out_dir / "losses.jsonl", "a") as log:
            log.write(json.dumps({"event": "resumed" if resumed else "start", "step": self.state.step,
                                  "parameters": parameter_count(self.model)}) + "\n")
            while self.state.step < self.total_steps:
                if self.time_budget_s is not None and time.perf_counter() - start > self.time_budget_s:
                    log.write(json.dumps({"event": "time_budget_reached", "step": self.state.step}) + "\n")
                    break
                running.append(self.train_step(*next(batches)))
                self.state.step += 1
                self.state.train_seconds = seconds_at_start + time.perf_counter() - start
                if self.state.step % log_every == 0:
                    log.write(json.dumps({"step": self.state.step, "seconds": round(self.state.train_seconds, 1),
                                          "lr": self.optimizer.param_groups[0]["lr"],
                                          "loss": float(np.mean(running))}) + "\n")
                    log.flush()
                    running.clear()
                if self.state.step % ckpt_every == 0:
                    self.save_checkpoint()
        self.save_checkpoint()
        if self.train_cfg.get("preview", True):
            self.save_preview(self.out_dir / f"samples_{self.state.step:06d}.png")
        return self.state


# ------------------------------------------------------------------------------------------- pictures
_PALETTE = np.array([[20, 20, 20], [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66]], np.uint8)


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 H x W x 3."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def dd_class_map_of_condition(condition: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class map, edge map) back from a renderer condition [6, H, W]."""
    c = np.asarray(condition)
    return np.argmax(c[:dd.NUM_CLASSES], axis=0).astype(np.uint8), c[dd.NUM_CLASSES] > 0.5


def to_rgb(class_and_edges: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Colourised class map with instance edges drawn white."""
    class_map, edges = class_and_edges
    rgb = _PALETTE[class_map].copy()
    rgb[edges & (class_map > 0)] = 255
    return rgb


def colorize_mask(sample: np.ndarray) -> np.ndarray:
    """Mask-generator sample [6, H, W] -> decoded class map coloured, instance borders white."""
    class_map, instances = dd.decode_mask(sample)
    return to_rgb((class_map, (instance_edges(instances) != 0) & (instances > 0)))
