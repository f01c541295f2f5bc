"""Where STAC items go: a static catalog on object storage, or a STAC API (Transactions).

Both implement one small interface (:class:`Catalog`): ``add_items`` (an upsert keyed by
collection and id: rerunning never duplicates), ``get_item`` and ``search``.
:func:`open_catalog` picks the backend from the URL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol
from urllib.parse import urlsplit

import pystac
import requests
from pystac.utils import make_absolute_href, make_relative_href, str_to_datetime

from .faults import fault_point
from .server import serve_stac
from .storage import (
    atomic_write,
    check_id,
    exists,
    filesystem,
    join,
    normalize_url,
    read_bytes,
    redact,
    remove_stale_temporaries,
)

#: Waits between tries of a STAC API request that failed transiently.
RETRY_DELAYS_S = (0.5, 1.0, 2.0)
#: Rewrites of a collection or root document before giving up converging with other writers.
MAX_REWRITES = 50


class CatalogError(RuntimeError):
    """A catalog cannot be read or written (the message names the catalog, no secrets)."""


class ItemNotFound(KeyError):
    """No item with that collection and id."""


class Catalog(Protocol):
    """What relaymap needs of a catalog."""

    def add_items(self, items: Sequence[pystac.Item]) -> None: ...

    def get_item(self, collection: str, item_id: str) -> pystac.Item: ...

    def collection_ids(self) -> list[str]: ...

    def get_collection(self, collection: str) -> pystac.Collection: ...

    def add_collection(self, collection: pystac.Collection) -> None: ...

    def search(
        self,
        *,
        collections: Sequence[str] | None = None,
        bbox: Sequence[float] | None = None,
        datetime: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[pystac.Item]: ...


#: Who made what relaymap writes (collections' ``providers``).
PROVIDER = {"name": "relaymap", "roles": ["processor"], "description": "relaymap pipeline"}


def _default_collection(collection_id: str, items: Sequence[pystac.Item]) -> pystac.Collection:
    """A collection for items added before anyone described it: a title, the relaymap
    provider, and license ``other`` (the writer did not say; set it with
    :meth:`add_collection`)."""
    return pystac.Collection(
        collection_id,
        description=f"relaymap products: {collection_id}",
        extent=_extent(items),
        license="other",
        title=collection_id,
        providers=[pystac.Provider.from_dict(PROVIDER)],
    )


def _extent(items: Sequence[pystac.Item]) -> pystac.Extent:
    boxes = [it.bbox for it in items if it.bbox] or [[-180, -90, 180, 90]]
    times = [it.datetime for it in items if it.datetime]
    bbox = [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]
    interval = [min(times), max(times)] if times else [None, None]
    return pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([interval]))


def _in_interval(item: pystac.Item, interval: str) -> bool:
    start_s, _, end_s = interval.partition("/") if "/" in interval else (interval, "", interval)

    def parse(text: str, end: bool) -> dt.datetime | None:
        if text in ("", ".."):
            return None
        when = str_to_datetime(text)
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        # a bare date as the end of an interval means the whole day
        return when + dt.timedelta(days=1, microseconds=-1) if end and len(text) == 10 else when

    start, end = parse(start_s, False), parse(end_s, True)
    when = item.datetime or item.common_metadata.start_datetime
    return (start is None or when >= start) and (end is None or when <= end)


def _intersects(item: pystac.Item, bbox: Sequence[float]) -> bool:
    b = item.bbox
    return not (b[2] < bbox[0] or b[0] > bbox[2] or b[3] < bbox[1] or b[1] > bbox[3])


def _item_body(item: pystac.Item) -> dict:
    """An item's JSON without its navigation links (each catalog writes its own)."""
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    d["links"] = [
        ln for ln in d["links"] if ln["rel"] not in ("self", "root", "parent", "collection")
    ]
    return d


JSON = "application/json"


def _relative(d: dict, url: str) -> dict:
    """A STAC document to be written at ``url`` with its asset and link hrefs relative to it
    where they share its storage (scheme and bucket): a self-contained catalog, which a copy
    to another folder or bucket keeps resolving. Hrefs elsewhere (a STAC API, another
    bucket) stay absolute."""

    def rel(href: str) -> str:
        if "://" not in href:
            return href
        a, b = urlsplit(href), urlsplit(url)
        if (a.scheme, a.netloc) != (b.scheme, b.netloc):
            return href
        return make_relative_href(href, url)

    for asset in d.get("assets", {}).values():
        asset["href"] = rel(asset["href"])
    for link in d.get("links", []):
        link["href"] = rel(link["href"])
    return d


