"""A local web map of a relaymap catalog: map tiles from the class COGs (titiler), a
MapLibre GL JS page showing one period at a time (the latest first), or two side by side or
by swipe, with the imagery under the maps, the change between periods, layer toggles,
opacity, legends and a class query; an optional base map.

Only rasters registered in the catalog are read: every raster endpoint takes a map id (a
map item's id in the ``relaymap-maps`` collection, whose ``classes`` asset it reads, or
``<collection>.<asset>`` for a mosaic asset of an area collection: a period's land cover,
stable land cover, imagery, or a change between two periods); no request names a file.
Colours come from each map's ``classification:classes`` (``color_hint``), then the COG's
palette, then evenly spaced hues; nodata is transparent in the tiles, and the page draws it
as grey stripes (:data:`NODATA_HATCH`); so is "no change" in a change layer (the map beneath
shows). Imagery is stretched from the 2nd to the 98th percentile of its three bands taken
together (one stretch for red, green and blue: a per-band stretch would turn vegetation,
dark in red and blue, near black), one stretch for all periods of a collection so they
compare (:func:`common_stretch`).

The tables and plots of an area collection (its class-area table, each change's transition
table, their PNG plots: CSV and PNG assets of the collection) are served to the page by
collection and asset key; only such registered assets are read.

Endpoints:

* ``GET /`` - the page (files in ``webmap_static/``, served under ``/static``).
* ``GET /maps.json`` - ``maps``: the class maps (id, model, datetime, period, lon/lat
  bounds, classes, tiles); ``overlays``: the imagery, stable and change layers (with
  ``kind``); ``tables``: per area collection, its tables and plots (:func:`_tables`);
  ``basemap``: the configured base map or null.
* ``GET /maps/{map_id}/tiles/WebMercatorQuad/{z}/{x}/{y}.png`` - a tile (titiler's
  ``TilerFactory``; ``/info``, ``/point/{lon},{lat}``, ``/WebMercatorQuad/tilejson.json``
  and ``/statistics`` too).
* ``GET /maps/{map_id}/class?lon=..&lat=..`` - the class at a point (rio-tiler ``point``).
* ``GET /assets/{collection}/{key}`` - a CSV or PNG asset of an area collection (its bytes).
* ``GET /tables/{collection}/{key}`` - a CSV asset as JSON (``header``, ``rows``).
"""

from __future__ import annotations

import colorsys
import csv
import io
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pystac
import rasterio
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from rio_tiler.errors import PointOutsideBounds
from rio_tiler.io import Reader
from titiler.core.dependencies import ImageRenderingParams
from titiler.core.errors import DEFAULT_STATUS_CODES, add_exception_handlers
from titiler.core.factory import TilerFactory

from .backends import open_catalog
from .storage import gdal_env, read_bytes

#: The collection whose items are maps.
MAP_COLLECTION = "relaymap-maps"
#: The asset of a map item that holds the class COG.
CLASSES_ASSET = "classes"
#: Class COG nodata (as written by ``relaymap.flows.products.cog``).
NODATA = 255
#: The page, its script and style, and the vendored MapLibre GL JS.
STATIC_DIR = Path(__file__).with_name("webmap_static")
#: The tile matrix set the page uses.
TMS = "WebMercatorQuad"
#: How the page draws nodata inside a map's bounds: diagonal stripes of these two greys
#: (the same as the quicklooks'), unlike any class colour and the page's own background.
NODATA_HATCH = ("#5f6368", "#9aa0a6")
#: The map's background where nothing is drawn and there is no base map.
BACKGROUND = "#dde3ea"
#: Asset roles of an area collection's layers -> the layer's kind.
ROLE_KINDS = {"mosaic": "classes", "stable": "stable", "change": "change", "visual": "imagery"}
#: Percentiles of the imagery stretch (of the three bands' values together).
STRETCH_PERCENTILES = (2, 98)
#: A change raster's value where a pixel kept its class (``relaymap.flows`` writes it):
#: transparent in the tiles.
NO_CHANGE = 0
#: The media types of the collection assets the page reads (tables and their plots).
DOCUMENT_TYPES = ("text/csv", "image/png")

RGBA = tuple[int, int, int, int]


@dataclass(frozen=True)
class MapClass:
    """One class of a map: its value in the COG, name and display colour (``#rrggbb``)."""

    value: int
    name: str
    color: str


