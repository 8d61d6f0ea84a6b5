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
IMAGE_ENCODING_UNSPECIFIED: ImageEncoding
IMAGE_ENCODING_RAW: ImageEncoding
IMAGE_ENCODING_PNG: ImageEncoding

class RenderRequest(_message.Message):
    __slots__ = ("model", "model_version", "class_masks", "instance_maps", "noise_labels", "seed", "encoding", "noise_spacing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_MASKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_MAPS_FIELD_NUMBER: _ClassVar[int]
    NOISE_LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    NOISE_SPACING_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    class_masks: _common_pb2.Tensor
    instance_maps: _common_pb2.Tensor
    noise_labels: _common_pb2.Tensor
    seed: int
    encoding: ImageEncoding
    noise_spacing: float
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., class_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., instance_maps: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., noise_labels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., encoding: _Optional[_Union[ImageEncoding, str]] = ..., noise_spacing: _Optional[float] = ...) -> None: ...

class RenderResponse(_message.Message):
    __slots__ = ("images", "png_images", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PNG_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _common_pb2.Tensor
    png_images: _containers.RepeatedScalarFieldContainer[bytes]
    model: _common_pb2.ModelRef
    def __init__(self, images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., png_images: _Optional[_Iterable[bytes]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...
