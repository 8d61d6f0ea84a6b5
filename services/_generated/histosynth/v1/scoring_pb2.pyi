from services._generated.histosynth.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageSetRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_SET_ROLE_UNSPECIFIED: _ClassVar[ImageSetRole]
    IMAGE_SET_ROLE_REAL: _ClassVar[ImageSetRole]
    IMAGE_SET_ROLE_SYNTHETIC: _ClassVar[ImageSetRole]
IMAGE_SET_ROLE_UNSPECIFIED: ImageSetRole
IMAGE_SET_ROLE_REAL: ImageSetRole
IMAGE_SET_ROLE_SYNTHETIC: ImageSetRole

class ImageSet(_message.Message):
    __slots__ = ("images", "png_images")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PNG_IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _common_pb2.Tensor
    png_images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., png_images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DistributionOptions(_message.Message):
    __slots__ = ("extractor", "extractor_version", "kid_subsets", "kid_subset_size", "pr_k", "fid_bootstrap", "fid_ci_level", "is_splits", "seed", "max_kept_features", "fast_fid")
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    KID_SUBSETS_FIELD_NUMBER: _ClassVar[int]
    KID_SUBSET_SIZE_FIELD_NUMBER: _ClassVar[int]
    PR_K_FIELD_NUMBER: _ClassVar[int]
    FID_BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    FID_CI_LEVEL_FIELD_NUMBER: _ClassVar[int]
    IS_SPLITS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_KEPT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FAST_FID_FIELD_NUMBER: _ClassVar[int]
    extractor: str
    extractor_version: str
    kid_subsets: int
    kid_subset_size: int
    pr_k: int
    fid_bootstrap: int
    fid_ci_level: float
    is_splits: int
    seed: int
    max_kept_features: int
    fast_fid: bool
    def __init__(self, extractor: _Optional[str] = ..., extractor_version: _Optional[str] = ..., kid_subsets: _Optional[int] = ..., kid_subset_size: _Optional[int] = ..., pr_k: _Optional[int] = ..., fid_bootstrap: _Optional[int] = ..., fid_ci_level: _Optional[float] = ..., is_splits: _Optional[int] = ..., seed: _Optional[int] = ..., max_kept_features: _Optional[int] = ..., fast_fid: _Optional[bool] = ...) -> None: ...

class ScoreImagesRequest(_message.Message):
    __slots__ = ("real", "synthetic", "options")
    REAL_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    real: ImageSet
    synthetic: ImageSet
    options: DistributionOptions
    def __init__(self, real: _Optional[_Union[ImageSet, _Mapping]] = ..., synthetic: _Optional[_Union[ImageSet, _Mapping]] = ..., options: _Optional[_Union[DistributionOptions, _Mapping]] = ...) -> None: ...

class ImageBatch(_message.Message):
    __slots__ = ("options", "role", "images")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    options: DistributionOptions
    role: ImageSetRole
    images: ImageSet
    def __init__(self, options: _Optional[_Union[DistributionOptions, _Mapping]] = ..., role: _Optional[_Union[ImageSetRole, str]] = ..., images: _Optional[_Union[ImageSet, _Mapping]] = ...) -> None: ...

class Extractor(_message.Message):
    __slots__ = ("model", "standard_fid", "family", "feature_dim", "description")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STANDARD_FID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    standard_fid: bool
    family: str
    feature_dim: int
    description: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., standard_fid: _Optional[bool] = ..., family: _Optional[str] = ..., feature_dim: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class Interval(_message.Message):
    __slots__ = ("low", "high", "level", "resamples")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    RESAMPLES_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    level: float
    resamples: int
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ..., level: _Optional[float] = ..., resamples: _Optional[int] = ...) -> None: ...

class InceptionScore(_message.Message):
    __slots__ = ("mean", "std", "splits")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    splits: int
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., splits: _Optional[int] = ...) -> None: ...

