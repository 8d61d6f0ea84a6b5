"""Issue #17: the downstream benchmark, the project's main quality number.

    make eval-downstream            # = python -m training.experiments.downstream --data-root ../shared/data
    python -m training.experiments.downstream --data-root tests/fixtures/data --quick --out /tmp/ds  # CI smoke

Does adding rendered crops to a small real training set help a nuclei segmenter on patients no model saw?
  * Held-back test set = training.data.benchmark_split (8 MoNuSeg patients over 6 organs, 6 CoNSeP tiles),
    scored whole. No shipped model may train on it; each renderer's recorded split is checked and any overlap
    is printed in the report.
  * Per seed, the training groups are cut in two halves (training/experiments/downstream_data.py): k real
    256 px crops come from one half, m = 4k masks from the other half are rendered through the gRPC Render
    service (mask-rendering server on loopback, ONNX Runtime) by each version of renderer-he-nuclei.
  * Arms: A = k real; B = the same k real + m synthetic (each batch half real, half synthetic); C = m synthetic.
    Same U-Net, init, loss, augmentation, batch order and step budget in every arm of a seed.
  * The ceiling (label "real", on unless --no-real-ceiling): arms B and C with the real images of the very masks
    that were rendered in place of the renders, i.e. a renderer indistinguishable from real tissue. B(real) - A
    is what such a renderer would add with these masks; B(v) - B(real) is a renderer's gap to it.
  * Scores on the held-back images: pixel Dice, object F1 (IoU > 0.5), AJI (training/experiments/
    instance_metrics.py); mean +- std over seeds, paired differences with a paired t-test, per organ.
  * Distribution scores (scoring service, our histology encoder unless a weights file is configured):
    FID / KID / precision / recall of synthetic vs held-back real crops, beside real-vs-real at equal n, and
    rgb2hed stain Wasserstein distances.
Runs are cached under --runs-dir (a finished run leaves result.json), so re-running after a new renderer
version only trains the new arms; arm A is shared by every renderer version.

Precision variants (``--precision-variants openvino-bf16``): the same masks, with the same render seeds, rendered
by the same model version through the same Render service running on another engine/precision
(HISTOSYNTH_RUNTIME / HISTOSYNTH_PRECISION for this model; a reduced precision loads only with a passing
precision check). A variant is labelled ``<version>-<variant>`` (renders ``monuseg-seed0-v2-openvino-bf16.npz``,
runs ``monuseg-k16-seed0-B-v2-openvino-bf16``), so nothing cached for fp32 is touched, and its arms are also
paired by seed with the same arms at fp32 (``vs_fp32`` in the summary): the check that a reduced precision
leaves the downstream numbers unchanged (scripts/precision_quality.py records it in precision_checks.yaml).

Stain variation (``--stain-variation``): the same masks and render seeds again, with Render's stain_variation drawing
from the renderer's stain bank rows of the benchmark dataset itself (label ``<version>-stain``), paired with the plain
renders' arms the same way.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker: the host has 2 cores

import argparse
import contextlib
import json
import math
import multiprocessing
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats
from skimage.color import hed2rgb, rgb2hed

from clients.client import HistosynthClient
from services.all_in_one import BackgroundServers
from services.core.model_store import ModelStore
from training.data.augment import paired_augment
from training.data.benchmark_split import BENCHMARK_HELD_BACK
from training.experiments import downstream_data as data
from training.experiments.coarse_to_fine import experiment_config
from training.experiments.instance_metrics import image_counts, instances_from_prediction, scores, three_class_target
from training.experiments.report import REPO_ROOT, ExperimentReport, ScoreOptions, ScoringSession, mean_std, table
from training.models.tissue_segmenter import SegmenterConfig, TissueSegmenter
from training.trainers.scoring_trainers import images_to_tensor

NAME = "downstream"
RENDERER = "renderer-he-nuclei"
ARMS = ("A", "B", "C")
ARM_NAMES = {"A": "A: k real", "B": "B: k real + 4k synthetic", "C": "C: 4k synthetic"}
METRICS = ("pixel_dice", "object_f1", "aji")
RUNS_ROOT = Path.home() / ".cache" / "histosynth" / "runs" / "experiments"


def default_runs_dir(steps: int) -> Path:
    """The runs cache for a segmenter step budget: a run is only reusable under the budget it was trained for.

    300 steps (protocol P1, the first report) kept the original name, every other budget is named by it
    (``downstream-steps1000`` for P2).
    """
    return RUNS_ROOT / (NAME if steps == 300 else f"{NAME}-steps{steps}")


RENDER_BATCH = 8
# --precision-variants: name -> (engine, precision) the Render service serves the renderer with.
PRECISION_VARIANTS: dict[str, tuple[str, str]] = {"openvino-bf16": ("openvino", "bf16")}
# --stain-variation: the same fp32 renders with Render's stain variation, drawn from the stain bank's rows of the
# benchmark's own dataset (stain_source = the dataset). Labelled like a precision variant: "<version>-stain".
STAIN_VARIANT = "stain"
VARIANTS = (*PRECISION_VARIANTS, STAIN_VARIANT)


def variant_runtime(variant: str | None) -> tuple[str, str]:
    """(engine, precision) the Render service runs a variant on: fp32 ONNX Runtime unless a precision variant."""
    return PRECISION_VARIANTS.get(variant or "", ("onnxruntime", "fp32"))


def variant_description(variant: str) -> str:
    return "stain variation" if variant == STAIN_VARIANT else " ".join(PRECISION_VARIANTS[variant])
# The ceiling's label: its "renders" are the real crops the rendered masks were cut from (mask_source_images).
REAL = "real"


def renderer_label(version: str, variant: str | None = None) -> str:
    """The key a renderer version (at fp32 on ONNX Runtime) or one of its precision variants is cached under."""
    return f"{version}-{variant}" if variant else str(version)


def parse_label(label: str) -> tuple[str, str | None]:
    """``"2-openvino-bf16"`` -> ("2", "openvino-bf16"); ``"2"`` -> ("2", None); ``"real"`` -> ("real", None)."""
    version, _, variant = str(label).partition("-")
    if variant and variant not in VARIANTS:
        raise ValueError(f"renderer label {label!r}: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    return version, variant or None


def labels_with_renders(labels: Sequence[str]) -> list[str]:
    """The labels whose crops are renders (a render file per seed): all but the ceiling's REAL."""
    return [label for label in labels if label != REAL]


def renderer_labels(versions: Sequence[str], variants: Sequence[str]) -> tuple[str, ...]:
    """Every version at fp32, then every version in every variant."""
    return tuple(versions) + tuple(renderer_label(v, variant) for variant in variants for v in versions)


