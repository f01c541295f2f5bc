"""Loading STAC items onto one pixel grid, as lazy (dask) physical values.

odc-stac reads each item's COG assets onto the target grid (reprojecting when the item's
CRS differs); each item's values then get its own nodata, scale and offset (``raster:bands``;
for Sentinel-2 L2A from processing baseline 04.00 on, the -1000 DN offset is applied when the
metadata does not carry it), and items are combined over time (first valid value, or the
median).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import dask.array as da
import numpy as np
import odc.stac
import pystac
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox
from rasterio.errors import RasterioIOError

from relaymap.catalog.storage import gdal_env, redact

from .errors import CorruptRasterError, GridError, MissingAssetError

#: ``first`` valid value in item order; ``best``: the same, least cloudy item first
#: (``eo:cloud_cover``); ``median`` of the valid values.
Composite = Literal["first", "best", "median"]


@contextlib.contextmanager
def rio_env() -> Iterator[None]:
    """rasterio/GDAL configured from the AWS environment (S3-compatible endpoints too)."""
    with rasterio.Env(**gdal_env()):
        yield


def configure_odc() -> None:
    """Give odc-stac's readers (threads and dask workers) the same GDAL settings."""
    odc.stac.configure_rio(cloud_defaults=True, **gdal_env())


def _band_meta(asset: pystac.Asset) -> list[dict]:
    """An asset's per-band metadata: STAC 1.1 ``bands`` or ``eo:bands``/``raster:bands``."""
    fields = asset.extra_fields
    if fields.get("bands"):
        return list(fields["bands"])
    eo, raster = fields.get("eo:bands") or [], fields.get("raster:bands") or []
    return [
        {**(raster[i] if i < len(raster) else {}), **(eo[i] if i < len(eo) else {})}
        for i in range(max(len(eo), len(raster)))
    ]


def band_source(item: pystac.Item, band: str) -> tuple[str, int] | None:
    """Where an item keeps a band: ``(asset key, band index)``. A single-band asset keyed by
    the band's name, or a band of any asset whose ``eo:bands`` / STAC 1.1 ``bands`` list it
    by ``name`` or ``common_name`` (a 4-band COG as NAIP, Planet or Maxar deliver)."""
    if band in item.assets:
        return band, 0
    for key, asset in item.assets.items():
        for i, meta in enumerate(_band_meta(asset)):
            if band in (meta.get("name"), meta.get("common_name"), meta.get("eo:common_name")):
                return key, i
    return None


def odc_band(item: pystac.Item, band: str) -> str:
    """odc-stac's name for a band: the asset key, or ``<asset>.<n>`` (1-based) for a band of
    a multi-band asset (whatever the item declares, odc-stac reads the right band)."""
    key, index = band_source(item, band) or (band, 0)
    multi = len(_band_meta(item.assets[key])) > 1 if key in item.assets else False
    return f"{key}.{index + 1}" if multi or index else key


def missing_bands(item: pystac.Item, bands: Sequence[str]) -> list[str]:
    """The ``bands`` that no asset of ``item`` holds."""
    return [b for b in bands if band_source(item, b) is None]


def band_encoding(item: pystac.Item, band: str) -> tuple[float | None, float, float]:
    """``(nodata, scale, offset)`` of an item's band, from ``raster:bands`` (or STAC 1.1
    ``bands``) and S2 metadata."""
    key, index = band_source(item, band) or (band, 0)
    meta = _band_meta(item.assets[key])
    info = meta[index] if index < len(meta) else {}
    nodata = info.get("nodata")
    scale = float(info.get("scale", 1.0))
    offset = info.get("offset")
    if offset is None:
        baseline = item.properties.get("s2:processing_baseline")
        # L2A from baseline 04.00: DN = 10000 * reflectance + 1000
        offset = -1000.0 * scale if baseline and float(baseline) >= 4.0 else 0.0
    return (None if nodata is None else float(nodata)), scale, float(offset)


def check_assets(items: Sequence[pystac.Item], bands: Sequence[str]) -> None:
    """Every item has every band (a single-band asset, or a band of a multi-band one), and
    each asset's header reads as a raster with that band."""
    with rio_env():
        for item in items:
            need: dict[str, int] = {}
            for band in bands:
                where = band_source(item, band)
                if where is None:
                    raise MissingAssetError(
                        f"item {item.id} has no band {band!r}: no asset of that name, and no "
                        f"asset lists it in eo:bands/bands; it has {', '.join(sorted(item.assets))}"
                    )
                need[where[0]] = max(need.get(where[0], 0), where[1] + 1)
            for key, count in need.items():
                href = item.assets[key].href
                try:
                    with rasterio.open(href) as src:
                        found = src.count
                except RasterioIOError as e:
                    raise CorruptRasterError(
                        f"item {item.id} asset {key!r} at {href} is not a readable raster: "
                        f"{redact(str(e))}"
                    ) from None
                if found < count:
                    raise MissingAssetError(
                        f"item {item.id} asset {key!r} has {found} bands but its metadata "
                        f"lists at least {count}"
                    )


def native_geobox(item: pystac.Item, band: str) -> GeoBox:
    """The pixel grid of one item's band."""
    key, _ = band_source(item, band) or (band, 0)
    with rio_env(), rasterio.open(item.assets[key].href) as src:
        return GeoBox((src.height, src.width), src.transform, src.crs)


