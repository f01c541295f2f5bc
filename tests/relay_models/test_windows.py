"""The window reader: one rule for the level, the resampling and the normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relay_models.geometry import Window, tile_grid, window_pair
from relay_models.windows import ArrayPyramid, Region, halve_mean, read_pair, read_window

IDENTITY = (torch.zeros(2, 1, 1), torch.ones(2, 1, 1))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.random((2, 200, 230), dtype=np.float32)


def _blocks(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k x k`` blocks of ``(C, H, W)``."""
    c, h, w = a.shape
    return a.reshape(c, h // k, k, w // k, k).mean((2, 4))


def test_levels_are_the_nan_aware_2x2_means(image):
    img = image.copy()
    img[:, :3, :3] = np.nan
    pyr = ArrayPyramid(img, num_levels=2)
    assert pyr.shape(1) == (100, 115) and pyr.shape(2) == (50, 58)  # odd edge kept
    np.testing.assert_allclose(pyr.levels[1][0], halve_mean(img), equal_nan=True)
    assert np.isnan(pyr.levels[1][0][:, 0, 0]).all()  # all four missing
    np.testing.assert_allclose(
        pyr.levels[1][0][:, 1, 1], img[:, 2:4, 2:4].reshape(2, -1)[:, 1:].mean(1), rtol=1e-6
    )  # one of four missing: mean of three


@pytest.mark.parametrize("factor", [2, 4])
def test_power_of_two_global_windows_are_exact_block_means(image, factor):
    pyr = ArrayPyramid(image, num_levels=2)
    pair = window_pair((96.0, 96.0), 32, factor=factor)
    glob = read_window(pyr, pair.global_, 32, IDENTITY)[0]
    y0, x0, y1, x1 = pair.global_.pixel_bounds()
    np.testing.assert_allclose(glob, _blocks(image[:, y0:y1, x0:x1], factor), rtol=1e-5)


def test_a_non_power_of_two_factor_area_averages_the_nearest_finer_level(image):
    """Factor 3 at 64 px: the 192 px global window is read from level 1 (x2), and each
    output pixel is the exact area mean of the 1.5 x 1.5 level-1 pixels it covers.
    Reference: level 1 upsampled x2 (nearest), then 3 x 3 block means."""
    img = image.copy()
    img[:, 40:42, 100:103] = np.nan
    pyr = ArrayPyramid(img, num_levels=3)
    window = window_pair((96.0, 96.0), 64, factor=3).global_  # level-0 box [0, 192)
    got, valid, _ = read_window(pyr, window, 64, IDENTITY)
    level1 = pyr.levels[1][0][:, :96, :96]
    up = level1.repeat(2, axis=1).repeat(2, axis=2)  # (2, 192, 192)
    ref = _blocks(np.nan_to_num(up), 3)
    bad = _blocks(np.isnan(up).any(0, keepdims=True).astype(np.float32), 3)[0] > 0
    np.testing.assert_array_equal(valid.numpy(), ~bad)
    assert bad.any()
    np.testing.assert_allclose(got.numpy()[:, ~bad], ref[:, ~bad], rtol=1e-5, atol=1e-6)
    assert (got.numpy()[:, bad] == 0).all()  # no data: the band mean


def test_normalisation_and_outside_fill(image):
    pyr = ArrayPyramid(image, num_levels=0)
    mean, std = torch.tensor([0.5, 0.2])[:, None, None], torch.tensor([2.0, 4.0])[:, None, None]
    out, valid, _ = read_window(pyr, Window((0.0, 0.0), 32.0), 32, (mean, std))
    assert not valid[:16].any() and valid[16:, 16:].all()
    assert (out[:, :16] == 0).all()
    torch.testing.assert_close(
        out[:, 16:, 16:], (torch.from_numpy(image[:, :16, :16]) - mean) / std
    )


def test_a_region_reads_what_the_source_reads(image):
    pyr = ArrayPyramid(image, num_levels=2)
    tiles = tile_grid(pyr.shape(0), 64, overlap_px=16)[:4]
    windows = [t.window for t in tiles] + [t.pair(4).global_ for t in tiles]
    region = Region(pyr, windows, 64)
    for w in windows:
        a = read_window(region, w, 64, IDENTITY)[0]
        b = read_window(pyr, w, 64, IDENTITY)[0]
        torch.testing.assert_close(a, b)


def test_read_pair_with_labels(image):
    labels = (image[0] > 0.5).astype(np.uint8)
    pyr = ArrayPyramid(image, labels, num_levels=2)
    s = read_pair(pyr, window_pair((100.0, 100.0), 32, factor=4), 32, IDENTITY, labels=True)
    assert set(s) == {"local", "global", "valid", "labels"}
    np.testing.assert_array_equal(s["labels"].numpy(), labels[84:116, 84:116])
    s = read_pair(
        ArrayPyramid(image),
        window_pair((100.0, 100.0), 32),
        32,
        IDENTITY,
        with_global=False,
        labels=True,
    )
    assert "global" not in s and (s["labels"] == 255).all()  # no labels in the source