class DistributionScores(_message.Message):
    __slots__ = ("extractor", "real_count", "synthetic_count", "real_kept", "synthetic_kept", "fid", "fid_ci", "kid_mean", "kid_std", "kid_subsets", "kid_subset_size", "precision", "recall", "pr_k", "inception_score")
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    REAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_COUNT_FIELD_NUMBER: _ClassVar[int]
    REAL_KEPT_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_KEPT_FIELD_NUMBER: _ClassVar[int]
    FID_FIELD_NUMBER: _ClassVar[int]
    FID_CI_FIELD_NUMBER: _ClassVar[int]
    KID_MEAN_FIELD_NUMBER: _ClassVar[int]
    KID_STD_FIELD_NUMBER: _ClassVar[int]
    KID_SUBSETS_FIELD_NUMBER: _ClassVar[int]
    KID_SUBSET_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    PR_K_FIELD_NUMBER: _ClassVar[int]
    INCEPTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    extractor: Extractor
    real_count: int
    synthetic_count: int
    real_kept: int
    synthetic_kept: int
    fid: float
    fid_ci: Interval
    kid_mean: float
    kid_std: float
    kid_subsets: int
    kid_subset_size: int
    precision: float
    recall: float
    pr_k: int
    inception_score: InceptionScore
    def __init__(self, extractor: _Optional[_Union[Extractor, _Mapping]] = ..., real_count: _Optional[int] = ..., synthetic_count: _Optional[int] = ..., real_kept: _Optional[int] = ..., synthetic_kept: _Optional[int] = ..., fid: _Optional[float] = ..., fid_ci: _Optional[_Union[Interval, _Mapping]] = ..., kid_mean: _Optional[float] = ..., kid_std: _Optional[float] = ..., kid_subsets: _Optional[int] = ..., kid_subset_size: _Optional[int] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., pr_k: _Optional[int] = ..., inception_score: _Optional[_Union[InceptionScore, _Mapping]] = ...) -> None: ...

class ScoreMasksRequest(_message.Message):
    __slots__ = ("real_masks", "synthetic_masks", "class_ids", "connectivity", "kl_bins", "include_background", "include_border_objects", "bins")
    REAL_MASKS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_MASKS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIVITY_FIELD_NUMBER: _ClassVar[int]
    KL_BINS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BORDER_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    real_masks: _common_pb2.Tensor
    synthetic_masks: _common_pb2.Tensor
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    connectivity: int
    kl_bins: int
    include_background: bool
    include_border_objects: bool
    bins: int
    def __init__(self, real_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., synthetic_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., class_ids: _Optional[_Iterable[int]] = ..., connectivity: _Optional[int] = ..., kl_bins: _Optional[int] = ..., include_background: _Optional[bool] = ..., include_border_objects: _Optional[bool] = ..., bins: _Optional[int] = ...) -> None: ...

class FeatureComparison(_message.Message):
    __slots__ = ("name", "ks_statistic", "ks_pvalue", "kl_divergence", "real_mean", "synthetic_mean", "js_divergence", "group", "class_id", "feature", "real_n", "synthetic_n")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KS_STATISTIC_FIELD_NUMBER: _ClassVar[int]
    KS_PVALUE_FIELD_NUMBER: _ClassVar[int]
    KL_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    REAL_MEAN_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_MEAN_FIELD_NUMBER: _ClassVar[int]
    JS_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    REAL_N_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_N_FIELD_NUMBER: _ClassVar[int]
    name: str
    ks_statistic: float
    ks_pvalue: float
    kl_divergence: float
    real_mean: float
    synthetic_mean: float
    js_divergence: float
    group: str
    class_id: int
    feature: str
    real_n: int
    synthetic_n: int
    def __init__(self, name: _Optional[str] = ..., ks_statistic: _Optional[float] = ..., ks_pvalue: _Optional[float] = ..., kl_divergence: _Optional[float] = ..., real_mean: _Optional[float] = ..., synthetic_mean: _Optional[float] = ..., js_divergence: _Optional[float] = ..., group: _Optional[str] = ..., class_id: _Optional[int] = ..., feature: _Optional[str] = ..., real_n: _Optional[int] = ..., synthetic_n: _Optional[int] = ...) -> None: ...

