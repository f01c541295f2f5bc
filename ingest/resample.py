"""The one resampling rule going coarser: only valid pixels count.

GDAL's warper averages what it is told is data. A source whose nodata is declared only in
its STAC metadata (``raster:bands``; many commercial GeoTIFFs have none in their header), or
whose clouds are flagged in another asset, would have its zeros and its clouds averaged
into the coarse pixels along every edge and cloud. So going coarser, pixels are read on
their own grid (a paste, no resampling), the invalid ones (declared nodata, NaN, masked)
become nodata there, and only then are they reduced onto the target grid:

- imagery: a coarse pixel is GDAL's area-weighted ``average`` of its valid fine pixels;
- classes (labels, 255 = ignore): GDAL's ``mode`` of its valid fine labels (the majority);
- either is nodata when valid fine pixels cover less than :data:`MIN_VALID_SHARE` of its
  area (the area of the scene's edge that lies outside the source counts as not valid).

Going finer (or at the same pixel size) nothing is averaged: bilinear for imagery, the
nearest value for classes, as odc-stac reads them (:func:`resampling`).
"""

from __future__ import annotations

import math

import numpy as np
from affine import Affine
from odc.geo.geobox import GeoBox
from rasterio.warp import Resampling, reproject

from relay_models.windows import IGNORE

#: The share of a coarse pixel's area that valid fine pixels must cover for it to hold a
#: value: at least half (e.g. 13 of a 5 x 5 block; 2 of a 2 x 2 block). A coarse pixel
#: mostly of cloud, nodata or outside the scene is nodata, never a value made of a few
#: pixels at its corner.
MIN_VALID_SHARE = 0.5


def coarser(native_m: float, target_m: float) -> bool:
    """Whether a target pixel of ``target_m`` is coarser than the source's ``native_m``."""
    return target_m > native_m * 1.001


def resampling(native_m: float, target_m: float, *, classes: bool = False) -> str:
    """odc-stac's resampling onto a target that is *not* coarser (:func:`coarser` reads
    through :func:`average_valid` / :func:`majority_valid` instead): bilinear for
    imagery, the nearest value for classes; on the same grid both are a paste."""
    if coarser(native_m, target_m):
        raise ValueError("going coarser, read native pixels and reduce them (average_valid)")
    return "nearest" if classes else "bilinear"


def native_window(grid: GeoBox, dst: GeoBox, pad_px: int = 1) -> GeoBox:
    """The pixels of ``grid``'s lattice (extended past its edges where needed) that cover
    ``dst`` (any CRS), with ``pad_px`` more on each side."""
    x0, y0, x1, y1 = dst.footprint(grid.crs, npoints=16).boundingbox
    inv = ~grid.transform
    cols, rows = zip(*(inv * (x, y) for x in (x0, x1) for y in (y0, y1)), strict=True)
    c0, r0 = math.floor(min(cols)) - pad_px, math.floor(min(rows)) - pad_px
    c1, r1 = math.ceil(max(cols)) + pad_px, math.ceil(max(rows)) + pad_px
    return GeoBox((r1 - r0, c1 - c0), grid.transform * Affine.translation(c0, r0), grid.crs)


def native_chunk_px(chunk_px: int, factor: float) -> int:
    """Target chunk side for native reads ``factor`` times finer than the target: the
    read chunk divided by the next power of two of ``factor``, so a native read is about
    ``chunk_px`` wide and the chunks merge back into ``chunk_px`` ones without a split."""
    return max(chunk_px >> max(0, math.ceil(math.log2(factor))), min(chunk_px, 32))


def _warp(src: np.ndarray, src_box: GeoBox, dst_box: GeoBox, how: Resampling, nodata, dtype):
    out = np.full(dst_box.shape, nodata if nodata is not None else 0, dtype=dtype)
    reproject(
        src,
        out,
        src_transform=src_box.transform,
        src_crs=src_box.crs.to_wkt(),
        src_nodata=nodata,
        dst_transform=dst_box.transform,
        dst_crs=dst_box.crs.to_wkt(),
        dst_nodata=nodata,
        resampling=how,
        num_threads=1,
    )
    return out


