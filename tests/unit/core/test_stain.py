"""Stain variation: scikit-image's colour deconvolution in numpy, restaining to a bank row, bank validation."""

from __future__ import annotations

import numpy as np
import pytest

from services.core.stain import MAX_CONTRAST_SCALE, StainBank, hed_to_rgb, restain, rgb_to_hed, stain_levels


def tissue(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pink background with purple discs (nuclei) and pixel noise, and the discs' mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    nuclei = np.zeros((64, 64), bool)
    for cy, cx in ((16, 16), (40, 20), (30, 48)):
        nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 < 49
    image = np.where(nuclei[..., None], [120, 70, 160], [235, 170, 210]).astype(float)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), nuclei


def test_deconvolution_equals_scikit_image() -> None:
    color = pytest.importorskip("skimage.color")
    image, _ = tissue()
    np.testing.assert_allclose(rgb_to_hed(image), color.rgb2hed(image), atol=1e-12)
    hed = color.rgb2hed(image)
    expected = np.round(np.clip(color.hed2rgb(hed), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(hed_to_rgb(hed), expected)


def test_restain_moves_background_level_and_nucleus_contrast_to_the_target() -> None:
    image, nuclei = tissue()
    current = stain_levels(rgb_to_hed(image), nuclei)
    # A darker stain: H background +0.01, contrast 1.5x; E background +0.005.
    target = current + [0.01, 0.01 + 0.5 * (current[1] - current[0]), 0.005, 0.005]
    levels = stain_levels(rgb_to_hed(restain(image, nuclei, target)), nuclei)
    np.testing.assert_allclose(levels[[0, 1, 2]], target[[0, 1, 2]], atol=2e-3)  # uint8 rounding
    assert levels[1] - levels[0] > 1.4 * (current[1] - current[0])


def test_contrast_scale_is_bounded_and_a_crop_without_nuclei_only_shifts_its_level() -> None:
    image, nuclei = tissue()
    current = stain_levels(rgb_to_hed(image), nuclei)
    flat = current.copy()
    flat[1] = flat[0] + (current[1] - current[0]) / 100  # asks for 1/100 of the contrast
    levels = stain_levels(rgb_to_hed(restain(image, nuclei, flat)), nuclei)
    assert levels[1] - levels[0] == pytest.approx((current[1] - current[0]) / MAX_CONTRAST_SCALE, rel=0.1)

    empty = np.zeros_like(nuclei)
    shifted = restain(image, empty, current + [0.01, 0.01, 0.0, 0.0])
    assert stain_levels(rgb_to_hed(shifted), empty)[0] == pytest.approx(current[0] + 0.01, abs=2e-3)


def test_bank_draws_by_seed_and_source_and_rejects_bad_tables() -> None:
    rows = {"b": [[0.01, 0.04, 0.008, 0.015], [0.03, 0.11, 0.02, 0.045]], "a": [[0.02, 0.07, 0.01, 0.03]]}
    bank = StainBank.from_metadata("m/1", {"rows": rows})
    assert bank.background_class == 0 and bank.sources == ("a", "b")
    draws = [tuple(bank.draw(seed)) for seed in range(40)]
    assert draws == [tuple(bank.draw(seed)) for seed in range(40)] and len(set(draws)) == 3
    assert {tuple(bank.draw(seed, "b")) for seed in range(40)} == {tuple(row) for row in rows["b"]}
    with pytest.raises(KeyError, match="'c' is not in the bank; it has a, b"):
        bank.draw(0, "c")
    for bad in ({"rows": {}}, {"rows": {"a": []}}, {"rows": {"a": [[0.1, 0.2, 0.3]]}},
                {"rows": {"a": [[0.1, float("nan"), 0.1, 0.1]]}}, {"rows": [[0.1, 0.1, 0.1, 0.1]]}, {}):
        with pytest.raises(ValueError, match="m/1.*stain_bank"):
            StainBank.from_metadata("m/1", bad)


def test_tall_fields_are_restained_in_bands_like_small_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.core import stain

    image, nuclei = tissue(3)
    target = np.array([0.03, 0.09, 0.02, 0.025])
    whole = restain(image, nuclei, target)
    monkeypatch.setattr(stain, "BAND_ROWS", 24)  # 64 rows -> bands of 24, 24, 16
    banded = restain(image, nuclei, target)
    assert np.abs(banded.astype(int) - whole).max() <= 1  # only summation order differs
