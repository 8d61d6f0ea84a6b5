"""Inference runtimes behind one interface (base.Runtime); the manifest's format picks one (registry.py).

Only base types are re-exported here: torch and tensorrt are imported lazily by their
runtimes, so importing this package never pulls them in.
"""

from services.core.runtimes.base import Runtime, RuntimeOptions, TensorSpec, validate_feeds

__all__ = ["Runtime", "RuntimeOptions", "TensorSpec", "validate_feeds"]
