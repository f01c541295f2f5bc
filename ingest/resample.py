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


def valid_share(valid: np.ndarray, src_box: GeoBox, dst_box: GeoBox) -> np.ndarray:
    """``(y, x)`` float32 on ``dst_box``: the share of each pixel's area that the ``True``
    pixels of ``valid`` (on ``src_box``, which covers ``dst_box``) cover."""
    return _warp(valid.astype(np.float32), src_box, dst_box, Resampling.average, None, np.float32)


def average_valid(
    values: np.ndarray, src_box: GeoBox, dst_box: GeoBox, *, share: np.ndarray | None = None
) -> np.ndarray:
    """``(y, x)`` float32 on ``dst_box``: the area average of the finite pixels of
    ``values`` (float, NaN = not valid, on ``src_box``, which covers ``dst_box``); NaN
    where they cover less than :data:`MIN_VALID_SHARE` of a pixel (``share``: their
    :func:`valid_share`, when known, e.g. from another band with the same valid pixels)."""
    values = values.astype(np.float32, copy=False)
    mean = _warp(values, src_box, dst_box, Resampling.average, np.nan, np.float32)
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
