"""Map an area every period: one distributed Ray job over (cell, period) tasks.

1. grid: the area's cells on a fixed grid (:mod:`relaymap.ingest.grid`), each padded by a
   halo as wide as the model's context reaches (:func:`relay_models.geometry.cell_halo`);
2. plan (driver): one STAC search per period; per cell, the items that touch it and a
   fingerprint of everything its map depends on; cells whose map item already carries that
   fingerprint are skipped (reruns map only what changed);
3. map (a pool of model actors, :mod:`relaymap.flows.pool`, one cell per call, the
   engine chosen and the model's ONNX export made before they start,
   :mod:`relaymap.flows.engine`): :func:`relaymap.flows.cells.map_cell` composites, maps
   and writes each cell's COG to storage; only items and pixel counts come back;
4. register (driver): the cell items are upserted, then older product generations removed;
   per period a VRT mosaic of the cell COGs, and over periods the class-area table and plot,
   all assets of the run's collection.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import pystac
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from pydantic import Field
from rasterio.errors import NotGeoreferencedWarning
from tqdm.auto import tqdm

from relay_models.config import FrozenConfig
from relay_models.geometry import cell_halo, cell_step
from relay_models.spec import PIXEL_SIZE_TOLERANCE, DataSpec
from relaymap.catalog import ItemNotFound, open_catalog
from relaymap.catalog.backends import PROVIDER
from relaymap.catalog.storage import check_id, check_writable, join, normalize_url
from relaymap.ingest import GridError, NoImageryError, NoItemsFound, search
from relaymap.ingest.composite import CompositeConfig, intersecting
from relaymap.ingest.grid import MAX_AREA_KM2, AreaGrid, area_grid, read_area
from relaymap.ingest.load import load_scene
from relaymap.ingest.periods import Every, Period, parse_periods
from relaymap.ingest.profiles import ReadOptions, plan_read
from relaymap.ingest.ranges import check_range

from .cells import CELLS_IN_FLIGHT, CellMapper, geobox_to_dict
from .engine import plan_engine
from .infer import remove_generations, tile_overlap
from .jobs import connect_ray, run_cell_tasks
from .options import MapOptions, SafeId
from .pool import actor_pool, run_unordered
from .products.assets import add_assets
from .products.class_areas import class_area_rows
from .products.timeline import ProductsConfig, derive, period_products
from .trained import ModelError, ModelInfo, read_info

log = logging.getLogger(__name__)

#: What :attr:`AreaResult.done` keeps of each task's result.
DONE_KEYS = ("cell", "period", "status", "node", "threads", "tiles", "seconds", "stage_seconds")
#: Levels of the cell scene stores (``write_scene``'s default): cells align to 2**3 px.
STORE_LEVELS = 3


class GridConfig(FrozenConfig):
    """The fixed grid the area is mapped on."""

    #: Pixel size in metres (default: the model's training pixel size).
    resolution: float | None = Field(default=None, gt=0)
    #: Cell side in pixels; a multiple of the tile stride (and of 8). Default: the multiple
    #: of both nearest :data:`CELL_PX_TARGET` (:func:`default_cell_px`: 1568 px for 256 px
    #: tiles, 1512 px for 64 px tiles with the default overlap of an eighth of a tile).
    cell_px: int | None = Field(default=None, ge=64)
    #: Projected CRS of the grid (default: the UTM zone of the area's centroid).
    crs: str | None = None
    #: Refuse larger areas (km2).
    max_area_km2: float = Field(default=MAX_AREA_KM2, gt=0)


class SourceConfig(ReadOptions):
    """Where the imagery comes from: a STAC API, how its items become the model's bands
    (the source profile and overrides, :class:`relaymap.ingest.profiles.ReadOptions`) and
    how they are composited."""

    stac_api: str
    collections: list[SafeId] = Field(min_length=1)
    #: Skip items with ``eo:cloud_cover`` above this (percent).
    max_cloud_cover: float | None = Field(default=None, ge=0, le=100)
    composite: CompositeConfig = CompositeConfig()
    #: Save the source items into the output catalog and link the maps to those copies:
    #: for a source that does not last (a local or temporary STAC API, like the demo's).
    copy_items: bool = False


class AreaConfig(FrozenConfig):
    """An area mapped every period with one model."""

    #: A GeoJSON polygon (file, URL or inline JSON) or a ``minlon,minlat,maxlon,maxlat`` bbox.
    area: str
    #: ``START/END`` (e.g. ``2026-01/2026-06``), one period (``2026-03``) or ``last``.
    period: str
    every: Every = "month"
    #: Model: safetensors weights written by training, or its MLM item (``.json``).
    model: str
    source: SourceConfig
    #: Products go to ``<out>/<collection>/<period>/...``.
    out: str
    #: Static catalog URL or STAC API (default: a static catalog at ``<out>/catalog``).
    catalog: str | None = None
    #: The run's collection: one item per cell and period, the mosaics and class areas.
    collection: SafeId = "relaymap-area"
    #: The maps' license (an SPDX id), recorded on the collection.
    license: str = Field(default="CC-BY-4.0", pattern=r"^[A-Za-z0-9.+-]+$")
    #: Cell composites (scene stores) go here (default ``<out>/<collection>/composites``).
    work: str | None = None
    grid: GridConfig = GridConfig()
    options: MapOptions = MapOptions()
    #: Beyond the cell maps: change between periods, stable maps, imagery, low confidence.
    products: ProductsConfig = ProductsConfig()


@dataclass
class AreaResult:
    """What :func:`map_area` did (small: ids, counts and URLs)."""

    collection: pystac.Collection | None
    cells: int
    periods: list[str]
    mapped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    nodata: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    nodes: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    mosaics: dict[str, str] = field(default_factory=dict)
    #: Imagery and stable mosaics, changes
    #: (:meth:`relaymap.flows.products.timeline.Derived.summary`).
    derived: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: Per task run: cell, period, status, node, torch threads, tiles run, seconds (and
    #: per stage: wait for a lock, composite, predict, write).
    done: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The result as plain JSON (CLI ``--json``, Prefect task result)."""
        return {
            "collection": self.collection.get_self_href() if self.collection else None,
            "periods": self.periods,
            "mapped": self.mapped,
            "skipped": self.skipped,
            "nodata": self.nodata,
            "failed": self.failed,
            "mosaics": self.mosaics,
            "class_areas": self.rows,
            "nodes": self.nodes,
            **self.derived,
        }


