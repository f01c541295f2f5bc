"""Local/global window arithmetic: the one place training, inference and ingest get it from.

Conventions (used everywhere in relaymap):

* Pixel coordinates are continuous ``(y, x)``: pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``,
  so the centre of pixel ``(i, j)`` is ``(i + 0.5, j + 0.5)``. Spatial pairs are ``(y, x)``.
* A :class:`Window` is a square of ``side_px`` scene pixels (level 0) centred on ``center_yx``
  and rotated by ``angle_deg`` counter-clockwise as seen on screen (y down).
* A window is shown to the model as ``out_px x out_px`` samples; output pixel ``(r, c)`` samples
  the scene at ``window.sample_points(out_px)[r, c]``.
* The global window of a local window has the same centre and angle and ``factor`` times the
  side; both are shown at the same ``out_px``, so the global window is downsampled ``factor``
  times more. Written ``256 + 1024↓4`` in the paper.
* CRS boxes follow STAC: ``(minx, miny, maxx, maxy)``; geotransforms are GDAL/rasterio affine
  coefficients ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``, ``y = d*col + e*row + f``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """A square, possibly rotated, window in scene pixel coordinates.

    Attributes:
        center_yx: window centre ``(y, x)`` in level-0 scene pixels (continuous).
        side_px: side length in level-0 scene pixels.
        angle_deg: counter-clockwise rotation about the centre, degrees.
    """

    center_yx: tuple[float, float]
    side_px: float
    angle_deg: float = 0.0

    def __post_init__(self) -> None:
        if not self.side_px > 0:
            raise ValueError(f"window side_px must be positive, got {self.side_px}")

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors ``(y, x)`` of the window's down and right directions in the scene."""
        t = math.radians(self.angle_deg)
        down = np.array([math.cos(t), math.sin(t)])
        right = np.array([-math.sin(t), math.cos(t)])
        return down, right

    def to_scene(self, offsets_yx: np.ndarray) -> np.ndarray:
        """Map window-frame offsets ``(..., 2)`` from the centre (scene px) to scene ``(y, x)``."""
        down, right = self.axes()
        offsets_yx = np.asarray(offsets_yx, dtype=np.float64)
        return (
            np.asarray(self.center_yx, dtype=np.float64)
            + offsets_yx[..., :1] * down
            + offsets_yx[..., 1:] * right
        )

    def corners(self) -> np.ndarray:
        """``(4, 2)`` scene ``(y, x)`` corners: top-left, top-right, bottom-right, bottom-left."""
        h = self.side_px / 2
        return self.to_scene(np.array([[-h, -h], [-h, h], [h, h], [h, -h]]))

    def bounds(self) -> tuple[float, float, float, float]:
        """Axis-aligned ``(y0, x0, y1, x1)`` scene box that contains the whole window."""
        c = self.corners()
        return (c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max())

    def pixel_bounds(self) -> tuple[int, int, int, int]:
        """Integer ``(y0, x0, y1, x1)`` box of the scene pixels the window touches (may be
        outside the scene); read this region, then :func:`sample_points` into it."""
        y0, x0, y1, x1 = self.bounds()
        eps = 1e-9  # a box edge on a pixel edge must not pull in the next pixel
        return (
            math.floor(y0 + eps),
            math.floor(x0 + eps),
            math.ceil(y1 - eps),
            math.ceil(x1 - eps),
        )

    def grid_to_scene(self, rc: np.ndarray, out_px: int) -> np.ndarray:
        """Map continuous output-grid coordinates ``(..., 2)`` (row, col; pixel edges at
        integers) of an ``out_px`` sampling of the window to scene ``(y, x)``."""
        offsets = np.asarray(rc, dtype=np.float64) * (self.side_px / out_px) - self.side_px / 2
        return self.to_scene(offsets)

    def sample_points(self, out_px: int) -> np.ndarray:
        """``(out_px, out_px, 2)`` scene ``(y, x)`` sampled by each output pixel centre."""
        c = np.arange(out_px) + 0.5
        return self.grid_to_scene(np.stack(np.meshgrid(c, c, indexing="ij"), axis=-1), out_px)

    def scale(self, s: float) -> Window:
        """The same window in the coordinates of a level downsampled ``s`` times."""
        cy, cx = self.center_yx
        return Window((cy / s, cx / s), self.side_px / s, self.angle_deg)

    def level(self, out_px: int, max_level: int | None = None) -> tuple[int, float]:
        """Pyramid level to read this window from when showing it at ``out_px``, and the
        residual downsampling left to resample.

        The window shows ``side_px`` scene pixels at ``out_px``: a scale of
        ``s = side_px / out_px``. Returns the deepest level ``k`` (``2**k`` times coarser,
        at most ``max_level``) with ``2**k <= s``, and ``s / 2**k`` (``>= 1`` unless the
        window is magnified or capped).
        """
        s = self.side_px / out_px
        k = max(0, math.floor(math.log2(s) + 1e-9)) if s >= 1 else 0
        if max_level is not None:
            k = min(k, max_level)
        return k, s / 2**k

    def inside_fraction(self, shape_yx: tuple[int, int], out_px: int) -> float:
        """Fraction of the ``out_px`` samples that fall inside a ``(height, width)`` scene."""
        pts = self.sample_points(out_px)
        h, w = shape_yx
        inside = (pts[..., 0] >= 0) & (pts[..., 0] < h) & (pts[..., 1] >= 0) & (pts[..., 1] < w)
        return float(inside.mean())

    def aligned_origin(self) -> tuple[int, int] | None:
        """Top-left integer pixel if the window is unrotated, integer-sided and pixel-aligned
        (then reading it is a plain slice), else ``None``."""
        if self.angle_deg % 360 != 0 or self.side_px != int(self.side_px):
            return None
        y0 = self.center_yx[0] - self.side_px / 2
        x0 = self.center_yx[1] - self.side_px / 2
        if y0 != int(y0) or x0 != int(x0):
            return None
        return int(y0), int(x0)

    def crs_corners(self, transform: Sequence[float]) -> np.ndarray:
        """``(4, 2)`` corners as CRS ``(x, y)`` through a level-0 geotransform."""
        a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
        yx = self.corners()
        rows, cols = yx[:, 0], yx[:, 1]
        return np.stack([a * cols + b * rows + c, d * cols + e * rows + f], axis=-1)

    def crs_bbox(self, transform: Sequence[float]) -> tuple[float, float, float, float]:
        """STAC-order ``(minx, miny, maxx, maxy)`` CRS box containing the window."""
        xy = self.crs_corners(transform)
        return (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())