class ClassMaskScores(_message.Message):
    __slots__ = ("class_id", "status", "real_objects", "synthetic_objects", "real_border_objects", "synthetic_border_objects", "real_masks_with_class", "synthetic_masks_with_class", "mean_ks", "mean_js", "image_mean_ks", "image_mean_js")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REAL_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    REAL_BORDER_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_BORDER_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    REAL_MASKS_WITH_CLASS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_MASKS_WITH_CLASS_FIELD_NUMBER: _ClassVar[int]
    MEAN_KS_FIELD_NUMBER: _ClassVar[int]
    MEAN_JS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MEAN_KS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MEAN_JS_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    status: str
    real_objects: int
    synthetic_objects: int
    real_border_objects: int
    synthetic_border_objects: int
    real_masks_with_class: int
    synthetic_masks_with_class: int
    mean_ks: float
    mean_js: float
    image_mean_ks: float
    image_mean_js: float
    def __init__(self, class_id: _Optional[int] = ..., status: _Optional[str] = ..., real_objects: _Optional[int] = ..., synthetic_objects: _Optional[int] = ..., real_border_objects: _Optional[int] = ..., synthetic_border_objects: _Optional[int] = ..., real_masks_with_class: _Optional[int] = ..., synthetic_masks_with_class: _Optional[int] = ..., mean_ks: _Optional[float] = ..., mean_js: _Optional[float] = ..., image_mean_ks: _Optional[float] = ..., image_mean_js: _Optional[float] = ...) -> None: ...

class MaskScores(_message.Message):
    __slots__ = ("features", "real_count", "synthetic_count", "class_ids", "classes", "mean_ks", "mean_js", "image_mean_ks", "image_mean_js", "real_objects", "synthetic_objects", "missing_class_ids", "bins", "connectivity", "include_border_objects")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    REAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MEAN_KS_FIELD_NUMBER: _ClassVar[int]
    MEAN_JS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MEAN_KS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MEAN_JS_FIELD_NUMBER: _ClassVar[int]
    REAL_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIVITY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BORDER_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureComparison]
    real_count: int
    synthetic_count: int
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    classes: _containers.RepeatedCompositeFieldContainer[ClassMaskScores]
    mean_ks: float
    mean_js: float
    image_mean_ks: float
    image_mean_js: float
    real_objects: int
    synthetic_objects: int
    missing_class_ids: _containers.RepeatedScalarFieldContainer[int]
    bins: int
    connectivity: int
    include_border_objects: bool
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureComparison, _Mapping]]] = ..., real_count: _Optional[int] = ..., synthetic_count: _Optional[int] = ..., class_ids: _Optional[_Iterable[int]] = ..., classes: _Optional[_Iterable[_Union[ClassMaskScores, _Mapping]]] = ..., mean_ks: _Optional[float] = ..., mean_js: _Optional[float] = ..., image_mean_ks: _Optional[float] = ..., image_mean_js: _Optional[float] = ..., real_objects: _Optional[int] = ..., synthetic_objects: _Optional[int] = ..., missing_class_ids: _Optional[_Iterable[int]] = ..., bins: _Optional[int] = ..., connectivity: _Optional[int] = ..., include_border_objects: _Optional[bool] = ...) -> None: ...

class TpsClasses(_message.Message):
    __slots__ = ("positive_class_id", "negative_class_id")
    POSITIVE_CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    positive_class_id: int
    negative_class_id: int
    def __init__(self, positive_class_id: _Optional[int] = ..., negative_class_id: _Optional[int] = ...) -> None: ...

