"""The engine's blending rule (RowStitcher): streamed rows equal a whole-scene blend."""

from __future__ import annotations

import numpy as np
import pytest

from relay_models.geometry import blend_weights, tile_grid
from relay_models.stitch import RowStitcher


def _stitch(shape, tile_px, overlap_px, tile_probs, blend="cosine"):
    out = np.full((2, *shape), np.nan, dtype=np.float32)
    rows_seen = []

    def sink(y0, probs, valid):
        rows_seen.extend(range(y0, y0 + probs.shape[1]))
        out[:, y0 : y0 + probs.shape[1]] = np.where(valid, probs, np.nan)

    st = RowStitcher(shape, 2, tile_px, overlap_px, sink, blend=blend)
    for t in tile_grid(shape, tile_px, overlap_px=overlap_px):
        p = tile_probs(t)
        st.add(t, p, np.ones((tile_px, tile_px), bool) if p is not None else None)
    st.close()
    return out, rows_seen


@pytest.mark.parametrize("blend", ["cosine", "center"])
@pytest.mark.parametrize("shape", [(200, 330), (64, 64), (40, 90)])
def test_constant_tiles_stitch_to_a_constant_map_without_seams(shape, blend):
    const = np.array([0.3, 0.7], dtype=np.float32)[:, None, None]
    tiles = lambda t: np.broadcast_to(const, (2, 64, 64)).copy()  # noqa: E731
    out, rows = _stitch(shape, 64, 16, tiles, blend)
    assert rows == list(range(shape[0]))  # every row once, top to bottom
    np.testing.assert_allclose(out, np.broadcast_to(const, out.shape), atol=1e-6)


def test_stitch_matches_the_whole_scene_blend_and_keeps_skipped_tiles_nodata():
    rng = np.random.default_rng(0)
    shape, tile, overlap = (150, 170), 64, 24
    tiles = tile_grid(shape, tile, overlap_px=overlap)
    probs = {t.origin_yx: rng.random((2, tile, tile), dtype=np.float32) for t in tiles}
    skipped = tiles[0].origin_yx
    out, _ = _stitch(
        shape, tile, overlap, lambda t: None if t.origin_yx == skipped else probs[t.origin_yx]
    )
    # reference: accumulate the whole scene at once
    acc, norm = np.zeros((2, *shape)), np.zeros(shape)
    wt = blend_weights(tile, overlap)
    for t in tiles:
        if t.origin_yx == skipped:
            continue
        oy, ox = t.origin_yx
        h, w = min(tile, shape[0] - oy), min(tile, shape[1] - ox)
        acc[:, oy : oy + h, ox : ox + w] += probs[t.origin_yx][:, :h, :w] * wt[:h, :w]
        norm[oy : oy + h, ox : ox + w] += wt[:h, :w]
    ref = np.where(norm > 0, acc / np.maximum(norm, 1e-12), np.nan)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.isnan(out[:, :10, :10]).all()  # covered by the skipped tile only


def test_center_blend_takes_each_pixel_from_the_tile_that_keeps_it():
    shape, tile, overlap = (150, 170), 64, 24
    tiles = tile_grid(shape, tile, overlap_px=overlap)
    ids = {t.origin_yx: i for i, t in enumerate(tiles)}
    out, _ = _stitch(
        shape,
        tile,
        overlap,
        lambda t: np.full((2, tile, tile), ids[t.origin_yx], np.float32),
        blend="center",
    )
    for t in tiles:
        y0, x0, y1, x1 = t.keep
        assert (out[0, y0:y1, x0:x1] == ids[t.origin_yx]).all()


def test_unknown_blend_is_refused():
    with pytest.raises(ValueError, match="'cosine' or 'center'"):
        RowStitcher((10, 10), 2, 8, 0, lambda *a: None, blend="mean")