@dataclass(frozen=True)
class MapLayer:
    """A map item as the web map shows it."""

    id: str
    #: The model item's id (from the ``derived_from`` link titled ``model <id>``).
    model: str
    #: ISO 8601 datetime of the map.
    datetime: str | None
    #: ``YYYY-MM-DD``, or ``start/end`` dates for an item with a time range.
    period: str
    #: ``(west, south, east, north)`` in degrees.
    bounds: tuple[float, float, float, float]
    classes: tuple[MapClass, ...]
    minzoom: int
    maxzoom: int
    #: The class COG (never sent to the page).
    href: str
    #: ``classes`` (land cover), ``stable``, ``change`` or ``imagery``.
    kind: str = "classes"
    #: Where it comes from: the map collection or an area collection.
    source: str = MAP_COLLECTION
    #: A change's earlier period (its ``period`` is the later one).
    before: str | None = None
    #: Imagery: per band ``(low, high)`` stored values shown as black and white (the same
    #: for the three bands: :func:`common_stretch`).
    rescale: tuple[tuple[float, float], ...] | None = None

    def colormap(self) -> dict[int, RGBA] | None:
        """The tile palette: each class's colour, nodata transparent, and "no change" of a
        change layer too (None for imagery)."""
        if self.kind == "imagery":
            return None
        cmap: dict[int, RGBA] = {
            c.value: (*bytes.fromhex(c.color[1:]), 255)  # type: ignore[misc]
            for c in self.classes
        }
        cmap[NODATA] = (0, 0, 0, 0)
        if self.kind == "change":
            cmap[NO_CHANGE] = (0, 0, 0, 0)
        return cmap

    def to_json(self) -> dict[str, Any]:
        """What ``/maps.json`` lists (no href: the page asks for tiles by map id)."""
        d = asdict(self)
        d.pop("href")
        d["bounds"] = list(self.bounds)
        d["tiles"] = f"maps/{self.id}/tiles/{TMS}/{{z}}/{{x}}/{{y}}.png"
        if self.kind != "change":
            d.pop("before")
        if self.kind != "imagery":
            d.pop("rescale")
        return d


def _model_of(item: pystac.Item) -> str:
    for link in item.links:
        if link.rel == "derived_from" and (link.title or "").startswith("model "):
            return link.title.removeprefix("model ")
    return "unknown model"


def _period_of(item: pystac.Item) -> str:
    p = item.properties
    if p.get("start_datetime") and p.get("end_datetime"):
        return f"{p['start_datetime'][:10]}/{p['end_datetime'][:10]}"
    return item.datetime.date().isoformat() if item.datetime else "undated"


def _hue(i: int, n: int) -> str:
    r, g, b = colorsys.hsv_to_rgb(i / max(n, 1), 0.65, 0.9)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _classes_of(
    asset: pystac.Asset, cog_palette: Mapping[int, tuple[int, ...]]
) -> tuple[MapClass, ...]:
    """Classes with colours: ``color_hint``, else the COG's palette, else a hue."""
    table = asset.extra_fields.get("classification:classes") or []
    out = []
    for i, c in enumerate(table):
        value = int(c["value"])
        hint = (c.get("color_hint") or "").lstrip("#")
        if len(hint) == 6:
            color = f"#{hint.lower()}"
        elif value in cog_palette:
            color = "#" + bytes(cog_palette[value][:3]).hex()
        else:
            color = _hue(i, len(table))
        out.append(MapClass(value, str(c.get("name") or c.get("description") or value), color))
    return tuple(out)


def common_stretch(values: np.ma.MaskedArray) -> tuple[float, float]:
    """The imagery stretch: the 2nd and 98th percentiles (:data:`STRETCH_PERCENTILES`) of
    the valid values of all bands together (``(bands, H, W)``, masked = no data), so that
    red, green and blue keep their ratios (a per-band stretch turns vegetation, dark in red
    and blue, near black). ``high`` is above ``low``."""
    valid = np.ma.compressed(values).astype(np.float64)
    if valid.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(valid, STRETCH_PERCENTILES))
    return low, max(high, low + 1)


