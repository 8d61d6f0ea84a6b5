"""services.mask_rendering.tiling: tile plans cover fields exactly and blend to a partition of unity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.mask_rendering.tiling import TileBlender, TilePlan, ramp, tile_starts, window_1d


def test_tile_starts_regular_stride_and_flush_last_tile() -> None:
    assert tile_starts(256, 256, 64) == [0]
    assert tile_starts(100, 256, 64) == [0]
    assert tile_starts(512, 256, 64) == [0, 192, 256]
    assert tile_starts(640, 256, 64) == [0, 192, 384]


@pytest.mark.parametrize("tile, overlap", [(0, 0), (8, 8), (8, -1)])
def test_bad_tile_or_overlap(tile: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        tile_starts(100, tile, overlap)


def test_ramp_pairs_sum_to_one_and_stay_positive() -> None:
    for length in (1, 2, 7, 64):
        weights = ramp(length)
        assert np.all(weights > 0) and np.all(weights <= 1)
        np.testing.assert_allclose(weights + weights[::-1], 1.0)
        assert np.all(np.diff(weights) > 0)


def test_window_ramps_only_on_overlapped_sides() -> None:
    window = window_1d(16, 4, ramp_start=False, ramp_end=True)
    assert np.all(window[:12] == 1.0)
    assert np.all(window[12:] < 1.0)


@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    tile=st.integers(8, 128),
    overlap_fraction=st.floats(0.0, 0.49),
)
def test_tiles_cover_every_pixel_and_blend_constant_fields_exactly(
    height: int, width: int, tile: int, overlap_fraction: float
) -> None:
    overlap = int(tile * overlap_fraction)
    plan = TilePlan(height, width, tile, overlap)
    blender = TileBlender(2, height, width)
    tiles = list(plan.tiles())
    assert len(tiles) == len(plan)
    for tile_ in tiles:
        assert tile_.top + tile_.height <= height and tile_.left + tile_.width <= width
        blender.add(tile_, np.full((2, tile_.height, tile_.width), 3.5, np.float32))
    # Normalised weights: a field every tile agrees on comes back unchanged.
    np.testing.assert_allclose(blender.result(), 3.5, rtol=1e-6)


def test_small_field_needs_no_tiling_and_round_trips_exactly() -> None:
    plan = TilePlan(40, 30, 64, 16)
    assert not plan.needs_tiling and len(plan) == 1
    (tile,) = plan.tiles()
    assert (tile.height, tile.width) == (40, 30)
    assert np.all(tile.weights == 1.0)
    values = np.random.default_rng(0).standard_normal((3, 40, 30)).astype(np.float32)
    blender = TileBlender(3, 40, 30)
    blender.add(tile, values)
    np.testing.assert_array_equal(blender.result(), values)


def test_blend_of_tiles_cut_from_one_image_reproduces_it() -> None:
    image = np.random.default_rng(1).standard_normal((3, 100, 130))
    plan = TilePlan(100, 130, 32, 8)
    blender = TileBlender(3, 100, 130)
    for tile in plan.tiles():
        blender.add(tile, image[(slice(None), *tile.slices)])
    np.testing.assert_allclose(blender.result(), image, rtol=1e-5, atol=1e-6)


def test_tile_output_of_wrong_size_is_refused() -> None:
    plan = TilePlan(64, 64, 32, 8)
    tile = next(plan.tiles())
    with pytest.raises(ValueError, match="spatial shape"):
        TileBlender(3, 64, 64).add(tile, np.zeros((3, 16, 16)))
