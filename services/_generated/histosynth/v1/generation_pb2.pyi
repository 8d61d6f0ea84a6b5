from services._generated.histosynth.v1 import common_pb2 as _common_pb2
from services._generated.histosynth.v1 import mask_rendering_pb2 as _mask_rendering_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class FractionRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class Stratum(_message.Message):
    __slots__ = ("label", "weight", "class_fractions", "class_fraction_ranges", "positive_proportion", "nuclear_fraction", "nuclei_types")
    class ClassFractionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ClassFractionRangesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FractionRange
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FractionRange, _Mapping]] = ...) -> None: ...
    LABEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLASS_FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASS_FRACTION_RANGES_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_PROPORTION_FIELD_NUMBER: _ClassVar[int]
    NUCLEAR_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NUCLEI_TYPES_FIELD_NUMBER: _ClassVar[int]
    label: str
    weight: float
    class_fractions: _containers.ScalarMap[str, float]
    class_fraction_ranges: _containers.MessageMap[str, FractionRange]
    positive_proportion: FractionRange
    nuclear_fraction: FractionRange
    nuclei_types: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, label: _Optional[str] = ..., weight: _Optional[float] = ..., class_fractions: _Optional[_Mapping[str, float]] = ..., class_fraction_ranges: _Optional[_Mapping[str, FractionRange]] = ..., positive_proportion: _Optional[_Union[FractionRange, _Mapping]] = ..., nuclear_fraction: _Optional[_Union[FractionRange, _Mapping]] = ..., nuclei_types: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerationSpec(_message.Message):
    __slots__ = ("count", "tissue", "height", "width", "strata", "tolerance", "seed", "noise_spacing", "refine", "min_consistency", "coarse_masks", "sink_uri", "diffusion", "stain_variation", "stain_source")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TISSUE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STRATA_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOISE_SPACING_FIELD_NUMBER: _ClassVar[int]
    REFINE_FIELD_NUMBER: _ClassVar[int]
    MIN_CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    COARSE_MASKS_FIELD_NUMBER: _ClassVar[int]
    SINK_URI_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_FIELD_NUMBER: _ClassVar[int]
    STAIN_VARIATION_FIELD_NUMBER: _ClassVar[int]
    STAIN_SOURCE_FIELD_NUMBER: _ClassVar[int]
    count: int
    tissue: str
    height: int
    width: int
    strata: _containers.RepeatedCompositeFieldContainer[Stratum]
    tolerance: float
    seed: int
    noise_spacing: float
    refine: bool
    min_consistency: float
    coarse_masks: _common_pb2.Tensor
    sink_uri: str
    diffusion: _mask_rendering_pb2.DiffusionOptions
    stain_variation: bool
    stain_source: str
    def __init__(self, count: _Optional[int] = ..., tissue: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., strata: _Optional[_Iterable[_Union[Stratum, _Mapping]]] = ..., tolerance: _Optional[float] = ..., seed: _Optional[int] = ..., noise_spacing: _Optional[float] = ..., refine: _Optional[bool] = ..., min_consistency: _Optional[float] = ..., coarse_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., sink_uri: _Optional[str] = ..., diffusion: _Optional[_Union[_mask_rendering_pb2.DiffusionOptions, _Mapping]] = ..., stain_variation: _Optional[bool] = ..., stain_source: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("spec", "model_versions", "indices")
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    spec: GenerationSpec
    model_versions: _containers.ScalarMap[str, str]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, spec: _Optional[_Union[GenerationSpec, _Mapping]] = ..., model_versions: _Optional[_Mapping[str, str]] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("job_id", "index", "stratum", "image_png", "mask", "instances", "scores", "provenance", "class_names")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STRATUM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    index: int
    stratum: str
    image_png: bytes
    mask: _common_pb2.Tensor
    instances: _common_pb2.Tensor
    scores: _containers.ScalarMap[str, float]
    provenance: _common_pb2.Provenance
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., index: _Optional[int] = ..., stratum: _Optional[str] = ..., image_png: _Optional[bytes] = ..., mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., instances: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., scores: _Optional[_Mapping[str, float]] = ..., provenance: _Optional[_Union[_common_pb2.Provenance, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "completed", "total", "rejected", "error", "sink_uri")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SINK_URI_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    completed: int
    total: int
    rejected: int
    error: str
    sink_uri: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., completed: _Optional[int] = ..., total: _Optional[int] = ..., rejected: _Optional[int] = ..., error: _Optional[str] = ..., sink_uri: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...