def _layer(
    map_id: str,
    asset: pystac.Asset,
    *,
    model: str,
    when: str | None,
    period: str,
    bbox: Sequence[float] | None = None,
    **extra: Any,
) -> MapLayer:
    """A map layer from its raster's asset (a COG, or a mosaic VRT over COGs) and the
    raster's header (palette, zoom range, and its bounds unless ``bbox`` is given); imagery
    gets its stretch (:func:`common_stretch`) from an overview (at most 512 px)."""
    href = asset.get_absolute_href() or asset.href
    with rasterio.Env(**gdal_env()):
        with rasterio.open(href) as src:
            try:
                cog_palette = src.colormap(1)
            except ValueError:  # no palette
                cog_palette = {}
        with Reader(href) as reader:
            minzoom, maxzoom = reader.minzoom, reader.maxzoom
            west, south, east, north = bbox or reader.get_geographic_bounds("EPSG:4326")
            if extra.get("kind") == "imagery":
                preview = reader.preview(max_size=512)
                extra["rescale"] = (common_stretch(preview.array),) * preview.count
    return MapLayer(
        id=map_id,
        model=model,
        datetime=when,
        period=period,
        bounds=(west, south, east, north),
        classes=_classes_of(asset, cog_palette),
        minzoom=int(minzoom),
        maxzoom=int(maxzoom),
        href=href,
        **extra,
    )


def _item_layer(item: pystac.Item) -> MapLayer:
    """A map item (``classes`` asset) as a layer."""
    return _layer(
        item.id,
        item.assets[CLASSES_ASSET],
        model=_model_of(item),
        when=item.datetime.isoformat() if item.datetime else None,
        period=_period_of(item),
        bbox=item.bbox,
    )


def _kind(asset: pystac.Asset) -> str | None:
    roles = asset.roles or []
    return next((kind for role, kind in ROLE_KINDS.items() if role in roles), None)


def _mosaic_layers(collection: pystac.Collection) -> Iterator[tuple[tuple, Callable[[], MapLayer]]]:
    """The layers of an area collection: its period mosaics (assets with role ``mosaic``),
    stable mosaics (``stable``), imagery (``visual``) and changes (``change``, between
    ``relaymap:from`` and ``relaymap:to``), each as a cache key and a function that makes
    its layer."""
    for key, asset in collection.assets.items():
        kind = _kind(asset)
        if kind is None:
            continue
        fields = asset.extra_fields
        period = fields.get("relaymap:to") or fields.get("relaymap:period") or key
        start = fields.get("start_datetime")

        def make(key=key, asset=asset, period=period, start=start, kind=kind) -> MapLayer:
            return _layer(
                f"{collection.id}.{key}",
                asset,
                model=str(collection.extra_fields.get("relaymap:model", "unknown model")),
                when=start,
                period=period,
                kind=kind,
                source=collection.id,
                before=asset.extra_fields.get("relaymap:from"),
            )

        yield (f"{collection.id}.{key}", asset.href, asset.extra_fields.get("file:checksum")), make


def _shared_stretch(layers: dict[str, MapLayer]) -> dict[str, MapLayer]:
    """One stretch for all imagery of a collection (the mean of its periods' stretches),
    so that two periods side by side differ only where their pixels do."""
    by_source: dict[str, list[MapLayer]] = {}
    for layer in layers.values():
        if layer.kind == "imagery" and layer.rescale:
            by_source.setdefault(layer.source, []).append(layer)
    out = dict(layers)
    for group in by_source.values():
        shared = tuple(
            tuple(float(v) for v in np.mean([g.rescale[b] for g in group], axis=0))
            for b in range(len(group[0].rescale))
        )
        for g in group:
            out[g.id] = replace(g, rescale=shared)
    return out


@dataclass(frozen=True)
class Document:
    """A table or plot of an area collection (a CSV or PNG asset) that the page shows."""

    href: str
    media_type: str
    title: str


def _documents(collection: pystac.Collection) -> dict[str, Document]:
    """The collection's CSV and PNG assets by key."""
    out = {}
    for key, asset in collection.assets.items():
        if asset.media_type in DOCUMENT_TYPES:
            href = asset.get_absolute_href() or asset.href
            out[key] = Document(href, str(asset.media_type), asset.title or key)
    return out


