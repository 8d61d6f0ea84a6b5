"""GenerationPipeline over real ONNX Runtime models (no gRPC): determinism, scores, provenance, gates."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from services.core.config import ServerConfig
from services.core.errors import HistosynthError, InvalidInputError
from services.generation.jobs import JobNotFoundError, JobRegistry, JobState, TooManyJobsError, sample_record
from services.generation.pipeline import GATE_ATTEMPTS, GeneratedSample, GenerationPipeline, JobCounters
from services.all_in_one import create_stack
from services.generation.servicer import GenerationStack
from services.generation.spec import FractionRange, GenerationSpec, StratumSpec
from tests.fixtures.generation_models import write_generation_store

pytestmark = pytest.mark.asyncio(loop_scope="module")

GLANDS = GenerationSpec(
    count=6,
    tissue="glands",
    height=64,
    width=64,
    seed=5,
    strata=(
        StratumSpec("sparse", class_fraction_ranges={"gland": FractionRange(0.1, 0.3)}),
        StratumSpec("dense", class_fraction_ranges={"gland": FractionRange(0.5, 0.7)}),
    ),
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generation_store(tmp_path_factory.mktemp("generation") / "model_store")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(store: Path) -> AsyncIterator[GenerationStack]:
    config = ServerConfig(model_store=store, port=0, metrics_port=None, max_queue_delay_ms=2.0, log_format="text")
    built = create_stack(config)
    await built.start_hosts()
    yield built
    await built.stop()


def fingerprint(sample: GeneratedSample) -> tuple[bytes, bytes, bytes, str]:
    instances = b"" if sample.instances is None else sample.instances.tobytes()
    return sample.image_png(), sample.class_map.tobytes(), instances, json.dumps(sample_record(sample), sort_keys=True)


async def collect(pipeline: GenerationPipeline, spec: GenerationSpec, **kwargs: object) -> list[GeneratedSample]:
    job = await pipeline.prepare(spec)
    return [sample async for sample in pipeline.run(job, **kwargs)]


async def test_same_spec_same_bytes_whatever_the_batching(stack: GenerationStack) -> None:
    serial = GenerationPipeline(stack.pipeline._models, concurrency=1, backend="onnxruntime:cpu")
    wide = GenerationPipeline(stack.pipeline._models, concurrency=6, backend="onnxruntime:cpu")
    first = await collect(serial, GLANDS)
    second = await collect(wide, GLANDS)
    assert [s.index for s in first] == list(range(6))
    assert [fingerprint(s) for s in first] == [fingerprint(s) for s in second]
    # A subset, or a bigger job, reproduces the same samples byte for byte.
    subset = await collect(wide, GLANDS, indices=[1, 4])
    assert [fingerprint(s) for s in subset] == [fingerprint(first[1]), fingerprint(first[4])]
    bigger = await collect(wide, dataclasses.replace(GLANDS, count=9))
    assert [fingerprint(s) for s in bigger[:6]] == [fingerprint(s) for s in first]
    # Another seed changes the samples.
    reseeded = await collect(wide, dataclasses.replace(GLANDS, seed=6))
    assert fingerprint(reseeded[0]) != fingerprint(first[0])


async def test_scores_and_provenance(stack: GenerationStack) -> None:
    samples = await collect(stack.pipeline, GLANDS)
    for sample in samples:
        gland = sample.scores["fraction/gland"]
        assert abs(gland - sample.scores["target/gland"]) <= GLANDS.tolerance
        assert (0.1 <= gland <= 0.3 + 0.02) if sample.stratum == "sparse" else (0.5 - 0.02 <= gland <= 0.7)
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        provenance = sample.provenance
        assert [m.name for m in provenance.models] == ["renderer-he-glands"]
        assert len(provenance.models[0].sha256) == 64
        assert provenance.code_version and provenance.backend == "onnxruntime:cpu"
        parameters = json.loads(provenance.parameters_json)
        assert parameters["tissue"] == "glands" and parameters["sample"]["index"] == sample.index
    assert [s.stratum for s in samples] == ["sparse", "dense"] * 3


async def test_ihc_bins_are_scored(stack: GenerationStack) -> None:
    spec = GenerationSpec(
        count=3, tissue="ihc", height=128, width=128, seed=1,
        strata=tuple(
            StratumSpec(label, positive_proportion=FractionRange(low, high))
            for label, low, high in (("<1%", 0.0, 0.0099), ("1-49%", 0.01, 0.49), (">=50%", 0.5, 1.0))
        ),
    )
    samples = await collect(stack.pipeline, spec)
    assert [s.scores["tps_bin"] for s in samples] == [0.0, 1.0, 2.0]


async def test_nuclei_refine_and_client_masks(stack: GenerationStack) -> None:
    nuclei = await collect(stack.pipeline, GenerationSpec(count=2, tissue="nuclei", height=64, width=64))
    assert all(s.instances is not None and s.instances.max() > 0 for s in nuclei)
    refined = await collect(stack.pipeline, dataclasses.replace(GLANDS, count=2, refine=True))
    assert [m.name for m in refined[0].provenance.models] == ["renderer-he-glands", "mask-refiner"]
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[0, 10:30, 10:30] = 1
    masks[1, 40:60, 5:50] = 1
    given = await collect(stack.pipeline, dataclasses.replace(GLANDS, count=3, strata=(), coarse_masks=masks))
    np.testing.assert_array_equal(given[0].class_map, masks[0])
    np.testing.assert_array_equal(given[2].class_map, masks[0])  # round-robin over the masks


async def test_edge_refusals(stack: GenerationStack) -> None:
    no_gate = GenerationPipeline(stack.pipeline._models)
    with pytest.raises(HistosynthError, match="quality gate is not available") as caught:
        await no_gate.prepare(dataclasses.replace(GLANDS, min_consistency=0.5))
    assert caught.value.status == "FAILED_PRECONDITION"
    with pytest.raises(InvalidInputError, match="has no non-tissue class"):
        await stack.pipeline.prepare(dataclasses.replace(GLANDS, tissue="nuclei", strata=(), refine=True))
    with pytest.raises(InvalidInputError, match="scheme 's3'"):
        await stack.pipeline.prepare(dataclasses.replace(GLANDS, sink_uri="s3://bucket/x"))
    with pytest.raises(InvalidInputError, match="not used by tissue"):
        await stack.pipeline.prepare(dataclasses.replace(GLANDS, model_versions={"renderer-ihc": "1"}))
    with pytest.raises(HistosynthError, match="not loaded") as missing:
        await stack.pipeline.prepare(dataclasses.replace(GLANDS, model_versions={"renderer-he-glands": "9"}))
    assert missing.value.status == "NOT_FOUND"


async def test_quality_gate_rejects_and_retries(stack: GenerationStack) -> None:
    strict = dataclasses.replace(GLANDS, count=2, min_consistency=1.0)  # a random renderer never reaches 1.0
    job = await stack.pipeline.prepare(strict)
    counters = JobCounters()
    assert [s async for s in stack.pipeline.run(job, counters=counters)] == []
    assert counters.rejected == 2 * GATE_ATTEMPTS
    lenient = dataclasses.replace(GLANDS, count=2, min_consistency=1e-9)
    job = await stack.pipeline.prepare(lenient)
    passed = [s async for s in stack.pipeline.run(job)]
    assert passed
    for sample in passed:
        assert 0.0 < sample.scores["consistency"] <= 1.0
    # No segmenter checks the nuclei renderer: the gate is refused up front.
    with pytest.raises(HistosynthError, match="no segmenter") as caught:
        await stack.pipeline.prepare(GenerationSpec(count=1, tissue="nuclei", min_consistency=0.5))
    assert caught.value.status == "FAILED_PRECONDITION"


async def test_job_registry_is_bounded(stack: GenerationStack, tmp_path: Path) -> None:
    registry = JobRegistry(stack.pipeline, max_jobs=2)
    small = await stack.pipeline.prepare(dataclasses.replace(GLANDS, count=1, sink_uri=str(tmp_path / "a")))
    first = registry.submit(small)
    await first.task
    assert first.state is JobState.SUCCEEDED and first.counters.completed == 1
    big = await stack.pipeline.prepare(dataclasses.replace(GLANDS, count=500, sink_uri=str(tmp_path / "b")))
    running = [registry.submit(big), registry.submit(big)]  # the finished job is forgotten to make room
    with pytest.raises(JobNotFoundError, match="keeps the last 2 jobs"):
        registry.get(first.job_id)
    with pytest.raises(TooManyJobsError, match="limit 2") as full:
        registry.submit(big)
    assert full.value.status == "RESOURCE_EXHAUSTED"
    for record in running:
        assert (await registry.cancel(record.job_id)).state is JobState.CANCELLED
    await registry.close()


async def test_stain_variation_restains_nuclei_samples_and_is_recorded(stack: GenerationStack) -> None:
    plain_spec = GenerationSpec(count=2, tissue="nuclei", height=64, width=64, seed=4)
    stained_spec = dataclasses.replace(plain_spec, stain_variation=True, stain_source="dark")
    plain, stained = await collect(stack.pipeline, plain_spec), await collect(stack.pipeline, stained_spec)
    again = await collect(stack.pipeline, stained_spec)
    assert [fingerprint(s) for s in stained] == [fingerprint(s) for s in again]
    for before, after in zip(plain, stained):
        np.testing.assert_array_equal(before.class_map, after.class_map)  # same layout, only the stain moved
        assert not np.array_equal(before.image, after.image)
        parameters = json.loads(after.provenance.parameters_json)
        assert (parameters["stain_variation"], parameters["stain_source"]) == (True, "dark")
        assert "stain_variation" not in json.loads(before.provenance.parameters_json)  # old records unchanged
    with pytest.raises(InvalidInputError, match="stain_source 'dark' is set but spec.stain_variation is not"):
        await stack.pipeline.prepare(dataclasses.replace(plain_spec, stain_source="dark"))
    with pytest.raises(InvalidInputError, match="renderer renderer-he-glands/1 has no stain bank"):
        await stack.pipeline.prepare(dataclasses.replace(GLANDS, count=1, stain_variation=True))
    with pytest.raises(InvalidInputError, match="'lab9' is not in renderer-he-nuclei/1's stain bank; it has dark, pale"):
        await stack.pipeline.prepare(dataclasses.replace(stained_spec, stain_source="lab9"))
