"""STAC items to a scene store in one call (load, labels from an asset, write)."""

from __future__ import annotations

from collections.abc import Sequence

import pystac

from .errors import MissingAssetError
from .labels import LabelClass, classes_from_stac, load_labels
from .load import load_scene
from .profiles import ReadOptions
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
    class_names: Sequence[str] | None = None,
    read: ReadOptions | None = None,
    resolution: float | None = None,
    **write_kw,
) -> SceneStore:
    """Load ``bands`` of ``items`` on the first item's grid (at ``resolution``, in its CRS
    units, when given: going coarser, the average of the valid pixels, and the majority of
    the labelled ones; see :mod:`relaymap.ingest.resample`), with labels from ``label_asset``
    (classes from its ``classification:classes``, or ``class_names`` for the label values
    ``0..K-1``), into a store at ``url``. ``read``: the source profile and overrides.

    ``write_kw`` go to :func:`write_scene` (``num_levels``, ``chunk_px``, ``overwrite``).
    """
    labels = None
    classes = label_classes(items[0], label_asset, class_names)
    # integer sources go to the store's int16 counts as integers (no float32 copy)
    image = load_scene(
        items, bands, chunk_px=READ_CHUNK_PX, read=read, resolution=resolution, counts=True
    )
    if classes is not None:
        labels = load_labels(
            items, image.odc.geobox, classes, asset=label_asset, chunk_px=READ_CHUNK_PX, read=read
        )
    return write_scene(url, image, labels, classes=classes, **write_kw)


def label_classes(
    item: pystac.Item, label_asset: str | None, class_names: Sequence[str] | None = None
) -> list[LabelClass] | None:
    """The classes of ``item``'s label asset (None without one), checked before any pixel
    is read: ``class_names`` name the values ``0..K-1``, else the asset's
    ``classification:classes`` does.

    Raises:
        MissingAssetError: no such asset, or an asset that does not say its classes.
    """
    if label_asset is None:
        return None
    if label_asset not in item.assets:
        raise MissingAssetError(
            f"item {item.id} has no label asset {label_asset!r}; it has "
            f"{', '.join(sorted(item.assets))} (pass label_asset=None for no labels)"
        )
    if class_names:
        return classes_from_stac([{"value": i, "name": n} for i, n in enumerate(class_names)])
    table = item.assets[label_asset].extra_fields.get("classification:classes")
    if not table:
        raise MissingAssetError(
            f"item {item.id}: label asset {label_asset!r} has no 'classification:classes' "
            f"(value and name per class); add them to the asset, name the values 0..K-1 "
            f"(class_names=[...]), or ingest without labels (label_asset=None)"
        )
    return classes_from_stac(table)
