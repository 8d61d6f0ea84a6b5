"""In-memory job registry: background jobs (SubmitJob) and streamed jobs (Generate) in one place.

Every job, streamed or not, gets an id, a state and live counters, so GetJob and
CancelJob work for both. The registry is bounded: when it is full, the oldest finished
jobs are forgotten; when every slot holds an unfinished job, new work is refused with
RESOURCE_EXHAUSTED (back off, or cancel something). Cancelling a job cancels its
asyncio task, which cancels its samples in flight (their batcher requests included).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field

from services.core.errors import HistosynthError, clip
from services.generation.pipeline import GeneratedSample, GenerationPipeline, JobCounters, PreparedJob
from services.generation.sink import SampleWriter, sink_path

_log = logging.getLogger(__name__)


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobNotFoundError(HistosynthError):
    default_status = "NOT_FOUND"
    reason = "job_not_found"


class JobCancelledError(HistosynthError):
    default_status = "CANCELLED"
    reason = "cancelled"


class TooManyJobsError(HistosynthError):
    default_status = "RESOURCE_EXHAUSTED"
    reason = "too_many_jobs"


@dataclass
class JobRecord:
    job_id: str
    total: int
    sink_uri: str = ""
    state: JobState = JobState.QUEUED
    counters: JobCounters = field(default_factory=JobCounters)
    error: str = ""
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    task: asyncio.Task | None = None  # background jobs only; streamed jobs run in their RPC
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, state: JobState, error: str = "") -> None:
        if not self.state.finished:
            self.state = state
            self.error = error
            self.finished_at = time.time()


class JobRegistry:
    """Tracks at most ``max_jobs`` jobs; runs background jobs on ``pipeline``."""

    def __init__(self, pipeline: GenerationPipeline, max_jobs: int = 256) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        self.pipeline = pipeline
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, JobRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def _register(self, prepared: PreparedJob, total: int) -> JobRecord:
        if len(self._jobs) >= self.max_jobs:
            for job_id in [j for j, r in self._jobs.items() if r.state.finished]:
                del self._jobs[job_id]
                if len(self._jobs) < self.max_jobs:
                    break
        if len(self._jobs) >= self.max_jobs:
            raise TooManyJobsError(
                f"{len(self._jobs)} jobs are queued or running (limit {self.max_jobs}); "
                "wait for some to finish or cancel one, then retry"
            )
        record = JobRecord(job_id=uuid.uuid4().hex, total=total, sink_uri=prepared.spec.sink_uri)
        self._jobs[record.job_id] = record
        return record

    def get(self, job_id: str) -> JobRecord:
        record = self._jobs.get(job_id)
        if record is None:
            raise JobNotFoundError(
                f"job {clip(job_id)} is unknown: it never existed here or was forgotten after finishing "
                f"(this server keeps the last {self.max_jobs} jobs, in memory only)"
            )
        return record

    async def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if not record.state.finished:
            record.finish(JobState.CANCELLED, "cancelled by CancelJob")
            record.cancel_requested.set()
            if record.task is not None and record.task is not asyncio.current_task():
                record.task.cancel()
                await asyncio.gather(record.task, return_exceptions=True)
        return record

    def submit(self, prepared: PreparedJob, indices: Collection[int] | None = None) -> JobRecord:
        """Start ``prepared`` in the background; samples go to its sink (if any) only."""
        record = self._register(prepared, len(prepared.plans) if indices is None else len(indices))

        async def drain() -> None:
            try:
                async for _ in self.stream(prepared, record, indices=indices):
                    pass
            except Exception:  # noqa: BLE001 - stream() logged it and the record holds it for GetJob
                pass

        record.task = asyncio.get_running_loop().create_task(drain(), name=f"job-{record.job_id}")
        return record

    def open_stream(self, prepared: PreparedJob, indices: Collection[int] | None = None) -> JobRecord:
        """Register a job streamed by the caller; CancelJob ends its stream with JobCancelledError."""
        return self._register(prepared, len(prepared.plans) if indices is None else len(indices))

    async def stream(
        self,
        prepared: PreparedJob,
        record: JobRecord,
        *,
        indices: Collection[int] | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[GeneratedSample]:
        """Run the job, write its sink, keep ``record`` current; yields every sample."""
        samples = None
        try:
            # Inside the try: a sink that cannot be created (name too long, disk full, permissions) must
            # fail the job, never leave it QUEUED forever holding one of the registry's slots.
            writer = None
            if prepared.spec.sink_uri:
                writer = await asyncio.to_thread(SampleWriter, sink_path(prepared.spec.sink_uri))
            record.state = JobState.RUNNING
            samples = self.pipeline.run(prepared, indices=indices, deadline=deadline, counters=record.counters)
            async for sample in _until(record.cancel_requested, samples):
                if writer is not None:
                    await _write_through_cancel(writer, sample, record)
                record.counters.completed += 1
                yield sample
            record.finish(JobState.SUCCEEDED)
        except (asyncio.CancelledError, JobCancelledError):
            record.finish(JobState.CANCELLED, "cancelled (client disconnected, deadline passed or CancelJob)")
            raise
        except GeneratorExit:
            record.finish(JobState.CANCELLED, "stream closed by the consumer")
            raise
        except HistosynthError as error:
            record.finish(JobState.FAILED, error.message)
            raise
        except OSError as error:
            _log.exception("job %s failed", record.job_id)
            record.finish(JobState.FAILED, f"the sink could not be written ({error.strerror or type(error).__name__})")
            raise
        except Exception as error:
            _log.exception("job %s failed", record.job_id)
            record.finish(JobState.FAILED, f"internal error ({type(error).__name__}); see the server log for job {record.job_id}")
            raise
        except BaseException:
            record.finish(JobState.CANCELLED, "stopped")
            raise
        finally:
            if samples is not None:
                await samples.aclose()

    async def close(self) -> None:
        """Cancel every unfinished job (server shutdown)."""
        tasks = []
        for record in self._jobs.values():
            if not record.state.finished and record.task is not None:
                record.finish(JobState.CANCELLED, "server shutting down")
                record.task.cancel()
                tasks.append(record.task)
        await asyncio.gather(*tasks, return_exceptions=True)


async def _write_through_cancel(writer: SampleWriter, sample: GeneratedSample, record: JobRecord) -> None:
    """Write one sample in a thread; a cancel arriving mid-write waits for the write to end,
    counts the sample when its files are complete, then propagates — so ``completed``
    always equals the number of finished samples in the sink."""
    write = asyncio.ensure_future(asyncio.to_thread(write_sample, writer, sample))
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        await asyncio.gather(write, return_exceptions=True)
        if not write.cancelled() and write.exception() is None:
            record.counters.completed += 1
        raise


async def _until(stop: asyncio.Event, samples: AsyncIterator[GeneratedSample]) -> AsyncIterator[GeneratedSample]:
    """Yields from ``samples`` until ``stop`` is set, then raises JobCancelledError at once.

    Waiting for the next sample and for ``stop`` race, so a CancelJob does not wait for the
    sample in flight; cancelling that wait cancels the pipeline's samples in flight.
    """
    iterator = aiter(samples)
    stopped = asyncio.ensure_future(stop.wait())
    following: asyncio.Future | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if following not in done:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
                raise JobCancelledError("job cancelled by CancelJob; samples already streamed stay valid")
            try:
                sample = following.result()
            except StopAsyncIteration:
                return
            yield sample
    finally:
        stopped.cancel()
        # Cancelled while waiting (client gone, deadline): end the pending anext() before the caller
        # closes ``samples``, else aclose() finds the generator still running.
        if following is not None and not following.done():
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)


def sample_record(sample: GeneratedSample) -> dict:
    """The JSON body of a sample's metadata file."""
    return {
        "index": sample.index,
        "stratum": sample.stratum,
        "class_names": list(sample.class_names),
        "scores": dict(sorted(sample.scores.items())),
        "provenance": sample.provenance.to_dict(),
    }


def write_sample(writer: SampleWriter, sample: GeneratedSample) -> None:
    writer.write(sample.index, sample.image_png(), sample.class_map, sample.instances, sample_record(sample))

