"""What an area run publishes over its periods, after the cells are mapped: a mosaic per
period and the class-area table (:func:`period_products`, written by the driver), and,
derived from the cell maps, the imagery under each period's map, a stable map per period
(optional), and the change between consecutive periods.

Each is made per cell by a Ray task (:func:`cell_task`) that reads the cell's products from
storage and writes its own COG there; the driver sends URLs and gets back URLs and counts
(no pixels), then writes a VRT mosaic per product and registers them as assets of the run's
collection (:func:`derive`). Cell outputs record what they were made from, so a rerun
redoes only the cells whose inputs changed. Nothing here starts Ray: the caller passes the
function that runs the tasks (:func:`relaymap.flows.jobs.run_cell_tasks`, or a loop over
:func:`cell_task` in this process).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pystac
from pydantic import Field, field_validator

from relay_models.config import FrozenConfig
from relaymap.catalog import open_catalog
from relaymap.catalog.storage import StorageError, join, normalize_url
from relaymap.ingest import IngestError
from relaymap.ingest.periods import Period

from .assets import CSV, PNG, VRT, add_assets, layer_fields, product_asset
from .change import (
    MAX_CLASSES,
    ChangeConfig,
    ChangeError,
    ChangeProduct,
    cell_items,
    change_cell,
    change_folder,
    change_products,
    change_tasks,
    output_folder,
    register_results,
)
from .class_areas import plot_class_areas, write_table
from .imagery import IMAGERY_NODATA, RGB, imagery_cell, imagery_tasks, write_rgb_mosaic
from .mmu import MIN_AREA_HA
from .mosaic import write_mosaic
from .stable import StableConfig, stable_cell, stable_tasks

log = logging.getLogger(__name__)

#: Below this highest class probability a mapped pixel counts as low confidence.
LOW_CONFIDENCE = 0.5


class ProductsConfig(FrozenConfig):
    """What an area run makes beyond the cell maps (``AreaConfig.products``)."""

    #: The change between consecutive periods: transition matrix, change map, STAC item,
    #: with a minimum mapping unit (``{min_area_ha: 0.5}``); ``true`` (the default) is
    #: ``{}``, ``false`` or null none.
    change: ChangeConfig | None = ChangeConfig()
    #: A stable map per period beside the raw one (None: none).
    stable: StableConfig | None = None
    #: A true-colour COG per cell and period from its composite, and a mosaic per period.
    imagery: bool = True
    #: Mapped pixels whose highest class probability is below this are counted as low
    #: confidence (per class, next to the class areas).
    low_confidence: float = Field(default=LOW_CONFIDENCE, gt=0, le=1)

    @field_validator("change", mode="before")
    @classmethod
    def _change_switch(cls, value: Any) -> Any:
        """``change: true`` / ``false`` (the switch it was) -> the defaults / none."""
        if value is True:
            return {}
        return None if value is False else value


def period_products(
    out: str,
    periods: Sequence[Period],
    items: Sequence[pystac.Item],
    classes: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, str], dict[str, pystac.Asset]]:
    """The products of an area run's mapped ``periods``, under ``out``: a VRT mosaic per
    period of its cell maps (among ``items``: cell items of the collection), and the
    class-area table (``rows``) and its plot over every period of the collection.

    Returns:
        ``{period id: mosaic URL}`` and the collection assets of all three kinds.
    """
    mosaics = {}
    for period in periods:
        cogs = sorted(
            it.assets["classes"].href
            for it in items
            if it.properties.get("relaymap:period") == period.id
        )
        if cogs:
            mosaics[period.id] = write_mosaic(join(out, period.id, "mosaic.vrt"), cogs, classes)
    table_url = write_table(join(out, "class-areas.csv"), rows)
    colors = {c["name"]: "#" + c["color_hint"].lstrip("#") for c in classes if c.get("color_hint")}
    plot_url = plot_class_areas(join(out, "class-areas.png"), rows, colors)
    by_id = {p.id: p for p in periods}
    assets = {
        f"mosaic-{pid}": product_asset(
            url,
            f"land-cover mosaic {pid} (GDAL VRT over the cell COGs)",
            VRT,
            ["data", "mosaic"],
            {
                "relaymap:period": pid,
                "start_datetime": _iso(by_id[pid].start),
                "end_datetime": _iso(by_id[pid].end),
                **layer_fields(classes),
            },
        )
        for pid, url in mosaics.items()
    }
    assets["class-areas"] = product_asset(
        table_url, "class areas per period (km2)", CSV, ["metadata"]
    )
    assets["class-areas-plot"] = product_asset(plot_url, "class areas over time", PNG, ["overview"])
    return mosaics, assets


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def cell_task(task: Mapping[str, Any]) -> dict[str, Any]:
    """Run one per-cell task (``kind``: ``change``, ``stable`` or ``imagery``) on a worker;
    a failure reading or writing storage is reported in the result (``error``)."""
    run = {"change": change_cell, "stable": stable_cell, "imagery": imagery_cell}[task["kind"]]
    try:
        return {"kind": task["kind"], **run(task)}
    except (OSError, StorageError, IngestError, ValueError) as e:  # rasterio errors are OSError
        where = f"{task['kind']} of cell {task['cell']}"
        return {"kind": task["kind"], "cell": task["cell"], "error": f"{where}: {e}"}


@dataclass
class Derived:
    """What :func:`derive` made (URLs and small numbers)."""

    imagery: dict[str, str] = field(default_factory=dict)
    stable: dict[str, str] = field(default_factory=dict)
    changes: list[ChangeProduct] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "imagery": self.imagery,
            "stable": self.stable,
            "changes": [c.summary() for c in self.changes],
        }


def cells_by_period(items: Sequence[pystac.Item]) -> dict[str, dict[str, pystac.Item]]:
    """``{period: {cell: item}}`` of an area collection's cell map items."""
    out: dict[str, dict[str, pystac.Item]] = {}
    for it in items:
        p = it.properties
        if "classes" in it.assets and "relaymap:period" in p and "relaymap:cell" in p:
            out.setdefault(p["relaymap:period"], {})[p["relaymap:cell"]] = it
    return out


