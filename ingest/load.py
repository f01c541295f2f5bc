"""Loading STAC items onto one pixel grid, as lazy (dask) physical values.

Each item is read as its source profile says (:mod:`relaymap.ingest.profiles`: which asset
and band serve each model band, scale, offset, nodata, the cloud mask; hrefs signed by
:mod:`relaymap.ingest.signing`). One resampling rule everywhere
(:mod:`relaymap.ingest.resample`): going coarser, a band is read on its own grid, its
nodata, NaN and masked pixels dropped, and each target pixel is the average of the valid
pixels it covers (nodata where they cover less than half of it); going finer, odc-stac
reads bilinear (the nearest value for the mask). Items are then combined over time (first
valid value, or the median).
"""

from __future__ import annotations

import contextlib
import math
import uuid
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
from odc.geo.xr import xr_coords
from rasterio.errors import RasterioIOError

from relaymap.catalog.storage import gdal_env, redact

from .errors import CorruptRasterError, GridError, MissingAssetError
from .profiles import ItemRead, MaskRule, ReadOptions, band_meta, plan_read
from .resample import (
    MIN_VALID_SHARE,
    average_valid,
    coarser,
    native_chunk_px,
    native_window,
    valid_share,
)
from .resample import resampling as finer_resampling
from .signing import sign_assets

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


def resampling(native_m: float, target_m: float, *, classes: bool = False) -> str:
    """odc-stac's resampling of an asset read straight onto the target grid: GDAL's
    ``average`` (``mode`` for classes) going coarser, which only a quick look uses
    (``load_scene(overviews=True)``: it averages what the file header does not call
    nodata, and reads overviews); otherwise :func:`relaymap.ingest.resample.resampling`."""
    if coarser(native_m, target_m):
        return "mode" if classes else "average"
    return finer_resampling(native_m, target_m, classes=classes)


def pixel_metres(transform: rasterio.Affine, crs: rasterio.crs.CRS | str | None) -> float:
    """A pixel's side in metres (degrees at the equator for a geographic CRS: a rough size
    is enough to tell coarser from finer)."""
    side = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d))
    geographic = crs is not None and rasterio.crs.CRS.from_user_input(crs).is_geographic
    return side * 111_320.0 if geographic else side


@dataclass(frozen=True)
class AssetHeader:
    """What an asset's file says of itself: band count, data type, nodata, pixel size and
    its pixel grid."""

    count: int
    dtype: str
    nodata: float | None
    pixel_m: float
    grid: GeoBox


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
                            GeoBox((src.height, src.width), src.transform, src.crs),
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
    """The item with the hrefs of the assets the plan reads signed as its profile says (a
    copy), on the node that reads them: tokens never travel with tasks, items or logs.

    Raises:
        SigningError: the token service gave no token within its budget (the message
            names ``--sign none``).
    """
    return sign_assets(plan.item, plan.assets, plan.signer, timeout_s=plan.sign_timeout_s)


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


@dataclass(frozen=True)
class Inputs:
    """Which of a chunk's ``(y, x)`` blocks of one item is what, in the order
    ``map_blocks`` passes them: the bands odc-stac read onto the target grid (raw asset
    values); the mask read onto it (raw classes), if any; then the bands read on their own
    grids and reduced (:func:`_native_block`: raw values averaged over valid pixels, NaN =
    no data, masked already), and after them the mask's clear share, if reduced too."""

    #: Per model band: ``("grid", i)`` the i-th target-grid block, or ``("native", j)``
    #: the j-th reduced one.
    bands: tuple[tuple[str, int], ...]
    n_grid: int
    #: The mask of the target-grid bands: ``grid`` (raw classes after those bands),
    #: ``native`` (the last block, 1 where clear), or None (none, or no such band).
    mask: str | None

    def split(
        self, blocks: Sequence[np.ndarray], rule: MaskRule | None
    ) -> tuple[list[tuple[np.ndarray, bool]], np.ndarray | None]:
        """Per band ``(raw block, reduced)``, and where the target-grid bands are clear."""
        grid, rest = blocks[: self.n_grid], blocks[self.n_grid :]
        clear = None
        if self.mask == "grid":
            clear, rest = rule.clear(rest[0]), rest[1:]
        elif self.mask == "native":
            clear = rest[-1] > 0.5
        raws = [(grid[i], False) if kind == "grid" else (rest[i], True) for kind, i in self.bands]
        return raws, clear


