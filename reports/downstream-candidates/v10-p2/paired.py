"""v10 under P2 (MoNuSeg k16, 5 seeds) on this session's CPU, and the same arms on two CPU types.

Reads the P2 runs cache (every arm here trained on one Intel Xeon with AMX, 2026-12-07) and pairs by seed with the
benchmark's own paired test. The second part compares each arm with the same arm, seed and data draw of the committed
P2 report (reports/downstream/report.json, trained on an AMD EPYC), so it shows how far a CPU type moves the numbers.
Run from the repository root:
PYTHONPATH=. python reports/downstream-candidates/v10-p2/paired.py > reports/downstream-candidates/v10-p2/paired.txt
"""
import functools
import json
from pathlib import Path

import numpy as np

from training.experiments.downstream import METRICS, Settings, _diff, default_runs_dir, paired_stats
from training.experiments.instance_metrics import scores
from training.experiments.report import mean_std

RUNS = default_runs_dir(Settings().steps)
AMD_RUNS = json.loads(Path("reports/downstream/report.json").read_text())["results"]["runs"]
SEEDS = range(5)
PAIRS = (("B-v10", "A"), ("C-v10", "A"), ("B-v10", "B-v3"), ("C-v10", "C-v3"), ("B-v3", "A"), ("C-v3", "A"))


@functools.cache
def counts(arm: str, seed: int) -> list[dict]:
    return json.loads((RUNS / f"monuseg-k16-seed{seed}-{arm}" / "result.json").read_text())["counts"]


def seed_scores(arm: str, metric: str) -> dict[int, float]:
    return {s: scores(counts(arm, s))[metric] for s in SEEDS}


def amd_scores(arm: str, metric: str) -> dict[int, float]:
    name, _, version = arm.partition("-v")
    return {r["seed"]: scores(r["counts"])[metric] for r in AMD_RUNS
            if (r["dataset"], r["k"], r["arm"], r["version"]) == ("monuseg", 16, name, version)}


print("# this CPU: paired by seed")
for arm, base in PAIRS:
    for metric in METRICS:
        print(f"{arm} - {base} {metric}: {_diff(paired_stats(seed_scores(arm, metric), seed_scores(base, metric)))}")
print("\n# predicted / true nucleus pixels on the held-back tiles, per seed (C trains on renders alone)")
for arm in ("A", "C-v3", "C-v10", "B-v3", "B-v10"):
    ratios = [sum(c["pixels_predicted"] for c in counts(arm, s)) / sum(c["pixels_true"] for c in counts(arm, s))
              for s in SEEDS]
    print(f"{arm}: " + " ".join(f"{r:.2f}" for r in ratios))
print("\n# the same arm, seed and draw: this CPU (Intel Xeon, AMX) minus the committed report's (AMD EPYC)")
for arm in ("A", "B-v3", "C-v3"):
    for metric in METRICS:
        intel, amd = seed_scores(arm, metric), amd_scores(arm, metric)
        stats = mean_std([intel[s] - amd[s] for s in SEEDS])
        print(f"{arm} {metric}: Intel {np.mean(list(intel.values())):.3f}, AMD {np.mean(list(amd.values())):.3f}, "
              f"Intel - AMD {stats['mean']:+.3f} ± {stats['std']:.3f}")
