"""A minimum mapping unit for change maps: connected regions of one change smaller than a
stated area become "no change", measured across cell borders.

Two maps of the same place made independently disagree by a pixel along class edges and
flicker in single pixels; the raw change map is covered with those slivers. A region is a
set of 8-connected pixels of one ``from → to`` pair (a field built over is one region even
with a ragged edge; a ring of cropland -> urban beside a ring of urban -> cropland is two);
a region of fewer pixels than :func:`min_pixels` becomes no change
(:func:`sieve_change`).

Cells are mapped apart, but a region does not stop at a cell border: each cell's change is
computed on the cell plus a margin read from its neighbours' maps (:func:`read_padded`).
A region that reaches a pixel of the cell and the outer edge of a margin of ``n - 1``
pixels holds a chain of at least ``n`` pixels (8-connected steps), so within the window it
already has the unit's ``n`` pixels: with that margin every region is judged as on one
mosaic (:func:`margin_px`). The margin is at most one cell side (only the 8 neighbours are
read); a larger unit in pixels keeps the regions that reach that far (never drops a region
that may be large).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from relaymap.catalog.storage import gdal_env

from .cog import NODATA

#: The default minimum mapping unit of change maps (hectares): 0.5 ha, 50 pixels of a 10 m
#: map. Small enough for a house block or a clearing (national change products use
#: 0.5-1 ha; CORINE Land Cover's 25 ha, 5 ha for its change layer, suit 100 m maps), large
#: enough to drop the one-pixel edges and specks two independent 10 m maps disagree by.
MIN_AREA_HA = 0.5
#: 8-connectivity: diagonal neighbours belong to one region.
EIGHT = np.ones((3, 3), dtype=bool)


def min_pixels(min_area_ha: float, pixel_m2: float) -> int:
    """The fewest pixels of ``pixel_m2`` m2 a region must have to cover ``min_area_ha``
    (a region of exactly the unit is kept); 0 when there is no unit."""
    if min_area_ha <= 0:
        return 0
    return max(1, math.ceil(min_area_ha * 1e4 / pixel_m2 - 1e-9))


def margin_px(pixels: int, cell_px: int) -> int:
    """Pixels of neighbouring cells to read around a cell so that a region of fewer than
    ``pixels`` pixels touching the cell lies wholly inside the window (``pixels - 1``; at
    most ``cell_px``, one cell side)."""
    return max(0, min(pixels - 1, cell_px))


def sieve_change(change: np.ndarray, pixels: int, *, no_change: int = 0) -> np.ndarray:
    """A change map without its small regions.

    Args:
        change: ``(H, W)`` uint8, one value per ``from → to`` pair, ``no_change`` and
            :data:`NODATA` (255) meaning no region.
        pixels: regions (8-connected pixels of one value) of fewer pixels become
            ``no_change``; 0 or 1 keeps every pixel.

    Returns:
        A new ``(H, W)`` uint8 map.
    """
    from scipy import ndimage

    out = change.copy()
    if pixels <= 1:
        return out
    # one labelling of every changed pixel: a group of touching changes smaller than the
    # unit is small for each pair in it; the larger groups are split by pair below
    labels, _ = ndimage.label((change != no_change) & (change != NODATA), structure=EIGHT)
    sizes = np.bincount(labels.ravel())
    small = sizes < pixels
    small[0] = False
    out[small[labels]] = no_change
    for i, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None or small[i]:
            continue
        inside, values = labels[where] == i, change[where]
        codes = np.unique(values[inside])
        if len(codes) == 1:
            continue  # one pair, and large enough
        view = out[where]  # a view: writing it writes ``out``
        for code in codes:
            lab, _ = ndimage.label(inside & (values == code), structure=EIGHT)
            part = np.bincount(lab.ravel()) < pixels
            part[0] = False
            view[part[lab]] = no_change
    return out


def read_padded(
    urls: Sequence[str], grid: Mapping[str, Any], shape: tuple[int, int], margin: int
) -> np.ndarray:
    """A cell's window grown by ``margin`` pixels on each side, from the class COGs at
    ``urls`` (the cell's and its neighbours', on one grid; where none has a pixel: 255).

    Args:
        grid: the cell's ``crs`` and ``transform``.
        shape: the cell's ``(H, W)``.

    Returns:
        ``(H + 2 margin, W + 2 margin)`` uint8.

    Raises:
        ValueError: a COG on another CRS or pixel size, or off the cell's pixel lattice.
    """
    t = grid["transform"]
    h, w = shape[0] + 2 * margin, shape[1] + 2 * margin
    x0, y0 = t.c - margin * t.a, t.f - margin * t.e
    out = np.full((h, w), NODATA, dtype=np.uint8)
    with rasterio.Env(**gdal_env()):
        for url in urls:
            with rasterio.open(url) as src:
                s = src.transform
                if src.crs != grid["crs"] or (s.a, s.e) != (t.a, t.e):
                    raise ValueError(f"{url} is not on the grid of its neighbour cells")
                dx, dy = (s.c - x0) / t.a, (s.f - y0) / t.e
                if abs(dx - round(dx)) > 1e-6 or abs(dy - round(dy)) > 1e-6:
                    raise ValueError(f"{url} is off the pixel lattice of its neighbour cells")
                dx, dy = round(dx), round(dy)
                r0, r1 = max(0, -dy), min(src.height, h - dy)
                c0, c1 = max(0, -dx), min(src.width, w - dx)
                if r0 < r1 and c0 < c1:
                    window = Window(c0, r0, c1 - c0, r1 - r0)
                    out[r0 + dy : r1 + dy, c0 + dx : c1 + dx] = src.read(1, window=window)
    return out


def grid_box(properties: Mapping[str, Any]) -> tuple[float, float, float, float, float]:
    """``(minx, miny, maxx, maxy, pixel side)`` of a cell map item from its ``proj:``
    fields (CRS units).

    Raises:
        KeyError: an item without ``proj:transform`` and ``proj:shape``.
    """
    a, _, c, _, e, f = properties["proj:transform"][:6]
    h, w = properties["proj:shape"]
    xs, ys = (c, c + w * a), (f, f + h * e)
    return min(xs), min(ys), max(xs), max(ys), abs(a)


def neighbours(
    boxes: Mapping[str, tuple[float, float, float, float, float]], margins: Mapping[str, int]
) -> dict[str, list[str]]:
    """Per cell of ``margins`` (``{cell: margin px}``), the other cells of ``boxes``
    (``{cell: grid_box}``) that overlap its box grown by its margin (one vectorised pass per
    cell: thousands of cells take well under a second)."""
    names = list(boxes)
    arr = np.array([boxes[n][:4] for n in names], dtype=float).reshape(-1, 4)
    out = {}
    for cell, margin in margins.items():
        if margin <= 0:
            out[cell] = []
            continue
        x0, y0, x1, y1, res = boxes[cell]
        pad = margin * res
        hit = (
            (arr[:, 0] < x1 + pad)
            & (arr[:, 2] > x0 - pad)
            & (arr[:, 1] < y1 + pad)
            & (arr[:, 3] > y0 - pad)
        )
        out[cell] = sorted(names[i] for i in np.flatnonzero(hit) if names[i] != cell)
    return out
