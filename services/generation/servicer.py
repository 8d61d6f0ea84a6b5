"""histosynth.v1.Generation: protobuf <-> GenerationSpec / GeneratedSample, nothing more.

Generate streams a job's samples in index order; the job lives exactly as long as the
call, so a client cancel, a disconnect or a passed deadline cancels the handler, which
cancels every sample in flight (and their batcher requests). SubmitJob runs the same
job in the background (results go to its sink_uri); GetJob/CancelJob see both kinds.
Domain errors propagate as HistosynthError and the core interceptor maps them to status
codes (INVALID_ARGUMENT for bad specs, NOT_FOUND for unknown jobs/models, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from services import tensor_codec
from services._generated.histosynth.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.core.config import ServerConfig
from services.core.errors import InvalidInputError
from services.core.grpc_server import RunningServer, ServiceRegistration, start_server
from services.diffusion.pipeline import DiffusionOptions
from services.generation.jobs import JobRecord, JobRegistry, JobState
from services.generation.pipeline import ConsistencyScorer, GeneratedSample, GenerationPipeline, ModelProvider
from services.generation.remote import GenerationSettings, Peers, connect
from services.generation.spec import FractionRange, GenerationSpec, StratumSpec
from services.model_host import ModelHost
from services.servicer_common import deadline_of, diffusion_options, report_readiness

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name

_STATE_TO_PROTO = {
    JobState.QUEUED: generation_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: generation_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: generation_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: generation_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: generation_pb2.JOB_STATE_CANCELLED,
}


def _range(message: generation_pb2.FractionRange) -> FractionRange:
    return FractionRange(low=float(message.min), high=float(message.max))


def spec_from_request(request: generation_pb2.GenerateRequest) -> GenerationSpec:
    """The domain spec of a request; field-level checks happen in GenerationPipeline.prepare."""
    message = request.spec
    if not request.HasField("spec"):
        raise InvalidInputError("spec: missing; send a GenerationSpec with at least count and tissue")
    strata = tuple(
        StratumSpec(
            label=s.label,
            weight=s.weight if s.weight != 0 else 1.0,
            class_fractions=dict(s.class_fractions),
            class_fraction_ranges={name: _range(r) for name, r in s.class_fraction_ranges.items()},
            positive_proportion=_range(s.positive_proportion) if s.HasField("positive_proportion") else None,
            nuclear_fraction=_range(s.nuclear_fraction) if s.HasField("nuclear_fraction") else None,
            nuclei_types=tuple(s.nuclei_types),
        )
        for s in message.strata
    )
    coarse = None
    if message.HasField("coarse_masks"):
        coarse = np.array(
            tensor_codec.tensor_to_array(
                message.coarse_masks,
                "spec.coarse_masks",
                allowed_dtypes=[np.dtype(np.uint8)],
                allowed_ranks=[2, 3],
                layouts=["[N, H, W]", "[H, W]"],
            )
        )
        coarse = coarse[None] if coarse.ndim == 2 else coarse
    return GenerationSpec(
        count=int(message.count),
        tissue=message.tissue,
        height=int(message.height) or 256,
        width=int(message.width) or 256,
        strata=strata,
        tolerance=float(message.tolerance) or 0.02,
        seed=int(message.seed),
        noise_spacing=float(message.noise_spacing),
        refine=bool(message.refine),
        min_consistency=float(message.min_consistency),
        coarse_masks=coarse,
        sink_uri=message.sink_uri,
        model_versions=dict(request.model_versions),
        # Same wire rules as Render's diffusion options.
        diffusion=diffusion_options(message.diffusion)
        if message.HasField("diffusion") else DiffusionOptions(),
        stain_variation=bool(message.stain_variation),
        stain_source=message.stain_source,
    )


def sample_to_proto(sample: GeneratedSample, job_id: str) -> generation_pb2.Sample:
    provenance = sample.provenance
    return generation_pb2.Sample(
        job_id=job_id,
        index=sample.index,
        stratum=sample.stratum,
        image_png=sample.image_png(),  # encoded once, in a worker thread, by the pipeline
        mask=tensor_codec.array_to_tensor(sample.class_map),
        instances=tensor_codec.array_to_tensor(sample.instances) if sample.instances is not None else None,
        scores=sample.scores,
        provenance=common_pb2.Provenance(
            models=[common_pb2.ModelRef(name=m.name, version=m.version, sha256=m.sha256) for m in provenance.models],
            seed=provenance.seed,
            code_version=provenance.code_version,
            parameters_json=provenance.parameters_json,
            backend=provenance.backend,
        ),
        class_names=list(sample.class_names),
    )


def job_to_proto(record: JobRecord) -> generation_pb2.Job:
    return generation_pb2.Job(
        job_id=record.job_id,
        state=_STATE_TO_PROTO[record.state],
        completed=record.counters.completed,
        total=record.total,
        rejected=record.counters.rejected,
        error=record.error,
        sink_uri=record.sink_uri,
    )


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, pipeline: GenerationPipeline, jobs: JobRegistry | None = None) -> None:
        self.pipeline = pipeline
        self.jobs = jobs if jobs is not None else JobRegistry(pipeline)

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.Sample]:
        prepared = await self.pipeline.prepare(spec_from_request(request))
        indices = _indices(request, len(prepared.plans))
        deadline = deadline_of(context)
        record = self.jobs.open_stream(prepared, indices)
        try:
            # Record the job id early so a client can CancelJob/GetJob it before the first sample.
            await context.send_initial_metadata((("histosynth-job-id", record.job_id),))
            stream = self.jobs.stream(prepared, record, indices=indices, deadline=deadline)
            try:
                async for sample in stream:
                    # The PNG is already encoded (pipeline, worker thread); copying arrays into the message
                    # of a large field still takes a while, so it stays off the event loop too.
                    yield await asyncio.to_thread(sample_to_proto, sample, record.job_id)
            finally:
                await stream.aclose()
        finally:
            # A call cancelled before its stream started (or closed before the first sample) must not
            # leave its job QUEUED, holding a registry slot forever.
            if not record.state.finished:
                record.finish(JobState.CANCELLED, "the call ended before its stream started")

    async def SubmitJob(  # noqa: N802
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.Job:
        spec = spec_from_request(request)
        if not spec.sink_uri:
            raise InvalidInputError(
                "spec.sink_uri: required for SubmitJob, whose samples are only written to the sink; "
                "set a directory (path or file:// URI) or use Generate to stream the samples"
            )
        prepared = await self.pipeline.prepare(spec)
        indices = _indices(request, len(prepared.plans))
        return job_to_proto(self.jobs.submit(prepared, indices=indices))

    async def GetJob(  # noqa: N802
        self, request: generation_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.Job:
        return job_to_proto(self.jobs.get(request.job_id))

    async def CancelJob(  # noqa: N802
        self, request: generation_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.Job:
        return job_to_proto(await self.jobs.cancel(request.job_id))


def _indices(request: generation_pb2.GenerateRequest, total: int) -> list[int] | None:
    if not request.indices:
        return None
    bad = sorted({int(i) for i in request.indices if i >= total})
    if bad:
        raise InvalidInputError(f"indices: {bad[:10]} are outside [0, {total}) for count {total}")
    return sorted({int(i) for i in request.indices})


# ------------------------------------------------------------------------- assembly
@dataclass
class GenerationStack:
    """What a generation server runs on: the pipeline, the job registry, and what feeds the pipeline.

    Embedded mode (services.all_in_one.create_stack): ``hosts`` are this process's model hosts
    (renderers, refiner, segmenters), shared with the other services of the process. Remote mode
    (:func:`create_remote_stack`): no host and no model; ``peers`` are the channels to the
    MaskRendering / MaskRefinement / Scoring servers.
    """

    pipeline: GenerationPipeline
    jobs: JobRegistry
    hosts: tuple[ModelHost, ...] = ()
    peers: Peers | None = None

    async def start_hosts(self) -> None:
        for host in self.hosts:
            await host.start()

    async def stop(self) -> None:
        await self.jobs.close()
        for host in self.hosts:
            await host.stop()
        if self.peers is not None:
            await self.peers.close()


def backend_name(config: ServerConfig) -> str:
    return f"onnxruntime:{','.join(config.devices)}"


def build_stack(
    config: ServerConfig,
    models: ModelProvider,
    *,
    scorer: ConsistencyScorer | None = None,
    hosts: Sequence[ModelHost] = (),
    peers: Peers | None = None,
    concurrency: int = 4,
    max_jobs: int = 256,
) -> GenerationStack:
    pipeline = GenerationPipeline(
        models, concurrency=concurrency, backend=backend_name(config), consistency_scorer=scorer
    )
    return GenerationStack(pipeline, JobRegistry(pipeline, max_jobs=max_jobs), tuple(hosts), peers)


def create_remote_stack(
    config: ServerConfig, settings: GenerationSettings, *, concurrency: int = 4, max_jobs: int = 256
) -> GenerationStack:
    """A Generation server without models: renders, refines and gates through its peers."""
    peers = connect(settings, config.max_message_bytes)
    return build_stack(config, peers.models, scorer=peers.scorer, peers=peers, concurrency=concurrency,
                       max_jobs=max_jobs)


def registrations(stack: GenerationStack) -> list[ServiceRegistration]:
    return [
        ServiceRegistration(
            generation_pb2_grpc.add_GenerationServicer_to_server,
            GenerationServicer(stack.pipeline, stack.jobs),
            SERVICE_NAME,
        )
    ]


async def start_stack(stack: GenerationStack, config: ServerConfig) -> RunningServer:
    """Start the stack's hosts (if any) and serve Generation; everything stops with the server."""
    await stack.start_hosts()
    try:
        running = await start_server(registrations(stack), config, shutdown_hooks=[stack.stop])
    except BaseException:
        await stack.stop()
        raise
    await report_readiness(running, stack.hosts)
    return running


async def start_remote(config: ServerConfig, settings: GenerationSettings) -> tuple[RunningServer, GenerationStack]:
    """Serve Generation over peer servers (no models here)."""
    stack = create_remote_stack(config, settings)
    return await start_stack(stack, config), stack
