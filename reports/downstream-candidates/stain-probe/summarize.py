"""Paired stats of the stain probe's arms against the P2 arms of v3 and the ceiling (MoNuSeg k16)."""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root
from training.experiments.downstream import paired_stats, METRICS
from training.experiments.instance_metrics import scores
R = Path.home() / '.cache/histosynth/runs/experiments'
def per_seed(d, arm, label, metric):
    out = {}
    for s in range(5):
        f = R / d / f'monuseg-k16-seed{s}-{arm}' / 'result.json' if label == '' else R / d / f'monuseg-k16-seed{s}-{arm}-v{label}' / 'result.json'
        if f.is_file():
            out[s] = scores(json.loads(f.read_text())['counts'])[metric]
    return out
P2, PR = 'downstream-steps1000', 'stain-probe'
rows = {}
for arm in ('B', 'C'):
    for metric in METRICS:
        st = per_seed(PR, arm, '3stain', metric)
        rows[f'{arm}(restained) - {arm}(v3) {metric}'] = paired_stats(st, per_seed(P2, arm, '3', metric))
        rows[f'{arm}(restained) - A {metric}'] = paired_stats(st, per_seed(P2, 'A', '', metric))
        rows[f'{arm}(restained) - {arm}(real) {metric}'] = paired_stats(st, per_seed(P2, arm, 'real', metric))
for k, v in rows.items():
    print(f"{k:40s}", 'n/a' if v is None else f"{v['mean']:+.3f} ± {v['std']:.3f} (p {v['p_paired_t']:.3f}, {v['higher']}/{v['n']})")
json.dump(rows, open(sys.argv[1], 'w'), indent=1)  # e.g. summary.json beside this file