@dataclass(frozen=True)
class WindowPair:
    """A local window and its centred global window (``factor`` times larger)."""

    local: Window
    global_: Window
    factor: int

    def level(self, out_px: int) -> tuple[int, float]:
        """Pyramid level to read the global window from, and the residual downsampling
        (see :meth:`Window.level`)."""
        return self.global_.level(out_px)


def window_pair(
    center_yx: tuple[float, float], side_px: float, *, factor: int = 4, angle_deg: float = 0.0
) -> WindowPair:
    """The local window at ``center_yx`` and the global window ``factor`` times its side.

    Args:
        center_yx: centre in level-0 scene pixels ``(y, x)``.
        side_px: local window side in level-0 scene pixels (e.g. 256, or rescaled).
        factor: global/local side ratio (paper default 4).
        angle_deg: rotation of both windows about the shared centre.
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    local = Window(tuple(map(float, center_yx)), float(side_px), float(angle_deg))
    return WindowPair(
        local, Window(local.center_yx, local.side_px * factor, local.angle_deg), int(factor)
    )


def global_crop(out_px: int, factor: int) -> tuple[slice, slice]:
    """``(rows, cols)`` slices of ``out_px x out_px`` global-window outputs that cover exactly
    the local window: the central ``out_px / factor`` pixels of each side.

    Raises:
        ValueError: if ``out_px`` does not split into a whole, centred crop.
    """
    size = out_px // factor
    if out_px % factor or (out_px - size) % 2:
        raise ValueError(
            f"out_px={out_px} with factor={factor} has no centred whole-pixel crop: out_px must "
            f"be a multiple of factor and out_px - out_px/factor even (e.g. 256 with 4)"
        )
    start = (out_px - size) // 2
    return slice(start, start + size), slice(start, start + size)


@dataclass(frozen=True)
class Tile:
    """One inference tile: its read box and the part of it whose predictions are kept.

    Attributes:
        origin_yx: top-left scene pixel of the ``tile_px`` square read (may extend past the
            scene's bottom/right edge when the scene is smaller than a tile).
        tile_px: side of the tile.
        keep: ``(y0, x0, y1, x1)`` scene box kept from this tile; the kept boxes of a grid
            partition the scene.
    """

    origin_yx: tuple[int, int]
    tile_px: int
    keep: tuple[int, int, int, int]

    @property
    def center_yx(self) -> tuple[float, float]:
        """Centre of the read box, where the tile's global window is centred."""
        return (self.origin_yx[0] + self.tile_px / 2, self.origin_yx[1] + self.tile_px / 2)

    @property
    def window(self) -> Window:
        """The tile's read box as a (local) window."""
        return Window(self.center_yx, float(self.tile_px))

    def pair(self, factor: int) -> WindowPair:
        """The tile as a local window with its centred global window."""
        return window_pair(self.center_yx, self.tile_px, factor=factor)


def _axis_tiles(length: int, tile_px: int, stride: int) -> list[tuple[int, int, int]]:
    """``(origin, keep_start, keep_stop)`` along one axis; the last tile is flush with the end."""
    if length <= tile_px:
        return [(0, 0, length)]
    origins = [*range(0, length - tile_px, stride), length - tile_px]
    # split each overlap at its middle so kept parts partition [0, length)
    cuts = [0] + [(o0 + tile_px + o1) // 2 for o0, o1 in itertools.pairwise(origins)]
    cuts.append(length)
    return [(o, cuts[i], cuts[i + 1]) for i, o in enumerate(origins)]


def tile_grid(shape_yx: tuple[int, int], tile_px: int, *, overlap_px: int = 0) -> list[Tile]:
    """Tiles of ``tile_px`` over a ``(height, width)`` scene, overlapping by ``overlap_px``.

    Tiles step by ``tile_px - overlap_px``; the last row/column is moved back to end at the
    scene edge. A scene smaller than a tile gets one tile at the origin (read with padding).
    Overlap hides seams: blend over it (:func:`blend_weights`) or keep ``Tile.keep``.

    Raises:
        ValueError: for an empty scene or an overlap not in ``[0, tile_px)``.
    """
    h, w = shape_yx
    if h <= 0 or w <= 0:
        raise ValueError(f"scene shape must be positive, got {shape_yx}")
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap_px must be in [0, tile_px={tile_px}), got {overlap_px}")
    stride = tile_px - overlap_px
    return [
        Tile((oy, ox), tile_px, (ky0, kx0, ky1, kx1))
        for oy, ky0, ky1 in _axis_tiles(h, tile_px, stride)
        for ox, kx0, kx1 in _axis_tiles(w, tile_px, stride)
    ]


def blend_weights(tile_px: int, overlap_px: int) -> np.ndarray:
    """``(tile_px, tile_px)`` float32 weights: 1 in the centre, raised-cosine ramps over
    ``overlap_px`` at each edge (never 0), so overlapping tiles fade into each other."""
    ramp = np.ones(tile_px, dtype=np.float64)
    if overlap_px:
        t = (np.arange(overlap_px) + 0.5) / overlap_px
        up = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap_px] = np.minimum(ramp[:overlap_px], up)
        ramp[-overlap_px:] = np.minimum(ramp[-overlap_px:], up[::-1])
    return np.outer(ramp, ramp).astype(np.float32)


def cell_step(tile_px: int, overlap_px: int, levels: int) -> int:
    """The pixel step that grid cells and their halos are multiples of, so that every
    cell's tiles (stride ``tile_px - overlap_px``) and pyramid levels (``2**levels``) line up
    with those of its neighbours and of any larger cell."""
    return math.lcm(tile_px - overlap_px, 2**levels)


def cell_halo(tile_px: int, overlap_px: int, factor: int | None, levels: int) -> int:
    """Context pixels a grid cell needs around it for a seamless map.

    A tile that touches the cell reaches up to ``tile_px`` beyond its edge, and that tile's
    global window (``factor`` tiles wide, centred on it) a further ``(factor - 1) / 2``
    tiles. With this halo loaded and tiles on the :func:`cell_step` lattice, every pixel of
    the cell is predicted from the same tiles, seeing the same context, as it would be
    inside a larger cell: neighbouring cells' maps join without a seam.
    """
    reach = tile_px + math.ceil((factor - 1) * tile_px / 2) if factor else tile_px
    step = cell_step(tile_px, overlap_px, levels)
    return math.ceil(reach / step) * step
