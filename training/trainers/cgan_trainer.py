"""Trainer and exporter for the class-conditioned patch generator (training/models/cgan_patch.py).

Training (`CGANTrainer`, run through `python -m training.train --config training/configs/patch-generator.yaml`):
non-saturating GAN loss (binary cross-entropy, as in the cGAN paper), Adam with the paper's lr 2e-4 and beta1 0.5
(the shared GanTrainer keeps it constant for the first half and decays it linearly to 0 over the second half),
class-balanced batches from the patches128 train split. The batch indices, augmentation and z of step `s` come
from generators seeded with (seed, s), and the shared checkpoint holds model, optimiser, schedule and
spectral-norm state, so a resumed run continues exactly as if it had never stopped. The run directory gets the
shared trainer's latest.pt, losses.jsonl and samples_<step>.png (here one row per class, eval mode = what is
exported), plus run_info.json (classes, split counts) that the exporter reads.

MEP prompts (issue #9.3, training/configs/patch-generator-mep.yaml): with `data.prompt_table` (a PromptTable JSON of
training/data/mep_prompts.py built from the same train split) the class ids become (label, morphology cluster)
prompt ids, batches are prompt-balanced (`data.balance`), and the export carries the prompt table in its metadata.
Without it everything is as above (the shipped patch-generator trains and exports unchanged).

Export (`export_patch_generator`, CLI `python -m training.trainers.cgan_trainer export --run runs/patch-generator`):
the generator -> model_store/patch-generator/<version>/ through training.export.onnx_export.export_to_model_store,
with a per-class sample grid in samples.png.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from training.data.mep_prompts import PromptTable, balanced_weights
from training.data.patches128 import Patch128Dataset, class_balanced_weights, load_patch_index
from training.models.cgan_patch import (
    IMAGE_SIZE,
    PatchDiscriminator,
    PatchGANConfig,
    PatchGenerator,
    parameter_bytes,
)
from training.trainers.base import CHECKPOINT_NAME, GanTrainer, linear_decay_lambda

RUN_INFO_NAME = "run_info.json"
_SEED_STRIDE = 1_000_003  # keeps the per-step random streams of different seeds apart
_GENERATOR_KEYS = {"latent_dim", "class_embed_dim", "channels"}
_DISCRIMINATOR_KEYS = {"channels"}
_DATA_KEYS = {"label_scheme", "min_source_images", "val_fraction", "prompt_table", "balance"}


def _check_keys(section: Mapping[str, Any], valid: set[str], where: str) -> None:
    unknown = set(section) - valid
    if unknown:
        raise KeyError(f"unknown keys {sorted(unknown)} in config section {where!r}; valid: {sorted(valid)}")


def architecture_from_config(config: Mapping[str, Any], num_classes: int) -> PatchGANConfig:
    """PatchGANConfig from the `generator` and `discriminator` sections of a patch-generator config."""
    gen, disc = dict(config["generator"]), dict(config["discriminator"])
    _check_keys(gen, _GENERATOR_KEYS, "generator")
    _check_keys(disc, _DISCRIMINATOR_KEYS, "discriminator")
    defaults = PatchGANConfig(num_classes=num_classes)
    return PatchGANConfig(
        num_classes=num_classes,
        latent_dim=int(gen.get("latent_dim", defaults.latent_dim)),
        class_embed_dim=int(gen.get("class_embed_dim", defaults.class_embed_dim)),
        generator_channels=tuple(gen.get("channels", defaults.generator_channels)),
        discriminator_channels=tuple(disc.get("channels", defaults.discriminator_channels)),
    )


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """Independent, reproducible random stream `stream` of training step `step`."""
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + step) * 8 + stream)


def fixed_latents(seed: int, num_classes: int, per_class: int, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The serving recipe: z ~ N(0, 1) drawn by np.random.Generator(PCG64(seed)); sample i has class i // per_class."""
    rng = np.random.Generator(np.random.PCG64(seed))
    z = torch.from_numpy(rng.standard_normal((num_classes * per_class, latent_dim), dtype=np.float32))
    class_id = torch.arange(num_classes, dtype=torch.int64).repeat_interleave(per_class)
    return z, class_id


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of D with real -> 1, fake -> 0 (softplus form of BCE-with-logits)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log D(G(z, y), y)."""
    return F.softplus(-fake_logits).mean()


# ------------------------------------------------------------------------------------------------------ training
class CGANTrainer(GanTrainer):
    """Class-conditioned latent-to-image GAN on patches128 (see module docstring)."""

    generator: PatchGenerator
    discriminator: PatchDiscriminator

    def build(self) -> None:
        data = dict(self.config["data"])
        _check_keys(data, _DATA_KEYS, "data")
        self.index = load_patch_index(
            self.data_root,
            label_scheme=data.get("label_scheme", "grade5_organ"),
            min_source_images=int(data.get("min_source_images", 3)),
            val_fraction=float(data.get("val_fraction", 0.15)),
            seed=self.seed,
        )
        self.splits = {
            split: sorted({r.source_image for r in records}) for split, records in self.index.splits.items()
        }
        self.train_set = Patch128Dataset(self.data_root, self.index, "train", augment=True, seed=self.seed)
        self.preview_set = self.train_set
        # Condition ids = class ids, unless a MEP prompt table (training/data/mep_prompts.py) splits every class into
        # (class, morphology cluster) prompts; then batches are balanced over prompts instead of classes.
        self.prompt_table: PromptTable | None = None
        self.condition_names: tuple[str, ...] = self.index.class_names
        if data.get("prompt_table"):
            self._use_prompt_table(Path(data["prompt_table"]), str(data.get("balance", "label_then_cell")))
        elif "balance" in data:
            raise KeyError("data.balance needs data.prompt_table (without it batches are class-balanced)")
        else:
            self.sample_weights = class_balanced_weights(self.train_set.class_ids)
        self.architecture = architecture_from_config(self.config, len(self.condition_names))
        self.generator = PatchGenerator(self.architecture)
        self.discriminator = PatchDiscriminator(self.architecture)
        self.preview_latents = fixed_latents(
            self.seed, self.architecture.num_classes, int(self.train_cfg.get("samples_per_class", 8)),
            self.architecture.latent_dim,
        )
        self._write_run_info()

    def _use_prompt_table(self, path: Path, balance: str) -> None:
        """Relabel the train crops with the table's condition ids and balance batches over prompts."""
        table = PromptTable.from_json(path)
        if tuple(table.labels) != self.index.class_names:
            raise ValueError(f"prompt table {path} was built for classes {table.labels}, this split has "
                             f"{list(self.index.class_names)} (rebuild it with the same data settings)")
        keys = [(r.image, r.x, r.y) for r in self.train_set.records]
        missing = [k for k in keys if k not in table.assignments]
        if missing:
            raise ValueError(f"prompt table {path} has no condition for {len(missing)} train crops, e.g. {missing[0]}")
        condition_ids = [table.assignments[k] for k in keys]
        self.train_set.set_class_ids(condition_ids)
        labels = [c.label for c in table.conditions]
        self.sample_weights = torch.from_numpy(balanced_weights(condition_ids, labels, balance))
        self.prompt_table = table
        self.condition_names = tuple(c.text for c in table.conditions)

    def _write_run_info(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "name": self.config.get("name"),
            "data_root": str(self.data_root),
            "class_names": list(self.index.class_names),
            "dropped_classes": self.index.dropped_classes,
            "train_counts": self.index.counts("train"),
            "val_counts": self.index.counts("val"),
            "train_source_images": self.index.source_image_counts("train"),
            "val_source_images": self.index.source_image_counts("val"),
            "architecture": asdict(self.architecture),
            "generator_fp32_bytes": parameter_bytes(self.generator),
        }
        if self.prompt_table is not None:
            counts = torch.bincount(self.train_set.class_ids, minlength=len(self.condition_names)).tolist()
            info |= {
                "condition_names": list(self.condition_names),
                "condition_train_counts": dict(zip(self.condition_names, counts)),
                "prompt_table": self.prompt_table.metadata(),
                "balance": str(self.config["data"].get("balance", "label_then_cell")),
            }
        (self.out_dir / RUN_INFO_NAME).write_text(json.dumps(info, indent=2))

    def maybe_resume(self) -> bool:
        resumed = super().maybe_resume()
        if resumed:
            # The loaded optimiser carries the lr its run set for *its* total steps; a resume with another --steps
            # would take one step at that stale lr. Re-derive it from this run's schedule at the resumed step.
            factor = linear_decay_lambda(self.total_steps)(self.state.step)
            for optimizer, scheduler in ((self.opt_g, self.sched_g), (self.opt_d, self.sched_d)):
                for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
                    group["lr"] = base_lr * factor
        return resumed

    def _loader(self, dataset: Patch128Dataset) -> Iterator[Mapping[str, torch.Tensor]]:
        """Endless class-balanced batches; batch `s` depends only on (seed, s), so resuming is exact."""
        batch_size = int(self.train_cfg.get("batch_size", 32))
        while True:
            rng = step_generator(self.seed, self.state.step, 0)
            indices = torch.multinomial(self.sample_weights, batch_size, replacement=True, generator=rng)
            dataset.reseed(int(torch.randint(0, 2**62, (1,), generator=rng)))
            items = [dataset[int(i)] for i in indices]
            yield {
                "image": torch.stack([image for image, _ in items]),
                "class_id": torch.tensor([class_id for _, class_id in items], dtype=torch.int64),
            }

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        real, class_id = batch["image"], batch["class_id"]
        z = torch.randn(len(class_id), self.architecture.latent_dim,
                        generator=step_generator(self.seed, self.state.step, 1))
        fake = self.generator(z, class_id)

        self.discriminator.requires_grad_(True)
        real_logits = self.discriminator(real, class_id)
        fake_logits = self.discriminator(fake.detach(), class_id)
        loss_d = discriminator_loss(real_logits, fake_logits)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        self.discriminator.requires_grad_(False)  # G step: no D parameter gradients needed
        loss_g = generator_loss(self.discriminator(fake, class_id))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return {
            "loss_d": loss_d.item(),
            "loss_g": loss_g.item(),
            "d_real": torch.sigmoid(real_logits).mean().item(),  # mean D(x) on real crops
            "d_fake": torch.sigmoid(fake_logits).mean().item(),  # mean D(G(z)) before the G step
        }

    @torch.no_grad()
    def save_grid(self, path: Path, n: int = 0) -> Path:
        """One row per class from fixed latents, in eval mode (what the exported model produces)."""
        z, class_id = self.preview_latents
        width = {"label_width": 420} if self.prompt_table is not None else {}  # prompt texts are long
        Image.fromarray(render_grid(self.generator, z, class_id, self.condition_names, **width)).save(path)
        return path


