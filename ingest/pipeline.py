"""STAC items to a scene store in one call (load, labels from an asset, write)."""

from __future__ import annotations

from collections.abc import Sequence

import pystac

from .errors import MissingAssetError
from .labels import classes_from_stac, load_labels
from .load import load_scene
from .store import SceneStore, write_scene

#: Read chunk side: a whole scene is read once, so large chunks (fewer requests per byte)
#: beat the store's; 2048 px ingests ~12% faster than 1024 on S3 (bench/ingest.py) for
#: ~250 MB more peak memory at 10000^2.
READ_CHUNK_PX = 2048


def ingest_items(
    items: Sequence[pystac.Item],
    url: str,
    bands: Sequence[str],
    *,
    label_asset: str | None = "labels",
    **write_kw,
) -> SceneStore:
    """Load ``bands`` of ``items`` on the first item's grid, with labels from
    ``label_asset`` (classes from its ``classification:classes``), into a store at ``url``.

    ``write_kw`` go to :func:`write_scene` (``num_levels``, ``chunk_px``, ``overwrite``).
    """
    labels, classes = None, None
    if label_asset is not None:
        if label_asset not in items[0].assets:
            raise MissingAssetError(
                f"item {items[0].id} has no label asset {label_asset!r}; it has "
                f"{', '.join(sorted(items[0].assets))} (pass label_asset=None for no labels)"
            )
        table = items[0].assets[label_asset].extra_fields.get("classification:classes")
        if not table:  # before any pixel is read: nothing is written
            raise MissingAssetError(
                f"item {items[0].id}: label asset {label_asset!r} has no "
                f"'classification:classes' (value and name per class); add them to the asset "
                f"or ingest without labels (label_asset=None)"
            )
        classes = classes_from_stac(table)
    image = load_scene(items, bands, chunk_px=READ_CHUNK_PX)
    if classes is not None:
        labels = load_labels(
            items, image.odc.geobox, classes, asset=label_asset, chunk_px=READ_CHUNK_PX
        )
    return write_scene(url, image, labels, classes=classes, **write_kw)
