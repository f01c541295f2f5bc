"""Cloud-masked composites: a period's items loaded onto one cell's grid and combined.

Each item is masked by its source profile's rule (Sentinel-2 L2A ``SCL`` classes, Landsat
``qa_pixel`` bits, or the user's; see :mod:`relaymap.ingest.profiles`), then the items are
combined per pixel: ``best`` takes the first clear value with the least cloudy item first
(``eo:cloud_cover``), ``median`` the median of the clear values. The result is lazy (dask,
chunk by chunk), so a worker's memory follows the cell size and chunking, not the number
of items.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Literal

import pystac
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry

from relay_models.config import FrozenConfig

from .load import load_scene
from .profiles import ReadOptions, plan_read

log = logging.getLogger(__name__)


class CompositeConfig(FrozenConfig):
    """How a period's items become one image per cell."""

    #: ``best``: least cloudy clear value first; ``median`` of the clear values.
    method: Literal["best", "median"] = "best"


def recipe(config: CompositeConfig, read: ReadOptions) -> str:
    """The settings as a string that goes into the store's fingerprint."""
    doc = {"composite": config.model_dump(mode="json"), "read": read.recipe()}
    return json.dumps(doc, sort_keys=True)


def intersecting(items: Sequence[pystac.Item], extent: Geometry) -> list[pystac.Item]:
    """The items whose footprint intersects ``extent`` (any CRS)."""
    area = extent.to_crs("EPSG:4326")
    return [
        it for it in items if it.geometry and not Geometry(it.geometry, "EPSG:4326").disjoint(area)
    ]


def composite(
    items: Sequence[pystac.Item],
    bands: Sequence[str],
    geobox: GeoBox,
    config: CompositeConfig | None = None,
    *,
    read: ReadOptions | None = None,
    chunk_px: int = 512,
) -> tuple[xr.DataArray, list[str]]:
    """The lazy ``(band, y, x)`` float32 composite of ``items`` on ``geobox`` (NaN where no
    item had a clear view), and the warnings to pass on to the user.

    Raises:
        MissingAssetError, AmbiguousBandError, CorruptRasterError: a band asset is absent,
            ambiguous or unreadable.
    """
    config, read = config or CompositeConfig(), read or ReadOptions()
    unmasked = [
        (it.id, plan.mask.asset)
        for it in items
        if (plan := plan_read(it, bands, read)).mask is not None and plan.mask_asset is None
    ]
    warnings = (
        [
            f"items {', '.join(i for i, _ in unmasked)} have no {unmasked[0][1]!r} asset: "
            "loaded without a cloud mask"
        ]
        if unmasked
        else []
    )
    image = load_scene(
        items,
        bands,
        geobox=geobox,
        composite="best" if config.method == "best" else "median",
        chunk_px=chunk_px,
        read=read,
    )
    image.attrs["recipe"] = recipe(config, read)
    for w in warnings:
        log.warning(w)
    return image, warnings