@dataclass(frozen=True)
class Settings:
    datasets: tuple[str, ...] = ("monuseg", "consep")
    ks: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: {"monuseg": (16, 64), "consep": (16,)})
    synthetic_factor: int = 4
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    crop: int = 256  # real / synthetic crop size
    train_crop: int = 128  # random sub-crop the segmenter trains on (fully convolutional at test time)
    # Protocol P2 (reports/downstream-candidates/NOTE.md): at 300 steps (P1) the segmenter was so under-trained that
    # 4x more real crops bought only +0.012 Dice (p 0.36), too flat to tell renderers apart.
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    distribution_crops: int = 256  # n for FID/KID/PR where the data allows
    parallel: int = 1
    held_back: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(BENCHMARK_HELD_BACK))
    precision_variants: tuple[str, ...] = ()  # VARIANTS, rendered beside the plain fp32 renders (see the docstring)
    draw_k: Mapping[str, int] = field(default_factory=dict)  # k each seed's draw is made for (default: max of ks)
    real_ceiling: bool = True  # also train B and C on the masks' real images (label REAL)


QUICK = Settings(datasets=("monuseg",), ks={"monuseg": (2,)}, seeds=(0, 1), crop=128, train_crop=64, steps=3,
                 batch_size=2, distribution_crops=8, parallel=1,
                 held_back={"monuseg": ("monuseg:TCGA-NH-A8F7",)})  # the fixture's held-back benchmark patient


# ============================================================================================ data + rendering
def _render(client: HistosynthClient, class_maps: np.ndarray, instances: np.ndarray, version: str,
            seed: int, stain_source: str = "") -> tuple[np.ndarray, dict[str, str]]:
    """``stain_source``: Render's stain variation from that source of the stain bank ("" = none)."""
    images, model = [], None
    for start in range(0, len(class_maps), RENDER_BATCH):
        out = client.render(class_maps[start:start + RENDER_BATCH], model=RENDERER, version=version,
                            instance_maps=instances[start:start + RENDER_BATCH], seed=seed + start, timeout=900,
                            stain_variation=bool(stain_source), stain_source=stain_source)
        images.append(out.images)
        model = out.model
    assert model is not None
    return np.concatenate(images), {"name": model.name, "version": model.version, "sha256": model.sha256}


def served_runtimes(servers: BackgroundServers) -> list[str]:
    """The runtime instances actually serving the renderer (provider strings name engine and precision)."""
    return sorted({info.provider for host in servers.running.hosts for served in host.loaded()
                   if served.manifest.name == RENDERER for info in served.pool.instances})


class RenderServices:
    """One loopback Render server per engine/precision variant, started on first use."""

    def __init__(self, config: Any, stack: contextlib.ExitStack) -> None:
        self._config, self._stack = config, stack
        self._open: dict[str | None, tuple[BackgroundServers, HistosynthClient]] = {}

    def __call__(self, variant: str | None) -> tuple[BackgroundServers, HistosynthClient]:
        if variant not in self._open:
            # Explicit for fp32 too: a HISTOSYNTH_RUNTIME / _PRECISION in the environment must not change the baseline.
            engine, precision = variant_runtime(variant)
            config = replace(self._config, runtime=f"{RENDERER}={engine}", precision=f"{RENDERER}={precision}")
            servers = self._stack.enter_context(BackgroundServers(config, services=["rendering"],
                                                                  ports={"rendering": 0}))
            client = self._stack.enter_context(HistosynthClient(targets={"rendering": servers.addresses["rendering"]}))
            self._open[variant] = (servers, client)
        return self._open[variant]


