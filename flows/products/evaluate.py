"""Scoring a map against labels: a confusion matrix over the pixels both have, with the
scores and pictures of :mod:`relaymap.flows.products.report`."""

from __future__ import annotations

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from relay_models import ConfusionMatrix
from relaymap.catalog.items import read_item
from relaymap.catalog.storage import gdal_env, normalize_url
from relaymap.ingest import StoreError, open_scene

from .cog import category_names

NODATA = 255


def read_map(ref: str) -> tuple[str, list[str]]:
    """``(class COG URL, class names)`` of a map item (``.json``) or a class COG (names
    from its category names, else ``class_0..``).

    Raises:
        StoreError: no map there, or not a map.
    """
    url = normalize_url(ref)
    if url.endswith(".json"):
        try:
            item = read_item(url)
        except FileNotFoundError:
            raise StoreError(f"no map item at {url}") from None
        except ValueError as e:
            raise StoreError(str(e)) from None
        asset = item.assets.get("classes")
        if asset is None:
            raise StoreError(f"{url} is not a relaymap map item (no 'classes' asset)")
        classes = asset.extra_fields.get("classification:classes") or []
        names = [c["name"] for c in sorted(classes, key=lambda c: c["value"])]
        return asset.get_absolute_href() or asset.href, names
    with rasterio.Env(**gdal_env()), _open(url, "map") as src:
        k = int(src.read(1, masked=True).max()) + 1
    names = category_names(url)
    return url, names if len(names) >= k else [f"class_{i}" for i in range(k)]


def _open(url: str, what: str) -> rasterio.io.DatasetReader:
    """A raster, or a :class:`StoreError` naming it and ``what`` it was for."""
    try:
        return rasterio.open(url)
    except rasterio.errors.RasterioIOError as e:
        raise StoreError(f"cannot read the {what} raster {url}: {e}") from None


def confusion(map_ref: str, labels_ref: str) -> tuple[ConfusionMatrix, list[str]]:
    """Confusion matrix of a map against labels on the map's grid.

    Args:
        map_ref: a map item (``.json``) or a class COG (class indices, 255 = nodata).
        labels_ref: a labelled scene store (``.zarr``, on the map's grid) or a raster of
            the map's class values (any grid: read onto the map's with nearest resampling).

    Raises:
        StoreError: labels that do not cover the map, or a store on another grid.
    """
    cog, names = read_map(map_ref)
    with rasterio.Env(**gdal_env()), _open(cog, "map") as src:
        pred = src.read(1)
        labels = _labels_on(src, labels_ref)
    if labels.shape != pred.shape:
        raise StoreError(f"labels {labels_ref} are {labels.shape}, the map {pred.shape}")
    both = (pred != NODATA) & (labels != NODATA)
    if not both.any():
        raise StoreError(f"map {map_ref} and labels {labels_ref} share no labelled pixel")
    cm = ConfusionMatrix(len(names))
    cm.update(torch.from_numpy(pred[both]), torch.from_numpy(labels[both].astype(np.int64)))
    return cm, names


def _labels_on(src: rasterio.io.DatasetReader, labels_ref: str) -> np.ndarray:
    url = normalize_url(labels_ref)
    if url.rstrip("/").endswith(".zarr"):
        store = open_scene(url)
        if not store.has_labels:
            raise StoreError(f"scene store {url} has no labels")
        gbox = store.geobox(0)
        same = gbox.shape == (src.height, src.width) and gbox.crs == src.crs.to_wkt()
        if not same or not gbox.transform.almost_equals(src.transform):
            raise StoreError(f"scene store {url} is not on the map's grid")
        return store.level(0)["label"].values
    with (
        _open(url, "labels") as lab,
        WarpedVRT(
            lab,
            crs=src.crs,
            transform=src.transform,
            width=src.width,
            height=src.height,
            resampling=Resampling.nearest,
            nodata=NODATA,
        ) as vrt,
    ):
        return vrt.read(1)