def _absolute_assets(obj: pystac.Item | pystac.Collection, url: str) -> None:
    """Resolve a read document's relative asset hrefs against where it was read from."""
    for asset in obj.assets.values():
        asset.href = make_absolute_href(asset.href, url)


class StaticCatalog:
    """A self-contained static catalog on object storage (the embedded default).

    Layout: ``root/catalog.json``, ``root/<collection>/collection.json``,
    ``root/<collection>/items/<id>.json``. Self-contained: hrefs are relative where they
    share the catalog's storage (assets too), so the folder can be copied or synced to
    another bucket; items and collections read back have absolute asset hrefs. Writes are
    atomic per object.
    """

    def __init__(self, root_url: str) -> None:
        self.root = normalize_url(root_url)

    def __repr__(self) -> str:
        return f"StaticCatalog({self.root!r})"

    def _item_url(self, collection: str, item_id: str) -> str:
        return join(
            self._collection_dir(collection), "items", f"{check_id(item_id, 'item id')}.json"
        )

    def _collection_dir(self, collection: str) -> str:
        return join(self.root, check_id(collection, "collection id"))

    def _collection_url(self, collection: str) -> str:
        return join(self._collection_dir(collection), "collection.json")

    def collection_ids(self) -> list[str]:
        fs, path = filesystem(self.root)
        fs.invalidate_cache(path)  # other writers: never a cached listing
        if not fs.exists(path):
            return []
        return sorted(
            p.rstrip("/").rsplit("/", 1)[-1]
            for p in fs.ls(path, detail=False)
            if fs.exists(p.rstrip("/") + "/collection.json")
        )

    def get_collection(self, collection: str) -> pystac.Collection:
        """The collection, its asset hrefs absolute (they are stored relative)."""
        url = self._collection_url(collection)
        try:
            col = pystac.Collection.from_dict(json.loads(read_bytes(url)), href=url, migrate=False)
        except FileNotFoundError:
            raise ItemNotFound(f"no collection {collection!r} in {self.root}") from None
        _absolute_assets(col, url)
        return col

    def add_collection(self, collection: pystac.Collection) -> None:
        """Create or replace a collection's description (its items are kept)."""
        self._write_collection(collection)

    def _write_collection(self, collection: pystac.Collection, *, extent: bool = False) -> None:
        """Write the collection with an ``item`` link per item file (and, with ``extent``,
        its extent over them), then the root catalog. Concurrent writers converge: the
        document is rebuilt from a fresh listing until no item is missing from what was
        written (the last writer always re-lists after its write)."""
        cid = collection.id
        url = self._collection_url(cid)
        for _ in range(MAX_REWRITES):
            ids = self._item_ids(cid)
            if extent:
                collection.extent = _extent(list(self.items(cid)))
            d = collection.to_dict(include_self_link=False, transform_hrefs=False)
            d["links"] = [
                ln for ln in d["links"] if ln["rel"] not in ("self", "root", "parent", "item")
            ]
            d = _relative(d, url)
            d["links"] += [
                {"rel": "root", "href": "../catalog.json", "type": JSON},
                {"rel": "parent", "href": "../catalog.json", "type": JSON},
            ]
            d["links"] += [
                {"rel": "item", "href": f"./items/{i}.json", "type": "application/geo+json"}
                for i in ids
            ]
            atomic_write(url, json.dumps(d, indent=1).encode())
            if set(self._item_ids(cid)) <= set(ids):
                break
        for folder in (self._collection_dir(cid), join(self._collection_dir(cid), "items")):
            remove_stale_temporaries(folder)  # what killed writers left
        self._write_root()

    def _write_root(self) -> None:
        """Write the root catalog with a ``child`` link per collection (converging as
        :meth:`_write_collection` does)."""
        url = join(self.root, "catalog.json")
        for _ in range(MAX_REWRITES):
            cids = self.collection_ids()
            root = {
                "type": "Catalog",
                "stac_version": pystac.get_stac_version(),
                "id": "relaymap",
                "title": "relaymap catalog",
                "description": "relaymap products: land-cover maps, models and their sources",
                "links": [{"rel": "root", "href": "./catalog.json", "type": JSON}]
                + [{"rel": "child", "href": f"./{c}/collection.json", "type": JSON} for c in cids],
            }
            atomic_write(url, json.dumps(root, indent=1).encode())
            if set(self.collection_ids()) <= set(cids):
                break

    def _item_ids(self, collection: str) -> list[str]:
        fs, path = filesystem(join(self._collection_dir(collection), "items"))
        fs.invalidate_cache(path)  # other writers: never a cached listing
        if not fs.exists(path):
            return []
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        return sorted(
            n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")
        )

    def add_items(self, items: Sequence[pystac.Item]) -> None:
        """Upsert items (by collection and id), creating collections as needed."""
        by_collection: dict[str, list[pystac.Item]] = {}
        for item in items:
            if not item.collection_id:
                raise CatalogError(f"item {item.id} has no collection; set item.collection_id")
            by_collection.setdefault(item.collection_id, []).append(item)
        for cid, group in by_collection.items():
            for item in group:
                url = self._item_url(cid, item.id)
                d = _relative(_item_body(item), url)
                d["links"] += [
                    {"rel": "collection", "href": "../collection.json", "type": JSON},
                    {"rel": "parent", "href": "../collection.json", "type": JSON},
                    {"rel": "root", "href": "../../catalog.json", "type": JSON},
                ]
                atomic_write(url, json.dumps(d, indent=1).encode())
                item.set_self_href(url)
            fault_point("catalog:items-written")  # crash tests: items in, links not yet
            existing = (
                self.get_collection(cid)
                if exists(self._collection_url(cid))
                else _default_collection(cid, group)
            )
            self._write_collection(existing, extent=True)

    def get_item(self, collection: str, item_id: str) -> pystac.Item:
        """The item, its asset hrefs absolute (they are stored relative)."""
        url = self._item_url(collection, item_id)
        try:
            item = pystac.Item.from_dict(json.loads(read_bytes(url)), href=url, migrate=False)
        except FileNotFoundError:
            raise ItemNotFound(f"no item {collection}/{item_id} in {self.root}") from None
        _absolute_assets(item, url)
        return item

    def items(self, collection: str, skip: Iterable[str] = ()) -> Iterator[pystac.Item]:
        skipped = set(skip)
        for item_id in self._item_ids(collection):
            if item_id not in skipped:
                yield self.get_item(collection, item_id)

    def search(
        self,
        *,
        collections: Sequence[str] | None = None,
        bbox: Sequence[float] | None = None,
        datetime: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[pystac.Item]:
        """Scan the catalog (static catalogs have no search endpoint; see :meth:`serve`)."""
        found = []
        for cid in collections or self.collection_ids():
            for item in self.items(cid):
                if ids is not None and item.id not in ids:
                    continue
                if bbox is not None and not _intersects(item, bbox):
                    continue
                if datetime is not None and not _in_interval(item, datetime):
                    continue
                found.append(item)
        return found

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve this catalog as a searchable STAC API on loopback; yield its URL."""
        cols = [self.get_collection(c) for c in self.collection_ids()]
        items = [it for c in cols for it in self.items(c.id)]
        for c in cols:  # items are passed as loaded: the server need not follow links
            for rel in ("item", "root", "parent"):
                c.clear_links(rel)
        with serve_stac(cols, items) as url:
            yield url


class StacApiCatalog:
    """A STAC API with the Transactions extension (e.g. stac-fastapi-pgstac)."""

    def __init__(self, api_url: str, *, timeout_s: float = 30.0) -> None:
        self.url = api_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()

    def __repr__(self) -> str:
        return f"StacApiCatalog({self.url!r})"

    def _request(self, method: str, path: str, **kw) -> requests.Response:
        """One request, retried with backoff on what is transient (connection errors,
        timeouts, HTTP 5xx and 429); a 4xx answer is returned at once."""
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
            try:
                resp = self.session.request(method, self.url + path, timeout=self.timeout_s, **kw)
            except requests.RequestException as e:
                if delay is None:
                    raise CatalogError(
                        f"cannot reach the STAC API at {self.url} ({attempt + 1} tries): "
                        f"{redact(str(e))}"
                    ) from None
            else:
                if delay is None or not (resp.status_code >= 500 or resp.status_code == 429):
                    return resp
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _check(self, resp: requests.Response, what: str) -> None:
        if not resp.ok:
            raise CatalogError(
                f"{what} on {self.url} failed: HTTP {resp.status_code} {redact(resp.text[:300])}"
            )

    def ensure_collection(self, collection: pystac.Collection) -> None:
        """Create the collection if the API does not have it."""
        resp = self._request("GET", f"/collections/{check_id(collection.id, 'collection id')}")
        if resp.status_code == 404:
            body = collection.to_dict(include_self_link=False, transform_hrefs=False)
            body["links"] = []
            self._check(
                self._request("POST", "/collections", json=body),
                f"creating collection {collection.id}",
            )
        else:
            self._check(resp, f"reading collection {collection.id}")

    def collection_ids(self) -> list[str]:
        resp = self._request("GET", "/collections")
        self._check(resp, "listing collections")
        return sorted(c["id"] for c in resp.json().get("collections", []))

    def get_collection(self, collection: str) -> pystac.Collection:
        resp = self._request("GET", f"/collections/{check_id(collection, 'collection id')}")
        if resp.status_code == 404:
            raise ItemNotFound(f"no collection {collection!r} in {self.url}")
        self._check(resp, f"reading collection {collection}")
        return pystac.Collection.from_dict(resp.json(), migrate=False)

    def add_collection(self, collection: pystac.Collection) -> None:
        """Create or replace a collection's description (its items are kept)."""
        body = collection.to_dict(include_self_link=False, transform_hrefs=False)
        body["links"] = []
        resp = self._request("POST", "/collections", json=body)
        if resp.status_code == 409:
            cid = check_id(collection.id, "collection id")
            resp = self._request("PUT", f"/collections/{cid}", json=body)
        self._check(resp, f"writing collection {collection.id}")

    def add_items(self, items: Sequence[pystac.Item]) -> None:
        """Upsert: create each item, or update it when it exists."""
        for cid in sorted({it.collection_id for it in items if it.collection_id}):
            self.ensure_collection(
                _default_collection(cid, [it for it in items if it.collection_id == cid])
            )
        for item in items:
            if not item.collection_id:
                raise CatalogError(f"item {item.id} has no collection; set item.collection_id")
            body = _item_body(item)
            cid = check_id(item.collection_id, "collection id")
            item_id = check_id(item.id, "item id")
            resp = self._request("POST", f"/collections/{cid}/items", json=body)
            if resp.status_code == 409:  # exists: replace it
                resp = self._request("PUT", f"/collections/{cid}/items/{item_id}", json=body)
            self._check(resp, f"writing item {cid}/{item.id}")

    def get_item(self, collection: str, item_id: str) -> pystac.Item:
        resp = self._request(
            "GET",
            f"/collections/{check_id(collection, 'collection id')}/items/"
            f"{check_id(item_id, 'item id')}",
        )
        if resp.status_code == 404:
            raise ItemNotFound(f"no item {collection}/{item_id} in {self.url}")
        self._check(resp, f"reading item {collection}/{item_id}")
        return pystac.Item.from_dict(resp.json(), migrate=False)

    def search(
        self,
        *,
        collections: Sequence[str] | None = None,
        bbox: Sequence[float] | None = None,
        datetime: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[pystac.Item]:
        body = {
            k: v
            for k, v in dict(
                collections=collections, bbox=bbox, datetime=datetime, ids=ids, limit=100
            ).items()
            if v is not None
        }
        found, url = [], self.url + "/search"
        while url:
            try:
                resp = self.session.post(url, json=body, timeout=self.timeout_s)
            except requests.RequestException as e:
                raise CatalogError(f"cannot reach {self.url}: {redact(str(e))}") from None
            self._check(resp, "search")
            page = resp.json()
            found += [pystac.Item.from_dict(f, migrate=False) for f in page.get("features", [])]
            nxt = next((ln for ln in page.get("links", []) if ln.get("rel") == "next"), None)
            url, body = (nxt["href"], nxt.get("body", body)) if nxt else (None, None)
        return found


def open_catalog(url: str) -> StaticCatalog | StacApiCatalog:
    """``http(s)://`` -> a STAC API (Transactions); anything else -> a static catalog."""
    if url.startswith(("http://", "https://")):
        return StacApiCatalog(url)
    return StaticCatalog(url)
