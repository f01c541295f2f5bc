"""What changed between two periods of an area run.

Per cell, on a Ray worker (:func:`change_cell`): the two periods' class COGs are read (with
a margin of the neighbouring cells' maps), regions of one ``from → to`` pair smaller than
the minimum mapping unit (:class:`ChangeConfig`, 0.5 ha by default) become no change
(:mod:`relaymap.flows.products.mmu`), the from-to transition counts are taken over the
cell's pixels observable in both, and a change COG is written (0 = no change, one value per
ordered pair of different classes, 255 where either period is unobservable). The driver
(:func:`change_products`) only sums the counts: the transition matrix in km2 (CSV and a
heat-map PNG) and a VRT mosaic of the change COGs whose palette and category names list the
pairs that occurred, registered as assets of the run's collection, and a STAC item holding
the same files, linked ``derived_from`` both periods' cell items, in the collection
``<run collection>-changes`` (so the run's collection keeps one item per cell and period).

A cell's change COG records the checksums of its inputs (its two maps, its neighbours' and
the unit) and its counts (GDAL metadata), so a rerun reads the counts back instead of redoing
a cell whose maps did not change.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pystac
import rasterio
from pydantic import Field

from relay_models.config import FrozenConfig
from relaymap.catalog import CatalogError, open_catalog
from relaymap.catalog.storage import atomic_upload, atomic_write, check_id, exists, gdal_env, join

from .assets import CSV, PNG, VRT, add_assets, layer_fields, product_asset
from .cog import NODATA, palette, write_class_cog
from .mmu import (
    MIN_AREA_HA,
    grid_box,
    margin_px,
    min_pixels,
    neighbours,
    read_padded,
    sieve_change,
)
from .mosaic import write_mosaic

log = logging.getLogger(__name__)

#: The change COG's value where a pixel kept its class.
NO_CHANGE = 0
#: A change COG holds one value per ordered pair of different classes (``K (K - 1) + 1``
#: values below nodata 255): at most 16 classes.
MAX_CLASSES = 16
NO_CHANGE_COLOR = "D9D9D9"
#: GDAL metadata of a cell's change COG: what it was made from, and its counts.
INPUTS_TAG, COUNTS_TAG = "RELAYMAP_INPUTS", "RELAYMAP_TRANSITIONS"


class ChangeError(CatalogError):
    """The catalog has no change to compute for these periods (unknown collection or
    period, no cell mapped in both, too many classes)."""


class ChangeConfig(FrozenConfig):
    """The change between consecutive periods of an area run (``products.change``; ``true``
    is this with its defaults, ``false`` none)."""

    #: Minimum mapping unit (hectares): a connected region of one ``from → to`` pair
    #: (8-connected pixels, measured across cell borders) smaller than this is no change,
    #: in the change map and in the transition matrix; 0 keeps every pixel. The default,
    #: 0.5 ha, is 50 pixels of a 10 m map (:data:`relaymap.flows.products.mmu.MIN_AREA_HA`).
    min_area_ha: float = Field(default=MIN_AREA_HA, ge=0, le=10_000)


def pair_code(a: int, b: int, num_classes: int) -> int:
    """The change COG's value for class ``a`` becoming class ``b`` (``a != b``)."""
    return 1 + a * (num_classes - 1) + (b if b < a else b - 1)


def code_table(num_classes: int) -> np.ndarray:
    """``(K, K)`` uint8: the change value of each (from, to) pair; the diagonal is
    :data:`NO_CHANGE`."""
    if num_classes > MAX_CLASSES:
        raise ChangeError(
            f"change maps take at most {MAX_CLASSES} classes (one value per pair in a uint8 "
            f"COG); this map has {num_classes}"
        )
    table = np.full((num_classes, num_classes), NO_CHANGE, dtype=np.uint8)
    for a in range(num_classes):
        for b in range(num_classes):
            if a != b:
                table[a, b] = pair_code(a, b, num_classes)
    return table


