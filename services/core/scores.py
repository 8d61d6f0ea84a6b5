"""Score definitions two services share: the tumour proportion score (TPS) and its clinical bins.

Scoring reports them (TumorProportion, ScoreSegmentation) and generation scores its samples and
balances its strata with exactly the same definition, so both import them from here.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.core.errors import InvalidInputError


class ScoringInputError(InvalidInputError, ValueError):
    """Arrays handed to a scoring function have the wrong shape, dtype, range or size.

    Both an ``InvalidInputError`` (INVALID_ARGUMENT at the servicer) and a ``ValueError`` (numeric
    callers such as notebooks and the data-lake job catch it the ordinary Python way).
    """

    reason = "invalid_scoring_input"


TPS_BINS: Final = ("<1%", "1-49%", ">=50%")
TPS_LOW_CUTOFF: Final = 0.01
TPS_HIGH_CUTOFF: Final = 0.50


def tumor_proportion_score(
    class_map: ArrayLike,
    positive_id: int,
    negative_id: int,
    instance_map: ArrayLike | None = None,
    empty_value: float = 0.0,
) -> float:
    """PD-L1 tumour proportion score: positive tumour cells / all tumour cells, in [0, 1].

    Without ``instance_map`` cells are not delineated and the score is the pixel (area)
    ratio positive / (positive + negative), a proxy that equals the cell ratio only when
    positive and negative tumour cells have the same mean size.
    With ``instance_map`` ([H, W] int, 0 = background, each cell one id > 0) cells are
    counted: a cell takes the class covering most of its pixels (ties go to the smaller
    class id), and only cells voted positive or negative take part.
    ``empty_value`` is returned when there is no tumour at all; 0.0 follows the paper, which
    labels tumour-free (healthy or inflammatory) images TPS 0. Pass float("nan") to mark
    them as not evaluable instead.
    """
    labels = np.asarray(class_map)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ScoringInputError(f"class_map must be a 2-D integer map, got shape {labels.shape} dtype {labels.dtype}")
    if positive_id == negative_id:
        raise ScoringInputError(f"positive_id and negative_id must differ, both are {positive_id}")
    if instance_map is None:
        positive = int(np.count_nonzero(labels == positive_id))
        negative = int(np.count_nonzero(labels == negative_id))
    else:
        positive, negative = _count_cells(labels, np.asarray(instance_map), positive_id, negative_id)
    total = positive + negative
    return empty_value if total == 0 else positive / total


def _count_cells(labels: NDArray[np.integer], instances: NDArray[np.generic], positive_id: int, negative_id: int) -> tuple[int, int]:
    if instances.shape != labels.shape or not np.issubdtype(instances.dtype, np.integer):
        raise ScoringInputError(
            f"instance_map must be an integer map shaped like class_map {labels.shape}, "
            f"got shape {instances.shape} dtype {instances.dtype}"
        )
    in_cell = instances.ravel() > 0
    if not in_cell.any():
        return 0, 0
    if labels.min() < 0:
        raise ScoringInputError(f"class_map has negative class id {labels.min()}")
    # Compact ids first: instance ids may be large and sparse.
    _, cell_index = np.unique(instances.ravel()[in_cell], return_inverse=True)
    cell_classes = labels.ravel()[in_cell].astype(np.int64)
    n_classes = int(cell_classes.max()) + 1
    n_cells = int(cell_index.max()) + 1
    votes = np.bincount(cell_index * n_classes + cell_classes, minlength=n_cells * n_classes)
    majority = votes.reshape(n_cells, n_classes).argmax(axis=1)
    return int(np.count_nonzero(majority == positive_id)), int(np.count_nonzero(majority == negative_id))


def tps_bin(tps: float) -> str:
    """Clinical PD-L1 bin: "<1%" (tps < 0.01), "1-49%" (0.01 <= tps < 0.50), ">=50%" (tps >= 0.50)."""
    value = float(tps)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ScoringInputError(f"TPS must be a fraction in [0, 1], got {tps!r}")
    if value < TPS_LOW_CUTOFF:
        return TPS_BINS[0]
    if value < TPS_HIGH_CUTOFF:
        return TPS_BINS[1]
    return TPS_BINS[2]


def tps_bin_index(proportion: float) -> int:
    """Index into TPS_BINS ("<1%", "1-49%", ">=50%") of a tumour proportion score."""
    return TPS_BINS.index(tps_bin(proportion))
