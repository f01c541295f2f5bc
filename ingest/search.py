"""Searching a STAC API for the items to ingest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pystac
import pystac_client
from pystac_client.exceptions import APIError
from requests.exceptions import RequestException

from relaymap.catalog.storage import redact

from .errors import MissingAssetError, NoItemsFound, StacApiError, UnknownCollectionError
from .load import missing_bands
from .profiles import ReadOptions


def open_api(api_url: str) -> pystac_client.Client:
    """Open a STAC API, with a clear error when it cannot be reached."""
    try:
        return pystac_client.Client.open(api_url)
    except (APIError, RequestException, OSError) as e:
        raise StacApiError(f"cannot reach the STAC API at {api_url}: {redact(str(e))}") from None


#: How many of a source's collections an error message lists.
LISTED_COLLECTIONS = 30


def check_collections(client: pystac_client.Client, api_url: str, wanted: Sequence[str]) -> None:
    """Every collection in ``wanted`` is on the API, else one error listing what it has."""
    try:
        missing = [c for c in wanted if _collection(client, c) is None]
        if not missing:
            return
        have = sorted(c.id for c in client.get_collections())
    except (APIError, RequestException, OSError) as e:
        raise StacApiError(f"cannot list the collections of {api_url}: {redact(str(e))}") from None
    shown = ", ".join(have[:LISTED_COLLECTIONS]) or "none"
    more = f" and {len(have) - LISTED_COLLECTIONS} more" if len(have) > LISTED_COLLECTIONS else ""
    raise UnknownCollectionError(
        f"no collection {', '.join(map(repr, missing))} on {api_url}; it has {shown}{more}"
    )


def _collection(client: pystac_client.Client, cid: str):
    try:
        return client.get_collection(cid)
    except APIError as e:  # a 404 on APIs that answer so
        if getattr(e, "status_code", None) == 404 or "404" in str(e):
            return None
        raise


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
    read: ReadOptions | None = None,
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
        require_assets: model bands every item must give (as its source profile and
            ``read`` find them: asset keys, band names or common names).
        read: the source profile and overrides (see :mod:`relaymap.ingest.profiles`).

    Raises:
        StacApiError: the API is unreachable or rejects the search.
        UnknownCollectionError: a collection the API does not have.
        NoItemsFound: nothing matched (the message repeats the search).
        MissingAssetError: an item lacks one of ``require_assets``.
    """
    client = open_api(api_url)
    if collections:
        check_collections(client, api_url, collections)
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
        missing = missing_bands(item, require_assets, read)
        if missing:
            raise MissingAssetError(
                f"item {item.id} has no asset {', '.join(missing)}; it has "
                f"{', '.join(sorted(item.assets))}"
            )
    return sorted(items, key=lambda it: (it.datetime or it.common_metadata.start_datetime, it.id))
