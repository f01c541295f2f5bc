"""Where an area-mapping run's time goes: timestamps in the driver, CPU seconds per process.

    python bench/aoi_cpu.py [--cell-px 1512] [--cells 2] [--model swinv2_tiny_relay]

``bench/aoi.py``'s area (``--cells`` x ``--cells`` cells, synthetic Sentinel-2 L2A-like
items, a local STAC API), mapped with 1 and with 2 workers, each in a fresh process on a
fresh local Ray. Prints when the plan, each cell's result and the products were done
(seconds after ``map_area`` started; each cell's own seconds per stage), and the CPU
seconds every process on the machine spent during the run (``/proc``, sampled every 2 s,
so a process that ends between samples loses at most 2 s): what besides the model shares
the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.aoi import COLLECTION, DATE, MARGIN_PX, area_geojson, make_model  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """``pid -> (command, user + system CPU seconds)`` of every process now running."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:  # ended meanwhile
            continue
        out[int(pid)] = (cmd[:70], (int(stat[11]) + int(stat[12])) / TICK)
    return out


def run(cfg: dict) -> None:
    """One run in this (fresh) process; prints a JSON line of marks, cells and CPU."""
    import ray

    import relaymap.flows.area as area
    from relaymap.flows.jobs import connect_ray

    connect_ray(None)
    marks: list[tuple[str, float]] = []
    real_tasks, real_products = area.run_tasks, area._products

    def run_tasks(*a, **k):
        marks.append(("job submitted", time.perf_counter() - t0))
        for r in real_tasks(*a, **k):
            done = f"cell {r['cell']} done ({r['seconds']:.1f} s)"
            marks.append((done, time.perf_counter() - t0))
            yield r

    def products(*a, **k):
        marks.append(("products start", time.perf_counter() - t0))
        return real_products(*a, **k)

    area.run_tasks, area._products = run_tasks, products
    seen: dict[int, tuple[str, float]] = {}
    base = {pid: c for pid, (_, c) in cpu_by_process().items()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(2.0):
            seen.update(cpu_by_process())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = area.map_area(area.AreaConfig.model_validate(cfg), progress=False)
    marks.append(("done", time.perf_counter() - t0))
    seen.update(cpu_by_process())
    stop.set()
    sampler.join()
    cpu = sorted(
        ((c - base.get(pid, 0.0), cmd) for pid, (cmd, c) in seen.items() if pid != os.getpid()),
        reverse=True,
    )
    cpu.insert(0, (sum(c for c, _ in cpu if c > 0), "all processes but this one"))
    me = os.times()
    cells = [(d["cell"], d["stage_seconds"]) for d in result.done]
    out = {"marks": marks, "cells": cells, "cpu": cpu[:12], "self": me.user + me.system}
    print(json.dumps(out))
    ray.shutdown()


def child(cfg: dict) -> dict:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import bench.aoi_cpu as b, json; "
    code += "b.run(json.loads(sys.stdin.read()))"
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(cfg), text=True, capture_output=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell-px", type=int, default=1512)
    p.add_argument("--cells", type=int, default=2, help="cells a side")
    p.add_argument("--model", default="swinv2_tiny_relay", help="a relay model name")
    args = p.parse_args()

    from relaymap.catalog import serve_stac
    from relaymap.ingest.sample import make_s2_area

    work = Path(tempfile.mkdtemp(prefix="bench-aoi-cpu-"))
    model = make_model(str(work / "model.safetensors"), args.model)
    side_px = args.cells * args.cell_px
    unit = 10 * args.cell_px
    x0, y1 = unit * (500_000 // unit + 1), unit * (4_800_000 // unit + 1)
    print(f"making {side_px + 2 * MARGIN_PX} px of imagery ...", file=sys.stderr)
    source = make_s2_area(
        str(work / "source"),
        origin=(x0 - MARGIN_PX * 10, y1 + MARGIN_PX * 10),
        size_px=side_px + 2 * MARGIN_PX,
        dates=[DATE],
        collection_id=COLLECTION,
    )
    with serve_stac([source]) as api:
        for workers in (1, 2):
            r = child(
                {
                    "area": area_geojson(x0, y1, side_px * 10),
                    "period": "2026-01",
                    "model": model,
                    "source": {"stac_api": api, "collections": [COLLECTION]},
                    "out": str(work / f"w{workers}"),
                    "grid": {"cell_px": args.cell_px, "crs": "EPSG:32633"},
                    "options": {"workers": workers, "quicklook": False},
                }
            )
            print(f"\n{workers} worker(s), {args.cells}x{args.cells} cells of {args.cell_px} px")
            for what, t in r["marks"]:
                print(f"  {t:7.1f} s  {what}")
            for cell, stages in r["cells"]:
                print(f"  {cell}: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
            print(f"  CPU seconds during the run (driver, sampler included: {r['self']:.1f} s)")
            for c, cmd in r["cpu"]:
                if c >= 0.2:
                    print(f"  {c:7.1f}  {cmd}")


if __name__ == "__main__":
    main()
