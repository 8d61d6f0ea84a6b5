"""Evaluate and export the scoring models (kind `encoder` / `segmenter`) into model_store/.

    python -m training.export.scoring_models --config training/configs/histology-encoder.yaml \
        --checkpoint runs/histology-encoder/latest.pt --version 1 [--data-root ../shared/data] [--overwrite]

Encoder: features of the held-out patches128 crops (val + test patients, never trained on) are split into two
patient-disjoint halves; the card reports FID/KID between the halves (the real-vs-real floor) and between one half
and blurred / colour-shifted / other-dataset sets (the scale), all with services/scoring/distances.py.
Segmenter: mIoU / Dice on the held-back test (and val) split images, whole images at full resolution, with
services/scoring/segmentation.py. Numbers are computed with torch before export; the exported graph matches torch
to the parity tolerance recorded in the manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from services.scoring import distances, segmentation
from training.data.scoring_data import (
    ENCODER_CLASSES,
    ImageCache,
    encoder_class_of,
    group_disjoint_halves,
    groups_of,
    patch_crop,
    segmentation_scheme,
)
from training.export.__main__ import final_losses
from training.export.onnx_export import ModelCard, export_to_model_store, hardware_string
from training.provenance import training_commit_fields
from training.models.histology_encoder import HistologyEncoder
from training.models.tissue_segmenter import TissueSegmenter
from training.train import load_config
from training.trainers.scoring_trainers import (
    build_encoder,
    build_segmenter,
    encoder_splits,
    images_to_tensor,
    segmenter_splits,
)

SCORES_PLACEHOLDER = ("Quality scores (FID/KID, precision/recall, segmentation consistency) come from the scoring "
                      "service once it is available; none are claimed here.")


# ============================================================================================= encoder evaluation
@torch.no_grad()
def embed_images(model: HistologyEncoder, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] -> (features [N, d], class probabilities [N, classes]) as float64."""
    model.eval()
    features, probs = [], []
    for start in range(0, len(images), batch):
        f, logits = model(images_to_tensor(images[start:start + batch]))
        features.append(f.double().numpy())
        probs.append(torch.softmax(logits.double(), dim=1).numpy())
    return np.concatenate(features), np.concatenate(probs)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(im.astype(np.float32), sigma=(sigma, sigma, 0)) for im in images]
                    ).round().clip(0, 255).astype(np.uint8)


def colour_shift(images: np.ndarray, rgb_gain: Sequence[float]) -> np.ndarray:
    """Per-channel gain (a stain/scanner-like colour cast)."""
    return (images.astype(np.float32) * np.asarray(rgb_gain, np.float32)).round().clip(0, 255).astype(np.uint8)