def target_geobox(
    items: Sequence[pystac.Item],
    band: str,
    *,
    crs: str | None = None,
    resolution: float | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    geobox: GeoBox | None = None,
) -> GeoBox:
    """The output grid: ``geobox``; or ``crs`` + ``resolution`` over ``bounds`` (in ``crs``
    units, STAC order) or over the items' footprint; or the first item's native grid."""
    if geobox is not None:
        return geobox
    if crs is None and resolution is None and bounds is None:
        return native_geobox(items[0], band)
    if crs is None or resolution is None:
        raise GridError("give crs and resolution together (or a geobox, or neither)")
    if bounds is None:
        from odc.geo.geom import Geometry, unary_union

        footprint = unary_union([Geometry(it.geometry, "EPSG:4326") for it in items])
        return GeoBox.from_geopolygon(footprint.to_crs(crs), resolution=resolution, crs=crs)
    return GeoBox.from_bbox(bounds, crs=crs, resolution=resolution)


def _decode_bands(*blocks: np.ndarray, encodings: Sequence[tuple], masked: bool) -> np.ndarray:
    """One chunk of every band, raw asset values -> ``(band, y, x)`` float32 physical
    values, NaN where nodata or (with a mask block last) not clear. One pass per band,
    straight into the output: a task per chunk that needs every band's block keeps dask
    from loading the whole scene band by band before it can combine them."""
    clear = blocks[-1] if masked else None
    raws = blocks[:-1] if masked else blocks
    out = np.empty((len(raws), *raws[0].shape), dtype=np.float32)
    for band, raw, (nodata, scale, offset) in zip(out, raws, encodings, strict=True):
        band[...] = raw
        if scale != 1:
            band *= np.float32(scale)
        if offset:
            band += np.float32(offset)
        bad = np.isnan(raw) if raw.dtype.kind == "f" else np.zeros(raw.shape, bool)
        if nodata is not None and not np.isnan(nodata):
            bad |= raw == nodata
        if clear is not None:
            bad |= ~clear
        band[bad] = np.nan
    return out


def load_scene(
    items: Sequence[pystac.Item],
    bands: Sequence[str],
    *,
    crs: str | None = None,
    resolution: float | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    geobox: GeoBox | None = None,
    composite: Composite = "first",
    chunk_px: int = 1024,
    resampling: str = "bilinear",
    mask_asset: str | None = None,
    mask_values: Sequence[int] = (),
) -> xr.DataArray:
    """Lazy ``(band, y, x)`` float32 physical values (NaN = no data) on one grid.

    Args:
        items: the scene's items (e.g. a search result), combined in the given order.
        bands: asset keys to load, in the store's band order.
        crs, resolution, bounds, geobox: the target grid (see :func:`target_geobox`);
            resolution in CRS units, bounds ``(minx, miny, maxx, maxy)`` in the CRS.
        composite: ``first`` valid value in item order (a mosaic), ``best`` (the same, least
            cloudy item first) or the ``median``.
        chunk_px: dask chunk side (larger than the store's chunks: fewer, longer reads).
        resampling: for items not on the target grid (``bilinear``, ``nearest``, ...).
        mask_asset: a per-pixel class asset (Sentinel-2 ``scl``); pixels whose class is in
            ``mask_values`` (clouds, shadows, ...) count as no data. Items without the
            asset are loaded unmasked.
        mask_values: the masked classes of ``mask_asset``.

    Raises:
        MissingAssetError, CorruptRasterError: an item's band is absent or unreadable.
        GridError: an empty target grid, or an incomplete grid specification.
    """
    if not items:
        raise GridError("no items to load")
    if composite not in ("first", "best", "median"):
        raise ValueError(f"composite must be 'first', 'best' or 'median', got {composite!r}")
    if composite == "best":
        items = sorted(items, key=lambda it: it.properties.get("eo:cloud_cover", 100.0))
    check_assets(items, bands)
    gbox = target_geobox(
        items, bands[0], crs=crs, resolution=resolution, bounds=bounds, geobox=geobox
    )
    if gbox.shape[0] < 1 or gbox.shape[1] < 1:
        raise GridError(f"the target grid is empty: {gbox}")
    configure_odc()
    layers = []
    for item in items:
        masked = mask_asset is not None and mask_asset in item.assets
        names = {b: odc_band(item, b) for b in bands}  # what odc-stac calls each band
        ds = odc.stac.load(
            [item],
            bands=[*dict.fromkeys(names.values()), *([mask_asset] if masked else [])],
            geobox=gbox,
            resampling={"*": resampling, **({mask_asset: "nearest"} if masked else {})},
            chunks={"x": chunk_px, "y": chunk_px},
            groupby="id",
        )
        raws = [ds[names[band]].isel(time=0, drop=True) for band in bands]
        if masked:
            raws.append(~ds[mask_asset].isel(time=0, drop=True).isin(list(mask_values)))
        data = da.map_blocks(
            _decode_bands,
            *(r.data for r in raws),
            encodings=[band_encoding(item, band) for band in bands],
            masked=masked,
            new_axis=0,
            chunks=((len(bands),), *raws[0].data.chunks),
            dtype=np.float32,
        )
        layers.append(xr.DataArray(data, dims=("band", "y", "x"), coords=raws[0].coords))
    if composite == "median" and len(layers) > 1:
        stack = xr.concat(layers, dim="time").chunk({"time": -1})
        image = stack.median("time", skipna=True)
    else:
        image = layers[0]
        for layer in layers[1:]:
            image = image.fillna(layer)
    image = image.assign_coords(band=list(bands)).astype("float32").chunk({"band": -1})
    image.attrs = {
        # reflectance sources (scale 1e-4 and the like) are stored as scaled integers
        "reflectance": all(band_encoding(it, b)[1] < 0.01 for it in items for b in bands),
        "source_items": [it.id for it in items],
        "source_hrefs": [it.get_self_href() or "" for it in items],
        "datetime": max((it.datetime for it in items if it.datetime), default=None),
    }
    return image.transpose("band", "y", "x")