def derive(
    config: Any,
    classes: Sequence[Mapping[str, Any]],
    periods: Sequence[str],
    items: Sequence[pystac.Item],
    *,
    catalog_url: str,
    run: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
) -> Derived:
    """After an area run (``config``: its ``AreaConfig``) mapped ``periods`` (ids): the
    imagery of those periods, the stable maps of the periods whose window they fall in, and
    the changes between consecutive periods of the collection where one of the two is
    among ``periods``; ``items`` are the collection's cell items of this model. ``run`` runs
    a list of per-cell tasks (:func:`cell_task` each) and returns their results in order:
    :func:`relaymap.flows.jobs.run_cell_tasks` on Ray, or in this process."""
    products: ProductsConfig = config.products
    out = join(normalize_url(config.out), config.collection)
    work = normalize_url(config.work) if config.work else join(out, "composites")
    by_period = cells_by_period(items)
    order = sorted(by_period)
    ran = [p for p in periods if p in by_period]
    done = Derived()
    if not ran:
        return done
    tasks: list[dict[str, Any]] = []
    if products.imagery:
        for p in ran:
            tasks += imagery_tasks(
                by_period[p],
                p,
                lambda cell, p=p: join(work, p, f"{cell}.zarr"),
                join(out, p, "imagery"),
            )
    if products.stable is not None:
        reach = products.stable.lookback
        later = [q for q in order if any(0 <= order.index(q) - order.index(p) < reach for p in ran)]
        tasks += stable_tasks(
            by_period, later, products.stable, classes, lambda p: join(out, p, "stable")
        )
    pairs: dict[tuple[str, str], slice] = {}  # each pair's change tasks among ``tasks``
    change = products.change
    if change is not None and len(classes) > MAX_CLASSES:
        done.warnings.append(f"no change maps: {len(classes)} classes, at most {MAX_CLASSES}")
    elif change is not None:
        for p0, p1 in itertools.pairwise(order):
            if p0 in ran or p1 in ran:
                folder = change_folder(out, p0, p1)
                more = change_tasks(
                    by_period[p0],
                    by_period[p1],
                    classes,
                    folder,
                    min_area_ha=change.min_area_ha,
                )
                pairs[p0, p1] = slice(len(tasks), len(tasks) + len(more))
                tasks += more
    results = run(tasks)
    done.warnings += [r["error"] for r in results if "error" in r and r["kind"] != "change"]
    done.warnings += [
        f"imagery of cell {r['cell']}: {r['warning']}" for r in results if "warning" in r
    ]
    for kind, target, writer in (
        ("imagery", done.imagery, lambda url, cogs: write_rgb_mosaic(url, cogs)),
        ("stable", done.stable, lambda url, cogs: write_mosaic(url, cogs, classes)),
    ):
        cogs: dict[str, list[str]] = {}
        for r in results:
            if r["kind"] == kind and r.get("url") and "error" not in r:
                cogs.setdefault(r["period"], []).append(r["url"])
        for p, urls in sorted(cogs.items()):
            target[p] = writer(join(out, p, f"{kind}.vrt"), sorted(urls))
    register_layers(catalog_url, config.collection, done, classes, by_period)
    for (p0, p1), where in pairs.items():
        if where.start == where.stop:
            done.warnings.append(f"change {p0} → {p1}: no cell was mapped in both periods")
            continue
        try:
            done.changes.append(
                register_results(
                    catalog_url,
                    config.collection,
                    (p0, by_period[p0]),
                    (p1, by_period[p1]),
                    classes,
                    out,
                    results[where],
                    min_area_ha=change.min_area_ha,
                )
            )
        except ChangeError as e:
            done.warnings.append(f"change {p0} → {p1}: {e}")
    return done


