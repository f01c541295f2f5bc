"""ingest: STAC search -> items loaded onto a grid -> multiscale Zarr scene stores.

>>> items = search(api_url, collections=["sentinel-2-l2a"], bbox=aoi, datetime="2024-06")
>>> image = load_scene(items, ["blue", "green", "red", "nir"], crs="EPSG:32633", resolution=10)
>>> labels = load_labels(label_items, image.odc.geobox, classes)
>>> store = write_scene("s3://bucket/scenes/aoi.zarr", image, labels, classes=classes)
>>> store = open_scene("s3://bucket/scenes/aoi.zarr")
"""

from __future__ import annotations

from .errors import (
    AreaError,
    CorruptRasterError,
    GridError,
    IngestError,
    MissingAssetError,
    NoImageryError,
    NoItemsFound,
    PeriodError,
    StacApiError,
    StoreError,
    UnknownCollectionError,
)
from .labels import LabelClass, classes_from_stac, classes_from_table, load_labels
from .load import load_scene
from .pipeline import ingest_items
from .sample import make_sample_scenes
from .search import search
from .store import SceneStore, open_scene, write_scene

__all__ = [
    "AreaError",
    "CorruptRasterError",
    "GridError",
    "IngestError",
    "LabelClass",
    "MissingAssetError",
    "NoImageryError",
    "NoItemsFound",
    "PeriodError",
    "SceneStore",
    "StacApiError",
    "StoreError",
    "UnknownCollectionError",
    "classes_from_stac",
    "classes_from_table",
    "ingest_items",
    "load_labels",
    "load_scene",
    "make_sample_scenes",
    "open_scene",
    "search",
    "write_scene",
]