def _decode_bands(
    *blocks: np.ndarray, encodings: Sequence[tuple], inputs: Inputs, mask: MaskRule | None
) -> np.ndarray:
    """One chunk of every band of an item (see :class:`Inputs`), raw asset values ->
    ``(band, y, x)`` float32 physical values, NaN where nodata or not clear. One pass per
    band, straight into the output: a task per chunk that needs every band's block keeps
    dask from loading the whole scene band by band before it can combine them."""
    raws, clear = inputs.split(blocks, mask)
    out = np.empty((len(raws), *raws[0][0].shape), dtype=np.float32)
    for band, (raw, reduced), (nodata, scale, offset) in zip(out, raws, encodings, strict=True):
        band[...] = raw
        if scale != 1:
            band *= np.float32(scale)
        if offset:
            band += np.float32(offset)
        bad = np.isnan(raw) if raw.dtype.kind == "f" else np.zeros(raw.shape, bool)
        if not reduced:  # a reduced band is masked already, its nodata NaN
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
    inputs: Inputs,
    mask: MaskRule | None,
) -> np.ndarray:
    """One chunk of every band of an item (see :class:`Inputs`), raw integer DN (or
    reduced means of DN) -> ``(band, y, x)`` int16 store counts (:class:`CountEncoding`),
    ``COUNT_FILL`` where nodata or not clear: integer arithmetic for integers, straight
    into the output."""
    raws, clear = inputs.split(blocks, mask)
    out = np.empty((len(raws), *raws[0][0].shape), dtype=np.int16)
    for band, (raw, reduced), shift, nodata in zip(out, raws, shifts, nodatas, strict=True):
        if reduced:  # means of valid DN (NaN: none), rounded as the float path rounds
            with np.errstate(invalid="ignore"):
                wide = np.rint(np.clip(raw + shift, COUNT_MIN, COUNT_MAX))
            band[...] = np.where(np.isfinite(wide), wide, COUNT_FILL)
            continue
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


def read_native(item: pystac.Item, names: Sequence[str], window: GeoBox) -> dict[str, np.ndarray]:
    """odc-stac's bands ``names`` of one item on ``window``, a part of their own pixel grid
    (a paste: nothing resampled; outside the asset, its nodata or NaN), as numpy."""
    ds = odc.stac.load([item], bands=list(names), geobox=window, resampling="nearest")
    return {n: ds[n].values[0] for n in names}


