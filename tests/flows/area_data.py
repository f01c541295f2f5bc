"""Synthetic Sentinel-2 L2A-like sources for the area-mapping tests, on a grid-aligned area.

The area is ``2 * CELL`` pixels square with its top-left corner at a multiple of
``2 * CELL * 10`` m in EPSG:32633: exactly 2x2 cells of ``CELL`` px, or one cell of
``2 * CELL`` px. The imagery reaches ``MARGIN`` px beyond it (more than the halo).
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pystac
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject

from relaymap.catalog.storage import gdal_env, join
from relaymap.flows.area import AreaConfig
from relaymap.ingest.profiles import S2_SCL
from relaymap.ingest.sample import SyntheticChange, make_s2_area

CELL = 168  # 3 tile strides of 56 px (64 px tiles overlapping by an eighth)
X0, Y1 = 514_080.0, 4_798_080.0  # multiples of 2 * CELL * 10 m
MARGIN = 240
DATES = (dt.datetime(2026, 1, 10, 10, tzinfo=dt.UTC), dt.datetime(2026, 2, 12, 10, tzinfo=dt.UTC))


def area_geojson(inset_m: float = 1.0) -> str:
    """The area as GeoJSON in EPSG:32633 (a legacy ``crs`` member), inset so that it
    touches only its own cells."""
    x0, y0 = X0 + inset_m, Y1 - 2 * CELL * 10 + inset_m
    x1, y1 = X0 + 2 * CELL * 10 - inset_m, Y1 - inset_m
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return json.dumps(
        {
            "type": "Polygon",
            "coordinates": [ring],
            "crs": {"type": "name", "properties": {"name": "EPSG:32633"}},
        }
    )


def make_source(
    url: str, seed: int = 9, dates=DATES, change: SyntheticChange | None = None
) -> pystac.Collection:
    """The area's Sentinel-2-like items. With the default seed clouds of the cloudy orbit
    fall where the clear orbit does not reach (the area is 88-90% clear in both months)."""
    return make_s2_area(
        url,
        origin=(X0 - MARGIN * 10, Y1 + MARGIN * 10),
        size_px=2 * CELL + 2 * MARGIN,
        dates=dates,
        seed=seed,
        change=change,
    )


def variant(collection: pystac.Collection, keep: set[str], cid: str) -> pystac.Collection:
    """A new collection with copies of the ``keep`` items (to edit and serve)."""
    items = [it.clone() for it in collection.get_items() if it.id in keep]
    col = pystac.Collection(cid, "variant", collection.extent.clone(), license="CC0-1.0")
    for it in items:
        it.collection_id = cid
        col.add_item(it)
    return col


def to_crs(item: pystac.Item, folder: str, crs: str) -> None:
    """Rewrite every asset of ``item`` reprojected to ``crs`` (10 m), in place."""
    for key, asset in item.assets.items():
        dst_url = join(folder, f"{item.id}-{key}.tif")
        with rasterio.open(asset.href) as src:
            transform, w, h = calculate_default_transform(
                src.crs, crs, src.width, src.height, *src.bounds, resolution=10
            )
            out = np.zeros((h, w), dtype=src.dtypes[0])
            reproject(
                src.read(1),
                out,
                src_transform=src.transform,
                src_crs=src.crs,
                dst_transform=transform,
                dst_crs=crs,
                resampling=Resampling.nearest,
                src_nodata=0,
                dst_nodata=0,
            )
            profile = dict(
                driver="COG",
                width=w,
                height=h,
                count=1,
                dtype=src.dtypes[0],
                crs=crs,
                transform=transform,
                nodata=0,
            )
        with rasterio.open(dst_url.removeprefix("file://"), "w", **profile) as dst:
            dst.write(out[None])
        asset.href = dst_url
    item.properties["proj:code"] = crs
    item.properties.pop("proj:transform", None)
    item.properties.pop("proj:shape", None)


def replace_band(item: pystac.Item, key: str, folder: str, value: int) -> None:
    """Point ``item``'s asset ``key`` at a copy filled with ``value`` (e.g. all cloud)."""
    asset = item.assets[key]
    with rasterio.open(asset.href) as src:
        profile = src.profile | {"driver": "COG"}
        data = np.full((1, src.height, src.width), value, dtype=src.dtypes[0])
    dst_url = join(folder, f"{item.id}-{key}-{value}.tif")
    with rasterio.open(dst_url.removeprefix("file://"), "w", **profile) as dst:
        dst.write(data)
    asset.href = dst_url


def config(
    api: str, model: str, out: str, collection: str = "sentinel-2-l2a-sample", **kw
) -> AreaConfig:
    return AreaConfig.model_validate(
        {
            "area": area_geojson(),
            "period": "2026-01/2026-02",
            "model": model,
            "source": {"stac_api": api, "collections": [collection]},
            "out": out,
            "grid": {"cell_px": CELL},
            **kw,
        }
    )


def expected_clear(collection, date: dt.datetime) -> np.ndarray:
    """Pixels of the area that some item of ``date`` sees clearly (its SCL says so)."""
    clear = np.zeros((2 * CELL, 2 * CELL), dtype=bool)
    for item in collection.get_items():
        if item.datetime.date() != date.date():
            continue
        with rasterio.Env(**gdal_env()), rasterio.open(item.assets["scl"].href) as src:
            window = rasterio.windows.from_bounds(
                X0, Y1 - 2 * CELL * 10, X0 + 2 * CELL * 10, Y1, src.transform
            )
            scl = src.read(1, window=window, boundless=True, fill_value=0)
        clear |= S2_SCL.clear(scl)
    return clear
