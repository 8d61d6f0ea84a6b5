"""Mask-image consistency: does a segmenter find the rendered image's conditioning mask again?

A renderer draws an image from a class map; a segmenter trained on real tiles of the same stain
segments the image; the per-sample mean IoU between its prediction and the conditioning map
says whether the image shows what the mask asked for. Generation uses it as a quality gate
(``ConsistencyScorer.consistency``), the Scoring service exposes it as ``Consistency``.

Segmenter manifest metadata read here (defaults in brackets):

  num_classes         [C of the logits output]  segmenter class count
  class_names         [none]   segmenter class names
  size_multiple       [8]      H and W must be multiples (reflect-padded here, cropped back)
  input_range         [[0, 255]]  uint8 0..255 is mapped linearly onto this range
  logits_output       ["logits", else the first output]  [batch, C, H, W]; argmax over C = class map
  renderer            [none]   the renderer whose masks this segmenter checks
  renderer_class_map  [identity]  renderer class id -> list of segmenter ids it may appear as
                      (e.g. renderer-he-nuclei's "nucleus_untyped" = any typed nucleus class)

Per-sample mIoU: renderer ids become segmenter ids through renderer_class_map; where a renderer
id allows several segmenter ids, a pixel counts as the predicted id when that is one of them
(so "any nucleus" is satisfied by any nucleus class) and as the lowest allowed id otherwise.
IoU is averaged over the classes present in the target or the prediction (classes absent
from both say nothing about this sample), so a perfect segmentation scores 1.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from services.core.arrays import reflect_pad
from services.core.errors import HistosynthError, InvalidInputError, ModelNotFoundError
from services.core.model_store import ModelManifest
from services.model_host import ModelHost, ModelRef, ServedModel
from services.scoring.class_maps import as_map_batch
from services.scoring.images import as_image_list, groups_by_size, to_model_input
from services.scoring.pipeline import ScoringPreconditionError, hosted_manifests
from services.scoring.segmentation import confusion_matrix

DEFAULT_SEGMENTER_SIZE_MULTIPLE: Final = 8


@dataclass(frozen=True)
class SegmenterSpec:
    """A segmenter's pre/post-processing contract and its link to a renderer, from its manifest."""

    input_name: str
    input_dtype: np.dtype
    logits_output: str
    num_classes: int
    class_names: tuple[str, ...]
    size_multiple: int
    input_range: tuple[float, float]
    renderer: str | None
    renderer_class_map: Mapping[int, tuple[int, ...]] | None

    @classmethod
    def from_manifest(cls, manifest: ModelManifest) -> SegmenterSpec:
        metadata = manifest.metadata
        outputs = {spec.name: spec for spec in manifest.outputs}
        try:
            default_logits = "logits" if "logits" in outputs else manifest.outputs[0].name
            logits_output = str(metadata.get("logits_output") or default_logits)
            if logits_output not in outputs:
                raise ValueError(f"logits_output {logits_output!r} is not an output ({sorted(outputs)})")
            channels = outputs[logits_output].shape[1] if len(outputs[logits_output].shape) == 4 else None
            num_classes = int(metadata.get("num_classes") or channels or 0)
            class_names = tuple(str(name) for name in metadata.get("class_names") or ())
            size_multiple = int(metadata.get("size_multiple") or DEFAULT_SEGMENTER_SIZE_MULTIPLE)
            low, high = (float(value) for value in metadata.get("input_range", (0.0, 255.0)))
            renderer = metadata.get("renderer")
            class_map = _parse_class_map(metadata.get("renderer_class_map"), num_classes)
        except (TypeError, ValueError) as error:
            raise ScoringPreconditionError(
                f"model {manifest.key}: segmenter metadata is invalid ({error}); re-export the model"
            ) from None
        if num_classes < 1 or size_multiple < 1 or high <= low:
            raise ScoringPreconditionError(
                f"model {manifest.key}: segmenter metadata needs num_classes >= 1, size_multiple >= 1 and "
                f"input_range low < high; got {num_classes}, {size_multiple}, {(low, high)}"
            )
        return cls(
            input_name=manifest.inputs[0].name,
            input_dtype=np.dtype(manifest.inputs[0].dtype),
            logits_output=logits_output,
            num_classes=num_classes,
            class_names=class_names,
            size_multiple=size_multiple,
            input_range=(low, high),
            renderer=None if renderer is None else str(renderer),
            renderer_class_map=class_map,
        )


