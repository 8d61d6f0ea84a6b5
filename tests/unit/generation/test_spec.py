"""Spec validation, strata allocation and per-sample seeds/targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.errors import InvalidInputError
from services.generation.spec import (
    FractionRange,
    GenerationSpec,
    StratumSpec,
    allocate_counts,
    derive_seed,
    plan_samples,
    stratum_sequence,
    validate_spec,
)
from services.diffusion.pipeline import DiffusionOptions
from tests.fixtures.generation_models import GLAND_CLASSES, IHC_CLASSES, NUCLEI_CLASSES


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.floats(0.05, 10.0), min_size=1, max_size=6), count=st.integers(1, 300))
def test_every_prefix_is_balanced(weights: list[float], count: int) -> None:
    sequence = stratum_sequence(weights, count)
    total = sum(weights)
    assigned = [0] * len(weights)
    for n, stratum in enumerate(sequence, start=1):
        assigned[stratum] += 1
        for s, weight in enumerate(weights):
            assert abs(assigned[s] - weight / total * n) < 1.0
    assert sum(allocate_counts(weights, count)) == count


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.floats(0.1, 5.0), min_size=1, max_size=5), small=st.integers(1, 50), extra=st.integers(0, 50))
def test_sequence_does_not_depend_on_count(weights: list[float], small: int, extra: int) -> None:
    assert stratum_sequence(weights, small + extra)[:small] == stratum_sequence(weights, small)


def test_equal_weights_interleave() -> None:
    assert stratum_sequence([1, 1, 1], 7) == [0, 1, 2, 0, 1, 2, 0]
    assert allocate_counts([1, 1, 1], 12) == [4, 4, 4]
    assert allocate_counts([2, 1], 9) == [6, 3]


def test_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, 5) == derive_seed(0, 5)
    seeds = {derive_seed(7, i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, 1) != derive_seed(1, 0)


def ihc_spec(count: int) -> GenerationSpec:
    return GenerationSpec(
        count=count,
        tissue="ihc",
        strata=(
            StratumSpec("<1%", positive_proportion=FractionRange(0.0, 0.0099)),
            StratumSpec(">=50%", positive_proportion=FractionRange(0.5, 1.0), nuclear_fraction=FractionRange(0.2, 0.3)),
        ),
        seed=9,
    )


def test_sample_plans_do_not_depend_on_count() -> None:
    short, long = plan_samples(ihc_spec(4), IHC_CLASSES), plan_samples(ihc_spec(40), IHC_CLASSES)
    assert short == long[:4]
    assert [p.stratum for p in short] == ["<1%", ">=50%", "<1%", ">=50%"]
    for plan in long:
        low, high = plan.targets.positive_range
        assert low <= plan.targets.positive_proportion <= high
        if plan.stratum == ">=50%":
            assert 0.2 <= plan.targets.nuclear_fraction <= 0.3


def test_parameters_leave_out_what_does_not_change_samples() -> None:
    params = ihc_spec(4).parameters()
    assert "count" not in params and "sink_uri" not in params
    assert params["strata"][1]["positive_proportion"] == [0.5, 1.0]
    assert ihc_spec(4).parameters_json() == ihc_spec(400).parameters_json()


BASE = GenerationSpec(count=4, tissue="glands", strata=(StratumSpec("a", class_fractions={"gland": 0.3}),))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"count": 0}, "spec.count: 0 is outside"),
        ({"count": 10_001}, "split larger batches"),
        ({"tissue": "bone"}, "unknown tissue 'bone'"),
        ({"height": 32}, "spec.height: 32 px"),
        ({"width": 250}, "multiple of 16"),
        ({"width": 4096}, "spec.width"),
        ({"tolerance": 0.0}, "spec.tolerance"),
        ({"noise_spacing": 1.0}, "spec.noise_spacing"),
        ({"min_consistency": 1.5}, "spec.min_consistency"),
        ({"strata": (StratumSpec("a", class_fractions={"gland": 1.2}),)}, r"class_fractions\['gland'\]: 1.2"),
        ({"strata": (StratumSpec("a", class_fractions={"gland": 0.7, "non-tissue": 0.5}),)}, "sum to 1.200"),
        ({"strata": (StratumSpec("a", class_fractions={"glands": 0.3}),)}, "unknown class 'glands'"),
        ({"strata": (StratumSpec("a", class_fraction_ranges={"gland": FractionRange(0.5, 0.2)}),)}, "min <= max"),
        ({"strata": (StratumSpec("a"), StratumSpec("a"))}, "labels must be unique"),
        ({"strata": (StratumSpec("a", weight=-1),)}, "weight: -1"),
        ({"strata": (StratumSpec("a", positive_proportion=FractionRange(0, 0.1)),)}, "only valid for tissue 'ihc'"),
        ({"coarse_masks": np.zeros((2, 64, 64), np.uint8)}, "coarse_masks: expected uint8"),
        ({"coarse_masks": np.full((1, 256, 256), 5, np.uint8)}, "class id 5"),
        ({"model_versions": {"renderer-he-glands": "latest"}}, "positive integer string"),
    ],
)
def test_bad_specs_are_refused_with_actionable_messages(changes: dict, message: str) -> None:
    spec = dataclasses.replace(BASE, **changes)
    with pytest.raises(InvalidInputError, match=message):
        validate_spec(spec, GLAND_CLASSES)


def test_ihc_proportion_and_class_fractions_exclude_each_other() -> None:
    spec = GenerationSpec(
        count=1, tissue="ihc",
        strata=(StratumSpec("x", class_fractions={IHC_CLASSES[1]: 0.2}, positive_proportion=FractionRange(0, 1)),),
    )
    with pytest.raises(InvalidInputError, match="nuclear_fraction instead"):
        validate_spec(spec, IHC_CLASSES)
    nuclei = GenerationSpec(count=1, tissue="nuclei", strata=(StratumSpec("x", nuclear_fraction=FractionRange(0.1, 0.9)),))
    with pytest.raises(InvalidInputError, match="above 0.6"):
        validate_spec(nuclei, NUCLEI_CLASSES)


_DIFFUSION_SPEC = GenerationSpec(count=2, tissue="nuclei-diffusion", height=64, width=64,
                                 strata=(StratumSpec("epi", nuclei_types=("epithelial",)),))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dataclasses.replace(_DIFFUSION_SPEC, strata=(StratumSpec("x", class_fractions={"epithelial": 0.2}),)),
         "choose nucleus types with nuclei_types"),
        (dataclasses.replace(_DIFFUSION_SPEC, strata=(StratumSpec("x", nuclei_types=("spindle", "spindle")),)),
         "repeats a type"),
        (GenerationSpec(count=1, tissue="nuclei", strata=(StratumSpec("x", nuclei_types=("spindle",)),)),
         "only for tissues"),
        (GenerationSpec(count=1, tissue="nuclei", diffusion=DiffusionOptions(steps=10)), "uses no diffusion model"),
        (dataclasses.replace(_DIFFUSION_SPEC, diffusion=DiffusionOptions(steps=2000)), "1..1000"),
        (dataclasses.replace(_DIFFUSION_SPEC, diffusion=DiffusionOptions(scheduler="euler")), "unknown"),
        (dataclasses.replace(_DIFFUSION_SPEC, diffusion=DiffusionOptions(guidance_scale=-1.0)), r"\[0, 30\]"),
        (dataclasses.replace(_DIFFUSION_SPEC, noise_spacing=15.0), "noise_spacing, refine and stain_variation do not"),
        (dataclasses.replace(_DIFFUSION_SPEC, stain_variation=True), "noise_spacing, refine and stain_variation do not"),
    ],
)
def test_diffusion_tissue_specs_are_checked(spec: GenerationSpec, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        validate_spec(spec, None)


def test_diffusion_sampling_is_recorded_only_for_diffusion_tissues() -> None:
    validate_spec(_DIFFUSION_SPEC, None)
    sampled = dataclasses.replace(_DIFFUSION_SPEC, diffusion=DiffusionOptions(steps=12, scheduler="ddim"))
    assert sampled.parameters()["diffusion"] == {"steps": 12, "scheduler": "ddim", "guidance_scale": None}
    assert sampled.parameters()["strata"][0]["nuclei_types"] == ["epithelial"]
    # Procedural tissues keep the records they had before diffusion existed.
    assert "diffusion" not in GenerationSpec(count=1, tissue="nuclei").parameters()
