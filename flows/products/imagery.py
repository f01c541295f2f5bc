"""The imagery under the maps: a true-colour COG per cell and period from the cell's
composite (its scene store), and a VRT mosaic per period, so a user can check a class
against the pixels it was mapped from.

The COGs hold reflectance x 10000 as uint16 (red, green, blue; 0 = no data: cloud, shadow,
no item), the cell's own pixels (the store's halo is cropped away); the web map stretches
them for display. Written per cell on a Ray worker (:func:`imagery_cell`); a COG records the
inputs fingerprint of the map it belongs to, so an unchanged cell is not written again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.enums import ColorInterp

from relaymap.catalog.storage import atomic_upload, atomic_write, gdal_env
from relaymap.ingest import open_scene

from .change import INPUTS_TAG, read_tags
from .cog import GDAL_CACHE_MB, to_cog
from .mosaic import mosaic_layout

#: The bands of a true-colour picture, in the order written.
RGB = ("red", "green", "blue")
#: Reflectance -> stored value.
SCALE = 10000
IMAGERY_NODATA = 0


def true_colour(image: np.ndarray, bands: Sequence[str]) -> np.ndarray | None:
    """``(3, H, W)`` uint16 reflectance x 10000 (0 = no data) from ``(C, H, W)`` float
    reflectance (NaN = no data) with these band names; None without red, green and blue."""
    if not set(RGB) <= set(bands):
        return None
    rgb = image[[list(bands).index(b) for b in RGB]]
    valid = np.isfinite(image).all(0)
    out = np.clip(np.rint(np.nan_to_num(rgb) * SCALE), 1, 65535).astype(np.uint16)
    out[:, ~valid] = IMAGERY_NODATA
    return out


def write_rgb_cog(url: str, rgb: np.ndarray, *, crs: Any, transform: Any, tags: dict) -> None:
    """``(3, H, W)`` uint16 as a COG (tiles, average overviews, RGB, nodata 0)."""
    with (
        tempfile.TemporaryDirectory(prefix="relaymap-rgb-") as tmp,
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB),
    ):
        scratch = str(Path(tmp) / "rgb.tif")
        with rasterio.open(
            scratch,
            "w",
            driver="GTiff",
            width=rgb.shape[2],
            height=rgb.shape[1],
            count=3,
            dtype="uint16",
            crs=crs,
            transform=transform,
            nodata=IMAGERY_NODATA,
            tiled=True,
            blockxsize=512,
            blockysize=512,
            compress="ZSTD",
            photometric="RGB",
        ) as dst:
            dst.write(rgb)
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            dst.update_tags(**tags)
        with atomic_upload(url, suffix=".tif") as out:
            to_cog(scratch, out, resampling="AVERAGE")


def imagery_cell(task: Mapping[str, Any]) -> dict[str, Any]:
    """One cell's true-colour COG for one period (a worker's task; small result).

    ``task``: ``cell``, ``period``, ``store`` (the cell's scene store), ``map`` (its class
    COG, whose grid the picture takes), ``inputs`` (the map's inputs fingerprint), ``url``.
    """
    result = {"cell": task["cell"], "period": task["period"], "url": task["url"]}
    if read_tags(task["url"]).get(INPUTS_TAG) == task["inputs"]:
        return {**result, "reused": True}
    with rasterio.Env(**gdal_env()), rasterio.open(task["map"]) as src:
        crs, transform, (h, w) = src.crs, src.transform, src.shape
    store = open_scene(task["store"])
    t0 = store.geobox(0).transform
    y0, x0 = round((transform.f - t0.f) / t0.e), round((transform.c - t0.c) / t0.a)
    image, _ = store.read_box((y0, x0, y0 + h, x0 + w))
    rgb = true_colour(image, store.bands)
    if rgb is None:
        return {**result, "url": None, "warning": f"no red, green and blue in {store.bands}"}
    write_rgb_cog(task["url"], rgb, crs=crs, transform=transform, tags={INPUTS_TAG: task["inputs"]})
    return {**result, "reused": False}


def write_rgb_mosaic(url: str, cogs: Sequence[str]) -> str:
    """A 3-band VRT mosaic (red, green, blue; nodata 0) of true-colour cell COGs at
    ``url``, with relative paths and overviews as
    :func:`relaymap.flows.products.mosaic.write_mosaic`."""
    layout = mosaic_layout(url, cogs)
    bands = []
    for b, name in enumerate(RGB, start=1):
        sources = "\n".join(layout.sources(b, "UInt16"))
        bands.append(
            f"""  <VRTRasterBand dataType="UInt16" band="{b}">
    <NoDataValue>{IMAGERY_NODATA}</NoDataValue>
    <ColorInterp>{name.capitalize()}</ColorInterp>
    <Description>{escape(name)}</Description>
{sources}
  </VRTRasterBand>"""
        )
    xml = f"""{layout.header()}
{chr(10).join(bands)}
</VRTDataset>
"""
    atomic_write(url, xml.encode())
    return url


def imagery_tasks(
    cells: Mapping[str, Any], period: str, store_of: Any, folder: str
) -> list[dict[str, Any]]:
    """The tasks of one period's ``{cell: cell item}``; ``store_of(cell)`` is its scene
    store; COGs go to ``folder/<cell>.tif``."""
    from relaymap.catalog.storage import check_id, join

    return [
        {
            "kind": "imagery",
            "cell": cell,
            "period": period,
            "store": store_of(cell),
            "map": item.assets["classes"].get_absolute_href(),
            "inputs": str(item.properties.get("relaymap:inputs", "")),
            "url": join(folder, f"{check_id(cell, 'cell id')}.tif"),
        }
        for cell, item in sorted(cells.items())
    ]
