"""services.core.arrays.run_numpy: small numpy work inline on the event loop, large work in a worker thread."""

from __future__ import annotations

import threading

import numpy as np

from services.core import arrays
from services.core.arrays import INLINE_MAX_ELEMENTS, run_numpy


async def test_small_work_runs_inline_on_the_event_loop_thread() -> None:
    loop_thread = threading.get_ident()
    result = await run_numpy(lambda: (threading.get_ident(), np.ones(4).sum()), INLINE_MAX_ELEMENTS)
    assert result == (loop_thread, 4.0)


async def test_large_work_runs_in_a_worker_thread() -> None:
    loop_thread = threading.get_ident()
    worker, total = await run_numpy(lambda: (threading.get_ident(), np.ones(4).sum()), INLINE_MAX_ELEMENTS + 1)
    assert worker != loop_thread and total == 4.0


async def test_errors_propagate_from_both_paths() -> None:
    def fail() -> None:
        raise ValueError("bad mask")

    for elements in (1, INLINE_MAX_ELEMENTS + 1):
        try:
            await run_numpy(fail, elements)
        except ValueError as error:
            assert str(error) == "bad mask"
        else:
            raise AssertionError("run_numpy swallowed the error")


def test_a_256x256_three_plane_refiner_input_is_inline() -> None:
    # The size the refinement service is benchmarked at (issue 15): its encode and threshold skip the thread hop.
    assert 1 * 3 * 256 * 256 <= arrays.INLINE_MAX_ELEMENTS < 2 * 3 * 256 * 256