def _tables(
    collection: str, documents: Mapping[str, Document], layers: Sequence[MapLayer]
) -> dict[str, Any]:
    """What ``/maps.json`` says of an area collection's tables: the class-area table
    (asset ``class-areas``) and plot (``class-areas-plot``), and per change layer its
    transition table and plot (``transitions-<pair>``, ``transitions-plot-<pair>`` beside
    its ``change-<pair>``); each as the URLs the page reads."""

    def urls(table: str, plot: str) -> dict[str, str]:
        out = {}
        if table in documents:
            out["table"] = f"tables/{collection}/{table}"
            out["csv"] = f"assets/{collection}/{table}"
        if plot in documents:
            out["plot"] = f"assets/{collection}/{plot}"
        return out

    transitions = {}
    for layer in layers:
        if layer.source == collection and layer.kind == "change":
            pair = layer.id.removeprefix(f"{collection}.change-")
            found = urls(f"transitions-{pair}", f"transitions-plot-{pair}")
            if found:
                transitions[layer.id] = found
    return {"class_areas": urls("class-areas", "class-areas-plot"), "transitions": transitions}


@dataclass(frozen=True)
class Basemap:
    """A base map under the maps: an XYZ tile URL template (``{z}/{x}/{y}``) or a MapLibre
    style URL, and its attribution (shown on the map)."""

    url: str
    attribution: str = ""

    @property
    def kind(self) -> str:
        return "xyz" if "{z}" in self.url else "style"

    def to_json(self) -> dict[str, str]:
        return {"url": self.url, "attribution": self.attribution, "kind": self.kind}


class MapIndex:
    """The catalog's maps by id, re-read on :meth:`refresh`: the items of the map collection,
    and the period mosaics of area collections (a raster's header is read once per href and
    checksum). Thread-safe: FastAPI runs endpoints in a thread pool."""

    def __init__(self, catalog_url: str, *, collection: str = MAP_COLLECTION) -> None:
        self.catalog = open_catalog(catalog_url)
        self.collection = collection
        self._layers: dict[str, MapLayer] = {}
        self._documents: dict[str, dict[str, Document]] = {}
        self._cache: dict[tuple[str, str, str | None], MapLayer] = {}
        self._lock = threading.Lock()
        self._loaded = False

    def refresh(self) -> list[MapLayer]:
        """Re-read the catalog's map items; return the maps by model, period and id."""
        with self._lock:
            layers, cache, documents = {}, {}, {}
            for item in self.catalog.search(collections=[self.collection]):
                if CLASSES_ASSET not in item.assets:
                    continue
                asset = item.assets[CLASSES_ASSET]
                key = (item.id, asset.href, asset.extra_fields.get("file:checksum"))
                layer = self._cache.get(key) or _item_layer(item)
                layers[item.id], cache[key] = layer, layer
            for cid in self.catalog.collection_ids():  # areas: one mosaic per period
                if cid == self.collection:
                    continue
                collection = self.catalog.get_collection(cid)
                for key, make in _mosaic_layers(collection):
                    layer = self._cache.get(key) or make()
                    layers[layer.id], cache[key] = layer, layer
                if found := _documents(collection):
                    documents[cid] = found
            layers = _shared_stretch(layers)
            self._layers, self._cache, self._loaded = layers, cache, True
            self._documents = documents
            return sorted(layers.values(), key=lambda m: (m.model, m.period, m.id))

    def tables(self, layers: Sequence[MapLayer]) -> dict[str, Any]:
        """The tables of each area collection with any (:func:`_tables`), as of the last
        :meth:`refresh`."""
        return {cid: _tables(cid, docs, layers) for cid, docs in self._documents.items()}

    def document(self, collection: str, key: str) -> Document:
        """A CSV or PNG asset of an area collection (the catalog is re-read once for an
        unknown one).

        Raises:
            HTTPException: 404, no such table or plot in the catalog.
        """
        if key not in self._documents.get(collection, {}):
            self.refresh()
        try:
            return self._documents[collection][key]
        except KeyError:
            raise HTTPException(
                404, f"no table or plot {key!r} in collection {collection!r}"
            ) from None

    def get(self, map_id: str) -> MapLayer:
        """The map with this id (the catalog is re-read once for an unknown id).

        Raises:
            HTTPException: 404, no such map in the catalog.
        """
        if map_id not in self._layers or not self._loaded:
            self.refresh()
        try:
            return self._layers[map_id]
        except KeyError:
            raise HTTPException(404, f"no map {map_id!r} in the catalog") from None


