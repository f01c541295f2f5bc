"""catalog: STAC items for maps and models, static catalogs and STAC APIs, object storage."""

from __future__ import annotations

from .backends import (
    Catalog,
    CatalogError,
    ItemNotFound,
    StacApiCatalog,
    StaticCatalog,
    open_catalog,
)
from .items import backbone_item, map_item, model_item, multihash_sha256
from .server import serve_stac
from .storage import StorageConfig, StorageError, UnsafeIdError

__all__ = [
    "Catalog",
    "CatalogError",
    "ItemNotFound",
    "StacApiCatalog",
    "StaticCatalog",
    "StorageConfig",
    "StorageError",
    "UnsafeIdError",
    "backbone_item",
    "map_item",
    "model_item",
    "multihash_sha256",
    "open_catalog",
    "serve_stac",
]
