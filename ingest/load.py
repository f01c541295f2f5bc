"""Loading STAC items onto one pixel grid, as lazy (dask) physical values.

Each item is read as its source profile says (:mod:`relaymap.ingest.profiles`: which asset
and band serve each model band, scale, offset, nodata, the cloud mask, href signing).
odc-stac reads the assets onto the target grid with one resampling rule everywhere: the
area average going coarser, bilinear going finer, and for class assets (masks, labels)
the mode going coarser and the nearest value going finer. Items are then combined over
time (first valid value, or the median).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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

from .errors import CorruptRasterError, GridError, IngestError, MissingAssetError
from .profiles import ItemRead, MaskRule, ReadOptions, band_meta, plan_read

#: ``first`` valid value in item order; ``best``: the same, least cloudy item first
#: (``eo:cloud_cover``); ``median`` of the valid values.
Composite = Literal["first", "best", "median"]


class SigningError(IngestError):
    """Hrefs could not be signed (the token service refused or cannot be reached)."""


@contextlib.contextmanager
def rio_env() -> Iterator[None]:
    """rasterio/GDAL configured from the AWS environment (S3-compatible endpoints too)."""
    with rasterio.Env(**gdal_env()):
        yield


def configure_odc() -> None:
    """Give odc-stac's readers (threads and dask workers) the same GDAL settings."""
    odc.stac.configure_rio(cloud_defaults=True, **gdal_env())


def resampling(native_m: float, target_m: float, *, classes: bool = False) -> str:
    """The one resampling rule: going coarser, the area average (the mode for class
    values: masks, labels); otherwise bilinear (the nearest value for classes)."""
    coarser = target_m > native_m * 1.001
    if classes:
        return "mode" if coarser else "nearest"
    return "average" if coarser else "bilinear"


def pixel_metres(transform: rasterio.Affine, crs: rasterio.crs.CRS | str | None) -> float:
    """A pixel's side in metres (degrees at the equator for a geographic CRS: a rough size
    is enough to tell coarser from finer)."""
    side = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d))
    geographic = crs is not None and rasterio.crs.CRS.from_user_input(crs).is_geographic
    return side * 111_320.0 if geographic else side


@dataclass(frozen=True)
class AssetHeader:
    """What an asset's file says of itself: band count, data type, nodata, pixel size."""

    count: int
    dtype: str
    nodata: float | None
    pixel_m: float


def read_headers(plans: Sequence[ItemRead]) -> dict[tuple[str, str], AssetHeader]:
    """The header of every asset the plans read (bands and mask), by ``(item id, key)``:
    each opens as a raster with the bands its plan needs.

    Raises:
        CorruptRasterError: an asset is not a readable raster.
        MissingAssetError: an asset has fewer bands than its metadata lists.
    """
    headers = {}
    with rio_env():
        for plan in plans:
            item = signed(plan)
            need: dict[str, int] = {}
            for b in plan.bands:
                need[b.asset] = max(need.get(b.asset, 0), b.index + 1)
            if plan.mask_asset is not None:
                need.setdefault(plan.mask_asset, 1)
            for key, count in need.items():
                href = item.assets[key].href
                try:
                    with rasterio.open(href) as src:
                        header = AssetHeader(
                            src.count,
                            src.dtypes[0],
                            src.nodata,
                            pixel_metres(src.transform, src.crs),
                        )
                except RasterioIOError as e:
                    raise CorruptRasterError(
                        f"item {item.id} asset {key!r} at {plan.item.assets[key].href} is not a "
                        f"readable raster: {redact(str(e))}"
                    ) from None
                if header.count < count:
                    raise MissingAssetError(
                        f"item {item.id} asset {key!r} has {header.count} bands but its "
                        f"metadata lists at least {count}"
                    )
                headers[(item.id, key)] = header
    return headers


def signed(plan: ItemRead) -> pystac.Item:
    """The item with its hrefs signed as its profile says (a copy), on the node that reads
    them: tokens never travel with tasks, items or logs."""
    if plan.signer is None:
        return plan.item
    import planetary_computer
    import requests

    try:
        return planetary_computer.sign(plan.item, copy=True)
    except (requests.RequestException, ValueError) as e:
        raise SigningError(
            f"cannot sign the hrefs of item {plan.item.id} with the Planetary Computer token "
            f"service ({planetary_computer.settings.Settings.get().sas_url}): "
            f"{redact(str(e))}"
        ) from None