def _parse_class_map(raw: Any, num_classes: int) -> dict[int, tuple[int, ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"renderer_class_map must be a mapping, got {type(raw).__name__}")
    parsed: dict[int, tuple[int, ...]] = {}
    for key, value in raw.items():
        targets = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if not targets or any(not 0 <= t < num_classes for t in targets):
            raise ValueError(f"renderer_class_map[{key}] = {value!r} must list segmenter ids in [0, {num_classes - 1}]")
        parsed[int(key)] = targets
    return parsed


class Segmenter:
    """One segmenter model version behind its batcher: uint8 RGB images -> class maps."""

    def __init__(self, served: ServedModel, spec: SegmenterSpec) -> None:
        self.served = served
        self.spec = spec

    @property
    def ref(self) -> ModelRef:
        return self.served.ref

    async def segment(
        self, images: np.ndarray | Sequence[np.ndarray], deadline: float | None = None
    ) -> list[np.ndarray]:
        """Class map (uint8 or int32 [H, W], segmenter ids) of every image, in input order."""
        items = as_image_list(images, "images")
        spec = self.spec
        groups = groups_by_size(items)

        async def run(indices: list[int]) -> np.ndarray:
            # Conversion and argmax of a large batch take hundreds of ms: off the event loop.
            def prepare() -> tuple[np.ndarray, int, int]:
                batch = to_model_input([items[i] for i in indices], spec.input_range, spec.input_dtype)
                padded, height, width = reflect_pad(batch, spec.size_multiple)
                return np.ascontiguousarray(padded), height, width

            padded, height, width = await asyncio.to_thread(prepare)
            outputs = await self.served.infer({spec.input_name: padded}, deadline)
            logits = outputs[spec.logits_output]
            if logits.ndim != 4 or logits.shape[1] != spec.num_classes:
                raise HistosynthError(
                    f"segmenter {self.served.manifest.key} returned logits of shape {list(logits.shape)}, "
                    f"expected [batch, {spec.num_classes}, H, W]"
                )
            dtype = np.uint8 if spec.num_classes <= 256 else np.int32
            return await asyncio.to_thread(lambda: logits[:, :, :height, :width].argmax(axis=1).astype(dtype))

        results = await asyncio.gather(*(run(indices) for indices in groups.values()))
        maps: list[np.ndarray | None] = [None] * len(items)
        for indices, labels in zip(groups.values(), results, strict=True):
            for index, label in zip(indices, labels, strict=True):
                maps[index] = label
        return [label for label in maps if label is not None]


def to_segmenter_ids(mask: np.ndarray, predicted: np.ndarray, spec: SegmenterSpec, segmenter_key: str) -> np.ndarray:
    """Renderer class ids -> segmenter ids (see the module docstring for ids with several targets)."""
    mask = mask.astype(np.int64)
    class_map = spec.renderer_class_map
    if class_map is None:
        if mask.min() < 0 or mask.max() >= spec.num_classes:
            raise InvalidInputError(
                f"conditioning_masks: class id {int(mask.max())} is outside [0, {spec.num_classes - 1}] of segmenter "
                f"{segmenter_key}, which has no renderer_class_map"
            )
        return mask
    target = np.zeros_like(mask)
    for renderer_id in np.unique(mask).tolist():
        allowed = class_map.get(int(renderer_id))
        if allowed is None:
            raise InvalidInputError(
                f"conditioning_masks: class id {renderer_id} has no counterpart in segmenter {segmenter_key}'s "
                f"renderer_class_map {dict(class_map)}; is the mask from renderer {spec.renderer!r}?"
            )
        where = mask == renderer_id
        if len(allowed) == 1:
            target[where] = allowed[0]
        else:
            hits = np.isin(predicted, allowed)
            target[where & hits] = predicted[where & hits]
            target[where & ~hits] = min(allowed)
    return target


def present_class_miou(target: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean IoU over the classes present in ``target`` or ``predicted``."""
    confusions = confusion_matrix(target, predicted.astype(np.int64), num_classes)
    tp = np.diagonal(confusions).astype(np.float64)
    union = confusions.sum(axis=0) + confusions.sum(axis=1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else 1.0


@dataclass(frozen=True)
class ConsistencyResult:
    miou: np.ndarray  # float64 [N]
    passed: np.ndarray  # bool [N]: miou >= min_miou
    segmenter: ModelRef
    predictions: list[np.ndarray]  # segmenter class maps [H, W] per sample

    @property
    def mean_miou(self) -> float:
        return float(self.miou.mean())


class ConsistencyScorer:
    """Per-sample mask-image consistency through segmenter models hosted by ``host``.

    Usable without gRPC: ``await ConsistencyScorer(host).score(images, masks, renderer=...)``,
    or as generation's quality gate via ``consistency(image, class_map, class_names)``.
    ``host`` must host kind "segmenter" (e.g. the Scoring service's host, or
    ``ModelHost(store, ["segmenter"])``).
    """

    def __init__(self, host: ModelHost) -> None:
        if "segmenter" not in host.kinds:
            raise ValueError(f"the host serves kinds {sorted(host.kinds)}; ConsistencyScorer needs 'segmenter'")
        self.host = host
        # Segmenter name per renderer / per renderer class list: the gate asks once per sample.
        self._by_renderer: dict[str, str] = {}
        self._by_class_names: dict[tuple[str, ...], str] = {}

    async def _catalogue(self) -> dict[str, str | None]:
        """Hosted segmenters -> the renderer each checks (for error messages)."""
        return {m.name: m.metadata.get("renderer") for m in await hosted_manifests(self.host, "segmenter")}

    async def segmenter(self, name: str = "", version: str = "", renderer: str = "") -> Segmenter:
        """The named segmenter, or (name "") the one whose metadata names ``renderer``."""
        if not name:
            if not renderer:
                raise InvalidInputError(
                    "name a segmenter, or the renderer the masks come from; segmenters -> renderers: "
                    f"{await self._catalogue()}"
                )
            name = await self._segmenter_for_renderer(renderer)
        try:
            served = await self.host.get(name, version or None)
        except ModelNotFoundError:
            raise ModelNotFoundError(name, version or None, sorted(await self._catalogue())) from None
        if served.manifest.kind != "segmenter":
            raise InvalidInputError(
                f"model {served.manifest.key} is a {served.manifest.kind} model, not a segmenter; "
                f"segmenters: {sorted(await self._catalogue())}"
            )
        return Segmenter(served, SegmenterSpec.from_manifest(served.manifest))

    async def _segmenter_for_renderer(self, renderer: str) -> str:
        cached = self._by_renderer.get(renderer)
        if cached is not None and cached in self.host.model_names():
            return cached
        catalogue = await self._catalogue()
        matches = sorted(name for name, checks in catalogue.items() if checks == renderer)
        if not matches:
            raise ScoringPreconditionError(
                f"no segmenter in the model store checks renderer {renderer!r}; segmenters -> renderers: "
                f"{catalogue}; name one explicitly or export one for this renderer"
            )
        self._by_renderer[renderer] = matches[0]
        return matches[0]

    async def score(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        masks: np.ndarray | Sequence[np.ndarray],
        *,
        renderer: str = "",
        segmenter: str = "",
        version: str = "",
        min_miou: float = 0.0,
        deadline: float | None = None,
    ) -> ConsistencyResult:
        """Per-sample mIoU of the segmenter's prediction on ``images`` ([N, H, W, 3] uint8) vs ``masks``
        ([N, H, W] renderer class ids); ``passed`` = miou >= ``min_miou``."""
        if not 0.0 <= min_miou <= 1.0:
            raise InvalidInputError(f"min_miou={min_miou}: must be in [0, 1] (0 = no gate)")
        items = as_image_list(images, "images")
        mask_list = list(as_map_batch(masks, "conditioning_masks")) if isinstance(masks, np.ndarray) else [
            as_map_batch(mask, f"conditioning_masks[{i}]")[0] for i, mask in enumerate(masks)
        ]
        if len(mask_list) != len(items):
            raise InvalidInputError(
                f"{len(items)} images but {len(mask_list)} conditioning masks; send one mask per image"
            )
        for index, (image, mask) in enumerate(zip(items, mask_list, strict=True)):
            if image.shape[:2] != mask.shape:
                raise InvalidInputError(
                    f"images[{index}] is {image.shape[0]} x {image.shape[1]} but conditioning_masks[{index}] is "
                    f"{mask.shape[0]} x {mask.shape[1]}; each mask must match its image"
                )
        model = await self.segmenter(segmenter, version, renderer)
        predictions = await model.segment(items, deadline)
        key = model.served.manifest.key

        def measure() -> np.ndarray:
            spec = model.spec
            return np.array([
                present_class_miou(to_segmenter_ids(mask, predicted, spec, key), predicted, spec.num_classes)
                for mask, predicted in zip(mask_list, predictions, strict=True)
            ])

        miou = await asyncio.to_thread(measure)
        return ConsistencyResult(miou=miou, passed=miou >= min_miou, segmenter=model.ref, predictions=predictions)

    async def consistency(
        self, image: np.ndarray, class_map: np.ndarray, class_names: Sequence[str], renderer: str = ""
    ) -> float:
        """Generation's quality-gate protocol: mIoU in [0, 1] of one uint8 [H, W, 3] image vs its class map.

        The segmenter is the one for ``renderer`` when given; otherwise the one whose renderer's
        manifest class_names (or whose own class_names, for an identity mapping) equal ``class_names``.
        """
        if renderer:
            result = await self.score(image[None], class_map[None], renderer=renderer)
        else:
            name = await self._segmenter_for_class_names(tuple(class_names))
            result = await self.score(image[None], class_map[None], segmenter=name)
        return float(result.miou[0])

    async def _segmenter_for_class_names(self, class_names: tuple[str, ...]) -> str:
        cached = self._by_class_names.get(class_names)
        if cached is not None and cached in self.host.model_names():
            return cached
        by_renderer, by_own = [], []
        for manifest in await hosted_manifests(self.host, "segmenter"):
            renderer = manifest.metadata.get("renderer")
            if renderer:
                try:
                    renderer_names = tuple(self.host.store.get(str(renderer)).metadata.get("class_names") or ())
                except HistosynthError:
                    renderer_names = ()
                if renderer_names == class_names:
                    by_renderer.append(manifest.name)
            if tuple(manifest.metadata.get("class_names") or ()) == class_names:
                by_own.append(manifest.name)
        matches = sorted(by_renderer) or sorted(by_own)
        if not matches:
            raise ScoringPreconditionError(
                f"no segmenter matches classes {list(class_names)} (neither through its renderer's class_names nor "
                f"its own); segmenters -> renderers: {await self._catalogue()}"
            )
        self._by_class_names[class_names] = matches[0]
        return matches[0]