def _times(cells: Mapping[str, pystac.Item]) -> dict[str, str]:
    p = next(iter(cells.values())).properties
    return {"start_datetime": p["start_datetime"], "end_datetime": p["end_datetime"]}


def register_layers(
    catalog_url: str,
    collection: str,
    done: Derived,
    classes: Sequence[Mapping[str, Any]],
    by_period: Mapping[str, Mapping[str, pystac.Item]],
) -> None:
    """The imagery and stable mosaics as assets of the run's collection."""
    if not done.imagery and not done.stable:
        return
    assets = {}
    for p, url in done.imagery.items():
        bands = [
            {"name": b, "data_type": "uint16", "nodata": IMAGERY_NODATA, "scale": 1e-4} for b in RGB
        ]
        assets[f"imagery-{p}"] = product_asset(
            url,
            f"true colour {p} (GDAL VRT over the cell composites: reflectance x 10000)",
            VRT,
            ["visual"],
            {"relaymap:period": p, **_times(by_period[p]), **layer_fields(bands=bands)},
        )
    for p, url in done.stable.items():
        assets[f"stable-{p}"] = product_asset(
            url,
            f"stable land cover {p} (mode of the last observable periods; GDAL VRT)",
            VRT,
            ["data", "stable"],
            {"relaymap:period": p, **_times(by_period[p]), **layer_fields(classes)},
        )
    catalog = open_catalog(catalog_url)
    col = catalog.get_collection(collection)
    add_assets(col, assets)
    catalog.add_collection(col)


def change_between(
    catalog_url: str,
    collection: str,
    before: str,
    after: str,
    *,
    run: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    out: str | None = None,
    min_area_ha: float = MIN_AREA_HA,
) -> ChangeProduct:
    """``relaymap change``: the change from period ``before`` to ``after`` of an area run's
    collection, computed per cell (``run`` runs the tasks, as in :func:`derive`) with the
    minimum mapping unit ``min_area_ha`` and registered in the collection.

    Raises:
        ItemNotFound: no such collection.
        ChangeError: a period without cell maps, the same period twice, no cell in both.
    """
    if before == after:
        raise ChangeError(f"--from and --to are the same period ({before}): nothing to compare")
    by_period, classes = cell_items(catalog_url, collection)
    for p in (before, after):
        if p not in by_period:
            known = ", ".join(sorted(by_period)) or "none"
            raise ChangeError(
                f"collection {collection!r} has no cell maps for period {p!r}; it has {known}"
            )
    folder = out or output_folder(catalog_url, collection)
    return change_products(
        catalog_url,
        collection,
        (before, by_period[before]),
        (after, by_period[after]),
        classes,
        folder,
        run,
        min_area_ha=min_area_ha,
    )
