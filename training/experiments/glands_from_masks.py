"""Glands from masks alone: held-back GlaS gland layouts -> refiner -> renderer-he-glands, scored by our encoder.

Part of `make experiment-coarse-to-fine` (issue #13.3). A user of the glands pipeline has a gland layout, not an
H&E image. The renderer's class map needs a non-tissue layer (grayscale >= 204: lumens, gaps, glass), which v1
took from the real image. Here it comes from the refiner (mask-refiner v2's guide input is the gland layout),
through the real refinement and rendering services, with the renderer's own class rule
(training.data.derived_labels.class_map_from_tissue):

  layout only        coarse = all tissue, guide = gland layout   -> refiner -> fine tissue -> class map -> render
  layout + sketch    coarse = a 1/8-resolution sketch of the tissue (training.data.coarsening.SKETCH), guide = layout
  layout, no refiner no non-tissue at all (every pixel tissue): the mask-only input without a refiner
  real-image rule    non-tissue from the real image (needs the image: the upper bound, not mask-only)

Reference: patient-disjoint. The held-back tiles come from two GlaS patients (the refiner's val and test
groups, neither trained on). Synthetic crops rendered from patient P's layouts are compared with real crops of
the OTHER patient, beside real crops of P against the same real crops of the other patient: equal n, and the
reference is the real between-patient spread, not the resampling of one tile. Both directions are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from clients.client import HistosynthClient
from services.core import mask_ops
from training.data.coarsening import SKETCH, coarsen
from training.data.derived_labels import class_map_from_tissue
from training.data.shared_layout import Record, load_sample
from training.experiments.report import ScoreOptions, ScoringSession

RENDERER: Final = "renderer-he-glands"
REFINER: Final = "mask-refiner"
VARIANTS: Final = ("layout_only", "layout_sketch", "layout_no_refiner", "real_image_rule")
VARIANT_LABELS: Final = {
    "layout_only": "gland layout only -> refiner -> renderer (mask-only)",
    "layout_sketch": "gland layout + 1/8 tissue sketch -> refiner -> renderer (mask-only)",
    "layout_no_refiner": "gland layout, no non-tissue layer -> renderer (mask-only, no refiner)",
    "real_image_rule": "non-tissue from the real image -> renderer (needs the image; upper bound)",
}


@dataclass(frozen=True)
class Tile:
    group: str
    image: np.ndarray  # uint8 H x W x 3
    gland: np.ndarray  # bool H x W (GlaS annotation, lumens included)
    instances: np.ndarray  # uint16 gland instances
    fine: np.ndarray  # bool real fine tissue mask (gray < 204)


def load_tiles(records: Sequence[Record], stain: str = "he") -> list[Tile]:
    tiles = []
    for record in records:
        sample = load_sample(record)
        instances = sample.instances if sample.instances is not None else np.zeros(sample.class_map.shape, np.uint16)
        tiles.append(Tile(record.group, sample.image, sample.class_map > 0, instances.astype(np.uint16),
                          mask_ops.tissue_mask(sample.image, stain)))
    return tiles


def refine_tiles(client: HistosynthClient, coarse: Sequence[np.ndarray], guides: Sequence[np.ndarray] | None,
                 stain: str, seed: int) -> tuple[list[np.ndarray], dict[str, str]]:
    """One Refine call per tile (tiles differ in size); tile i uses noise seed ``seed + i``. Returns the fine
    masks and the refiner that made them."""
    refined, model = [], None
    for index, mask in enumerate(coarse):
        guide = None if guides is None else guides[index][None].astype(np.uint8)
        output = client.refine(mask[None].astype(np.uint8), stain=stain, model=REFINER, guide_masks=guide,
                               seed=seed + index, timeout=600)
        refined.append(output.fine_masks[0].astype(bool))
        model = output.model
    assert model is not None
    return refined, {"name": model.name, "version": model.version, "sha256": model.sha256}


def render_tiles(client: HistosynthClient, tiles: Sequence[Tile], tissue: Sequence[np.ndarray],
                 seed: int, version: str = "") -> tuple[list[np.ndarray], list[np.ndarray]]:
    class_maps = [class_map_from_tissue(m, t.gland) for t, m in zip(tiles, tissue)]
    images = [client.render(cm[None], model=RENDERER, version=version,
                            instance_maps=t.instances[None].astype(np.int32), seed=seed + i, timeout=600).images[0]
              for i, (t, cm) in enumerate(zip(tiles, class_maps))]
    return images, class_maps


def crop_positions(tiles: Sequence[Tile], count: int, size: int, seed: int) -> list[tuple[int, int, int]]:
    """``count`` (tile index, y, x) crops, tiles taking turns, offsets uniform (fixed seed)."""
    rng = np.random.default_rng(seed)
    positions = []
    for index in range(count):
        t = index % len(tiles)
        height, width = tiles[t].fine.shape
        positions.append((t, int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))))
    return positions


def take_crops(images: Sequence[np.ndarray], positions: Sequence[tuple[int, int, int]], size: int) -> np.ndarray:
    return np.stack([images[t][y:y + size, x:x + size] for t, y, x in positions])


def evaluate(client: HistosynthClient, scorer: ScoringSession, groups: Mapping[str, Sequence[Record]], *,
             crops_per_group: int, crop: int, seed: int, fid_bootstrap: int,
             renderer_version: str = "") -> dict[str, Any]:
    """Scores of every variant against the other patient's real crops; returns a JSON-able dict.

    ``renderer_version`` pins renderer-he-glands (empty = latest); the refined tissue masks do not depend on it.
    """
    if len(groups) != 2:
        raise ValueError(f"the patient-disjoint reference needs exactly two held-back groups, got {sorted(groups)}")
    per_group: dict[str, dict[str, Any]] = {}
    for g_index, (group, records) in enumerate(sorted(groups.items())):
        tiles = load_tiles(records)
        base = seed + 1000 * g_index
        coarse = {"layout_only": [np.ones(t.fine.shape, bool) for t in tiles],
                  "layout_sketch": [coarsen(t.fine, SKETCH) for t in tiles]}
        glands = [t.gland for t in tiles]
        tissue = {name: refine_tiles(client, masks, glands, "he", base)[0] for name, masks in coarse.items()}
        tissue["layout_no_refiner"] = [np.ones(t.fine.shape, bool) for t in tiles]
        tissue["real_image_rule"] = [t.fine for t in tiles]
        positions = crop_positions(tiles, crops_per_group, crop, base + 7)
        rendered = {name: render_tiles(client, tiles, masks, base, renderer_version)[0]
                    for name, masks in tissue.items()}
        per_group[group] = {
            "tiles": tiles, "positions": positions,
            "real": take_crops([t.image for t in tiles], positions, crop),
            "synthetic": {name: take_crops(images, positions, crop) for name, images in rendered.items()},
            "non_tissue_fraction": {name: float(np.mean([1 - m.mean() for m in masks]))
                                    for name, masks in tissue.items()},
        }
    names = sorted(per_group)
    options = ScoreOptions(seed=seed, fid_bootstrap=fid_bootstrap)
    directions: dict[str, Any] = {}
    for source, other in ((names[0], names[1]), (names[1], names[0])):
        reference = per_group[other]["real"]
        scores = {"real_vs_real": scorer.score(reference, per_group[source]["real"], options)}
        for name in VARIANTS:
            scores[name] = scorer.score(reference, per_group[source]["synthetic"][name], options)
        directions[f"{source}->{other}"] = scores
    summary = {}
    for name in ("real_vs_real", *VARIANTS):
        fids = [d[name]["fid"] for d in directions.values()]
        summary[name] = {"fid_mean": float(np.mean(fids)), "fid_per_direction": fids,
                         "kid_mean": float(np.mean([d[name]["kid_mean"] for d in directions.values()])),
                         "precision": float(np.mean([d[name]["precision"] for d in directions.values()])),
                         "recall": float(np.mean([d[name]["recall"] for d in directions.values()]))}
    reference_fid = summary["real_vs_real"]["fid_mean"]
    for name in VARIANTS:
        summary[name]["fid_ratio_to_real_vs_real"] = summary[name]["fid_mean"] / reference_fid
    extractor = next(iter(directions.values()))["real_vs_real"].get("extractor")
    return {
        "protocol": {
            "groups": {g: len(groups[g]) for g in names},
            "renderer_version": renderer_version or "latest",
            "crops_per_group": crops_per_group, "crop": crop, "seed": seed,
            "reference": "patient-disjoint: synthetic crops from patient P's layouts and real crops of P, each "
                         "against the same real crops of the other held-back patient; equal n; both directions "
                         "averaged",
            "variants": dict(VARIANT_LABELS),
        },
        "extractor": extractor,
        "summary": summary,
        "directions": directions,
        "non_tissue_fraction": {g: per_group[g]["non_tissue_fraction"] for g in names},
        "real_non_tissue_fraction": {g: float(np.mean([1 - t.fine.mean() for t in per_group[g]["tiles"]]))
                                     for g in names},
        "_grid": _grid_rows(per_group[names[0]]),
    }


def _grid_rows(group: Mapping[str, Any], rows: int = 3) -> list[list[np.ndarray]]:
    """real | layout only | layout + sketch | no refiner | real-image rule, for the first crops."""
    out = []
    for index in range(min(rows, len(group["real"]))):
        out.append([group["real"][index], *(group["synthetic"][name][index] for name in VARIANTS)])
    return out
