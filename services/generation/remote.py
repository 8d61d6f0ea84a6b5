"""The generation pipeline's model seam over the wire: MaskRendering, MaskRefinement and Scoring servers.

A Generation server configured with peer addresses (HISTOSYNTH_GENERATION_RENDERING_ADDRESS, ...)
hosts no model: it describes the peers' models (DescribeModel), renders through Render, refines
through Refine, generates nuclei masks through GenerateNucleiMasks and gates samples through
Scoring's Consistency. Renderers, refiners and segmenters then scale (and use GPUs) on their own,
and samples are byte-identical to the embedded mode (services/generation/models.py): the peers run
the same pipelines on the same arrays, raw tensors travel losslessly, and seeds travel with each call.

A peer's error keeps its status (a model the peer lacks stays NOT_FOUND, a bad size stays
INVALID_ARGUMENT) and its message is prefixed with the peer, so the caller knows who refused.
The request's deadline travels to every peer call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import numpy as np

from services._generated.histosynth.v1 import (
    common_pb2,
    mask_refinement_pb2,
    mask_refinement_pb2_grpc,
    mask_rendering_pb2,
    mask_rendering_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from services.core.config import ConfigError, check_settings, load_settings, setting
from services.core.errors import GRPC_STATUS_NAMES, HistosynthError, clip
from services.core.model_info import MaskGeneratorInfo, RefinerInfo, RendererInfo
from services.diffusion.pipeline import DiffusionOptions
from services.generation.pipeline import GenerationUnavailableError
from services.model_host import ModelRef
from services.servicer_common import diffusion_options_to_proto
from services.tensor_codec import array_to_tensor, tensor_to_array

SETTINGS_PREFIX: Final = "HISTOSYNTH_GENERATION_"
Reply = TypeVar("Reply")


@dataclass(frozen=True)
class GenerationSettings:
    """Where a Generation server finds its peers; read from HISTOSYNTH_GENERATION_* variables.

    With no address set, the server loads renderers, refiner and segmenters itself (embedded mode).
    """

    rendering_address: str | None = setting(
        None,
        "host:port of a MaskRendering server (renderers, diffusion models). Set = this server loads no "
        "renderer and calls that server; unset = embedded (loads the models from HISTOSYNTH_MODEL_STORE).",
    )
    refinement_address: str | None = setting(
        None,
        "host:port of a MaskRefinement server, used for spec.refine; needs the rendering address "
        "(unset with a rendering address = specs asking for refine get FAILED_PRECONDITION).",
    )
    scoring_address: str | None = setting(
        None,
        "host:port of a Scoring server, used for the quality gate (spec.min_consistency); needs the "
        "rendering address (unset with a rendering address = specs with a gate get FAILED_PRECONDITION).",
    )
    peer_tls_ca: Path | None = setting(
        None, "PEM CA bundle that peers' TLS certificates are verified against; unset = plaintext to peers."
    )
    peer_tls_cert: Path | None = setting(
        None, "PEM client certificate chain presented to peers that require client certificates (mutual TLS)."
    )
    peer_tls_key: Path | None = setting(None, "PEM private key of HISTOSYNTH_GENERATION_PEER_TLS_CERT.")
    peer_token_file: Path | None = setting(
        None, "File with the bearer token sent to peers ('authorization: Bearer <token>'); unset = none."
    )
    peer_timeout_s: float = setting(
        300.0, "Deadline of a peer call when the Generation request itself has none, in seconds.",
        lambda value: None if value > 0 else "must be > 0",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.rendering_address is None and (self.refinement_address or self.scoring_address):
            raise ConfigError(
                f"{SETTINGS_PREFIX}REFINEMENT_ADDRESS / SCORING_ADDRESS need {SETTINGS_PREFIX}RENDERING_ADDRESS: "
                "a Generation server either calls peers for every model or hosts them all"
            )
        if (self.peer_tls_cert is None) != (self.peer_tls_key is None):
            raise ConfigError(f"set both {SETTINGS_PREFIX}PEER_TLS_CERT and {SETTINGS_PREFIX}PEER_TLS_KEY, or neither")
        if self.peer_tls_cert is not None and self.peer_tls_ca is None:
            raise ConfigError(f"{SETTINGS_PREFIX}PEER_TLS_CERT needs {SETTINGS_PREFIX}PEER_TLS_CA (TLS to the peers)")

    @property
    def remote(self) -> bool:
        return self.rendering_address is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GenerationSettings:
        return load_settings(cls, prefix=SETTINGS_PREFIX, environ=environ)


class PeerCallError(HistosynthError):
    """A peer service refused or failed a call; carries the peer's status code."""

    reason = "peer_error"


