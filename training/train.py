"""Training entry point: `python -m training.train --config training/configs/X.yaml [--steps N] [--data-root P]
[--out runs/X] [--time-budget SECONDS]`. Resumes from <out>/latest.pt when it exists."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from training.trainers import get_trainer

SUPERVISED_TRAINERS = ("encoder", "segmenter")
# Trainers whose config describes one network under `model` (no generator/discriminator pair).
SINGLE_MODEL_TRAINERS = (*SUPERVISED_TRAINERS, "diffusion")


def merge_configs(base: dict, override: dict) -> dict:
    """Deep merge: mappings merge key by key, `null` deletes the base key (a later recipe drops what no longer
    applies, e.g. an earlier version's card section), anything else in `override` replaces the base value."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: Path | str) -> dict:
    path = Path(path)
    config = yaml.safe_load(path.read_text())
    # `extends: other.yaml` (relative to this file): a later recipe states only what it changes.
    if "extends" in config:
        config = merge_configs(load_config(path.parent / config.pop("extends")), config)
    # GAN configs describe a generator + discriminator; the supervised scoring models (encoder/segmenter) a `model`.
    networks = ("model",) if config.get("trainer") in SINGLE_MODEL_TRAINERS else ("generator", "discriminator")
    for key in ("name", "kind", "trainer", "data", *networks, "train"):
        if key not in config:
            raise ValueError(f"config {path} misses required key {key!r}")
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=None, help="total steps (overrides train.steps)")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/<name>)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop (and checkpoint) after this many seconds of this invocation, whatever the step")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (overrides train.num_threads; 1 when two runs share 2 cores)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.threads is not None:
        config["train"]["num_threads"] = args.threads
    out = args.out or Path("runs") / config["name"]
    trainer = trainer_class(config["trainer"])(config, out, args.data_root, steps=args.steps,
                                             time_budget_s=args.time_budget)
    state = trainer.fit()
    print(f"{config['name']}: step {state.step}/{trainer.total_steps}, {state.train_seconds:.1f} s of training, "
          f"checkpoint {trainer.checkpoint_path()}")


def trainer_class(name: str):
    """The diffusion trainer is registered here (issue #9); the others come from training.trainers.get_trainer."""
    if name == "diffusion":
        from training.trainers.diffusion_trainer import DiffusionTrainer

        return DiffusionTrainer
    return get_trainer(name)


if __name__ == "__main__":
    main()
