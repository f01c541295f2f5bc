"""Searching a STAC API for the items to ingest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pystac
import pystac_client
from pystac_client.exceptions import APIError
from requests.exceptions import RequestException

from relaymap.catalog.storage import redact

from .errors import MissingAssetError, NoItemsFound, StacApiError
from .load import missing_bands


def open_api(api_url: str) -> pystac_client.Client:
    """Open a STAC API, with a clear error when it cannot be reached."""
    try:
        return pystac_client.Client.open(api_url)
    except (APIError, RequestException, OSError) as e:
        raise StacApiError(f"cannot reach the STAC API at {api_url}: {redact(str(e))}") from None


def search(
    api_url: str,
    *,
    collections: Sequence[str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    intersects: dict[str, Any] | None = None,
    datetime: str | None = None,
    max_cloud_cover: float | None = None,
    max_items: int | None = None,
    require_assets: Sequence[str] = (),
) -> list[pystac.Item]:
    """Items of a STAC API search, sorted by datetime then id.

    Args:
        api_url: the API's root URL.
        collections: collection ids to search.
        bbox: ``(minlon, minlat, maxlon, maxlat)`` in WGS84, or use ``intersects``.
        intersects: a GeoJSON geometry in WGS84.
        datetime: RFC 3339 instant or interval, e.g. ``"2024-06-01/2024-06-30"``.
        max_cloud_cover: keep items with ``eo:cloud_cover`` at most this (percent); sent as
            a ``query`` when the API conforms to it, else applied to the results.
        max_items: stop after this many items.
        require_assets: bands every item must have (asset keys, or band names or common
            names of multi-band assets).

    Raises:
        StacApiError: the API is unreachable or rejects the search.
        NoItemsFound: nothing matched (the message repeats the search).
        MissingAssetError: an item lacks one of ``require_assets``.
    """
    client = open_api(api_url)
    params: dict[str, Any] = dict(
        collections=collections,
        bbox=bbox,
        intersects=intersects,
        datetime=datetime,
        max_items=max_items,
    )
    server_side = max_cloud_cover is not None and client.conforms_to("QUERY")
    if server_side:
        params["query"] = {"eo:cloud_cover": {"lte": max_cloud_cover}}
    try:
        items = list(client.search(**{k: v for k, v in params.items() if v is not None}).items())
    except (APIError, RequestException, OSError) as e:
        raise StacApiError(f"STAC search on {api_url} failed: {redact(str(e))}") from None
    if max_cloud_cover is not None and not server_side:
        items = [it for it in items if it.properties.get("eo:cloud_cover", 0.0) <= max_cloud_cover]
    if not items:
        asked = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
        cloud = f", eo:cloud_cover <= {max_cloud_cover}" if max_cloud_cover is not None else ""
        raise NoItemsFound(f"no STAC item on {api_url} matches {asked}{cloud}")
    for item in items:
        missing = missing_bands(item, require_assets)
        if missing:
            raise MissingAssetError(
                f"item {item.id} has no asset {', '.join(missing)}; it has "
                f"{', '.join(sorted(item.assets))}"
            )
    return sorted(items, key=lambda it: (it.datetime or it.common_metadata.start_datetime, it.id))
