"""Window arithmetic: properties over random windows (hypothesis) and worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_models.geometry import (
    Window,
    blend_weights,
    global_crop,
    tile_grid,
    window_pair,
)
from relay_models.sampling import read_window

centres = st.tuples(st.floats(-500, 5000), st.floats(-500, 5000))
angles = st.floats(-180, 180)
factors = st.sampled_from([1, 2, 4, 8])


@st.composite
def out_and_factor(draw):
    """An output side with a centred whole-pixel crop for the factor."""
    factor = draw(factors)
    size = draw(st.integers(1, 16)) * 2  # crop side, even so (out - size) is even
    return size * factor, factor


class TestWindowPair:
    @given(centres, st.floats(8, 2048), out_and_factor(), angles)
    def test_global_crop_maps_back_onto_local_window(self, centre, side, of, angle):
        out_px, factor = of
        pair = window_pair(centre, side, factor=factor, angle_deg=angle)
        rows, cols = global_crop(out_px, factor)
        a, b = rows.start, rows.stop
        assert (cols.start, cols.stop) == (a, b)
        crop_corners = pair.global_.grid_to_scene(
            np.array([[a, a], [a, b], [b, b], [b, a]], dtype=float), out_px
        )
        np.testing.assert_allclose(crop_corners, pair.local.corners(), atol=1e-6 * side)

    @given(centres, st.floats(8, 2048), out_and_factor(), angles)
    def test_crop_pixels_are_pooled_local_pixels(self, centre, side, of, angle):
        """Each global crop pixel centre is the mean of a factor x factor block of local
        pixel centres: what the loss compares (avgpool of local vs crop of global)."""
        out_px, factor = of
        pair = window_pair(centre, side, factor=factor, angle_deg=angle)
        rows, cols = global_crop(out_px, factor)
        g = pair.global_.sample_points(out_px)[rows, cols]
        loc = pair.local.sample_points(out_px)
        pooled = loc.reshape(out_px // factor, factor, out_px // factor, factor, 2).mean((1, 3))
        np.testing.assert_allclose(g, pooled, atol=1e-6 * side)

    @given(centres, st.floats(1, 4096), angles)
    def test_windows_share_centre_and_angle(self, centre, side, angle):
        pair = window_pair(centre, side, factor=4, angle_deg=angle)
        np.testing.assert_allclose(pair.local.corners().mean(0), centre, atol=1e-6 * side)
        np.testing.assert_allclose(pair.global_.corners().mean(0), centre, atol=1e-6 * side)
        assert pair.global_.side_px == pytest.approx(4 * side)

    @given(st.floats(16, 8192), factors, st.sampled_from([64, 128, 256]))
    def test_level_leaves_a_residual_scale_in_one_to_two(self, side, factor, out_px):
        pair = window_pair((0, 0), side, factor=factor)
        k, residual = pair.level(out_px)
        scale = factor * side / out_px
        assert 2**k * residual == pytest.approx(scale)
        if scale >= 1:
            assert 1 - 1e-9 <= residual < 2
        else:
            assert k == 0

    def test_level_of_the_paper_default(self):
        # 256 + 1024↓4: the global window is level 2 (x4) read as-is
        assert window_pair((512, 512), 256, factor=4).level(256) == (2, 1.0)

    @pytest.mark.parametrize(("out_px", "factor"), [(256, 3), (10, 4), (12, 8)])
    def test_bad_crop_is_a_clear_error(self, out_px, factor):
        with pytest.raises(ValueError, match="centred whole-pixel crop"):
            global_crop(out_px, factor)

    @pytest.mark.parametrize("factor", [0, 2.5, -1])
    def test_bad_factor(self, factor):
        with pytest.raises(ValueError, match="factor"):
            window_pair((0, 0), 256, factor=factor)


class TestWindow:
    @given(centres, st.floats(1, 4096), angles, st.sampled_from([4, 16, 64]))
    def test_pixel_bounds_contain_every_sample(self, centre, side, angle, out_px):
        w = Window(centre, side, angle)
        y0, x0, y1, x1 = w.pixel_bounds()
        pts = w.sample_points(out_px)
        assert (pts[..., 0] >= y0).all() and (pts[..., 0] <= y1).all()
        assert (pts[..., 1] >= x0).all() and (pts[..., 1] <= x1).all()

    def test_crs_bbox_north_up(self):
        # 10 m pixels, origin at (500000, 4000000), y down
        transform = (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
        w = Window((100.0, 50.0), 20.0)  # rows 90..110, cols 40..60
        assert w.crs_bbox(transform) == pytest.approx((500400.0, 3998900.0, 500600.0, 3999100.0))

    def test_rotation_is_counter_clockwise_on_screen(self):
        w = Window((0.0, 0.0), 2.0, 90.0)
        down, right = w.axes()
        # the window's right edge points up the screen (-y) after a CCW quarter turn
        np.testing.assert_allclose(right, [-1, 0], atol=1e-12)
        np.testing.assert_allclose(down, [0, 1], atol=1e-12)

    def test_non_positive_side(self):
        with pytest.raises(ValueError, match="side_px"):
            Window((0, 0), 0)


class TestTileGrid:
    @settings(max_examples=200)
    @given(
        st.integers(1, 700), st.integers(1, 700), st.sampled_from([16, 64, 100]), st.floats(0, 0.9)
    )
    def test_kept_parts_cover_every_pixel_once(self, h, w, tile_px, overlap_frac):
        overlap = int(tile_px * overlap_frac)
        tiles = tile_grid((h, w), tile_px, overlap_px=overlap)
        count = np.zeros((h, w), dtype=int)
        for t in tiles:
            y0, x0, y1, x1 = t.keep
            oy, ox = t.origin_yx
            assert oy <= y0 < y1 <= oy + tile_px and ox <= x0 < x1 <= ox + tile_px
            assert oy >= 0 and ox >= 0
            if h >= tile_px:
                assert oy + tile_px <= h
            if w >= tile_px:
                assert ox + tile_px <= w
            count[y0:y1, x0:x1] += 1
        assert (count == 1).all()

    def test_overlap_steps(self):
        tiles = tile_grid((256, 512), 256, overlap_px=128)
        assert [t.origin_yx for t in tiles] == [(0, 0), (0, 128), (0, 256)]
        assert [t.keep for t in tiles] == [(0, 0, 256, 192), (0, 192, 256, 320), (0, 320, 256, 512)]

    def test_small_scene_is_one_padded_tile(self):
        (t,) = tile_grid((40, 70), 256, overlap_px=64)
        assert t.origin_yx == (0, 0) and t.keep == (0, 0, 40, 70)
        assert t.center_yx == (128.0, 128.0)

    @pytest.mark.parametrize(("shape", "overlap"), [((0, 10), 0), ((10, 10), 256), ((10, 10), -1)])
    def test_bad_arguments(self, shape, overlap):
        with pytest.raises(ValueError):
            tile_grid(shape, 256, overlap_px=overlap)


class TestBlendWeights:
    @pytest.mark.parametrize("overlap", [0, 1, 16, 48])
    def test_positive_symmetric_flat_centre(self, overlap):
        w = blend_weights(128, overlap)
        assert w.shape == (128, 128) and (w > 0).all() and w.max() == 1
        np.testing.assert_allclose(w, w[::-1, ::-1])
        np.testing.assert_allclose(w, w.T)
        assert (w[overlap : -overlap or None, overlap : -overlap or None] == 1).all()

    def test_ramps_sum_to_one_across_an_overlap(self):
        """Two tiles overlapping by ``o`` get weights summing to 1 across the overlap."""
        o = 32
        ramp = blend_weights(128, o)[64]
        np.testing.assert_allclose(ramp[-o:] + ramp[:o], 1.0, atol=1e-6)


class TestReadWindow:
    def test_aligned_read_is_a_padded_slice(self):
        img = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(2, 6, 6)
        out, valid = read_window(img, Window((1.0, 5.0), 4.0), 4, fill=-1)
        # rows -1..3, cols 3..7
        assert (out[:, 0] == -1).all() and (out[:, :, 3] == -1).all()
        torch.testing.assert_close(out[:, 1:, :3], img[:, 0:3, 3:6])
        assert valid.sum() == 9

    def test_resampled_path_agrees_with_slice_path(self):
        img = torch.randn(3, 20, 20)
        fast, _ = read_window(img, Window((10.0, 9.0), 8.0), 8)
        slow, _ = read_window(img, Window((10.0, 9.0), 8.0, 1e-9), 8)  # forces grid_sample
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)

    def test_quarter_turn_rotates_content_clockwise(self):
        img = torch.randn(1, 16, 16)
        straight, _ = read_window(img, Window((8.0, 8.0), 8.0, 1e-12), 8)
        turned, _ = read_window(img, Window((8.0, 8.0), 8.0, 90.0), 8)
        torch.testing.assert_close(
            turned, torch.rot90(straight, -1, dims=(1, 2)), atol=1e-4, rtol=0
        )

    def test_region_origin_and_nearest_labels(self):
        labels = torch.randint(0, 5, (1, 30, 30), dtype=torch.uint8)
        region = labels[:, 10:20, 12:22]
        w = Window((15.0, 17.0), 6.0, 30.0)
        a, va = read_window(labels, w, 6, mode="nearest", fill=255)
        b, vb = read_window(region, w, 6, origin_yx=(10, 12), mode="nearest", fill=255)
        assert a.dtype == torch.uint8
        torch.testing.assert_close(a, b)
        assert torch.equal(va, vb)
        outside, valid = read_window(
            labels, Window((-20.0, -20.0), 6.0, 30.0), 6, mode="nearest", fill=255
        )
        assert (outside == 255).all() and not valid.any()
