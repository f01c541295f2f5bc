"""Cloud-masked composites: a period's items loaded onto one cell's grid and combined.

Each item is masked with its per-pixel class asset (Sentinel-2 L2A ``scl`` by default:
no data, saturated, cloud shadow, cloud medium/high probability and cirrus are dropped),
then the items are combined per pixel: ``best`` takes the first clear value with the least
cloudy item first (``eo:cloud_cover``), ``median`` the median of the clear values. The
result is lazy (dask, chunk by chunk), so a worker's memory follows the cell size and
chunking, not the number of items.
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
from pydantic import Field

from relay_models.config import FrozenConfig

from .load import load_scene

log = logging.getLogger(__name__)

#: Sentinel-2 L2A SCL classes that are not a clear view of the ground: 0 no data,
#: 1 saturated or defective, 3 cloud shadow, 8/9 cloud medium/high probability, 10 cirrus.
S2_SCL_MASKED = (0, 1, 3, 8, 9, 10)


class CompositeConfig(FrozenConfig):
    """How a period's items become one image per cell."""

    #: ``best``: least cloudy clear value first; ``median`` of the clear values.
    method: Literal["best", "median"] = "best"
    #: Per-pixel class asset to mask with (none: no masking). Items without it are loaded
    #: unmasked, with a warning.
    mask_asset: str | None = "scl"
    #: Classes of ``mask_asset`` that are not a clear view.
    mask_values: tuple[int, ...] = Field(default=S2_SCL_MASKED)

    def recipe(self) -> str:
        """The settings as a string that goes into the store's fingerprint."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


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
    chunk_px: int = 512,
) -> tuple[xr.DataArray, list[str]]:
    """The lazy ``(band, y, x)`` float32 composite of ``items`` on ``geobox`` (NaN where no
    item had a clear view), and the warnings to pass on to the user.

    Raises:
        MissingAssetError, CorruptRasterError: a band asset is absent or unreadable.
    """
    config = config or CompositeConfig()
    warnings = []
    if config.mask_asset:
        unmasked = [it.id for it in items if config.mask_asset not in it.assets]
        if unmasked:
            warnings.append(
                f"items {', '.join(unmasked)} have no {config.mask_asset!r} asset: loaded "
                f"without a cloud mask"
            )
    image = load_scene(
        items,
        bands,
        geobox=geobox,
        composite="best" if config.method == "best" else "median",
        chunk_px=chunk_px,
        mask_asset=config.mask_asset,
        mask_values=config.mask_values,
    )
    image.attrs["recipe"] = config.recipe()
    for w in warnings:
        log.warning(w)
    return image, warnings
