"""pix2pixHD (global generator G1 + 2-scale discriminator) trainer for the mask -> image renderers.

Input = mask_ops.build_generator_input(one-hot classes, noise label at `noise_spacing` px, instance edges), as
in the noise-frequency paper (polygon + noise masks, K=2 discriminators). Objective: LSGAN + lambda_feat * feature
matching (pix2pixHD, lambda_feat = 10); no VGG loss. Several datasets can feed one model: each source has its own
class_remap into the model's class list and its own virtual epoch length (to balance them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from services.core import mask_ops
from training.data.datasets import MaskToImageDataset, PolygonMaskDataset
from training.data.derived_labels import TissueGlandDataset
from training.data.benchmark_split import held_back_groups
from training.data.shared_layout import load_records, split_records
from training.data.instance_targets import BACKGROUND, BOUNDARY, INTERIOR
from training.losses import (
    boundary_consistency_loss,
    feature_matching_loss,
    lsgan_loss,
    mask_consistency_loss,
    nucleus_area_loss,
)
from training.models.pix2pixhd_global import GlobalGenerator, MultiscaleDiscriminator
from training.models.tissue_segmenter import TissueSegmenter
from training.trainers.base import CHECKPOINT_NAME, GanTrainer, to_uint8_image
from training.trainers.pix2pix_trainer import set_requires_grad

# "derive" key of a data source -> dataset class (how its class map is built)
DATASET_KINDS = {"mask": MaskToImageDataset, "tissue_gland": TissueGlandDataset, "polygon": PolygonMaskDataset}


# train.consistency term kind -> the key its loss is logged under (g_seg: v3's name for the type term)
CONSISTENCY_KINDS = {"type": "g_seg", "boundary": "g_boundary", "size": "g_size"}


@dataclass
class ConsistencyTerm:
    """One frozen-segmenter loss on the render: kind (CONSISTENCY_KINDS), the segmenter, its weight in G's loss
    and kind-specific options (type: allowed; boundary: boundary_weight)."""

    kind: str
    segmenter: TissueSegmenter
    weight: float
    options: dict[str, Any] = field(default_factory=dict)


def boundary_target(class_map: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """int64 [B, H, W] background / interior / inner boundary from the renderer input: nucleus = class > 0,
    boundary = nucleus pixels on the instance-edge channel (mask_ops.instance_edges of the crop).

    Equals instance_targets.three_class_target(instances of the crop) whenever class > 0 exactly where an instance
    is: instance_edges marks both pixels of every 4-neighbour pair with different ids, so on nucleus pixels it is
    find_boundaries(mode="inner"), and neither marks the crop border. (On the shared CoNSeP and MoNuSeg data the
    class and instance foregrounds agree pixel for pixel.) The downstream benchmark builds its target the same way,
    from crops of the instance map.
    """
    nucleus = class_map > 0
    target = torch.full_like(class_map, BACKGROUND, dtype=torch.long)
    target[nucleus] = INTERIOR
    target[nucleus & (edges > 0)] = BOUNDARY
    return target


def input_channels(config: Mapping[str, Any]) -> int:
    data = config["data"]
    return mask_ops.generator_input_channels(int(data["num_classes"]), data.get("noise_spacing") is not None,
                                             bool(data.get("use_edges", False)))


def build_generator(config: Mapping[str, Any]) -> GlobalGenerator:
    return GlobalGenerator(in_channels=input_channels(config), out_channels=3, **config["generator"])


def class_palette(num_classes: int) -> np.ndarray:
    base = np.array([[20, 20, 20], [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [0, 114, 178],
                     [213, 94, 0], [204, 121, 167]], np.uint8)
    return base[np.arange(num_classes) % len(base)]


class Pix2PixHDTrainer(GanTrainer):
    def build(self) -> None:
        data = self.config["data"]
        self.num_classes = int(data["num_classes"])
        fractions = tuple(data["split_fractions"])
        split_seed = int(data.get("split_seed", self.seed))
        per_split: dict[str, list] = {"train": [], "val": [], "test": []}
        self.splits = {}
        sources = []
        for source in data["sources"]:
            records = load_records(self.data_root, source["dataset"])
            split = split_records(records, tuple(source.get("split_fractions", fractions)), split_seed,
                                  held_back=held_back_groups(source))
            for name in per_split:
                per_split[name].append(split[name])
                self.splits.setdefault(name, []).extend(sorted({r.group for r in split[name]}))
            sources.append(source)

        def dataset(split_name: str, seed: int, length_of) -> ConcatDataset | None:
            parts = []
            for source, records in zip(sources, per_split[split_name]):
                if not records:
                    continue
                kind = DATASET_KINDS[source.get("derive", "mask")]
                remap = {int(k): int(v) for k, v in (source.get("class_remap") or {}).items()}
                parts.append(kind(records, crop=int(data["crop"]), num_classes=self.num_classes, class_remap=remap,
                                  noise_spacing=data.get("noise_spacing"), use_edges=bool(data.get("use_edges")),
                                  seed=seed, length=length_of(source), cache=True,
                                  **dict(source.get("derive_options") or {})))  # e.g. polygon settings
            return ConcatDataset(parts) if parts else None

        self.train_set = dataset("train", self.seed, lambda s: int(s.get("epoch_length", 500)))
        self.preview_set = dataset("val", self.seed + 1, lambda s: 2) or dataset("train", self.seed + 1, lambda s: 2)
        self.test_set = dataset("test", self.seed + 2, lambda s: 3)
        self.generator = build_generator(self.config)
        self.discriminator = MultiscaleDiscriminator(in_channels=input_channels(self.config) + 3,
                                                     **self.config["discriminator"])
        self.lambda_feat = float(self.train_cfg.get("lambda_feat", 10.0))
        self.consistency = self._consistency_terms(self.train_cfg.get("consistency"))

    def _consistency_terms(self, settings: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
                           ) -> list[ConsistencyTerm]:
        """`train.consistency`: one term (a mapping, v3's form) or a list of terms, each a frozen segmenter (a
        finished run in the same runs dir, trained with the benchmark held back) whose loss on the render is added
        to G's loss with `weight`. `kind` (default "type"):
          type:     {segmenter_run, weight, allowed_classes}: mask_consistency_loss; allowed_classes[c] lists the
                    segmenter classes that count as renderer class c. Logged as g_seg.
          boundary: {segmenter_run, weight, boundary_weight (2)}: boundary_consistency_loss of a `nuclei_boundary`
                    segmenter against the mask's background / interior / inner-boundary map, built from the
                    renderer input's instance-edge channel (boundary_target). Logged as g_boundary.
          size:     {segmenter_run, weight}: nucleus_area_loss, the nucleus area the segmenter sees vs the mask's
                    (any nuclei scheme: class 0 is background). Logged as g_size.
        """
        if not settings:
            return []
        terms = [settings] if isinstance(settings, Mapping) else list(settings)
        built: list[ConsistencyTerm] = []
        # Terms naming the same run share one frozen segmenter (v7's boundary and size terms): train_step then
        # runs it once per step, not once per term.
        segmenters: dict[str, tuple[TissueSegmenter, str]] = {}
        for term in terms:
            kind = str(term.get("kind", "type"))
            if kind not in CONSISTENCY_KINDS:
                raise ValueError(f"train.consistency kind {kind!r}; valid kinds: {sorted(CONSISTENCY_KINDS)}")
            if any(t.kind == kind for t in built):
                raise ValueError(f"train.consistency has two {kind!r} terms; one term per kind")
            run = str(term["segmenter_run"])
            if run not in segmenters:
                segmenters[run] = self._frozen_segmenter(run)
            segmenter, scheme = segmenters[run]
            if kind == "type":
                allowed = [list(map(int, c)) for c in term["allowed_classes"]]
                if len(allowed) != self.num_classes:
                    raise ValueError(f"train.consistency.allowed_classes has {len(allowed)} entries for "
                                     f"{self.num_classes} renderer classes")
                options: dict[str, Any] = {"allowed": allowed}
            elif kind == "size":
                if scheme not in ("he_nuclei", "nuclei_boundary"):
                    raise ValueError(f"train.consistency size term: segmenter run {term['segmenter_run']!r} has "
                                     f"scheme {scheme!r}; it needs a nuclei segmenter (class 0 = background)")
                options = {}
            else:
                if scheme != "nuclei_boundary":
                    raise ValueError(f"train.consistency boundary term: segmenter run {term['segmenter_run']!r} has "
                                     f"scheme {scheme!r}; it needs a nuclei_boundary segmenter")
                if not self.config["data"].get("use_edges"):
                    raise ValueError("train.consistency boundary term needs data.use_edges: its target is built "
                                     "from the instance-edge channel")
                options = {"boundary_weight": float(term.get("boundary_weight", 2.0))}
            built.append(ConsistencyTerm(kind, segmenter, float(term.get("weight", 1.0)), options))
        return built

    def _frozen_segmenter(self, run: str) -> tuple[TissueSegmenter, str]:
        """(frozen segmenter, its scheme name) from <runs>/<run>/latest.pt."""
        from training.trainers.scoring_trainers import build_segmenter  # torch-heavy; only configs that use it

        path = self.out_dir.parent / run / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"train.consistency.segmenter_run: {path} does not exist; train it first")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        # A checkpoint of a run still in progress (or cut before its lr schedule ended) would freeze a half-trained
        # segmenter into the renderer's loss for the whole run; refuse it.
        if int(payload["step"]) < int(payload.get("total_steps", payload["step"])):
            raise RuntimeError(f"train.consistency.segmenter_run: {path} is at step {payload['step']} of "
                               f"{payload['total_steps']}; let that run finish (or resume it) first")
        segmenter = build_segmenter(payload["config"])
        segmenter.load_state_dict(payload["model"])
        segmenter.eval().requires_grad_(False)
        return segmenter, str(payload["config"]["data"]["scheme"])

    def generator_input(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return batch["label"]

    def _update_discriminator(self, label: torch.Tensor, real: torch.Tensor, fake: torch.Tensor
                              ) -> tuple[list[list[torch.Tensor]], dict[str, float]]:
        """One LSGAN D step; returns D's features of the real image (G's feature-matching target) and losses."""
        set_requires_grad(self.discriminator, True)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            pred_fake = as_float(self.discriminator(label, fake.detach()))
            pred_real = as_float(self.discriminator(label, real))
        loss_d_fake = lsgan_loss(pred_fake, False)
        loss_d_real = lsgan_loss(pred_real, True)
        (0.5 * (loss_d_fake + loss_d_real)).backward()
        self.opt_d.step()
        return pred_real, {"d_real": loss_d_real.item(), "d_fake": loss_d_fake.item()}

    def discriminator_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        label = batch["label"].contiguous(memory_format=torch.channels_last)
        real = batch["image"].contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self.autocast():
            fake = self.generator(label)
        return self._update_discriminator(label, real, fake)[1]

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        label = batch["label"].contiguous(memory_format=torch.channels_last)
        real = batch["image"].contiguous(memory_format=torch.channels_last)
        with self.autocast():
            fake = self.generator(label)
        pred_real, losses = self._update_discriminator(label, real, fake)

        set_requires_grad(self.discriminator, False)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            pred_fake_g = as_float(self.discriminator(label, fake))
        loss_g_gan = lsgan_loss(pred_fake_g, True)
        loss_g_fm = feature_matching_loss(pred_fake_g, pred_real, self.lambda_feat)  # real features detached inside
        losses.update(g_gan=loss_g_gan.item(), g_fm=loss_g_fm.item())
        loss_g = loss_g_gan + loss_g_fm
        if self.consistency:
            class_map = label[:, :self.num_classes].argmax(1)
            rgb = (fake.float() + 1.0) * 127.5  # the segmenters take RGB in [0, 255]
        logits_of: dict[int, torch.Tensor] = {}  # one forward per shared segmenter (see _consistency_terms)
        for term in self.consistency:
            logits = logits_of.get(id(term.segmenter))
            if logits is None:
                with self.autocast():
                    logits = logits_of[id(term.segmenter)] = term.segmenter(rgb)
            if term.kind == "type":
                loss_term = mask_consistency_loss(logits, class_map, term.options["allowed"])
            elif term.kind == "size":
                loss_term = nucleus_area_loss(logits, class_map)
            else:
                target = boundary_target(class_map, label[:, -1])  # edges are the input's last channel
                loss_term = boundary_consistency_loss(logits, target, term.options["boundary_weight"])
            loss_g = loss_g + term.weight * loss_term
            losses[CONSISTENCY_KINDS[term.kind]] = loss_term.item()
        loss_g.backward()
        self.opt_g.step()
        return losses

    def visual_row(self, sample: Mapping[str, torch.Tensor], fake: torch.Tensor) -> list[np.ndarray]:
        return [render_label(sample["label"], self.num_classes), to_uint8_image(sample["image"]),
                to_uint8_image(fake)]


def as_float(features: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Discriminator outputs in fp32 for the losses (they may come out of a bf16 autocast region)."""
    return [[f.float() for f in scale] for scale in features]


def render_label(label: torch.Tensor, num_classes: int) -> np.ndarray:
    """[C', H, W] generator input -> RGB: class palette, instance edges black, noise pixels white."""
    label = label.detach().cpu().numpy()
    image = class_palette(num_classes)[label[:num_classes].argmax(0)]
    extra = label[num_classes:]
    if len(extra) == 2:
        image[extra[1] > 0] = 0
    if len(extra) >= 1:
        image[extra[0] > 0] = 255
    return image
