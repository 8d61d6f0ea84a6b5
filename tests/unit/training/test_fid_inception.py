"""training/export/fid_inception.py: the FID InceptionV3 builds, loads a state dict from a file with checksum
checks, and exports to ONNX matching torch. The published weights are not available here, so the weights are
random (batch-norm statistics calibrated on one random batch so activations stay O(1) through all 17 blocks and
the parity check compares meaningful numbers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from services.core.model_store import file_sha256 as sha256_of
from training.export.fid_inception import (
    PUBLISHED_SHA256_PREFIX,
    FIDInceptionV3,
    WeightsChecksumError,
    export_fid_inception,
    load_fid_inception,
    verify_weights_file,
)

# 24 M parameters evaluated at 299x299: seconds on an idle CPU, minutes on a shared one.
pytestmark = [pytest.mark.torch, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> tuple[Path, FIDInceptionV3]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0  # running stats := the statistics of the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32) * 255)
    model.eval()
    state = model.state_dict()
    # Old checkpoints (like the published one) carry no num_batches_tracked buffers.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("fid") / "random_inception.pth"
    torch.save(state, path)
    torch.set_num_threads(threads)
    return path, model


def test_architecture_matches_the_published_state_dict_layout():
    model = FIDInceptionV3()
    state = model.state_dict()
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert model.Conv2d_1a_3x3.bn.eps == pytest.approx(1e-3)
    assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")
    assert not any(k.startswith("AuxLogits") for k in state)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 40, 56)).shape == (1, 2048)


def test_random_weights_round_trip_through_the_loader(weights_file):
    path, original = weights_file
    digest = sha256_of(path)
    loaded, info = load_fid_inception(path, expected_sha256=digest)
    assert info.sha256 == digest and not info.published
    image = torch.rand(2, 3, 64, 48) * 255
    with torch.no_grad():
        expected, got = original(image), loaded(image)
    assert expected.abs().mean() > 1e-2  # calibrated: features are not vanishingly small
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_wrong_or_unknown_checksum_is_refused(tmp_path):
    path = tmp_path / "not_inception.pth"
    path.write_bytes(b"certainly not the published weights")
    digest = sha256_of(path)
    assert not digest.startswith(PUBLISHED_SHA256_PREFIX)
    with pytest.raises(WeightsChecksumError, match=f"does not start with '{PUBLISHED_SHA256_PREFIX}'"):
        verify_weights_file(path)
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(WeightsChecksumError, match=f"sha256 of .* is {digest}, expected {wrong}"):
        load_fid_inception(path, expected_sha256=wrong)
    with pytest.raises(ValueError, match="64 hex digits"):
        verify_weights_file(path, expected_sha256="6726825d")
    with pytest.raises(FileNotFoundError, match="not found"):
        verify_weights_file(path.with_name("missing.pth"))


def test_state_dict_that_does_not_fit_is_refused(tmp_path, weights_file):
    path, _ = weights_file
    state = torch.load(path, weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\].*unexpected \['extra.weight'\]"):
        load_fid_inception(bad, expected_sha256=sha256_of(bad))


def test_export_to_model_store_matches_torch(tmp_path, weights_file):
    path, original = weights_file
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = export_fid_inception(path, store_root=tmp_path, expected_sha256=sha256_of(path),
                                   parity_sizes=((64, 80),), max_batch_size=1)
    finally:
        torch.set_num_threads(threads)
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    assert manifest["kind"] == "encoder" and manifest["name"] == "fid-inception-v3"
    assert manifest["metadata"]["feature"] == "pool3"
    assert manifest["metadata"]["standard_fid"] is False  # random weights are not the published file
    assert manifest["metadata"]["weights_sha256"] == sha256_of(path)
    assert manifest["outputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", 2048]}]
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 50, 70)).astype(np.float32)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"image": image})
    with torch.no_grad():
        expected = original(torch.from_numpy(image)).numpy()
    # float32 rounding accumulates over 94 convolutions of random weights: ~5e-4 on features of ~1
    np.testing.assert_allclose(features, expected, rtol=1e-3, atol=2e-3)
