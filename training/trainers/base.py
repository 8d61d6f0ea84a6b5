"""Shared training loop for the conditional GANs: seeding, Adam + linear decay, resume, logs, grids, checkpoints.

Subclasses build the generator/discriminator and data (`build`), do one optimisation step (`train_step`) and
turn a batch into a picture row (`visual_row`). Everything else - the part that is the same for pix2pix and
pix2pixHD - lives here once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.provenance import git_commit, note_code_version

CHECKPOINT_NAME = "latest.pt"


def model_store_root() -> Path:
    """The store a warm start reads, found as the servers find theirs (HISTOSYNTH_MODEL_STORE first), with this
    checkout's model_store/ (where `make export-*` writes) as the default whatever the working directory."""
    from services.core.store_location import locate_model_store

    return locate_model_store(cwd=Path(__file__).resolve().parents[2])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every RNG a training step draws from, for a checkpoint (so a resumed run continues the same streams)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def save_atomically(payload: dict, path: Path) -> Path:
    """torch.save to a temp name then rename: a kill mid-save never corrupts the previous checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def linear_decay_lambda(total_steps: int):
    """pix2pix/pix2pixHD schedule: constant lr for the first half, then linearly to 0 at total_steps."""
    half = total_steps // 2

    def factor(step: int) -> float:
        if step < half:
            return 1.0
        return max(0.0, 1.0 - (step - half) / max(1, total_steps - half))

    return factor


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """[C,H,W] tensor in [-1,1] (C = 1 or 3) -> uint8 H x W x 3."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    x = np.transpose(x, (1, 2, 0))
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


def make_grid(rows: list[list[np.ndarray]], pad: int = 4) -> np.ndarray:
    """Rows of equally-sized uint8 HxWx3 tiles -> one image with white gutters."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = tile
    return grid


@dataclass
class TrainState:
    step: int = 0
    train_seconds: float = 0.0
    # {commit, from_step} per stretch of training done by one code version (training/provenance.py).
    code_commits: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, payload: Mapping[str, Any]) -> "TrainState":
        return cls(step=int(payload["step"]), train_seconds=float(payload["train_seconds"]),
                   code_commits=list(payload.get("code_commits") or []))

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"step": self.step, "train_seconds": self.train_seconds, "code_commits": self.code_commits}

    def note_code_version(self) -> None:
        """Record the checkout's commit for the steps about to be trained (call once per start or resume)."""
        self.code_commits = note_code_version(self.code_commits, self.step, git_commit())


