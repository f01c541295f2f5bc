"""Synthetic but realistic sample scenes: multi-band COGs, label COGs and a STAC collection.

Each scene is a UTM (EPSG:32633) 10 m grid of uint16 reflectance x 10000 (blue, green, red,
nir; 0 = nodata) over six land-cover classes with spatial structure and noise. Two pairs of
classes look the same up close and differ only by their surroundings, at a larger scale
than a local window, so context matters:

* **forest** vs **park**: the same trees; a park is a patch inside a town, a forest a patch
  in the countryside.
* **lake** vs **river**: the same water; a river is a band that crosses the whole scene,
  a lake a blob in the fields.

Everything is deterministic by ``seed``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pystac
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from relaymap.catalog.items import CLASSIFICATION_SCHEMA
from relaymap.catalog.storage import atomic_upload, atomic_write, join, normalize_url

CRS = "EPSG:32633"
RES_M = 10.0
BANDS = ("blue", "green", "red", "nir")
NODATA = 0
LABEL_NODATA = 255  # one label nodata everywhere: sources, stores (ignore) and maps
COLLECTION_ID = "relaymap-sample"


@dataclass(frozen=True)
class LandCover:
    """One class of the sample scenes: label code, name, colour and mean reflectance."""

    code: int
    name: str
    color_hint: str
    reflectance: tuple[float, float, float, float]  # blue, green, red, nir (x 10000)


CLASSES: tuple[LandCover, ...] = (
    LandCover(10, "cropland", "E8D36B", (600, 900, 1000, 3000)),
    LandCover(20, "forest", "1F6F2B", (300, 500, 350, 3500)),
    LandCover(30, "park", "7BD36B", (300, 500, 350, 3500)),  # = forest, inside towns
    LandCover(40, "urban", "C2473B", (1200, 1300, 1400, 2000)),
    LandCover(50, "lake", "2B6FD3", (600, 500, 300, 150)),
    LandCover(60, "river", "6BC5E8", (600, 500, 300, 150)),  # = lake, crosses the scene
)
#: The label asset's classes (classification 1.1: value, name, description, colour).
LABEL_CLASSES = [
    {"value": c.code, "name": c.name, "description": c.name, "color_hint": c.color_hint}
    for c in CLASSES
]
#: The extensions sample items use (their fields count only when declared).
S2_EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
]

#: Pairs that only context separates.
CONTEXT_PAIRS: tuple[tuple[str, str], ...] = (("forest", "park"), ("lake", "river"))


def _lerp(values: np.ndarray, at: np.ndarray, axis: int) -> np.ndarray:
    """``np.interp(at, arange(n), values)`` along ``axis`` of ``values``, for every line at
    once, with ``np.interp``'s arithmetic (``slope * (x - j) + v[j]``): the same numbers as
    a loop of ``np.interp`` calls, without the loop."""
    n = values.shape[axis]
    j = np.minimum(np.floor(at).astype(np.intp), n - 2)
    lo, hi = np.take(values, j, axis=axis), np.take(values, j + 1, axis=axis)
    frac = at - j
    frac = frac if axis == values.ndim - 1 else frac.reshape(-1, *([1] * (values.ndim - 1 - axis)))
    return (hi - lo) * frac + lo


def _smooth(shape: tuple[int, int], cell_px: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [-1, 1]: random values on a ``cell_px`` lattice, bilinear between."""
    h, w = shape
    gh, gw = int(h / cell_px) + 2, int(w / cell_px) + 2
    grid = rng.uniform(-1, 1, (gh, gw))
    ys, xs = np.arange(h) / cell_px, np.arange(w) / cell_px
    return _lerp(_lerp(grid, xs, axis=1), ys, axis=0)


