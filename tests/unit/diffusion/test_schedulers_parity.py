"""The numpy schedulers against diffusers' DDIMScheduler / DPMSolverMultistepScheduler (torch, CPU).

A full sampling loop is run by both with the same analytic "denoiser" (a smooth function of x_t
and t, so errors would compound over the steps as with a real network), at 10/20/50 steps, for
every beta schedule, both prediction types and the timestep spacings we serve.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.diffusion.schedulers import DDIMState, DPMSolverPPState, NoiseSchedule

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

SHAPE = (2, 3, 8, 8)
TOLERANCE = 1e-5


def fake_model(sample: np.ndarray, timestep: int) -> np.ndarray:
    """A deterministic stand-in for a denoiser: depends on x_t and t like a real one."""
    return (0.8 * sample + 0.3 * np.sin(sample * 3.0 + timestep / 97.0)).astype(np.float32)


def start_noise() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)


def diffusers_loop(scheduler, steps: int) -> tuple[np.ndarray, np.ndarray]:
    scheduler.set_timesteps(steps)
    sample = torch.from_numpy(start_noise())
    for timestep in scheduler.timesteps:
        output = torch.from_numpy(fake_model(sample.numpy(), int(timestep)))
        sample = scheduler.step(output, timestep, sample).prev_sample
    return scheduler.timesteps.numpy(), sample.numpy()


def numpy_loop(state) -> tuple[np.ndarray, np.ndarray]:
    sample = start_noise()
    visited = []
    while not state.done:
        visited.append(state.timestep)
        sample = state.step(fake_model(sample, state.timestep), sample)
    return np.asarray(visited), sample


CASES = [
    ("linear", "epsilon", "leading", False),
    ("linear", "epsilon", "trailing", True),
    ("scaled_linear", "v_prediction", "trailing", False),
    ("squaredcos_cap_v2", "v_prediction", "trailing", True),
    ("squaredcos_cap_v2", "epsilon", "leading", True),
    ("linear", "v_prediction", "linspace", True),
]


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize(("beta_schedule", "prediction", "spacing", "clip"), CASES)
def test_ddim_matches_diffusers(steps: int, beta_schedule: str, prediction: str, spacing: str, clip: bool) -> None:
    reference = schedulers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction,
        timestep_spacing=spacing, clip_sample=clip, set_alpha_to_one=True,
    )
    schedule = NoiseSchedule(
        beta_schedule=beta_schedule, prediction_type=prediction, timestep_spacing=spacing, clip_sample=clip
    )
    want_t, want = diffusers_loop(reference, steps)
    got_t, got = numpy_loop(DDIMState(schedule, steps))
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize(("beta_schedule", "prediction", "spacing", "clip"), CASES)
def test_dpm_solver_pp_matches_diffusers(
    steps: int, beta_schedule: str, prediction: str, spacing: str, clip: bool
) -> None:
    # diffusers' DPM-Solver has no clip_sample; dynamic thresholding with sample_max_value 1 clips to [-1, 1].
    reference = schedulers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction,
        timestep_spacing=spacing, algorithm_type="dpmsolver++", solver_order=2,
        thresholding=clip, sample_max_value=1.0,
    )
    schedule = NoiseSchedule(
        beta_schedule=beta_schedule, prediction_type=prediction, timestep_spacing=spacing, clip_sample=clip
    )
    want_t, want = diffusers_loop(reference, steps)
    got_t, got = numpy_loop(DPMSolverPPState(schedule, steps))
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_alphas_cumprod_match_diffusers() -> None:
    for beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        reference = schedulers.DDIMScheduler(beta_schedule=beta_schedule).alphas_cumprod.numpy()
        np.testing.assert_allclose(NoiseSchedule(beta_schedule=beta_schedule).alphas_cumprod, reference, rtol=2e-6)


async def test_engine_sampling_loop_matches_a_diffusers_loop(tmp_path) -> None:  # noqa: ANN001
    """Engine (per-row timesteps, CFG rows, numpy DDIM / DPM-Solver++) vs diffusers over the same ONNX denoiser."""
    import onnxruntime as ort

    from services.core.model_store import ModelStore
    from services.diffusion.engine import DiffusionEngine, EngineConfig, SamplingParams, initial_noise
    from services.diffusion.spec import DiffusionSpec
    from services.model_host import ModelHost
    from tests.fixtures.diffusion_models import RENDERER_NAME, write_diffusion_store

    store = ModelStore(write_diffusion_store(tmp_path))
    manifest = store.get(RENDERER_NAME)
    spec = DiffusionSpec.from_manifest(manifest)
    session = ort.InferenceSession(str(manifest.path), providers=["CPUExecutionProvider"])
    classes = np.random.default_rng(1).integers(0, 5, (16, 16)).astype(np.uint8)
    condition = spec.class_map_condition(classes, None)
    null = spec.null_condition(condition.shape)
    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    references = {
        "ddim": schedulers.DDIMScheduler(clip_sample=True, **config),
        "dpmsolver++": schedulers.DPMSolverMultistepScheduler(
            timestep_spacing="leading", thresholding=True, sample_max_value=1.0, **config
        ),
    }
    host = ModelHost(store, ["denoiser"])
    await host.start()
    try:
        served = await host.get(RENDERER_NAME)
        engine = DiffusionEngine(spec, served.pool.infer, EngineConfig(), model=RENDERER_NAME, version="1")
        for name, reference in references.items():
            params = SamplingParams(steps=20, scheduler=name, guidance_scale=2.5, seed=3)
            got = await engine.sample(condition, params)
            reference.set_timesteps(20)
            sample = torch.from_numpy(initial_noise(3, (3, 16, 16))[None])
            for timestep in reference.timesteps:
                out = session.run(None, {
                    "sample": np.concatenate([sample.numpy()] * 2),
                    "timestep": np.full(2, float(timestep), np.float32),
                    "condition": np.stack([condition, null]),
                })[0]
                guided = out[1:] + np.float32(2.5) * (out[:1] - out[1:])
                sample = reference.step(torch.from_numpy(guided), timestep, sample).prev_sample
            np.testing.assert_allclose(got, sample.numpy()[0], atol=1e-4, rtol=0)
    finally:
        await host.stop()
