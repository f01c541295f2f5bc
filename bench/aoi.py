"""Area mapping: job parallelism, pipeline overhead, driver memory, seams.

    python bench/aoi.py [--cell-px 1512] [--cells 2x2] [--mem-cell-px 112]
                        [--model swinv2_nano_relay]

A randomly initialised ``--model`` (saved as training saves one) maps synthetic
Sentinel-2 L2A-like items (two overlapping orbits, one cloudy, ``scl`` masks; served by a
local STAC API) for one period. Each run is a fresh process on a fresh local Ray (2 CPUs);
times count ``map_area`` after Ray is up (actor start-up included). Side by side:

1. ``--cells`` cells of ``--cell-px`` with 1 worker and with 2 workers; every worker is one
   Ray actor with 1 CPU and one torch thread (reported), so the ratio is the job's
   parallelism, not torch's threading. An actor holds two cells at once: the next one
   composites while one runs the model (stage seconds are summed over cells, so they
   overlap).
2. Model only: the bare forward pass (1 thread, batch 8) over the tiles of one tiling of
   the same area pixels (64 px tiles, 8 px overlap, as the job), timed in a process of its
   own on random tensors; divided by run 1's time with 1 worker: area mapping vs model
   throughput. The same loop in two processes at once gives this machine's ceiling for the
   2-worker figure (two busy cores run each slower than one alone: shared caches, clocks,
   the hypervisor's neighbours), alternated with the one-process timing.
3. Peak driver RSS mapping 4 cells and 36 cells of ``--mem-cell-px`` (1 worker).
4. Seams: 2x2 cells of ``--mem-cell-px`` against the same pixels as one cell of twice the
   side: the fraction of identical class pixels.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARGIN_PX = 200
#: Tiles per forward pass (the default ``MapOptions.batch_size``): the job and the bare model.
BATCH = 8
DATE = dt.datetime(2026, 1, 10, 10, tzinfo=dt.UTC)
COLLECTION = "sentinel-2-l2a-sample"


def make_model(path: str, name: str) -> str:
    """A random model ``name`` with a plausible data spec, saved as training saves it."""
    import torch

    from relay_models import DataSpec, create_model, save_model
    from relay_models.spec import ClassSpec

    torch.manual_seed(0)
    spec = DataSpec(
        bands=("blue", "green", "red", "nir"),
        mean=(0.06, 0.08, 0.08, 0.25),
        std=(0.03, 0.03, 0.04, 0.1),
        classes=tuple(ClassSpec(index=i, value=10 * (i + 1), name=f"class{i}") for i in range(6)),
        window_px=64,
        factor=4,
        pixel_size=10.0,
    )
    model = create_model(name, num_classes=6, in_chans=4, spec=spec)
    save_model(model.eval(), path, step="0")
    return path


def area_geojson(x0: float, y1: float, side_m: float) -> str:
    ring = [[x0 + 1, y1 - side_m + 1], [x0 + side_m - 1, y1 - side_m + 1]]
    ring += [[x0 + side_m - 1, y1 - 1], [x0 + 1, y1 - 1], [x0 + 1, y1 - side_m + 1]]
    crs = {"type": "name", "properties": {"name": "EPSG:32633"}}
    return json.dumps({"type": "Polygon", "coordinates": [ring], "crs": crs})


def run(cfg: dict) -> None:
    """One mapping run in this (fresh) process; prints a JSON line of what it measured."""
    import resource

    import ray

    from relaymap.flows.area import AreaConfig, map_area
    from relaymap.flows.jobs import connect_ray

    connect_ray(None)
    config = AreaConfig.model_validate(cfg)
    t0 = time.perf_counter()
    result = map_area(config, progress=False)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cells": len(result.mapped),
                "failed": result.failed,
                "driver_rss_mb": rss,
                "tiles": sum(t["tiles"] for t in result.done),
                "stages": {
                    k: sum(t["stage_seconds"].get(k, 0.0) for t in result.done)
                    for k in ("wait", "composite", "predict", "write")
                },
                "threads": sorted({t["threads"] for t in result.done}),
                "mosaic": result.mosaics.get("2026-01"),
            }
        )
    )
    ray.shutdown()


def child(cfg: dict) -> dict:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import bench.aoi as b, json; "
    code += "b.run(json.loads(sys.stdin.read()))"
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(cfg), text=True, capture_output=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def forward_loop(name: str, batch: int, batches: int) -> None:
    """Child process: build the model (1 torch thread), say ``ready``, wait for a line on
    stdin, then time ``batches`` forward passes of ``batch`` 64 px tiles; print seconds."""
    import torch

    from relay_models import create_model

    torch.set_num_threads(1)
    model = create_model(name, num_classes=6, in_chans=4).eval()
    x = torch.randn(batch, 4, 64, 64)
    with torch.inference_mode():
        for _ in range(3):
            model.predict_local(x, x)
        print("ready", flush=True)
        sys.stdin.readline()
        t0 = time.perf_counter()
        for _ in range(batches):
            model.predict_local(x, x).softmax(1)
    print(time.perf_counter() - t0, flush=True)


def forward_seconds(name: str, batch: int, batches: int, procs: int) -> list[float]:
    """Seconds of :func:`forward_loop` in ``procs`` processes started at the same moment."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import bench.aoi as b; "
    code += f"b.forward_loop({name!r}, {batch}, {batches})"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(procs)
    ]
    for c in children:
        assert c.stdout.readline().strip() == "ready"
    for c in children:  # all built and warm: go
        c.stdin.write("go\n")
        c.stdin.flush()
    seconds = [float(c.communicate()[0]) for c in children]
    if any(c.returncode for c in children):
        raise RuntimeError("a forward-pass process failed")
    return seconds


