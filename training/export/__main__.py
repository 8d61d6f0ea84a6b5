"""Export entry point: `python -m training.export --config training/configs/X.yaml --checkpoint runs/X/latest.pt
--version 1 [--store-root model_store] [--data-root ../shared/data] [--overwrite]`.

Rebuilds the generator from the checkpoint's own config, exports it with export_to_model_store, and renders
samples.png from the HELD-BACK test split (the split recorded in the checkpoint, rebuilt from --data-root).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.benchmark_split import held_back_groups
from training.export.onnx_export import ModelCard, export_to_model_store, hardware_string, png_bytes
from training.provenance import training_commit_fields
from training.train import load_config
from training.trainers import get_trainer
from training.trainers.base import make_grid


def final_losses(log_path: Path, last: int = 10) -> dict[str, float]:
    """Mean of each loss over the last `last` logged records of losses.jsonl."""
    if not log_path.is_file():
        return {}
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r and "event" not in r][-last:]
    keys = [k for k in (records[-1] if records else {}) if k not in ("step", "seconds", "lr")]
    return {k: float(np.mean([r[k] for r in records if k in r])) for k in keys}


def renderer_metadata(config: dict[str, Any]) -> dict[str, Any]:
    data = config["data"]
    channels = list(data["class_names"])
    if data.get("noise_spacing") is not None:
        channels.append("noise")
    if data.get("use_edges"):
        channels.append("edges")
    return {
        "num_classes": int(data["num_classes"]),
        "class_names": list(data["class_names"]),
        "noise_spacing": data.get("noise_spacing"),
        "use_instance_edges": bool(data.get("use_edges", False)),
        "input_channels": channels,
    }


@torch.no_grad()
def test_split_samples(trainer, n: int = 6) -> bytes | None:
    dataset = trainer.test_set
    if dataset is None or len(dataset) == 0:
        return None
    trainer.generator.eval()
    rows = []
    for i in range(min(n, len(dataset))):
        sample = dataset[i]
        fake = trainer.generator(trainer.generator_input({k: v.unsqueeze(0) for k, v in sample.items()}))
        rows.append(trainer.visual_row(sample, fake[0]))
    return png_bytes(make_grid(rows))


def split_record(data: dict, seed: int, groups: dict) -> dict:
    """The manifest's split: fractions per dataset (a source may override them), the groups each source held back
    (the downstream benchmark's tiles, forced to test before the draw) and the resulting groups per split."""
    fractions = {s["dataset"]: s.get("split_fractions", data["split_fractions"]) for s in data.get("sources", [])}
    # No walrus here: an assignment expression in a comprehension binds in this function's scope and would
    # overwrite the `groups` argument.
    held_back = {source["dataset"]: list(source_groups) for source in data.get("sources", [])
                 if (source_groups := held_back_groups(source))}
    return {"fractions": fractions or data["split_fractions"], "seed": data.get("split_seed", seed),
            "unit": "patient where recorded, else source tile", "held_back": held_back, "groups": groups}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--version", required=True)
    parser.add_argument("--store-root", type=Path, default=Path("model_store"))
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version directory")
    parser.add_argument("--hardware-note", default="", help="appended to provenance.hardware (e.g. shared host)")
    args = parser.parse_args(argv)

    yaml_config = load_config(args.config)
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    config = payload["config"]  # what was actually trained (steps overridden on the CLI included)
    if config["name"] != yaml_config["name"]:
        raise ValueError(f"checkpoint {args.checkpoint} is for {config['name']!r}, config {args.config} "
                         f"is for {yaml_config['name']!r}")
    export_cfg = yaml_config["export"]
    torch.set_num_threads(2)
    trainer = get_trainer(config["trainer"])(config, args.checkpoint.parent, args.data_root)
    # The EMA weights when the run kept them (train.ema_decay): what previews showed and what is evaluated.
    weights = "generator_ema" if "generator_ema" in payload else "generator"
    trainer.generator.load_state_dict(payload[weights])
    generator = trainer.generator.eval().to(memory_format=torch.contiguous_format)

    tile = int(export_cfg["metadata"].get("tile_size", 256))
    in_channels = next(generator.parameters()).shape[1]
    example = (torch.zeros(1, in_channels, tile, tile),)
    input_names, output_names = export_cfg["input_names"], export_cfg["output_names"]
    axes = {0: "batch", 2: "height", 3: "width"}
    metadata = dict(export_cfg["metadata"])
    if config["kind"] == "renderer":
        metadata = {**renderer_metadata(config), **metadata}

    data = config["data"]
    datasets = data.get("datasets") or [s["dataset"] for s in data["sources"]]
    provenance = {
        **training_commit_fields(payload),
        "config": config,
        "seed": int(config.get("seed", 0)),
        "data": list(datasets),
        "split": split_record(data, int(config.get("seed", 0)), payload.get("splits", {})),
        "steps": int(payload["step"]),
        "weights": "EMA of the generator weights" if weights == "generator_ema" else "generator weights",
        "train_seconds": round(float(payload["train_seconds"]), 1),
        "hardware": hardware_string().replace(f"torch threads {torch.get_num_threads()}",
                                              f"torch threads {payload.get('hardware_threads', '?')}")
        + (f", {args.hardware_note}" if args.hardware_note else ""),
    }
    losses = final_losses(args.checkpoint.parent / "losses.jsonl")
    card_cfg = export_cfg["card"]
    card = ModelCard(title=card_cfg["title"], summary=card_cfg["summary"], data=card_cfg["data"],
                     intended_use=card_cfg["intended_use"], limitations=card_cfg["limitations"], losses=losses,
                     extra_sections=dict(card_cfg.get("extra_sections") or {}))
    out = export_to_model_store(
        generator, example, name=config["name"], version=args.version, kind=config["kind"],
        input_names=input_names, output_names=output_names,
        dynamic_axes={input_names[0]: axes, output_names[0]: axes}, metadata=metadata, provenance=provenance,
        metrics={f"final_{k}": v for k, v in losses.items()}, store_root=args.store_root,
        parity_sizes=[tuple(s) for s in export_cfg.get("parity_sizes", [[256, 256], [384, 512]])],
        atol=float(export_cfg.get("atol", 1e-3)), max_batch_size=int(export_cfg.get("max_batch_size", 8)),
        card=card, samples_png=test_split_samples(trainer), overwrite=args.overwrite,
    )
    print(f"exported {config['name']} v{args.version} -> {out}")
    return out


if __name__ == "__main__":
    main()