def prepare(settings: Settings, data_root: Path, store: Path, data_dir: Path,
            versions: Sequence[str]) -> dict[str, Any]:
    """Draw every (dataset, seed), render its masks with every renderer label, cache arrays under data_dir.

    ``versions`` are renderer labels: a version (ONNX Runtime fp32) or ``<version>-<variant>``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    model_store = ModelStore(store)
    meta: dict[str, Any] = {}
    config = experiment_config(store)
    # Crops are rendered in one piece (the service's tile-size setting), not as the model's 128 px training
    # tiles blended with overlap: 2.25x less work at 256 px and no seams where the instance norms differ.
    os.environ.setdefault("HISTOSYNTH_RENDER_TILE_SIZE", str(settings.crop))
    with contextlib.ExitStack() as stack:
        services = RenderServices(config, stack)
        for dataset in settings.datasets:
            split = data.benchmark_split(data_root, dataset, settings.held_back[dataset])
            test_path = data_dir / f"{dataset}-test.npz"
            if not test_path.is_file():
                tests = data.test_images(split)
                np.savez_compressed(test_path, images=np.stack([t.image for t in tests]),
                                    instances=np.stack([t.instances for t in tests]))
            # --ks runs a subset: the draw stays the one of the full k list, so a run matches the cached ones.
            k_max = settings.draw_k.get(dataset, max(settings.ks[dataset]))
            entry: dict[str, Any] = {
                "test": [data.test_image_info(split.dataset, r) for r in split.test],
                "train_groups": split.train_groups, "test_groups": split.test_groups, "seeds": {},
                "renderers": {}}
            for label in versions:
                if label == REAL:
                    entry["renderers"][label] = {"version": REAL, "saw_held_back": [],
                                                 "images": "the real crops the rendered masks were cut from"}
                    continue
                version, variant = parse_label(label)
                manifest = model_store.get(RENDERER, version)
                engine, precision = variant_runtime(variant)
                entry["renderers"][label] = {"sha256": manifest.sha256, "version": version, "runtime": engine,
                                             "precision": precision,
                                             "stain_variation": dataset if variant == STAIN_VARIANT else None,
                                             "saw_held_back": data.renderer_saw(manifest, split.test_groups)}
            for seed in settings.seeds:
                path = data_dir / f"{dataset}-seed{seed}.npz"
                draw_meta = data_dir / f"{dataset}-seed{seed}.json"
                if not path.is_file():
                    draw = data.draw_seed(split, seed, k_max, settings.synthetic_factor * k_max, settings.crop)
                    np.savez_compressed(path, real_images=draw.real.images, real_instances=draw.real.instances,
                                        mask_instances=draw.synthetic_masks.instances,
                                        mask_class_maps=draw.synthetic_masks.class_maps,
                                        mask_source_images=draw.synthetic_masks.images)
                    draw_meta.write_text(json.dumps({"real_groups": draw.real_groups, "mask_groups": draw.mask_groups,
                                                     "real_sources": draw.real.sources,
                                                     "mask_sources": draw.synthetic_masks.sources}, indent=1))
                entry["seeds"][seed] = json.loads(draw_meta.read_text())
                arrays = np.load(path)
                if len(arrays["mask_instances"]) < settings.synthetic_factor * max(settings.ks[dataset]):
                    raise ValueError(f"{path}: {len(arrays['mask_instances'])} masks, fewer than "
                                     f"{settings.synthetic_factor} x k = {max(settings.ks[dataset])}; delete it to redraw")
                for label in versions:
                    rendered = data_dir / f"{dataset}-seed{seed}-v{label}.npz"
                    if label == REAL or rendered.is_file():  # the ceiling reads the seed file's real crops
                        continue
                    version, variant = parse_label(label)
                    stained = variant == STAIN_VARIANT
                    servers, client = services(None if stained else variant)  # stain: the fp32 server
                    manifest = model_store.get(RENDERER, version)
                    class_maps = data.remap(arrays["mask_class_maps"], data.renderer_class_remap(manifest, dataset))
                    started = time.perf_counter()
                    images, model = _render(client, class_maps, arrays["mask_instances"], version, seed * 10_000,
                                            dataset if stained else "")
                    model["served_by"] = served_runtimes(servers)
                    print(json.dumps({"rendered": dataset, "seed": seed, "version": label, "n": len(images),
                                      "served_by": model["served_by"],
                                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)
                    np.savez_compressed(rendered, images=images)
                    (data_dir / f"{dataset}-seed{seed}-v{label}.json").write_text(json.dumps(model))
            meta[dataset] = entry
    return meta


# ============================================================================================ segmenter
def hed_jitter(image: np.ndarray, rng: np.random.Generator, scale: float = 0.05, shift: float = 0.01) -> np.ndarray:
    """Stain augmentation in rgb2hed space (Tellez et al. 2018): per-channel scale and shift, every arm alike."""
    hed = rgb2hed(image)
    hed = hed * rng.uniform(1 - scale, 1 + scale, 3) + rng.uniform(-shift, shift, 3)
    return (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    k: int
    seed: int
    arm: str
    version: str  # renderer version ("" for arm A)
    run_dir: str
    seed_file: str
    synthetic_file: str
    test_file: str
    settings: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.dataset}-k{self.k}-seed{self.seed}-{self.arm}" + (f"-v{self.version}" if self.version else "")


def _batch(spec: RunSpec, pools: Mapping[str, tuple[np.ndarray, np.ndarray]], step: int,
           settings: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([spec.seed, step])  # same draws in every arm of a seed
    size = int(settings["batch_size"])
    if spec.arm == "B":  # half real, half synthetic: the real crops are not drowned by 4x more renders
        plan = ["real"] * (size // 2) + ["synthetic"] * (size - size // 2)
    else:
        plan = ["real" if spec.arm == "A" else "synthetic"] * size
    images, labels = [], []
    for source in plan:
        pool_images, pool_targets = pools[source]
        index = int(rng.integers(len(pool_images)))
        image, target = paired_augment([pool_images[index], pool_targets[index]], int(settings["train_crop"]), rng)
        images.append(hed_jitter(image, rng))
        labels.append(target)
    return np.stack(images), np.stack(labels)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([1.0, 1.0, 2.0])  # the thin boundary class separates touching nuclei
    ce = torch.nn.functional.cross_entropy(logits, target, weight=weights)
    nucleus = 1 - logits.softmax(1)[:, 0]
    truth = (target > 0).float()
    dice = 1 - (2 * (nucleus * truth).sum() + 1) / (nucleus.sum() + truth.sum() + 1)
    return ce + dice


def train_segmenter(spec: RunSpec, pools: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[torch.nn.Module, list]:
    settings = spec.settings
    torch.manual_seed(spec.seed)  # same init in every arm (and k) of a seed
    model = TissueSegmenter(SegmenterConfig(num_classes=3, base_channels=16, depth=3))
    steps = int(settings["steps"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]), weight_decay=1e-4)
    warmup = max(1, steps // 15)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    losses = []
    model.train()
    for step in range(steps):
        images, labels = _batch(spec, pools, step, settings)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images_to_tensor(images))
        loss = _loss(logits.float(), torch.from_numpy(labels).long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(round(float(loss.item()), 4))
    return model, losses


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """3-class prediction of one whole image (reflect-padded to the U-Net's multiple of 8)."""
    model.eval()
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % 8, (-width) % 8
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images_to_tensor(padded[None]))
    return logits.float().argmax(1)[0, :height, :width].numpy().astype(np.uint8)