def _blob_field(shape, n, radius_px, rng, allowed=None, wobble=0.3, reach=None) -> np.ndarray:
    """Distance to the nearest of ``n`` wobbly round blobs, in blob radii (< 1 inside),
    centres drawn where ``allowed``.

    ``reach``: compute each blob only over the box where its value can be below ``reach``
    (``inf`` beyond every box): the same field wherever it is below ``reach``, so the same
    result for any threshold under it, at a cost that follows the blobs' area instead of
    ``n`` times the scene's. None: every blob over the whole scene."""
    h, w = shape
    field = np.full(shape, np.inf)
    edge = _smooth(shape, radius_px / 2, rng) * wobble
    yy = xx = None
    for _ in range(n):
        for _try in range(50):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            if allowed is None or allowed[int(cy), int(cx)]:
                break
        r = radius_px * rng.uniform(0.7, 1.3)
        if reach is None:
            if yy is None:
                yy, xx = np.mgrid[0:h, 0:w]
            field = np.minimum(field, np.hypot(yy - cy, xx - cx) / r - edge)
            continue
        half = r * (reach + wobble) + 1  # |edge| <= wobble: beyond, the value is >= reach
        y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 1)
        x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        by, bx = np.mgrid[y0:y1, x0:x1]
        box = field[y0:y1, x0:x1]
        np.minimum(box, np.hypot(by - cy, bx - cx) / r - edge[y0:y1, x0:x1], out=box)
    return field


def make_layout(
    size_px: int, feature_px: int, rng: np.random.Generator, houses: int = 0
) -> np.ndarray:
    """Class-index map ``(size, size)`` (indices into :data:`CLASSES`); ``houses``: that many
    small buildings (urban, 3 to 5 px squares) scattered over the cropland, objects that only
    full resolution shows."""
    shape = (size_px, size_px)
    idx = {c.name: i for i, c in enumerate(CLASSES)}
    cls = np.full(shape, idx["cropland"], dtype=np.uint8)
    n_towns = max(1, round(size_px**2 / (6 * feature_px) ** 2))
    reach = 2.0  # above every threshold used below (1.4 the largest)
    town_field = _blob_field(shape, n_towns, 2.2 * feature_px, rng, reach=reach)
    towns = town_field < 1
    rural = town_field > 1.4  # a margin of fields around every town
    cls[towns] = idx["urban"]
    parks = (
        _blob_field(
            shape, 2 * n_towns, 0.6 * feature_px, rng, allowed=town_field < 0.6, reach=reach
        )
        < 1
    ) & towns
    cls[parks] = idx["park"]
    forest_field = _blob_field(
        shape, 3 * n_towns, 0.6 * feature_px, rng, allowed=rural, reach=reach
    )
    forests = (forest_field < 1) & rural
    cls[forests] = idx["forest"]
    lake_field = _blob_field(shape, 1, 0.8 * feature_px, rng, allowed=rural & ~forests, reach=reach)
    lake = (lake_field < 1) & rural
    cls[lake] = idx["lake"]
    # a river crossing the scene, about as wide as a park
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(float)
    phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5) * feature_px
    centre = size_px * rng.uniform(0.3, 0.7) + amp * np.sin(xx / (3 * feature_px) + phase)
    width = 0.5 * feature_px * (1 + 0.2 * _smooth(shape, feature_px, rng))
    cls[np.abs(yy - centre) < width / 2] = idx["river"]
    for _ in range(houses):
        side = int(rng.integers(3, 6))
        y, x = rng.integers(0, size_px - side, 2)
        if (cls[y : y + side, x : x + side] == idx["cropland"]).all():
            cls[y : y + side, x : x + side] = idx["urban"]
    return cls


def render(cls: np.ndarray, rng: np.random.Generator, feature_px: int) -> np.ndarray:
    """uint16 reflectance ``(4, H, W)`` for a class map: class spectra, field-to-field and
    textured variation, pixel noise."""
    shape = cls.shape
    means = np.array([c.reflectance for c in CLASSES], dtype=np.float64)  # K, 4
    img = means[cls].transpose(2, 0, 1)  # 4, H, W
    fields = 1 + 0.15 * np.sign(_smooth(shape, feature_px / 3, rng))  # patchy fields
    texture = 1 + 0.08 * _smooth(shape, 4, rng)
    crop = cls == 0
    img[:, crop] *= fields[crop]
    img *= texture
    img *= 1 + 0.03 * rng.standard_normal(img.shape)
    return np.clip(img, 1, 10000).astype(np.uint16)


