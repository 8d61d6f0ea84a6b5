"""Stain variation for rendered H&E: move a render's hematoxylin/eosin levels to those of a real crop; numpy only.

Colour deconvolution (Ruifrok & Johnston) with the same H/E/DAB matrix and log floor as scikit-image's
rgb2hed/hed2rgb, so levels measured here equal the ones the benchmark's stain statistics report. A *stain bank*
holds per-crop levels measured on a renderer's real training crops (rows H background, H nuclei, E background,
E nuclei), one table per source dataset; restaining a render to a drawn row gives renders the spread of stain real
slides have, which one renderer's output otherwise lacks (measured in reports/downstream-candidates/NOTE.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Columns: hematoxylin, eosin, DAB optical densities per RGB channel (scikit-image's rgb_from_hed).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_FLOOR = np.log(1e-6)
# Hematoxylin contrast is scaled by at most this factor either way: a render whose nuclei barely differ from
# its background would otherwise be stretched into noise.
MAX_CONTRAST_SCALE = 2.0


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float64 H, E, DAB optical densities [..., 3] (scikit-image's rgb2hed)."""
    scaled = np.maximum(np.asarray(rgb, dtype=np.float64) / 255.0, 1e-6)
    return np.maximum((np.log(scaled) / _LOG_FLOOR) @ HED_FROM_RGB, 0.0)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """H, E, DAB densities [..., 3] -> uint8 RGB (scikit-image's hed2rgb, then rounded)."""
    rgb = np.clip(np.exp((np.asarray(hed, dtype=np.float64) * _LOG_FLOOR) @ RGB_FROM_HED), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


# Fields taller than this are converted in bands of rows: the float64 densities of a 4096 x 4096 field alone take
# 400 MB, several times over in temporaries, beside the render itself.
BAND_ROWS = 1024


def _bands(height: int) -> list[slice]:
    return [slice(top, min(top + BAND_ROWS, height)) for top in range(0, height, BAND_ROWS)]


def stain_levels(hed: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Mean H and E outside / inside ``nuclei`` (bool [H, W]): [H out, H in, E out, E in].

    A side with no pixels takes the other side's mean (restaining then shifts the level only)."""
    inside, outside = nuclei, ~nuclei
    levels = []
    for channel in (0, 1):
        values = hed[..., channel]
        mean_out = float(values[outside].mean()) if outside.any() else float(values[inside].mean())
        mean_in = float(values[inside].mean()) if inside.any() else mean_out
        levels += [mean_out, mean_in]
    return np.array(levels)


def _field_levels(rgb: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """stain_levels of a whole field, computed band by band for tall fields (means from per-band sums)."""
    if rgb.shape[0] <= BAND_ROWS:
        return stain_levels(rgb_to_hed(rgb), nuclei)
    sums, counts = np.zeros((2, 2)), np.zeros(2)  # [channel, outside/inside], [outside/inside]
    for band in _bands(rgb.shape[0]):
        hed, inside = rgb_to_hed(rgb[band]), nuclei[band]
        for side, mask in enumerate((~inside, inside)):
            counts[side] += mask.sum()
            sums[:, side] += [hed[..., channel][mask].sum() for channel in (0, 1)]
    levels = []
    for channel in (0, 1):
        mean_out = sums[channel, 0] / counts[0] if counts[0] else sums[channel, 1] / counts[1]
        mean_in = sums[channel, 1] / counts[1] if counts[1] else mean_out
        levels += [float(mean_out), float(mean_in)]
    return np.array(levels)


def restain(rgb: np.ndarray, nuclei: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``rgb`` (uint8 [H, W, 3]) with its H and E levels moved to ``target`` ([H out, H in, E out, E in]).

    Hematoxylin: background level and nucleus-minus-background contrast both match the target (contrast scaled
    by at most MAX_CONTRAST_SCALE either way). Eosin: level only (its nucleus/background difference is small and
    noisy). Pixels keep their texture: the map is affine per channel."""
    current = _field_levels(rgb, nuclei)
    scales = [1.0, 1.0]
    span = current[1] - current[0]
    if abs(span) > 1e-4:
        scales[0] = float(np.clip((target[1] - target[0]) / span, 1.0 / MAX_CONTRAST_SCALE, MAX_CONTRAST_SCALE))
    out = np.empty_like(rgb, dtype=np.uint8)
    for band in _bands(rgb.shape[0]):
        hed = rgb_to_hed(rgb[band])
        for channel, out_i in ((0, 0), (1, 2)):
            hed[..., channel] = scales[channel] * (hed[..., channel] - current[out_i]) + target[out_i]
        out[band] = hed_to_rgb(hed)
    return out


@dataclass(frozen=True)
class StainBank:
    """Per-crop stain levels of real training crops, one table ([N, 4]: H out, H in, E out, E in) per source
    (e.g. "monuseg", "consep": labs stain differently), and the renderer class id that is background (every other
    class is a nucleus)."""

    tables: Mapping[str, np.ndarray]
    background_class: int
    source: str

    @classmethod
    def from_metadata(cls, model_key: str, entry: Mapping[str, Any]) -> StainBank:
        try:
            raw = entry["rows"]
            tables = {str(name): np.asarray(rows, dtype=np.float64) for name, rows in dict(raw).items()}
            background = int(entry.get("background_class", 0))
            source = str(entry.get("source", ""))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"model {model_key}: metadata.stain_bank is invalid: {error!r}") from None
        for name, rows in tables.items():
            if rows.ndim != 2 or rows.shape[1] != 4 or len(rows) == 0 or not np.isfinite(rows).all():
                raise ValueError(f"model {model_key}: metadata.stain_bank.rows.{name} must be a non-empty [N, 4] "
                                 f"table of finite levels (H out, H in, E out, E in); got shape {rows.shape}")
        if not tables:
            raise ValueError(f"model {model_key}: metadata.stain_bank.rows names no source")
        return cls(tables=tables, background_class=background, source=source)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(sorted(self.tables))

    def rows(self, source: str = "") -> np.ndarray:
        """The rows of ``source``, or of every source ("" = all, in source-name order)."""
        if source:
            if source not in self.tables:
                raise KeyError(f"stain source {source!r} is not in the bank; it has {', '.join(self.sources)}")
            return self.tables[source]
        return np.concatenate([self.tables[name] for name in self.sources])

    def draw(self, seed: int, source: str = "") -> np.ndarray:
        """The row for a sample rendered with ``seed``: a pure function of (seed, source), whatever the batch."""
        rows = self.rows(source)
        return rows[np.random.default_rng([int(seed), 77]).integers(len(rows))]

    def restain(self, rgb: np.ndarray, class_map: np.ndarray, seed: int, source: str = "") -> np.ndarray:
        return restain(rgb, class_map != self.background_class, self.draw(seed, source))
