"""The one error the scoring domain raises for bad input (defined in services.core.scores, which
generation shares for the TPS definition): an ``InvalidInputError`` and a ``ValueError``."""

from __future__ import annotations

from services.core.scores import ScoringInputError

__all__ = ["ScoringInputError"]
