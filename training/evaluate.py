"""Held-back evaluation of the shipped renderers and the mask refiner through the real serving path.

    python -m training.evaluate --model renderer-he-nuclei [--data-root ../shared/data] [--max-images N]
    python -m training.evaluate --all

Renderers: the test split of the model's own recorded split (the manifest's provenance config: sources,
fractions, seed; cross-checked against provenance.split.groups.test) gives held-back tiles. N random crops of
the training crop size (equal share per source, fixed seed) give paired (class map, real image) crops; the
class maps are rendered by RenderingPipeline over a ModelHost (ONNX Runtime, as the mask-rendering service
does) and compared with the real crops of the same places:
  * FID, KID (mean, std over subsets), improved precision/recall on the histology-encoder features
    (services.scoring.distances; encoder name, version and sha256 recorded);
  * mask-image consistency: mean mIoU of the matching segmenter on the rendered images vs the input masks
    (ConsistencyScorer), next to the same segmenter on the real images vs their masks (the ceiling);
  * a real-vs-real reference: the real crops in two disjoint random halves A/B (FID etc. of A vs B), and the
    synthetic crops of half A vs the real crops of half B at the same sample size, so the scores have scale
    (FID is biased upwards at small N, so only numbers at equal N compare).
Mask refiner: crops of its test tiles; real fine mask = tissue_mask(crop), coarse = coarsen_mask(fine) with
the manifest's coarsening (its training recipe); PriorPath-style shape statistics (services.scoring.mask_stats:
per-object tissue features pooled over the crops, KS and Jensen-Shannon divergence) of refined vs real fine masks,
next to the coarse masks as they are.

Results go to bench/results/model_eval/<model>.json; ``--update-store`` (the default for the CLI) also writes
the headline numbers into the model's manifest ``metrics`` (eval_* keys) and MODEL_CARD.md "Scores" section.
model.onnx is never touched (the manifest's sha256 covers only it); the store is re-read afterwards to prove
the model still loads. Numpy + ONNX Runtime only: no torch (except the GlaS tissue/gland derivation, which
lives beside the torch datasets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import yaml

from services.core import mask_ops
from services.core.model_store import ModelManifest, ModelStore
from services.mask_refinement.pipeline import RefinementPipeline
from services.mask_rendering.pipeline import RenderingPipeline
from services.model_host import HostSettings, ModelHost
from services.scoring import distances, mask_stats
from services.scoring.consistency import ConsistencyScorer
from services.scoring.pipeline import ScoringPipeline
from training.data.benchmark_split import held_back_groups
from training.data.shared_layout import Record, Sample, load_records, load_sample, split_records

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE = REPO_ROOT / "model_store"
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results" / "model_eval"
DEFAULT_ENCODER = "histology-encoder"
RENDERERS = ("renderer-he-nuclei", "renderer-he-glands", "renderer-ihc")
REFINERS = ("mask-refiner",)
RENDER_BATCH = 16


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class EvalSettings:
    max_images: int = 200  # crops per set (real = synthetic = this many)
    seed: int = 0
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at half the smaller set
    pr_k: int = 3
    encoder: str = DEFAULT_ENCODER

    def __post_init__(self) -> None:
        if self.max_images < 2 * (self.pr_k + 1):
            raise ValueError(f"max_images must be >= {2 * (self.pr_k + 1)} (two halves for pr_k={self.pr_k}), "
                             f"got {self.max_images}")


# ------------------------------------------------------------------------------------------ test data


def _tissue_gland(sample: Sample) -> np.ndarray:
    # Imported here: derived_labels sits beside the torch datasets, so only this derivation needs torch.
    from training.data.derived_labels import tissue_gland_class_map

    return tissue_gland_class_map(sample.image, sample.class_map)


# How a renderer source turns a sample into the renderer's class map (provenance config data.sources[].derive).
DERIVATIONS: dict[str, Callable[[Sample], np.ndarray]] = {
    "mask": lambda sample: sample.class_map,
    "tissue_gland": _tissue_gland,
}


@dataclass(frozen=True)
class Source:
    dataset: str
    derive: str
    class_remap: Mapping[int, int] = field(default_factory=dict)

    def class_map(self, sample: Sample) -> np.ndarray:
        if self.derive not in DERIVATIONS:
            raise ValueError(f"unknown derive {self.derive!r}; valid: {sorted(DERIVATIONS)}")
        classes = DERIVATIONS[self.derive](sample)
        if self.class_remap:
            lut = np.arange(256, dtype=np.uint8)
            for old, new in self.class_remap.items():
                lut[old] = new
            classes = lut[classes]
        return classes


@dataclass(frozen=True)
class HeldBack:
    crop: int
    fractions: tuple[float, float, float]  # the config's shared fractions
    split_seed: int
    sources: tuple[Source, ...]
    records: tuple[tuple[Record, ...], ...]  # test records per source
    # What each source was actually split by where it overrides the shared fractions (renderer v2+: 0.9/0.1/0
    # with the benchmark tiles forced to test); empty when every source uses `fractions`.
    source_fractions: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def split_description(self) -> list[float] | dict[str, list[float]]:
        if not self.source_fractions:
            return list(self.fractions)
        return {dataset: list(fractions) for dataset, fractions in self.source_fractions}

    @property
    def groups(self) -> list[str]:
        return sorted({r.group for recs in self.records for r in recs})


def _training_data(manifest: ModelManifest) -> Mapping[str, Any]:
    config = manifest.provenance.get("config") or {}
    data = config.get("data")
    if not isinstance(data, Mapping) or "split_fractions" not in data:
        raise ValueError(f"model {manifest.key}: provenance.config.data with split_fractions is needed to find its "
                         "held-back split")
    return data


def recorded_split(manifest: ModelManifest, data_root: Path, part: str) -> HeldBack:
    """One part (train / val / test) of the model's split, recomputed as its trainer did and checked against the
    groups its manifest recorded for that part."""
    data = _training_data(manifest)
    fractions = tuple(float(f) for f in data["split_fractions"])
    split_seed = int(data.get("split_seed", manifest.provenance.get("seed", 0)))
    if "sources" in data:  # pix2pixHD renderers: each source split on its own
        sources = tuple(
            Source(s["dataset"], s.get("derive", "mask"),
                   {int(k): int(v) for k, v in (s.get("class_remap") or {}).items()})
            for s in data["sources"]
        )
        # As the trainer splits (pix2pixhd_trainer): a source's own fractions and its forced held-back groups.
        own = tuple((s.dataset, tuple(float(f) for f in raw.get("split_fractions", fractions)))
                    for s, raw in zip(sources, data["sources"], strict=True))
        per_source = tuple(
            tuple(split_records(load_records(data_root, s.dataset), source_fractions,  # type: ignore[arg-type]
                                split_seed, held_back=held_back_groups(raw))[part])
            for s, raw, (_, source_fractions) in zip(sources, data["sources"], own, strict=True)
        )
        overrides = own if any(source_fractions != fractions for _, source_fractions in own) else ()
    else:  # pix2pix refiner: all datasets pooled, then split
        sources = (Source("+".join(data["datasets"]), "mask"),)
        pooled = [r for name in data["datasets"] for r in load_records(data_root, name)]
        per_source = (tuple(split_records(pooled, fractions, split_seed)[part]),)
        overrides = ()
    result = HeldBack(int(data["crop"]), fractions, split_seed, sources, per_source,  # type: ignore[arg-type]
                      overrides)
    recorded = ((manifest.provenance.get("split") or {}).get("groups") or {}).get(part)
    if recorded is not None and sorted(recorded) != result.groups:
        raise ValueError(f"model {manifest.key}: recomputed {part} groups {result.groups} differ from the recorded "
                         f"{sorted(recorded)}; is {data_root} the data it was trained on?")
    return result


def held_back(manifest: ModelManifest, data_root: Path) -> HeldBack:
    """The model's test split, recomputed as its trainer did and checked against the recorded groups."""
    result = recorded_split(manifest, data_root, "test")
    if not any(result.records):
        raise ValueError(f"model {manifest.key}: no test records under {data_root}")
    return result