class GanTrainer:
    """Override build(), train_step(), visual_row(), generator_inputs()."""

    generator: nn.Module
    discriminator: nn.Module

    def __init__(self, config: Mapping[str, Any], out_dir: Path, data_root: Path, steps: int | None = None,
                 time_budget_s: float | None = None):
        self.config = dict(config)
        self.train_cfg = dict(self.config["train"])
        if steps is not None:
            self.train_cfg["steps"] = int(steps)
        self.config["train"] = self.train_cfg
        self.total_steps = int(self.train_cfg["steps"])
        self.out_dir = Path(out_dir)
        self.data_root = Path(data_root)
        self.time_budget_s = time_budget_s
        self.seed = int(self.config.get("seed", 0))
        torch.set_num_threads(int(self.train_cfg.get("num_threads", 2)))
        seed_everything(self.seed)
        self.splits: dict[str, list[str]] = {}
        self.build()
        self.generator.to(memory_format=torch.channels_last)
        self.discriminator.to(memory_format=torch.channels_last)
        lr, betas = float(self.train_cfg.get("lr", 2e-4)), (float(self.train_cfg.get("beta1", 0.5)), 0.999)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        schedule = linear_decay_lambda(self.total_steps)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, schedule)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, schedule)
        self.state = TrainState()
        # EMA of the generator weights (train.ema_decay, e.g. 0.999): sampled and exported instead of the raw
        # weights, which a GAN's last steps leave noisy. None = no EMA (v1 configs).
        decay = self.train_cfg.get("ema_decay")
        self.ema_decay = None if decay is None else float(decay)
        self.generator_ema: nn.Module | None = None
        if self.ema_decay is not None:
            self.generator_ema = copy.deepcopy(self.generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.generator_ema is None or self.ema_decay is None:
            return
        # Warm-up (as in diffusion trainers): early on the average would be dominated by random init weights.
        decay = min(self.ema_decay, (1 + self.state.step) / (10 + self.state.step))
        for ema_p, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            ema_b.copy_(b)

    def sampling_generator(self) -> nn.Module:
        """The weights that previews and exports use: the EMA when there is one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    # ----------------------------------------------------------------------------------- subclass hooks
    def build(self) -> None:
        """Set self.generator, self.discriminator, self.train_set, self.preview_set, self.splits."""
        raise NotImplementedError

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def discriminator_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One D update against the current G, G untouched (the warm-up after a warm start from the store)."""
        raise NotImplementedError

    def visual_row(self, sample: Mapping[str, torch.Tensor], fake: torch.Tensor) -> list[np.ndarray]:
        raise NotImplementedError

    def generator_input(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- shared machinery
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when `train.precision: bf16` (this CPU has AVX-512 BF16: bf16 matmul ~2.2x fp32);
        weights, optimiser state and losses stay fp32."""
        if self.train_cfg.get("precision", "fp32") == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loader(self, dataset: Dataset) -> Iterator[Mapping[str, torch.Tensor]]:
        batch_size = int(self.train_cfg.get("batch_size", 1))
        epoch = self.state.step * batch_size // max(1, len(dataset))  # resume continues with fresh crops
        while True:  # datasets are sized by `length`; loop over epochs forever, the step count stops training
            for part in getattr(dataset, "datasets", [dataset]):
                part.set_epoch(epoch)  # new crops / noise every epoch, still a pure function of (seed, epoch, index)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True,
                                  generator=generator)
            epoch += 1

    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save_checkpoint(self) -> Path:
        payload = {
            **self.state.checkpoint_fields(),
            "config": self.config,
            "splits": self.splits,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "rng": rng_states(),
            "hardware_threads": torch.get_num_threads(),
        }
        if self.generator_ema is not None:
            payload["generator_ema"] = self.generator_ema.state_dict()
        return save_atomically(payload, self.checkpoint_path())

    def maybe_resume(self) -> bool:
        path = self.checkpoint_path()
        if not path.is_file():
            return False
        payload = torch.load(path, map_location="cpu", weights_only=False)
        self.generator.load_state_dict(payload["generator"])
        self.discriminator.load_state_dict(payload["discriminator"])
        self.opt_g.load_state_dict(payload["opt_g"])
        self.opt_d.load_state_dict(payload["opt_d"])
        self.sched_g.load_state_dict(payload["sched_g"])
        self.sched_d.load_state_dict(payload["sched_d"])
        restore_rng_states(payload["rng"])
        if self.generator_ema is not None:
            # A run that gains EMA on resume starts its average from the current weights.
            self.generator_ema.load_state_dict(payload.get("generator_ema") or payload["generator"])
        self.state = TrainState.from_checkpoint(payload)
        return True

    def maybe_warm_start(self) -> dict[str, Any] | None:
        """Start a new run from earlier weights; returns the log record saying from where (None = random init).

        `train.init_from: <run>`: G, D and EMA from <runs dir>/<run>/latest.pt (the runs dir being this run's
        parent), with fresh optimisers and lr schedule. Used when a later recipe (a new loss) continues an
        earlier one. `train.init_from_store: {model, version}`: G and EMA from that shipped model's ONNX file,
        used when the run named by init_from is not cached (a fresh machine) or init_from is unset; the
        discriminator is not shipped, so it starts fresh and is first trained alone for
        `discriminator_warmup_steps` (feature matching against a random D would only add noise to G)."""
        source = self.train_cfg.get("init_from")
        store_source = self.train_cfg.get("init_from_store")
        path = self.out_dir.parent / str(source) / CHECKPOINT_NAME if source else None
        if path is not None and path.is_file():
            payload = torch.load(path, map_location="cpu", weights_only=False)
            generator_weights = payload.get("generator_ema") or payload["generator"]
            self.generator.load_state_dict(generator_weights)
            self.discriminator.load_state_dict(payload["discriminator"])
            if self.generator_ema is not None:
                self.generator_ema.load_state_dict(generator_weights)
            return {"event": "warm_started", "from": str(path)}
        if store_source:
            from training.trainers.store_weights import load_generator_from_store

            loaded = load_generator_from_store(self.generator, model_store_root(), str(store_source["model"]),
                                               store_source["version"])
            if self.generator_ema is not None:
                self.generator_ema.load_state_dict(self.generator.state_dict())
            return {"event": "warm_started", "from": f"model_store:{loaded.model}/{loaded.version}",
                    "sha256": loaded.sha256, "discriminator": "fresh",
                    **({"run_not_cached": str(path)} if path is not None else {})}
        if path is not None:
            raise FileNotFoundError(f"train.init_from: {path} does not exist; train run {source!r} into "
                                    f"{self.out_dir.parent} first (its config names the command), or name a "
                                    f"shipped model in train.init_from_store")
        return None

    def warm_up_discriminator(self, batches: Iterator[Mapping[str, torch.Tensor]], steps: int) -> dict[str, Any]:
        """Train only D against the (fixed) warm-started G for `steps` batches; not counted as training steps."""
        running: dict[str, list[float]] = {}
        for _ in range(steps):
            for key, value in self.discriminator_step(next(batches)).items():
                running.setdefault(key, []).append(value)
        tail = max(1, steps // 10)
        return {"event": "discriminator_warmup", "steps": steps,
                **{k: round(float(np.mean(v[-tail:])), 4) for k, v in running.items()}}

    @torch.no_grad()
    def save_grid(self, path: Path, n: int = 4) -> Path:
        self.generator.eval()
        generator = self.sampling_generator()
        rows = []
        for i in range(min(n, len(self.preview_set))):
            sample = {k: v.unsqueeze(0) for k, v in self.preview_set[i].items()}
            fake = generator(self.generator_input(sample).contiguous(memory_format=torch.channels_last))
            rows.append(self.visual_row({k: v[0] for k, v in sample.items()}, fake[0]))
        self.generator.train()
        Image.fromarray(make_grid(rows)).save(path)
        return path

    def _fit_schedule_to_budget(self, start_time: float, speed_start: tuple[float, int], log, bar) -> None:
        """With a time budget, shrink total_steps to what the measured speed reaches before the budget ends, so
        the linear lr decay still runs to zero (a cut-off run would stop mid-decay). Speed = mean over the steps of
        this invocation since ``speed_start`` (time, step), so a short load spike on the shared host does not cut
        the run, and one-off work before the loop (a discriminator warm-up) is not taken for step time; the
        budget itself counts from ``start_time``. Never grows the step count."""
        if self.time_budget_s is None:
            return
        now = time.perf_counter()
        speed_time, speed_step = speed_start
        steps_done = self.state.step - speed_step
        if steps_done < 50:
            return
        seconds_per_step = (now - speed_time) / steps_done
        remaining = self.time_budget_s - (now - start_time) - 30.0  # leave time for the final checkpoint + grid
        reachable = self.state.step + int(max(0.0, remaining) / seconds_per_step)
        if reachable >= self.total_steps:
            return
        self.total_steps = max(self.state.step + 1, reachable)
        self.train_cfg["steps"] = self.total_steps
        schedule = linear_decay_lambda(self.total_steps)
        self.sched_g.lr_lambdas = [schedule]
        self.sched_d.lr_lambdas = [schedule]
        bar.total = self.total_steps
        log.write(json.dumps({"event": "steps_rescheduled", "step": self.state.step, "total_steps": self.total_steps,
                              "seconds_per_step": round(seconds_per_step, 4)}) + "\n")

    def fit(self) -> TrainState:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        warm_start = None if resumed else self.maybe_warm_start()
        self.state.note_code_version()
        (self.out_dir / "config.json").write_text(json.dumps(self.config, indent=2))
        (self.out_dir / "splits.json").write_text(json.dumps(self.splits, indent=2))
        log_every = int(self.train_cfg.get("log_every", 10))
        sample_every = int(self.train_cfg.get("sample_every", 500))
        ckpt_every = int(self.train_cfg.get("checkpoint_every", 500))
        batches = self._loader(self.train_set)
        start_time = time.perf_counter()
        seconds_at_start = self.state.train_seconds
        running: dict[str, list[float]] = {}
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=self.config.get("name", "train"),
                   dynamic_ncols=True, mininterval=5.0)
        with open(self.out_dir / "losses.jsonl", "a") as log:
            if resumed:
                log.write(json.dumps({"event": "resumed", "step": self.state.step}) + "\n")
            if warm_start is not None:
                log.write(json.dumps(warm_start) + "\n")
                warmup_steps = int((self.train_cfg.get("init_from_store") or {}).get("discriminator_warmup_steps", 0))
                if warm_start.get("discriminator") == "fresh" and warmup_steps > 0:
                    log.write(json.dumps(self.warm_up_discriminator(batches, warmup_steps)) + "\n")
                    log.flush()
            speed_start = (time.perf_counter(), self.state.step)
            while self.state.step < self.total_steps:
                if self.time_budget_s is not None and time.perf_counter() - start_time > self.time_budget_s:
                    log.write(json.dumps({"event": "time_budget_reached", "step": self.state.step}) + "\n")
                    break
                if self.state.step % 25 == 0:
                    self._fit_schedule_to_budget(start_time, speed_start, log, bar)
                batch = next(batches)
                losses = self.train_step(batch)
                self.update_ema()
                self.sched_g.step()
                self.sched_d.step()
                self.state.step += 1
                self.state.train_seconds = seconds_at_start + time.perf_counter() - start_time
                for key, value in losses.items():
                    running.setdefault(key, []).append(value)
                bar.update(1)
                if self.state.step % log_every == 0 or self.state.step == self.total_steps:
                    means = {k: float(np.mean(v)) for k, v in running.items()}
                    running.clear()
                    record = {"step": self.state.step, "seconds": round(self.state.train_seconds, 2),
                              "lr": self.opt_g.param_groups[0]["lr"], **means}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
                if self.state.step % sample_every == 0:
                    self.save_grid(self.out_dir / f"samples_{self.state.step:06d}.png")
                if self.state.step % ckpt_every == 0:
                    self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self.save_grid(self.out_dir / f"samples_{self.state.step:06d}.png")
        return self.state