def distance_row(name: str, a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> dict[str, Any]:
    kid_mean, kid_std = distances.kid(a, b, num_subsets=100, subset_size=min(len(a), len(b), 1000), seed=0)
    pr = distances.precision_recall(a / np.linalg.norm(a, axis=1, keepdims=True),
                                     b / np.linalg.norm(b, axis=1, keepdims=True), k=3)
    return {"comparison": name, "n_a": n_a, "n_b": n_b, "fid": distances.fid_from_features(a, b),
            "kid": kid_mean, "kid_std": kid_std, "precision": pr.precision, "recall": pr.recall}


def evaluate_encoder(model: HistologyEncoder, data_root: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    patch_splits, _ = encoder_splits(data_root, config["data"])
    held_out = patch_splits["val"] + patch_splits["test"]
    half_a, half_b = group_disjoint_halves(held_out, seed=1)
    cache = ImageCache()
    crops = {id(r): patch_crop(cache, r, None) for r in held_out}
    images_a = np.stack([crops[id(r)] for r in half_a])
    images_b = np.stack([crops[id(r)] for r in half_b])
    feats_a, _ = embed_images(model, images_a)
    feats_b, _ = embed_images(model, images_b)
    rows = [distance_row("held-out half A vs half B (real vs real, patient-disjoint)", feats_a, feats_b,
                         len(half_a), len(half_b))]
    # Same patients on both sides (random crop halves): the pure sample-size floor, without patient variation.
    pooled = np.concatenate([feats_a, feats_b])
    order = np.random.default_rng(2).permutation(len(pooled))
    mixed_a, mixed_b = pooled[order[: len(pooled) // 2]], pooled[order[len(pooled) // 2:]]
    rows.append(distance_row("held-out random halves (real vs real, same patients)", mixed_a, mixed_b,
                             len(mixed_a), len(mixed_b)))
    for label, transformed in (
        ("half A vs half B Gaussian-blurred (sigma 1 px)", gaussian_blur(images_b, 1.0)),
        ("half A vs half B Gaussian-blurred (sigma 2 px)", gaussian_blur(images_b, 2.0)),
        ("half A vs half B colour-cast (RGB gain 1.10/0.90/1.00)", colour_shift(images_b, (1.10, 0.90, 1.00))),
        ("half A vs half B colour-cast (RGB gain 1.25/0.80/1.05)", colour_shift(images_b, (1.25, 0.80, 1.05))),
    ):
        rows.append(distance_row(label, feats_a, embed_images(model, transformed)[0], len(half_a), len(half_b)))
    # A sample of the training patients vs the held-out set: how far "same data source, other patients" sits.
    rng = np.random.default_rng(0)
    train = patch_splits["train"]
    train_sample = [train[i] for i in sorted(rng.choice(len(train), min(len(train), len(held_out)), replace=False))]
    feats_train, _ = embed_images(model, np.stack([patch_crop(cache, r, None) for r in train_sample]))
    feats_held, probs_held = embed_images(model, np.concatenate([images_a, images_b]))
    rows.append(distance_row("training-patient sample vs all held-out", feats_train, feats_held,
                             len(train_sample), len(held_out)))
    glas = np.array([r.dataset == "glas" for r in half_a + half_b])
    if glas.sum() > 3 and (~glas).sum() > 3:
        rows.append(distance_row("held-out GlaS (colon 20x) vs held-out MoNuSeg (multi-organ 40x)",
                                 feats_held[glas], feats_held[~glas], int(glas.sum()), int((~glas).sum())))
    labels = np.array([encoder_class_of(r) for r in half_a + half_b])
    accuracy = float((probs_held.argmax(1) == labels).mean())
    splits_is = max(1, min(5, len(probs_held) // 50))
    is_mean, is_std = distances.inception_score(probs_held, splits=splits_is)
    return {
        "rows": rows,
        "held_out_groups": {"half_a": groups_of(half_a), "half_b": groups_of(half_b)},
        "held_out_patches": len(held_out),
        "held_out_class_accuracy": accuracy,
        "held_out_inception_score_like": [is_mean, is_std, splits_is],
    }


def encoder_report(result: Mapping[str, Any]) -> str:
    lines = ["Distances between sets of 128x128 real crops, features from this model, computed with "
             "services/scoring/distances.py (FID: fid_from_features; KID: kid, 100 subsets, polynomial kernel "
             "degree 3; precision/recall: k=3 on L2-normalised features). Half A and half B are the held-out "
             "(val + test split) patients of GlaS and MoNuSeg cut into two patient-disjoint halves; none of these "
             "patients was seen in training.", "",
             f"Held-out patients: half A {', '.join(result['held_out_groups']['half_a'])}; half B "
             f"{', '.join(result['held_out_groups']['half_b'])}.", "",
             "| comparison | n_a | n_b | FID | KID (x1e3) | precision | recall |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['comparison']} | {r['n_a']} | {r['n_b']} | {r['fid']:.3f} | "
                     f"{r['kid'] * 1e3:.3f} ± {r['kid_std'] * 1e3:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    is_mean, is_std, is_splits = result["held_out_inception_score_like"]
    lines += ["", f"Held-out class accuracy (weak image-level labels, {len(ENCODER_CLASSES)} classes): "
              f"{result['held_out_class_accuracy']:.3f}. Inception-Score-like exp(E KL(p(y|x) || p(y))) on the "
              f"held-out crops: {is_mean:.3f} ± {is_std:.3f} ({is_splits} splits); the upper bound is "
              f"{len(ENCODER_CLASSES)}.", "",
              "The patient-disjoint row is the honest floor for comparing a synthetic set with real images of "
             "other patients; the same-patients row shows how much of it is sample size alone.", "",
             "Read FID between real sets as the noise floor of a comparison at this sample size: a synthetic set "
              "whose FID to real held-out crops is near the real-vs-real value is indistinguishable to this "
              "encoder; the blur / colour-cast rows show how far visible degradations move it. The numbers are "
              "specific to this encoder (256-d features) and not comparable with Inception-v3 FID."]
    return "\n".join(lines)


# ============================================================================================= segmenter evaluation
@torch.no_grad()
def predict_class_map(model: TissueSegmenter, image: np.ndarray) -> np.ndarray:
    """Whole-image prediction: reflect-pad H and W to the size multiple, run, crop back. uint8 [H, W]."""
    model.eval()
    multiple = model.config.size_multiple
    height, width = image.shape[:2]
    x = images_to_tensor(image[None])
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    logits = model(x)[0, :, :height, :width]
    return logits.argmax(0).numpy().astype(np.uint8)


def evaluate_segmenter(model: TissueSegmenter, data_root: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    scheme = segmentation_scheme(config["data"]["scheme"])
    splits = segmenter_splits(data_root, config["data"])
    cache = ImageCache()
    out: dict[str, Any] = {}
    for split in ("test", "val"):
        per_dataset: dict[str, segmentation.SegmentationAccumulator] = {}
        counts: dict[str, int] = {}
        for record in splits[split]:
            sample = cache.sample(record)
            target = scheme.derive(record.dataset, sample)
            predicted = predict_class_map(model, sample.image)
            if record.dataset in scheme.partial_foreground:
                # Untyped nuclei: score nucleus vs background only (any foreground class counts as nucleus).
                target = (target > 0).astype(np.uint8)
                predicted = np.isin(predicted, scheme.foreground_classes).astype(np.uint8)
                key, classes = f"{record.dataset} (nucleus vs background)", 2
            else:
                key, classes = record.dataset, len(scheme.class_names)
            per_dataset.setdefault(key, segmentation.SegmentationAccumulator(classes)).add(target, predicted)
            counts[key] = counts.get(key, 0) + 1
        for key, accumulator in per_dataset.items():
            scores = accumulator.result()
            out[f"{split}/{key}"] = {"images": counts[key], "groups": groups_of(splits[split]),
                                     "miou": scores.miou, "mean_dice": scores.mean_dice,
                                     "dice_per_class": list(scores.dice_per_class),
                                     "class_pixel_counts": list(scores.class_pixel_counts)}
    return out


def segmenter_report(result: Mapping[str, Any], class_names: Sequence[str]) -> str:
    lines = ["Whole held-back images at full resolution (reflect-padded to the size multiple), argmax of the logits, "
             "scored with services/scoring/segmentation.py: mIoU = eq. (1) of the noise-frequency paper (per image, "
             "per class, averaged; a class absent from both truth and prediction of an image counts 1.0), Dice per "
             "class from the summed confusion matrix. The test split is the renderer's held-back test split "
             "(same fractions and seed), so these images were seen by neither model.", "",
             "| split / dataset | images | mIoU | mean Dice | Dice per class |", "|---|---|---|---|---|"]
    for key, r in result.items():
        names = class_names if len(r["dice_per_class"]) == len(class_names) else ("background", "nucleus")
        per_class = ", ".join(f"{n} {d:.3f}" for n, d in zip(names, r["dice_per_class"]))
        lines.append(f"| {key} | {r['images']} | {r['miou']:.3f} | {r['mean_dice']:.3f} | {per_class} |")
    groups = {key.split('/')[0]: r["groups"] for key, r in result.items()}
    lines += [""] + [f"{split} groups: {', '.join(g)}." for split, g in groups.items()]
    return "\n".join(lines)


# ============================================================================================= cards + export
ENCODER_CARD = dict(
    title="histology feature extractor for FID/KID/precision-recall (small ResNet)",
    summary=(
        "ResNet-style CNN (stride-2 stem, 4 stages of one basic residual block, widths 32/64/128/256, ~1.2 M "
        "parameters) trained supervised on histology tiles: a 10-way head on weak image-level labels (5 GlaS "
        "grades, 4 MoNuSeg organs + other organs) and an auxiliary 4-way source/stain head (GlaS, MoNuSeg, "
        "CoNSeP, DeepLIIF IHC; not exported). `features` = global average pool of the last stage (256-d), the "
        "embedding for FID/KID; `logits` = the 10-way head, for an Inception-Score-like number.\n\n"
        "Serving contract: input `image` float32 [batch, 3, H, W], RGB, values in [0, 255] (uint8 cast to float, "
        "no scaling), any H, W >= 16. The graph itself resizes to 128x128 with bilinear interpolation "
        "(align_corners=False, no antialiasing = ONNX Resize linear/half_pixel) and maps x -> x / 127.5 - 1, so "
        "serving must do nothing else. Tiles much larger than 128 px are downsampled without antialiasing: crop "
        "large images into ~128-256 px tiles at the training magnification (20x GlaS, 40x MoNuSeg/CoNSeP) "
        "instead of feeding whole fields. Features are not normalised; L2-normalise them for cosine similarity "
        "or precision/recall."),
    data=(
        "patches128 crops (GlaS 20x + MoNuSeg 40x, grid crops with >= 50 % tissue) of the TRAIN patients only, "
        "split per dataset by patient 80/10/10 with seed 0 (the renderers' split), crops jittered +-32 px and "
        "flipped/rotated (no colour augmentation: colour is part of what FID must see); plus random 128 px crops "
        "of CoNSeP (train tiles) and DeepLIIF (3 train tiles) for the source/stain head, 25 % of each batch. "
        "Class-balanced sampling over the 10 classes."),
    intended_use=(
        "Research: domain-specific FID/KID/precision-recall between real and synthetic histology tile sets in "
        "the scoring service, beside (not instead of) standard Inception FID (training/export/fid_inception.py)."),
    limitations=(
        "Tiny training set (10 GlaS + 26 MoNuSeg training patients) and a short CPU run: the features separate "
        "source, stain and magnification well but tissue grade only weakly (labels are per image). Absolute "
        "FID values depend on this encoder and on the sample sizes; compare only numbers computed with the same "
        "model version and similar set sizes. Brain tissue and IHC stains other than Ki67 were never seen."),
)

SEGMENTER_CARDS = {
    "he_nuclei": dict(
        title="nuclei class-map segmenter for H&E (U-Net, mask-image consistency)",
        summary=(
            "Small U-Net (3 max-pool levels, 16-128 channels, bilinear upsampling + skip concatenation, ~0.5 M "
            "parameters) predicting the 5 CoNSeP classes (background, other, inflammatory, epithelial, spindle). "
            "Used to check that a rendered H&E tile shows the nuclei its conditioning map asked for: "
            "renderer-he-nuclei ids 0-4 map to the same ids here; its id 5 (nucleus_untyped) maps to 'any of "
            "1-4' (metadata.renderer_class_map).\n\n"
            "Serving contract: input `image` float32 [batch, 3, H, W] RGB in [0, 255], H and W multiples of 8 "
            "(reflect-pad and crop back otherwise); a renderer output x in [-1, 1] becomes (x + 1) * 127.5. Output "
            "`logits` [batch, 5, H, W]; argmax over axis 1 is the class map."),
        data=(
            "CoNSeP (256x256 JPEG patches, typed nuclei) and MoNuSeg (1000x1000 tiles, untyped nuclei), split per "
            "dataset 80/10/10 with seed 0 exactly like renderer-he-nuclei (CoNSeP by tile, MoNuSeg by patient). "
            "Random 128x128 crops with flips/rotations, datasets drawn 50/50. MoNuSeg nuclei are trained with a "
            "partial-label loss: -log P(any of classes 1-4), so they teach 'nucleus' without claiming a type. "
            "Loss: cross-entropy + 0.5 soft Dice (CoNSeP items)."),
        intended_use="Research: mask-image consistency (mIoU/Dice) of synthetic H&E nuclei tiles in the scoring service.",
        limitations=(
            "Short CPU training on few tiles: nucleus vs background is learnt far better than the four CoNSeP "
            "types (the type Dice is low, see below). CoNSeP-only types: tissue other than colorectal is typed "
            "unreliably. 40x only."),
    ),
    "he_glands": dict(
        title="non-tissue / stroma / gland segmenter for colon H&E (U-Net, mask-image consistency)",
        summary=(
            "Small U-Net (4 max-pool levels, 16-256 channels, ~1.9 M parameters) predicting renderer-he-glands' "
            "3-class map: 0 non-tissue (grayscale >= 204 and not gland), 1 stroma, 2 gland.\n\n"
            "Serving contract: input `image` float32 [batch, 3, H, W] RGB in [0, 255], H and W multiples of 16 "
            "(reflect-pad and crop back otherwise); a renderer output x in [-1, 1] becomes (x + 1) * 127.5. Output "
            "`logits` [batch, 3, H, W]; argmax over axis 1 is the class map."),
        data=(
            "GlaS (colon H&E, 20x), split by patient 80/10/10 with seed 0 exactly like renderer-he-glands. Target "
            "= training/data/derived_labels.tissue_gland_class_map(image, gland mask). Random 192x192 crops with "
            "flips/rotations. Loss: cross-entropy + 0.5 soft Dice."),
        intended_use="Research: mask-image consistency of synthetic colon H&E (gland layout) in the scoring service.",
        limitations=(
            "12 GlaS patients, one organ, 20x; short CPU training. The non-tissue class is a grayscale threshold "
            "of the image itself, so it is learnt almost exactly; the gland/stroma boundary is the informative part."),
    ),
    "ihc_ki67": dict(
        title="Ki67 IHC nucleus class segmenter (U-Net, mask-image consistency)",
        summary=(
            "Small U-Net (3 max-pool levels, 16-128 channels, ~0.5 M parameters) predicting the DeepLIIF classes "
            "background, Ki67-negative nucleus, Ki67-positive nucleus, cell boundary (= renderer-ihc's ids).\n\n"
            "Serving contract: input `image` float32 [batch, 3, H, W] RGB in [0, 255], H and W multiples of 8 "
            "(reflect-pad and crop back otherwise); a renderer output x in [-1, 1] becomes (x + 1) * 127.5. Output "
            "`logits` [batch, 4, H, W]; argmax over axis 1 is the class map."),
        data=(
            "DeepLIIF Ki67 sample set: 4 labelled 512x512 tiles split by tile 3 train / 1 test with seed 0 exactly "
            "like renderer-ihc. Random 128x128 crops with flips/rotations. Loss: cross-entropy + 0.5 soft Dice."),
        intended_use="Research / demonstration: mask-image consistency of synthetic Ki67 IHC tiles.",
        limitations=(
            "Three training tiles: the scores below are from ONE test tile and say little about other IHC images. "
            "Treat it as a pipeline demonstrator. Dataset terms unverified - non-commercial research."),
    ),
}


def _provenance(config: Mapping[str, Any], payload: Mapping[str, Any], datasets: Sequence[str]) -> dict[str, Any]:
    return {
        **training_commit_fields(payload),
        "config": dict(config),
        "seed": int(config.get("seed", 0)),
        "data": list(datasets),
        "split": {"fractions": config["data"].get("split_fractions"),
                  "seed": config["data"].get("split_seed", 0), "unit": "patient where recorded, else source tile",
                  "groups": payload.get("splits", {})},
        "steps": int(payload["step"]),
        "train_seconds": round(float(payload["train_seconds"]), 1),
        "hardware": hardware_string().replace(f"torch threads {torch.get_num_threads()}",
                                              f"torch threads {payload.get('hardware_threads', '?')}"),
    }


def _replace_scores_section(version_dir: Path, section_title: str) -> None:
    card_path = version_dir / "MODEL_CARD.md"
    text = card_path.read_text()
    text = text.replace(SCORES_PLACEHOLDER, f"Computed at export on held-back real data: see '{section_title}' above.")
    card_path.write_text(text)


def export_encoder(model: HistologyEncoder, config: Mapping[str, Any], payload: Mapping[str, Any], *, version: str,
                   store_root: Path, data_root: Path | None, overwrite: bool = False,
                   run_dir: Path | None = None) -> Path:
    export_cfg = config.get("export", {})
    size = model.config.input_size
    metrics: dict[str, Any] = {}
    extra: dict[str, str] = {}
    if data_root is not None:
        result = evaluate_encoder(model, data_root, config)
        extra["Reference distances on held-out real data"] = encoder_report(result)
        for row in result["rows"]:
            key = row["comparison"].split(" (")[0].replace(" ", "_").replace("-", "_").lower()[:48]
            metrics[f"fid/{key}"] = row["fid"]
            metrics[f"kid/{key}"] = row["kid"]
        metrics["fid_real_vs_real_heldout_halves"] = result["rows"][0]["fid"]
        metrics["kid_real_vs_real_heldout_halves"] = result["rows"][0]["kid"]
        metrics["heldout_class_accuracy"] = result["held_out_class_accuracy"]
    losses = final_losses(run_dir / "losses.jsonl") if run_dir else {}
    metadata = {
        "feature": "pooled",
        "feature_dim": model.feature_dim,
        "standard_fid": False,
        "input_range": [0.0, 255.0],
        "input_layout": "NCHW RGB float32",
        "resize": {"size": [size, size], "method": "bilinear", "align_corners": False, "antialias": False,
                   "inside_graph": True},
        "normalisation_inside_graph": "x / 127.5 - 1",
        "class_names": list(ENCODER_CLASSES),
        "magnification": {"glas": "20x", "monuseg": "40x", "consep": "40x", "deepliif": "40x"},
        "l2_normalise_for": ["cosine", "precision_recall"],
    }
    card = ModelCard(**ENCODER_CARD, losses=losses, extra_sections=extra)
    out = export_to_model_store(
        model, (torch.zeros(1, 3, size, size),), name=config["name"], version=version, kind="encoder",
        input_names=["image"], output_names=["features", "logits"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"},
                      "logits": {0: "batch"}},
        metadata=metadata, provenance=_provenance(config, payload, ["glas", "monuseg", "consep", "deepliif"]),
        metrics={**metrics, **{f"final_{k}": v for k, v in losses.items()}}, store_root=store_root,
        parity_sizes=[tuple(s) for s in export_cfg.get("parity_sizes", [[128, 128], [96, 200]])],
        atol=float(export_cfg.get("atol", 1e-3)), max_batch_size=int(export_cfg.get("max_batch_size", 64)),
        card=card, overwrite=overwrite)
    if extra:
        _replace_scores_section(out, next(iter(extra)))
    return out


def export_segmenter(model: TissueSegmenter, config: Mapping[str, Any], payload: Mapping[str, Any], *, version: str,
                     store_root: Path, data_root: Path | None, overwrite: bool = False,
                     run_dir: Path | None = None) -> Path:
    export_cfg = config.get("export", {})
    scheme = segmentation_scheme(config["data"]["scheme"])
    metrics: dict[str, Any] = {}
    extra: dict[str, str] = {}
    if data_root is not None:
        result = evaluate_segmenter(model, data_root, config)
        extra["Segmentation scores on held-back real images"] = segmenter_report(result, scheme.class_names)
        for key, r in result.items():
            metrics[f"miou/{key}"] = r["miou"]
            metrics[f"mean_dice/{key}"] = r["mean_dice"]
    losses = final_losses(run_dir / "losses.jsonl") if run_dir else {}
    metadata = {
        "num_classes": len(scheme.class_names),
        "class_names": list(scheme.class_names),
        "scheme": scheme.name,
        "input_range": [0.0, 255.0],
        "input_layout": "NCHW RGB float32",
        "normalisation_inside_graph": "x / 127.5 - 1",
        "size_multiple": model.config.size_multiple,
        "output": "logits; argmax over axis 1 = class map",
        **dict(export_cfg.get("metadata", {})),
    }
    card_text = SEGMENTER_CARDS[scheme.name]
    card = ModelCard(**card_text, losses=losses, extra_sections=extra)
    size = int(config["data"]["crop"])
    out = export_to_model_store(
        model, (torch.zeros(1, 3, size, size),), name=config["name"], version=version, kind="segmenter",
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
        metadata=metadata, provenance=_provenance(config, payload, list(scheme.datasets)),
        metrics={**metrics, **{f"final_{k}": v for k, v in losses.items()}}, store_root=store_root,
        parity_sizes=[tuple(s) for s in export_cfg.get("parity_sizes", [[128, 128], [96, 160]])],
        atol=float(export_cfg.get("atol", 1e-3)), max_batch_size=int(export_cfg.get("max_batch_size", 16)),
        card=card, overwrite=overwrite)
    if extra:
        _replace_scores_section(out, next(iter(extra)))
    return out


EXPORTERS = {"encoder": (build_encoder, export_encoder), "segmenter": (build_segmenter, export_segmenter)}


def export_checkpoint(checkpoint: Path, *, version: str, store_root: Path, data_root: Path | None,
                      overwrite: bool = False) -> Path:
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = payload["config"]
    if config["trainer"] not in EXPORTERS:
        raise ValueError(f"checkpoint {checkpoint} has trainer {config['trainer']!r}; this exporter handles "
                         f"{sorted(EXPORTERS)} (GAN checkpoints: python -m histosynth.training.export)")
    build, export = EXPORTERS[config["trainer"]]
    model = build(config)
    model.load_state_dict(payload["model"])
    return export(model.eval(), config, payload, version=version, store_root=store_root, data_root=data_root,
                  overwrite=overwrite, run_dir=checkpoint.parent)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--version", required=True)
    parser.add_argument("--store-root", type=Path, default=Path("model_store"))
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"),
                        help="evaluation data (held-out splits); the card's scores come from here")
    parser.add_argument("--no-eval", action="store_true", help="export without evaluation (no scores in the card)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    yaml_config = load_config(args.config)
    payload_name = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["config"]["name"]
    if payload_name != yaml_config["name"]:
        raise ValueError(f"checkpoint {args.checkpoint} is for {payload_name!r}, config {args.config} is for "
                         f"{yaml_config['name']!r}")
    out = export_checkpoint(args.checkpoint, version=args.version, store_root=args.store_root,
                            data_root=None if args.no_eval else args.data_root, overwrite=args.overwrite)
    print(f"exported {yaml_config['name']} v{args.version} -> {out}")
    return out


if __name__ == "__main__":
    main()