def run_one(spec: RunSpec) -> dict[str, Any]:
    run_dir = Path(spec.run_dir)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        # The cache key names dataset/k/seed/arm/version only; a run under another step budget is not the same run.
        if int(cached.get("steps", -1)) != int(spec.settings["steps"]):
            raise ValueError(f"{result_path} was trained for {cached.get('steps')} steps, this run asks for "
                             f"{spec.settings['steps']}: pass another --runs-dir for a different budget")
        return cached
    torch.set_num_threads(1)
    k, m = spec.k, spec.k * int(spec.settings["synthetic_factor"])
    seed_arrays = np.load(spec.seed_file)
    pools: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if spec.arm in ("A", "B"):
        pools["real"] = (seed_arrays["real_images"][:k], data.targets(seed_arrays["real_instances"][:k]))
    if spec.arm in ("B", "C"):
        images = (seed_arrays["mask_source_images"] if spec.version == REAL
                  else np.load(spec.synthetic_file)["images"])
        pools["synthetic"] = (images[:m], data.targets(seed_arrays["mask_instances"][:m]))
    started = time.perf_counter()
    model, losses = train_segmenter(spec, pools)
    train_seconds = time.perf_counter() - started
    test = np.load(spec.test_file)
    counts, preview = [], None
    for index, (image, truth) in enumerate(zip(test["images"], test["instances"])):
        prediction = predict(model, image)
        counts.append(image_counts(truth, instances_from_prediction(prediction)).as_dict())
        if index == 0:
            preview = prediction[:256, :256]
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(run_dir / "preview.npz", prediction=preview)
    result = {**{key: getattr(spec, key) for key in ("dataset", "k", "seed", "arm", "version")},
              "train_seconds": round(train_seconds, 1), "steps": len(losses), "final_loss": losses[-1],
              "loss_curve": losses[:: max(1, len(losses) // 20)], "counts": counts, "scores": scores(counts)}
    result_path.write_text(json.dumps(result))
    return result


def run_from_dict(spec: Mapping[str, Any]) -> dict[str, Any]:
    return run_one(RunSpec(**spec))


def run_all(specs: Sequence[RunSpec], parallel: int) -> list[dict[str, Any]]:
    if parallel == 1:
        results = []
        for spec in specs:
            results.append(run_one(spec))
            print(json.dumps({"run": spec.key, **results[-1]["scores"]}), flush=True)
        return results
    from training.experiments import downstream as worker  # spawned workers import it by name, not __main__

    with worker_pool(parallel) as pool:
        return list(pool.map(worker.run_from_dict, [asdict(spec) for spec in specs]))


def worker_pool(parallel: int) -> ProcessPoolExecutor:
    """Spawned workers that stop when the benchmark process does. Without this, killing the benchmark (SIGTERM or
    SIGKILL to it alone, as a scheduler or `kill` does) leaves its workers training the runs already queued to them
    for many minutes, on cores the user thinks are free (seen 2026-12-07: two orphans ran two more runs each)."""
    return ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Pool initializer: a daemon thread ends this worker at once when ``parent_pid`` is no longer its parent."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# ============================================================================================ statistics
def paired_stats(other: Mapping[int, float], base: Mapping[int, float]) -> dict[str, Any] | None:
    """other - base per seed: mean +- std, two-sided paired t-test, seeds where other is higher (None under 2 seeds).

    Identical runs (all differences 0) have no difference to test: p = 1.
    """
    seeds = sorted(set(base) & set(other))
    if len(seeds) < 2:
        return None
    diffs = [other[s] - base[s] for s in seeds]
    p = 1.0
    if any(diffs):
        test = scipy_stats.ttest_rel([other[s] for s in seeds], [base[s] for s in seeds])
        p = float(test.pvalue) if np.isfinite(test.pvalue) else 1.0
    return {**mean_std(diffs), "p_paired_t": p, "seeds": seeds, "higher": int(sum(d > 0 for d in diffs))}


def seed_scores(results: Sequence[Mapping[str, Any]], dataset: str, k: int, arm: str, version: str, metric: str,
                subset: Sequence[int] | None = None) -> dict[int, float]:
    """seed -> ``metric`` of one arm's runs (arm A has version ""), over all held-back images or ``subset``."""
    def score(r: Mapping[str, Any]) -> float:
        counts = r["counts"] if subset is None else [r["counts"][i] for i in subset]
        return scores(counts)[metric]
    return {r["seed"]: score(r) for r in results
            if (r["dataset"], r["k"], r["arm"], r["version"]) == (dataset, k, arm, version)}


def paired(results: Sequence[Mapping[str, Any]], dataset: str, k: int, arm: str, version: str,
           metric: str, subset: Sequence[int] | None = None) -> dict[str, Any] | None:
    """arm - A per seed, mean +- std and a two-sided paired t-test (None when fewer than 2 seeds pair)."""
    return paired_stats(seed_scores(results, dataset, k, arm, version, metric, subset),
                        seed_scores(results, dataset, k, "A", "", metric, subset))


def paired_labels(results: Sequence[Mapping[str, Any]], dataset: str, k: int, arm: str, label: str, base_label: str,
                  metric: str, names: tuple[str, str] = ("base", "other")) -> dict[str, Any] | None:
    """An arm with one renderer label minus the same arm with another, paired by seed (same masks, seeds, init),
    with each side's mean +- std over the paired seeds under ``names`` (base, other)."""
    base = seed_scores(results, dataset, k, arm, base_label, metric)
    other = seed_scores(results, dataset, k, arm, label, metric)
    stats = paired_stats(other, base)
    if stats is None:
        return None
    return {**stats, names[0]: mean_std([base[s] for s in stats["seeds"]]),
            names[1]: mean_std([other[s] for s in stats["seeds"]])}


def paired_variant(results: Sequence[Mapping[str, Any]], dataset: str, k: int, arm: str, label: str,
                   metric: str) -> dict[str, Any] | None:
    """A precision variant's arm minus the same arm of its fp32 version, paired by seed (same masks, seeds, init)."""
    version, variant = parse_label(label)
    if variant is None:
        return None
    return paired_labels(results, dataset, k, arm, label, version, metric, names=("fp32", "variant"))


def real_data_gain(results: Sequence[Mapping[str, Any]], dataset: str, k_small: int, k_large: int,
                   metric: str) -> dict[str, Any] | None:
    """A at k_large minus A at k_small, paired by seed: what more *real* crops buy under the same protocol.

    The draws are nested (k_small crops are the first of the k_large), so this is the yardstick for B - A: a
    synthetic gain larger than the gain of 4x more real data would need the renders to beat real tissue.
    """
    return paired_stats(seed_scores(results, dataset, k_large, "A", "", metric),
                        seed_scores(results, dataset, k_small, "A", "", metric))


def arm_scores(results: Sequence[Mapping[str, Any]], dataset: str, k: int, arm: str, version: str,
               subset: Sequence[int] | None = None) -> dict[str, Any] | None:
    runs = [r for r in results if (r["dataset"], r["k"], r["arm"]) == (dataset, k, arm)
            and (arm == "A" or r["version"] == version)]
    if not runs:
        return None
    per_seed = [scores(r["counts"] if subset is None else [r["counts"][i] for i in subset]) for r in runs]
    return {metric: mean_std([s[metric] for s in per_seed]) for metric in METRICS} | {
        "seeds": sorted(r["seed"] for r in runs)}


def stain_distances(a: np.ndarray, b: np.ndarray, seed: int = 0, pixels: int = 200_000) -> dict[str, float]:
    """1-D Wasserstein distance of rgb2hed H, E (and DAB) optical densities between two image sets."""
    rng = np.random.default_rng(seed)

    def sample(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(-1, 3)
        return rgb2hed(flat[rng.integers(len(flat), size=min(pixels, len(flat)))][None])[0]
    hed_a, hed_b = sample(a), sample(b)
    return {name: float(scipy_stats.wasserstein_distance(hed_a[:, i], hed_b[:, i]))
            for i, name in enumerate(("H", "E", "DAB"))}


def nucleus_contrast(images: np.ndarray, instances: np.ndarray, min_pixels: int = 64) -> np.ndarray:
    """Per crop: mean rgb2hed hematoxylin optical density inside nuclei minus outside them.

    The issue's "too little nucleus/background contrast" as one number per crop; crops with fewer than
    ``min_pixels`` nucleus or background pixels have no contrast to measure and are left out."""
    values = []
    for image, instance in zip(images, instances, strict=True):
        nucleus = instance > 0
        if nucleus.sum() < min_pixels or (~nucleus).sum() < min_pixels:
            continue
        h = rgb2hed(image)[..., 0]
        values.append(float(h[nucleus].mean() - h[~nucleus].mean()))
    return np.asarray(values, dtype=np.float64)


def fixed_line_ratio(images: np.ndarray) -> float:
    """How much the strongest fixed-position row or column edge stands out in a set of same-size crops.

    Mean |intensity step| between neighbouring rows (and columns), averaged over the crops, at each position; the
    largest over its median. Real crops cut at random positions have no preferred row (1.05 over 256 MoNuSeg crops,
    1.25 over 64 CoNSeP ones: fewer crops, more chance); a generator that can locate the image border draws lines at
    fixed offsets from it (renderer-he-nuclei v3: a frame ~40 px inside the top and left edges, 1.46 on MoNuSeg)."""
    gray = images.astype(np.float32).mean(-1)
    ratios = []
    for axis in (1, 2):
        steps = np.abs(np.diff(gray, axis=axis)).mean(axis=(0, 3 - axis))
        ratios.append(float(steps.max() / max(float(np.median(steps)), 1e-6)))
    return max(ratios)


def upsampling_grid_ratio(images: np.ndarray, period: int = 8) -> float:
    """How much a set of same-size crops carries a pattern repeating every 2, 4 or 8 px (the upsampling grid).

    Power spectrum of the grey level (each crop's mean removed), averaged over the crops; the mean power at the
    lattice frequencies k * size / period (not DC) over the mean power one bin beside them. A natural image's
    spectrum is smooth there (about 1); three stride-2 transposed convs draw peaks exactly on that lattice (the
    checkerboard). Crops must be square with a side divisible by ``period``."""
    gray = images.astype(np.float32).mean(-1)
    size = gray.shape[1]
    if gray.shape[2] != size or size % period:
        raise ValueError(f"crops must be square with a side divisible by {period}, got {gray.shape[1:]}")
    gray -= gray.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(gray)) ** 2).mean(0)
    step = size // period
    lattice = {(i * step, j * step) for i in range(period) for j in range(period)} - {(0, 0)}
    beside = {((u + du) % size, (v + dv) % size) for u, v in lattice
              for du, dv in ((1, 0), (-1, 0), (0, 1), (0, -1))} - lattice - {(0, 0)}
    on = np.mean([power[u, v] for u, v in lattice])
    off = np.mean([power[u, v] for u, v in beside])
    return float(on / max(off, 1e-12))


def contrast_summary(values: np.ndarray) -> dict[str, Any]:
    """Nucleus contrast of a crop set: mean ± std over its crops."""
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size)}


