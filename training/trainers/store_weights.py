"""Warm-start a generator from a model shipped in model_store/ (its ONNX file), for when no earlier run is cached.

Runs live in ~/.cache/histosynth/runs, outside the work tree; a fresh machine has none, so a recipe that continues
an earlier run (`train.init_from: <run>`) could otherwise only start by re-running the whole chain that led to the
shipped model (hours of CPU). The shipped ONNX file holds exactly the generator weights that were exported (the EMA
weights when the run kept them): torch.onnx.export names each initializer after its state_dict key, and the
generators here have no batch-norm statistics or other state that export folds away. So those initializers are
the generator's state_dict, checked key for key and shape for shape. The discriminator is not shipped: it starts
fresh (see the trainer's discriminator warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class StoreWeights:
    """Where warm-start weights came from, as recorded in the run log."""

    model: str
    version: str
    path: Path
    sha256: str


def read_onnx_initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def load_generator_from_store(generator: nn.Module, store_root: Path, model: str, version: str | int) -> StoreWeights:
    """Copy model_store/<model>/<version>/<file> weights into `generator`; the file must match its manifest sha256
    (ModelStore.get checks it) and every state_dict entry must be there with the same shape (a different
    architecture is an error, not a partial load)."""
    # The serving store's own reader: manifest validation, version lookup and the sha256 check (cached per file).
    from services.core.errors import ModelNotFoundError
    from services.core.model_store import ChecksumMismatchError, ModelStore

    try:
        manifest = ModelStore(Path(store_root)).get(model, version)
    except ChecksumMismatchError as error:
        raise ValueError(f"train.init_from_store: {error} (git lfs / checkout problem?)") from error
    except (ModelNotFoundError, FileNotFoundError) as error:
        raise FileNotFoundError(f"train.init_from_store: {model} version {version} is not in the model store "
                                f"{store_root}: {error}") from error
    if manifest.format != "onnx":
        raise ValueError(f"train.init_from_store: {manifest.key} is {manifest.format!r}, only onnx "
                         f"files can seed a generator")
    weights_path = manifest.path
    arrays = read_onnx_initializers(weights_path)
    expected = generator.state_dict()
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise ValueError(f"train.init_from_store: {model}/{version} lacks {len(missing)} generator weights "
                         f"(first: {missing[:3]}); the config's model section does not match the shipped model")
    state = {}
    for key, current in expected.items():
        value = torch.from_numpy(np.array(arrays[key], copy=True))
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"train.init_from_store: {key} has shape {tuple(value.shape)} in {model}/{version} "
                             f"but {tuple(current.shape)} in the configured generator")
        state[key] = value.to(current.dtype)
    generator.load_state_dict(state)
    return StoreWeights(model=manifest.name, version=manifest.version, path=weights_path, sha256=manifest.sha256)
