"""Training, ONNX export and the science reports: the 'train' extra (torch, diffusers, onnx, scikit-learn).

Serving never imports this package. Every module here needs torch, so the check sits at the package:
``python -m training.train`` (or any import) without the extra raises MissingExtraError naming
``pip install 'histosynth[train]'`` instead of a ModuleNotFoundError from whichever module imports torch first.
"""

from services.core.extras import require_extra

require_extra("train", "training/ (training, export, experiments)", ("torch",))
