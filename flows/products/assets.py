"""The one way a product becomes a STAC asset (of the run's collection or of an item).

Every file an area run publishes (period mosaics, imagery, stable maps, change maps, the
class-area and transition tables and their plots) is an asset with an href, a title, a
media type, roles and a few extra fields; raster layers add ``raster:bands`` and, for class
layers, ``classification:classes``. :func:`product_asset` builds one, :func:`layer_fields`
the fields of a raster layer, and :func:`add_assets` adds them to a collection or item and
declares the extensions their fields use, so a new product only says what it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pystac
from pystac.extensions.raster import RasterExtension

from relaymap.catalog.items import CLASSIFICATION_SCHEMA, class_list

from .cog import NODATA

#: Media types of the products: a GDAL VRT mosaic, a table, a plot.
VRT = "application/xml"
CSV = "text/csv"
PNG = pystac.MediaType.PNG
#: The extension each extra field belongs to, in the order they are declared.
SCHEMAS = {
    "raster:bands": RasterExtension.get_schema_uri(),
    "classification:classes": CLASSIFICATION_SCHEMA,
}


def product_asset(
    href: str,
    title: str,
    media_type: str,
    roles: Sequence[str] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> pystac.Asset:
    """A product's asset: ``href`` (URL of the file), ``title``, ``media_type`` (:data:`VRT`,
    :data:`CSV`, :data:`PNG`), ``roles`` and extra ``fields`` (``relaymap:period``,
    :func:`layer_fields`, ...)."""
    return pystac.Asset(
        href,
        title=title,
        media_type=media_type,
        roles=list(roles) if roles else None,
        extra_fields=dict(fields) if fields else None,
    )


def layer_fields(
    classes: Sequence[Mapping[str, Any]] | None = None,
    bands: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The fields of a raster layer: ``raster:bands`` (default one uint8 band with nodata
    255, a class map's) and, given ``classes`` (``index``, ``name``, ``color_hint``), its
    ``classification:classes``."""
    out: dict[str, Any] = {
        "raster:bands": [dict(b) for b in bands or [{"data_type": "uint8", "nodata": NODATA}]]
    }
    if classes is not None:
        out["classification:classes"] = class_list(classes)
    return out


def add_assets(target: pystac.Collection | pystac.Item, assets: Mapping[str, pystac.Asset]) -> None:
    """Add ``assets`` (by key) to a collection or item and declare the extensions their
    fields use."""
    for key, asset in assets.items():
        target.add_asset(key, asset)
    used = {f for a in target.assets.values() for f in a.extra_fields}
    for field, schema in SCHEMAS.items():
        if field in used and schema not in target.stac_extensions:
            target.stac_extensions.append(schema)
