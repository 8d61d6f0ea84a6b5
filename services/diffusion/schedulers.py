"""Diffusion sampling schedulers in numpy: DDIM (eta = 0) and DPM-Solver++ 2M (multistep).

They re-implement diffusers' DDIMScheduler and DPMSolverMultistepScheduler (algorithm_type
"dpmsolver++", solver_order 2, midpoint, lower_order_final, final_sigmas_type "zero") for the
serving path, which must not import torch; tests/unit/diffusion/test_schedulers_parity.py checks
them against diffusers at 10/20/50 steps.

Split in two on purpose:
  * NoiseSchedule: the model's training noise schedule (betas -> alphas_cumprod) and sampling
    options, read once from the manifest and shared by every request of a model;
  * a scheduler *state* per request (DDIMState / DPMSolverPPState): its timesteps, its step
    index and, for DPM-Solver++, the previous x0 prediction. Step-level batching runs requests
    at different timesteps in one denoiser call, so no state may live in a shared object.

Arithmetic follows diffusers' float32 tensors (coefficients as float32 scalars, samples float32),
so results agree to ~1e-6; it is elementwise numpy, so a request's result never depends on what
else is being sampled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import numpy as np

BETA_SCHEDULES: Final = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES: Final = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS: Final = ("leading", "trailing", "linspace")
DDIM: Final = "ddim"
DPM_SOLVER_PP: Final = "dpmsolver++"
SCHEDULERS: Final = (DDIM, DPM_SOLVER_PP)
MIN_STEPS: Final = 1
MAX_STEPS: Final = 1000

Spacing = Literal["leading", "trailing", "linspace"]


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """float32 betas exactly as diffusers builds them (linspace in float32; cosine via alpha_bar)."""
    if schedule == "linear":
        return _torch_like_linspace(beta_start, beta_end, num_train_timesteps)
    if schedule == "scaled_linear":
        return _torch_like_linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
            for i in range(num_train_timesteps)
        ]
        return np.asarray(betas, dtype=np.float32)
    raise ValueError(f"beta_schedule {schedule!r} is not supported; valid: {', '.join(BETA_SCHEDULES)}")


def _torch_like_linspace(start: float, end: float, count: int) -> np.ndarray:
    # torch.linspace(dtype=float32) computes start + i * step in float32 from both ends; numpy's
    # float64 linspace cast to float32 agrees to 1 ulp, far inside the parity tolerance.
    return np.linspace(start, end, count, dtype=np.float64).astype(np.float32)


@dataclass(frozen=True)
class NoiseSchedule:
    """A model's training noise schedule plus how to sample it (manifest ``metadata.diffusion``).

    ``timestep_spacing`` defaults to "leading", diffusers' DDIM default and what the training side
    samples with (DDIMScheduler.from_config of the training DDPMScheduler), so served images follow
    the distribution the model card was evaluated on. A manifest may ask for "trailing" (starts at
    t = T - 1, better with very few steps; Lin et al. 2023) or "linspace".
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: Spacing = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    lambda_min_clipped: float = -math.inf
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
        if self.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        alphas_cumprod = np.cumprod(np.float32(1.0) - betas, dtype=np.float32)
        alphas_cumprod.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)

    @classmethod
    def from_metadata(cls, diffusion: Mapping[str, Any]) -> NoiseSchedule:
        """From a manifest's ``metadata.diffusion`` mapping (keys as in notes/DIFFUSION_CONTRACT.md)."""
        known = {
            "num_train_timesteps": int, "beta_schedule": str, "beta_start": float, "beta_end": float,
            "prediction_type": str, "clip_sample": bool, "clip_sample_range": float,
            "timestep_spacing": str, "steps_offset": int, "set_alpha_to_one": bool, "lambda_min_clipped": float,
        }
        values = {key: convert(diffusion[key]) for key, convert in known.items() if diffusion.get(key) is not None}
        return cls(**values)

    def check_steps(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise ValueError(f"steps must be an integer, got {steps!r}")
        upper = min(MAX_STEPS, self.num_train_timesteps)
        if not MIN_STEPS <= steps <= upper:
            raise ValueError(f"steps must be in {MIN_STEPS}..{upper}, got {steps}")

    def clip(self, x0: np.ndarray) -> np.ndarray:
        if not self.clip_sample:
            return x0
        bound = np.float32(self.clip_sample_range)
        return np.clip(x0, -bound, bound)


class SchedulerState(Protocol):
    """One request's sampler: the timesteps it still has to visit and how to step."""

    timesteps: np.ndarray

    @property
    def done(self) -> bool: ...

    @property
    def timestep(self) -> int:
        """The training timestep of the next denoiser call."""
        ...

    def step(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x_t -> x_{t_prev} given the (guided) model output at ``timestep``; advances the state."""
        ...

    @property
    def steps_done(self) -> int: ...


def _f32(value: float | np.floating) -> np.float32:
    return np.float32(value)


class _TimestepCursor:
    """Where a request is in its timestep list (shared by every scheduler state)."""

    timesteps: np.ndarray
    _index: int

    @property
    def done(self) -> bool:
        return self._index >= len(self.timesteps)

    @property
    def steps_done(self) -> int:
        return self._index

    @property
    def timestep(self) -> int:
        return int(self.timesteps[self._index])


class DDIMState(_TimestepCursor):
    """DDIM with eta = 0 (deterministic), diffusers' DDIMScheduler.step semantics."""

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        schedule.check_steps(steps)
        self.schedule = schedule
        self.steps = steps
        self.timesteps = ddim_timesteps(schedule, steps)
        self._index = 0

    def step(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        schedule = self.schedule
        timestep = self.timestep
        # diffusers derives the previous timestep from the ratio, not from the list (matters for "trailing").
        prev_timestep = timestep - schedule.num_train_timesteps // self.steps
        acp = schedule.alphas_cumprod
        alpha_prod_t = acp[timestep]
        if prev_timestep >= 0:
            alpha_prod_prev = acp[prev_timestep]
        else:
            alpha_prod_prev = _f32(1.0) if schedule.set_alpha_to_one else acp[0]
        beta_prod_t = _f32(1.0) - alpha_prod_t
        sqrt_alpha_t, sqrt_beta_t = _f32(alpha_prod_t**0.5), _f32(beta_prod_t**0.5)
        if schedule.prediction_type == "epsilon":
            x0 = (sample - sqrt_beta_t * model_output) / sqrt_alpha_t
            epsilon = model_output
        else:  # v_prediction
            x0 = sqrt_alpha_t * sample - sqrt_beta_t * model_output
            epsilon = sqrt_alpha_t * model_output + sqrt_beta_t * sample
        x0 = schedule.clip(x0)
        direction = _f32((_f32(1.0) - alpha_prod_prev) ** 0.5) * epsilon
        self._index += 1
        return (_f32(alpha_prod_prev**0.5) * x0 + direction).astype(np.float32, copy=False)


def ddim_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    total = schedule.num_train_timesteps
    if schedule.timestep_spacing == "linspace":
        timesteps = np.linspace(0, total - 1, steps).round()[::-1].astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        ratio = total // steps
        timesteps = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
    else:  # trailing
        timesteps = np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
    return timesteps.copy()


class DPMSolverPPState(_TimestepCursor):
    """DPM-Solver++ 2M (midpoint), diffusers' DPMSolverMultistepScheduler with its defaults.

    First-order (= DDIM) on the first step and on the last step (final sigma 0, so diffusers'
    ``lower_order_final`` always applies); second-order multistep otherwise, using this request's
    previous x0 prediction.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        schedule.check_steps(steps)
        self.schedule = schedule
        self.timesteps, sigmas = dpm_timesteps_and_sigmas(schedule, steps)
        # alpha_t, sigma_t and lambda_t per sigma, in float32 like diffusers' _sigma_to_alpha_sigma_t.
        self._alpha = (_f32(1.0) / np.sqrt(sigmas**2 + _f32(1.0))).astype(np.float32)
        self._sigma = (sigmas * self._alpha).astype(np.float32)
        with np.errstate(divide="ignore"):  # the final sigma is 0: lambda = +inf, handled in step()
            self._lambda = (np.log(self._alpha) - np.log(self._sigma)).astype(np.float32)
        self._index = 0
        self._previous_x0: np.ndarray | None = None

    def step(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i, count = self._index, len(self.timesteps)
        alpha_s0, sigma_s0 = self._alpha[i], self._sigma[i]
        if self.schedule.prediction_type == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        else:  # v_prediction
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        # diffusers has no clip_sample here; its thresholding with sample_max_value=1 is the same clip.
        x0 = self.schedule.clip(x0).astype(np.float32, copy=False)
        final = i == count - 1  # final sigma is 0 ("zero"): always a first-order step
        previous, self._previous_x0 = self._previous_x0, x0
        self._index += 1
        if final:
            # sigma_t = 0, alpha_t = 1: x_t = 0 * sample + x0 exactly (diffusers gets the same bits).
            return x0.copy()
        alpha_t, sigma_t = self._alpha[i + 1], self._sigma[i + 1]
        h = self._lambda[i + 1] - self._lambda[i]
        ratio = _f32(sigma_t / sigma_s0)
        decay = _f32(alpha_t * (np.exp(-h, dtype=np.float32) - _f32(1.0)))
        if previous is None:
            return (ratio * sample - decay * x0).astype(np.float32, copy=False)
        h_0 = self._lambda[i] - self._lambda[i - 1]
        r0 = _f32(h_0 / h)
        d1 = _f32(1.0 / r0) * (x0 - previous)
        return (ratio * sample - decay * x0 - _f32(0.5) * decay * d1).astype(np.float32, copy=False)


def dpm_timesteps_and_sigmas(schedule: NoiseSchedule, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps (int64) and sigmas (float32, one more: the final 0) as diffusers' set_timesteps."""
    acp = schedule.alphas_cumprod
    total = schedule.num_train_timesteps
    alpha_t = np.sqrt(acp)
    sigma_t = np.sqrt(np.float32(1.0) - acp)
    lambdas = np.log(alpha_t) - np.log(sigma_t)
    clipped = int(np.searchsorted(lambdas[::-1], schedule.lambda_min_clipped))
    last = total - clipped
    if schedule.timestep_spacing == "linspace":
        timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        ratio = last // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    else:  # trailing
        timesteps = np.arange(last, 0, -total / steps).round().astype(np.int64) - 1
    all_sigmas = (((np.float32(1.0) - acp) / acp) ** np.float32(0.5)).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    return timesteps.copy(), np.concatenate([sigmas, [0.0]]).astype(np.float32)


def make_scheduler(name: str, schedule: NoiseSchedule, steps: int) -> SchedulerState:
    """A fresh per-request scheduler state; ``name`` is "ddim" or "dpmsolver++"."""
    if name == DDIM:
        return DDIMState(schedule, steps)
    if name == DPM_SOLVER_PP:
        return DPMSolverPPState(schedule, steps)
    raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
