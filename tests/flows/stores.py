"""Scene stores from arrays, for flow tests (a real store, written by ingest)."""

from __future__ import annotations

import numpy as np
import xarray as xr
from affine import Affine
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords

from relaymap.ingest import write_scene
from relaymap.ingest.labels import LabelClass


def array_store(
    url: str,
    image: np.ndarray,
    labels: np.ndarray | None,
    *,
    num_classes: int | None = None,
    num_levels: int = 2,
    chunk_px: int = 64,
    bands: list[str] | None = None,
    res: float = 10.0,
):
    """Write ``image`` ``(C, H, W)`` float32 and ``labels`` ``(H, W)`` uint8 as a store on a
    UTM grid of ``res`` m pixels."""
    c, h, w = image.shape
    gbox = GeoBox((h, w), Affine(res, 0, 500000, 0, -res, 4800000), "EPSG:32633")
    coords = xr_coords(gbox, crs_coord_name="spatial_ref")
    img = xr.DataArray(
        image.astype(np.float32),
        dims=("band", "y", "x"),
        coords={"band": bands or [f"b{i}" for i in range(c)], **coords},
        attrs={"source_items": ["synthetic"]},
    )
    lab = None if labels is None else xr.DataArray(labels, dims=("y", "x"), coords=coords)
    k = (
        num_classes
        if num_classes is not None
        else (0 if labels is None else int(labels[labels != 255].max()) + 1)
    )
    classes = [LabelClass(i, i, f"class_{i}") for i in range(k)]
    return write_scene(
        url,
        img.chunk({"y": chunk_px, "x": chunk_px}),
        None if lab is None else lab.chunk({"y": chunk_px, "x": chunk_px}),
        classes=classes,
        num_levels=num_levels,
        chunk_px=chunk_px,
    )


def stripes(h: int = 256, w: int = 256, period: int = 16, bands: int = 2):
    """Vertical stripes: labels alternate 0/1 every ``period`` px; band 0 equals the label
    (so image and labels must stay aligned through any resampling), band 1 is the column."""
    x = np.arange(w)[None, :].repeat(h, 0)
    labels = ((x // period) % 2).astype(np.uint8)
    image = np.stack([labels.astype(np.float32)] + [x.astype(np.float32) / w] * (bands - 1))
    return image, labels
