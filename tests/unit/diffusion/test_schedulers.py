"""Scheduler behaviour that needs no reference implementation (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from services.diffusion.schedulers import (
    DDIMState,
    DPMSolverPPState,
    NoiseSchedule,
    make_scheduler,
)


def test_trailing_spacing_starts_at_pure_noise_and_ends_near_zero() -> None:
    state = DDIMState(NoiseSchedule(timestep_spacing="trailing"), 20)
    assert state.timesteps[0] == 999 and state.timesteps[-1] == 49 and len(state.timesteps) == 20
    leading = DDIMState(NoiseSchedule(timestep_spacing="leading"), 20)
    assert leading.timesteps[0] == 950 and leading.timesteps[-1] == 0


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_perfect_denoiser_recovers_the_clean_sample(name: str, prediction: str) -> None:
    """With the true epsilon / v of a known x0 every scheduler must land on x0."""
    schedule = NoiseSchedule(beta_schedule="squaredcos_cap_v2", prediction_type=prediction, clip_sample=False)
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-0.9, 0.9, (3, 8, 8)).astype(np.float32)
    state = make_scheduler(name, schedule, 25)
    sample = rng.standard_normal(x0.shape).astype(np.float32)
    while not state.done:
        alpha = np.sqrt(schedule.alphas_cumprod[state.timestep])
        sigma = np.sqrt(1 - schedule.alphas_cumprod[state.timestep])
        epsilon = (sample - alpha * x0) / sigma
        output = epsilon if prediction == "epsilon" else alpha * epsilon - sigma * x0
        sample = state.step(output.astype(np.float32), sample)
    np.testing.assert_allclose(sample, x0, atol=2e-3)


def test_dpm_final_step_returns_the_x0_prediction_and_clips() -> None:
    schedule = NoiseSchedule(prediction_type="epsilon", clip_sample=True)
    state = DPMSolverPPState(schedule, 1)
    sample = np.full((1, 2, 2), 5.0, np.float32)
    out = state.step(np.zeros_like(sample), sample)
    assert state.done and np.all(out == 1.0)


def test_states_are_independent_per_request() -> None:
    schedule = NoiseSchedule()
    first, second = make_scheduler("dpmsolver++", schedule, 10), make_scheduler("dpmsolver++", schedule, 10)
    sample = np.ones((1, 2, 2), np.float32)
    first.step(sample, sample)
    assert first.steps_done == 1 and second.steps_done == 0 and second.timestep == first.timesteps[0]


@pytest.mark.parametrize("steps", [0, 1001, -3])
def test_steps_outside_range_are_refused(steps: int) -> None:
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.1000"):
        DDIMState(NoiseSchedule(), steps)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="valid: ddim, dpmsolver\\+\\+"):
        make_scheduler("euler", NoiseSchedule(), 10)
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="sigmoid")


def test_from_metadata_reads_the_contract_keys() -> None:
    schedule = NoiseSchedule.from_metadata({
        "prediction_type": "v_prediction", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
        "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True, "default_steps": 20,
    })
    assert schedule.prediction_type == "v_prediction" and schedule.beta_schedule == "squaredcos_cap_v2"
    assert schedule.timestep_spacing == "leading"  # diffusers' DDIM default, what training samples with
    assert NoiseSchedule.from_metadata({"timestep_spacing": "trailing"}).timestep_spacing == "trailing"
