"""Zarr v3 scene stores: one group per scene, multiscale, readable by plain xarray.

Layout (``url`` is any fsspec URL), following the GeoZarr ``multiscales`` convention::

    url/                 root group: attributes only (``multiscales``, ``relaymap``)
      0/                 level 0:
        image  (band, y, x) reflectance, chunks (bands, 512, 512): int16 with CF
                          ``scale_factor`` 1e-4 / ``add_offset`` 0 / ``_FillValue`` -32768
                          (half the bytes of float32) for reflectance sources, else
                          float32 with NaN = no data; zarr's ``fill_value`` is the CF
                          fill, so chunks of no data are not written and read as missing
        label  (y, x) uint8 class index, 255 = ignore (``_FillValue`` and ``fill_value``)
        spatial_ref       CF grid mapping (crs_wkt, GeoTransform)
      1/, 2/, 3/         the same at x2, x4, x8: the window reader's pyramid of level 0
                          (image: mean of the valid pixels of each 2x2 cell, stored the
                          same way, within a count of the pyramid of level 0 as stored;
                          labels: majority of valid labels); chunks halved, down to 128

``xr.open_datatree(url, engine="zarr")`` opens every level with its CRS and transform (CF
decoding gives reflectance as floats, NaN = no data); ``xr.open_zarr(url, group="2")`` one
level.

Writing is resumable and atomic from a reader's view: the root attribute
``relaymap.complete`` is set last, and :func:`open_scene` refuses stores without it. An
interrupted write of the same inputs resumes at the first unfinished level; a complete
store of the same inputs is left as it is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from affine import Affine
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords
from rasterio.errors import RasterioError

from relay_models.windows import IGNORE, halve_mean, halve_mode
from relaymap.catalog.faults import fault_point
from relaymap.catalog.storage import exists, join, native, normalize_url, redact, remove

from .errors import CorruptRasterError, StoreError
from .labels import LabelClass
from .load import COUNT_FILL, COUNT_SCALE

log = logging.getLogger(__name__)

#: The store format. 3: the coarser levels of int16 counts hold the fill value where no
#: fine pixel is valid (format 2 wrote count 0 there, which reads as reflectance 0.0).
FORMAT_VERSION = 3
#: Reflectance encoding: int16 counts of 1e-4, -32768 = no data (CF scale/offset/fill).
REFLECTANCE_SCALE, REFLECTANCE_FILL = COUNT_SCALE, COUNT_FILL
ATTR = "relaymap"


def _level_group(level: int) -> str:
    return str(level)


def multiscales(num_levels: int) -> dict[str, Any]:
    """The root's GeoZarr ``multiscales`` attribute: level groups ``0..N``, each derived
    from the one above by 2x2 averaging."""
    layout = [{"asset": "0", "transform": {"scale": [1.0, 1.0], "translation": [0.0, 0.0]}}]
    layout += [
        {
            "asset": str(i),
            "derived_from": str(i - 1),
            "transform": {"scale": [2.0**i, 2.0**i], "translation": [0.0, 0.0]},
            "resampling_method": "average",
        }
        for i in range(1, num_levels + 1)
    ]
    return {"layout": layout, "resampling_method": "average"}


def encode_reflectance(x: np.ndarray) -> np.ndarray:
    """float reflectance (NaN = no data) -> int16 counts of :data:`REFLECTANCE_SCALE`."""
    out = np.rint(np.clip(x / REFLECTANCE_SCALE, -32767, 32767))
    return np.where(np.isfinite(x), out, REFLECTANCE_FILL).astype(np.int16)


def encode_counts(x: np.ndarray) -> np.ndarray:
    """float counts (levels halved from int16 counts; NaN = no data) -> int16 counts."""
    out = np.clip(x, -32767, 32767)
    np.rint(out, out=out)
    out[~np.isfinite(x)] = REFLECTANCE_FILL
    return out.astype(np.int16)


def halve_counts(block: np.ndarray) -> np.ndarray:
    """:func:`relay_models.windows.halve_mean` of int16 counts (``REFLECTANCE_FILL`` = no
    data): ``(..., h, w)`` float32 means in counts, NaN where none is valid. The same
    numbers as ``halve_mean`` of the counts as floats, without a float copy of level 0:
    the sums are exact in int32, rows first (contiguous), fills taken out where any."""
    rows = np.add(block[..., ::2, :], block[..., 1::2, :], dtype=np.int32)
    total = rows[..., ::2] + rows[..., 1::2]
    fill = block == REFLECTANCE_FILL
    if not fill.any():
        total = total.astype(np.float32)
        total *= np.float32(0.25)
        return total
    fills = np.add(fill[..., ::2, :].view(np.uint8), fill[..., 1::2, :].view(np.uint8))
    fills = fills[..., ::2] + fills[..., 1::2]
    total -= fills.astype(np.int32) * REFLECTANCE_FILL
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0: no valid pixel, NaN
        return np.divide(total, 4 - fills, dtype=np.float32)


def decode(values: np.ndarray, array: zarr.Array) -> np.ndarray:
    """Raw image values of a store array -> float32 reflectance, NaN = no data."""
    attrs = array.attrs
    if "scale_factor" not in attrs:
        return values.astype(np.float32, copy=False)
    # float64 arithmetic, then float32: the same numbers as xarray's CF decoding
    out = (values * float(attrs["scale_factor"]) + float(attrs.get("add_offset", 0.0))).astype(
        np.float32
    )
    out[values == attrs.get("_FillValue", array.fill_value)] = np.nan
    return out


def _compressor() -> Any:
    # lz4 + bit shuffle: ~3x faster than zstd on imagery, both ways; on int16 counts it
    # packs 8% smaller than byte shuffle and encodes faster (bench data, 1024^2 chunks)
    return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def level_chunk_px(chunk_px: int, level: int) -> int:
    """Chunk side at a level: halved per level (one chunk per level-0 chunk, so building a
    level never rechunks), but not below 128 px."""
    return max(chunk_px >> level, min(chunk_px, 128))


def tile_px(chunk_px: int, num_levels: int, source_px: int) -> int:
    """Level-0 rows (and columns) of a tile written in one step: whole store chunks at every
    level and whole source chunks (``source_px`` high, or wide), so a tile never writes a
    chunk or reads one twice."""
    whole = max(level_chunk_px(chunk_px, lv) << lv for lv in range(num_levels + 1))
    return math.lcm(whole, source_px)


def _pad_even(block: np.ndarray, fill: float) -> np.ndarray:
    pads = [(0, 0)] * (block.ndim - 2) + [(0, block.shape[-2] % 2), (0, block.shape[-1] % 2)]
    return np.pad(block, pads, constant_values=fill) if any(p[1] for p in pads) else block


#: Rows of a level halved at a time: each pass over a block stays in the CPU's caches
#: (halving a 2048 px tile of 4 bands: 28 ms whole, 12 ms in blocks of 32 rows)
HALVE_ROWS = 32


def _halve_image(block: np.ndarray) -> np.ndarray:
    """The next level of an image tile: means of the valid pixels of each 2x2 cell (odd
    edges padded with no data), float32, NaN = no data; int16 counts stay in counts."""
    counts = block.dtype == np.int16
    block = _pad_even(block, REFLECTANCE_FILL if counts else np.nan)
    halve = halve_counts if counts else halve_mean
    out = np.empty((*block.shape[:-2], block.shape[-2] // 2, block.shape[-1] // 2), np.float32)
    for r in range(0, out.shape[-2], HALVE_ROWS):
        out[..., r : r + HALVE_ROWS, :] = halve(block[..., 2 * r : 2 * (r + HALVE_ROWS), :])
    return out


def _count_moments(block: np.ndarray) -> list[tuple[int, int, int]]:
    """Per band of int16 counts: the sum, the sum of squares and the number of the valid
    ones, exact (integers, not floats: no rounding, whatever the scene's size), a few rows
    at a time (in the CPU's caches)."""
    out = []
    for band in block:
        s1 = s2 = fills = 0
        for r in range(0, band.shape[0], 2 * HALVE_ROWS):
            rows = band[r : r + 2 * HALVE_ROWS]
            fills += int(np.count_nonzero(rows == REFLECTANCE_FILL))
            wide = rows.astype(np.int32)
            s1 += int(wide.sum(dtype=np.int64))
            np.multiply(wide, wide, out=wide)  # <= 2**30: no overflow
            s2 += int(wide.sum(dtype=np.int64))
        out.append(
            (s1 - fills * REFLECTANCE_FILL, s2 - fills * REFLECTANCE_FILL**2, band.size - fills)
        )
    return out


def _dataset(
    gbox: GeoBox, bands: Sequence[str], chunk_px: int, labels: bool, scaled: bool
) -> xr.Dataset:
    """A level's variables, coordinates and attributes, on lazy zeros that are never
    computed: what ``to_zarr(compute=False)`` needs to write the metadata."""
    coords = xr_coords(gbox, crs_coord_name="spatial_ref")  # CF grid mapping + GeoTransform
    shape = (len(bands), *gbox.shape.yx)
    image = da.zeros(shape, dtype=np.float32, chunks=-1)  # one task: a graph to build, not run
    data = {
        "image": xr.DataArray(
            image, dims=("band", "y", "x"), coords={"band": np.array(bands, dtype=object), **coords}
        )
    }
    if labels:
        label = da.zeros(shape[1:], dtype=np.uint8, chunks=-1)
        data["label"] = xr.DataArray(label, dims=("y", "x"), coords=coords)
    ds = xr.Dataset(data)
    ds["image"].attrs.update(grid_mapping="spatial_ref", long_name="reflectance")
    if not scaled:
        ds["image"].attrs["_FillValue"] = np.float32(np.nan)
    if labels:
        ds["label"].attrs.update(
            grid_mapping="spatial_ref",
            long_name="class index",
            flag_values=IGNORE,
            flag_meanings="ignore",
        )
    return ds


def _encoding(
    ds: xr.Dataset, bands: int, chunk_px: int, scaled: bool, cf: dict[str, float] | None = None
) -> dict[str, dict]:
    enc = {"image": {"chunks": (bands, chunk_px, chunk_px), "compressors": [_compressor()]}}
    if scaled:
        cf = cf or {"scale_factor": REFLECTANCE_SCALE, "add_offset": 0.0}
        enc["image"] |= {
            "dtype": "int16",
            "scale_factor": float(cf["scale_factor"]),
            "add_offset": float(cf["add_offset"]),
            # the CF fill and zarr's are one: a chunk never written (all no data: zarr
            # skips such chunks) reads as no data through zarr, xarray and odc-stac alike
            "_FillValue": REFLECTANCE_FILL,
            "fill_value": REFLECTANCE_FILL,
        }
    if "label" in ds:
        enc["label"] = {
            "chunks": (chunk_px, chunk_px),
            "compressors": [_compressor()],
            "_FillValue": IGNORE,
            "fill_value": IGNORE,
        }
    return enc


@dataclass(frozen=True)
class SceneAttrs:
    """What a scene store records about itself (root attribute ``relaymap``)."""

    fingerprint: str
    complete: bool
    levels_done: tuple[int, ...]
    num_levels: int
    bands: tuple[str, ...]
    source_items: tuple[str, ...]
    classes: tuple[dict, ...]
    band_mean: tuple[float, ...]
    band_std: tuple[float, ...]
    nodata: str = "nan"
    created: str = ""
    #: Self hrefs of the source items ("" where unknown), for ``derived_from`` links.
    source_hrefs: tuple[str, ...] = ()
    #: Latest source datetime (ISO 8601), the nominal time of maps made from the scene.
    datetime: str | None = None
    #: :data:`FORMAT_VERSION` of the writer (stores before format 3 do not record it: 2).
    format: int = 2

    @classmethod
    def read(cls, url: str) -> SceneAttrs | None:
        try:
            group = zarr.open_group(native(url), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            return None
        raw = dict(group.attrs).get(ATTR)
        if raw is None:
            return None
        fields = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in raw.items()
            if k in cls.__dataclass_fields__
        }
        return cls(**fields)

    def write(self, url: str, *, create: bool = False) -> None:
        """Record these attributes on the store's root group; ``create``: make the root
        group with them, in one write (a new store is marked ours before anything else is
        in it, so a write killed at any point leaves a folder the next run may replace)."""
        doc = {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
        if create:
            zarr.open_group(native(url), mode="w", zarr_format=3, attributes={ATTR: doc})
            return
        group = zarr.open_group(native(url), mode="r+")
        group.attrs[ATTR] = doc


def fingerprint(
    gbox: GeoBox,
    bands: Sequence[str],
    source_items: Sequence[str],
    classes: Sequence[LabelClass] | None,
    num_levels: int,
    chunk_px: int,
    recipe: str | None = None,
) -> str:
    """Hash of everything that defines a store's content (``recipe``: how the image was
    made from its items, e.g. a composite's method and mask)."""
    doc = dict(
        crs=str(gbox.crs),
        transform=list(gbox.transform)[:6],
        shape=list(gbox.shape),
        bands=list(bands),
        items=list(source_items),
        levels=num_levels,
        chunk=chunk_px,
        classes=[c.__dict__ for c in classes] if classes else None,
        v=FORMAT_VERSION,
        **({"recipe": recipe} if recipe else {}),
    )
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def write_scene(
    url: str,
    image: xr.DataArray,
    labels: xr.DataArray | None = None,
    *,
    classes: Sequence[LabelClass] | None = None,
    num_levels: int = 3,
    chunk_px: int = 512,
    overwrite: bool = False,
) -> SceneStore:
    """Write (or finish, or keep) a scene store.

    Args:
        url: the store's URL (``file://``, ``s3://`` ...).
        image: ``(band, y, x)`` from :func:`ingest.load_scene` (lazy is best): float32
            physical values, or int16 counts with their CF ``attrs["encoding"]``
            (``load_scene(counts=True)``), stored as they are.
        labels: ``(y, x)`` uint8 from :func:`ingest.load_labels` on the same grid, or None.
        classes: the label classes, recorded in the attributes.
        num_levels: downsampled levels to add (3: x2, x4, x8).
        chunk_px: chunk side (chunks hold all bands).
        overwrite: replace a complete store that holds other inputs.

    Returns:
        The store, opened.

    Raises:
        StoreError: a complete store of other inputs exists and ``overwrite`` is False.
        CorruptRasterError: a source raster failed to decode (nothing is left behind).
    """
    url = normalize_url(url)
    gbox = image.odc.geobox
    bands = [str(b) for b in image["band"].values]
    sources = list(image.attrs.get("source_items", []))
    if labels is not None and labels.shape != image.shape[1:]:
        raise StoreError(f"labels {labels.shape} and image {image.shape[1:]} grids differ")
    fp = fingerprint(gbox, bands, sources, classes, num_levels, chunk_px, image.attrs.get("recipe"))
    scaled = bool(image.attrs.get("reflectance"))
    attrs = SceneAttrs.read(url) if exists(url) else None
    if attrs is not None and attrs.fingerprint == fp and attrs.complete:
        log.info("%s is complete for these inputs: nothing to do", url)
        return open_scene(url)
    if attrs is not None and attrs.fingerprint != fp:
        # a store of an older format is ours and outdated: rewritten, whatever it held
        if attrs.complete and not overwrite and attrs.format == FORMAT_VERSION:
            raise StoreError(
                f"{url} already holds a scene of other inputs (items "
                f"{', '.join(attrs.source_items)}); pass overwrite=True to replace it"
            )
        attrs = None
    if attrs is None and exists(url):
        if SceneAttrs.read(url) is None:  # not ours: never delete what we did not write
            raise StoreError(
                f"{url} exists and is not a relaymap scene store (no '{ATTR}' marker); "
                f"remove it yourself or choose another URL"
            )
        log.info("%s: removing an unfinished or replaced store", url)
        remove(url, recursive=True)
    done = set(attrs.levels_done) if attrs else set()
    new_attrs = attrs or SceneAttrs(
        fingerprint=fp,
        complete=False,
        levels_done=(),
        num_levels=num_levels,
        bands=tuple(bands),
        source_items=tuple(sources),
        source_hrefs=tuple(image.attrs.get("source_hrefs", ())),
        datetime=when.isoformat() if (when := image.attrs.get("datetime")) else None,
        classes=tuple(
            {"index": c.index, "value": c.value, "name": c.name, "color_hint": c.color_hint}
            for c in classes or ()
        ),
        band_mean=(),
        band_std=(),
        created=dt.datetime.now(dt.UTC).isoformat(),
        format=FORMAT_VERSION,
    )
    if attrs is None:
        new_attrs.write(url, create=True)
    try:
        # one pass over the sources (or, finishing an interrupted store, over level 0),
        # tile by tile: every missing level halved from the level above while the tile is
        # in memory (before rounding to counts), and the band statistics
        start = min(set(range(num_levels + 1)) - done)
        # int16 counts from load_scene(counts=True) are stored as they are, with their CF
        # scale/offset; their levels are halved from the counts (no float copy of level 0)
        cf = image.attrs.get("encoding") if image.dtype == np.int16 else None
        if cf is None and image.dtype.kind in "iu":  # integers without an encoding: values
            image = image.astype(np.float32)
        if start == 0:
            img, lab = image.data, None if labels is None else labels.data
        else:  # level 0 as stored: counts stay counts
            top = _open_level(url, 0, raw=True)
            img = top["image"].data
            lab = top["label"].data if "label" in top else None
            if img.dtype == np.int16:
                cf = {k: float(top["image"].attrs[k]) for k in ("scale_factor", "add_offset")}
        levels = range(start, num_levels + 1)

        def create() -> dict[int, tuple[zarr.Array, zarr.Array | None]]:
            """The missing levels' groups (metadata, coordinates), their arrays by level."""
            targets = {}
            for level in levels:
                _write_level(url, gbox, level, bands, chunk_px, lab is not None, scaled, cf)
                if level == 0:
                    new_attrs.write(url)  # the marker: from here on this folder is ours
                    root = zarr.open_group(native(url), mode="r+")
                    root.attrs["multiscales"] = multiscales(num_levels)
                group = zarr.open_group(native(url), path=_level_group(level), mode="r+")
                targets[level] = (group["image"], group["label"] if lab is not None else None)
            return targets

        # whole store chunks at every level and whole source chunks in each tile
        tile = tuple(tile_px(chunk_px, num_levels, img.chunks[i][0]) for i in (1, 2))
        sums = _write_tiles(
            img, lab, create, levels=levels, tile=tile, cf=cf, scaled=scaled, stats=start == 0
        )
        fault_point("ingest:pixels-written")  # crash tests: pixels in, levels not marked
        if sums is not None:
            mean, std = _band_stats(sums, cf)
            new_attrs = _replace(new_attrs, band_mean=mean, band_std=std)
        new_attrs = _replace(new_attrs, levels_done=tuple(range(num_levels + 1)))
        new_attrs.write(url)
    except RasterioError as e:  # a source tile failed to decode: nothing half-written stays
        remove(url, recursive=True)
        raise CorruptRasterError(
            f"a source raster of {url} could not be decoded ({redact(str(e))}); "
            f"no store was left behind"
        ) from None
    _replace(new_attrs, complete=True).write(url)
    return open_scene(url)


def _write_tiles(
    img: da.Array,
    lab: da.Array | None,
    create: Callable[[], dict[int, tuple[zarr.Array, zarr.Array | None]]],
    *,
    levels: range,
    tile: tuple[int, int],
    cf: dict[str, float] | None,
    scaled: bool,
    stats: bool,
) -> np.ndarray | None:
    """Store ``img`` (level 0: int16 counts with their CF ``cf``, or float32) and ``lab``
    into the ``levels`` (their arrays made by ``create``) a ``tile`` of level-0 pixels at
    a time, row by row of tiles. Three stages overlap, a tile in each: the main thread
    reads a tile (its bands in parallel, by dask), a thread halves the one before it into
    every level and encodes them, and a writer thread (which first makes the levels) stores
    the one before that (zarr compresses its chunks in parallel). Memory holds three tiles,
    whatever the scene's size; one writer, in order, so tiles never race for a chunk.

    Returns:
        ``(bands, 3)`` sums for :func:`_band_stats` of level 0 with ``stats``, else None.
    """
    if any(side % (1 << levels[-1]) for side in tile):
        raise ValueError(f"tiles of {tile} px do not halve {levels[-1]} times")
    (height, width), sums = img.shape[1:], [] if stats else None

    def prepare(block: np.ndarray, labels: np.ndarray | None) -> list:
        """``(level, stored image, labels)`` of every level to write, from a tile."""
        if sums is not None:
            sums.append(_count_moments(block) if block.dtype == np.int16 else _moments(block))
        out = []
        for level in range(levels[-1] + 1):
            if level:
                block = _halve_image(block)
                labels = None if labels is None else halve_mode(_pad_even(labels, IGNORE))
            if level not in levels:
                continue
            if block.dtype == np.int16:  # level 0 counts, as they are
                stored = block
            elif cf is not None:  # levels of counts: rounded means
                stored = encode_counts(block)
            else:
                stored = encode_reflectance(block) if scaled else block
            out.append((level, stored, labels))
        return out

    def store(tile_levels: list, r0: int, c0: int) -> None:
        targets = made.result()
        for level, stored, labels in tile_levels:
            image_arr, label_arr = targets[level]
            y0, x0 = r0 >> level, c0 >> level
            h, w = stored.shape[1:]
            image_arr[:, y0 : y0 + h, x0 : x0 + w] = stored
            if label_arr is not None:
                label_arr[y0 : y0 + h, x0 : x0 + w] = labels

    corners = itertools.product(range(0, height, tile[0]), range(0, width, tile[1]))
    with (
        ThreadPoolExecutor(1, thread_name_prefix="relaymap-levels") as halver,
        ThreadPoolExecutor(1, thread_name_prefix="relaymap-store") as writer,
    ):
        made = written = writer.submit(create)  # while the first tile is read
        halved: tuple[Future, int, int] | None = None  # a tile's levels, its corner
        for r0, c0 in corners:
            rows, cols = slice(r0, r0 + tile[0]), slice(c0, c0 + tile[1])
            block, labels = dask.compute(
                img[:, rows, cols], None if lab is None else lab[rows, cols]
            )
            if halved is not None:  # a tile in each stage, no more
                tile_levels = halved[0].result()
                written.result()
                written = writer.submit(store, tile_levels, *halved[1:])
            halved = (halver.submit(prepare, block, labels), r0, c0)
        tile_levels = halved[0].result()
        written.result()
        writer.submit(store, tile_levels, *halved[1:]).result()
    if sums is None:
        return None
    # exact integer sums of counts stay exact until here
    return np.array(
        [[sum(x[b][i] for x in sums) for i in range(3)] for b in range(img.shape[0])],
        dtype=np.float64,
    )


def _moments(block: np.ndarray) -> list[tuple[float, float, int]]:
    """Per band of float values (NaN = no data): the sum, the sum of squares and the
    number of the valid ones."""
    out = []
    for band in block:
        v = band[np.isfinite(band)].astype(np.float64)
        out.append((float(v.sum()), float(v @ v), v.size))
    return out


def _band_stats(
    sums: np.ndarray, cf: dict[str, float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation per band, in physical units, from ``(bands, 3)`` sums
    of :func:`_moments` or (with their CF ``cf``) of :func:`_count_moments`."""
    s1, s2, n = (np.asarray(sums[:, i], dtype=np.float64) for i in range(3))
    if cf is not None:  # moments of the counts c, then of s * c + o
        s, o = cf["scale_factor"], cf["add_offset"]
        s1, s2 = s * s1 + o * n, s * s * s2 + 2 * s * o * s1 + o * o * n
    n = np.maximum(n, 1)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return tuple(map(float, mean)), tuple(map(float, std))


def _write_level(
    url: str,
    gbox: GeoBox,
    level: int,
    bands: Sequence[str],
    chunk_px: int,
    labels: bool,
    scaled: bool,
    cf: dict[str, float] | None = None,
) -> None:
    """Create a level's group: metadata (CF encoding included: ``cf``, else the standard
    reflectance counts) and coordinates; the pixels are stored by the caller."""
    cpx = level_chunk_px(chunk_px, level)
    ds = _dataset(_level_box(gbox, level), bands, cpx, labels, scaled)
    ds.to_zarr(
        native(url),
        group=_level_group(level),
        mode="w",
        zarr_format=3,
        consolidated=False,
        compute=False,
        encoding=_encoding(ds, len(bands), cpx, scaled, cf),
    )


def _open_level(url: str, level: int, *, raw: bool = False) -> xr.Dataset:
    """A level as a lazy dataset: image decoded to float32 reflectance (NaN = no data),
    labels kept uint8 (255 = ignore); ``raw``: the image as stored (int16 counts with their
    CF attributes)."""
    kw = dict(group=_level_group(level), consolidated=False, zarr_format=3)
    ds = xr.open_zarr(native(url), mask_and_scale=False, **kw)
    if raw:
        return ds
    if ds["image"].dtype.kind == "i":  # scaled integers
        decoded = xr.open_zarr(native(url), mask_and_scale=True, **kw)["image"]
        ds["image"] = decoded.astype(np.float32)
    return ds


def _level_box(gbox: GeoBox, level: int) -> GeoBox:
    """The grid of a level ``2**level`` times coarser (partial edge pixels kept)."""
    f = 2**level
    return GeoBox(
        (math.ceil(gbox.shape[0] / f), math.ceil(gbox.shape[1] / f)),
        gbox.transform @ Affine.scale(f),
        gbox.crs,
    )


def _replace(attrs: SceneAttrs, **changes: Any) -> SceneAttrs:
    return SceneAttrs(**{**attrs.__dict__, **changes})


class SceneStore:
    """Lazy access to a complete scene store's levels; a
    :class:`relay_models.windows.Pyramid`, so the window reader reads windows from it."""

    def __init__(self, url: str, attrs: SceneAttrs) -> None:
        self.url = url
        self.attrs = attrs
        self._levels: dict[int, xr.Dataset] = {}
        self._arrays: dict[int, dict[str, zarr.Array]] = {}

    def level(self, level: int = 0) -> xr.Dataset:
        """The ``image`` (and ``label``) of a level as a lazy dataset."""
        self._check_level(level)
        if level not in self._levels:
            self._levels[level] = _open_level(self.url, level)
        return self._levels[level]

    def valid(self, level: int = 0) -> xr.DataArray:
        """Lazy ``(y, x)`` bool mask of pixels with data in every band."""
        return np.isfinite(self.level(level)["image"]).all("band")

    @property
    def bands(self) -> tuple[str, ...]:
        return self.attrs.bands

    @property
    def num_levels(self) -> int:
        """Levels below level 0 (a :class:`relay_models.windows.Pyramid`)."""
        return self.attrs.num_levels

    @property
    def has_labels(self) -> bool:
        return "label" in self.level(0)

    def shape(self, level: int = 0) -> tuple[int, int]:
        """``(height, width)`` in pixels of a level."""
        return tuple(self._zarr(level)["image"].shape[1:])

    def geobox(self, level: int = 0) -> GeoBox:
        return self.level(level)["image"].odc.geobox

    def read_box(
        self, box: tuple[int, int, int, int], level: int = 0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels of the integer box ``(y0, x0, y1, x1)`` at ``level``, padded outside the
        scene (image NaN, labels 255): ``(C, h, w)`` float32 and ``(h, w)`` uint8."""
        y0, x0, y1, x1 = box
        arrays = self._zarr(level)
        h, w = arrays["image"].shape[1:]
        image = np.full((len(self.bands), y1 - y0, x1 - x0), np.nan, dtype=np.float32)
        label = np.full((y1 - y0, x1 - x0), IGNORE, dtype=np.uint8) if "label" in arrays else None
        ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if ys < ye and xs < xe:
            image[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = decode(
                arrays["image"][:, ys:ye, xs:xe], arrays["image"]
            )
            if label is not None:
                label[ys - y0 : ye - y0, xs - x0 : xe - x0] = arrays["label"][ys:ye, xs:xe]
        return image, label

    def _check_level(self, level: int) -> None:
        if not 0 <= level <= self.attrs.num_levels:
            raise StoreError(f"{self.url} has levels 0..{self.attrs.num_levels}, not {level}")

    def _zarr(self, level: int) -> dict[str, zarr.Array]:
        """The level's arrays, opened once: window reads go straight to zarr (no dask)."""
        if level not in self._arrays:
            self._check_level(level)
            group = zarr.open_group(native(self.url), path=_level_group(level), mode="r")
            self._arrays[level] = {k: group[k] for k in ("image", "label") if k in group}
        return self._arrays[level]


def open_scene(url: str) -> SceneStore:
    """Open a complete scene store.

    Raises:
        StoreError: no store at ``url``, not a relaymap store, an unfinished write, or a
            store in the format before GeoZarr levels.
    """
    url = normalize_url(url)
    if not exists(url):
        raise StoreError(f"no scene store at {url}")
    attrs = SceneAttrs.read(url)
    if attrs is None:
        raise StoreError(f"{url} is not a relaymap scene store (no '{ATTR}' attributes)")
    if not attrs.complete:
        raise StoreError(
            f"{url} is an unfinished store (levels done: {list(attrs.levels_done)}); rerun "
            f"the ingest to finish it"
        )
    if not exists(join(url, _level_group(0), "zarr.json")):
        raise StoreError(
            f"{url} was written by an older relaymap (levels under the root, not the GeoZarr "
            f"groups 0..{attrs.num_levels}); ingest it again with overwrite=True"
        )
    if attrs.format < FORMAT_VERSION:
        raise StoreError(
            f"{url} was written by an older relaymap (store format {attrs.format}, whose "
            f"coarser levels read missing pixels as 0); ingest it again (the same command "
            f"rewrites it)"
        )
    return SceneStore(url, attrs)
