"""Streaming stitch: blend overlapping tile predictions into rows, flushed as they finish.

The blending rule of the tiled-inference engine (:mod:`relay_models.inference`), for
in-memory scenes and batch inference alike: every scene pixel gets the weighted mean of the
class probabilities of the tiles that cover it, with weights

* ``cosine``: :func:`~relay_models.geometry.blend_weights`: 1 in a tile's centre, falling
  with a raised cosine over ``overlap_px`` at its edges (never 0), so tiles fade into each
  other and no seam shows;
* ``center``: 1 on the tile's ``keep`` box and 0 elsewhere (the paper's rule: each pixel
  comes from exactly one tile, the one whose centre is nearest).

A pixel is valid when a tile with data covered it and it had data itself. Tiles arrive in
:func:`relay_models.geometry.tile_grid` order (row-major). Once a tile whose top edge is row
``y`` arrives, no later tile touches rows above ``y``, so those rows are final: they are
normalised and handed to the sink, and the buffer only ever holds one strip of tile height
(``K x L x W``), never the scene.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from .geometry import Tile, blend_weights

Blend = Literal["cosine", "center"]

#: ``sink(y0, probs, valid)``: rows ``y0 .. y0 + h`` of ``(K, h, W)`` float32 probabilities
#: and the ``(h, W)`` data mask.
Sink = Callable[[int, np.ndarray, np.ndarray], None]


class RowStitcher:
    """Accumulates weighted tile probabilities over a moving strip of scene rows.

    Args:
        shape_yx: scene ``(height, width)``.
        num_classes: K.
        tile_px: tile side L.
        overlap_px: tile overlap.
        sink: receives finished rows, top to bottom, each row exactly once.
        blend: ``cosine`` or ``center`` (see the module docstring).
    """

    def __init__(
        self,
        shape_yx: tuple[int, int],
        num_classes: int,
        tile_px: int,
        overlap_px: int,
        sink: Sink,
        *,
        blend: Blend = "cosine",
    ) -> None:
        if blend not in ("cosine", "center"):
            raise ValueError(f"blend must be 'cosine' or 'center', got {blend!r}")
        self.height, self.width = shape_yx
        self.tile_px = tile_px
        self.sink = sink
        self.blend = blend
        self.weights = blend_weights(tile_px, overlap_px if blend == "cosine" else 0)
        rows = tile_px  # after flush(oy) a tile always starts at buffer row 0
        self.acc = np.zeros((num_classes, rows, self.width), dtype=np.float32)
        self.norm = np.zeros((rows, self.width), dtype=np.float32)
        self.valid = np.zeros((rows, self.width), dtype=bool)
        self.top = 0  # scene row of buffer row 0; rows above it were flushed

    def add(self, tile: Tile, probs: np.ndarray | None, valid: np.ndarray | None) -> None:
        """Blend one tile: ``(K, L, L)`` probabilities and its ``(L, L)`` data mask, or
        ``None`` for a tile that was skipped (no data: its pixels stay nodata)."""
        oy, ox = tile.origin_yx
        if oy < self.top:
            raise ValueError(
                f"tile at row {oy} arrived after rows up to {self.top} were written: tiles "
                f"must come in tile_grid order"
            )
        self.flush(oy)
        if probs is None:
            return
        h = min(self.tile_px, self.height - oy)
        w = min(self.tile_px, self.width - ox)
        r = oy - self.top
        wt = self.weights[:h, :w]
        if self.blend == "center":
            ky0, kx0, ky1, kx1 = tile.keep
            wt = np.zeros_like(wt)
            wt[ky0 - oy : ky1 - oy, kx0 - ox : kx1 - ox] = 1
        self.acc[:, r : r + h, ox : ox + w] += probs[:, :h, :w] * wt
        self.norm[r : r + h, ox : ox + w] += wt
        self.valid[r : r + h, ox : ox + w] |= valid[:h, :w] & (wt > 0)

    def flush(self, upto: int) -> None:
        """Emit rows ``[top, upto)``: no tile still to come touches them."""
        upto = min(upto, self.height)
        n = upto - self.top
        if n <= 0:
            return
        probs = self.acc[:, :n]
        np.divide(probs, np.maximum(self.norm[:n], 1e-12), out=probs)  # in place: no copy
        self.sink(self.top, probs, self.valid[:n] & (self.norm[:n] > 0))
        rest = self.acc.shape[1] - n
        for buf in (self.acc, self.norm, self.valid):  # shift the strip up by n rows
            view = buf if buf.ndim == 3 else buf[None]
            view[:, :rest] = view[:, n:].copy()
            view[:, rest:] = 0
        self.top = upto

    def close(self) -> None:
        """Emit the remaining rows (call after the last tile)."""
        self.flush(self.height)


def crop_sink(sink: Sink, box: tuple[int, int, int, int]) -> Sink:
    """A sink that passes on only the rows and columns inside ``box`` ``(y0, x0, y1, x1)``,
    renumbered from the box's corner (a cell's map cut out of its halo-padded scene)."""
    y0, x0, y1, x1 = box

    def cropped(top: int, probs: np.ndarray, valid: np.ndarray) -> None:
        lo, hi = max(top, y0), min(top + probs.shape[1], y1)
        if lo < hi:
            rows = slice(lo - top, hi - top)
            sink(lo - y0, probs[:, rows, x0:x1], valid[rows, x0:x1])

    return cropped
