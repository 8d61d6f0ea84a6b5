"""Scoring gRPC service: scoring.proto messages <-> the numpy pipeline, plus server assembly.

Protobuf stops here: tensors are decoded by services.tensor_codec, PNGs by services.scoring.images,
the pipeline works on numpy arrays; domain errors become gRPC statuses in the core's ServingInterceptor.
CPU-heavy scoring (label statistics, matrix square roots, KID/PR) runs in worker threads so one
large request never stalls the event loop's other calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np

from services._generated.histosynth.v1 import scoring_pb2, scoring_pb2_grpc
from services.core.config import ServerConfig, load_settings
from services.core.errors import InvalidInputError
from services.core.grpc_server import RunningServer, ServiceRegistration
from services.core.model_store import ModelStore
from services.kserve_v2 import KServeV2Servicer, kserve_registration
from services.model_host import ModelHost
from services.scoring import mask_stats
from services.scoring.class_maps import TpsResult, score_masks, score_segmentation, tumor_proportions
from services.scoring.consistency import ConsistencyScorer
from services.scoring.images import ImageList, as_image_list, check_png_headers, decode_pngs_off_loop
from services.scoring.pipeline import (
    MODEL_KINDS,
    DistributionOptions,
    DistributionResult,
    ScoringPipeline,
    ScoringSettings,
)
from services import servicer_common
from services.servicer_common import deadline_of, model_ref_to_proto, require_field
from services.tensor_codec import array_to_tensor, tensor_to_array

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"].full_name
SETTINGS_PREFIX = "HISTOSYNTH_SCORING_"
IMAGE_LAYOUTS = ("[N, H, W, 3]", "[H, W, 3]")
MAP_LAYOUTS = ("[N, H, W]", "[H, W]")
MAP_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int32), np.dtype(np.int64))
PROBABILITY_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
ROLES = {scoring_pb2.IMAGE_SET_ROLE_REAL: "real", scoring_pb2.IMAGE_SET_ROLE_SYNTHETIC: "synthetic"}
ROLE_NAMES = frozenset(scoring_pb2.ImageSetRole.values())


# ------------------------------------------------------------------------------ decoding
def image_count(message: scoring_pb2.ImageSet, name: str) -> int:
    """How many images an ImageSet holds, after the checks that need no decoding (tensor dtype and shape,
    PNG signatures and header sizes, emptiness)."""
    if message.HasField("images") or not message.png_images:
        return len(tensor_image_set(message, name))
    check_png_headers(list(message.png_images), f"{name}.png_images")
    return len(message.png_images)


def tensor_image_set(message: scoring_pb2.ImageSet, name: str) -> ImageList:
    """A tensor ImageSet as a list of views (no copy, no decode); refuses PNG-only, mixed and empty sets."""
    has_tensor = message.HasField("images")
    if has_tensor and message.png_images:
        raise InvalidInputError(f"{name}: send images (uint8 tensor) or png_images, not both")
    if not has_tensor:
        raise InvalidInputError(f"{name}: no images; send a uint8 [N, H, W, 3] tensor in images or PNGs in png_images")
    array = tensor_to_array(
        message.images, f"{name}.images", allowed_dtypes=(np.dtype(np.uint8),), allowed_ranks=(3, 4),
        layouts=IMAGE_LAYOUTS,
    )
    if array.shape[-1] != 3:
        raise InvalidInputError(
            f"{name}.images: expected uint8 RGB {' or '.join(IMAGE_LAYOUTS)}, got last axis {array.shape[-1]}"
        )
    return as_image_list(array, f"{name}.images")


def check_set_counts(real: int, synthetic: int, pr_k: int) -> None:
    """The scores' count rules, checked on the counts before any image is decoded or embedded."""
    for role, count in (("real", real), ("synthetic", synthetic)):
        if count < 2:
            raise InvalidInputError(
                f"the {role} set has {count} image(s); FID/KID need at least 2 per set "
                f"(precision/recall with pr_k={pr_k} needs more than {pr_k})"
            )
    if min(real, synthetic) <= pr_k:
        raise InvalidInputError(
            f"precision/recall with pr_k={pr_k} needs more than {pr_k} images per set; "
            f"got real {real}, synthetic {synthetic}; send more images or lower pr_k"
        )


