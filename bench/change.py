"""Change on the demo area: does the change between the demo's two months find its known
change (a field built over in the second month), and how much spurious change does the
minimum mapping unit remove?

    python bench/change.py [--workdir relaymap-bench-change] [--steps 300] [--min-area-ha 0.5]

Runs ``relaymap demo`` (``run_demo``: trains ``swinv2_nano_relay`` for ``--steps`` and maps
the held-out area for both months; the area run makes the change products itself), then
compares its change products with the truth of the synthetic area
(:data:`relaymap.flows.demo.AREA_CHANGE` on the layout of ``make_s2_area``), over the pixels
mapped in both months (the pixels the sources' ``scl`` masks leave clear):

* the cropland -> urban entry of the transition matrix against the true area, and
* the change map's cropland -> urban pixels against the truth: IoU, precision, recall;

with the same for the whole maps (accuracy per month) for context. Then the change between
the two months is made again on local Ray from the same maps
(:func:`relaymap.flows.products.timeline.change_between`, as ``relaymap change``) with the
minimum mapping unit ``--min-area-ha`` and without one (0), and compared: spurious change
(changed pixels other than the field's cropland -> urban, over the pixels mapped in both
months) with the unit over without, and the true change kept (the field's cropland -> urban
pixels found with the unit over those found without). A rerun of the same ``--workdir``
reuses the demo's model and maps, so only the change is made again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="relaymap-bench-change")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--min-area-ha", type=float, default=None, help="default: the product's")
    args = ap.parse_args()

    import rasterio

    from relaymap.catalog import StaticCatalog
    from relaymap.flows.demo import AREA_CHANGE, CELL_PX, MARGIN_PX, run_demo
    from relaymap.flows.products.change import pair_code
    from relaymap.ingest.sample import CLASSES, change_mask, s2_area_layout

    t0 = time.perf_counter()
    res = run_demo(args.workdir, steps=args.steps)
    seconds = time.perf_counter() - t0
    names = [c.name for c in CLASSES]
    side = 2 * CELL_PX
    layout = s2_area_layout(side + 2 * MARGIN_PX, 48, 100)  # run_demo's seed 0 + 100
    field = change_mask(layout, AREA_CHANGE)
    crop = np.s_[MARGIN_PX : MARGIN_PX + side, MARGIN_PX : MARGIN_PX + side]
    before, field = layout[crop], field[crop]
    after = before.copy()
    after[field] = names.index(AREA_CHANGE.to_class)
    (change,) = res.summary["changes"]
    periods = [change["from"], change["to"]]
    maps = []
    for p in periods:
        with rasterio.open(res.summary["mosaics"][p].removeprefix("file://")) as src:
            maps.append(src.read(1))
    with rasterio.open(change["mosaic"].removeprefix("file://")) as src:
        change_map = src.read(1)
    both = (maps[0] != 255) & (maps[1] != 255)
    truth = field & both
    src, dst = names.index(AREA_CHANGE.from_class), names.index(AREA_CHANGE.to_class)
    built = change_map == pair_code(src, dst, len(names))
    true_km2 = truth.sum() * 1e-4
    found = change["matrix_km2"][AREA_CHANGE.from_class][AREA_CHANGE.to_class]
    tp = (built & truth).sum()
    item = StaticCatalog(res.catalog_url).get_item(change["item_collection"], change["item"])
    model = res.summary["model"].rsplit("/", 1)[-1]
    print(f"relaymap demo, {args.steps} training steps ({seconds:.0f} s), model {model}")
    print(f"  validation mIoU {res.summary['metrics'].get('val_miou', float('nan')):.3f}")
    for p, m, t in zip(periods, maps, (before, after), strict=True):
        seen = m != 255
        print(f"  {p}: map accuracy {(m[seen] == t[seen]).mean():.3f} on {seen.sum()} px")
    print(f"  observable in both: {both.sum()} px; the field there: {truth.sum()} px")
    print(
        f"  transition matrix {AREA_CHANGE.from_class} -> {AREA_CHANGE.to_class}: "
        f"{found:.4f} km2, true {true_km2:.4f} km2 ({(found - true_km2) / true_km2:+.2%})"
    )
    print(
        f"  change map {AREA_CHANGE.from_class} -> {AREA_CHANGE.to_class}: IoU "
        f"{tp / (built | truth).sum():.3f}, precision {tp / max(built.sum(), 1):.3f}, "
        f"recall {tp / max(truth.sum(), 1):.3f}"
    )
    print(f"  changed in all: {change['changed_km2']:.4f} km2; item {item.id}")
    mmu(res, args.min_area_ha, truth, both, built_code=pair_code(src, dst, len(names)))


def mmu(res, min_area_ha: float | None, truth: np.ndarray, both: np.ndarray, built_code: int):
    """The change of the demo's two months with the minimum mapping unit and without, from
    the same maps: spurious change and true change kept."""
    import rasterio
    from scipy import ndimage

    from relaymap.catalog.storage import join
    from relaymap.flows.demo import COLLECTION
    from relaymap.flows.jobs import run_cell_tasks
    from relaymap.flows.products.mmu import MIN_AREA_HA
    from relaymap.flows.products.timeline import change_between

    unit = MIN_AREA_HA if min_area_ha is None else min_area_ha
    (change,) = res.summary["changes"]
    rows = {}
    for name, ha in (("without", 0.0), ("with", unit)):
        t0 = time.perf_counter()
        product = change_between(
            res.catalog_url,
            COLLECTION,
            change["from"],
            change["to"],
            run=run_cell_tasks,
            out=join(res.workdir, "bench-mmu", name),
            min_area_ha=ha,
        )
        seconds = time.perf_counter() - t0
        with rasterio.open(product.mosaic.removeprefix("file://")) as src:
            values = src.read(1)
        changed = (values != 0) & (values != 255)
        assert np.array_equal(values != 255, both)
        true = changed & truth & (values == built_code)
        _, regions = ndimage.label(changed, structure=np.ones((3, 3)))
        rows[name] = (ha, changed.sum(), (changed & ~true).sum(), true.sum(), regions, seconds)
    print("  minimum mapping unit (the change made again from the same maps, local Ray):")
    print("  | unit | changed px | spurious px | true px | changed regions | seconds |")
    print("  |---:|---:|---:|---:|---:|---:|")
    for ha, changed, spurious, true, regions, seconds in rows.values():
        print(f"  | {ha:g} ha | {changed} | {spurious} | {true} | {regions} | {seconds:.0f} |")
    print(
        "spurious change with minimum mapping unit / without: "
        f"{rows['with'][2] / rows['without'][2]:.2f}"
    )
    print(f"true change kept: {rows['with'][3] / rows['without'][3]:.2f}")


if __name__ == "__main__":
    main()
