"""Paired differences of the stain-variation arms against v3, A and the ceiling (P2, MoNuSeg k16, 5 seeds), read from the P2 runs cache."""
import json
import numpy as np
from scipy import stats
from pathlib import Path
R = Path.home() / '.cache/histosynth/runs/experiments/downstream-steps1000'
def v(s, a, m): return json.load(open(R / f'monuseg-k16-seed{s}-{a}/result.json'))['scores'][m]
for a, b in (('B-v3-stain', 'B-v3'), ('C-v3-stain', 'C-v3'), ('B-v3-stain', 'A'), ('C-v3-stain', 'A'), ('B-v3-stain', 'B-vreal'), ('C-v3-stain', 'C-vreal')):
    for m in ('pixel_dice', 'object_f1', 'aji'):
        x = np.array([v(s, a, m) for s in range(5)]); y = np.array([v(s, b, m) for s in range(5)]); d = x - y
        print(f'{a} - {b} {m}: {d.mean():+.3f} ± {d.std(ddof=1):.3f} (p {stats.ttest_rel(x, y).pvalue:.3f}, {int((d > 0).sum())}/5)')