class ScoreSegmentationRequest(_message.Message):
    __slots__ = ("predicted", "reference", "probabilities", "num_classes", "use_ignore_index", "ignore_index", "tps", "instance_maps")
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    USE_IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TPS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_MAPS_FIELD_NUMBER: _ClassVar[int]
    predicted: _common_pb2.Tensor
    reference: _common_pb2.Tensor
    probabilities: _common_pb2.Tensor
    num_classes: int
    use_ignore_index: bool
    ignore_index: int
    tps: TpsClasses
    instance_maps: _common_pb2.Tensor
    def __init__(self, predicted: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., reference: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., probabilities: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_classes: _Optional[int] = ..., use_ignore_index: _Optional[bool] = ..., ignore_index: _Optional[int] = ..., tps: _Optional[_Union[TpsClasses, _Mapping]] = ..., instance_maps: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TumorProportion(_message.Message):
    __slots__ = ("tps", "bin")
    TPS_FIELD_NUMBER: _ClassVar[int]
    BIN_FIELD_NUMBER: _ClassVar[int]
    tps: float
    bin: str
    def __init__(self, tps: _Optional[float] = ..., bin: _Optional[str] = ...) -> None: ...

class SegmentationScores(_message.Message):
    __slots__ = ("num_images", "num_classes", "miou", "wiou", "wprecision", "wrecall", "dice_per_class", "mean_dice", "has_cross_entropy", "cross_entropy", "t_objective", "class_pixel_counts", "predicted_tps", "reference_tps")
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    MIOU_FIELD_NUMBER: _ClassVar[int]
    WIOU_FIELD_NUMBER: _ClassVar[int]
    WPRECISION_FIELD_NUMBER: _ClassVar[int]
    WRECALL_FIELD_NUMBER: _ClassVar[int]
    DICE_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    MEAN_DICE_FIELD_NUMBER: _ClassVar[int]
    HAS_CROSS_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    CROSS_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    T_OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    CLASS_PIXEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TPS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TPS_FIELD_NUMBER: _ClassVar[int]
    num_images: int
    num_classes: int
    miou: float
    wiou: float
    wprecision: float
    wrecall: float
    dice_per_class: _containers.RepeatedScalarFieldContainer[float]
    mean_dice: float
    has_cross_entropy: bool
    cross_entropy: float
    t_objective: float
    class_pixel_counts: _containers.RepeatedScalarFieldContainer[int]
    predicted_tps: _containers.RepeatedCompositeFieldContainer[TumorProportion]
    reference_tps: _containers.RepeatedCompositeFieldContainer[TumorProportion]
    def __init__(self, num_images: _Optional[int] = ..., num_classes: _Optional[int] = ..., miou: _Optional[float] = ..., wiou: _Optional[float] = ..., wprecision: _Optional[float] = ..., wrecall: _Optional[float] = ..., dice_per_class: _Optional[_Iterable[float]] = ..., mean_dice: _Optional[float] = ..., has_cross_entropy: _Optional[bool] = ..., cross_entropy: _Optional[float] = ..., t_objective: _Optional[float] = ..., class_pixel_counts: _Optional[_Iterable[int]] = ..., predicted_tps: _Optional[_Iterable[_Union[TumorProportion, _Mapping]]] = ..., reference_tps: _Optional[_Iterable[_Union[TumorProportion, _Mapping]]] = ...) -> None: ...

class TumorProportionRequest(_message.Message):
    __slots__ = ("class_maps", "classes", "instance_maps")
    CLASS_MAPS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_MAPS_FIELD_NUMBER: _ClassVar[int]
    class_maps: _common_pb2.Tensor
    classes: TpsClasses
    instance_maps: _common_pb2.Tensor
    def __init__(self, class_maps: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., classes: _Optional[_Union[TpsClasses, _Mapping]] = ..., instance_maps: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TumorProportionResponse(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[TumorProportion]
    def __init__(self, scores: _Optional[_Iterable[_Union[TumorProportion, _Mapping]]] = ...) -> None: ...

class ConsistencyRequest(_message.Message):
    __slots__ = ("images", "conditioning_masks", "segmenter", "segmenter_version", "renderer", "min_miou", "return_predictions")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_MASKS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTER_FIELD_NUMBER: _ClassVar[int]
    SEGMENTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    RENDERER_FIELD_NUMBER: _ClassVar[int]
    MIN_MIOU_FIELD_NUMBER: _ClassVar[int]
    RETURN_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    images: ImageSet
    conditioning_masks: _common_pb2.Tensor
    segmenter: str
    segmenter_version: str
    renderer: str
    min_miou: float
    return_predictions: bool
    def __init__(self, images: _Optional[_Union[ImageSet, _Mapping]] = ..., conditioning_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., segmenter: _Optional[str] = ..., segmenter_version: _Optional[str] = ..., renderer: _Optional[str] = ..., min_miou: _Optional[float] = ..., return_predictions: _Optional[bool] = ...) -> None: ...

class ConsistencyResponse(_message.Message):
    __slots__ = ("miou", "passed", "mean_miou", "segmenter", "predictions")
    MIOU_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    MEAN_MIOU_FIELD_NUMBER: _ClassVar[int]
    SEGMENTER_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    miou: _containers.RepeatedScalarFieldContainer[float]
    passed: _containers.RepeatedScalarFieldContainer[bool]
    mean_miou: float
    segmenter: _common_pb2.ModelRef
    predictions: _common_pb2.Tensor
    def __init__(self, miou: _Optional[_Iterable[float]] = ..., passed: _Optional[_Iterable[bool]] = ..., mean_miou: _Optional[float] = ..., segmenter: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., predictions: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