def _native_block(
    item: pystac.Item,
    groups: Sequence[tuple[GeoBox, tuple[tuple[int, str | None, float | None], ...]]],
    gbox: GeoBox,
    mask: tuple[str, MaskRule] | None,
    n_out: int,
    block_info=None,
) -> np.ndarray:
    """One target chunk of the bands an item gives at a finer pixel size than ``gbox``:
    per group of bands on one native grid, the chunk's part of that grid is read (with the
    mask, by the nearest value), nodata, NaN and masked pixels dropped, then reduced by
    :func:`relaymap.ingest.resample.average_valid`. ``(n_out, y, x)`` float32 raw values,
    NaN = no data; a member without a name is the mask's own clear share (1 = clear)."""
    (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
    dst = gbox[y0:y1, x0:x1]
    out = np.full((n_out, y1 - y0, x1 - x0), np.nan, dtype=np.float32)
    for grid, members in groups:
        window = native_window(grid, dst)
        names = [n for _, n, _ in members if n is not None]
        raw = read_native(item, names + ([mask[0]] if mask else []), window)
        clear = mask[1].clear(raw[mask[0]]) if mask else None
        last = None  # (bad, share) of the band before: bands mostly share their valid pixels
        for index, name, nodata in members:
            if name is None:
                share = valid_share(clear, window, dst)
                out[index] = share >= MIN_VALID_SHARE - 1e-6
                continue
            values = raw[name].astype(np.float32)
            bad = ~np.isfinite(values)
            if nodata is not None and not np.isnan(nodata):
                bad |= raw[name] == nodata
            if clear is not None:
                bad |= ~clear
            values[bad] = np.nan
            if last is None or not np.array_equal(bad, last[0]):
                last = bad, valid_share(~bad, window, dst)
            out[index] = average_valid(values, window, dst, share=last[1])
    return out


def _item_blocks(
    item: pystac.Item,
    plan: ItemRead,
    names: dict[str, str],
    headers: dict[tuple[str, str], AssetHeader],
    gbox: GeoBox,
    chunk_px: int,
    overviews: bool,
) -> tuple[list[da.Array], Inputs]:
    """An item's lazy ``(y, x)`` blocks on ``gbox``, ``chunk_px`` chunks (see
    :class:`Inputs`): assets at the target's pixel size or coarser read onto it by
    odc-stac, finer ones read on their own grids and reduced (with ``overviews``, finer
    ones too go through odc-stac: GDAL's average of what the file header does not call
    nodata, from the assets' overviews; a quick look only)."""
    target_m = pixel_metres(gbox.transform, str(gbox.crs))

    def native(key: str) -> bool:
        return not overviews and coarser(headers[(item.id, key)].pixel_m, target_m)

    mask = plan.mask if plan.mask_asset is not None else None
    on_grid = [b for b in plan.bands if not native(b.asset)]
    reduced = [b for b in plan.bands if native(b.asset)]
    mask_kind = None
    if mask is not None and on_grid:
        mask_kind = "native" if native(plan.mask_asset) else "grid"
    arrays = []
    # target-grid reads: bands not coarser, and their mask when it is not finer
    how = {
        names[b.band]: resampling(headers[(item.id, b.asset)].pixel_m, target_m) for b in on_grid
    }
    if mask_kind == "grid":
        header = headers[(item.id, plan.mask_asset)]
        how[plan.mask_asset] = resampling(header.pixel_m, target_m, classes=True)
    if how:
        ds = odc.stac.load(
            [item],
            bands=list(how),
            geobox=gbox,
            resampling=how,
            chunks={"x": chunk_px, "y": chunk_px},
            groupby="id",
        )
        arrays = [ds[name].isel(time=0, drop=True).data for name in how]
    # native reads, reduced: bands finer than the target, and their mask's clear share
    groups: dict[tuple, tuple[GeoBox, list]] = {}
    for i, b in enumerate(reduced):
        header = headers[(item.id, b.asset)]
        nodata = b.nodata if b.nodata is not None else header.nodata
        key = (str(header.grid.crs), header.grid.transform, tuple(header.grid.shape))
        groups.setdefault(key, (header.grid, []))[1].append((i, names[b.band], nodata))
    n_native = len(reduced) + (mask_kind == "native")
    if mask_kind == "native":
        grid = headers[(item.id, plan.mask_asset)].grid
        key = (str(grid.crs), grid.transform, tuple(grid.shape))
        groups.setdefault(key, (grid, []))[1].append((len(reduced), None, None))
    if n_native:
        factor = max(target_m / headers[(item.id, k)].pixel_m for k in plan.assets)
        step = native_chunk_px(chunk_px, factor)
        stack = da.map_blocks(
            _native_block,
            item=item,
            groups=tuple((g, tuple(m)) for g, m in groups.values()),
            gbox=gbox,
            mask=(plan.mask_asset, mask) if mask is not None else None,
            n_out=n_native,
            chunks=((n_native,), *da.core.normalize_chunks((step, step), gbox.shape)),
            dtype=np.float32,
            name=f"native-read-{uuid.uuid4().hex}",
        ).rechunk((-1, chunk_px, chunk_px))
        arrays += [stack[j] for j in range(n_native)]
    counter = {"grid": iter(range(len(on_grid))), "native": iter(range(len(reduced)))}
    kinds = ["native" if native(b.asset) else "grid" for b in plan.bands]
    order = tuple((kind, next(counter[kind])) for kind in kinds)
    return arrays, Inputs(order, len(on_grid), mask_kind)


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
    overviews: bool = False,
) -> xr.DataArray:
    """Lazy ``(band, y, x)`` float32 physical values (NaN = no data) on one grid; with
    ``counts``, the scene store's int16 counts where the sources allow it.

    Going coarser than an asset's pixels, a target pixel is the average of the valid
    (not nodata, not NaN, clear) pixels it covers, and no data where they cover less than
    :data:`relaymap.ingest.resample.MIN_VALID_SHARE` of it.

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
        overviews: going coarser, let GDAL average straight onto the target from the
            assets' overviews (fast, but nodata the file header does not declare and masked
            pixels enter the average): a quick look, such as a range check, never a scene.

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
    configure_odc()
    encoding = count_encoding(plans, headers) if counts and composite != "median" else None
    coords = xr_coords(gbox, crs_coord_name="spatial_ref")
    chunks = ((len(bands),), *da.core.normalize_chunks((chunk_px, chunk_px), gbox.shape))
    layers = []
    for plan in plans:
        item, names = _odc_ready(signed(plan), plan, headers)
        arrays, inputs = _item_blocks(item, plan, names, headers, gbox, chunk_px, overviews)
        nodatas = [
            b.nodata if b.nodata is not None else headers[(item.id, b.asset)].nodata
            for b in plan.bands
        ]
        if encoding is None:
            encodings = [(n, b.scale, b.offset) for n, b in zip(nodatas, plan.bands, strict=True)]
            fn, kw, dtype = _decode_bands, {"encodings": encodings}, np.float32
        else:
            kw = {"shifts": encoding.shifts[len(layers)], "nodatas": nodatas}
            fn, dtype = _encode_bands, np.int16
        mask = plan.mask if inputs.mask == "grid" else None
        data = da.map_blocks(
            fn, *arrays, **kw, inputs=inputs, mask=mask, new_axis=0, chunks=chunks, dtype=dtype
        )
        layers.append(xr.DataArray(data, dims=("band", "y", "x"), coords=coords))
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
