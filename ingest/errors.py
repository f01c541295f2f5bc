"""Typed errors of the data side; every message names the input to fix."""

from __future__ import annotations


class IngestError(ValueError):
    """Base class: bad input to ingest (the message says which and why)."""


class StacApiError(IngestError):
    """A STAC API cannot be reached or answered with an error."""


class UnknownCollectionError(IngestError):
    """A collection the STAC API does not have (the message lists those it has)."""


class NoImageryError(IngestError):
    """No source item touches the area in any period: nothing to map, nothing written."""


class NoItemsFound(IngestError):
    """A search matched no item."""


class MissingAssetError(IngestError):
    """An item lacks an asset (band) the load asked for."""


class CorruptRasterError(IngestError):
    """A raster cannot be decoded."""


class GridError(IngestError):
    """The requested grid is impossible: empty, smaller than a window, or mismatched CRS."""


class StoreError(IngestError):
    """A scene store is missing, incomplete, or not a relaymap store."""


class AreaError(IngestError):
    """An area of interest that cannot be mapped: not a polygon, empty, or too large."""


class PeriodError(IngestError):
    """A period range that cannot be parsed or is empty."""
