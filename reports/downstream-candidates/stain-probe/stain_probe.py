"""Probe: does matching renders' stain (H/E background level + nucleus contrast) to randomly drawn real training
crops close the render-vs-real gap of arms B and C? Offline post-processing of the cached v3 renders."""
import json, sys
from pathlib import Path
import numpy as np
from skimage.color import rgb2hed, hed2rgb
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root
from training.experiments import downstream as ds

EXPERIMENTS = Path.home() / '.cache/histosynth/runs/experiments'
DATA = EXPERIMENTS / 'downstream' / 'data'  # the 300-step cache's draws and renders (P2 links to them)
RUNS = EXPERIMENTS / 'stain-probe'
P2 = EXPERIMENTS / 'downstream-steps1000'

def levels(image, inst):
    hed = rgb2hed(image); nuc = inst > 0
    return np.array([[hed[..., c][~nuc].mean(), hed[..., c][nuc].mean()] for c in (0, 1)])  # [H,E] x [out,in]

def bank(dataset):
    rows = []
    for seed in range(5):
        a = np.load(DATA / f'{dataset}-seed{seed}.npz')
        for im, m in zip(a['real_images'], a['real_instances']):
            if (m > 0).sum() >= 64 and (m == 0).sum() >= 64:
                rows.append(levels(im, m))
    return np.stack(rows)

def restain(image, inst, target):
    hed = rgb2hed(image); cur = levels(image, inst)
    for c in (0, 1):
        span = cur[c, 1] - cur[c, 0]
        a = (target[c, 1] - target[c, 0]) / span if abs(span) > 1e-4 else 1.0
        a = float(np.clip(a, 0.5, 2.0)) if c == 0 else 1.0  # E: level only (its nucleus/background span is tiny)
        hed[..., c] = a * (hed[..., c] - cur[c, 0]) + target[c, 0]
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)

if __name__ == '__main__':
    dataset, label = sys.argv[1], '3stain'
    b = bank(dataset)
    print(dataset, 'bank', len(b), 'H out/in', b[:, 0].mean(0), 'E out/in', b[:, 1].mean(0), flush=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    specs = []
    for seed in range(5):
        out = RUNS / f'{dataset}-seed{seed}-v{label}.npz'
        a = np.load(DATA / f'{dataset}-seed{seed}.npz')
        if not out.exists():
            renders = np.load(DATA / f'{dataset}-seed{seed}-v3.npz')['images']
            rng = np.random.default_rng([seed, 77])
            new = np.stack([restain(im, m, b[rng.integers(len(b))]) for im, m in zip(renders, a['mask_instances'])])
            np.savez_compressed(out, images=new)
        plain = ds._jsonable(ds.asdict(ds.replace(ds.Settings(), steps=1000)))
        for arm in ('B', 'C'):
            spec = ds.RunSpec(dataset, 16, seed, arm, label, '', str(DATA / f'{dataset}-seed{seed}.npz'), str(out),
                              str(DATA / f'{dataset}-test.npz'), plain)
            specs.append(ds.replace(spec, run_dir=str(RUNS / spec.key)))
    for r in ds.run_all(specs, 2):
        print(json.dumps({'run': f"{r['dataset']}-{r['seed']}-{r['arm']}", **r['scores']}), flush=True)
