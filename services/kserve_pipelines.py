"""Pipeline models for KServe v2: a domain pipeline (mask in, uint8 image or mask out) as one v2 model.

The bare v2 models are networks: a renderer takes the float32 one-hot + noise + edge tensor and
returns [-1, 1] floats. A Triton user expects what Triton's ensembles give: uint8 class mask in,
uint8 RGB out. A pipeline model is exactly that, and nothing of its own: ``run`` calls the
service's domain pipeline (RenderingPipeline.render, RefinementPipeline.refine), so a pipeline
model returns the SAME bytes as the domain RPC for the same input, seed and model version.

Naming: ``<model>-pipeline`` (e.g. ``renderer-he-nuclei-pipeline``), with the versions of
``<model>``; version v runs ``<model>`` version v. Scalars (seed, noise_spacing, steps, ...) travel
as the request's ``parameters`` (v2 InferParameter / JSON), declared per model in ``parameters``
and listed in its ModelConfig. No protobuf here: the gRPC servicer (kserve_v2) and the REST
binding (kserve_rest) decode the wire into numpy arrays and plain Python scalars.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np

from services.core.errors import InvalidInputError
from services.model_host import ModelHost, ModelRef

PIPELINE_SUFFIX: Final = "-pipeline"
PLATFORM: Final = "histosynth_pipeline"
# Request parameters of the protocol itself (tritonclient may send them); a pipeline model ignores them.
PROTOCOL_PARAMETERS: Final = frozenset(
    {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output", "headers"}
)

@dataclass(frozen=True)
class PipelineTensor:
    """An input or output of a pipeline model.

    ``datatypes``: accepted v2 datatypes, the first being the one metadata declares; ``shape``: the
    declared shape with -1 for any size (batch first); ``ranks``: accepted ranks (an unbatched
    [H, W] mask is taken as a batch of one, as the domain API takes it).
    """

    name: str
    datatypes: tuple[str, ...]
    shape: tuple[int, ...]
    ranks: tuple[int, ...] = ()
    optional: bool = False

    @property
    def datatype(self) -> str:
        return self.datatypes[0]

    def accepted_ranks(self) -> tuple[int, ...]:
        return self.ranks or (len(self.shape),)


@dataclass(frozen=True)
class PipelineParameter:
    """A scalar request parameter; ``kind`` is int, float (ints accepted) or str."""

    name: str
    kind: type
    doc: str

    def parse(self, value: object, model: str) -> object:
        wanted = {int: "an integer", float: "a number", str: "a string"}[self.kind]
        ok = (
            isinstance(value, str) if self.kind is str
            else isinstance(value, int) and not isinstance(value, bool) if self.kind is int
            else isinstance(value, (int, float)) and not isinstance(value, bool)
        )
        if not ok:
            raise InvalidInputError(f"parameter {self.name!r} of model {model} must be {wanted} ({self.doc}), "
                                    f"got {value!r}")
        if self.kind is float:
            value = float(value)  # type: ignore[arg-type]
            if not math.isfinite(value):
                raise InvalidInputError(f"parameter {self.name!r} of model {model} must be finite, got {value}")
        return value


@dataclass(frozen=True)
class PipelineResult:
    """Named uint8 outputs and the model version that made them (provenance for the response)."""

    outputs: dict[str, np.ndarray]
    ref: ModelRef


class PipelineModel(abc.ABC):
    """One ``<model>-pipeline`` v2 model over ``model`` of ``host``; subclasses call a domain pipeline."""

    inputs: tuple[PipelineTensor, ...]
    outputs: tuple[PipelineTensor, ...]
    parameters: tuple[PipelineParameter, ...]

    def __init__(self, host: ModelHost, model: str) -> None:
        self.host = host
        self.model = model
        self.name = model + PIPELINE_SUFFIX

    @abc.abstractmethod
    async def run(
        self, version: str, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, object],
        deadline: float | None,
    ) -> PipelineResult:
        """Inputs checked by :meth:`check_inputs`, parameters by :meth:`parse_parameters`."""

    def versions(self) -> list[str]:
        return self.host.versions(self.model)

    def is_ready(self, version: str | None = None) -> bool:
        return self.host.is_ready(self.model, version or None)

    def describe_parameters(self) -> str:
        """For ModelConfig.parameters: what a caller may set."""
        return "; ".join(f"{p.name} ({p.kind.__name__}): {p.doc}" for p in self.parameters)

    def parse_parameters(self, given: Mapping[str, object]) -> dict[str, object]:
        """Request parameters -> checked values; unknown names are refused, naming the valid ones."""
        known = {parameter.name: parameter for parameter in self.parameters}
        parsed: dict[str, object] = {}
        for name, value in given.items():
            if name in PROTOCOL_PARAMETERS:
                continue
            parameter = known.get(name)
            if parameter is None:
                raise InvalidInputError(
                    f"model {self.name} has no parameter {name[:100]!r}; parameters: {self.describe_parameters()}"
                )
            parsed[name] = parameter.parse(value, self.name)
        return parsed

    def check_inputs(self, given: Mapping[str, tuple[str, list[int]]]) -> None:
        """Names, datatypes and ranks of the request's inputs (name -> (datatype, shape)), before decoding."""
        declared = {tensor.name: tensor for tensor in self.inputs}
        unknown = sorted(set(given) - set(declared))
        missing = [tensor.name for tensor in self.inputs if not tensor.optional and tensor.name not in given]
        if unknown or missing:
            raise InvalidInputError(
                f"model {self.name} takes inputs {self.describe_inputs()}; "
                + (f"unknown: {unknown}" if unknown else f"missing: {missing}")
            )
        for name, (datatype, shape) in given.items():
            tensor = declared[name]
            if datatype not in tensor.datatypes or len(shape) not in tensor.accepted_ranks():
                raise InvalidInputError(
                    f"input {name!r} of model {self.name}: expected {' or '.join(tensor.datatypes)} with "
                    f"{' or '.join(str(rank) for rank in tensor.accepted_ranks())} dimensions, got {datatype} {shape}"
                )

    def describe_inputs(self) -> str:
        return ", ".join(
            f"{tensor.name} ({'/'.join(tensor.datatypes)}{', optional' if tensor.optional else ''})"
            for tensor in self.inputs
        )

    def check_outputs(self, requested: list[str], parameters: Mapping[str, object]) -> None:
        """Requested output names (empty = all the call produces), with the parsed parameters."""
        declared = [tensor.name for tensor in self.outputs]
        unknown = [name for name in requested if name not in declared]
        if unknown:
            raise InvalidInputError(f"model {self.name} has no output(s) {unknown}; outputs: {declared}")


class PipelineCatalog(Protocol):
    """The pipeline models of one service, by v2 name (recomputed per call: the store may gain models)."""

    def pipelines(self) -> dict[str, PipelineModel]: ...


def optional_int(parameters: Mapping[str, object], name: str) -> int | None:
    value = parameters.get(name)
    return None if value is None else int(value)  # type: ignore[call-overload]
