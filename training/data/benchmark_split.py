"""The downstream benchmark's held-back tiles (issue #17): patients/tiles no shipped model may train on.

MoNuSeg: 8 patients over 6 organs. Six are renderer-he-nuclei v1's own val+test patients (v1 never saw them);
the prostate and colon patients were added for organ coverage and WERE in v1's training split, so v1's
benchmark numbers are also reported on the 6-patient subset it never saw (`NOT_SEEN_BY_V1`).
CoNSeP: renderer-he-nuclei v1's val+test source tiles (never seen by v1).

A training config opts in per source with `held_back: benchmark` (or an explicit list of groups); the split
then forces these groups to "test" before drawing the fractions (training.data.shared_layout.split_records).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BENCHMARK_HELD_BACK: dict[str, tuple[str, ...]] = {
    "monuseg": (
        "monuseg:TCGA-50-5931",  # lung
        "monuseg:TCGA-B0-5698",  # kidney
        "monuseg:TCGA-DK-A2I6",  # bladder
        "monuseg:TCGA-AR-A1AK",  # breast
        "monuseg:TCGA-HE-7129",  # kidney
        "monuseg:TCGA-HE-7130",  # kidney
        "monuseg:TCGA-G9-6362",  # prostate
        "monuseg:TCGA-NH-A8F7",  # colon
    ),
    "consep": (
        "consep:CoNSeP_train_12",
        "consep:CoNSeP_train_19",
        "consep:CoNSeP_train_22",
        "consep:CoNSeP_train_16",
        "consep:CoNSeP_train_7",
        "consep:CoNSeP_train_8",
    ),
}

# Held-back groups that renderer-he-nuclei v1 trained on (its recorded split put them in "train").
SEEN_BY_V1: frozenset[str] = frozenset({"monuseg:TCGA-G9-6362", "monuseg:TCGA-NH-A8F7"})


def held_back_groups(source: Mapping[str, Any]) -> tuple[str, ...]:
    """The groups a training source must keep out of training: `held_back: benchmark` or an explicit list."""
    value = source.get("held_back")
    if value is None:
        return ()
    if value == "benchmark":
        dataset = str(source["dataset"])
        if dataset not in BENCHMARK_HELD_BACK:
            raise ValueError(f"held_back: benchmark has no held-back tiles for dataset {dataset!r}; "
                             f"known: {sorted(BENCHMARK_HELD_BACK)}")
        return BENCHMARK_HELD_BACK[dataset]
    if isinstance(value, (list, tuple)) and all(isinstance(g, str) for g in value):
        return tuple(value)
    raise ValueError(f"held_back must be 'benchmark' or a list of group names, got {value!r}")