def bare_model(name: str, batch: int, batches: int = 40, rounds: int = 2) -> tuple[float, float]:
    """The bare forward pass, one process alone and two at once, alternated ``rounds``
    times: seconds per batch alone, and two processes' throughput over one's (this
    machine's ceiling for the job's 2-worker figure: both wall-clock, both finish)."""
    one = two = 0.0
    for _ in range(rounds):
        one += forward_seconds(name, batch, batches, 1)[0]
        two += max(forward_seconds(name, batch, batches, 2))
    return one / (rounds * batches), 2 * one / two


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell-px", type=int, default=1512)
    p.add_argument("--cells", default="2x2", help="COLSxROWS of the speed area")
    p.add_argument("--mem-cell-px", type=int, default=112)
    p.add_argument("--model", default="swinv2_nano_relay", help="a relay model name")
    args = p.parse_args()
    cols, rows = map(int, args.cells.split("x"))

    from relay_models.inference import plan_tiles
    from relaymap.catalog import serve_stac
    from relaymap.ingest.sample import make_s2_area

    work = Path(tempfile.mkdtemp(prefix="bench-aoi-"))
    model = make_model(str(work / "model.safetensors"), args.model)
    side_px = max(cols * args.cell_px, 6 * args.mem_cell_px)
    # the area's corner on every grid used (multiples of each cell side, in metres)
    unit = 10 * math.lcm(args.cell_px, 2 * args.mem_cell_px)
    x0, y1 = unit * (500_000 // unit + 1), unit * (4_800_000 // unit + 1)
    print(f"making {side_px + 2 * MARGIN_PX} px of imagery ...", file=sys.stderr)
    source = make_s2_area(
        str(work / "source"),
        origin=(x0 - MARGIN_PX * 10, y1 + MARGIN_PX * 10),
        size_px=side_px + 2 * MARGIN_PX,
        dates=[DATE],
        collection_id=COLLECTION,
    )

    def cfg(out: str, cell_px: int, n: int, workers: int) -> dict:
        return {
            "area": area_geojson(x0, y1, n * cell_px * 10),
            "period": "2026-01",
            "model": model,
            "source": {"stac_api": api, "collections": [COLLECTION]},
            "out": str(work / out),
            "grid": {"cell_px": cell_px, "crs": "EPSG:32633"},
            "options": {"workers": workers, "quicklook": False, "batch_size": BATCH},
        }

    rows_out = []
    with serve_stac([source]) as api:
        assert rows == cols, "square areas only"
        one = child(cfg("w1", args.cell_px, cols, 1))
        two = child(cfg("w2", args.cell_px, cols, 2))
        area_px = cols * args.cell_px
        area_tiles = len(plan_tiles((area_px, area_px), 64, 8))
        per_batch, ceiling = bare_model(args.model, BATCH)
        bare = per_batch * area_tiles / BATCH
        small = child(cfg("m4", args.mem_cell_px, 2, 1))
        large = child(cfg("m36", args.mem_cell_px, 6, 1))
        seam_small = child(cfg("s4", args.mem_cell_px, 2, 1))
        seam_big = child(cfg("s1", 2 * args.mem_cell_px, 1, 1))

    import rasterio

    with rasterio.open(seam_small["mosaic"]) as a, rasterio.open(seam_big["mosaic"]) as b:
        same = float((a.read(1) == b.read(1)).mean())
    mpx = area_px * area_px / 1e6
    rows_out = [
        ("model", args.model),
        ("speed area", f"{cols}x{rows} cells of {args.cell_px} px = {mpx:.1f} Mpx, 1 period"),
        (
            "1 worker",
            f"{one['seconds']:.1f} s, {one['tiles']} tiles, torch threads {one['threads']}",
        ),
        (
            "2 workers",
            f"{two['seconds']:.1f} s, {two['tiles']} tiles, torch threads {two['threads']}",
        ),
        ("1 worker, per stage", ", ".join(f"{k} {v:.1f} s" for k, v in one["stages"].items())),
        ("2 workers, per stage", ", ".join(f"{k} {v:.1f} s" for k, v in two["stages"].items())),
        ("model only", f"{bare:.1f} s for {area_tiles} tiles (one tiling of the area)"),
        ("tiles run / one tiling", f"{one['tiles'] / area_tiles:.2f}"),
        ("driver RSS 4 cells", f"{small['driver_rss_mb']:.0f} MB ({args.mem_cell_px} px cells)"),
        ("driver RSS 36 cells", f"{large['driver_rss_mb']:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows_out)
    for k, v in rows_out:
        print(f"{k.ljust(width)}  {v}")
    print()
    print(f"2 workers / 1 worker: {one['seconds'] / two['seconds']:.2f}")
    print(f"bare model, 2 processes / 1 process: {ceiling:.2f} (this machine's ceiling)")
    print(f"end-to-end vs model-only: {bare / one['seconds']:.2f}")
    print(f"driver RSS 36 cells / 4 cells: {large['driver_rss_mb'] / small['driver_rss_mb']:.2f}")
    print(f"seamless: {100 * same:.2f}% of pixels identical (2x2 cells vs one cell)")


if __name__ == "__main__":
    main()
