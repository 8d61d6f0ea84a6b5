"""Overlapping tiles for fields larger than a renderer was trained on, blended without seams.

A renderer trained on 256 x 256 crops is run on a large field tile by tile. Neighbouring
tiles overlap, and in the overlap each output pixel is a weighted mean of the tiles that
cover it. The weights follow a raised cosine that rises from near 0 at a tile's edge to 1
over ``overlap`` pixels, so (a) the pixels nearest a tile border, where zero/reflect
padding inside the network makes outputs least reliable, count least, and (b) the
transition from one tile to the next is smooth instead of a hard cut. Sides that lie on
the field's own border get no ramp (weight 1), because no other tile covers them.
Weights are normalised by their per-pixel sum, so any overlap >= the ramp length blends
correctly (the last tile in a row is shifted back to end at the field border and may
overlap its neighbour by more than ``overlap``).

Everything here is numpy only and independent of models: the pipeline cuts inputs with
:meth:`TilePlan.tiles`, runs them, and accumulates outputs with :class:`TileBlender`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride ``tile - overlap``, the last tile flush with the end.

    A length that fits in one tile gives ``[0]`` (the tile is then ``length`` long).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} for tile={tile}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def ramp(length: int) -> np.ndarray:
    """Raised-cosine ramp of ``length`` strictly positive weights rising towards 1.

    ``ramp(n)[i] + ramp(n)[n - 1 - i] == 1``, so a rising and a falling ramp over the
    same ``n`` pixels sum to exactly 1 (partition of unity for an overlap of ``n``).
    """
    positions = (np.arange(length, dtype=np.float64) + 0.5) / length
    return 0.5 - 0.5 * np.cos(np.pi * positions)


def window_1d(size: int, ramp_length: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """Weights along one tile axis: 1 in the middle, raised-cosine ramps at the overlapped ends."""
    weights = np.ones(size, dtype=np.float64)
    ramp_length = min(ramp_length, size // 2)
    if ramp_length > 0:
        rising = ramp(ramp_length)
        if ramp_start:
            weights[:ramp_length] = rising
        if ramp_end:
            weights[size - ramp_length:] = rising[::-1]
    return weights


@dataclass(frozen=True)
class Tile:
    """One tile: rows ``top:top+height`` and columns ``left:left+width`` of the field."""

    top: int
    left: int
    height: int
    width: int
    weights: np.ndarray  # float64 [height, width] blending window

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class TilePlan:
    """How a ``height x width`` field is cut into tiles of at most ``tile x tile``."""

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"field must be at least 1 x 1, got {self.height} x {self.width}")
        tile_starts(self.height, self.tile, self.overlap)  # validates tile/overlap

    @property
    def needs_tiling(self) -> bool:
        """False when the whole field fits in one tile: the pipeline then renders it in one piece."""
        return self.height > self.tile or self.width > self.tile

    @property
    def tile_height(self) -> int:
        return min(self.tile, self.height)

    @property
    def tile_width(self) -> int:
        return min(self.tile, self.width)

    def tiles(self) -> Iterator[Tile]:
        rows = tile_starts(self.height, self.tile, self.overlap)
        cols = tile_starts(self.width, self.tile, self.overlap)
        tile_h, tile_w = self.tile_height, self.tile_width
        for row_index, top in enumerate(rows):
            vertical = window_1d(tile_h, self.overlap, row_index > 0, row_index < len(rows) - 1)
            for col_index, left in enumerate(cols):
                horizontal = window_1d(tile_w, self.overlap, col_index > 0, col_index < len(cols) - 1)
                yield Tile(top, left, tile_h, tile_w, np.outer(vertical, horizontal))

    def __len__(self) -> int:
        return len(tile_starts(self.height, self.tile, self.overlap)) * len(
            tile_starts(self.width, self.tile, self.overlap)
        )


class TileBlender:
    """Accumulates weighted tile outputs ``[C, h, w]`` into one ``[C, H, W]`` field."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        self._sum = np.zeros((channels, height, width), dtype=np.float64)
        self._weight = np.zeros((height, width), dtype=np.float64)

    def add(self, tile: Tile, output: np.ndarray) -> None:
        if output.shape[1:] != (tile.height, tile.width):
            raise ValueError(
                f"tile output has spatial shape {output.shape[1:]}, expected {(tile.height, tile.width)}"
            )
        rows, cols = tile.slices
        self._sum[:, rows, cols] += output * tile.weights
        self._weight[rows, cols] += tile.weights

    def result(self) -> np.ndarray:
        """float32 ``[C, H, W]``: the weighted mean of every tile covering each pixel."""
        if not np.all(self._weight > 0):
            raise ValueError("some pixels are covered by no tile; the tile plan does not cover the field")
        return (self._sum / self._weight).astype(np.float32)
