"""Paired differences of the stain-variation arms against plain v3, A and the ceiling (P2, MoNuSeg k16, 5 seeds).

Reads the P2 runs cache and pairs by seed with the benchmark's own paired test; run from the repository root:
PYTHONPATH=. python reports/downstream-candidates/stain-p2/paired.py > reports/downstream-candidates/stain-p2/paired.txt
"""
import json

from training.experiments.downstream import METRICS, Settings, _diff, default_runs_dir, paired_stats
from training.experiments.instance_metrics import scores

RUNS = default_runs_dir(Settings().steps)
SEEDS = range(5)
PAIRS = (("B-v3-stain", "B-v3"), ("C-v3-stain", "C-v3"), ("B-v3-stain", "A"), ("C-v3-stain", "A"),
         ("B-v3-stain", "B-vreal"), ("C-v3-stain", "C-vreal"))


def seed_scores(arm: str, metric: str) -> dict[int, float]:
    return {s: scores(json.loads((RUNS / f"monuseg-k16-seed{s}-{arm}" / "result.json").read_text())["counts"])[metric]
            for s in SEEDS}


for arm, base in PAIRS:
    for metric in METRICS:
        print(f"{arm} - {base} {metric}: {_diff(paired_stats(seed_scores(arm, metric), seed_scores(base, metric)))}")