async def image_set(message: scoring_pb2.ImageSet, name: str, *, allow_empty: bool = False) -> ImageList:
    """ImageSet -> list of uint8 RGB [H, W, 3] (tensor or PNGs, not both); PNGs decode off the event loop."""
    if message.png_images and not message.HasField("images"):
        return await decode_pngs_off_loop(list(message.png_images), f"{name}.png_images")
    if allow_empty and not message.HasField("images") and not message.png_images:
        return []
    return tensor_image_set(message, name)


def class_maps(request: object, field: str, what: str = "integer class-id maps [N, H, W]") -> np.ndarray:
    require_field(request, field, what)
    return tensor_to_array(
        getattr(request, field), field, allowed_dtypes=MAP_DTYPES, allowed_ranks=(2, 3), layouts=MAP_LAYOUTS
    )


def optional_maps(request: object, field: str) -> np.ndarray | None:
    if not request.HasField(field):  # type: ignore[attr-defined]
        return None
    return class_maps(request, field)


def distribution_options(message: scoring_pb2.DistributionOptions) -> DistributionOptions:
    return DistributionOptions.with_defaults(
        extractor=message.extractor,
        extractor_version=message.extractor_version,
        kid_subsets=int(message.kid_subsets),
        kid_subset_size=int(message.kid_subset_size),
        pr_k=int(message.pr_k),
        fid_bootstrap=int(message.fid_bootstrap),
        fid_ci_level=float(message.fid_ci_level),
        is_splits=int(message.is_splits),
        seed=int(message.seed),
        max_kept_features=int(message.max_kept_features),
        fast_fid=bool(message.fast_fid),
    )


# ------------------------------------------------------------------------------ encoding
def distribution_scores(result: DistributionResult) -> scoring_pb2.DistributionScores:
    info = result.extractor
    response = scoring_pb2.DistributionScores(
        extractor=scoring_pb2.Extractor(
            model=model_ref_to_proto(info.model),
            standard_fid=info.standard_fid,
            family=info.family,
            feature_dim=info.feature_dim,
            description=info.description,
        ),
        real_count=result.real_count,
        synthetic_count=result.synthetic_count,
        real_kept=result.real_kept,
        synthetic_kept=result.synthetic_kept,
        fid=result.fid,
        kid_mean=result.kid_mean,
        kid_std=result.kid_std,
        kid_subsets=result.kid_subsets,
        kid_subset_size=result.kid_subset_size,
        precision=result.precision,
        recall=result.recall,
        pr_k=result.pr_k,
    )
    if result.fid_ci is not None:
        response.fid_ci.CopyFrom(
            scoring_pb2.Interval(
                low=result.fid_ci.low, high=result.fid_ci.high,
                level=1.0 - result.fid_ci.alpha, resamples=result.fid_ci.n_boot,
            )
        )
    if result.inception_score is not None:
        mean, std, splits = result.inception_score
        response.inception_score.CopyFrom(scoring_pb2.InceptionScore(mean=mean, std=std, splits=splits))
    return response


def mask_scores(result: mask_stats.MaskSetComparison) -> scoring_pb2.MaskScores:
    def feature(f: mask_stats.FeatureComparison) -> scoring_pb2.FeatureComparison:
        return scoring_pb2.FeatureComparison(
            name=f.name, ks_statistic=f.ks_statistic, ks_pvalue=f.ks_pvalue, kl_divergence=f.kl_smoothed,
            real_mean=f.real_mean, synthetic_mean=f.synthetic_mean, js_divergence=f.js_divergence, group=f.group,
            class_id=f.class_id, feature=f.feature, real_n=f.real_n, synthetic_n=f.synthetic_n,
        )

    classes = [
        scoring_pb2.ClassMaskScores(
            class_id=c.class_id, status=c.status, real_objects=c.real_objects,
            synthetic_objects=c.synthetic_objects, real_border_objects=c.real_border_objects,
            synthetic_border_objects=c.synthetic_border_objects, real_masks_with_class=c.real_masks_with_class,
            synthetic_masks_with_class=c.synthetic_masks_with_class, mean_ks=c.mean_ks, mean_js=c.mean_js,
            image_mean_ks=c.image_mean_ks or 0.0, image_mean_js=c.image_mean_js or 0.0,
        )
        for c in result.classes
    ]
    return scoring_pb2.MaskScores(
        features=[feature(f) for f in result.features],
        real_count=result.real_masks,
        synthetic_count=result.synthetic_masks,
        class_ids=list(result.class_ids),
        classes=classes,
        mean_ks=result.mean_ks,
        mean_js=result.mean_js,
        image_mean_ks=result.image_mean_ks or 0.0,
        image_mean_js=result.image_mean_js or 0.0,
        real_objects=result.real_objects,
        synthetic_objects=result.synthetic_objects,
        missing_class_ids=list(result.missing_classes),
        bins=result.bins,
        connectivity=result.connectivity,
        include_border_objects=result.include_border_objects,
    )