def _read(doc: Document) -> bytes:
    """A document's bytes (404 when the catalog names a file that is gone)."""
    try:
        return read_bytes(doc.href)
    except FileNotFoundError:
        raise HTTPException(404, f"{doc.title!r} is registered but missing") from None


def create_app(catalog_url: str, *, basemap: Basemap | None = None) -> FastAPI:
    """The web map of the catalog at ``catalog_url`` (a static catalog folder or URL, or a
    STAC API): the items of the ``relaymap-maps`` collection and the layers of area
    collections; ``basemap`` under them (default: none, the page works offline)."""
    index = MapIndex(catalog_url)
    app = FastAPI(title="relaymap web map", docs_url=None, redoc_url=None)

    def map_path(map_id: Annotated[str, PathParam(description="Map item id")]) -> str:
        """The COG of a catalog map: the only way a raster endpoint gets a file."""
        return index.get(map_id).href

    def map_colormap(map_id: Annotated[str, PathParam(description="Map item id")]) -> dict | None:
        return index.get(map_id).colormap()

    def map_rendering(
        map_id: Annotated[str, PathParam(description="Map item id")],
        params: Annotated[ImageRenderingParams, Depends()],
    ) -> ImageRenderingParams:
        """Imagery is stretched with its layer's stretch unless the request gives one."""
        rescale = index.get(map_id).rescale
        if params.rescale is None and rescale:
            params.rescale = [tuple(r) for r in rescale]
        return params

    tiler = TilerFactory(
        router_prefix="/maps/{map_id}",
        path_dependency=map_path,
        colormap_dependency=map_colormap,
        render_dependency=map_rendering,
        environment_dependency=gdal_env,
        add_preview=False,
        add_part=False,
        add_viewer=False,
    )
    app.include_router(tiler.router, prefix="/maps/{map_id}", tags=["maps"])
    add_exception_handlers(app, DEFAULT_STATUS_CODES)

    @app.get("/maps.json")
    def maps() -> dict[str, Any]:
        """The catalog's maps (re-read on every call: new maps appear on reload): the class
        maps, the other layers, the base map."""
        layers = index.refresh()
        return {
            "maps": [m.to_json() for m in layers if m.kind == "classes"],
            "overlays": [m.to_json() for m in layers if m.kind != "classes"],
            "tables": index.tables(layers),
            "basemap": basemap.to_json() if basemap else None,
            "nodata": list(NODATA_HATCH),
            "no_change": NO_CHANGE,
            "background": BACKGROUND,
        }

    @app.get("/maps/{map_id}/class")
    def class_at(
        map_id: str,
        lon: Annotated[float, Query(ge=-180, le=180)],
        lat: Annotated[float, Query(ge=-90, le=90)],
    ) -> dict[str, Any]:
        """The class at ``lon``/``lat`` (degrees); ``value`` null outside the map or on
        nodata; ``inside``: the point is within the map's raster (so null is no data)."""
        layer = index.get(map_id)
        value = None
        with rasterio.Env(**gdal_env()), Reader(layer.href) as reader:
            try:
                point = reader.point(lon, lat)
            except PointOutsideBounds:
                point = None
        if point is not None and not np.ma.getmaskarray(point.array)[0]:
            value = int(point.array.data[0])
        value = None if value == NODATA else value
        cls = next((c for c in layer.classes if c.value == value), None)
        return {
            "map": layer.id,
            "lon": lon,
            "lat": lat,
            "inside": point is not None,
            "value": value,
            "name": cls.name if cls else None,
            "color": cls.color if cls else None,
        }

    @app.get("/assets/{collection}/{key}")
    def asset(collection: str, key: str) -> Response:
        """A table or plot of an area collection: only its CSV and PNG assets are read."""
        doc = index.document(collection, key)
        return Response(_read(doc), media_type=doc.media_type)

    @app.get("/tables/{collection}/{key}")
    def table(collection: str, key: str) -> dict[str, Any]:
        """A CSV asset of an area collection as ``header`` and ``rows`` (strings)."""
        doc = index.document(collection, key)
        if doc.media_type != "text/csv":
            raise HTTPException(404, f"{key!r} of collection {collection!r} is not a table")
        rows = list(csv.reader(io.StringIO(_read(doc).decode("utf-8"))))
        return {"title": doc.title, "header": rows[0] if rows else [], "rows": rows[1:]}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
