"""Shared by the renderer recipe tests (v3 consistency, boundary candidate): tiny fixture runs of the real configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.unit.training.test_training_pipeline import FIXTURE_DATA, tiny_config
from training.train import load_config, main as train_main
from training.trainers import get_trainer

CONFIGS = Path(__file__).resolve().parents[3] / "training" / "configs"


def train_fixture_segmenter(runs: Path, name: str) -> Path:
    """A 2-step, tiny version of training/configs/<name>.yaml on the fixture data, in <runs>/<name>."""
    config = load_config(CONFIGS / f"{name}.yaml")
    config["model"] = {"base_channels": 4, "depth": 2}
    config["train"].update(batch_size=2, num_threads=2, checkpoint_every=2, log_every=1)
    get_trainer("segmenter")(config, runs / name, FIXTURE_DATA, steps=2).fit()
    return runs / name


def train_tiny_renderer(tmp_path: Path, config_name: str, runs: Path, run_name: str,
                        *extra_args: str) -> list[dict[str, Any]]:
    """Train a tiny training/configs/<config_name>.yaml into <runs>/<run_name>; returns its losses.jsonl records.

    The config file is written under its model's name (as training.train expects) in a directory of its own, so
    recipes of the same model do not overwrite each other; calling again with --steps resumes the run.
    """
    config = tiny_config(config_name)
    path = tmp_path / "configs" / run_name / f"{config['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = runs / run_name
    train_main(["--config", str(path), "--data-root", str(FIXTURE_DATA), "--out", str(out), *extra_args])
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
