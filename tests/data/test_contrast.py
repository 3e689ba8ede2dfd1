"""Lesion conspicuity: echomoe.data.pixels.contrast_to_noise against its definition."""

import math

import numpy as np
import pytest

from echomoe.data.pixels import contrast_to_noise


def _disk(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def test_contrast_to_noise_matches_the_definition_on_a_noisy_disk():
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, (41, 37))
    lesion = _disk(41, 15.0, 20.0, 6.0)[:, :37]
    image[lesion] -= 12.5  # a hypoechoic lesion 2.5 speckle std dark
    ring = np.zeros_like(lesion)
    for dy in range(-3, 4):  # the square neighbourhood, written out
        for dx in range(-3, 4):
            shifted = np.zeros_like(lesion)
            ys, xs = np.nonzero(lesion)
            keep = (ys + dy >= 0) & (ys + dy < 41) & (xs + dx >= 0) & (xs + dx < 37)
            shifted[ys[keep] + dy, xs[keep] + dx] = True
            ring |= shifted
    ring &= ~lesion
    expected = abs(image[lesion].mean() - image[ring].mean()) / image[ring].std()
    assert contrast_to_noise(image, lesion) == pytest.approx(expected)
    assert 2.0 < expected < 3.0
    # clipped to an organ: only the ring's left half counts
    organ = np.zeros_like(lesion)
    organ[:, :15] = True
    clipped = ring & organ
    assert contrast_to_noise(image, lesion, organ) == pytest.approx(
        abs(image[lesion].mean() - image[clipped].mean()) / image[clipped].std())


def test_contrast_to_noise_edge_cases_and_errors():
    image = np.full((9, 9), 50.0)
    lesion = _disk(9, 4, 4, 1.5)
    assert math.isnan(contrast_to_noise(image, np.zeros((9, 9), bool)))
    assert math.isnan(contrast_to_noise(image, lesion, np.zeros((9, 9), bool)))  # no ring
    assert contrast_to_noise(image, lesion) == 0.0  # invisible: no contrast, no noise
    image[lesion] = 80.0
    assert contrast_to_noise(image, lesion) == math.inf  # visible on a noiseless background
    with pytest.raises(TypeError, match="mask must be bool"):
        contrast_to_noise(image, lesion.astype(np.uint8))
    with pytest.raises(ValueError, match="same shape"):
        contrast_to_noise(image, lesion[:5])
    with pytest.raises(ValueError, match="margin must be >= 1"):
        contrast_to_noise(image, lesion, margin=0)
    with pytest.raises(ValueError, match="within must be a bool"):
        contrast_to_noise(image, lesion, within=np.ones((9, 9)))