@dataclass(frozen=True)
class Crops:
    images: np.ndarray  # uint8 [N, c, c, 3]
    class_maps: np.ndarray  # uint8 [N, c, c]
    instances: np.ndarray | None  # [N, c, c] or None when no source has instance maps
    origins: list[str]  # "image_path@y,x" per crop


def sample_crops(held: HeldBack, count: int, seed: int, class_map_of: Callable[[Source, Sample], np.ndarray]) -> Crops:
    """``count`` random crops, sources taking turns (equal share, as in training), tiles uniform within a source."""
    rng = np.random.default_rng(seed)
    cache: dict[Path, tuple[Sample, np.ndarray]] = {}
    usable = [(source, list(recs)) for source, recs in zip(held.sources, held.records) if recs]
    images, maps, instances, origins = [], [], [], []
    for index in range(count):
        source, records = usable[index % len(usable)]
        record = records[int(rng.integers(len(records)))]
        if record.image_path not in cache:
            sample = load_sample(record)
            cache[record.image_path] = (sample, class_map_of(source, sample))
        sample, classes = cache[record.image_path]
        height, width = classes.shape
        if min(height, width) < held.crop:
            raise ValueError(f"{record.image_path}: {height} x {width} is smaller than the {held.crop} px crop")
        y = int(rng.integers(height - held.crop + 1))
        x = int(rng.integers(width - held.crop + 1))
        region = (slice(y, y + held.crop), slice(x, x + held.crop))
        images.append(sample.image[region])
        maps.append(classes[region])
        instances.append(None if sample.instances is None else sample.instances[region])
        origins.append(f"{record.image_path.parent.name}/{record.image_path.name}@{y},{x}")
    instance_batch = None
    if any(i is not None for i in instances):
        # A source without instance maps gets an all-zero map: the pipeline then takes edges from its class map.
        instance_batch = np.stack([np.zeros((held.crop, held.crop), np.int32) if i is None else i.astype(np.int32)
                                   for i in instances])
    return Crops(np.stack(images), np.stack(maps).astype(np.uint8), instance_batch, origins)