def _odc_ready(item: pystac.Item, plan: ItemRead, headers) -> tuple[pystac.Item, dict[str, str]]:
    """A copy of ``item`` that odc-stac reads as the plan says, and odc-stac's name for
    each model band (``asset``, or ``asset.N`` for a band of a multi-band asset).

    odc-stac needs ``raster:bands`` (a data type per band) to read a multi-band asset;
    many providers publish ``eo:bands`` only: the file's own header supplies what the
    metadata lacks. A band without any nodata value is read as floats, so that where the
    item has no pixel (outside its footprint) odc-stac fills NaN, never a 0 that looks like
    data."""
    item = item.clone()
    names = {}
    for key in dict.fromkeys(b.asset for b in plan.bands):
        header, asset = headers[(item.id, key)], item.assets[key]
        meta = band_meta(asset)
        raster = []
        for i in range(header.count):
            m = meta[i] if i < len(meta) else {}
            nodata = m.get("nodata", header.nodata)
            entry = {"data_type": m.get("data_type", header.dtype)}
            if nodata is None:
                entry["data_type"] = "float32"
            else:
                entry["nodata"] = nodata
            raster.append(entry)
        asset.extra_fields["raster:bands"] = raster
        asset.extra_fields.pop("bands", None)
    for b in plan.bands:
        multi = (
            headers[(item.id, b.asset)].count > 1 or len(band_meta(plan.item.assets[b.asset])) > 1
        )
        names[b.band] = f"{b.asset}.{b.index + 1}" if multi or b.index else b.asset
    return item, names


def target_geobox(
    items: Sequence[pystac.Item],
    plan: ItemRead,
    *,
    crs: str | None = None,
    resolution: float | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    geobox: GeoBox | None = None,
) -> GeoBox:
    """The output grid: ``geobox``; or ``crs`` + ``resolution`` over ``bounds`` (in ``crs``
    units, STAC order) or over the items' footprint; or the first band's native grid,
    at ``resolution`` when given (the native CRS and origin)."""
    if geobox is not None:
        return geobox
    if crs is None and bounds is None:
        with rio_env(), rasterio.open(signed(plan).assets[plan.bands[0].asset].href) as src:
            native = GeoBox((src.height, src.width), src.transform, src.crs)
        if resolution is None:
            return native
        crs = str(native.crs)
        bounds = tuple(native.boundingbox)
    if crs is None or resolution is None:
        raise GridError("give crs and resolution together (or a geobox, or neither)")
    if bounds is None:
        from odc.geo.geom import Geometry, unary_union

        footprint = unary_union([Geometry(it.geometry, "EPSG:4326") for it in items])
        return GeoBox.from_geopolygon(footprint.to_crs(crs), resolution=resolution, crs=crs)
    return GeoBox.from_bbox(bounds, crs=crs, resolution=resolution)


def _decode_bands(
    *blocks: np.ndarray, encodings: Sequence[tuple], mask: MaskRule | None
) -> np.ndarray:
    """One chunk of every band, raw asset values -> ``(band, y, x)`` float32 physical
    values, NaN where nodata or (with a mask block last) not clear. One pass per band,
    straight into the output: a task per chunk that needs every band's block keeps dask
    from loading the whole scene band by band before it can combine them."""
    clear = mask.clear(blocks[-1]) if mask is not None else None
    raws = blocks[:-1] if mask is not None else blocks
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


#: The scene store's int16 counts (:mod:`relaymap.ingest.store`): no data, valid range,
#: and the scale of the standard encoding (reflectance in counts of 1e-4).
COUNT_FILL, COUNT_MIN, COUNT_MAX, COUNT_SCALE = -32768, -32767, 32767, 1e-4


@dataclass(frozen=True)
class CountEncoding:
    """How integer sources go to the store's int16 counts without a float detour: per item
    and band ``count = DN + shift`` (clipped to the int16 range; no data and masked pixels
    ``COUNT_FILL``), read back as ``count * scale_factor + add_offset`` (CF)."""

    scale_factor: float
    add_offset: float
    #: ``shifts[item][band]``: what to add to the raw DN.
    shifts: tuple[tuple[int, ...], ...]

    def attrs(self) -> dict[str, float]:
        return {"scale_factor": self.scale_factor, "add_offset": self.add_offset}


