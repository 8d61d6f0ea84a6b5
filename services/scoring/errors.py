"""The one error the scoring domain raises for bad input.

It is both an ``InvalidInputError`` (so the servicer maps it to INVALID_ARGUMENT without a
translation table) and a ``ValueError`` (so numeric callers such as notebooks and the
data-lake job can catch it the ordinary Python way).
"""

from __future__ import annotations

from services.core.errors import InvalidInputError


class ScoringInputError(InvalidInputError, ValueError):
    """Arrays handed to a scoring function have the wrong shape, dtype, range or size."""

    reason = "invalid_scoring_input"
