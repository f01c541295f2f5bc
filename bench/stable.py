"""Stable maps against raw maps: spurious changes under model noise, with the same true change.

    python bench/stable.py [--periods 6] [--since 3] [--flip 0.04] [--haze 3] [--clouds 2]
                           [--window 3] [--seed 0] [--out DIR]

The land cover is the demo's held-out area (``relaymap demo``: the layout of
``make_s2_area`` with the demo's seed, its 2x2 cells of 288 px, and its known change, a
field built over, :data:`relaymap.flows.demo.AREA_CHANGE`), over ``--periods`` months with
the change from month ``--since`` on. Each month's map is that truth with injected model
noise: ``--flip`` of the pixels flipped to a random other class, ``--haze`` patches where
pixels turn into the class they are most confused with (forest and park, lake and river,
cropland and urban), and ``--clouds`` patches unobservable. The maps are written as an area
run writes them (a class COG per cell, cell items in a static catalog), then an area run's
products are derived from them on local Ray (:func:`relaymap.flows.products.timeline.derive`: the
stable maps, window ``--window``, and the change between consecutive months).

Printed per pair of consecutive months, over the pixels observable in both raw maps: the
changed pixels of the raw maps and of the stable maps, split into the true change (a pixel
of the field turning from cropland to urban, in or after the month of the change) and
spurious changes (every other changed pixel); and the cropland -> urban area of the raw
change products' transition matrix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: A class -> the class a model most confuses it with.
CONFUSED = {"cropland": "urban", "forest": "park", "park": "forest", "urban": "cropland"}
CONFUSED |= {"lake": "river", "river": "lake"}


def blobs(shape: tuple[int, int], n: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` discs of about ``radius`` px at random places."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    out = np.zeros(shape, dtype=bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        out |= np.hypot(yy - cy, xx - cx) < radius * rng.uniform(0.6, 1.4)
    return out


def noisy(
    truth: np.ndarray,
    rng: np.random.Generator,
    *,
    flip: float,
    haze: int,
    clouds: int,
    names: list[str],
) -> np.ndarray:
    """A month's map: ``truth`` (class indices) with injected model noise and clouds
    (255)."""
    k = len(names)
    out = truth.copy()
    flips = rng.random(truth.shape) < flip
    out[flips] = (truth[flips] + rng.integers(1, k, flips.sum())) % k  # another class
    partner = np.array([names.index(CONFUSED.get(n, n)) for n in names], dtype=np.uint8)
    hazy = blobs(truth.shape, haze, truth.shape[0] / 12, rng) & (rng.random(truth.shape) < 0.8)
    out[hazy] = partner[truth[hazy]]
    out[blobs(truth.shape, clouds, truth.shape[0] / 8, rng)] = 255
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--periods", type=int, default=6)
    ap.add_argument("--since", type=int, default=3, help="first month (0-based) with the change")
    ap.add_argument("--flip", type=float, default=0.04)
    ap.add_argument("--haze", type=int, default=3)
    ap.add_argument("--clouds", type=int, default=2)
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the maps (default: a temporary one)")
    args = ap.parse_args()

    import dataclasses

    import rasterio
    from rasterio.transform import from_origin

    from relaymap.catalog import StaticCatalog, map_item
    from relaymap.flows.area import AreaConfig
    from relaymap.flows.demo import AREA_CHANGE, AREA_ORIGIN, CELL_PX, MARGIN_PX
    from relaymap.flows.jobs import run_cell_tasks
    from relaymap.flows.products.cog import write_class_cog
    from relaymap.flows.products.timeline import derive
    from relaymap.ingest.sample import CLASSES, change_mask, s2_area_layout

    rng = np.random.default_rng(args.seed)
    names = [c.name for c in CLASSES]
    table = [
        {"index": i, "name": c.name, "color_hint": c.color_hint} for i, c in enumerate(CLASSES)
    ]
    side = 2 * CELL_PX
    layout = s2_area_layout(side + 2 * MARGIN_PX, 48, 100)  # the demo's: seed 0 + 100
    field = change_mask(layout, dataclasses.replace(AREA_CHANGE, since=args.since))
    crop = np.s_[MARGIN_PX : MARGIN_PX + side, MARGIN_PX : MARGIN_PX + side]
    before, field = layout[crop], field[crop]
    after = before.copy()
    after[field] = names.index(AREA_CHANGE.to_class)
    truths = [before if i < args.since else after for i in range(args.periods)]
    raw = [
        noisy(t, rng, flip=args.flip, haze=args.haze, clouds=args.clouds, names=names)
        for t in truths
    ]
    folder = Path(args.out or tempfile.mkdtemp(prefix="relaymap-bench-stable-"))
    catalog_url = str(folder / "catalog")
    x0, y1 = AREA_ORIGIN
    periods = [f"2025-{m + 1:02d}" for m in range(args.periods)]
    items = []
    for p, (period, month) in enumerate(zip(periods, raw, strict=True)):
        start = dt.datetime(2025, p + 1, 1, tzinfo=dt.UTC)
        end = dt.datetime(2025 + (p + 1) // 12, (p + 1) % 12 + 1, 1, tzinfo=dt.UTC)
        for cy in range(2):
            for cx in range(2):
                cell = f"c{cx}{cy}"
                url = folder / "maps" / "bench" / period / cell / "classes.tif"
                transform = from_origin(x0 + cx * CELL_PX * 10, y1 - cy * CELL_PX * 10, 10, 10)
                part = month[cy * CELL_PX : (cy + 1) * CELL_PX, cx * CELL_PX : (cx + 1) * CELL_PX]
                write_class_cog(
                    f"file://{url}", part, crs="EPSG:32633", transform=transform, classes=table
                )
                item = map_item(
                    f"file://{url}",
                    item_id=f"bench-{period}-{cell}",
                    collection="bench",
                    classes=table,
                    sources=[],
                    datetime=start,
                )
                item.properties |= {
                    "start_datetime": start.isoformat().replace("+00:00", "Z"),
                    "end_datetime": end.isoformat().replace("+00:00", "Z"),
                    "relaymap:period": period,
                    "relaymap:cell": cell,
                }
                items.append(item)
    catalog = StaticCatalog(catalog_url)
    catalog.add_items(items)
    config = AreaConfig.model_validate(
        {
            "area": "15,43,15.1,43.1",
            "period": f"{periods[0]}/{periods[-1]}",
            "model": "none",
            "source": {"stac_api": "http://127.0.0.1:1", "collections": ["none"]},
            "out": str(folder / "maps"),
            "collection": "bench",
            "products": {
                "imagery": False,
                "stable": {"window": args.window, "lookback": 2 * args.window},
                "change": {"min_area_ha": 0},  # the raw maps' every change, as before
            },
        }
    )
    items = list(catalog.items("bench"))
    done = derive(config, table, periods, items, catalog_url=catalog_url, run=run_cell_tasks)
    assert not done.warnings, done.warnings
    stable = []
    for period in periods:
        with rasterio.open(done.stable[period].removeprefix("file://")) as src:
            stable.append(src.read(1))

    pixel_km2 = 1e-4
    true_km2 = field.sum() * pixel_km2
    print(
        f"demo area {side}x{side} px, {args.periods} months, change in month {args.since}: "
        f"{field.sum()} px ({true_km2:.4f} km2) {AREA_CHANGE.from_class} -> "
        f"{AREA_CHANGE.to_class}; noise: flip {args.flip:.0%}, {args.haze} haze and "
        f"{args.clouds} cloud patches a month; stable window {args.window}\n"
    )
    head = f"{'months':<18}{'raw true':>10}{'raw spurious':>14}{'stable true':>13}"
    head += f"{'stable spurious':>17}{'matrix km2':>12}"
    print(head)
    totals = np.zeros(4, dtype=np.int64)
    by_pair = {(c.before, c.after): c for c in done.changes}
    src, dst = names.index(AREA_CHANGE.from_class), names.index(AREA_CHANGE.to_class)
    for i in range(1, args.periods):
        both = (raw[i - 1] != 255) & (raw[i] != 255)
        row = []
        for maps in (raw, stable):
            a, b = maps[i - 1], maps[i]
            changed = both & (a != b)
            # the true change: a field pixel turning urban, once the field was built over
            true = changed & field & (a == src) & (b == dst) & (i >= args.since)
            row += [int(true.sum()), int((changed & ~true).sum())]
        totals += row
        km2 = by_pair[(periods[i - 1], periods[i])].matrix_km2["cropland"]["urban"]
        pair = f"{periods[i - 1]}->{periods[i]}"
        print(f"{pair:<18}{row[0]:>10}{row[1]:>14}{row[2]:>13}{row[3]:>17}{km2:>12.4f}")
    print(f"{'total':<18}{totals[0]:>10}{totals[1]:>14}{totals[2]:>13}{totals[3]:>17}")
    cut = 1 - totals[3] / max(totals[1], 1)
    print(f"\nspurious changes: raw {totals[1]}, stable {totals[3]} ({cut:.1%} fewer)")
    # the same true change: the field before the change and at the end of the series
    for name, maps in (("raw", raw), ("stable", stable)):
        a, b = maps[args.since - 1], maps[-1]
        seen = (a != 255) & (b != 255) & field
        shown = (seen & (a == src) & (b == dst)).sum() / max(seen.sum(), 1)
        print(
            f"{name}: {shown:.1%} of the field ({seen.sum()} px seen) is cropland in "
            f"{periods[args.since - 1]} and urban in {periods[-1]}"
        )
    print(f"maps and products under {folder}")


if __name__ == "__main__":
    main()