def contrast_scores(held_back: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """contrast_summary of ``other`` and its 1-D Wasserstein distance to the held-back crops'."""
    return {**contrast_summary(other), "w1_to_held_back": float(scipy_stats.wasserstein_distance(held_back, other))}


def distribution_scores(settings: Settings, data_dir: Path, store: Path,
                        versions: Sequence[str]) -> dict[str, Any]:
    """Synthetic vs held-back real, and real (training tiles) vs held-back real, at equal n."""
    out: dict[str, Any] = {}
    config = experiment_config(store)
    with ScoringSession(store, config) as scorer:
        for dataset in settings.datasets:
            test = np.load(data_dir / f"{dataset}-test.npz")
            size = settings.crop
            held = data.grid_crops(list(test["images"]), size, max(size // 2, 1))
            held_instances = data.grid_crops(list(test["instances"]), size, max(size // 2, 1))
            seed0 = settings.seeds[0]
            arrays = np.load(data_dir / f"{dataset}-seed{seed0}.npz")
            # Real training crops from the seed's mask-source tiles: the tiles the synthetic masks come from
            # (crop i of mask_source_images is the real image of mask i, so both sets share their masks).
            real_train, mask_instances = arrays["mask_source_images"], arrays["mask_instances"]
            n = min(settings.distribution_crops, len(held), len(real_train))
            order = np.random.default_rng(0).permutation(len(held))[:n]
            held_n = held[order]
            held_contrast = nucleus_contrast(held_n, held_instances[order])
            entry: dict[str, Any] = {"n": int(n), "held_back_crops_available": int(len(held)),
                                     "warning": None if n >= 256 else
                                     f"n = {n} < 256 crops: FID is biased upwards at small n, compare only "
                                     "against the real-vs-real row at the same n"}
            options = ScoreOptions(kid_subset_size=max(2, n // 2), kid_subsets=100)
            entry["real_vs_real"] = scorer.score(held_n, real_train[:n], options)
            entry["real_vs_real"]["stain_wasserstein"] = stain_distances(held_n, real_train[:n])
            entry["real_vs_real"]["fixed_line_ratio"] = fixed_line_ratio(real_train[:n])
            entry["real_vs_real"]["grid_ratio"] = upsampling_grid_ratio(real_train[:n])
            entry["held_back_nucleus_contrast"] = contrast_summary(held_contrast)
            entry["real_vs_real"]["nucleus_contrast"] = contrast_scores(
                held_contrast, nucleus_contrast(real_train[:n], mask_instances[:n]))
            for version in labels_with_renders(versions):  # REAL's crops are real_vs_real's
                synthetic = np.load(data_dir / f"{dataset}-seed{seed0}-v{version}.npz")["images"][:n]
                entry[f"v{version}"] = scorer.score(held_n, synthetic, options)
                entry[f"v{version}"]["stain_wasserstein"] = stain_distances(held_n, synthetic)
                entry[f"v{version}"]["fixed_line_ratio"] = fixed_line_ratio(synthetic)
                entry[f"v{version}"]["grid_ratio"] = upsampling_grid_ratio(synthetic)
                entry[f"v{version}"]["nucleus_contrast"] = contrast_scores(
                    held_contrast, nucleus_contrast(synthetic, mask_instances[:n]))
            out[dataset] = entry
    return out


# ============================================================================================ report
def _title(label: str) -> str:
    """"2" -> "v2"; "2-openvino-bf16" -> "v2 (openvino bf16)"; "real" -> the ceiling."""
    if label == REAL:
        return "ceiling (real images of the rendered masks)"
    version, variant = parse_label(label)
    return f"v{version}" + (f" ({variant_description(variant)})" if variant else "")


def _pm(stats: Mapping[str, Any] | None) -> str:
    return "–" if stats is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _diff(stats: Mapping[str, Any] | None) -> str:
    if stats is None:
        return "–"
    return f"{stats['mean']:+.3f} ± {stats['std']:.3f} (p = {stats['p_paired_t']:.3f}, {stats['higher']}/{stats['n']})"


def summarize(settings: Settings, results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
              versions: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for dataset in settings.datasets:
        organs = sorted({t["organ"] for t in meta[dataset]["test"]})
        for k in settings.ks[dataset]:
            for version in versions:
                key = f"{dataset}/k{k}/v{version}"
                entry: dict[str, Any] = {"arms": {arm: arm_scores(results, dataset, k, arm, version) for arm in ARMS},
                                         "paired": {f"{arm}-A": {m: paired(results, dataset, k, arm, version, m)
                                                                 for m in METRICS} for arm in ("B", "C")}}
                entry["per_organ"] = {}
                for organ in organs:
                    subset = [i for i, t in enumerate(meta[dataset]["test"]) if t["organ"] == organ]
                    entry["per_organ"][organ] = {
                        "tiles": len(subset),
                        "arms": {arm: arm_scores(results, dataset, k, arm, version, subset) for arm in ARMS},
                        "B-A": {m: paired(results, dataset, k, "B", version, m, subset) for m in METRICS}}
                if REAL in versions and version != REAL:  # the renderer's gap to the ceiling
                    entry["vs_real"] = {arm: {m: paired_labels(results, dataset, k, arm, version, REAL, m)
                                              for m in METRICS} for arm in ("B", "C")}
                if parse_label(version)[1] is not None:
                    entry["vs_fp32"] = {arm: {m: paired_variant(results, dataset, k, arm, version, m) for m in METRICS}
                                        for arm in ("B", "C")}
                seen = meta[dataset]["renderers"][version]["saw_held_back"]
                if seen:  # the same scores on the held-back images this renderer never trained on
                    subset = [i for i, t in enumerate(meta[dataset]["test"]) if t["group"] not in seen]
                    entry["unseen_by_renderer"] = {"excluded_groups": seen, "tiles": len(subset), "B-A": {
                        m: paired(results, dataset, k, "B", version, m, subset) if subset else None
                        for m in METRICS}}
                summary[key] = entry
    return summary


def done_when(summary: Mapping[str, Any], version: str,
              distribution: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Issue #17's acceptance checks for one renderer version, on MoNuSeg.

    With the distribution scores, also the render checks: encoder FID <= 1.5x real-vs-real at equal n, recall >= 0.3,
    and H and nucleus contrast "within the real-vs-real spread", read as: the renders' 1-D Wasserstein distance to the
    held-back crops is at most that of real crops from the training tiles."""
    k16, k64 = summary.get(f"monuseg/k16/v{version}"), summary.get(f"monuseg/k64/v{version}")
    checks: dict[str, Any] = {}
    rendered = (distribution or {}).get(f"v{version}")
    if rendered is not None:
        reference = distribution["real_vs_real"]
        checks["FID <= 1.5x real-vs-real"] = bool(rendered["fid"] <= 1.5 * reference["fid"])
        checks["recall >= 0.3"] = bool(rendered["recall"] >= 0.3)
        checks["W1 H <= real-vs-real"] = bool(rendered["stain_wasserstein"]["H"] <= reference["stain_wasserstein"]["H"])
        checks["W1 nucleus contrast <= real-vs-real"] = bool(
            rendered["nucleus_contrast"]["w1_to_held_back"] <= reference["nucleus_contrast"]["w1_to_held_back"])
    # A check whose arm was not trained (--arms) is left out rather than reported as failed.
    if k16 and k16["arms"]["B"] is not None:
        for metric in ("pixel_dice", "object_f1"):
            d = k16["paired"]["B-A"][metric]
            checks[f"k16 B-A {metric} >= +0.03, p < 0.05"] = bool(d and d["mean"] >= 0.03 and d["p_paired_t"] < 0.05)
    if k16 and k16["arms"]["C"] is not None:
        c = k16["paired"]["C-A"]["pixel_dice"]
        checks["k16 C within 0.05 Dice of A"] = bool(c and c["mean"] >= -0.05)
    if k64 and k64["arms"]["B"] is not None:
        d = k64["paired"]["B-A"]["pixel_dice"]
        f = k64["paired"]["B-A"]["object_f1"]
        checks["k64 B >= A (Dice and object F1)"] = bool(d and f and d["mean"] >= 0 and f["mean"] >= 0)
    return checks


def write_report(out: Path, command: str, settings: Settings, meta: Mapping[str, Any],
                 results: Sequence[Mapping[str, Any]], distributions: Mapping[str, Any], versions: Sequence[str],
                 data_dir: Path, runs_dir: Path, started: float) -> Path:
    report = ExperimentReport(NAME, command, out)
    report.started = started
    summary = summarize(settings, results, meta, versions)
    checks = {f"v{v}": done_when(summary, v, distributions.get("monuseg")) for v in versions}
    gains = {f"{d}/A(k{max(settings.ks[d])})-A(k{min(settings.ks[d])})":
             {m: real_data_gain(results, d, min(settings.ks[d]), max(settings.ks[d]), m) for m in METRICS}
             for d in settings.datasets if len(settings.ks[d]) > 1}
    grids = _grids(report, settings, data_dir, runs_dir, versions)
    report.results = {"settings": _jsonable(asdict(settings)), "split": {d: {k: meta[d][k] for k in (
        "train_groups", "test_groups", "test", "renderers")} for d in settings.datasets},
        "seeds": {d: meta[d]["seeds"] for d in settings.datasets}, "summary": summary, "done_when": checks,
        "real_data_gain": gains,
        "distribution": distributions, "runs": [{k: v for k, v in r.items() if k != "loss_curve"} for r in results],
        "grids": grids}
    sections = []
    for key, entry in summary.items():
        dataset, k_label, v_label = key.split("/")
        version = v_label[1:]  # "v2" / "v2-openvino-bf16" -> the renderer label
        k = int(k_label[1:])
        rows = [[ARM_NAMES[arm]] + [_pm((entry["arms"][arm] or {}).get(m)) for m in METRICS] for arm in ARMS]
        diff_rows = [[f"{arm} − A"] + [_diff(entry["paired"][f"{arm}-A"][m]) for m in METRICS] for arm in ("B", "C")]
        organ_rows = [[organ, str(o["tiles"])] + [_pm((o["arms"][arm] or {}).get("pixel_dice")) for arm in ARMS]
                      + [_diff(o["B-A"]["pixel_dice"]), _diff(o["B-A"]["object_f1"])]
                      for organ, o in entry["per_organ"].items()]
        unseen = entry.get("unseen_by_renderer")
        unseen_line = "" if not unseen else (
            f"\nThis renderer trained on held-back group(s) {', '.join(unseen['excluded_groups'])}; on the other "
            f"{unseen['tiles']} images B − A is Dice {_diff(unseen['B-A']['pixel_dice'])}, object F1 "
            f"{_diff(unseen['B-A']['object_f1'])}.\n")
        vs_fp32 = entry.get("vs_fp32")
        base, variant = parse_label(version)
        stained = variant == STAIN_VARIANT
        variant_lines = "" if not vs_fp32 else "\n" + (
            f"Same masks and render seeds as {RENDERER} v{base} at fp32 (ONNX Runtime), "
            + (f"restained by Render's stain variation ({dataset} rows of the stain bank); arm minus the same arm "
               "without it" if stained else
               f"rendered on {variant_description(variant or '')}; arm minus the same arm at fp32")
            + ", paired by seed:\n\n" + table(
                ["paired difference", "pixel Dice", "object F1", "AJI"],
                [[f"{arm} {_title(version)} − {arm} {'plain' if stained else 'fp32'}"]
                 + [_diff(vs_fp32[arm][m]) for m in METRICS] for arm in ("B", "C")]))
        vs_real = entry.get("vs_real")
        if vs_real:
            variant_lines += "\n" + (
                "The renders against the ceiling (the same arm trained on the real images of the same masks), paired "
                "by seed:\n\n" + table(["paired difference", "pixel Dice", "object F1", "AJI"],
                                        [[f"{arm} {_title(version)} − {arm} real"] + [_diff(vs_real[arm][m])
                                                                                  for m in METRICS]
                                         for arm in ("B", "C")]))
        source = "" if version == REAL else f"renderer {RENDERER} "
        sections.append(f"""### {dataset}, k = {k}, m = {settings.synthetic_factor * k}, {source}{_title(version)}

{table(["arm", "pixel Dice", "object F1 (IoU > 0.5)", "AJI"], rows)}
{table(["paired difference", "pixel Dice", "object F1", "AJI"], diff_rows)}
Per organ (pixel Dice; differences paired by seed):

{table(["organ", "images", "A", "B", "C", "B − A Dice", "B − A object F1"], organ_rows)}{unseen_line}{variant_lines}""")
    dist_rows = []
    for dataset, entry in distributions.items():
        for name in ["real_vs_real"] + [f"v{v}" for v in labels_with_renders(versions)]:
            s = entry[name]
            label = ("real (training tiles) vs held-back" if name == "real_vs_real"
                     else f"{RENDERER} {_title(name[1:])} vs held-back")
            contrast = s["nucleus_contrast"]
            dist_rows.append([dataset, label, str(entry["n"]), f"{s['fid']:.1f}", f"{s['kid_mean']:.4f}",
                              f"{s['precision']:.3f}", f"{s['recall']:.3f}",
                              f"{s['stain_wasserstein']['H']:.4f}", f"{s['stain_wasserstein']['E']:.4f}",
                              f"{contrast['mean']:.4f} ± {contrast['std']:.4f}", f"{contrast['w1_to_held_back']:.4f}",
                              f"{s['fixed_line_ratio']:.2f}", f"{s['grid_ratio']:.2f}"])
        held = entry["held_back_nucleus_contrast"]
        dist_rows.append([dataset, "held-back crops themselves", str(entry["n"]), "", "", "", "", "", "",
                          f"{held['mean']:.4f} ± {held['std']:.4f}", "", "", ""])
    warnings = [f"- {d}: {e['warning']}" for d, e in distributions.items() if e.get("warning")]
    if distributions:
        e = next(iter(distributions.values()))["real_vs_real"]["extractor"]
        extractor = f"{e['name']} v{e['version']} ({e['family']}, standard FID: {e['standard_fid']})"
        distribution_section = f"""## Distribution and stain scores (seed {settings.seeds[0]}'s synthetic crops)

Extractor: `{extractor}`. KID subsets of n/2. Stain: 1-D Wasserstein distance of rgb2hed optical densities.
Nucleus contrast: per crop, mean rgb2hed H inside the crop's nuclei minus outside (held-back crops with their true
masks; real training crops and renders with the masks the renders were made from), mean ± std and its W1 distance to
the held-back crops' values. Fixed-line ratio: the strongest row or column edge at a fixed position, averaged over the
crops, over its median (`fixed_line_ratio`; real crops cut at random positions 1.05-1.25, higher = a line the
generator draws at a fixed offset from the border). Grid ratio: mean power at the spatial frequencies of a 2, 4 or 8 px
period over the power one frequency bin beside them (`upsampling_grid_ratio`; about 1 for real tissue, higher = the
transposed-convolution checkerboard).
{chr(10).join(warnings)}

{table(["data", "set", "n", "FID", "KID", "precision", "recall", "W1 H", "W1 E", "nucleus contrast",
        "W1 contrast", "fixed-line ratio", "grid ratio"], dist_rows)}
"""
    else:
        distribution_section = "## Distribution and stain scores\n\nNot computed in this run (--no-distribution).\n"
    check_rows = [["ceiling (real)" if version == f"v{REAL}" else version, name, "yes" if ok else "**no**"]
                  for version, c in checks.items() for name, ok in c.items()]
    gain_rows = [[key.split("/")[0], key.split("/")[1].replace("-", " − ")] + [_diff(g[m]) for m in METRICS]
                 for key, g in gains.items()]
    gain_section = "" if not gain_rows else f"""
What more real data buys under the same protocol (arm A at the largest k minus arm A at the smallest, same seeds,
nested draws): the yardstick for B − A.

{table(["data", "difference", "pixel Dice", "object F1", "AJI"], gain_rows)}"""
    ceiling_rows = [[key.split("/")[0], key.split("/")[1][1:], f"{arm} real − A"]
                    + [_diff(entry["paired"][f"{arm}-A"][m]) for m in METRICS]
                    for key, entry in summary.items() if key.endswith(f"/v{REAL}") for arm in ("B", "C")]
    if ceiling_rows:
        gain_section += f"""
The ceiling: arms B and C trained on the real images of the very masks that were rendered (a renderer
indistinguishable from real tissue). B(real) − A is what such a renderer would add under this protocol: the reference
for B − A (a renderer could only beat it by drawing tissue easier to learn from than real tissue).

{table(["data", "k", "difference", "pixel Dice", "object F1", "AJI"], ceiling_rows)}"""
    total_minutes = sum(r["train_seconds"] for r in results) / 60
    precision_names = [name for name in settings.precision_variants if name in PRECISION_VARIANTS]
    variant_protocol = "" if not precision_names else (
        "\n  Precision variants (" + ", ".join(f"{name}: {variant_description(name)}" for name in precision_names)
        + "): the same masks and render seeds through the same Render service on that engine and precision; "
        "their arms are also compared with the fp32 arms, paired by seed.")
    if STAIN_VARIANT in settings.precision_variants:
        variant_protocol += ("\n  Stain variation (label <version>-stain): the same masks and render seeds, each "
                             "render restained by Render's stain_variation to a row of the renderer's stain bank "
                             "drawn from the benchmark dataset's own rows (stain_source = the dataset); its arms are "
                             "also compared with the plain renders' arms, paired by seed.")
    markdown = f"""
## Acceptance (issue #17, MoNuSeg held-back patients)

{table(["renderer", "check", "met"], check_rows)}{gain_section}
## Downstream segmentation (held-back images, mean ± std over seeds {list(settings.seeds)})

Differences are arm − A per seed: mean ± std (two-sided paired t-test p, seeds where the arm is higher).

{chr(10).join(sections)}
{distribution_section}Grids: `segmentation.png` (held-back crop | truth | A | B | C, k = {min(min(v) for v in settings.ks.values())}, seed
{settings.seeds[0]}; classes: interior, boundary), `synthetic_<dataset>.png` (mask | render per version | real image of
that mask).

## Protocol

- Held-back (never trained on by the segmenters here, nor by any renderer version unless listed above):
  {'; '.join(f"{d}: {', '.join(meta[d]['test_groups'])}" for d in settings.datasets)}.
  Scored whole ({', '.join(f"{d}: {len(meta[d]['test'])} images" for d in settings.datasets)}).
- Per seed the training groups are shuffled and halved: k real {settings.crop} px crops from one half, the
  masks of m = {settings.synthetic_factor}k crops from the other half rendered through the gRPC Render service
  (mask-rendering server on loopback, ONNX Runtime CPU, each crop in one piece via HISTOSYNTH_RENDER_TILE_SIZE;
  class ids remapped as each renderer was trained, instance maps passed for edges, render seed fixed per seed). Draws are nested: k = 16 uses the first 16 of the k = 64 crops.{variant_protocol}
- Segmenter: `TissueSegmenter` U-Net (base 16, depth 3), 3 classes (background, nucleus interior, 1-2 px
  nucleus boundary); loss CE (boundary weight 2) + soft Dice on nucleus; AdamW lr {settings.lr}, warm-up +
  cosine; {settings.steps} steps of batch {settings.batch_size} ({settings.train_crop} px random sub-crops, flips,
  rot90, rgb2hed stain jitter ±5 % scale / ±0.01 shift) in every arm; bf16 autocast; B batches are half real,
  half synthetic. Same init and batch-order RNG in all arms of a seed. The final step is scored.
- Instances: connected interior regions grown {3} px over predicted nucleus pixels, fragments < 16 px dropped.
  Pixel Dice and object F1 pool the images; AJI is the mean over images.
- Compute: {len(results)} runs, {total_minutes:.1f} min of training in total on a 2-core CPU shared with other jobs,
  {settings.parallel} run(s) at a time, 1 thread each.
"""
    return report.write(markdown)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _colour(prediction: np.ndarray) -> np.ndarray:
    palette = np.array([[0, 0, 0], [255, 225, 25], [230, 25, 75]], np.uint8)
    return palette[np.clip(prediction, 0, 2)]


def _grids(report: ExperimentReport, settings: Settings, data_dir: Path, runs_dir: Path,
           versions: Sequence[str]) -> list[str]:
    files = []
    seed = settings.seeds[0]
    rows = []
    for dataset in settings.datasets:
        test = np.load(data_dir / f"{dataset}-test.npz")
        k = min(settings.ks[dataset])
        truth = three_class_target(test["instances"][0][:256, :256])
        row = [test["images"][0][:256, :256], _colour(truth)]
        rendered = labels_with_renders(versions)
        newest = [label for label in rendered if parse_label(label)[1] is None][-1:] or rendered[-1:]
        for arm, version in [("A", "")] + [(arm, newest[0]) for arm in ("B", "C")]:
            run = runs_dir / RunSpec(dataset, k, seed, arm, version, "", "", "", "", {}).key / "preview.npz"
            if run.is_file():
                row.append(_colour(np.load(run)["prediction"]))
        rows.append(row)
    files.append(report.save_grid("segmentation.png", rows))
    for dataset in settings.datasets:
        arrays = np.load(data_dir / f"{dataset}-seed{seed}.npz")
        renders = [np.load(data_dir / f"{dataset}-seed{seed}-v{v}.npz")["images"]
                   for v in labels_with_renders(versions)]
        grid = [[_colour(three_class_target(arrays["mask_instances"][i]))] + [r[i] for r in renders]
                + [arrays["mask_source_images"][i]] for i in range(min(4, len(arrays["mask_instances"])))]
        files.append(report.save_grid(f"synthetic_{dataset}.png", grid))
    return files


# ============================================================================================ driver
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.experiments.downstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / NAME)
    parser.add_argument("--store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--runs-dir", type=Path, help="the runs cache (default: one per step budget, see default_runs_dir)")
    parser.add_argument("--quick", action="store_true", help="fixture-sized smoke run (CI)")
    parser.add_argument("--versions", nargs="*", help=f"{RENDERER} versions (default: the served one, the store's latest)")
    parser.add_argument("--seeds", type=int, nargs="*")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--parallel", type=int)
    parser.add_argument("--no-distribution", action="store_true", help="skip FID/KID/PR and stain scores")
    parser.add_argument("--stain-variation", action="store_true",
                        help="also render the same masks with Render's stain variation (cached as <version>-stain) "
                        "and pair their arms with the plain renders'")
    parser.add_argument("--precision-variants", nargs="*", default=[], choices=sorted(PRECISION_VARIANTS),
                        help="also render the same masks with each version on this engine/precision (cached as "
                        "<version>-<variant>) and pair their arms with fp32")
    parser.add_argument("--datasets", nargs="*", help="a subset of the datasets (default: all)")
    parser.add_argument("--ks", type=int, nargs="*", help="a subset of k (real crops), for every dataset")
    parser.add_argument("--no-real-ceiling", action="store_true",
                        help="skip the ceiling arms (B and C on the real images of the rendered masks)")
    parser.add_argument("--arms", nargs="*", choices=["B", "C"], default=["B", "C"],
                        help="renderer arms to train beside A (default both; A always runs, every arm pairs with it)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.datasets:
        unknown = sorted(set(args.datasets) - set(settings.datasets))
        if unknown:
            parser.error(f"--datasets {unknown}: valid {list(settings.datasets)}")
        settings = replace(settings, datasets=tuple(args.datasets))
    if args.ks:
        ks = {d: tuple(k for k in settings.ks[d] if k in args.ks) for d in settings.datasets}
        if not all(ks.values()):
            parser.error(f"--ks {args.ks}: each dataset needs one of its k values {dict(settings.ks)}")
        settings = replace(settings, ks=ks, draw_k={d: max(settings.ks[d]) for d in settings.datasets})
    variants = [*args.precision_variants, *([STAIN_VARIANT] if args.stain_variation else [])]
    if variants:
        settings = replace(settings, precision_variants=tuple(dict.fromkeys(variants)))
    for name in ("steps", "parallel"):
        if getattr(args, name) is not None:
            settings = replace(settings, **{name: getattr(args, name)})
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.no_real_ceiling:
        settings = replace(settings, real_ceiling=False)
    versions = tuple(args.versions) if args.versions else (ModelStore(args.store).get(RENDERER).version,)
    if args.runs_dir is None:
        args.runs_dir = default_runs_dir(settings.steps)
    labels = renderer_labels(versions, settings.precision_variants) + ((REAL,) if settings.real_ceiling else ())
    command = "python -m training.experiments.downstream " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.time()
    data_dir = args.runs_dir / "data"
    meta = prepare(settings, args.data_root, args.store, data_dir, labels)
    specs = []
    plain = _jsonable(asdict(settings))
    for k_rank in range(max(len(v) for v in settings.ks.values())):  # every k = 16 run before any k = 64 run
        for dataset in settings.datasets:
            if k_rank >= len(settings.ks[dataset]):
                continue
            k = settings.ks[dataset][k_rank]
            for seed in settings.seeds:
                arms = [("A", "")] + [(arm, v) for v in labels for arm in ("B", "C") if arm in args.arms]
                for arm, version in arms:
                    spec = RunSpec(dataset, k, seed, arm, version, "", str(data_dir / f"{dataset}-seed{seed}.npz"),
                                   str(data_dir / f"{dataset}-seed{seed}-v{version}.npz")
                                   if version and version != REAL else "",
                                   str(data_dir / f"{dataset}-test.npz"), plain)
                    specs.append(replace(spec, run_dir=str(args.runs_dir / spec.key)))
    results = run_all(specs, settings.parallel)
    distributions = {} if args.no_distribution else distribution_scores(settings, data_dir, args.store, labels)
    path = write_report(args.out, command, settings, meta, results, distributions, labels, data_dir, args.runs_dir,
                        started)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
