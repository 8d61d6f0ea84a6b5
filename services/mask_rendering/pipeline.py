"""Semantic class masks (+ instance edges, + noise label) -> RGB images with a renderer; numpy only.

Per sample, following the renderer's manifest metadata:
  1. class ids must be < ``num_classes``;
  2. when the model takes an edge channel (``use_instance_edges``): edges of the given
     instance map, or, without one, of the class map itself (= edges of its connected
     regions: touching instances of one class then share no edge);
  3. when the model takes a noise channel (``noise_spacing`` not null): the given noise
     label, or mask_ops.noise_label generated for the WHOLE field from ``seed + i`` at the
     requested spacing (default: the model's), so tiles of one field agree on it;
  4. mask_ops.build_generator_input (the one definition of the renderer input, shared with
     training) -> float32 [C, H, W];
  5. fields no larger than ``tile_size`` run in one piece (reflect-padded to
     ``size_multiple``); larger fields run as overlapping tiles blended with a raised-cosine
     window (tiling.py); every tile of every sample goes through the model's batcher;
  6. output in ``output_range`` -> uint8 RGB [N, H, W, 3].

Diffusion renderers (kind ``denoiser``, role ``image_renderer``) take the same class maps (+ instance
maps) but are sampled by services.diffusion (step-level batched engine, ``DiffusionOptions``); noise
labels do not apply to them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from services.core import mask_ops, metrics
from services.core.errors import InvalidInputError
from services.core.arrays import check_seed, reflect_pad
from services.core.png import encode_png  # noqa: F401 - the one PNG codec (re-exported for callers)
from services.core.model_info import MaskGeneratorInfo, RendererInfo
from services.core.stain import StainBank
from services.diffusion.pipeline import DENOISER_KIND, DiffusionOptions, DiffusionPipeline, shared_pipeline
from services.diffusion.spec import EDGES_CHANNEL, ROLE_IMAGE_RENDERER, ROLE_MASK_GENERATOR
from services.mask_rendering.tiling import Tile, TileBlender, TilePlan
from services.model_host import ModelHost, ModelRef, ServedModel, required_multiple

# pix2pixHD global generator with 3 stride-2 levels; used only when a manifest has no size_multiple.
DEFAULT_RENDERER_SIZE_MULTIPLE = 8
DEFAULT_TILE_SIZE = 256
# Fields bigger than this are refused (INVALID_ARGUMENT): the blend buffer, noise generation and
# output of one 4096 x 4096 field already take about 1 GiB; clients cut larger slides themselves.
MAX_PIXELS_PER_IMAGE = 4096 * 4096
# All fields of one request are rendered concurrently, so their total is bounded too.
MAX_PIXELS_PER_REQUEST = 2 * 4096 * 4096


@dataclass(frozen=True)
class RendererSpec:
    """A renderer's pre/post-processing contract, read from its manifest metadata."""

    num_classes: int
    class_names: tuple[str, ...]
    noise_spacing: float | None
    use_instance_edges: bool
    output_range: tuple[float, float]
    tile_size: int
    size_multiple: int
    # Smallest H and W the network runs on (metadata min_size; default two size multiples, the size whose
    # bottleneck is 2 x 2 so pix2pixHD's reflection pads work); smaller fields are padded up to it.
    min_size: int = 1
    # Real training crops' stain levels (metadata.stain_bank), for requests that ask for stain variation.
    stain_bank: StainBank | None = field(default=None, compare=False)

    @classmethod
    def from_metadata(cls, model_key: str, metadata: Mapping[str, Any]) -> RendererSpec:
        try:
            num_classes = int(metadata["num_classes"])
            class_names = tuple(str(name) for name in metadata.get("class_names") or ())
            spacing = metadata.get("noise_spacing")
            low, high = (float(value) for value in metadata.get("output_range", (-1.0, 1.0)))
            tile_size = required_multiple(metadata.get("tile_size"), DEFAULT_TILE_SIZE)
            multiple = required_multiple(metadata.get("size_multiple"), DEFAULT_RENDERER_SIZE_MULTIPLE)
            min_size = required_multiple(metadata.get("min_size"), 2 * multiple)
            bank = metadata.get("stain_bank")
            stain_bank = None if bank is None else StainBank.from_metadata(model_key, bank)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"model {model_key}: renderer metadata is incomplete or invalid: {error!r}") from None
        if num_classes < 1 or high <= low or tile_size % multiple:
            raise ValueError(
                f"model {model_key}: renderer metadata needs num_classes >= 1, output_range low < high and "
                f"tile_size a multiple of size_multiple; got {num_classes}, {(low, high)}, {tile_size}, {multiple}"
            )
        return cls(
            num_classes=num_classes,
            class_names=class_names,
            noise_spacing=None if spacing is None else float(spacing),
            use_instance_edges=bool(metadata.get("use_instance_edges", False)),
            output_range=(low, high),
            tile_size=tile_size,
            size_multiple=multiple,
            min_size=min_size,
            stain_bank=stain_bank,
        )

    @property
    def input_channels(self) -> int:
        return mask_ops.generator_input_channels(
            self.num_classes, self.noise_spacing is not None, self.use_instance_edges
        )