# ------------------------------------------------------------------------------------------------------ sample grids
@torch.no_grad()
def render_grid(generator: PatchGenerator, z: torch.Tensor, class_id: torch.Tensor,
                class_names: tuple[str, ...] | list[str], label_width: int = 230) -> np.ndarray:
    """uint8 RGB grid: one row per class (id and name on the left), columns = samples; eval mode."""
    was_training = generator.training
    generator.eval()
    images = torch.cat([generator(z[i : i + 32], class_id[i : i + 32]) for i in range(0, len(z), 32)])
    generator.train(was_training)
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    num_classes = len(class_names)
    per_class = len(z) // num_classes
    gap = 2
    canvas = Image.new(
        "RGB", (label_width + per_class * (IMAGE_SIZE + gap), num_classes * (IMAGE_SIZE + gap)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for row in range(num_classes):
        top = row * (IMAGE_SIZE + gap)
        draw.text((4, top + IMAGE_SIZE // 2 - 6), f"{row}: {class_names[row]}", fill=(0, 0, 0))
        for col in range(per_class):
            canvas.paste(Image.fromarray(images[row * per_class + col]), (label_width + col * (IMAGE_SIZE + gap), top))
    return np.asarray(canvas)


# ------------------------------------------------------------------------------------------------------ export
def parity_latents(batch: int, latent_dim: int, num_classes: int, rng: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Exporter parity inputs: z ~ N(0, 1) and class ids across the range (the output size is fixed at 128)."""
    z = torch.randn(batch, latent_dim, generator=rng)
    class_id = torch.randint(0, num_classes, (batch,), generator=rng, dtype=torch.int64)
    return z, class_id


def patch_generator_metadata(class_names: list[str], latent_dim: int, label_scheme: str) -> dict[str, Any]:
    """The manifest metadata serving needs to draw z and pick a class."""
    return {
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "class_ids": {name: i for i, name in enumerate(class_names)},
        "label_scheme": label_scheme,
        "latent_dim": latent_dim,
        "z_distribution": "standard_normal",
        "z_sampling": "np.random.Generator(np.random.PCG64(seed)).standard_normal((batch, latent_dim), dtype=np.float32)",
        "output_range": [-1.0, 1.0],
        "tile_size": IMAGE_SIZE,
        "stain": "he",
        "magnification": {"glas": "20x (0.62 um/px)", "monuseg": "40x (~0.25 um/px)"},
    }


def export_patch_generator(
    generator: PatchGenerator,
    *,
    class_names: list[str],
    config: Mapping[str, Any],
    steps: int,
    train_seconds: float,
    train_counts: Mapping[str, int],
    store_root: str | Path = "model_store",
    version: str | None = None,
    losses: Mapping[str, float] | None = None,
    training_notes: str | None = None,
    overwrite: bool = False,
    code_commits: Sequence[Mapping[str, Any]] = (),
    prompt_table: Mapping[str, Any] | None = None,
    extra_metrics: Mapping[str, Any] | None = None,
    extra_card_sections: Mapping[str, str] | None = None,
) -> Path:
    """Export `generator` into <store_root>/<name>/<version>/ with a per-class samples.png; returns that directory.

    `prompt_table` (PromptTable.metadata() of training/data/mep_prompts.py) marks a MEP model: its class ids are
    (label, morphology cluster) prompts, `class_names` are the prompt texts and the table goes into the metadata.
    `extra_metrics` / `extra_card_sections` add evaluation results to the manifest metrics / model card.
    """
    from training.export.onnx_export import ModelCard, export_to_model_store, hardware_string
    from training.provenance import training_commit_fields

    export_cfg = dict(config.get("export", {}))
    name = str(config.get("name", "patch-generator"))
    version = str(version or export_cfg.get("version", "1"))
    samples_per_class = int(export_cfg.get("samples_per_class", 8))
    sample_seed = int(export_cfg.get("sample_seed", 0))
    data_cfg = dict(config.get("data", {}))
    label_scheme = data_cfg.get("label_scheme", "grade5_organ")
    arch = generator.config
    if len(class_names) != arch.num_classes:
        raise ValueError(f"{len(class_names)} class names for a generator with {arch.num_classes} classes")
    generator = generator.eval()
    z, class_id = fixed_latents(sample_seed, arch.num_classes, samples_per_class, arch.latent_dim)
    # Prompt texts are longer than class names: a wider caption column keeps them off the samples.
    grid = render_grid(generator, z, class_id, class_names, **({"label_width": 420} if prompt_table else {}))
    losses = dict(losses or {})

    metadata = patch_generator_metadata(list(class_names), arch.latent_dim, label_scheme)
    if prompt_table is not None:
        metadata |= mep_metadata(prompt_table)
    card = ModelCard(
        title="class-conditioned 128x128 H&E patch generator (cGAN)",
        summary=(
            "Latent-to-image conditional GAN after Andrei & Ionescu 2025 (z and class embedding concatenated, "
            "projected to 4x4, five stride-2 transposed convolutions to 128x128, tanh), trained against a "
            f"spectrally normalised projection discriminator. Inputs: `z` float32 [batch, {arch.latent_dim}] drawn "
            "from N(0, I) (serving: np.random.Generator(PCG64(seed)).standard_normal) and `class_id` int64 [batch]; "
            "output: `image` float32 [batch, 3, 128, 128] in [-1, 1]."
        ),
        data=(
            "patches128 crops (shared/data/DATA.md) of GlaS and MoNuSeg H&E images, label scheme "
            f"`{label_scheme}`: labels are image-level (weak), propagated to every crop of the image. Classes with "
            f"fewer than {data_cfg.get('min_source_images', 3)} source images are dropped. Train split only "
            f"(grouped by source image; {float(data_cfg.get('val_fraction', 0.15)):.0%} of each class's source "
            f"images held out, seed {config.get('seed', 0)}). Batches are class-balanced (sample weight = 1 / class "
            "frequency) with random rot90/flip augmentation.\n\n"
            "| id | class | train crops |\n|---|---|---|\n"
            + "\n".join(f"| {i} | {c} | {train_counts.get(c, 0)} |" for i, c in enumerate(class_names))
        ),
        intended_use="Research prototyping of class-conditioned synthetic H&E patches and of the serving stack.",
        limitations=(
            "Short single-thread CPU training on ~2k weakly labelled crops: samples reproduce the colour and coarse "
            "texture of each class, not reliable cellular detail; transposed-convolution checkerboard artefacts "
            "remain visible (mean vertical gradient of samples ~2x that of real crops), and class identity is only "
            "as good as the image-level labels. GlaS (20x) and MoNuSeg (40x) classes differ in magnification. No FID was "
            "computed here and no pathologist reviewed the samples."
        ),
        losses=losses,
        extra_sections={
            "Samples": (
                "![samples](samples.png)\n\nOne row per class (id: name), "
                f"{samples_per_class} samples each, z from np.random.Generator(PCG64({sample_seed})), eval mode."
            ),
            **({"Training details": training_notes} if training_notes else {}),
            **dict(extra_card_sections or {}),
        },
    )
    if prompt_table is not None:
        card = mep_card(card, prompt_table, train_counts, samples_per_class, sample_seed)
    provenance = {
        **training_commit_fields({"code_commits": code_commits}),
        "config": dict(config),
        "seed": int(config.get("seed", 0)),
        "data": ["glas", "monuseg", f"patches128 train split ({label_scheme}, grouped by source image)"],
        "steps": int(steps),
        "train_seconds": round(float(train_seconds), 1),
        "hardware": hardware_string(),
    }

    def parity_inputs(batch: int, height: int, width: int, rng: torch.Generator) -> tuple[torch.Tensor, ...]:
        return parity_latents(batch, arch.latent_dim, arch.num_classes, rng)

    version_dir = export_to_model_store(
        generator,
        parity_latents(2, arch.latent_dim, arch.num_classes, torch.Generator().manual_seed(0)),
        name=name,
        version=version,
        kind="patch_generator",
        input_names=["z", "class_id"],
        output_names=["image"],
        dynamic_axes={"z": {0: "batch"}, "class_id": {0: "batch"}, "image": {0: "batch"}},
        metadata=metadata,
        provenance=provenance,
        metrics={"train_counts": dict(train_counts), "generator_fp32_bytes": parameter_bytes(generator), **losses,
                 **dict(extra_metrics or {})},
        store_root=store_root,
        parity_sizes=((IMAGE_SIZE, IMAGE_SIZE),),
        parity_inputs=parity_inputs,
        atol=float(export_cfg.get("atol", 1e-3)),
        max_batch_size=int(export_cfg.get("max_batch_size", 16)),
        card=card,
        overwrite=overwrite,
    )
    # Written after the exporter, whose own samples caption describes image-to-image models.
    Image.fromarray(grid).save(version_dir / "samples.png")
    return version_dir


def mep_metadata(prompt_table: Mapping[str, Any]) -> dict[str, Any]:
    """Manifest metadata of a MEP model: how to pick a condition id from a label (and a morphology type)."""
    prompts = list(prompt_table["prompts"])
    return {
        "conditioning": "label_x_morphology_prompt",
        "condition_sampling": (
            "class_id = a prompt's condition_id. For a label only, draw the condition among the label's prompts "
            "with probability label_cluster_shares[label] (the training-crop shares; reproduces the label's real "
            "morphology mix) or uniformly (balanced across morphology types)."
        ),
        "labels": list(prompt_table["labels"]),
        "label_condition_ids": {label: [p["condition_id"] for p in prompts if p["label"] == label]
                                for label in prompt_table["labels"]},
        "prompt_table": dict(prompt_table),
    }


def mep_card(card: Any, prompt_table: Mapping[str, Any], train_counts: Mapping[str, int], samples_per_class: int,
             sample_seed: int) -> Any:
    """The model card of a MEP model: same facts, with the prompts in place of the classes."""
    from dataclasses import replace

    prompts = list(prompt_table["prompts"])
    curve = prompt_table["sd_index_curve"]
    return replace(
        card,
        title="MEP prompt-conditioned 128x128 H&E patch generator (cGAN, label x morphology type)",
        summary=card.summary.replace("`class_id` int64 [batch]", "`class_id` int64 [batch] (a prompt's condition id)")
        + "\n\nConditioning follows the morphology-enriched prompt building (MEP) of Osorio et al. 2024: every "
        "training crop's label is refined by its k-means cluster of shipped histology-encoder features, one "
        "condition per prompt \"<label> tissue, morphology type <k>\" (prompt table in the manifest metadata).",
        data=card.data.split("\n\n| id |")[0].replace(
            "Batches are class-balanced (sample weight = 1 / class frequency)",
            "Batches are prompt-balanced (each label equally likely, then each of its prompts; MEP section 2.4)")
        + f"\n\nMorphology types: k = {prompt_table['k']} (smallest SD index over k = {curve[0]['k']}..{curve[-1]['k']}; "
        f"{prompt_table['clustering']}); (label, cluster) cells with fewer than {prompt_table['min_cell_crops']} "
        "training crops are merged into the label's nearest kept cell.\n\n"
        "| id | prompt | train crops | merged clusters |\n|---|---|---|---|\n"
        + "\n".join(f"| {p['condition_id']} | {p['text']} | {train_counts.get(p['text'], p['train_crops'])} | "
                    f"{', '.join(map(str, p['merged_clusters'])) or '-'} |" for p in prompts)
        + "\n\n| k | Scat | Dis | SD |\n|---|---|---|---|\n"
        + "\n".join(f"| {c['k']} | {c['scat']:.4f} | {c['dis']:.4f} | {c['sd']:.4f} |" for c in curve),
        limitations=(
            "Short single-thread CPU training on ~2k weakly labelled crops: samples reproduce the colour and coarse "
            "texture of each prompt, not reliable cellular detail, and transposed-convolution checkerboard artefacts "
            "remain. Labels are image-level; GlaS (20x) and MoNuSeg (40x) differ in magnification. Morphology types "
            "are k-means clusters of the same encoder the scoring service uses for FID/KID/precision/recall, so "
            "scores of this model are partly circular (it is conditioned on what the judge measures), and a type "
            "number has no meaning outside this prompt table. A prompt of a small cell (tens of crops) is learnt "
            "from few crops, drawn as often as its label's large cells, and may reproduce them closely. No "
            "pathologist reviewed the samples."
        ),
        extra_sections={
            **card.extra_sections,
            "Samples": ("![samples](samples.png)\n\nOne row per prompt (condition id: text), "
                        f"{samples_per_class} samples each, z from np.random.Generator(PCG64({sample_seed})), "
                        "eval mode."),
        },
    )


def export_run(run_dir: str | Path, *, store_root: str | Path = "model_store", version: str | None = None,
               overwrite: bool = False, extra_metrics: Mapping[str, Any] | None = None,
               extra_card_sections: Mapping[str, str] | None = None) -> Path:
    """Export the latest checkpoint of a CGANTrainer run directory (a MEP run exports its prompt table too)."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint {checkpoint}")
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    info = json.loads((run_dir / RUN_INFO_NAME).read_text())
    arch = dict(info["architecture"])
    arch["generator_channels"] = tuple(arch["generator_channels"])
    arch["discriminator_channels"] = tuple(arch["discriminator_channels"])
    generator = PatchGenerator(PatchGANConfig(**arch))
    generator.load_state_dict(payload["generator"])
    generator = generator.to(memory_format=torch.contiguous_format)
    # hardware_string() reports torch's thread count: make it the one the run trained with.
    torch.set_num_threads(int(payload.get("hardware_threads", torch.get_num_threads())))
    train_cfg = dict(payload["config"]["train"])
    steps, seconds = int(payload["step"]), float(payload["train_seconds"])
    # A resume at the final step trained nothing (a finished run re-invoked, e.g. by an experiment script).
    events = [e for e in _run_events(run_dir / "losses.jsonl") if e != f"event resumed, step {steps}"]
    notes = (
        f"{steps} steps of batch {train_cfg.get('batch_size')} (class-balanced), Adam lr {train_cfg.get('lr')} "
        f"beta1 {train_cfg.get('beta1')} with the shared GanTrainer schedule (constant for the first half of the "
        "planned steps, then linear decay to 0; the per-step lr is in losses.jsonl); "
        f"{seconds / max(1, steps):.2f} s/iter on average on {train_cfg.get('num_threads')} torch thread(s) of a "
        "2-core machine shared with other training jobs. Generator "
        f"{parameter_bytes(generator) / 2**20:.1f} MiB fp32."
        + ("\n\nRun events (resumes, time-budget reschedules): " + "; ".join(events) + "." if events else "")
    )
    mep = "prompt_table" in info
    if mep:
        notes = notes.replace("(class-balanced)", f"(prompt-balanced, {info.get('balance', 'label_then_cell')})")
    return export_patch_generator(
        generator,
        class_names=list(info["condition_names"] if mep else info["class_names"]),
        config=payload["config"],
        steps=int(payload["step"]),
        train_seconds=float(payload["train_seconds"]),
        train_counts=info["condition_train_counts"] if mep else info["train_counts"],
        store_root=store_root,
        version=version,
        losses=final_losses(run_dir / "losses.jsonl"),
        training_notes=notes,
        code_commits=payload.get("code_commits", []),
        overwrite=overwrite,
        prompt_table=info["prompt_table"] if mep else None,
        extra_metrics=extra_metrics,
        extra_card_sections=extra_card_sections,
    )


def _run_events(path: Path) -> list[str]:
    """Resume / reschedule events of a losses.jsonl, as short text (they explain a non-monotonic lr)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [", ".join(f"{k} {v}" for k, v in r.items()) for r in records if "event" in r]


def final_losses(path: Path, last: int = 10) -> dict[str, float]:
    """Mean of the last `last` logged records of each loss in a losses.jsonl (empty when there is none)."""
    if not path.is_file():
        return {}
    records = [r for r in map(json.loads, path.read_text().splitlines()) if "step" in r and "loss_d" in r]
    tail = records[-last:]
    return {k: round(float(np.mean([r[k] for r in tail])), 4) for k in ("loss_d", "loss_g", "d_real", "d_fake")} if tail else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a patch-generator run to the model store.")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="export the latest checkpoint of a run directory")
    exp.add_argument("--run", required=True, type=Path, help="run directory (holds latest.pt, run_info.json)")
    exp.add_argument("--store-root", type=Path, default=Path("model_store"))
    exp.add_argument("--version", default=None)
    exp.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    print(export_run(args.run, store_root=args.store_root, version=args.version, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