def count_encoding(
    plans: Sequence[ItemRead], headers: dict[tuple[str, str], AssetHeader]
) -> CountEncoding | None:
    """The int16 count encoding of the plans' bands, or None when they need floats.

    Integer reflectance bands (``scale < 0.01``) with a nodata value and one scale over
    every item and band qualify (each item's offset may differ by whole DNs). With the
    store's standard scale (1e-4, the Sentinel-2 and sample case) the counts are exactly the
    ones the float path stores (``DN + offset / 1e-4``, ``add_offset`` 0); any other scale
    (Landsat's 2.75e-5) is folded into the CF attributes as it is: ``count = DN - 32768``
    (every uint16 DN fits, 0 lands on the fill value) and ``add_offset = offset + 32768 *
    scale``. Floats stay for the rest: float or no-nodata assets, mixed scales, ``median``.
    """
    first = plans[0].bands[0]
    scale = first.scale
    if not all(p.reflectance for p in plans):
        return None
    for plan in plans:
        for b in plan.bands:
            header = headers[(plan.item.id, b.asset)]
            nodata = b.nodata if b.nodata is not None else header.nodata
            if np.dtype(header.dtype).kind not in "ui" or nodata is None or np.isnan(nodata):
                return None
            if not math.isclose(b.scale, scale, rel_tol=1e-9):
                return None
    standard = math.isclose(scale, COUNT_SCALE, rel_tol=1e-9)
    base_offset = 0.0 if standard else first.offset + 32768 * scale
    shifts = []
    for plan in plans:
        row = []
        for b in plan.bands:
            shift = (b.offset - base_offset) / scale
            if abs(shift - round(shift)) > 1e-6:
                return None
            row.append(round(shift))
        shifts.append(tuple(row))
    return CountEncoding(scale, base_offset, tuple(shifts))