@dataclass(frozen=True)
class RenderResult:
    """uint8 RGB images [N, H, W, 3] and the model that rendered them."""

    images: np.ndarray
    model: ModelRef
    tiles_per_image: int


def as_label_batch(array: np.ndarray | None, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """[H, W] or [N, H, W] integer maps -> [N, H, W]; checks the shape against ``shape`` when given."""
    if array is None:
        return None
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InvalidInputError(f"{name}: expected [N, H, W] or [H, W], got shape {list(array.shape)}")
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{name}: expected an integer map, got {array.dtype}")
    if 0 in array.shape:
        raise InvalidInputError(f"{name}: empty (shape {list(array.shape)}); send at least one 1 x 1 map")
    if shape is not None and array.shape != shape:
        raise InvalidInputError(
            f"{name}: shape {list(array.shape)} does not match class_masks shape {list(shape)}"
        )
    return array


def to_uint8_rgb(chw: np.ndarray, output_range: tuple[float, float]) -> np.ndarray:
    """float [3, H, W] in ``output_range`` -> uint8 [H, W, 3] (rounded, clipped)."""
    low, high = output_range
    scaled = (chw.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


class RenderingPipeline:
    """Runs renderer models hosted by a ModelHost.

    ``tile_size`` None = the model's ``tile_size`` metadata (the crop it was trained on); a
    larger value (a multiple of the model's size_multiple) trades memory for fewer tiles:
    per-tile instance-norm statistics then cover more context, so results get closer to a
    one-piece render and faster. ``tile_overlap`` None = a quarter of the tile.
    """

    def __init__(
        self,
        host: ModelHost,
        tile_overlap: int | None = None,
        tile_size: int | None = None,
        diffusion: DiffusionPipeline | None = None,
    ) -> None:
        if tile_overlap is not None and tile_overlap < 0:
            raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")
        if tile_size is not None and tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        self.host = host
        self.tile_overlap = tile_overlap
        self.tile_size = tile_size
        # Diffusion renderers hosted next to the GAN ones go through their step-batching engines,
        # shared by every pipeline over this host.
        self.diffusion = shared_pipeline(host) if diffusion is None else diffusion

    def spec(self, served: ServedModel) -> RendererSpec:
        """The model's contract, checked against its declared input (a manifest problem, not the caller's)."""
        spec = RendererSpec.from_metadata(served.manifest.key, served.metadata)
        if self.tile_size is not None:
            if self.tile_size % spec.size_multiple:
                raise ValueError(
                    f"tile_size {self.tile_size} is not a multiple of model {served.manifest.key}'s "
                    f"size_multiple {spec.size_multiple}"
                )
            spec = dataclasses.replace(spec, tile_size=self.tile_size)
        declared = served.manifest.inputs[0].shape[1]
        if isinstance(declared, int) and declared != spec.input_channels:
            raise ValueError(
                f"model {served.manifest.key}: metadata implies {spec.input_channels} input channels "
                f"(num_classes {spec.num_classes}, noise {spec.noise_spacing is not None}, "
                f"use_instance_edges {spec.use_instance_edges}) but the model takes {declared}; fix the manifest"
            )
        return spec

    async def describe_renderer(self, model: str, version: str | None = None) -> RendererInfo:
        """What a caller composing with this renderer needs (class ids, noise and edge inputs), from its manifest."""
        served = await self.host.get(model, version or None)
        stain = str(served.metadata.get("stain", "he"))
        if served.manifest.kind == DENOISER_KIND:
            _, engine = await self.diffusion.served(model, served.manifest.version, ROLE_IMAGE_RENDERER)
            return RendererInfo(
                ref=served.ref, class_names=engine.spec.class_names,
                noise_spacing=None,  # diffusion starts from seeded Gaussian noise, not a noise label
                uses_instance_edges=EDGES_CHANNEL in engine.spec.condition_names, stain=stain, diffusion=True,
            )
        spec = self.spec(served)
        return RendererInfo(
            ref=served.ref,
            class_names=spec.class_names or tuple(f"class_{i}" for i in range(spec.num_classes)),
            noise_spacing=spec.noise_spacing, uses_instance_edges=spec.use_instance_edges, stain=stain,
            stain_sources=spec.stain_bank.sources if spec.stain_bank is not None else (),
        )

    async def describe_mask_generator(self, model: str, version: str | None = None) -> MaskGeneratorInfo:
        """A diffusion nuclei-mask generator's class ids and the nucleus types a request may name."""
        served, engine = await self.diffusion.served(model, version or "", ROLE_MASK_GENERATOR)
        return MaskGeneratorInfo(
            ref=served.ref, class_names=engine.spec.class_names, type_names=engine.spec.condition_names[:-1]
        )

    async def render(
        self,
        class_masks: np.ndarray,
        *,
        model: str,
        version: str = "",
        instance_maps: np.ndarray | None = None,
        noise_labels: np.ndarray | None = None,
        seed: int = 0,
        noise_spacing: float = 0.0,
        deadline: float | None = None,
        diffusion: DiffusionOptions | None = None,
        stain_variation: bool = False,
        stain_source: str = "",
    ) -> RenderResult:
        """Render ``class_masks`` ([N, H, W] or [H, W] class ids) into uint8 RGB [N, H, W, 3].

        ``instance_maps`` and ``noise_labels`` are optional [N, H, W] maps of the same shape
        (ignored by models without that channel). Generated noise for sample i uses
        ``seed + i`` at ``noise_spacing`` px (0 = the model's trained spacing). For a diffusion
        renderer, ``diffusion`` chooses steps / scheduler / guidance (None = the model's defaults)
        and sample i's initial noise comes from ``seed + i``. ``stain_variation`` moves each render's H&E levels
        to a row of the model's stain bank (real training crops' levels) drawn from ``seed + i``, among the rows of
        ``stain_source`` (a dataset of the bank, e.g. "monuseg"; "" = all of them).
        """
        if not model:
            raise InvalidInputError(
                f"model: name a renderer; available: {self.host.model_names()}"
            )
        classes = as_label_batch(class_masks, "class_masks")
        assert classes is not None
        count, height, width = classes.shape
        if height * width > MAX_PIXELS_PER_IMAGE or count * height * width > MAX_PIXELS_PER_REQUEST:
            raise InvalidInputError(
                f"class_masks: {count} fields of {height} x {width} exceed the limits of {MAX_PIXELS_PER_IMAGE} "
                f"pixels per field and {MAX_PIXELS_PER_REQUEST} per request; send smaller or fewer fields"
            )
        instances = as_label_batch(instance_maps, "instance_maps", classes.shape)
        noise = as_label_batch(noise_labels, "noise_labels", classes.shape)
        if not np.isfinite(noise_spacing) or noise_spacing < 0:
            raise InvalidInputError(f"noise_spacing must be >= 0 (0 = the model's), got {noise_spacing}")
        check_seed(seed, count)
        if stain_source and not stain_variation:
            raise InvalidInputError(f"stain_source {stain_source!r} is set but stain_variation is not; set both, or "
                                    "neither")
        served = await self.host.get(model, version or None)
        if stain_variation and served.manifest.kind == DENOISER_KIND:
            raise InvalidInputError(f"stain_variation: {served.manifest.key} is a diffusion renderer, which has no "
                                    "stain bank; ask for it from a pix2pixHD H&E renderer such as renderer-he-nuclei")
        if served.manifest.kind == DENOISER_KIND:
            images, ref = await self.diffusion.render(
                classes, model=model, version=version, instances=instances, seed=seed,
                options=diffusion or DiffusionOptions(), deadline=deadline,
            )
            return RenderResult(images=images, model=ref, tiles_per_image=1)
        spec = self.spec(served)
        check_class_ids(classes, spec, served.manifest.key)
        bank = spec.stain_bank
        if stain_variation and bank is None:
            raise InvalidInputError(f"stain_variation: {served.manifest.key} has no stain bank in its manifest "
                                    "(metadata.stain_bank, written by training.export.stain_bank); render without "
                                    "stain variation or pick a renderer version that has one")
        if stain_source and bank is not None and stain_source not in bank.tables:
            raise InvalidInputError(f"stain_source: {served.manifest.key}'s stain bank has no source {stain_source!r}; "
                                    f"it has {', '.join(bank.sources)} (empty = all)")

        overlap = self.overlap_for(spec)

        async def one_field(index: int) -> tuple[np.ndarray, int]:
            # numpy work runs in worker threads so that a large field never stalls the event loop.
            maps = await asyncio.to_thread(
                self.field_maps,
                classes[index],
                spec,
                None if instances is None else instances[index],
                None if noise is None else noise[index],
                seed + index,
                noise_spacing,
            )
            image, tiles = await self.render_field(served, spec, maps, overlap, deadline)
            if stain_variation and bank is not None:
                image = await asyncio.to_thread(bank.restain, image, classes[index], seed + index, stain_source)
            return image, tiles

        rendered = await asyncio.gather(*(one_field(index) for index in range(count)))
        return RenderResult(
            images=np.stack([image for image, _ in rendered]), model=served.ref, tiles_per_image=rendered[0][1]
        )

    async def infer_tensor(
        self, served: ServedModel, feeds: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """KServe ModelInfer on a GAN renderer: raw input [N, C, H, W] -> raw outputs [N, C', H, W], tiled as Render.

        The caller's tensor is the generator input Render would build, so it is cut with the same TilePlan
        (tile size and overlap), run in the same waves through the model's batcher and memory admission, and
        blended with the same raised-cosine window: for a field Render would tile, the result equals Render's
        before its conversion to uint8. Fields no larger than a tile run in one piece. The blend buffers are
        held against the memory budget for the whole call, and each wave packs only as many tiles as fit
        beside them, so a large field is processed tile by tile instead of being refused (or run whole).
        """
        spec = self.spec(served)
        overlap = self.overlap_for(spec)
        input_spec = served.manifest.inputs[0]
        batch = feeds[input_spec.name]
        rows, _, height, width = batch.shape
        plan = TilePlan(height, width, spec.tile_size, overlap)
        if len(feeds) != 1 or not plan.needs_tiling or rows == 0:
            return await served.infer(feeds, deadline)
        outputs = served.manifest.outputs
        # Per output: float64 sums [N, C', H, W] and weights [H, W] per row (TileBlender), the float32 result.
        out_channels = sum(spec_.shape[1] if isinstance(spec_.shape[1], int) else 3 for spec_ in outputs)
        buffers = rows * height * width * (out_channels * (8 + 4) + 8 * len(outputs))
        what = f"model {served.manifest.key} on {rows} row(s) of {height} x {width} in {len(plan)} tiles"
        budget = served.budget
        zero = np.zeros((), input_spec.numpy_dtype)

        def wave_estimate(tiles: int) -> int:
            shape = (tiles * rows, batch.shape[1], plan.tile_height, plan.tile_width)
            return served.estimate({input_spec.name: np.broadcast_to(zero, shape)})

        if buffers + wave_estimate(1) > budget.limit:
            metrics.MEMORY_REFUSED.labels(served.manifest.name).inc()
            budget.check(buffers + wave_estimate(1), f"{what} (blend buffers and one tile of every row)")
        wave = max(1, served.max_batch_size * max(1, served.pool.instance_count) // rows)
        while wave > 1 and buffers + wave_estimate(wave) > budget.limit:
            wave -= 1
        tiles = list(plan.tiles())

        def cut(group: list[Tile]) -> np.ndarray:
            # Tile-major rows: tile 0 of every row, then tile 1, ...
            return np.concatenate([batch[:, :, tile.slices[0], tile.slices[1]] for tile in group])

        def blend(blenders: dict[str, list[TileBlender]], group: list[Tile], rendered: Mapping[str, np.ndarray]) -> None:
            for name, row_blenders in blenders.items():
                array = rendered[name]
                expected = (len(group) * rows, array.shape[1], plan.tile_height, plan.tile_width)
                if array.shape != expected:
                    raise ValueError(
                        f"model {served.manifest.key}: output {name!r} has shape {list(array.shape)} for a tile "
                        f"batch, expected {list(expected)}; it cannot be tiled"
                    )
                for position, tile in enumerate(group):
                    for row, blender in enumerate(row_blenders):
                        blender.add(tile, array[position * rows + row])

        def results(blenders: dict[str, list[TileBlender]]) -> dict[str, np.ndarray]:
            return {name: np.stack([blender.result() for blender in row_blenders])
                    for name, row_blenders in blenders.items()}

        with budget.reserve(buffers, f"{what} (blend buffers)"):
            blenders: dict[str, list[TileBlender]] | None = None
            for start in range(0, len(tiles), wave):
                group = tiles[start:start + wave]
                rendered = await served.infer({input_spec.name: await asyncio.to_thread(cut, group)}, deadline)
                if blenders is None:
                    flat = [name for name, array in rendered.items() if array.ndim != 4]
                    if flat:
                        raise ValueError(f"model {served.manifest.key}: outputs {flat} are not [N, C, H, W]; "
                                         "they cannot be tiled")
                    blenders = {name: [TileBlender(array.shape[1], height, width) for _ in range(rows)]
                                for name, array in rendered.items()}
                await asyncio.to_thread(blend, blenders, group, rendered)
            assert blenders is not None
            return await asyncio.to_thread(results, blenders)

    def overlap_for(self, spec: RendererSpec) -> int:
        overlap = spec.tile_size // 4 if self.tile_overlap is None else self.tile_overlap
        if overlap >= spec.tile_size:
            raise InvalidInputError(f"tile overlap {overlap} must be smaller than the tile size {spec.tile_size}")
        return overlap

    @staticmethod
    def field_maps(
        classes: np.ndarray,
        spec: RendererSpec,
        instances: np.ndarray | None,
        noise: np.ndarray | None,
        seed: int,
        noise_spacing: float,
    ) -> FieldMaps:
        """The whole field's per-pixel maps, computed once so that every tile cut from them agrees."""
        edges = None
        if spec.use_instance_edges:
            edges = mask_ops.instance_edges(classes if instances is None else instances)
        noise_map = None
        if spec.noise_spacing is not None:
            if noise is None:
                noise_map = mask_ops.noise_label(classes.shape, noise_spacing or spec.noise_spacing, seed)
            else:
                noise_map = (np.asarray(noise) != 0).astype(np.uint8)
        return FieldMaps(classes=classes, noise=noise_map, edges=edges)

    @staticmethod
    async def render_field(
        served: ServedModel,
        spec: RendererSpec,
        maps: FieldMaps,
        overlap: int,
        deadline: float | None,
    ) -> tuple[np.ndarray, int]:
        """One field -> (uint8 [H, W, 3], tile count), in one piece or as blended tiles.

        The maps are reflect-padded to ``size_multiple`` (one-hot encoding commutes with the
        reflection, so this equals padding the model input), the generator input is built per
        tile with mask_ops.build_generator_input, and tiles go to the batcher in waves that fill
        every runtime instance, so memory stays at a few tiles instead of the whole input tensor.
        """
        input_spec, output_spec = served.manifest.inputs[0], served.manifest.outputs[0]
        height, width = maps.classes.shape
        padded = await asyncio.to_thread(maps.padded, spec.size_multiple, spec.min_size)
        plan = TilePlan(padded.classes.shape[0], padded.classes.shape[1], spec.tile_size, overlap)
        tiles = list(plan.tiles())

        def tile_inputs(group: list[Tile]) -> np.ndarray:
            batch = np.stack([padded.generator_input(tile.slices, spec.num_classes) for tile in group])
            return batch.astype(input_spec.numpy_dtype, copy=False)

        def blend(blender: TileBlender, group: list[Tile], rendered: np.ndarray) -> None:
            for tile, output in zip(group, rendered, strict=True):
                blender.add(tile, output)

        wave = served.max_batch_size * max(1, served.pool.instance_count)
        blender: TileBlender | None = None
        full: np.ndarray | None = None
        for start in range(0, len(tiles), wave):
            group = tiles[start:start + wave]
            batch = await asyncio.to_thread(tile_inputs, group)
            rendered = (await served.infer({input_spec.name: batch}, deadline))[output_spec.name]
            if len(tiles) == 1:
                full = rendered[0]
                break
            if blender is None:
                blender = TileBlender(rendered.shape[1], plan.height, plan.width)
            await asyncio.to_thread(blend, blender, group, rendered)
        if full is None:
            assert blender is not None
            full = await asyncio.to_thread(blender.result)
        image = await asyncio.to_thread(to_uint8_rgb, full[:, :height, :width], spec.output_range)
        return image, len(tiles)


@dataclass(frozen=True)
class FieldMaps:
    """Per-pixel maps of one field: class ids, and the noise / edge maps the model takes (or None)."""

    classes: np.ndarray
    noise: np.ndarray | None
    edges: np.ndarray | None

    def padded(self, multiple: int, min_size: int = 1) -> FieldMaps:
        """Reflect-padded to multiples of ``multiple``, then (mirror-)padded up to ``min_size`` per axis."""
        def pad(array: np.ndarray | None) -> np.ndarray | None:
            if array is None:
                return None
            array = reflect_pad(array, multiple)[0]
            grow_h, grow_w = max(0, min_size - array.shape[-2]), max(0, min_size - array.shape[-1])
            if grow_h or grow_w:
                # Fields smaller than the network's minimum (its bottleneck reflection pads need >= 2 px):
                # mirror them up to it; the output is cropped back to the field.
                array = np.pad(array, [(0, 0)] * (array.ndim - 2) + [(0, grow_h), (0, grow_w)], mode="symmetric")
            return array

        return FieldMaps(classes=pad(self.classes), noise=pad(self.noise), edges=pad(self.edges))

    def generator_input(self, region: tuple[slice, slice], num_classes: int) -> np.ndarray:
        """float32 [C, h, w] renderer input for one region (mask_ops.build_generator_input)."""
        return mask_ops.build_generator_input(
            self.classes[region],
            num_classes,
            None if self.noise is None else self.noise[region],
            None if self.edges is None else self.edges[region],
        )


def check_class_ids(classes: np.ndarray, spec: RendererSpec, model_key: str) -> None:
    """Every class id must be in [0, num_classes); the error names the model's classes."""
    low, high = int(classes.min()), int(classes.max())
    if low < 0 or high >= spec.num_classes:
        bad = high if high >= spec.num_classes else low
        names = f" ({', '.join(f'{i}={n}' for i, n in enumerate(spec.class_names))})" if spec.class_names else ""
        raise InvalidInputError(
            f"class_masks: class id {bad} is outside [0, {spec.num_classes - 1}] for model {model_key}{names}"
        )
