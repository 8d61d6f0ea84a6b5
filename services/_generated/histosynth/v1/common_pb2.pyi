from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_UINT16: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_BOOL: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_UINT16: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_BOOL: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("models", "seed", "code_version", "parameters_json", "backend")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRef]
    seed: int
    code_version: str
    parameters_json: str
    backend: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ..., seed: _Optional[int] = ..., code_version: _Optional[str] = ..., parameters_json: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("model", "kind", "role", "class_names", "noise_spacing", "uses_instance_edges", "stain", "type_names", "guided", "stain_sources")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    NOISE_SPACING_FIELD_NUMBER: _ClassVar[int]
    USES_INSTANCE_EDGES_FIELD_NUMBER: _ClassVar[int]
    STAIN_FIELD_NUMBER: _ClassVar[int]
    TYPE_NAMES_FIELD_NUMBER: _ClassVar[int]
    GUIDED_FIELD_NUMBER: _ClassVar[int]
    STAIN_SOURCES_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    kind: str
    role: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    noise_spacing: float
    uses_instance_edges: bool
    stain: str
    type_names: _containers.RepeatedScalarFieldContainer[str]
    guided: bool
    stain_sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., kind: _Optional[str] = ..., role: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., noise_spacing: _Optional[float] = ..., uses_instance_edges: _Optional[bool] = ..., stain: _Optional[str] = ..., type_names: _Optional[_Iterable[str]] = ..., guided: _Optional[bool] = ..., stain_sources: _Optional[_Iterable[str]] = ...) -> None: ...
