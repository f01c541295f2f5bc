"""The synthetic area generator, vectorised for speed (issue 27): the same numbers as the
per-line and per-blob loops it replaced, on small scenes."""

from __future__ import annotations

import numpy as np

from relaymap.ingest import sample


def test_speed_smooth_noise_is_np_interp_line_by_line():
    h, w, cell = 70, 53, 4.5
    got = sample._smooth((h, w), cell, np.random.default_rng(2))
    grid = np.random.default_rng(2).uniform(-1, 1, (int(h / cell) + 2, int(w / cell) + 2))
    xs, ys = np.arange(w) / cell, np.arange(h) / cell
    rows = np.array([np.interp(xs, np.arange(grid.shape[1]), g) for g in grid])
    want = np.array([np.interp(ys, np.arange(grid.shape[0]), rows[:, j]) for j in range(w)]).T
    np.testing.assert_array_equal(got, want)


def test_speed_blob_field_within_reach_is_the_whole_field():
    """Blobs computed in their boxes: equal wherever the field is below ``reach``."""
    shape, rng_seed = (120, 90), 4
    whole = sample._blob_field(shape, 9, 10.0, np.random.default_rng(rng_seed))
    boxed = sample._blob_field(shape, 9, 10.0, np.random.default_rng(rng_seed), reach=2.0)
    near = whole < 2.0
    np.testing.assert_array_equal(boxed[near], whole[near])
    assert (boxed[~near] >= 2.0).all()


def test_speed_change_square_is_the_scans_choice():
    """The summed-area search picks the square a row-major scan with a strict ">" picks."""
    cls = sample.make_layout(200, 32, np.random.default_rng(1))
    change = sample.SyntheticChange(side_px=32, clearance_px=8, within=(10, 20, 190, 170))
    mask = sample.change_mask(cls, change)
    src = cls == [c.name for c in sample.CLASSES].index("cropland")
    best, at = -1, None
    for y in range(10, 190 - 32 + 1, 8):
        for x in range(20, 170 - 32 + 1, 8):
            n = int(src[max(0, y - 8) : y + 40, max(0, x - 8) : x + 40].sum())
            if n > best:
                best, at = n, (y, x)
    want = np.zeros(cls.shape, bool)
    want[at[0] : at[0] + 32, at[1] : at[1] + 32] = True
    np.testing.assert_array_equal(mask, want & src)