# ------------------------------------------------------------------------------------------ scores


def distribution_scores(real: np.ndarray, synthetic: np.ndarray, settings: EvalSettings) -> dict[str, float]:
    # Subsets of half the smaller set, so they differ and the std over subsets means something.
    subset = max(2, min(settings.kid_subset_size, min(real.shape[0], synthetic.shape[0]) // 2))
    kid_mean, kid_std = distances.kid(real, synthetic, num_subsets=settings.kid_subsets, subset_size=subset,
                                      seed=settings.seed)
    pr = distances.precision_recall(real, synthetic, k=settings.pr_k)
    return {
        "fid": distances.fid_from_features(real, synthetic),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": subset,
        "precision": pr.precision,
        "recall": pr.recall,
        "real_count": int(real.shape[0]),
        "synthetic_count": int(synthetic.shape[0]),
    }


def _held_back_summary(data_root: Path, held: HeldBack, crop_count: int, crop_seed: int) -> dict[str, Any]:
    """Which held-back tiles and crops a result was computed on (shared by every model's report)."""
    return {
        "data_root": str(data_root),
        "split": {"fractions": held.split_description(), "seed": held.split_seed, "test_groups": held.groups},
        "test_tiles": sum(len(r) for r in held.records),
        "test_tiles_per_source": {s.dataset: len(r) for s, r in zip(held.sources, held.records)},
        "crop": held.crop,
        "crops": crop_count,
        "crop_seed": crop_seed,
    }


def _model_ref(manifest: ModelManifest) -> dict[str, str]:
    return {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256}


async def render_all(host: ModelHost, name: str, crops: Crops, seed: int, version: str = "") -> np.ndarray:
    """Every crop's class map through RenderingPipeline (the Render service's path); batch b gets seed + its start."""
    rendering = RenderingPipeline(host)
    rendered = []
    for start in range(0, len(crops.class_maps), RENDER_BATCH):
        stop = start + RENDER_BATCH
        result = await rendering.render(
            crops.class_maps[start:stop], model=name, version=version,
            instance_maps=None if crops.instances is None else crops.instances[start:stop],
            seed=seed + start,
        )
        rendered.append(result.images)
    return np.concatenate(rendered)


async def evaluate_renderer(host: ModelHost, name: str, data_root: Path, settings: EvalSettings) -> dict[str, Any]:
    served = await host.get(name)
    manifest = served.manifest
    held = held_back(manifest, data_root)
    crops = await asyncio.to_thread(sample_crops, held, settings.max_images, settings.seed,
                                    lambda source, sample: source.class_map(sample))
    started = time.perf_counter()
    synthetic = await render_all(host, name, crops, settings.seed)
    render_seconds = time.perf_counter() - started

    extractor = await ScoringPipeline(host).extractor(settings.encoder)
    real_features = (await extractor.extract(crops.images)).features.astype(np.float64)
    synthetic_features = (await extractor.extract(synthetic)).features.astype(np.float64)
    halves = np.random.default_rng(settings.seed + 1).permutation(len(crops.images))
    half_a, half_b = np.sort(halves[: len(halves) // 2]), np.sort(halves[len(halves) // 2:])

    scorer = ConsistencyScorer(host)
    synthetic_consistency = await scorer.score(synthetic, crops.class_maps, renderer=name)
    real_consistency = await scorer.score(crops.images, crops.class_maps, renderer=name)

    scores = await asyncio.to_thread(lambda: {
        "synthetic_vs_real": distribution_scores(real_features, synthetic_features, settings),
        "real_half_vs_real_half": distribution_scores(real_features[half_a], real_features[half_b], settings),
        "synthetic_half_vs_real_half": distribution_scores(real_features[half_b], synthetic_features[half_a],
                                                           settings),
    })
    classes = list(served.metadata.get("class_names") or [])
    pixel_share = np.bincount(crops.class_maps.ravel(), minlength=len(classes)) / crops.class_maps.size
    return {
        "model": _model_ref(manifest),
        "kind": "renderer",
        "serving_path": "services.mask_rendering.pipeline.RenderingPipeline over services.model_host.ModelHost "
                        "(ONNX Runtime CPU)",
        "encoder": {**_model_ref(extractor.served.manifest), "feature_dim": int(real_features.shape[1])},
        "segmenter": _model_ref(await _manifest_of(host, synthetic_consistency.segmenter.name,
                                                   synthetic_consistency.segmenter.version)),
        "data": {
            **_held_back_summary(data_root, held, len(crops.images), settings.seed),
            "sources": [s.dataset for s in held.sources],
            "class_pixel_share": {c: float(pixel_share[i]) for i, c in enumerate(classes)},
        },
        "scores": scores,
        "consistency": {
            "synthetic_mean_miou": synthetic_consistency.mean_miou,
            "real_mean_miou": real_consistency.mean_miou,
            "synthetic_miou_std": float(np.std(synthetic_consistency.miou)),
            "real_miou_std": float(np.std(real_consistency.miou)),
        },
        "render_seconds": render_seconds,
        "settings": _settings_dict(settings),
        "notes": _renderer_notes(held, len(crops.images)),
    }


async def _manifest_of(host: ModelHost, name: str, version: str) -> ModelManifest:
    return (await host.get(name, version or None)).manifest


def _sample_notes(held: HeldBack, crops: int) -> list[str]:
    tiles = sum(len(r) for r in held.records)
    notes = [
        f"{crops} random {held.crop} px crops from only {tiles} held-back tile(s) in {len(held.groups)} group(s) "
        f"({', '.join(f'{s.dataset}: {len(r)}' for s, r in zip(held.sources, held.records))}): crops overlap and "
        "are correlated, so the effective sample is far smaller than the crop count.",
        "The real-vs-real halves are crops of the same tiles (often overlapping), so that reference is the spread "
        "of resampling the same tissue, a lower bound, not the spread between patients.",
    ]
    if tiles <= 3:
        notes.append(f"Only {tiles} test tile(s): treat every number here as anecdotal.")
    return notes


def _renderer_notes(held: HeldBack, crops: int) -> list[str]:
    return [
        *_sample_notes(held, crops),
        "FID is biased upwards at small N and with a 256-d encoder; compare synthetic_half_vs_real_half with "
        "real_half_vs_real_half (same N), not with published Inception FIDs.",
        "Features are from the project's own histology-encoder (not Inception): numbers are comparable only "
        "between runs with the same encoder sha256.",
    ]


def _settings_dict(settings: EvalSettings) -> dict[str, Any]:
    return {"max_images": settings.max_images, "seed": settings.seed, "kid_subsets": settings.kid_subsets,
            "pr_k": settings.pr_k}


# Shape statistics of binary tissue masks: tissue objects only (air is the complement of tissue, and air inside
# tissue is the tissue objects' holes), objects touching the crop border measured as cut (tissue regions are large
# next to a crop, so excluding them would leave only small islands; every set has the same crop size).
TISSUE_MASK_CLASSES: Final = (1,)
TISSUE_BORDER_OBJECTS: Final = True


def tissue_mask_features(masks: np.ndarray) -> list[mask_stats.MaskSetFeatures]:
    """Per-mask shape features of binary tissue masks, as tissue_shape_scores measures them (for a bootstrap)."""
    return [mask_stats.mask_set_features([mask], TISSUE_MASK_CLASSES, include_border_objects=TISSUE_BORDER_OBJECTS)
            for mask in masks]


def tissue_shape_scores(real: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """mask_stats shape statistics of binary tissue masks ``other`` vs ``real`` (MaskSetComparison.as_dict())."""
    return mask_stats.score_mask_sets(real, other, TISSUE_MASK_CLASSES,
                                      include_border_objects=TISSUE_BORDER_OBJECTS).as_dict()


@dataclass(frozen=True)
class RefinerMasks:
    """Held-back (real fine, coarse) mask pairs for a refiner, made with its own training recipe."""

    held: HeldBack
    fine: np.ndarray  # uint8 [N, H, W], tissue_mask of the real crops
    coarse: np.ndarray  # uint8 [N, H, W], coarsen_mask(fine) with the manifest's opening/closing
    stain: str
    open_size: int
    close_size: int


def refiner_masks(manifest: ModelManifest, data_root: Path, settings: EvalSettings) -> RefinerMasks:
    data = _training_data(manifest)
    held = held_back(manifest, data_root)
    stain = str(data.get("stain", manifest.metadata.get("stain", "he")))
    coarsening = manifest.metadata.get("coarsening") or {}
    open_size = int(coarsening.get("open_size", data.get("open_size", 5)))
    close_size = int(coarsening.get("close_size", data.get("close_size", 10)))
    crops = sample_crops(held, settings.max_images, settings.seed, lambda source, sample: sample.class_map)
    fine = np.stack([mask_ops.tissue_mask(image, stain) for image in crops.images]).astype(np.uint8)
    coarse = np.stack([mask_ops.coarsen_mask(mask.astype(bool), open_size, close_size) for mask in fine])
    return RefinerMasks(held, fine, coarse.astype(np.uint8), stain, open_size, close_size)


async def refine_all(host: ModelHost, name: str, coarse: np.ndarray, version: str = "") -> np.ndarray:
    """Every coarse mask through RefinementPipeline (the Refine service's path), in batches of RENDER_BATCH."""
    refinement = RefinementPipeline(host, default_model=name)
    return np.concatenate([
        (await refinement.refine(coarse[start:start + RENDER_BATCH], model=name, version=version)).fine_masks
        for start in range(0, len(coarse), RENDER_BATCH)
    ])


async def evaluate_refiner(host: ModelHost, name: str, data_root: Path, settings: EvalSettings) -> dict[str, Any]:
    manifest = (await host.get(name)).manifest
    masks = await asyncio.to_thread(refiner_masks, manifest, data_root, settings)
    held, fine, coarse = masks.held, masks.fine, masks.coarse
    stain, open_size, close_size = masks.stain, masks.open_size, masks.close_size
    started = time.perf_counter()
    refined = await refine_all(host, name, coarse)
    refine_seconds = time.perf_counter() - started

    def tables() -> dict[str, Any]:
        return {
            "refined_vs_real_fine": tissue_shape_scores(fine, refined),
            "coarse_vs_real_fine": tissue_shape_scores(fine, coarse),
            "pixel_agreement": {
                "refined_vs_fine": float(np.mean(refined == fine)),
                "coarse_vs_fine": float(np.mean(coarse == fine)),
            },
        }

    scores = await asyncio.to_thread(tables)
    return {
        "model": _model_ref(manifest),
        "kind": "refiner",
        "serving_path": "services.mask_refinement.pipeline.RefinementPipeline over services.model_host.ModelHost "
                        "(ONNX Runtime CPU)",
        "data": {
            **_held_back_summary(data_root, held, len(fine), settings.seed),
            "fine_mask": f"tissue_mask(crop, {stain!r})",
            "coarse_mask": f"coarsen_mask(fine, open {open_size}, close {close_size}) (the training recipe)",
        },
        "scores": scores,
        "refine_seconds": refine_seconds,
        "settings": _settings_dict(settings),
        "notes": [
            _sample_notes(held, len(fine))[0] + " KS p-values overstate the evidence.",
            *_sample_notes(held, len(fine))[2:],
            "Shape statistics (services/scoring/mask_stats.py): per-object features of tissue (class 1) objects "
            "pooled over the crops, border objects measured as cut; mean KS and mean Jensen-Shannon divergence "
            "(bits, 20 shared bins) over the object features; lower = closer to the real fine masks.",
        ],
    }


EVALUATORS = {"renderer": evaluate_renderer, "refiner": evaluate_refiner}


# ------------------------------------------------------------------------------------------ store update


def headline_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    """The eval_* entries written into the manifest's metrics."""
    data = result["data"]
    base = {"eval_crops": data["crops"], "eval_crop": data["crop"], "eval_test_tiles": data["test_tiles"]}
    if result["kind"] == "renderer":
        full = result["scores"]["synthetic_vs_real"]
        half = result["scores"]["synthetic_half_vs_real_half"]
        ref = result["scores"]["real_half_vs_real_half"]
        return {
            **base,
            "eval_encoder": f"{result['encoder']['name']}/{result['encoder']['version']}",
            "eval_encoder_sha256": result["encoder"]["sha256"],
            "eval_fid": round(full["fid"], 4),
            "eval_kid_mean": round(full["kid_mean"], 6),
            "eval_kid_std": round(full["kid_std"], 6),
            "eval_precision": round(full["precision"], 4),
            "eval_recall": round(full["recall"], 4),
            "eval_fid_half": round(half["fid"], 4),
            "eval_fid_real_vs_real_half": round(ref["fid"], 4),
            "eval_kid_real_vs_real_half": round(ref["kid_mean"], 6),
            "eval_consistency_miou": round(result["consistency"]["synthetic_mean_miou"], 4),
            "eval_consistency_miou_real": round(result["consistency"]["real_mean_miou"], 4),
            "eval_segmenter": f"{result['segmenter']['name']}/{result['segmenter']['version']}",
        }
    refined = result["scores"]["refined_vs_real_fine"]
    coarse = result["scores"]["coarse_vs_real_fine"]
    shape = {  # a mean over no compared object is left out rather than written as null
        key: value for key, value in (
            ("eval_mean_ks_refined", _round(refined["mean_ks"])), ("eval_mean_js_refined", _round(refined["mean_js"])),
            ("eval_mean_ks_coarse", _round(coarse["mean_ks"])), ("eval_mean_js_coarse", _round(coarse["mean_js"])))
        if value is not None
    }
    return {
        **base,
        **shape,
        "eval_pixel_agreement_refined": round(result["scores"]["pixel_agreement"]["refined_vs_fine"], 4),
        "eval_pixel_agreement_coarse": round(result["scores"]["pixel_agreement"]["coarse_vs_fine"], 4),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def scores_section(result: Mapping[str, Any], command: str) -> str:
    data = result["data"]
    lines = [
        "## Scores",
        "",
        f"Held-back evaluation (`{command}`, training/evaluate.py): {data['crops']} random {data['crop']} px crops "
        f"(seed {data['crop_seed']}) of the {data['test_tiles']} test-split tile(s) "
        f"({len(data['split']['test_groups'])} group(s), split {data['split']['fractions']} "
        f"seed {data['split']['seed']}), through {result['serving_path']}. "
        "Full results: `bench/results/model_eval/" + result["model"]["name"] + ".json`.",
        "",
    ]
    if result["kind"] == "renderer":
        s = result["scores"]
        enc = result["encoder"]
        lines += [
            f"Features: `{enc['name']}` v{enc['version']} ({enc['feature_dim']}-d, sha256 `{enc['sha256'][:16]}…`), "
            "not Inception: compare only with numbers from the same encoder.",
            "",
            "| comparison | N real / synthetic | FID | KID (mean ± std) | precision | recall |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (("synthetic_vs_real", "synthetic vs real"),
                           ("synthetic_half_vs_real_half", "synthetic (half A) vs real (half B)"),
                           ("real_half_vs_real_half", "real (half A) vs real (half B) — reference")):
            row = s[key]
            lines.append(f"| {label} | {row['real_count']} / {row['synthetic_count']} | {_fmt(row['fid'])} | "
                         f"{_fmt(row['kid_mean'], 3)} ± {_fmt(row['kid_std'], 2)} | {row['precision']:.3f} | "
                         f"{row['recall']:.3f} |")
        c = result["consistency"]
        seg = result["segmenter"]
        lines += [
            "",
            f"Mask-image consistency (`{seg['name']}` v{seg['version']}, mean per-crop mIoU vs the input mask): "
            f"rendered {c['synthetic_mean_miou']:.3f} (std {c['synthetic_miou_std']:.3f}); real images of the same "
            f"crops {c['real_mean_miou']:.3f} (std {c['real_miou_std']:.3f}, the segmenter's own ceiling).",
        ]
    else:
        s = result["scores"]
        lines += [
            "PriorPath-style shape statistics (services/scoring/mask_stats.py: tissue objects pooled over the "
            "crops, border objects measured as cut), means over the object features; lower = closer to the real "
            "fine masks:",
            "",
            "| masks vs real fine masks | tissue objects | mean KS | mean JS (bits) | object features with KS p < 0.05 "
            "| pixel agreement |",
            "|---|---|---|---|---|---|",
        ]
        for key, label, agree in (("refined_vs_real_fine", "refined (model output)", "refined_vs_fine"),
                                  ("coarse_vs_real_fine", "coarse input as is", "coarse_vs_fine")):
            row = s[key]
            objects = sum(f["group"] == "object" for f in row["per_feature"].values())
            lines.append(f"| {label} | {row['synthetic_objects']} (real {row['real_objects']}) | "
                         f"{_fmt3(row['mean_ks'])} | {_fmt3(row['mean_js'])} | "
                         f"{row['features_ks_p_below_0.05']} / {objects} | "
                         f"{s['pixel_agreement'][agree]:.3f} |")
    lines += ["", "Caveats: " + " ".join(result["notes"]), ""]
    return "\n".join(lines)


def _fmt3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def replace_scores_section(card: str, section: str) -> str:
    match = re.search(r"^## Scores\b.*?(?=^## |\Z)", card, flags=re.S | re.M)
    if match is None:
        return card.rstrip("\n") + "\n\n" + section
    return card[: match.start()] + section + ("\n" if match.end() < len(card) else "") + card[match.end():]


def update_store(store_root: Path, result: Mapping[str, Any], command: str) -> None:
    """Write eval_* metrics into manifest.yaml and the Scores section of MODEL_CARD.md; model.onnx untouched."""
    store = ModelStore(store_root)
    manifest = store.get(result["model"]["name"], result["model"]["version"])
    if manifest.sha256 != result["model"]["sha256"]:
        raise ValueError(f"{manifest.key}: store sha256 {manifest.sha256} is not the evaluated "
                         f"{result['model']['sha256']}; re-run the evaluation")
    raw = yaml.safe_load(manifest.manifest_path.read_text())
    metrics = {k: v for k, v in (raw.get("metrics") or {}).items() if not str(k).startswith("eval_")}
    metrics.update(headline_metrics(result))
    raw["metrics"] = metrics
    manifest.manifest_path.write_text(yaml.safe_dump(raw, sort_keys=False, width=120))
    card_path = manifest.directory / "MODEL_CARD.md"
    if card_path.is_file():
        card_path.write_text(replace_scores_section(card_path.read_text(), scores_section(result, command)))
    reloaded = ModelStore(store_root).get(manifest.name, manifest.version)
    ModelStore(store_root).verify_checksum(reloaded)


# ------------------------------------------------------------------------------------------ driver


async def evaluate_models(names: Sequence[str], store_root: Path, data_root: Path,
                          settings: EvalSettings) -> dict[str, dict[str, Any]]:
    store = ModelStore(store_root)
    kinds = {store.get(name).kind for name in names}
    unknown = kinds - set(EVALUATORS)
    if unknown:
        raise ValueError(f"models {list(names)}: kinds {sorted(unknown)} have no evaluation; valid kinds: "
                         f"{sorted(EVALUATORS)}")
    hosted = set(names) | {settings.encoder}
    segmenters = [n for n in store.list_models() if store.get(n).kind == "segmenter"]
    if "renderer" in kinds:
        hosted |= set(segmenters)
    host = ModelHost(store, kinds | {"encoder", "segmenter"}, HostSettings(max_queue_size=4096), names=hosted)
    results: dict[str, dict[str, Any]] = {}
    async with host:
        for name in names:
            results[name] = await EVALUATORS[store.get(name).kind](host, name, data_root, settings)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", action="append", help="model name (repeatable)")
    target.add_argument("--all", action="store_true", help=f"all of {list(RENDERERS + REFINERS)}")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--max-images", type=int, default=EvalSettings.max_images, help="crops per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-update-store", action="store_true", help="only write the JSON results")
    args = parser.parse_args(argv)
    names = list(RENDERERS + REFINERS) if args.all else args.model
    settings = EvalSettings(max_images=args.max_images, seed=args.seed)
    results = asyncio.run(evaluate_models(names, args.store, args.data_root, settings))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        command = (f"python -m training.evaluate --model {name} --max-images {settings.max_images} "
                   f"--seed {settings.seed}")
        result = {**result, "command": command}
        (args.results_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        if not args.no_update_store:
            update_store(args.store, result, command)
        print(json.dumps({name: headline_metrics(result)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