def _encode_bands(
    *blocks: np.ndarray,
    shifts: Sequence[int],
    nodatas: Sequence[float],
    mask: MaskRule | None,
) -> np.ndarray:
    """One chunk of every band, raw integer DN -> ``(band, y, x)`` int16 store counts
    (:class:`CountEncoding`), ``COUNT_FILL`` where nodata or (with a mask block last)
    not clear: integer arithmetic only, straight into the output."""
    clear = mask.clear(blocks[-1]) if mask is not None else None
    raws = blocks[:-1] if mask is not None else blocks
    out = np.empty((len(raws), *raws[0].shape), dtype=np.int16)
    for band, raw, shift, nodata in zip(out, raws, shifts, nodatas, strict=True):
        if raw.dtype == np.uint16 and shift == -32768 and nodata == 0:
            # DN - 32768 is the top bit flipped, and nodata (DN 0) lands on the fill value
            np.bitwise_xor(raw.view(np.int16), np.int16(COUNT_FILL), out=band)
            bad = None if clear is None else ~clear
        else:
            wide = raw.astype(np.int32)
            if shift:
                wide += shift
            np.clip(wide, COUNT_MIN, COUNT_MAX, out=wide)
            band[...] = wide
            bad = raw == nodata if clear is None else (raw == nodata) | ~clear
        if bad is not None:
            band[bad] = COUNT_FILL
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
    read: ReadOptions | None = None,
    counts: bool = False,
) -> xr.DataArray:
    """Lazy ``(band, y, x)`` float32 physical values (NaN = no data) on one grid; with
    ``counts``, the scene store's int16 counts where the sources allow it.

    Args:
        items: the scene's items (e.g. a search result), combined in the given order.
        bands: the model's band names, in the store's band order (each item's profile and
            ``read`` say which asset serves each, see :func:`relaymap.ingest.profiles.plan_read`).
        crs, resolution, bounds, geobox: the target grid (see :func:`target_geobox`);
            resolution in CRS units, bounds ``(minx, miny, maxx, maxy)`` in the CRS.
        composite: ``first`` valid value in item order (a mosaic), ``best`` (the same, least
            cloudy item first) or the ``median``.
        chunk_px: dask chunk side (larger than the store's chunks: fewer, longer reads).
        read: the source profile and overrides (band map, scale, offset, mask).
        counts: integer reflectance sources come back as int16 counts, no data
            ``COUNT_FILL``, with their CF ``scale_factor``/``add_offset`` in
            ``attrs["encoding"]`` (:func:`count_encoding`; what :func:`write_scene` stores
            as it is): no float32 copy of the scene is made. Sources that need floats (and
            ``median`` composites) come back as float32 as without it.

    Raises:
        MissingAssetError, AmbiguousBandError: an item lacks a band, or has two for one.
        CorruptRasterError: an asset is unreadable.
        GridError: an empty target grid, or an incomplete grid specification.
    """
    if not items:
        raise GridError("no items to load")
    if composite not in ("first", "best", "median"):
        raise ValueError(f"composite must be 'first', 'best' or 'median', got {composite!r}")
    if composite == "best":
        items = sorted(items, key=lambda it: it.properties.get("eo:cloud_cover", 100.0))
    plans = [plan_read(it, bands, read) for it in items]
    headers = read_headers(plans)
    gbox = target_geobox(
        items, plans[0], crs=crs, resolution=resolution, bounds=bounds, geobox=geobox
    )
    if gbox.shape[0] < 1 or gbox.shape[1] < 1:
        raise GridError(f"the target grid is empty: {gbox}")
    target_m = pixel_metres(gbox.transform, str(gbox.crs))
    configure_odc()
    encoding = count_encoding(plans, headers) if counts and composite != "median" else None
    layers = []
    for plan in plans:
        item, names = _odc_ready(signed(plan), plan, headers)
        mask = plan.mask if plan.mask_asset is not None else None
        how = {
            names[b.band]: resampling(headers[(item.id, b.asset)].pixel_m, target_m)
            for b in plan.bands
        }
        if mask is not None:
            header = headers[(item.id, plan.mask_asset)]
            how[plan.mask_asset] = resampling(header.pixel_m, target_m, classes=True)
        encodings = [
            (
                b.nodata if b.nodata is not None else headers[(item.id, b.asset)].nodata,
                b.scale,
                b.offset,
            )
            for b in plan.bands
        ]
        ds = odc.stac.load(
            [item],
            bands=list(how),
            geobox=gbox,
            resampling=how,
            chunks={"x": chunk_px, "y": chunk_px},
            groupby="id",
        )
        raws = [ds[names[b.band]].isel(time=0, drop=True) for b in plan.bands]
        if mask is not None:
            raws.append(ds[plan.mask_asset].isel(time=0, drop=True))
        if encoding is None:
            fn, kw, dtype = _decode_bands, {"encodings": encodings}, np.float32
        else:
            shifts = encoding.shifts[len(layers)]
            kw = {"shifts": shifts, "nodatas": [e[0] for e in encodings]}
            fn, dtype = _encode_bands, np.int16
        data = da.map_blocks(
            fn,
            *(r.data for r in raws),
            **kw,
            mask=mask,
            new_axis=0,
            chunks=((len(bands),), *raws[0].data.chunks),
            dtype=dtype,
        )
        layers.append(xr.DataArray(data, dims=("band", "y", "x"), coords=raws[0].coords))
    if encoding is not None:
        image = layers[0]
        for layer in layers[1:]:  # the first valid count in item order
            image = image.where(image != COUNT_FILL, layer)
        image = image.assign_coords(band=list(bands)).chunk({"band": -1})
    elif composite == "median" and len(layers) > 1:
        stack = xr.concat(layers, dim="time").chunk({"time": -1})
        image = stack.median("time", skipna=True)
    else:
        image = layers[0]
        for layer in layers[1:]:
            image = image.fillna(layer)
    if encoding is None:
        image = image.assign_coords(band=list(bands)).astype("float32").chunk({"band": -1})
    image.attrs = {
        # reflectance sources (scale 1e-4 and the like) are stored as scaled integers
        "reflectance": all(p.reflectance for p in plans),
        "source_items": [it.id for it in items],
        "source_hrefs": [it.get_self_href() or "" for it in items],
        "datetime": max((it.datetime for it in items if it.datetime), default=None),
    }
    if encoding is not None:
        image.attrs["encoding"] = encoding.attrs()
    return image.transpose("band", "y", "x")


def missing_bands(
    item: pystac.Item, bands: Sequence[str], read: ReadOptions | None = None
) -> list[str]:
    """The ``bands`` that ``item`` cannot give (see :func:`plan_read`)."""
    out = []
    for band in bands:
        try:
            plan_read(item, [band], read)
        except MissingAssetError:
            out.append(band)
    return out
