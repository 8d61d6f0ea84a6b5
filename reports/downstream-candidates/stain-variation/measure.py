"""Stain variation (Render's stain_variation) on the downstream benchmark's MoNuSeg renders: encoder FID / precision /
recall, stain and nucleus-contrast distances against the held-back patients, beside real-vs-real and plain v3.

The cached v3 renders of seed 0 (rendered with Render seed i for mask i) are restained offline by the very function the
Render service applies after rendering (StainBank.restain with seed i), so the images are the ones a request with
stain_variation=True would return. Usage: python reports/downstream-candidates/stain-variation/measure.py
(reads ~/.cache/histosynth/runs/experiments/downstream/data, writes scores.json beside this file)."""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from services.core.model_store import ModelStore  # noqa: E402
from services.mask_rendering.pipeline import RendererSpec  # noqa: E402
from training.experiments import downstream as ds, downstream_data as data  # noqa: E402

CACHE = Path.home() / ".cache/histosynth/runs/experiments/downstream/data"
SOURCES = {"3-stain-monuseg": "monuseg", "3-stain-all": ""}

manifest = ModelStore(REPO / "model_store").get("renderer-he-nuclei", "3")
bank = RendererSpec.from_metadata(manifest.key, manifest.metadata).stain_bank
seed_file = np.load(CACHE / "monuseg-seed0.npz")
renders = np.load(CACHE / "monuseg-seed0-v3.npz")["images"]
class_maps = data.remap(seed_file["mask_class_maps"], data.renderer_class_remap(manifest, "monuseg"))
with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    for name in ("monuseg-test.npz", "monuseg-seed0.npz", "monuseg-seed0-v3.npz"):
        (work / name).symlink_to(CACHE / name)
    for label, source in SOURCES.items():
        images = np.stack([bank.restain(image, classes, index, source)
                           for index, (image, classes) in enumerate(zip(renders, class_maps))])
        np.savez_compressed(work / f"monuseg-seed0-v{label}.npz", images=images)
    scores = ds.distribution_scores(ds.Settings(datasets=("monuseg",)), work, REPO / "model_store",
                                    ["3", *SOURCES])["monuseg"]
(Path(__file__).parent / "scores.json").write_text(json.dumps(scores, indent=1, default=float))
for name in ["real_vs_real", "v3", *(f"v{label}" for label in SOURCES)]:
    entry = scores[name]
    print(f"{name}: FID {entry['fid']:.1f}, precision {entry['precision']:.3f}, recall {entry['recall']:.3f}, "
          f"W1 H {entry['stain_wasserstein']['H']:.4f}, E {entry['stain_wasserstein']['E']:.4f}, "
          f"nucleus contrast W1 {entry['nucleus_contrast']['w1_to_held_back']:.4f}")
