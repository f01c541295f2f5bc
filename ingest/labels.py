"""Label rasters aligned to a scene's grid, with class values mapped to ``0..K-1``.

A label source is an asset of STAC items (e.g. ESA WorldCover, or the sample scenes'
``labels``), a raster file (any CRS; reprojected with nearest) or a GeoJSON vector file
(rasterised by one property). Source values go through a class table to indices
``0..K-1``; anything not in the table, and the source's nodata, becomes 255 (ignored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import odc.stac
import pystac
import rasterio
import shapely
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords
from pyproj import Transformer
from rasterio.errors import RasterioIOError
from rasterio.features import rasterize
from shapely.geometry import mapping, shape

from relay_models.windows import IGNORE
from relaymap.catalog.storage import normalize_url, read_bytes, redact

from .errors import CorruptRasterError, IngestError
from .load import configure_odc, pixel_metres, resampling, rio_env


@dataclass(frozen=True)
class LabelClass:
    """One output class: its index, the source value mapped to it, name and colour."""

    index: int
    value: int
    name: str
    color_hint: str | None = None


def classes_from_stac(classes: Sequence[Mapping]) -> list[LabelClass]:
    """Output classes from ``classification:classes`` (in value order)."""
    ordered = sorted(classes, key=lambda c: c["value"])
    return [
        LabelClass(i, int(c["value"]), c.get("name", str(c["value"])), c.get("color_hint"))
        for i, c in enumerate(ordered)
    ]


def classes_from_table(
    table: Mapping[int, int], names: Mapping[int, str] | None = None
) -> list[LabelClass]:
    """Output classes from a ``{source value: index}`` table (indices ``0..K-1``)."""
    indices = sorted(set(table.values()))
    if indices != list(range(len(indices))) or len(indices) > IGNORE:
        raise IngestError(f"class table indices must be 0..K-1 (K <= 255), got {indices}")
    return [
        LabelClass(i, v, (names or {}).get(i, f"class_{i}"))
        for v, i in sorted(table.items(), key=lambda kv: kv[1])
    ]


def map_values(
    block: np.ndarray, classes: Sequence[LabelClass], nodata: float | None
) -> np.ndarray:
    """Source values -> class indices (uint8), 255 for nodata and unknown values."""
    keys = np.array(sorted(c.value for c in classes), dtype=np.float64)
    index_of = {c.value: c.index for c in classes}
    vals = np.array([index_of[int(k)] for k in keys], dtype=np.uint8)
    flat = block.astype(np.float64)
    pos = np.clip(np.searchsorted(keys, flat), 0, len(keys) - 1)
    hit = keys[pos] == flat
    if nodata is not None:
        hit &= flat != nodata
    return np.where(hit, vals[pos], IGNORE).astype(np.uint8)


def _from_items(
    items: Sequence[pystac.Item],
    asset: str,
    gbox: GeoBox,
    classes: Sequence[LabelClass],
    chunk_px: int,
) -> xr.DataArray:
    configure_odc()
    nodata = (items[0].assets[asset].extra_fields.get("raster:bands") or [{}])[0].get("nodata")
    with rio_env(), rasterio.open(items[0].assets[asset].href) as src:
        native_m = pixel_metres(src.transform, src.crs)
    ds = odc.stac.load(
        list(items),
        bands=[asset],
        geobox=gbox,
        # finer labels onto this grid: the majority class of each cell
        resampling=resampling(native_m, pixel_metres(gbox.transform, str(gbox.crs)), classes=True),
        chunks={"x": chunk_px, "y": chunk_px},
        groupby="id",
    )
    raw = ds[asset]
    # mosaic: first item's value where it has one
    fill = nodata if nodata is not None else 0
    merged = raw.isel(time=0, drop=True)
    for t in range(1, raw.sizes["time"]):
        merged = merged.where(merged != fill, raw.isel(time=t, drop=True))
    return merged.copy(data=merged.data.map_blocks(map_values, classes, nodata, dtype=np.uint8))


def _raster_item(url: str) -> pystac.Item:
    """A one-asset STAC item for a raster file, so odc-stac can reproject it."""
    try:
        with rio_env(), rasterio.open(url) as src:
            gb = GeoBox((src.height, src.width), src.transform, src.crs)
            nodata, dtype = src.nodata, src.dtypes[0]
    except RasterioIOError as e:
        raise CorruptRasterError(f"label raster {url} is not readable: {redact(str(e))}") from None
    footprint = gb.extent.to_crs("EPSG:4326")
    item = pystac.Item(
        "labels",
        mapping(footprint.geom),
        list(footprint.boundingbox),
        None,
        {"start_datetime": "2000-01-01T00:00:00Z", "end_datetime": "2000-01-01T00:00:00Z"},
    )
    item.add_asset(
        "labels",
        pystac.Asset(
            url,
            extra_fields={
                "raster:bands": [{"nodata": nodata, "data_type": dtype}],
                "proj:code": str(gb.crs),
                "proj:shape": list(gb.shape),
                "proj:transform": list(gb.transform)[:6],
            },
        ),
    )
    return item


def _from_vector(
    url: str, gbox: GeoBox, attribute: str, classes: Sequence[LabelClass], chunk_px: int
) -> xr.DataArray:
    try:
        doc = json.loads(read_bytes(url))
    except json.JSONDecodeError as e:
        raise IngestError(f"label file {url} is not GeoJSON: {e}") from None
    crs = (doc.get("crs", {}).get("properties", {}).get("name")) or "EPSG:4326"
    to_grid = Transformer.from_crs(crs, gbox.crs.to_wkt(), always_xy=True).transform
    shapes = []
    for i, feat in enumerate(doc.get("features", [])):
        if attribute not in (feat.get("properties") or {}):
            raise IngestError(f"feature {i} of {url} has no property {attribute!r}")
        geom = shapely.transform(
            shape(feat["geometry"]), lambda xy: np.column_stack(to_grid(xy[:, 0], xy[:, 1]))
        )
        shapes.append((geom, feat["properties"][attribute]))
    h, w = gbox.shape
    t = gbox.transform

    def burn(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        out_shape = (y1 - y0, x1 - x0)
        if not shapes:
            return np.full(out_shape, IGNORE, dtype=np.uint8)
        raw = rasterize(
            shapes, out_shape=out_shape, fill=-1, dtype="int32", transform=t * t.translation(x0, y0)
        )
        return map_values(raw, classes, -1)

    data = da.map_blocks(
        burn, chunks=da.core.normalize_chunks((chunk_px, chunk_px), (h, w)), dtype=np.uint8
    )
    return xr.DataArray(data, dims=("y", "x"), coords=xr_coords(gbox, crs_coord_name="spatial_ref"))


def load_labels(
    source: str | Sequence[pystac.Item],
    geobox: GeoBox,
    classes: Sequence[LabelClass],
    *,
    asset: str = "labels",
    attribute: str = "class",
    chunk_px: int = 512,
) -> xr.DataArray:
    """Lazy ``(y, x)`` uint8 class indices on ``geobox`` (255 = ignore).

    Args:
        source: STAC items with a label ``asset``, or a URL of a raster file or a
            GeoJSON file (``.geojson``/``.json``) whose features carry ``attribute``.
        geobox: the scene's grid.
        classes: the class table (source value -> index).
        asset: the label asset key of STAC items.
        attribute: the feature property holding the class value (vector files).
        chunk_px: dask chunk side.
    """
    if not isinstance(source, str):
        labels = _from_items(source, asset, geobox, classes, chunk_px)
    elif source.lower().endswith((".geojson", ".json")):
        labels = _from_vector(normalize_url(source), geobox, attribute, classes, chunk_px)
    else:
        labels = _from_items(
            [_raster_item(normalize_url(source))], "labels", geobox, classes, chunk_px
        )
    return labels.rename("label")