def _axis_weights(src0: float, src_res: float, n_src: int, dst0: float, dst_res: float, n_dst: int):
    """``(n_dst, n_src)``: the length (in source pixels) of each target pixel that each
    source pixel covers, along one axis of two grids of one orientation."""
    edges = (dst0 + dst_res * np.arange(n_dst + 1) - src0) / src_res  # in source pixels
    lo, hi = np.minimum(edges[:-1], edges[1:])[:, None], np.maximum(edges[:-1], edges[1:])[:, None]
    i = np.arange(n_src)[None, :]
    return np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)


def _area_weights(src_box: GeoBox, dst_box: GeoBox) -> tuple[np.ndarray, np.ndarray] | None:
    """Row and column :func:`_axis_weights` when both grids are north-up on one CRS and the
    source covers the target (an item's own grid read around a target in its CRS: the
    usual case), else None. With them, an area-weighted average is two matrix products per
    axis, equal to GDAL's ``average`` (``tests/ingest/test_resample.py``) without a GDAL
    call: each call to GDAL's warper makes rasterio ``Env`` objects, and with AWS variables
    in the environment every ``Env`` builds a boto3 session (``bench/resample.py``)."""
    s, d = src_box.transform, dst_box.transform
    if src_box.crs != dst_box.crs or s.b or s.d or d.b or d.d or s.a * d.a <= 0 or s.e * d.e <= 0:
        return None
    (sh, sw), (dh, dw) = src_box.shape, dst_box.shape
    wy = _axis_weights(s.f, s.e, sh, d.f, d.e, dh)
    wx = _axis_weights(s.c, s.a, sw, d.c, d.a, dw)
    full = np.allclose(wy.sum(1), d.e / s.e) and np.allclose(wx.sum(1), d.a / s.a)
    return (wy, wx) if full else None


def _covered(wy: np.ndarray, wx: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per target pixel, the area (in source pixels) that the ``True`` pixels of ``valid``
    cover, and that area's share of the pixel, from :func:`_area_weights`."""
    area = wy @ valid.astype(np.float64) @ wx.T
    return area, area / np.outer(wy.sum(1), wx.sum(1))


def valid_share(valid: np.ndarray, src_box: GeoBox, dst_box: GeoBox) -> np.ndarray:
    """``(y, x)`` float32 on ``dst_box``: the share of each pixel's area that the ``True``
    pixels of ``valid`` (on ``src_box``, which covers ``dst_box``) cover."""
    weights = _area_weights(src_box, dst_box)
    if weights is None:
        return _warp(
            valid.astype(np.float32), src_box, dst_box, Resampling.average, None, np.float32
        )
    return _covered(*weights, valid)[1].astype(np.float32)


def average_valid(
    values: np.ndarray, src_box: GeoBox, dst_box: GeoBox, *, share: np.ndarray | None = None
) -> np.ndarray:
    """``(y, x)`` float32 on ``dst_box``: the area average of the finite pixels of
    ``values`` (float, NaN = not valid, on ``src_box``, which covers ``dst_box``); NaN
    where they cover less than :data:`MIN_VALID_SHARE` of a pixel (``share``: their
    :func:`valid_share`, when known, e.g. from another band with the same valid pixels)."""
    values = values.astype(np.float32, copy=False)
    weights = _area_weights(src_box, dst_box)
    if weights is None:
        mean = _warp(values, src_box, dst_box, Resampling.average, np.nan, np.float32)
    else:
        wy, wx = weights
        valid = np.isfinite(values)
        area, covered = _covered(wy, wx, valid)
        total = wy @ np.where(valid, values, 0.0) @ wx.T
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(area > 0, total / area, np.nan).astype(np.float32)
        share = covered if share is None else share  # from this area: no second pass
    if share is None:
        share = valid_share(np.isfinite(values), src_box, dst_box)
    mean[share < MIN_VALID_SHARE - 1e-6] = np.nan
    return mean


def majority_valid(labels: np.ndarray, src_box: GeoBox, dst_box: GeoBox) -> np.ndarray:
    """``(y, x)`` uint8 on ``dst_box``: the most frequent class of the labelled pixels of
    ``labels`` (uint8 class indices, :data:`IGNORE` = none, on ``src_box``); ``IGNORE``
    where they cover less than :data:`MIN_VALID_SHARE` of a pixel."""
    labels = labels.astype(np.uint8, copy=False)
    mode = _warp(labels, src_box, dst_box, Resampling.mode, IGNORE, np.uint8)
    mode[valid_share(labels != IGNORE, src_box, dst_box) < MIN_VALID_SHARE - 1e-6] = IGNORE
    return mode
