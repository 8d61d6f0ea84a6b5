from services._generated.histosynth.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_ENCODING_UNSPECIFIED: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_RAW: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_PNG: _ClassVar[ImageEncoding]

class DiffusionScheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIFFUSION_SCHEDULER_UNSPECIFIED: _ClassVar[DiffusionScheduler]
    DIFFUSION_SCHEDULER_DDIM: _ClassVar[DiffusionScheduler]
    DIFFUSION_SCHEDULER_DPM_SOLVER_PP: _ClassVar[DiffusionScheduler]
IMAGE_ENCODING_UNSPECIFIED: ImageEncoding
IMAGE_ENCODING_RAW: ImageEncoding
IMAGE_ENCODING_PNG: ImageEncoding
DIFFUSION_SCHEDULER_UNSPECIFIED: DiffusionScheduler
DIFFUSION_SCHEDULER_DDIM: DiffusionScheduler
DIFFUSION_SCHEDULER_DPM_SOLVER_PP: DiffusionScheduler

class DiffusionOptions(_message.Message):
    __slots__ = ("steps", "scheduler", "guidance_scale")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    scheduler: DiffusionScheduler
    guidance_scale: float
    def __init__(self, steps: _Optional[int] = ..., scheduler: _Optional[_Union[DiffusionScheduler, str]] = ..., guidance_scale: _Optional[float] = ...) -> None: ...

class RenderRequest(_message.Message):
    __slots__ = ("model", "model_version", "class_masks", "instance_maps", "noise_labels", "seed", "encoding", "noise_spacing", "diffusion", "stain_variation", "stain_source")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_MASKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_MAPS_FIELD_NUMBER: _ClassVar[int]
    NOISE_LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    NOISE_SPACING_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_FIELD_NUMBER: _ClassVar[int]
    STAIN_VARIATION_FIELD_NUMBER: _ClassVar[int]
    STAIN_SOURCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    class_masks: _common_pb2.Tensor
    instance_maps: _common_pb2.Tensor
    noise_labels: _common_pb2.Tensor
    seed: int
    encoding: ImageEncoding
    noise_spacing: float
    diffusion: DiffusionOptions
    stain_variation: bool
    stain_source: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., class_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., instance_maps: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., noise_labels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., encoding: _Optional[_Union[ImageEncoding, str]] = ..., noise_spacing: _Optional[float] = ..., diffusion: _Optional[_Union[DiffusionOptions, _Mapping]] = ..., stain_variation: _Optional[bool] = ..., stain_source: _Optional[str] = ...) -> None: ...

class RenderResponse(_message.Message):
    __slots__ = ("images", "png_images", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PNG_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _common_pb2.Tensor
    png_images: _containers.RepeatedScalarFieldContainer[bytes]
    model: _common_pb2.ModelRef
    def __init__(self, images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., png_images: _Optional[_Iterable[bytes]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class GenerateNucleiMasksRequest(_message.Message):
    __slots__ = ("model", "model_version", "types", "count", "seed", "diffusion", "height", "width")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    types: _containers.RepeatedScalarFieldContainer[str]
    count: int
    seed: int
    diffusion: DiffusionOptions
    height: int
    width: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., types: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ..., seed: _Optional[int] = ..., diffusion: _Optional[_Union[DiffusionOptions, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class GenerateNucleiMasksResponse(_message.Message):
    __slots__ = ("class_maps", "instance_maps", "model", "class_names")
    CLASS_MAPS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_MAPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    class_maps: _common_pb2.Tensor
    instance_maps: _common_pb2.Tensor
    model: _common_pb2.ModelRef
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, class_maps: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., instance_maps: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...