def tps_messages(results: tuple[TpsResult, ...]) -> list[scoring_pb2.TumorProportion]:
    return [scoring_pb2.TumorProportion(tps=result.tps, bin=result.bin) for result in results]


# ------------------------------------------------------------------------------ servicer
class ScoringServicer(scoring_pb2_grpc.ScoringServicer):
    def __init__(self, pipeline: ScoringPipeline, consistency: ConsistencyScorer) -> None:
        self.pipeline = pipeline
        self.consistency = consistency

    async def ScoreImages(
        self, request: scoring_pb2.ScoreImagesRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.DistributionScores:
        options = distribution_options(request.options)
        # Cheap rules first: counts, then every PNG header and the request's decoded total, then decode.
        check_set_counts(image_count(request.real, "real"), image_count(request.synthetic, "synthetic"), options.pr_k)
        check_png_headers([*request.real.png_images, *request.synthetic.png_images], "real + synthetic png_images")
        real = await image_set(request.real, "real")
        synthetic = await image_set(request.synthetic, "synthetic")
        result = await self.pipeline.score_images(real, synthetic, options, deadline=deadline_of(context))
        return distribution_scores(result)

    async def ScoreImageStream(
        self, request_iterator: AsyncIterator[scoring_pb2.ImageBatch], context: grpc.aio.ServicerContext
    ) -> scoring_pb2.DistributionScores:
        session = None
        first_options: scoring_pb2.DistributionOptions | None = None
        index = -1
        async for batch in request_iterator:
            index += 1
            if session is None:
                first_options = batch.options
                session = await self.pipeline.open_session(distribution_options(batch.options))
            elif batch.HasField("options") and batch.options != first_options:
                raise InvalidInputError(
                    f"message {index}: options differ from the first message's; options are read from the "
                    "first message only (leave them unset or repeat them unchanged)"
                )
            images = await image_set(batch.images, f"message {index}", allow_empty=True)
            if not images:
                continue
            role = ROLES.get(batch.role)
            if role is None:
                label = scoring_pb2.ImageSetRole.Name(batch.role) if batch.role in ROLE_NAMES else str(batch.role)
                raise InvalidInputError(
                    f"message {index}: role {label} is not valid; tag every batch with images "
                    "IMAGE_SET_ROLE_REAL or IMAGE_SET_ROLE_SYNTHETIC"
                )
            await session.add(role, images, deadline_of(context))
        if session is None:
            raise InvalidInputError("the stream was empty; send ImageBatch messages tagged real or synthetic")
        return distribution_scores(await session.result())

    async def ScoreMasks(
        self, request: scoring_pb2.ScoreMasksRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.MaskScores:
        real = class_maps(request, "real_masks")
        synthetic = class_maps(request, "synthetic_masks")
        bins = int(request.bins) or int(request.kl_bins) or mask_stats.DEFAULT_BINS
        connectivity = int(request.connectivity) or 8
        result = await asyncio.to_thread(
            score_masks, real, synthetic, list(request.class_ids), connectivity, bins,
            request.include_background, request.include_border_objects,
        )
        return mask_scores(result)

    async def ScoreSegmentation(
        self, request: scoring_pb2.ScoreSegmentationRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.SegmentationScores:
        predicted = class_maps(request, "predicted")
        reference = class_maps(request, "reference")
        probabilities = None
        if request.HasField("probabilities"):
            probabilities = tensor_to_array(
                request.probabilities, "probabilities", allowed_dtypes=PROBABILITY_DTYPES, allowed_ranks=(3, 4),
                layouts=("[N, C, H, W]", "[C, H, W]"),
            )
        tps = None
        if request.HasField("tps"):
            tps = (int(request.tps.positive_class_id), int(request.tps.negative_class_id))
        result = await asyncio.to_thread(
            score_segmentation,
            predicted,
            reference,
            probabilities,
            int(request.num_classes),
            int(request.ignore_index) if request.use_ignore_index else None,
            tps,
            optional_maps(request, "instance_maps"),
        )
        scores = result.scores
        return scoring_pb2.SegmentationScores(
            num_images=scores.num_images,
            num_classes=scores.num_classes,
            miou=scores.miou,
            wiou=scores.wiou,
            wprecision=scores.wprecision,
            wrecall=scores.wrecall,
            dice_per_class=list(scores.dice_per_class),
            mean_dice=scores.mean_dice,
            has_cross_entropy=scores.cross_entropy is not None,
            cross_entropy=scores.cross_entropy or 0.0,
            t_objective=scores.t_objective,
            class_pixel_counts=list(scores.class_pixel_counts),
            predicted_tps=tps_messages(result.predicted_tps),
            reference_tps=tps_messages(result.reference_tps),
        )

    async def TumorProportion(
        self, request: scoring_pb2.TumorProportionRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.TumorProportionResponse:
        maps = class_maps(request, "class_maps")
        require_field(request, "classes", "the positive and negative tumour class ids")
        results = await asyncio.to_thread(
            tumor_proportions, maps, int(request.classes.positive_class_id), int(request.classes.negative_class_id),
            optional_maps(request, "instance_maps"),
        )
        return scoring_pb2.TumorProportionResponse(scores=tps_messages(results))

    async def Consistency(
        self, request: scoring_pb2.ConsistencyRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ConsistencyResponse:
        images = await image_set(request.images, "images")
        masks = class_maps(request, "conditioning_masks", "the class maps the images were rendered from, [N, H, W]")
        result = await self.consistency.score(
            images, masks, renderer=request.renderer, segmenter=request.segmenter,
            version=request.segmenter_version, min_miou=float(request.min_miou), deadline=deadline_of(context),
        )
        response = scoring_pb2.ConsistencyResponse(
            miou=result.miou.tolist(),
            passed=result.passed.tolist(),
            mean_miou=result.mean_miou,
            segmenter=model_ref_to_proto(result.segmenter),
        )
        if request.return_predictions:
            response.predictions.CopyFrom(array_to_tensor(np.stack(result.predictions)))
        return response


# ------------------------------------------------------------------------------ assembly
def load_scoring_settings() -> ScoringSettings:
    return load_settings(ScoringSettings, prefix=SETTINGS_PREFIX)


def registrations(host: ModelHost, settings: ScoringSettings | None = None) -> list[ServiceRegistration]:
    """The Scoring service and the KServe v2 endpoint over the same host (encoders and segmenters)."""
    settings = load_scoring_settings() if settings is None else settings
    return [
        ServiceRegistration(
            scoring_pb2_grpc.add_ScoringServicer_to_server,
            ScoringServicer(ScoringPipeline(host, settings), ConsistencyScorer(host)),
            SERVICE_NAME,
        ),
        kserve_registration(KServeV2Servicer([host])),
    ]


def create_host(config: ServerConfig, store: ModelStore | None = None) -> ModelHost:
    return servicer_common.create_host(config, store, MODEL_KINDS)


async def start(
    config: ServerConfig, store: ModelStore | None = None, settings: ScoringSettings | None = None
) -> tuple[RunningServer, ModelHost]:
    """Load encoders and segmenters and start serving; the host is stopped when the server stops."""
    host = create_host(config, store)
    await host.start()
    return await servicer_common.start_with_host(host, registrations(host, settings), config)
