"""Service test fixtures: small real conv ONNX models in a tmp model store."""

from tests.fixtures.service_models import service_store  # noqa: F401  (pytest fixture)
