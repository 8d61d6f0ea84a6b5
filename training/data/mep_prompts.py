"""Morphology-enriched prompt building (MEP, Osorio et al. 2024, shared/papers/mep-latent-diffusion-morphology-prompts.txt).

The paper turns weak patch labels into richer conditions in three steps, all reproduced here:
  1. features: a frozen image encoder embeds every training patch (paper: DINO ViT-B/8 class token; here the
     shipped `histology-encoder` ONNX model, pooled 256-d features, run with ONNX Runtime);
  2. k-means on the features of all patches together (global, as in the paper: one set of "morphology types"
     shared by every label), with k chosen by the smallest SD validity index (Halkidi et al. 2000) over a range;
  3. prompts "<label> tissue, morphology type <k>", one per (label, cluster) cell. We keep them as condition ids
     (the cGAN has a class embedding, not a text encoder) and carry the text alongside.
and the paper's dataset balancing (its section 2.4: every prompt about equally represented) as per-sample
weights for a with-replacement sampler.

Deviations, and why:
  * features are L2-normalised before clustering: the encoder's manifest says its features are meant to be
    compared after L2 normalisation (`l2_normalise_for`), and the scoring service does so for precision/recall;
  * cells with fewer than `min_cell_crops` training crops are merged into the nearest (centroid distance) kept cell
    of the same label rather than dropped (the paper drops all but the 21 most populated prompts per class): with
    ~2k crops, dropping would remove whole morphologies from training, and merging keeps every crop;
  * balancing is hierarchical by default ("label_then_cell": each label equally likely, then each of its cells
    equally likely). When every label has the same number of cells (the paper's 21 per class) this is exactly
    uniform over cells; when labels differ in cell count it keeps the label marginal of the label-only baseline's
    class-balanced sampler, so the two models differ only in how each label's morphologies are mixed.
    "cell" (uniform over all cells) is available for the literal reading.
  * cluster numbers are ordered by cluster size (type 0 = most crops), so names are stable across equal runs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PROMPT_TEMPLATE = "{label} tissue, morphology type {cluster}"
BALANCE_MODES = ("label_then_cell", "cell")
RecordKey = tuple[str, int, int]  # (image path relative to the data root, x, y): one patches128 crop


# ------------------------------------------------------------------------------------------------ features
class EncoderFeatures:
    """uint8 RGB crops -> L2-normalised features of a shipped encoder (ONNX Runtime, fixed thread count)."""

    def __init__(self, model_dir: str | Path, threads: int = 1, batch_size: int = 32) -> None:
        import onnxruntime as ort
        import yaml

        self.model_dir = Path(model_dir)
        self.manifest = yaml.safe_load((self.model_dir / "manifest.yaml").read_text())
        metadata = self.manifest.get("metadata", {})
        if list(metadata.get("input_range", [0.0, 255.0])) != [0.0, 255.0]:
            raise ValueError(f"{self.model_dir}: expected an encoder taking 0..255 input, got {metadata.get('input_range')}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.model_dir / self.manifest["file"]), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.manifest["inputs"][0]["name"]
        self.batch_size = min(batch_size, int(self.manifest.get("max_batch_size", batch_size)))

    @property
    def reference(self) -> dict[str, str]:
        return {"name": self.manifest["name"], "version": str(self.manifest["version"]),
                "sha256": self.manifest["sha256"], "output": "features", "l2_normalised": "true"}

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
            raise ValueError(f"expected uint8 [N, H, W, 3] crops, got {crops.dtype} {crops.shape}")
        out = []
        for start in range(0, len(crops), self.batch_size):
            batch = crops[start:start + self.batch_size].transpose(0, 3, 1, 2).astype(np.float32)
            out.append(self.session.run(["features"], {self.input_name: batch})[0])
        features = np.concatenate(out).astype(np.float64)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------------ SD index
def scattering(features: np.ndarray, assignment: np.ndarray, num_clusters: int) -> float:
    """Scat(c) = mean_i ||sigma(v_i)|| / ||sigma(X)||, sigma = per-dimension variance (Halkidi et al. 2000).

    Average compactness of the clusters relative to the spread of the whole set (lower = tighter clusters).
    """
    total = np.linalg.norm(features.var(axis=0))
    if total == 0:
        return 0.0
    per_cluster = [np.linalg.norm(features[assignment == i].var(axis=0)) for i in range(num_clusters)
                   if np.any(assignment == i)]
    return float(np.mean(per_cluster) / total)


def total_separation(centers: np.ndarray) -> float:
    """Dis(c) = (Dmax / Dmin) * sum_k (sum_z ||v_k - v_z||)^-1 (Halkidi et al. 2000).

    Grows when centres are unevenly spread or close together (lower = better separated).
    """
    distances = np.linalg.norm(centers[:, None, :] - centers[None, :, :], axis=-1)
    off_diagonal = distances[~np.eye(len(centers), dtype=bool)]
    if len(centers) < 2 or off_diagonal.min() == 0:
        return float("inf")
    return float(off_diagonal.max() / off_diagonal.min() * np.sum(1.0 / distances.sum(axis=1)))


@dataclass(frozen=True)
class SDPoint:
    k: int
    scat: float
    dis: float
    sd: float
    inertia: float


def kmeans(features: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Seeded k-means (scikit-learn, k-means++ init, 10 restarts) -> (assignment, centres, inertia)."""
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
    return model.labels_.astype(np.int64), model.cluster_centers_, float(model.inertia_)


