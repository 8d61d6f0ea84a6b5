"""The time budget shrinks a GAN run's schedule from its measured step speed, not from one-off set-up work."""

from __future__ import annotations

import io
import json
import time
from types import SimpleNamespace

from training.trainers.base import GanTrainer, TrainState


def budgeted_trainer(budget_s: float, step: int, total_steps: int) -> SimpleNamespace:
    """The attributes _fit_schedule_to_budget reads and writes, without building networks."""
    return SimpleNamespace(
        time_budget_s=budget_s,
        state=TrainState(step=step),
        total_steps=total_steps,
        train_cfg={"steps": total_steps},
        sched_g=SimpleNamespace(lr_lambdas=[None]),
        sched_d=SimpleNamespace(lr_lambdas=[None]),
    )


def fit(trainer: SimpleNamespace, start_time: float, speed_start: tuple[float, int]) -> list[dict]:
    log = io.StringIO()
    GanTrainer._fit_schedule_to_budget(trainer, start_time, speed_start, log, SimpleNamespace(total=None))
    return [json.loads(line) for line in log.getvalue().splitlines()]


def test_a_discriminator_warm_up_is_not_taken_for_step_time() -> None:
    # 90 s of warm-up, then 50 steps in 10 s (0.2 s/step): 4500 s reach ~22 000 steps, more than the 20 000 planned.
    now = time.perf_counter()
    trainer = budgeted_trainer(4500.0, step=50, total_steps=20_000)
    assert fit(trainer, start_time=now - 100.0, speed_start=(now - 10.0, 0)) == []
    assert trainer.total_steps == 20_000


def test_the_schedule_shrinks_to_the_budget_left_after_set_up() -> None:
    # Same speed, 10 000 planned steps but only 1000 s of budget, 100 of them already spent: ~(1000-100-30)/0.2.
    now = time.perf_counter()
    trainer = budgeted_trainer(1000.0, step=50, total_steps=10_000)
    events = fit(trainer, start_time=now - 100.0, speed_start=(now - 10.0, 0))
    assert [event["event"] for event in events] == ["steps_rescheduled"]
    assert 50 + 4300 <= trainer.total_steps <= 50 + 4400
    assert trainer.train_cfg["steps"] == trainer.total_steps
    assert trainer.sched_g.lr_lambdas[0](trainer.total_steps) == 0.0
