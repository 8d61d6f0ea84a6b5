from services._generated.histosynth.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RefineRequest(_message.Message):
    __slots__ = ("coarse_masks", "stain", "model", "model_version", "noise_spacing", "seed", "guide_masks")
    COARSE_MASKS_FIELD_NUMBER: _ClassVar[int]
    STAIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NOISE_SPACING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GUIDE_MASKS_FIELD_NUMBER: _ClassVar[int]
    coarse_masks: _common_pb2.Tensor
    stain: str
    model: str
    model_version: str
    noise_spacing: float
    seed: int
    guide_masks: _common_pb2.Tensor
    def __init__(self, coarse_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., stain: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., noise_spacing: _Optional[float] = ..., seed: _Optional[int] = ..., guide_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class RefineResponse(_message.Message):
    __slots__ = ("fine_masks", "noise_labels", "model")
    FINE_MASKS_FIELD_NUMBER: _ClassVar[int]
    NOISE_LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    fine_masks: _common_pb2.Tensor
    noise_labels: _common_pb2.Tensor
    model: _common_pb2.ModelRef
    def __init__(self, fine_masks: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., noise_labels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...