class Peer:
    """One channel to a peer service, with its deadline and credentials policy."""

    def __init__(self, service: str, address: str, settings: GenerationSettings, max_message_bytes: int) -> None:
        self.service = service
        self.address = address
        self.timeout_s = settings.peer_timeout_s
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if settings.peer_tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.peer_tls_ca, "PEER_TLS_CA"),
                private_key=None if settings.peer_tls_key is None else _read(settings.peer_tls_key, "PEER_TLS_KEY"),
                certificate_chain=None if settings.peer_tls_cert is None else _read(settings.peer_tls_cert, "PEER_TLS_CERT"),
            )
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        self.metadata: tuple[tuple[str, str], ...] = ()
        if settings.peer_token_file is not None:
            token = _read(settings.peer_token_file, "PEER_TOKEN_FILE").decode().strip()
            self.metadata = (("authorization", f"Bearer {token}"),)

    async def call(self, method: Any, request: Any, deadline: float | None) -> Any:
        timeout = self.timeout_s if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            return await method(request, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            status = error.code().name
            if status not in GRPC_STATUS_NAMES:
                status = "UNAVAILABLE"
            details = error.details() or status
            raise PeerCallError(f"{self.service} at {self.address}: {details}", status) from None

    async def close(self) -> None:
        await self.channel.close()


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{SETTINGS_PREFIX}{name}={str(path)!r}: cannot read it ({error.strerror})") from None


def _ref(message: common_pb2.ModelRef) -> ModelRef:
    return ModelRef(name=message.name, version=message.version, sha256=message.sha256)


def _array(tensor: common_pb2.Tensor, name: str) -> np.ndarray:
    return np.array(tensor_to_array(tensor, name))


# ------------------------------------------------------------------------- models
@dataclass(frozen=True)
class RemoteRenderer:
    peer: Peer
    info: RendererInfo

    async def render(
        self,
        class_maps: np.ndarray,
        instances: np.ndarray | None,
        noise_labels: np.ndarray | None,
        deadline: float | None,
        *,
        seed: int = 0,
        diffusion: DiffusionOptions = DiffusionOptions(),
        stain_variation: bool = False,
        stain_source: str = "",
    ) -> np.ndarray:
        request = mask_rendering_pb2.RenderRequest(
            model=self.info.ref.name,
            model_version=self.info.ref.version,
            class_masks=array_to_tensor(class_maps),
            seed=seed,
            encoding=mask_rendering_pb2.IMAGE_ENCODING_RAW,
            diffusion=diffusion_options_to_proto(diffusion),
            stain_variation=stain_variation,
            stain_source=stain_source,
        )
        if instances is not None:
            request.instance_maps.CopyFrom(array_to_tensor(instances))
        if noise_labels is not None:
            request.noise_labels.CopyFrom(array_to_tensor(noise_labels))
        stub = mask_rendering_pb2_grpc.MaskRenderingStub(self.peer.channel)
        response = await self.peer.call(stub.Render, request, deadline)
        return _array(response.images, "images")


@dataclass(frozen=True)
class RemoteMaskGenerator:
    peer: Peer
    info: MaskGeneratorInfo

    async def generate(
        self,
        types: Sequence[str],
        seed: int,
        size: tuple[int, int],
        diffusion: DiffusionOptions,
        deadline: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        request = mask_rendering_pb2.GenerateNucleiMasksRequest(
            model=self.info.ref.name, model_version=self.info.ref.version, types=list(types), count=1, seed=seed,
            diffusion=diffusion_options_to_proto(diffusion), height=size[0], width=size[1],
        )
        stub = mask_rendering_pb2_grpc.MaskRenderingStub(self.peer.channel)
        response = await self.peer.call(stub.GenerateNucleiMasks, request, deadline)
        return _array(response.class_maps, "class_maps")[0], _array(response.instance_maps, "instance_maps")[0]


@dataclass(frozen=True)
class RemoteRefiner:
    peer: Peer
    info: RefinerInfo

    @property
    def ref(self) -> ModelRef:
        return self.info.ref

    async def refine(self, coarse_masks: np.ndarray, deadline: float | None, *,
                     guide_masks: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        request = mask_refinement_pb2.RefineRequest(
            coarse_masks=array_to_tensor(coarse_masks), model=self.ref.name, model_version=self.ref.version, seed=seed,
        )
        if guide_masks is not None and self.info.guided:
            request.guide_masks.CopyFrom(array_to_tensor(guide_masks))
        stub = mask_refinement_pb2_grpc.MaskRefinementStub(self.peer.channel)
        response = await self.peer.call(stub.Refine, request, deadline)
        return _array(response.fine_masks, "fine_masks")


class RemoteModels:
    """ModelProvider over MaskRendering (and optionally MaskRefinement) servers."""

    def __init__(self, rendering: Peer, refinement: Peer | None = None) -> None:
        self.rendering = rendering
        self.refinement = refinement

    async def _describe(self, peer: Peer, stub: Any, name: str, version: str | None) -> common_pb2.ModelDescription:
        request = common_pb2.DescribeModelRequest(model=name, model_version=version or "")
        return await peer.call(stub.DescribeModel, request, None)

    async def renderer(self, name: str, version: str | None) -> RemoteRenderer:
        stub = mask_rendering_pb2_grpc.MaskRenderingStub(self.rendering.channel)
        message = await self._describe(self.rendering, stub, name, version)
        if message.role == "mask_generator":
            raise PeerCallError(
                f"{self.rendering.service} at {self.rendering.address}: model {clip(name)} is a mask generator, "
                "not a renderer", "INVALID_ARGUMENT",
            )
        info = RendererInfo(
            ref=_ref(message.model),
            class_names=tuple(message.class_names),
            noise_spacing=message.noise_spacing if message.HasField("noise_spacing") else None,
            uses_instance_edges=message.uses_instance_edges,
            stain=message.stain or "he",
            diffusion=message.kind == "denoiser",
            stain_sources=tuple(message.stain_sources),
        )
        return RemoteRenderer(self.rendering, info)

    async def mask_generator(self, name: str, version: str | None) -> RemoteMaskGenerator:
        stub = mask_rendering_pb2_grpc.MaskRenderingStub(self.rendering.channel)
        message = await self._describe(self.rendering, stub, name, version)
        if message.role != "mask_generator":
            raise PeerCallError(
                f"{self.rendering.service} at {self.rendering.address}: model {clip(name)} is not a nuclei "
                "mask generator", "INVALID_ARGUMENT",
            )
        info = MaskGeneratorInfo(
            ref=_ref(message.model), class_names=tuple(message.class_names), type_names=tuple(message.type_names)
        )
        return RemoteMaskGenerator(self.rendering, info)

    async def refiner(self, name: str, version: str | None) -> RemoteRefiner:
        if self.refinement is None:
            raise GenerationUnavailableError(
                "spec.refine needs the mask refiner, and this generation server has no MaskRefinement peer "
                f"({SETTINGS_PREFIX}REFINEMENT_ADDRESS is unset); set refine to false"
            )
        stub = mask_refinement_pb2_grpc.MaskRefinementStub(self.refinement.channel)
        message = await self._describe(self.refinement, stub, name, version)
        return RemoteRefiner(self.refinement, RefinerInfo(ref=_ref(message.model), guided=message.guided))


class RemoteConsistencyScorer:
    """Generation's quality gate through a Scoring server's Consistency (the segmenter runs there)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.stub = scoring_pb2_grpc.ScoringStub(peer.channel)

    async def segmenter(self, name: str = "", version: str = "", renderer: str = "") -> ModelRef:
        """Refuses (FAILED_PRECONDITION / NOT_FOUND, as the peer says) when no segmenter checks ``renderer``:
        asks Consistency about one blank 8 x 8 image, which names the segmenter it would use."""
        request = scoring_pb2.ConsistencyRequest(
            images=scoring_pb2.ImageSet(images=array_to_tensor(np.zeros((1, 8, 8, 3), np.uint8))),
            conditioning_masks=array_to_tensor(np.zeros((1, 8, 8), np.uint8)),
            segmenter=name, segmenter_version=version, renderer=renderer,
        )
        try:
            response = await self.peer.call(self.stub.Consistency, request, None)
        except PeerCallError as error:
            if error.status in ("FAILED_PRECONDITION", "NOT_FOUND", "UNAVAILABLE", "UNAUTHENTICATED"):
                raise
            return ModelRef(name=name, version=version, sha256="")  # the probe itself did not fit; scoring will say
        return _ref(response.segmenter)

    async def consistency(
        self, image: np.ndarray, class_map: np.ndarray, class_names: Sequence[str], renderer: str = ""
    ) -> float:
        if not renderer:
            raise GenerationUnavailableError("the remote quality gate needs the renderer's name")
        request = scoring_pb2.ConsistencyRequest(
            images=scoring_pb2.ImageSet(images=array_to_tensor(image[None])),
            conditioning_masks=array_to_tensor(class_map[None]),
            renderer=renderer,
        )
        response = await self.peer.call(self.stub.Consistency, request, None)
        return float(response.miou[0])


@dataclass
class Peers:
    """The peer channels of a remote Generation server; close them when it stops."""

    models: RemoteModels
    scorer: RemoteConsistencyScorer | None
    peers: tuple[Peer, ...]

    async def close(self) -> None:
        for peer in self.peers:
            await peer.close()


def connect(settings: GenerationSettings, max_message_bytes: int) -> Peers:
    """Channels to the configured peers (connections open lazily, on the first call)."""
    if settings.rendering_address is None:
        raise ConfigError(f"{SETTINGS_PREFIX}RENDERING_ADDRESS is unset: there is no peer to connect to")
    rendering = Peer("MaskRendering", settings.rendering_address, settings, max_message_bytes)
    refinement = None if not settings.refinement_address else Peer(
        "MaskRefinement", settings.refinement_address, settings, max_message_bytes
    )
    scoring = None if not settings.scoring_address else Peer(
        "Scoring", settings.scoring_address, settings, max_message_bytes
    )
    peers = tuple(p for p in (rendering, refinement, scoring) if p is not None)
    return Peers(RemoteModels(rendering, refinement), RemoteConsistencyScorer(scoring) if scoring else None, peers)
