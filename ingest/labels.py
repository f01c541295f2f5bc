"""Label rasters aligned to a scene's grid, with class values mapped to ``0..K-1``.

A label source is an asset of STAC items (e.g. ESA WorldCover, or the sample scenes'
``labels``), a raster file (any CRS; reprojected with nearest) or a GeoJSON vector file
(rasterised by one property). Source values go through a class table to indices
``0..K-1``; anything not in the table, and the source's nodata, becomes 255 (ignored).
"""

from __future__ import annotations

import json
import uuid
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
from .load import configure_odc, pixel_metres, read_native, rio_env
from .profiles import ReadOptions, signer_of
from .resample import coarser, majority_valid, native_chunk_px, native_window, resampling
from .signing import sign_assets


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


def _label_block(
    item: pystac.Item,
    asset: str,
    grid: GeoBox,
    gbox: GeoBox,
    classes: Sequence[LabelClass],
    nodata: float | None,
    block_info=None,
) -> np.ndarray:
    """One chunk of finer labels onto ``gbox``: read on their own grid, mapped to class
    indices, then the majority of the labelled pixels (255 where they cover less than
    :data:`relaymap.ingest.resample.MIN_VALID_SHARE`)."""
    (y0, y1), (x0, x1) = block_info[None]["array-location"]
    dst = gbox[y0:y1, x0:x1]
    window = native_window(grid, dst)
    raw = read_native(item, [asset], window)[asset]
    return majority_valid(map_values(raw, classes, nodata), window, dst)


def _from_items(
    items: Sequence[pystac.Item],
    asset: str,
    gbox: GeoBox,
    classes: Sequence[LabelClass],
    chunk_px: int,
    read: ReadOptions | None = None,
) -> xr.DataArray:
    """The items' labels on ``gbox``, the first item's where it has one. Going coarser,
    a pixel's label is the majority of the labelled pixels it covers; otherwise the
    nearest label."""
    configure_odc()
    target_m = pixel_metres(gbox.transform, str(gbox.crs))
    timeout_s = read.sign_timeout_s if read is not None else None
    layers = []
    for item in items:
        item = sign_assets(item, [asset], signer_of(item, read), timeout_s=timeout_s).clone()
        meta = item.assets[asset].extra_fields
        nodata = (meta.get("raster:bands") or [{}])[0].get("nodata")
        with rio_env(), rasterio.open(item.assets[asset].href) as src:
            grid = GeoBox((src.height, src.width), src.transform, src.crs)
            native_m = pixel_metres(src.transform, src.crs)
            nodata = src.nodata if nodata is None else nodata
        if nodata is None:  # outside the raster: NaN (no label), never a 0 that is a class
            meta["raster:bands"] = [{"data_type": "float32"}]
        if coarser(native_m, target_m):
            step = native_chunk_px(chunk_px, target_m / native_m)
            data = da.map_blocks(
                _label_block,
                item=item,
                asset=asset,
                grid=grid,
                gbox=gbox,
                classes=tuple(classes),
                nodata=nodata,
                chunks=da.core.normalize_chunks((step, step), gbox.shape),
                dtype=np.uint8,
                name=f"native-labels-{uuid.uuid4().hex}",
            ).rechunk((chunk_px, chunk_px))
        else:
            ds = odc.stac.load(
                [item],
                bands=[asset],
                geobox=gbox,
                resampling=resampling(native_m, target_m, classes=True),
                chunks={"x": chunk_px, "y": chunk_px},
                groupby="id",
            )
            raw = ds[asset].isel(time=0, drop=True).data
            data = raw.map_blocks(map_values, classes, nodata, dtype=np.uint8)
        layers.append(data)
    merged = layers[0]
    for layer in layers[1:]:  # mosaic: the first item's label where it has one
        merged = da.where(merged != IGNORE, merged, layer)
    return xr.DataArray(
        merged, dims=("y", "x"), coords=xr_coords(gbox, crs_coord_name="spatial_ref")
    )


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
    read: ReadOptions | None = None,
) -> xr.DataArray:
    """Lazy ``(y, x)`` uint8 class indices on ``geobox`` (255 = ignore). Going coarser
    than the source, a pixel's label is the majority of the labelled pixels it covers,
    and 255 where they cover less than half of it
    (:func:`relaymap.ingest.resample.majority_valid`); otherwise the nearest label.

    Args:
        source: STAC items with a label ``asset``, or a URL of a raster file or a
            GeoJSON file (``.geojson``/``.json``) whose features carry ``attribute``.
        geobox: the scene's grid.
        classes: the class table (source value -> index).
        asset: the label asset key of STAC items.
        attribute: the feature property holding the class value (vector files).
        chunk_px: dask chunk side.
        read: how the items' hrefs are signed (``sign``, ``sign_timeout_s``; default: as
            each item's source profile says).
    """
    if not isinstance(source, str):
        labels = _from_items(source, asset, geobox, classes, chunk_px, read)
    elif source.lower().endswith((".geojson", ".json")):
        labels = _from_vector(normalize_url(source), geobox, attribute, classes, chunk_px)
    else:
        labels = _from_items(
            [_raster_item(normalize_url(source))], "labels", geobox, classes, chunk_px
        )
    return labels.rename("label")
