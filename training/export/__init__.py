"""Export stage: trained checkpoints -> model_store/<name>/<version>/ (ONNX, TensorRT on GPU machines)."""

from training.export.onnx_export import ModelCard, ParityError, export_to_model_store

__all__ = ["ModelCard", "ParityError", "export_to_model_store"]
