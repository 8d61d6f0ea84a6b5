"""Write a renderer's stain bank into its manifest: per-crop H&E levels of the real crops it was trained on.

`python -m training.export.stain_bank --model renderer-he-nuclei --version 3 [--store-root model_store]
[--data-root ../shared/data]`

The Render service's `stain_variation` restains each render to a row of this bank (services/core/stain.py). Rows
come only from the training groups the manifest's provenance records (`split.groups.train`), never from its
validation, test or benchmark held-back groups: the bank carries the stain spread the renderer was trained on.
Crops are the tiles cut in a grid (no overlap); a crop enters when it has at least MIN_PIXELS nucleus and
background pixels, so both levels are measured. The model file is untouched (its sha256 stays valid).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.core.model_store import ModelStore
from services.core.stain import rgb_to_hed, stain_levels
from training.data.shared_layout import load_records, load_sample

MIN_PIXELS = 64
# Levels are optical densities around 0.01-0.1: five decimals keep them to 0.01 % of the H contrast.
DECIMALS = 5


class _FlowRow(list):
    """A bank row, written on one line ([a, b, c, d]) so the manifest stays readable."""


def _represent_row(dumper: yaml.SafeDumper, row: _FlowRow) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", row, flow_style=True)


class _ManifestDumper(yaml.SafeDumper):
    pass


_ManifestDumper.add_representer(_FlowRow, _represent_row)


def bank_rows(data_root: Path, train_groups: Sequence[str], crop: int) -> dict[str, np.ndarray]:
    """Per dataset, [N, 4] levels (H out, H in, E out, E in) of every grid crop of its training groups' tiles."""
    groups = set(train_groups)
    tables = {}
    for dataset in sorted({group.split(":", 1)[0] for group in groups}):
        rows = []
        for record in load_records(data_root, dataset):
            if record.group not in groups:
                continue
            sample = load_sample(record)
            nuclei_map = sample.instances if sample.instances is not None else sample.class_map
            height, width = nuclei_map.shape
            for y in range(0, height - crop + 1, crop):
                for x in range(0, width - crop + 1, crop):
                    nuclei = nuclei_map[y:y + crop, x:x + crop] > 0
                    if nuclei.sum() < MIN_PIXELS or (~nuclei).sum() < MIN_PIXELS:
                        continue
                    hed = rgb_to_hed(sample.image[y:y + crop, x:x + crop, :3])
                    rows.append(stain_levels(hed, nuclei))
        if rows:
            tables[dataset] = np.round(np.stack(rows), DECIMALS)
    if not tables:
        raise ValueError(f"no {crop} px crop of the training groups has {MIN_PIXELS}+ nucleus and background pixels")
    return tables


def write_bank(manifest_path: Path, tables: dict[str, np.ndarray], entry: dict[str, Any]) -> None:
    manifest = yaml.safe_load(manifest_path.read_text())
    rows = {name: [_FlowRow(map(float, row)) for row in table] for name, table in tables.items()}
    manifest.setdefault("metadata", {})["stain_bank"] = {**entry, "rows": rows}
    manifest_path.write_text(yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=120))


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.export.stain_bank", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="renderer-he-nuclei")
    parser.add_argument("--version", required=True)
    parser.add_argument("--store-root", type=Path, default=Path("model_store"))
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--crop", type=int, default=256)
    args = parser.parse_args(argv)

    manifest = ModelStore(args.store_root).get(args.model, args.version)
    if manifest.metadata.get("stain") != "he":
        raise SystemExit(f"{manifest.key} renders stain {manifest.metadata.get('stain')!r}: the bank is for H&E")
    train_groups = manifest.provenance["split"]["groups"]["train"]
    tables = bank_rows(args.data_root, train_groups, args.crop)
    counts = ", ".join(f"{name} {len(table)}" for name, table in tables.items())
    entry = {
        "source": f"grid crops of {args.crop} px ({counts}) from the {len(train_groups)} training groups of this "
                  f"model's provenance split (at least {MIN_PIXELS} nucleus and {MIN_PIXELS} background pixels "
                  "each); levels are scikit-image rgb2hed optical densities; rows per source dataset",
        "background_class": 0,
        "columns": ["H background", "H nuclei", "E background", "E nuclei"],
    }
    write_bank(manifest.manifest_path, tables, entry)
    print(f"{manifest.key}: stain bank ({counts} rows) written to {manifest.manifest_path}")
    return manifest.manifest_path


if __name__ == "__main__":
    main()