def sd_index_curve(features: np.ndarray, ks: Iterable[int], seed: int = 0
                   ) -> tuple[list[SDPoint], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """SD(k) = alpha * Scat(k) + Dis(k) for every k, alpha = Dis(k_max) (Halkidi et al. 2000, as the MEP paper uses).

    alpha puts the two terms on one scale: Scat falls and Dis rises with k, and weighting Scat by the largest Dis
    of the range makes neither term dominate. Returns the curve and each k's (assignment, centres).
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 2:
        raise ValueError(f"k range must start at >= 2, got {ks}")
    if ks[-1] > len(features):
        raise ValueError(f"k up to {ks[-1]} needs at least that many points, got {len(features)}")
    fits = {k: kmeans(features, k, seed) for k in ks}
    scat = {k: scattering(features, fits[k][0], k) for k in ks}
    dis = {k: total_separation(fits[k][1]) for k in ks}
    alpha = dis[ks[-1]]
    curve = [SDPoint(k, scat[k], dis[k], alpha * scat[k] + dis[k], fits[k][2]) for k in ks]
    return curve, {k: (fits[k][0], fits[k][1]) for k in ks}


def choose_k(curve: Sequence[SDPoint]) -> int:
    """The k of the smallest SD index (ties: the smaller k)."""
    return min(curve, key=lambda p: (p.sd, p.k)).k


def order_by_size(assignment: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters by size, largest first (ties by old index), so "type 0" is the most common morphology."""
    counts = np.bincount(assignment, minlength=len(centers))
    order = sorted(range(len(centers)), key=lambda i: (-counts[i], i))
    new_id = np.empty(len(centers), dtype=np.int64)
    new_id[order] = np.arange(len(centers))
    return new_id[assignment], centers[order]


# ------------------------------------------------------------------------------------------------ prompt table
@dataclass(frozen=True)
class Condition:
    """One prompt: a (label, morphology cluster) cell and its condition id (= generator class id)."""

    condition_id: int
    label: str
    cluster: int
    text: str
    train_crops: int
    merged_clusters: tuple[int, ...] = ()  # clusters of this label folded into this cell (too few crops)


@dataclass
class PromptTable:
    """Condition ids <-> (label, cluster) <-> prompt text, plus how they were made and which crop got which."""

    conditions: list[Condition]
    labels: list[str]
    k: int
    sd_curve: list[SDPoint]
    centers: np.ndarray  # [k, feature_dim], L2-normalised feature space, size-ordered cluster numbers
    encoder: dict[str, str]
    min_cell_crops: int
    seed: int
    assignments: dict[RecordKey, int] = field(default_factory=dict)  # train crop -> condition id
    clusters: dict[RecordKey, int] = field(default_factory=dict)     # train crop -> raw cluster (before merging)

    def condition(self, label: str, cluster: int) -> Condition:
        """The condition a crop of `label` in `cluster` maps to (its own cell or the one it was merged into)."""
        for c in self.conditions:
            if c.label == label and (c.cluster == cluster or cluster in c.merged_clusters):
                return c
        raise KeyError(f"no condition for label {label!r}, cluster {cluster}")

    def of_label(self, label: str) -> list[Condition]:
        return [c for c in self.conditions if c.label == label]

    def label_shares(self, label: str) -> dict[int, float]:
        """condition id -> share of `label`'s training crops (for drawing clusters in their natural proportion)."""
        cells = self.of_label(label)
        total = sum(c.train_crops for c in cells)
        return {c.condition_id: c.train_crops / total for c in cells}

    def nearest_cluster(self, features: np.ndarray) -> np.ndarray:
        """Cluster of L2-normalised features by nearest centre (assigns crops k-means never saw, e.g. held-back)."""
        d = ((features[:, None, :] - self.centers[None, :, :]) ** 2).sum(-1)
        return d.argmin(axis=1)

    def metadata(self) -> dict[str, Any]:
        """The JSON-safe summary that goes into a model manifest (no per-crop assignments, no centres)."""
        return {
            "template": PROMPT_TEMPLATE,
            "k": self.k,
            "k_selection": "smallest SD validity index (Halkidi et al. 2000), alpha = Dis(k_max)",
            "sd_index_curve": [{key: round(float(v), 6) if isinstance(v, float) else v for key, v in asdict(p).items()}
                               for p in self.sd_curve],
            "clustering": f"k-means (scikit-learn, k-means++, n_init 10, seed {self.seed}) on L2-normalised encoder "
                          "features of every training crop (global, all labels together)",
            "encoder": dict(self.encoder),
            "min_cell_crops": self.min_cell_crops,
            "labels": list(self.labels),
            "prompts": [
                {"condition_id": c.condition_id, "label": c.label, "cluster": c.cluster, "text": c.text,
                 "train_crops": c.train_crops, "merged_clusters": list(c.merged_clusters)}
                for c in self.conditions
            ],
            "label_cluster_shares": {label: {str(i): round(s, 6) for i, s in self.label_shares(label).items()}
                                     for label in self.labels},
        }

    def to_json(self, path: str | Path) -> Path:
        payload = self.metadata() | {
            "seed": self.seed,
            "centers": np.round(self.centers, 7).tolist(),
            "assignments": [[image, x, y, cid, self.clusters[(image, x, y)]]
                            for (image, x, y), cid in sorted(self.assignments.items())],
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> PromptTable:
        payload = json.loads(Path(path).read_text())
        conditions = [Condition(p["condition_id"], p["label"], p["cluster"], p["text"], p["train_crops"],
                                tuple(p.get("merged_clusters", ()))) for p in payload["prompts"]]
        curve = [SDPoint(int(p["k"]), float(p["scat"]), float(p["dis"]), float(p["sd"]), float(p["inertia"]))
                 for p in payload["sd_index_curve"]]
        return cls(
            conditions=conditions, labels=list(payload["labels"]), k=int(payload["k"]), sd_curve=curve,
            centers=np.asarray(payload["centers"], dtype=np.float64), encoder=dict(payload["encoder"]),
            min_cell_crops=int(payload["min_cell_crops"]), seed=int(payload["seed"]),
            assignments={(a[0], int(a[1]), int(a[2])): int(a[3]) for a in payload["assignments"]},
            clusters={(a[0], int(a[1]), int(a[2])): int(a[4]) for a in payload["assignments"]},
        )


def build_prompt_table(
    keys: Sequence[RecordKey],
    labels: Sequence[str],
    features: np.ndarray,
    *,
    label_order: Sequence[str],
    ks: Iterable[int] = range(2, 11),
    min_cell_crops: int = 10,
    seed: int = 0,
    encoder: Mapping[str, str] | None = None,
) -> PromptTable:
    """Cluster `features` (one row per crop `keys[i]` of label `labels[i]`), pick k, build the condition table.

    Condition ids run label by label (in `label_order`), cluster number ascending within a label.
    """
    if not (len(keys) == len(labels) == len(features)):
        raise ValueError(f"{len(keys)} keys, {len(labels)} labels and {len(features)} feature rows must match")
    curve, fits = sd_index_curve(features, ks, seed)
    k = choose_k(curve)
    cluster, centers = order_by_size(*fits[k])
    cells = Counter(zip(labels, cluster.tolist()))
    conditions: list[Condition] = []
    for label in label_order:
        present = sorted((c for (lab, c) in cells if lab == label), key=lambda c: (-cells[(label, c)], c))
        if not present:
            raise ValueError(f"label {label!r} has no training crops")
        kept = [c for c in present if cells[(label, c)] >= min_cell_crops] or present[:1]
        merged: dict[int, list[int]] = {c: [] for c in kept}
        for small in (c for c in present if c not in kept):
            target = min(kept, key=lambda c: (float(np.linalg.norm(centers[c] - centers[small])), c))
            merged[target].append(small)
        for c in sorted(kept):
            crops = cells[(label, c)] + sum(cells[(label, s)] for s in merged[c])
            conditions.append(Condition(len(conditions), label, c, PROMPT_TEMPLATE.format(label=label, cluster=c),
                                        crops, tuple(sorted(merged[c]))))
    table = PromptTable(conditions=conditions, labels=list(label_order), k=k, sd_curve=curve, centers=centers,
                        encoder=dict(encoder or {}), min_cell_crops=min_cell_crops, seed=seed)
    for key, label, c in zip(keys, labels, cluster.tolist()):
        table.assignments[tuple(key)] = table.condition(label, c).condition_id
        table.clusters[tuple(key)] = c
    return table


# ------------------------------------------------------------------------------------------------ balancing
def balanced_weights(condition_ids: Sequence[int] | np.ndarray, condition_labels: Sequence[str],
                     mode: str = "label_then_cell") -> np.ndarray:
    """Per-sample weights (summing to 1) of a with-replacement sampler that balances prompts.

    `condition_labels[cid]` is the label of condition `cid`. "cell": every cell equally likely. "label_then_cell":
    every label equally likely, then every cell of that label equally likely (see the module docstring).
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"unknown balance mode {mode!r}; valid: {BALANCE_MODES}")
    ids = np.asarray(condition_ids, dtype=np.int64)
    counts = np.bincount(ids, minlength=len(condition_labels)).astype(np.float64)
    present = counts > 0
    if mode == "cell":
        cell_mass = present / present.sum()
    else:
        present_labels = sorted({condition_labels[c] for c in np.flatnonzero(present)})
        cells_per_label = Counter(condition_labels[c] for c in np.flatnonzero(present))
        cell_mass = np.array([1.0 / (len(present_labels) * cells_per_label[condition_labels[c]]) if present[c] else 0.0
                              for c in range(len(condition_labels))])
    weights = cell_mass[ids] / counts[ids]
    return weights / weights.sum()


# ------------------------------------------------------------------------------------------------ patches128
def prompt_table_for_patches(
    data_root: str | Path,
    encoder_dir: str | Path,
    *,
    label_scheme: str = "grade5_organ",
    min_source_images: int = 3,
    val_fraction: float = 0.15,
    split_seed: int = 0,
    ks: Iterable[int] = range(2, 11),
    min_cell_crops: int = 10,
    seed: int = 0,
    threads: int = 1,
) -> tuple[PromptTable, np.ndarray]:
    """The prompt table of a patches128 train split (same split arguments as the cGAN trainer's `data` section).

    Only train crops are embedded and clustered, so held-back source images never shape the prompts.
    Returns the table and the train crops' L2-normalised features (rows in train-split order).
    """
    from training.data.patches128 import load_crops, load_patch_index

    index = load_patch_index(data_root, label_scheme=label_scheme, min_source_images=min_source_images,
                             val_fraction=val_fraction, seed=split_seed)
    records = index.records("train")
    encoder = EncoderFeatures(encoder_dir, threads=threads)
    features = encoder(load_crops(data_root, records))
    table = build_prompt_table([(r.image, r.x, r.y) for r in records], [r.class_name for r in records], features,
                               label_order=index.class_names, ks=ks, min_cell_crops=min_cell_crops, seed=seed,
                               encoder=encoder.reference)
    return table, features