def _write_cog(url: str, data: np.ndarray, transform, nodata: int, dtype: str) -> None:
    profile = dict(
        driver="COG",
        width=data.shape[-1],
        height=data.shape[-2],
        count=1,
        dtype=dtype,
        crs=CRS,
        transform=transform,
        nodata=nodata,
        compress="DEFLATE",
        blocksize=512,
        overview_resampling="nearest",
    )
    with atomic_upload(url, suffix=".tif") as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data[np.newaxis])


def make_sample_scenes(
    out_url: str,
    *,
    n_scenes: int = 3,
    size_px: int = 512,
    feature_px: int = 64,
    seed: int = 0,
    nodata_corner: bool = True,
    houses: int = 0,
) -> pystac.Collection:
    """Write ``n_scenes`` scenes as COGs plus a STAC collection (``collection.json`` and
    ``items/<id>.json``) under ``out_url`` (``file://`` or ``s3://``).

    Args:
        out_url: folder URL for the COGs and the STAC JSON.
        n_scenes: number of scenes (items), one day apart.
        size_px: scene side in pixels (10 m).
        feature_px: typical size of parks, forests and the river's width; give it about
            the local window side so the context classes need the global window.
        seed: everything is a function of the seed.
        nodata_corner: give every second scene a nodata triangle in a corner.
        houses: small buildings per scene (:func:`make_layout`).

    Returns:
        The collection, with its items, hrefs absolute.
    """
    out_url = normalize_url(out_url)
    rng = np.random.default_rng(seed)
    to_lonlat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    items = []
    for i in range(n_scenes):
        item_id = f"sample-{i:02d}"
        x0, y0 = 500_000 + i * (size_px + 100) * RES_M, 4_800_000.0  # scenes side by side
        transform = from_origin(x0, y0, RES_M, RES_M)
        cls = make_layout(size_px, feature_px, rng, houses)
        img = render(cls, rng, feature_px)
        labels = np.array([c.code for c in CLASSES], dtype=np.uint8)[cls]
        if nodata_corner and i % 2 == 1:
            yy, xx = np.mgrid[0:size_px, 0:size_px]
            corner = yy + xx < size_px // 4
            img[:, corner] = NODATA
            labels[corner] = LABEL_NODATA
        assets = {}
        for b, band in enumerate(BANDS):
            href = join(out_url, item_id, f"{band}.tif")
            _write_cog(href, img[b], transform, NODATA, "uint16")
            assets[band] = pystac.Asset(
                href,
                media_type=pystac.MediaType.COG,
                roles=["data"],
                extra_fields={
                    "eo:bands": [{"name": band, "common_name": band}],
                    "raster:bands": [
                        {
                            "data_type": "uint16",
                            "nodata": NODATA,
                            "scale": 1e-4,
                            "offset": 0.0,
                            "spatial_resolution": RES_M,
                        }
                    ],
                },
            )
        label_href = join(out_url, item_id, "labels.tif")
        _write_cog(label_href, labels, transform, LABEL_NODATA, "uint8")
        assets["labels"] = pystac.Asset(
            label_href,
            media_type=pystac.MediaType.COG,
            roles=["labels"],
            extra_fields={
                "raster:bands": [
                    {"data_type": "uint8", "nodata": LABEL_NODATA, "spatial_resolution": RES_M}
                ],
                "classification:classes": LABEL_CLASSES,
            },
        )
        xs, ys = [x0, x0 + size_px * RES_M], [y0 - size_px * RES_M, y0]
        lon, lat = to_lonlat.transform([xs[0], xs[1], xs[1], xs[0]], [ys[0], ys[0], ys[1], ys[1]])
        ring = [[lo, la] for lo, la in zip(lon, lat, strict=True)]
        item = pystac.Item(
            item_id,
            geometry={"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
            bbox=[min(lon), min(lat), max(lon), max(lat)],
            datetime=dt.datetime(2024, 6, 1 + i, 10, 0, tzinfo=dt.UTC),
            properties={
                "proj:code": CRS,
                "proj:shape": [size_px, size_px],
                "proj:transform": list(transform)[:6],
                "eo:cloud_cover": float(np.round(rng.uniform(0, 40), 1)),
                "gsd": RES_M,
            },
            stac_extensions=[*S2_EXTENSIONS, CLASSIFICATION_SCHEMA],
            collection=COLLECTION_ID,
        )
        for key, asset in assets.items():
            item.add_asset(key, asset)
        items.append(item)

    collection = pystac.Collection(
        COLLECTION_ID,
        description="Synthetic 10 m scenes with context-dependent land-cover classes.",
        extent=pystac.Extent(
            pystac.SpatialExtent(
                [
                    [
                        min(it.bbox[0] for it in items),
                        min(it.bbox[1] for it in items),
                        max(it.bbox[2] for it in items),
                        max(it.bbox[3] for it in items),
                    ]
                ]
            ),
            pystac.TemporalExtent([[items[0].datetime, items[-1].datetime]]),
        ),
        license="CC0-1.0",
        # the summaries use these extensions' fields: declared, as validators require
        stac_extensions=[S2_EXTENSIONS[0], CLASSIFICATION_SCHEMA],
        summaries=pystac.Summaries(
            {
                "classification:classes": LABEL_CLASSES,
                "eo:bands": [{"name": b, "common_name": b} for b in BANDS],
            }
        ),
    )
    collection.add_items(items)
    save_collection(collection, out_url)
    return collection


def save_collection(collection: pystac.Collection, out_url: str) -> None:
    """Write ``collection.json`` and ``items/<id>.json`` (absolute hrefs) under ``out_url``."""
    out_url = normalize_url(out_url)
    col_href = join(out_url, "collection.json")
    collection.set_self_href(col_href)
    for item in collection.get_items():
        item.set_self_href(join(out_url, "items", f"{item.id}.json"))
        atomic_write(item.self_href, json.dumps(item.to_dict(transform_hrefs=False)).encode())
    atomic_write(col_href, json.dumps(collection.to_dict(transform_hrefs=False)).encode())


@dataclass(frozen=True)
class SyntheticChange:
    """A known land-cover change in :func:`make_s2_area`'s imagery: from date ``since`` on,
    the ``from_class`` pixels of a ``side_px`` square (a field) become ``to_class``.

    The square is the one inside ``within`` (``(y0, x0, y1, x1)`` pixels of the area; default
    the whole area) whose surroundings (the square and ``clearance_px`` around it) hold the
    most ``from_class`` pixels, searched on a lattice of a quarter side, so it is a function
    of the layout alone (no random draw).
    """

    #: Index into ``dates`` of the first date showing the change.
    since: int = 1
    from_class: str = "cropland"
    to_class: str = "urban"
    side_px: int = 64
    within: tuple[int, int, int, int] | None = None
    #: Prefer a square with this many pixels of ``from_class`` around it too (a field amid
    #: fields, not one beside a town).
    clearance_px: int = 0


def s2_area_layout(size_px: int, feature_px: int = 48, seed: int = 0) -> np.ndarray:
    """The class-index layout (indices into :data:`CLASSES`) :func:`make_s2_area` draws for
    these arguments (before any :class:`SyntheticChange`)."""
    return make_layout(size_px, feature_px, np.random.default_rng(seed))


def change_mask(cls: np.ndarray, change: SyntheticChange) -> np.ndarray:
    """``(H, W)`` bool: the pixels of layout ``cls`` that ``change`` turns into its class."""
    names = [c.name for c in CLASSES]
    for name in (change.from_class, change.to_class):
        if name not in names:
            raise ValueError(f"unknown class {name!r}; the classes are {', '.join(names)}")
    src = cls == names.index(change.from_class)
    y0, x0, y1, x1 = change.within or (0, 0, *cls.shape)
    side, step = change.side_px, max(1, change.side_px // 4)
    if side > min(y1 - y0, x1 - x0):
        raise ValueError(f"a {side} px change does not fit in {change.within or cls.shape}")
    c = change.clearance_px
    # the from_class pixels of every candidate box at once, from a summed-area table; the
    # first best in row-major order, as a scan with a strict "better" keeps it
    table = np.zeros((cls.shape[0] + 1, cls.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = src.cumsum(0).cumsum(1)
    ys, xs = np.arange(y0, y1 - side + 1, step), np.arange(x0, x1 - side + 1, step)
    top, bottom = np.maximum(0, ys - c), np.minimum(cls.shape[0], ys + side + c)
    left, right = np.maximum(0, xs - c), np.minimum(cls.shape[1], xs + side + c)
    counts = (
        table[bottom[:, None], right[None, :]]
        - table[top[:, None], right[None, :]]
        - table[bottom[:, None], left[None, :]]
        + table[top[:, None], left[None, :]]
    )
    iy, ix = np.unravel_index(np.argmax(counts), counts.shape)
    at = (int(ys[iy]), int(xs[ix]))
    mask = np.zeros(cls.shape, dtype=bool)
    mask[at[0] : at[0] + side, at[1] : at[1] + side] = True
    return mask & src


#: Sentinel-2 L2A scene classification (SCL) codes used by :func:`make_s2_area`.
SCL_SHADOW, SCL_VEGETATION, SCL_BARE, SCL_WATER, SCL_CLOUD = 3, 4, 5, 6, 9
#: L2A from processing baseline 04.00: DN = 10000 * reflectance + 1000.
S2_OFFSET_DN = 1000


def _scl(cls: np.ndarray) -> np.ndarray:
    """The SCL code of each class index (a lookup table: no per-pixel class names)."""
    code = {"urban": SCL_BARE, "cropland": SCL_BARE, "lake": SCL_WATER, "river": SCL_WATER}
    table = np.array([code.get(c.name, SCL_VEGETATION) for c in CLASSES], dtype=np.uint8)
    return table[cls]


def make_s2_area(
    out_url: str,
    *,
    origin: tuple[float, float],
    size_px: int,
    dates: Sequence[dt.datetime],
    feature_px: int = 48,
    seed: int = 0,
    cloudy: float = 0.25,
    collection_id: str = "sentinel-2-l2a-sample",
    change: SyntheticChange | None = None,
) -> pystac.Collection:
    """Sentinel-2 L2A-like items over one square area, as a public catalog serves them.

    Per date, two items from two orbits cover overlapping parts of the area (the western
    and the eastern 65%); the first is cloudy (``cloudy`` of its pixels under cloud, with
    shadows beside them, flagged in its ``scl`` asset), the second clear. Assets are keyed
    by common name (``blue``, ``green``, ``red``, ``nir``, ``scl``), uint16 with
    ``raster:bands`` scale 1e-4 and offset -0.1 (the post-2022 baseline), nodata 0;
    items carry ``eo:cloud_cover`` and declare their extensions. The land cover is the
    same on every date (:func:`make_layout`), so maps of different dates should agree,
    except where ``change`` says.

    Args:
        out_url: folder for the COGs and the STAC JSON.
        origin: ``(x, y)`` of the area's top-left corner in EPSG:32633 metres.
        size_px: the area's side in 10 m pixels.
        dates: one pair of items per date.
        feature_px, seed: as :func:`make_sample_scenes`.
        cloudy: fraction of the first item's pixels under cloud.
        collection_id: the items' collection.
        change: a known change from one of the dates on (default: none, the land cover is
            the same on every date); :func:`change_mask` of :func:`s2_area_layout` gives
            its pixels. The random draws are the same with or without it.

    Returns:
        The collection with its items, written under ``out_url`` (absolute hrefs).
    """
    out_url = normalize_url(out_url)
    rng = np.random.default_rng(seed)
    first = make_layout(size_px, feature_px, rng)
    changed = change_mask(first, change) if change else None
    to_lonlat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    part = round(size_px * 0.65)
    items = []
    for d, when in enumerate(dates):
        cls = first
        if change is not None and d >= change.since:
            cls = first.copy()
            cls[changed] = [c.name for c in CLASSES].index(change.to_class)
        dn = render(cls, rng, feature_px).astype(np.int32) + S2_OFFSET_DN
        for orbit, x_off in ((0, 0), (1, size_px - part)):
            item_id = f"S2-{when:%Y%m%d}-{orbit}"
            sub = np.ascontiguousarray(dn[:, :, x_off : x_off + part])
            scl = _scl(cls[:, x_off : x_off + part])
            if orbit == 0 and cloudy > 0:
                field = _blob_field(scl.shape, 4, size_px / 8, rng)
                cloud = field < np.quantile(field, cloudy)
                shadow = np.roll(cloud, (size_px // 40, size_px // 40), axis=(0, 1)) & ~cloud
                sub[:, cloud] = 8000 + S2_OFFSET_DN
                sub[:, shadow] //= 3
                scl[cloud], scl[shadow] = SCL_CLOUD, SCL_SHADOW
            else:
                cloud = np.zeros(scl.shape, dtype=bool)
            x0, y0 = origin[0] + x_off * RES_M, origin[1]
            transform = from_origin(x0, y0, RES_M, RES_M)
            assets = {}
            for name, data, dtype in (
                *((b, sub[i].clip(1, 65535), "uint16") for i, b in enumerate(BANDS)),
                ("scl", scl, "uint8"),
            ):
                href = join(out_url, item_id, f"{name}.tif")
                _write_cog(href, data.astype(dtype), transform, NODATA, dtype)
                band = {"data_type": dtype, "nodata": NODATA, "spatial_resolution": RES_M}
                if name != "scl":
                    band |= {"scale": 1e-4, "offset": -0.1}
                assets[name] = pystac.Asset(
                    href,
                    media_type=pystac.MediaType.COG,
                    roles=["data"] if name != "scl" else ["data", "cloud"],
                    extra_fields={
                        **(
                            {"eo:bands": [{"name": name, "common_name": name}]}
                            if name != "scl"
                            else {}
                        ),
                        "raster:bands": [band],
                    },
                )
            w, h = part * RES_M, size_px * RES_M
            lon, lat = to_lonlat.transform([x0, x0 + w, x0 + w, x0], [y0 - h, y0 - h, y0, y0])
            ring = [[lo, la] for lo, la in zip(lon, lat, strict=True)]
            item = pystac.Item(
                item_id,
                geometry={"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                bbox=[min(lon), min(lat), max(lon), max(lat)],
                datetime=when + dt.timedelta(minutes=orbit),
                properties={
                    "platform": "sentinel-2a" if orbit == 0 else "sentinel-2b",
                    "proj:code": CRS,
                    "proj:shape": [size_px, part],
                    "proj:transform": list(transform)[:6],
                    "eo:cloud_cover": round(100 * float(cloud.mean()), 2),
                    "s2:processing_baseline": "05.10",
                    "gsd": RES_M,
                },
                stac_extensions=list(S2_EXTENSIONS),
                collection=collection_id,
            )
            for key, asset in assets.items():
                item.add_asset(key, asset)
            items.append(item)
    lons = [it.bbox[0] for it in items] + [it.bbox[2] for it in items]
    lats = [it.bbox[1] for it in items] + [it.bbox[3] for it in items]
    collection = pystac.Collection(
        collection_id,
        description="Synthetic Sentinel-2 L2A-like items: two overlapping orbits per date, "
        "one of them cloudy, with an SCL asset.",
        extent=pystac.Extent(
            pystac.SpatialExtent([[min(lons), min(lats), max(lons), max(lats)]]),
            pystac.TemporalExtent([[min(dates), max(dates)]]),
        ),
        license="CC0-1.0",
        title="Sentinel-2 L2A sample",
    )
    collection.add_items(items)
    save_collection(collection, out_url)
    return collection
