"""Procedural layouts hit their requested class fractions within tolerance, deterministically."""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.errors import InvalidInputError
from services.generation.layouts import (
    LayoutTargets,
    generate_layout,
    layout_from_class_map,
)
from services.scoring.segmentation import tps_bin, tumor_proportion_score
from tests.fixtures.generation_models import GLAND_CLASSES, IHC_CLASSES, NUCLEI_CLASSES

SIZE = 128
FAST = settings(max_examples=25, deadline=None)


@FAST
@given(seed=st.integers(0, 2**63 - 1), gland=st.floats(0.0, 0.9))
def test_glands_hit_fraction(seed: int, gland: float) -> None:
    layout = generate_layout("glands", GLAND_CLASSES, SIZE, SIZE, LayoutTargets({"gland": gland}, 0.01), seed)
    assert abs(layout.achieved_fractions["gland"] - gland) <= 0.01
    assert layout.achieved_fractions["non-tissue"] == 0.0  # untargeted region classes stay empty
    assert layout.class_map.dtype == np.uint8 and layout.class_map.shape == (SIZE, SIZE)
    # Gland instances are the connected gland regions.
    assert layout.instances is not None
    np.testing.assert_array_equal(layout.instances > 0, layout.class_map == 2)


@FAST
@given(seed=st.integers(0, 2**32), gland=st.floats(0.05, 0.5), air=st.floats(0.0, 0.4))
def test_glands_with_non_tissue_and_stroma(seed: int, gland: float, air: float) -> None:
    names = ("background", "gland", "non-tissue")  # roles come from names, not positions
    layout = generate_layout("glands", names, SIZE, SIZE, LayoutTargets({"gland": gland, "non-tissue": air}, 0.01), seed)
    assert abs(layout.achieved_fractions["gland"] - gland) <= 0.01
    assert abs(layout.achieved_fractions["non-tissue"] - air) <= 0.01
    assert abs(sum(layout.achieved_fractions.values()) - 1.0) < 1e-9


@FAST
@given(
    seed=st.integers(0, 2**32),
    mix=st.lists(st.floats(0.0, 0.09), min_size=4, max_size=4),
)
def test_nuclei_hit_type_fractions(seed: int, mix: list[float]) -> None:
    wanted = dict(zip(NUCLEI_CLASSES[1:], mix))
    layout = generate_layout("nuclei", NUCLEI_CLASSES, SIZE, SIZE, LayoutTargets(wanted, 0.01), seed)
    for name, target in wanted.items():
        assert abs(layout.achieved_fractions[name] - target) <= 0.01, name
    # Every nucleus is one instance of exactly one type.
    instances, classes = layout.instances, layout.class_map
    assert instances is not None and instances.dtype == np.uint16
    np.testing.assert_array_equal(instances > 0, classes > 0)
    for instance_id in np.unique(instances)[1:]:
        assert np.unique(classes[instances == instance_id]).size == 1


@pytest.mark.parametrize("bin_range", [(0.0, 0.0099), (0.01, 0.49), (0.5, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ihc_positive_proportion_lands_in_its_bin(bin_range: tuple[float, float], seed: int) -> None:
    target = sum(bin_range) / 2
    layout = generate_layout(
        "ihc", IHC_CLASSES, 256, 256,
        LayoutTargets({}, 0.02, positive_proportion=target, positive_range=bin_range, nuclear_fraction=0.25), seed,
    )
    low, high = bin_range
    assert layout.positive_proportion is not None and low <= layout.positive_proportion <= high
    nuclear = layout.achieved_fractions[IHC_CLASSES[1]] + layout.achieved_fractions[IHC_CLASSES[2]]
    assert abs(nuclear - 0.25) <= 0.02
    # The scoring service counts the same TPS from the layout's cells, and bins it as requested.
    tps = tumor_proportion_score(layout.class_map, 2, 1, layout.instances)
    assert tps == pytest.approx(layout.positive_proportion)
    expected_bin = {0.0: "<1%", 0.01: "1-49%", 0.5: ">=50%"}[low]
    assert tps_bin(tps) == expected_bin
    assert layout.achieved_fractions["cell_boundary"] > 0  # nuclei are ringed like DeepLIIF's


def test_layouts_are_deterministic_per_seed() -> None:
    targets = LayoutTargets({"epithelial": 0.1, "inflammatory": 0.05}, 0.01)
    first = generate_layout("nuclei", NUCLEI_CLASSES, SIZE, SIZE, targets, 42)
    again = generate_layout("nuclei", NUCLEI_CLASSES, SIZE, SIZE, targets, 42)
    other = generate_layout("nuclei", NUCLEI_CLASSES, SIZE, SIZE, targets, 43)
    assert first.class_map.tobytes() == again.class_map.tobytes()
    assert first.instances is not None and again.instances is not None
    assert first.instances.tobytes() == again.instances.tobytes()
    assert first.class_map.tobytes() != other.class_map.tobytes()


@pytest.mark.parametrize(
    ("tissue", "names", "targets", "message"),
    [
        ("glands", GLAND_CLASSES, {"gland": 0.7, "stroma": 0.6}, "sum to"),
        ("glands", GLAND_CLASSES, {"glnd": 0.3}, "unknown class name"),
        ("nuclei", NUCLEI_CLASSES, {"epithelial": 0.5, "spindle": 0.3}, "at most 0.7"),
        ("ihc", ("background", "nucleus"), {}, "negative"),
        ("weird", GLAND_CLASSES, {}, "valid: ['glands', 'ihc', 'nuclei']"),
    ],
)
def test_impossible_requests_say_why(tissue: str, names: tuple[str, ...], targets: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        generate_layout(tissue, names, SIZE, SIZE, LayoutTargets(targets, 0.01), 0)


def test_client_mask_is_used_as_given() -> None:
    class_map = np.zeros((32, 32), np.uint8)
    class_map[2:6, 2:6] = 2
    class_map[10:14, 10:14] = 2
    class_map[20:25, 3:9] = 1
    layout = layout_from_class_map("ihc", class_map, IHC_CLASSES)
    np.testing.assert_array_equal(layout.class_map, class_map)
    assert layout.instances is not None and int(layout.instances.max()) == 3
    assert layout.positive_proportion == pytest.approx(2 / 3)
    with pytest.raises(InvalidInputError, match="class id 7"):
        layout_from_class_map("ihc", np.full((8, 8), 7, np.uint8), IHC_CLASSES)


def test_glands_have_non_tissue_lumens_like_the_renderer_rule() -> None:
    # renderer-he-glands labels gland lumens non-tissue (grayscale >= 204 wins over gland).
    targets = LayoutTargets({"gland": 0.35, "non-tissue": 0.15}, 0.01)
    layout = generate_layout("glands", GLAND_CLASSES, 256, 256, targets, 4)
    gland, non_tissue = layout.class_map == 2, layout.class_map == 0
    lumens = scipy.ndimage.binary_fill_holes(gland) & non_tissue
    assert lumens.sum() > 0.02 * gland.sum()
    assert abs(non_tissue.mean() - 0.15) <= 0.01 and abs(gland.mean() - 0.35) <= 0.01
    coarse = generate_layout("glands", GLAND_CLASSES, 256, 256, targets, 4, coarse=True)
    assert abs((coarse.class_map == 0).mean() - 0.15) <= 0.01