def check_model(info: ModelInfo, resolution: float) -> None:
    """The grid's pixel size is the one the model was trained on."""
    size = info.spec.pixel_size
    if size and abs(resolution / size - 1) > PIXEL_SIZE_TOLERANCE:
        raise ModelError(
            f"the grid has {resolution:g} m pixels but model {info.weights_url} was trained on "
            f"{size:g} m pixels; map at {size:g} m"
        )


def _search(
    config: AreaConfig, grid: AreaGrid, period: Period, bands: tuple[str, ...]
) -> list[pystac.Item]:
    src = config.source
    try:
        items = search(
            src.stac_api,
            collections=src.collections,
            intersects=grid.area.to_crs("EPSG:4326").json,
            datetime=period.interval(),
            max_cloud_cover=src.max_cloud_cover,
        )
    except NoItemsFound:
        return []
    for item in items:
        check_id(item.id, f"source STAC item id (from {src.stac_api})")  # ids become hrefs
        plan_read(item, bands, src.read_options())  # every band found, none ambiguous
    return items


#: Pixels per side of the coarse read that checks a source's values before any compute.
PREFLIGHT_PX = 64


def check_source_range(
    config: AreaConfig, grid: AreaGrid, items: list[pystac.Item], spec: DataSpec
) -> None:
    """Read the least cloudy of ``items`` over the area, coarsely (area-averaged, through
    the same profile, scale, offset and mask as the cells), and refuse the run if its
    values are far from what the model was trained on: a source without its scale, say,
    stops here with one line instead of mapping garbage.

    Raises:
        OutOfRangeError: naming the item, the band and what to set.
    """
    if not items:
        return
    item = min(items, key=lambda it: (it.properties.get("eo:cloud_cover", 100.0), it.id))
    overlap = grid.area.to_crs(grid.crs) & Geometry(item.geometry, "EPSG:4326").to_crs(grid.crs)
    if overlap.is_empty:
        return
    x0, y0, x1, y1 = overlap.boundingbox
    res = max(grid.resolution, max(x1 - x0, y1 - y0) / PREFLIGHT_PX)
    gbox = GeoBox.from_bbox((x0, y0, x1, y1), crs=grid.crs, resolution=res)
    read = config.source.read_options()  # a quick look: GDAL's average from overviews
    image = load_scene([item], spec.bands, geobox=gbox, read=read, overviews=True)
    with warnings.catch_warnings():  # rasterio's own in-memory step of a decimated read
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        values = image.values
    where = f"source item {item.id} of {config.source.stac_api}"
    check_range(values, spec.bands, spec.mean, spec.std, where=where)