def transitions(
    before: np.ndarray,
    after: np.ndarray,
    num_classes: int,
    *,
    min_pixels: int = 0,
    margin: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Transition counts and the change map of two class maps on one grid, with a minimum
    mapping unit.

    Args:
        before, after: ``(H, W)`` uint8 class indices, 255 = unobservable: a cell and
            ``margin`` pixels of its neighbours around it.
        num_classes: K.
        min_pixels: regions of one ``from → to`` pair (8-connected) of fewer pixels, over
            the whole arrays, are no change (:func:`relaymap.flows.products.mmu.sieve_change`);
            0 keeps every pixel.
        margin: pixels of the arrays' edges that are not the cell's.

    Returns:
        ``(K, K)`` int64 pixel counts (row: class before, column: class after) over the
        cell's pixels observable in both, and its ``(H - 2 margin, W - 2 margin)`` uint8
        change map (:func:`pair_code`, :data:`NO_CHANGE`, 255 where either is
        unobservable). The matrix is the change map's: a pixel of a region below the unit
        is no change and counted as keeping its earlier class (on the diagonal, in its
        ``from`` row), so the rows sum to the earlier map's class areas.
    """
    if before.shape != after.shape:
        raise ValueError(f"class maps of shapes {before.shape} and {after.shape}")
    table = code_table(num_classes)
    both = (before < num_classes) & (after < num_classes)
    change = np.full(before.shape, NODATA, dtype=np.uint8)
    change[both] = table[before[both], after[both]]
    change = sieve_change(change, min_pixels, no_change=NO_CHANGE)
    if margin:
        core = np.s_[margin:-margin, margin:-margin]
        before, after, both, change = before[core], after[core], both[core], change[core]
    a, b = before[both].astype(np.int64), after[both].astype(np.int64)
    b = np.where(change[both] == NO_CHANGE, a, b)
    counts = np.bincount(a * num_classes + b, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes), change


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array(bytes.fromhex(hex_colour.lstrip("#")[:6]), dtype=float)


def change_classes(
    classes: Sequence[Mapping[str, Any]], counts: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """The change map's classes (``index``, ``name``, ``color_hint``): "no change", then
    each pair ``from → to`` (only those with a count when ``counts`` is given). A pair's
    colour is mostly its new class's, tinted by the old one, so "→ urban" pairs look alike
    but not the same."""
    k = len(classes)
    colours = palette(classes)
    out = [{"index": NO_CHANGE, "name": "no change", "color_hint": NO_CHANGE_COLOR}]
    for a, ca in enumerate(classes):
        for b, cb in enumerate(classes):
            if a == b or (counts is not None and counts[a, b] == 0):
                continue
            rgb = 0.7 * np.array(colours[int(cb["index"])][:3]) + 0.3 * np.array(
                colours[int(ca["index"])][:3]
            )
            out.append(
                {
                    "index": pair_code(a, b, k),
                    "name": f"{ca['name']} → {cb['name']}",
                    "color_hint": bytes(np.rint(rgb).astype(np.uint8).tolist()).hex().upper(),
                }
            )
    return out


def read_tags(url: str) -> dict[str, str]:
    """A raster's GDAL metadata ({} when there is no raster at ``url``)."""
    if not exists(url):
        return {}
    with rasterio.Env(**gdal_env()), rasterio.open(url) as src:
        return dict(src.tags())


def read_classes(url: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A class COG's ``(H, W)`` uint8 values and its grid (``crs``, ``transform``)."""
    with rasterio.Env(**gdal_env()), rasterio.open(url) as src:
        return src.read(1), {"crs": src.crs, "transform": src.transform}


def change_cell(task: Mapping[str, Any]) -> dict[str, Any]:
    """One cell's change between two periods (a worker's task; small result).

    ``task``: ``cell``, ``before`` and ``after`` (the class COG URLs), ``inputs`` (their
    checksums), ``classes`` (the map's class table), ``url`` (the change COG to write),
    ``min_pixels`` (the minimum mapping unit), ``margin`` (pixels of the neighbours to
    read around the cell) and ``neighbours`` (``[before, after]`` class COG URLs of the
    cells within the margin).
    Returns ``cell``, ``url``, ``counts`` (K x K pixel counts) and ``pixel_m2``.
    """
    k = len(task["classes"])
    tags = read_tags(task["url"])
    if tags.get(INPUTS_TAG) == task["inputs"] and COUNTS_TAG in tags:
        done = json.loads(tags[COUNTS_TAG])
        return {"cell": task["cell"], "url": task["url"], "reused": True, **done}
    before, grid = read_classes(task["before"])
    after, grid_after = read_classes(task["after"])
    if grid != grid_after or before.shape != after.shape:
        raise ValueError(f"{task['before']} and {task['after']} are not on one grid")
    margin = task.get("margin", 0)
    if margin:
        near = task.get("neighbours", [])
        before, after = (
            read_padded([task[key], *(n[i] for n in near)], grid, before.shape, margin)
            for i, key in enumerate(("before", "after"))
        )
    counts, change = transitions(
        before, after, k, min_pixels=task.get("min_pixels", 0), margin=margin
    )
    t = grid["transform"]
    done = {"counts": counts.tolist(), "pixel_m2": abs(t.a * t.e)}
    write_class_cog(
        task["url"],
        change,
        crs=grid["crs"],
        transform=t,
        classes=change_classes(task["classes"]),
        tags={INPUTS_TAG: task["inputs"], COUNTS_TAG: json.dumps(done)},
    )
    return {"cell": task["cell"], "url": task["url"], "reused": False, **done}


def pair_id(before: str, after: str) -> str:
    """``2026-01_2026-02``: a pair of periods in paths and asset keys."""
    return check_id(f"{before}_{after}", "period pair")


@dataclass
class ChangeProduct:
    """A change between two periods as registered (URLs and small numbers)."""

    before: str
    after: str
    item: pystac.Item
    mosaic: str
    table: str
    plot: str
    #: ``{from: {to: km2}}`` over the pixels observable in both periods.
    matrix_km2: dict[str, dict[str, float]]
    cells: int
    reused: int = 0
    warnings: list[str] = field(default_factory=list)
    #: The minimum mapping unit the change map and the matrix were made with (hectares).
    min_area_ha: float = 0.0

    @property
    def changed_km2(self) -> float:
        return sum(v for a, row in self.matrix_km2.items() for b, v in row.items() if a != b)

    def summary(self) -> dict[str, Any]:
        return {
            "from": self.before,
            "to": self.after,
            "item": self.item.id,
            "item_collection": self.item.collection_id,
            "mosaic": self.mosaic,
            "table": self.table,
            "plot": self.plot,
            "cells": self.cells,
            "cells_reused": self.reused,
            "changed_km2": round(self.changed_km2, 6),
            "matrix_km2": self.matrix_km2,
            "min_area_ha": self.min_area_ha,
        }


def change_tasks(
    before: Mapping[str, pystac.Item],
    after: Mapping[str, pystac.Item],
    classes: Sequence[Mapping[str, Any]],
    folder: str,
    *,
    min_area_ha: float = MIN_AREA_HA,
) -> list[dict[str, Any]]:
    """One task per cell mapped in both periods (``{cell id: cell item}`` each), with the
    minimum mapping unit ``min_area_ha`` and the neighbours within its margin
    (:mod:`relaymap.flows.products.mmu`); change COGs go to ``folder/<cell>.tif``.

    Raises:
        ChangeError: too many classes, or a cell item without its grid (``proj:``).
    """
    code_table(len(classes))  # too many classes: fail before any work
    cells = sorted(set(before) & set(after))
    try:
        boxes = {c: grid_box(before[c].properties) for c in cells}
    except KeyError as e:
        raise ChangeError(f"a cell map item has no {e}: cannot place its neighbours") from None
    pixels, margins = {}, {}
    for cell, (x0, y0, x1, y1, res) in boxes.items():
        pixels[cell] = min_pixels(min_area_ha, res * res)
        margins[cell] = margin_px(pixels[cell], round(min(x1 - x0, y1 - y0) / res))
    near_cells = neighbours(boxes, margins)
    tasks = []
    for cell in cells:
        near = near_cells[cell]
        inputs = ":".join(_checksum(c) for n in [cell, *near] for c in (before[n], after[n]))
        if pixels[cell] > 1:  # else as without a unit: cells made before reuse their change
            digest = hashlib.sha256(inputs.encode()).hexdigest()[:16]
            inputs = (
                f"{_checksum(before[cell])}:{_checksum(after[cell])}:mmu{pixels[cell]}:{digest}"
            )
        tasks.append(
            {
                "kind": "change",
                "cell": cell,
                "before": _href(before[cell]),
                "after": _href(after[cell]),
                "inputs": inputs,
                "classes": list(classes),
                "url": join(folder, f"{check_id(cell, 'cell id')}.tif"),
                "min_pixels": pixels[cell],
                "margin": margins[cell],
                "neighbours": [[_href(before[n]), _href(after[n])] for n in near],
            }
        )
    return tasks


def _href(item: pystac.Item) -> str:
    return item.assets["classes"].get_absolute_href()


def _checksum(item: pystac.Item) -> str:
    asset = item.assets["classes"]
    return str(asset.extra_fields.get("file:checksum") or asset.get_absolute_href())


def write_matrix(url: str, names: Sequence[str], km2: np.ndarray) -> str:
    """The transition matrix as CSV: a row per class before (``from``), a column per class
    after, km2; then the totals."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["from", *names, "total"])
    for name, row in zip(names, km2, strict=True):
        w.writerow([name, *(f"{v:.6f}" for v in row), f"{row.sum():.6f}"])
    w.writerow(["total", *(f"{v:.6f}" for v in km2.sum(0)), f"{km2.sum():.6f}"])
    atomic_write(url, buf.getvalue().encode())
    return url


def plot_matrix(url: str, names: Sequence[str], km2: np.ndarray, title: str) -> str:
    """A heat map of the transition matrix (km2, log colour scale, values written in the
    cells; unchanged on the diagonal, outlined); PNG at ``url``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    k = len(names)
    fig, ax = plt.subplots(figsize=(2.2 + 0.75 * k, 1.6 + 0.7 * k), dpi=100)
    shown = np.where(km2 > 0, km2, np.nan)
    some = np.isfinite(shown).any()
    low = float(np.nanmin(shown)) if some else 1e-6
    high = float(np.nanmax(shown)) if some else 1.0
    high = high if high > low else low * 10
    im = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=low, vmax=high))
    for a in range(k):
        for b in range(k):
            if km2[a, b] > 0:
                light = np.log(km2[a, b] / low) < 0.6 * np.log(high / low)
                ax.text(
                    b,
                    a,
                    f"{km2[a, b]:.3g}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if light else "black",
                )
        ax.add_patch(plt.Rectangle((a - 0.5, a - 0.5), 1, 1, fill=False, lw=1.2, ec="0.4"))
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("to")
    ax.set_ylabel("from")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="km²", shrink=0.8)
    with atomic_upload(url, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return url


def _bbox(items: Sequence[pystac.Item]) -> list[float]:
    boxes = np.array([it.bbox for it in items if it.bbox])
    return [*boxes[:, :2].min(0).tolist(), *boxes[:, 2:].max(0).tolist()]


def change_products(
    catalog_url: str,
    collection: str,
    before: tuple[str, Mapping[str, pystac.Item]],
    after: tuple[str, Mapping[str, pystac.Item]],
    classes: Sequence[Mapping[str, Any]],
    out: str,
    run: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    *,
    min_area_ha: float = MIN_AREA_HA,
) -> ChangeProduct:
    """The change from period ``before`` to ``after`` (each ``(period id, {cell id: cell
    item})``) of a run's collection, with the minimum mapping unit ``min_area_ha``:
    ``run`` runs the per-cell tasks (on Ray workers) and returns their results; the driver
    writes the matrix, its plot and the change mosaic under ``out/changes/<from>_<to>/``
    and registers them (an item with lineage, and assets of the collection).

    Raises:
        ChangeError: no cell mapped in both periods, or too many classes.
    """
    folder = change_folder(out, before[0], after[0])
    tasks = change_tasks(before[1], after[1], classes, folder, min_area_ha=min_area_ha)
    if not tasks:
        raise ChangeError(
            f"no cell of collection {collection!r} was mapped in both {before[0]} and "
            f"{after[0]}: there is no change to compute"
        )
    return register_results(
        catalog_url, collection, before, after, classes, out, run(tasks), min_area_ha=min_area_ha
    )


def change_folder(out: str, before: str, after: str) -> str:
    """Where the change between two periods goes: ``out/changes/<from>_<to>``."""
    return join(out, "changes", pair_id(before, after))


def register_results(
    catalog_url: str,
    collection: str,
    before: tuple[str, Mapping[str, pystac.Item]],
    after: tuple[str, Mapping[str, pystac.Item]],
    classes: Sequence[Mapping[str, Any]],
    out: str,
    results: Sequence[Mapping[str, Any]],
    *,
    min_area_ha: float = MIN_AREA_HA,
) -> ChangeProduct:
    """The driver's part of :func:`change_products`, from the cells' ``results`` (made with
    the minimum mapping unit ``min_area_ha``, said in the titles): the sums, the matrix,
    its plot, the mosaic, their registration.

    Raises:
        ChangeError: a cell failed.
    """
    (p0, cells0), (p1, cells1) = before, after
    folder = change_folder(out, p0, p1)
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise ChangeError(f"{len(failed)} of {len(results)} cells failed: {failed[0]}")
    k = len(classes)
    names = [str(c["name"]) for c in classes]
    counts = np.zeros((k, k), dtype=np.int64)
    km2 = np.zeros((k, k))
    for r in results:
        c = np.asarray(r["counts"], dtype=np.int64)
        counts += c
        km2 += c * r["pixel_m2"] / 1e6
    table = write_matrix(join(folder, "transitions.csv"), names, km2)
    title = f"transitions {p0} → {p1} (km², {unit_text(min_area_ha)})"
    plot = plot_matrix(join(folder, "transitions.png"), names, km2, title)
    occurred = change_classes(classes, counts)
    mosaic = write_mosaic(join(folder, "change.vrt"), [r["url"] for r in results], occurred)
    matrix = {
        a: {b: round(float(km2[i, j]), 6) for j, b in enumerate(names)} for i, a in enumerate(names)
    }
    product = ChangeProduct(
        p0,
        p1,
        _change_item(
            changes_collection(collection),
            (p0, cells0),
            (p1, cells1),
            (mosaic, table, plot),
            occurred,
            min_area_ha,
        ),
        mosaic,
        table,
        plot,
        matrix,
        len(results),
        reused=sum(bool(r.get("reused")) for r in results),
        min_area_ha=min_area_ha,
    )
    product.item.properties["relaymap:transitions_km2"] = matrix
    product.item.properties["relaymap:changed_km2"] = round(product.changed_km2, 6)
    product.item.properties["relaymap:observable_km2"] = round(float(km2.sum()), 6)
    catalog = open_catalog(catalog_url)
    _ensure_changes_collection(catalog, collection, product.item)
    catalog.add_items([product.item])
    register_change(catalog, collection, product)
    return product


def changes_collection(collection: str) -> str:
    """The collection of a run's change items."""
    return check_id(f"{collection}-changes", "collection id")


def _ensure_changes_collection(catalog: Any, collection: str, item: pystac.Item) -> None:
    """Describe the run's changes collection the first time (license and providers of the
    run's collection)."""
    cid = changes_collection(collection)
    if cid in catalog.collection_ids():
        return
    run = catalog.get_collection(collection)
    catalog.add_collection(
        pystac.Collection(
            cid,
            description=(
                f"What changed between periods of {collection}: per pair of periods, the "
                "transition matrix (km2) and the change map, derived from both periods' maps."
            ),
            extent=pystac.Extent(
                pystac.SpatialExtent([item.bbox]), pystac.TemporalExtent([[None, None]])
            ),
            license=run.license,
            title=f"changes of {collection}",
            providers=run.providers,
        )
    )


def _period_times(items: Sequence[pystac.Item]) -> tuple[str, str]:
    p = items[0].properties
    return p["start_datetime"], p["end_datetime"]


def _change_item(
    collection: str,
    before: tuple[str, Mapping[str, pystac.Item]],
    after: tuple[str, Mapping[str, pystac.Item]],
    files: tuple[str, str, str],
    occurred: Sequence[Mapping[str, Any]],
    min_area_ha: float,
) -> pystac.Item:
    """The change's STAC item: its three files as assets, ``derived_from`` every cell item
    of both periods."""
    (p0, cells0), (p1, cells1) = before, after
    mosaic, table, plot = files
    first, second = list(cells0.values()), list(cells1.values())
    model = first[0].properties.get("relaymap:model", "model")
    bbox = _bbox(first + second)
    w, s, e, n = bbox
    start, _ = _period_times(first)
    _, end = _period_times(second)
    item = pystac.Item(
        check_id(f"{model}-change-{pair_id(p0, p1)}", "change item id"),
        geometry={"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        bbox=bbox,
        datetime=None,
        properties={
            "start_datetime": start,
            "end_datetime": end,
            "relaymap:change": {
                "from": p0,
                "to": p1,
                "model": model,
                "min_area_ha": min_area_ha,
            },
        },
        collection=collection,
    )
    add_assets(item, _change_assets(mosaic, table, plot, p0, p1, occurred, min_area_ha))
    for period, cell_items in ((p0, first), (p1, second)):
        for it in cell_items:
            href = it.get_self_href()
            if href:
                item.add_link(
                    pystac.Link(
                        "derived_from",
                        href,
                        media_type=pystac.MediaType.JSON,
                        title=f"{period} map {it.id}",
                    )
                )
    return item


def _change_assets(
    mosaic: str,
    table: str,
    plot: str,
    p0: str,
    p1: str,
    occurred: Sequence[Mapping[str, Any]],
    min_area_ha: float,
) -> dict[str, pystac.Asset]:
    """The change's three files as assets (keys as on its item), their titles saying the
    minimum mapping unit."""
    unit = unit_text(min_area_ha)
    return {
        "change": product_asset(
            mosaic,
            f"change {p0} → {p1} ({unit}; GDAL VRT over the cell change COGs)",
            VRT,
            ["data", "change"],
            {
                "relaymap:from": p0,
                "relaymap:to": p1,
                "relaymap:min_area_ha": min_area_ha,
                **layer_fields(occurred),
            },
        ),
        "transitions": product_asset(
            table, f"transitions {p0} → {p1} (km2, {unit})", CSV, ["metadata"]
        ),
        "transitions-plot": product_asset(
            plot, f"transition matrix {p0} → {p1} ({unit})", PNG, ["overview"]
        ),
    }


def unit_text(min_area_ha: float) -> str:
    """The minimum mapping unit in words, for titles."""
    if min_area_ha <= 0:
        return "no minimum mapping unit"
    return f"minimum mapping unit {min_area_ha:g} ha"


def register_change(catalog: Any, collection: str, product: ChangeProduct) -> None:
    """The change's files as assets of the run's collection (beside the period mosaics),
    keyed by the pair of periods."""
    col = catalog.get_collection(collection)
    pid = pair_id(product.before, product.after)
    assets = {f"{key}-{pid}": a.clone() for key, a in product.item.assets.items()}
    assets[f"change-{pid}"].extra_fields["relaymap:item"] = (
        f"{product.item.collection_id}/{product.item.id}"
    )
    add_assets(col, assets)
    catalog.add_collection(col)


def cell_items(
    catalog_url: str, collection: str
) -> tuple[dict[str, dict[str, pystac.Item]], list[dict[str, Any]]]:
    """The cell map items of an area collection by period and cell, and their classes
    (``index``, ``name``, ``color_hint``, from the items' ``classification:classes``).

    Raises:
        ItemNotFound: no such collection.
        ChangeError: it holds no cell maps.
    """
    catalog = open_catalog(catalog_url)
    catalog.get_collection(collection)  # ItemNotFound naming it
    by_period: dict[str, dict[str, pystac.Item]] = {}
    classes: list[dict[str, Any]] = []
    for it in catalog.search(collections=[collection]):
        p = it.properties
        if "classes" not in it.assets or "relaymap:period" not in p or "relaymap:cell" not in p:
            continue
        by_period.setdefault(p["relaymap:period"], {})[p["relaymap:cell"]] = it
        if not classes:
            classes = [
                {"index": c["value"], "name": c["name"], "color_hint": c.get("color_hint")}
                for c in it.assets["classes"].extra_fields.get("classification:classes", [])
            ]
    if not by_period:
        raise ChangeError(f"collection {collection!r} holds no cell maps of an area run")
    return by_period, classes


def output_folder(catalog_url: str, collection: str) -> str:
    """Where an area run wrote its collection's products (the folder of its class-area
    table), for products added later.

    Raises:
        ChangeError: the collection has no class-area table (not an area run's).
    """
    col = open_catalog(catalog_url).get_collection(collection)
    asset = col.assets.get("class-areas")
    if asset is None:
        raise ChangeError(
            f"collection {collection!r} has no class-areas asset: not an area run's "
            "collection (give --out)"
        )
    return (asset.get_absolute_href() or asset.href).rsplit("/", 1)[0]
