"""What mapping 1,000,000 km2 every month at 10 m takes, from the grid and model arithmetic
(exact, computed here) and measured throughputs (given on the command line, from
``bench/aoi.py``, ``bench/models.py`` and the paper).

    python bench/scaling.py [--area-km2 1e6] [--cpu-nano-mpx-s X] [--composite-mpx-s Y]

Prints, per model and tiling: FLOPs per mapped pixel (halo-free tiling x the duplicated
tiles at cell edges), the cell halo and the pixels read per mapped pixel, and the
instance-hours a month takes from the throughputs given.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Model configurations: (name, tile px, overlap px, global factor).
SETUPS = (
    ("swinv2_nano", 64, 16, None),
    ("swinv2_nano_relay", 64, 16, 4),
    ("swinv2_small", 256, 64, None),
    ("swinv2_small_relay", 256, 64, 4),
)
STORE_LEVELS = 3


def tiles_per_cell(cell_px: int, tile_px: int, overlap_px: int) -> int:
    """Tiles on the lattice that touch a cell (what a cell task runs)."""
    stride = tile_px - overlap_px
    per_axis = len(range(-((tile_px - 1) // stride) * stride, cell_px, stride))
    return per_axis**2


def main() -> None:
    from relay_models.geometry import cell_halo
    from relay_models.stats import model_stats

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--area-km2", type=float, default=1e6)
    p.add_argument("--cell-px", type=int, nargs="+", default=[1536, 6144])
    p.add_argument("--items-per-px", type=float, default=8.0, help="items over a pixel a month")
    p.add_argument("--bytes-per-item-px", type=float, default=5.0, help="compressed, 4 bands + SCL")
    args = p.parse_args()
    px = args.area_km2 * 1e4  # 10 m pixels
    print(f"area {args.area_km2:,.0f} km2 at 10 m: {px:.2e} pixels a month\n")
    print(
        "| model | tile/overlap | GFLOPs per tile | cell px | halo px | tiles run / one tiling "
        "| pixels read / mapped | MFLOP per mapped px | PFLOP a month |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, tile, overlap, factor in SETUPS:
        gflops = model_stats(name, num_classes=10, side_px=tile).gflops
        stride = tile - overlap
        for cell in args.cell_px:
            if cell % math.lcm(stride, 2**STORE_LEVELS):
                continue
            halo = cell_halo(tile, overlap, factor, STORE_LEVELS)
            dup = tiles_per_cell(cell, tile, overlap) / (cell / stride) ** 2
            read = (cell + 2 * halo) ** 2 / cell**2
            mflop = gflops * 1e3 / stride**2 * dup
            print(
                f"| {name} | {tile}/{overlap} | {gflops:.2f} | {cell} | {halo} | {dup:.2f} "
                f"| {read:.2f} | {mflop:.2f} | {mflop * 1e6 * px / 1e15:.1f} |"
            )
    print()
    for cell in args.cell_px:
        halo = cell_halo(256, 64, 4, STORE_LEVELS)
        read = (cell + 2 * halo) ** 2 / cell**2
        tb = px * read * args.items_per_px * args.bytes_per_item_px / 1e12
        cells = args.area_km2 / (cell * 10 / 1000) ** 2
        print(
            f"cells of {cell} px (256/64 tiles, halo {halo}): ~{cells:,.0f} cells a month, "
            f"{tb:.2f} TB read from object storage a month"
        )


if __name__ == "__main__":
    main()