def slim(item: pystac.Item, bands: tuple[str, ...], read: ReadOptions) -> dict[str, Any]:
    """An item's JSON for a task: only the assets a worker reads (those holding ``bands``,
    and the mask's) and the self link (public Sentinel-2 items carry dozens of assets; a
    task descriptor should stay a few kB)."""
    plan = plan_read(item, bands, read)
    keep = {plan.mask_asset} | {b.asset for b in plan.bands}
    d = item.to_dict(transform_hrefs=False)
    d["assets"] = {k: v for k, v in d["assets"].items() if k in keep}
    d["links"] = [ln for ln in d["links"] if ln.get("rel") == "self"]
    return d


def fingerprint(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """What the driver decided before any compute (small: grids, ids and item JSON)."""

    info: ModelInfo
    grid: AreaGrid
    periods: list[Period]
    #: Task descriptors for the workers (see :func:`relaymap.flows.cells.map_cell`).
    tasks: list[dict[str, Any]]
    #: Map items whose inputs are unchanged, by id.
    skipped: dict[str, pystac.Item]
    #: Map item ids of cells without any source item in their period.
    empty: list[str]


#: The cell side the default grid aims at: large enough that a cell's halo is a small share
#: of its reads, small enough that one cell's composite and map fit a worker's memory.
CELL_PX_TARGET = 1536


def default_cell_px(step: int, near: int = CELL_PX_TARGET) -> int:
    """The multiple of ``step`` (:func:`relay_models.geometry.cell_step`: the tile stride
    and the store levels' 2**3) nearest ``near`` px, and at least one step."""
    return max(step, round(near / step) * step)


def plan(config: AreaConfig, *, now: dt.datetime | None = None) -> Plan:
    """The driver's plan: model info, grid, periods, the tasks to run and what to skip.

    Raises:
        AreaError, PeriodError, GridError: bad area, period or grid settings.
        ModelError: a model that cannot map on this grid.
        UnknownCollectionError, StacApiError: a collection the source lacks, a source down.
        MissingAssetError: source items without a band the model needs.
        StorageError: an output location that cannot be written.
        NoImageryError: no source item touches the area in any period.
    """
    info = read_info(config.model)
    spec = info.spec
    opts = config.options
    resolution = config.grid.resolution or spec.pixel_size or 10.0
    check_model(info, resolution)
    tile_px = opts.tile_px or spec.window_px
    overlap = tile_overlap(tile_px, opts.overlap_px)
    step = cell_step(tile_px, overlap, STORE_LEVELS)
    cell_px = config.grid.cell_px or default_cell_px(step)
    if cell_px % step:
        raise GridError(
            f"cell_px={cell_px} must be a multiple of {step} (the tile stride "
            f"{tile_px - overlap} and 2**{STORE_LEVELS}) for cells to join without seams; "
            f"use {default_cell_px(step, cell_px)}"
        )
    halo = cell_halo(tile_px, overlap, spec.factor, STORE_LEVELS)
    grid = area_grid(
        read_area(config.area),
        resolution=resolution,
        cell_px=cell_px,
        crs=config.grid.crs,
        max_area_km2=config.grid.max_area_km2,
    )
    periods = parse_periods(config.period, config.every, now=now)
    out = join(normalize_url(config.out), config.collection)
    work = normalize_url(config.work) if config.work else join(out, "composites")
    for url in dict.fromkeys([normalize_url(config.out), work, catalog_url(config)]):  # first
        if not url.startswith(("http://", "https://")):  # a STAC API is written through its API
            check_writable(url)
    catalog = open_catalog(catalog_url(config))
    tasks, skipped, empty = [], {}, []
    read = config.source.read_options()
    common = {
        "model": info.digest,
        "options": opts.model_dump(mode="json"),
        "composite": config.source.composite.model_dump(mode="json"),
        "read": read.recipe(),  # what decides the pixels (not the signing budget)
        "halo": halo,
        "low_confidence": config.products.low_confidence,
    }
    found = {period.id: _search(config, grid, period, spec.bands) for period in periods}
    touching = {  # per period and cell: the items that reach the cell (and its halo)
        (period.id, cell.id): mine
        for period in periods
        for cell in grid.cells
        if intersecting(
            mine := intersecting(found[period.id], cell.geobox.pad(halo).extent),
            cell.geobox.extent,
        )
    }
    for period in periods:  # the values the model will see, one coarse read per period
        seen = {it.id: it for (pid, _), its in touching.items() if pid == period.id for it in its}
        check_source_range(config, grid, list(seen.values()), spec)
    if not touching:  # before anything is written
        raise NoImageryError(
            f"no item of {', '.join(config.source.collections)} on {config.source.stac_api} "
            f"touches the area in {config.period} (every {config.every}); nothing to map"
        )
    for period in periods:
        items = found[period.id]
        if config.source.copy_items and items:
            catalog.add_items(items)  # durable copies: their self hrefs are now the catalog's
        for cell in grid.cells:
            item_id = check_id(f"{info.name}-{period.id}-{cell.id}", "map item id")
            if (period.id, cell.id) not in touching:
                empty.append(item_id)
                continue
            mine = touching[period.id, cell.id]
            fp = fingerprint(
                {
                    **common,
                    "grid": geobox_to_dict(cell.geobox),
                    "items": [(it.id, it.properties.get("updated"), it.datetime) for it in mine],
                }
            )
            try:
                existing = catalog.get_item(config.collection, item_id)
            except ItemNotFound:
                existing = None
            if existing is not None and existing.properties.get("relaymap:inputs") == fp:
                skipped[item_id] = existing
                continue
            tasks.append(
                {
                    "cell": cell.id,
                    "period": period.id,
                    "start": period.start.isoformat(),
                    "end": period.end.isoformat(),
                    "geobox": geobox_to_dict(cell.geobox),
                    "halo": halo,
                    "items": [slim(it, spec.bands, read) for it in mine],
                    "item_id": item_id,
                    "collection": config.collection,
                    "fingerprint": fp,
                    "store": join(work, period.id, f"{cell.id}.zarr"),
                    "prefix": join(out, period.id, item_id),
                    "options": common["options"],
                    "composite": common["composite"],
                    "read": read.model_dump(mode="json"),
                    "low_confidence": common["low_confidence"],
                }
            )
    return Plan(info, grid, periods, tasks, skipped, empty)


def catalog_url(config: AreaConfig) -> str:
    return config.catalog or join(normalize_url(config.out), "catalog")


def run_tasks(
    tasks: list[dict],
    model_url: str,
    opts: MapOptions,
    *,
    use_gpu: bool,
    progress: bool,
    engine: Literal["torch", "onnxruntime"] = "torch",
    onnx: str | None = None,
):
    """The Ray job: yields each task's result (a dict) as it finishes, from a pool of
    :class:`CellMapper` actors (:mod:`relaymap.flows.pool`). ``model_url`` is the model as
    the user gave it (its MLM item, or weights), so workers see the same model identity and
    lineage as the driver; ``engine`` and ``onnx`` are :func:`plan_engine`'s."""
    kwargs = {"model_url": model_url, "use_gpu": use_gpu, "engine": engine, "onnx": onnx}
    payloads = (json.dumps(t) for t in tasks)
    with (
        tqdm(total=len(tasks), unit="cell", desc="mapping cells", disable=not progress) as bar,
        # two cells per actor at once: one composites while the other runs the model
        # (CellMapper's model lock); no more are queued, so idle actors get the next cell
        actor_pool(
            CellMapper,
            kwargs,
            size=min(opts.workers, len(tasks)),
            use_gpu=use_gpu,
            concurrency=CELLS_IN_FLIGHT,
        ) as actors,
    ):
        for result in run_unordered(actors, "map", payloads, in_flight=CELLS_IN_FLIGHT):
            bar.update(1)
            yield json.loads(result)


def map_area(
    config: AreaConfig,
    *,
    address: str | None = None,
    progress: bool = True,
    now: dt.datetime | None = None,
) -> AreaResult:
    """Map ``config.area`` for every period with one Ray job; register cell items, a
    mosaic per period and the class-area table in ``config.collection``.

    The warnings (cells without imagery, items without a mask) are in the result, for the
    caller to show once (the CLI prints them, the Prefect task logs them).

    Raises:
        AreaError, PeriodError, GridError, ModelError, MissingAssetError, StorageError,
        UnknownCollectionError: bad input, before any compute, nothing written.
        NoImageryError: no source item touches the area in any period; nothing written.
    """
    import ray

    t0 = time.perf_counter()
    todo = plan(config, now=now)
    info, periods, tasks, skipped = todo.info, todo.periods, todo.tasks, todo.skipped
    result = AreaResult(None, len(todo.grid.cells), [p.id for p in periods])
    result.skipped = sorted(skipped)
    result.nodata = list(todo.empty)
    result.warnings = [
        f"{i}: no source item in this period; no map for this cell" for i in todo.empty
    ]
    catalog = open_catalog(catalog_url(config))
    mapped: dict[str, pystac.Item] = {}
    generations: dict[str, tuple[str, str]] = {}
    prefixes = {t["item_id"]: t["prefix"] for t in tasks}
    if tasks:
        connect_ray(address)
        use_gpu = config.options.use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        tile_px = config.options.tile_px or info.spec.window_px
        engine, onnx = plan_engine(info, config.options, tile_px, use_gpu=use_gpu)
        results = run_tasks(
            tasks,
            config.model,
            config.options,
            use_gpu=use_gpu,
            progress=progress,
            engine=engine,
            onnx=onnx,
        )
        for r in results:
            result.nodes[r["node"]] = result.nodes.get(r["node"], 0) + 1
            result.done.append({k: r[k] for k in DONE_KEYS})
            result.warnings += [f"{r['item_id']}: {w}" for w in r["warnings"]]
            if r["status"] == "mapped":
                item = pystac.Item.from_dict(r["item"], migrate=False)
                mapped[item.id] = item
                generations[item.id] = (r["generation"], prefixes[item.id])
            elif r["status"] == "nodata":
                result.nodata.append(r["item_id"])
                result.warnings.append(
                    f"{r['item_id']}: no clear pixel in period {r['period']} (no item, or all "
                    f"cloud/nodata); no map for this cell"
                )
            else:
                result.failed[r["item_id"]] = r["error"]
    if mapped:
        catalog.add_items(list(mapped.values()))  # the flip: readers see the new COGs
        for generation, prefix in generations.values():
            remove_generations(prefix, keep=join(prefix, generation))
    result.mapped = sorted(mapped)
    current = [  # every period of this model in the collection: the table covers them all
        it
        for it in catalog.search(collections=[config.collection])
        if it.properties.get("relaymap:model") == info.name
    ]
    if not current:  # nothing mapped, now or before: no empty table, plot or collection
        result.seconds = time.perf_counter() - t0
        return result
    result.rows = class_area_rows([p.id for p in periods], info.spec.class_names, current)
    result.collection, result.mosaics = _products(config, info, periods, current, result.rows)
    extra = derive(
        config,
        info.spec.class_table(),
        [p.id for p in periods],
        current,
        catalog_url=catalog_url(config),
        run=lambda tasks: run_cell_tasks(tasks, address=address),
    )
    result.derived, result.warnings = extra.summary(), result.warnings + extra.warnings
    result.seconds = time.perf_counter() - t0
    return result


def _products(config, info, periods, items: list[pystac.Item], rows):
    """Mosaics per period (of this run: other periods keep theirs), the class-area table
    and plot over every period of the collection, and the collection holding them."""
    catalog = open_catalog(catalog_url(config))
    out = join(normalize_url(config.out), config.collection)
    mosaics, assets = period_products(out, periods, items, info.spec.class_table(), rows)
    try:
        collection = catalog.get_collection(config.collection)
    except ItemNotFound:
        area = read_area(config.area).to_crs("EPSG:4326")
        collection = pystac.Collection(
            config.collection,
            description="",
            extent=pystac.Extent(
                pystac.SpatialExtent([list(area.boundingbox)]),
                pystac.TemporalExtent([[periods[0].start, periods[-1].end]]),
            ),
            license="other",
        )
    collection.title = f"relaymap land cover: {config.collection}"
    collection.license = config.license
    collection.providers = [pystac.Provider.from_dict(PROVIDER)]
    collection.description = (
        f"Land cover of an area every {config.every} on a fixed grid, one item per cell and "
        f"period, mapped by relaymap with model {info.name}; a VRT mosaic per period and the "
        f"class areas over time are assets of this collection."
    )
    collection.extra_fields["relaymap:model"] = info.name
    add_assets(collection, assets)
    catalog.add_collection(collection)
    return collection, mosaics
