"""Batch inference speed and memory: model alone vs the whole pipeline, 1 vs 2 workers,
peak RSS against scene size.

    python bench/infer.py [--sizes 4096,16384] [--speed-size 8192] [--model swinv2_nano_relay]

Synthetic 4-band scene stores (smooth patterns, written by ``ingest.write_scene``) and a
randomly initialised model saved as training saves one. Side by side in one Ray session,
on the ``--speed-size`` scene (large enough that actor start-up and the final COG copy do
not dominate): (1) model only: the actor pool on tiles read beforehand, held by the
driver; (2) the full pipeline (read, predict, stitch, COGs) with 2 workers and (3)
with 1. Then each of ``--sizes`` runs alone in a fresh process, sampling the RSS of the
driver and of the Ray workers. Targets: (2) >= 80% of (1); RSS of the largest scene
within 1.3x of the smallest; 2 workers >= 1.6x one.
"""

from __future__ import annotations

import argparse
import contextlib
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

BANDS = ["blue", "green", "red", "nir"]


def make_store(url: str, size: int) -> str:
    """A ``size`` x ``size`` 4-band store of smooth, compressible patterns (lazy, chunked)."""
    import dask.array as da
    import numpy as np
    import xarray as xr
    from affine import Affine
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    from relaymap.ingest import open_scene, write_scene

    if Path(url, "zarr.json").exists():
        return open_scene(url).url
    chunk = 512  # write_scene's default

    def block(block_info=None):
        (b0, b1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        bands = [np.sin(yy / (60 + 20 * b)) * np.cos(xx / (90 + 10 * b)) for b in range(b0, b1)]
        return np.round(1000 + 500 * np.stack(bands)).astype(np.float32)

    data = da.map_blocks(
        block, chunks=((4,), *([(chunk,) * (size // chunk)] * 2)), dtype=np.float32
    )
    gbox = GeoBox((size, size), Affine(10, 0, 500000, 0, -10, 4800000), "EPSG:32633")
    image = xr.DataArray(
        data,
        dims=("band", "y", "x"),
        coords={"band": BANDS, **xr_coords(gbox, crs_coord_name="spatial_ref")},
        attrs={"source_items": [f"synthetic-{size}"]},
    )
    return write_scene(url, image, num_levels=3, chunk_px=chunk).url


def make_model(path: str, name: str, window_px: int) -> str:
    """A randomly initialised model with this scene's data spec, saved as training saves one."""
    from relay_models import ClassSpec, DataSpec, create_model, save_model
    from relay_models.registry import takes_global

    spec = DataSpec(
        bands=BANDS,
        mean=[1000.0] * 4,
        std=[350.0] * 4,
        classes=[ClassSpec(index=i, value=i, name=f"class{i}") for i in range(6)],
        window_px=window_px,
        factor=4 if takes_global(name) else None,
    )
    save_model(create_model(name, num_classes=6, in_chans=len(BANDS), spec=spec), path)
    return path


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    with contextlib.suppress(OSError):  # the process may have exited
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _data_workers() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::Predictor"):  # the model actors (flows.pool)
                pids.append(int(d.name))
    return pids


def _map(store: str, model: str, tile_px: int, overlap_px: int, batch: int, workers: int):
    """One full pipeline run (class COG + quicklook into a temporary folder)."""
    from relaymap.flows.infer import InferConfig, MapOptions, infer

    with tempfile.TemporaryDirectory() as out:
        cfg = InferConfig(
            model=model,
            scene=store,
            out=out,
            options=MapOptions(
                tile_px=tile_px, overlap_px=overlap_px, batch_size=batch, workers=workers
            ),
        )
        return infer(cfg, progress=False)


def rss_child(store: str, model: str, tile_px: int, overlap_px: int, batch: int) -> None:
    """One pipeline run in this (fresh) process; prints peak RSS as JSON."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    peak = {"workers": 0, "workers_private": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = _data_workers()
            peak["workers"] = max([peak["workers"], *(_rss_kb(p) for p in pids)])
            private = (_rss_kb(p, "RssAnon") for p in pids)  # without object-store pages
            peak["workers_private"] = max([peak["workers_private"], *private])
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    product = _map(store, model, tile_px, overlap_px, batch, workers=2)
    done.set()
    print(
        json.dumps(
            {
                "driver_mb": _rss_kb(os.getpid(), "VmHWM") / 1024,
                "worker_mb": peak["workers"] / 1024,
                "worker_private_mb": peak["workers_private"] / 1024,
                "seconds": product.seconds,
                "tiles": product.tiles,
            }
        )
    )


def throughput(store: str, model: str, tile_px: int, overlap_px: int, batch: int) -> dict:
    """Model-only vs pipeline (2 and 1 workers) tiles/s on one store, one Ray session."""
    import ray

    from relay_models.inference import plan_tiles
    from relaymap.flows.infer import Predictor, read_stage
    from relaymap.flows.pool import actor_pool, run_ordered
    from relaymap.flows.trained import read_info
    from relaymap.ingest import open_scene

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    info = read_info(model)
    scene = open_scene(store)
    tiles = plan_tiles(scene.shape(0), tile_px, overlap_px)
    kw = {
        "scene": scene.url,
        "fingerprint": scene.attrs.fingerprint,
        "spec": info.spec.model_dump_json(),
        "tile_px": tile_px,
        "overlap_px": overlap_px,
    }
    batches = [
        read_stage({"index": list(range(i, min(i + batch, len(tiles))))}, **kw)
        for i in range(0, len(tiles), batch)
    ]
    t0 = time.perf_counter()
    n = 0
    kwargs = {"model_url": model, "use_gpu": False}
    with actor_pool(Predictor, kwargs, size=2, use_gpu=False) as actors:
        for out in run_ordered(actors, "predict", batches, in_flight=2):
            n += len(out["index"])
    model_only = n / (time.perf_counter() - t0)
    del batches
    res = {"tiles": len(tiles), "model_only": model_only}
    for workers in (2, 1):
        product = _map(store, model, tile_px, overlap_px, batch, workers)
        res[f"pipeline_{workers}"] = product.tiles / product.seconds
    ray.shutdown()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4096,16384", help="scene sides for the RSS runs")
    p.add_argument("--speed-size", type=int, default=8192, help="scene side for throughput")
    p.add_argument("--skip-speed", action="store_true", help="only the RSS runs")
    p.add_argument("--model", default="swinv2_nano_relay")
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--overlap-px", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workdir", default=None, help="keep stores here (default: a temp dir)")
    p.add_argument("--rss-child", nargs=2, metavar=("STORE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child, args.tile_px, args.overlap_px, args.batch)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="relaymap-bench-infer-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    speed = [] if args.skip_speed else [args.speed_size]
    stores = {s: make_store(str(work / f"scene-{s}.zarr"), s) for s in {*sizes, *speed}}
    model = make_model(str(work / "model.safetensors"), args.model, args.tile_px)
    print(f"stores written in {time.perf_counter() - t:.0f} s", flush=True)
    if not args.skip_speed:
        tp = throughput(stores[args.speed_size], model, args.tile_px, args.overlap_px, args.batch)
        mp = args.tile_px**2 / 1e6
        setup = f"{args.model}, {args.tile_px} px tiles, overlap {args.overlap_px}"
        print(f"\n{setup}, {args.speed_size}^2 scene")
        print(f"{'':<34}{'tiles/s':>9}{'MP/s':>8}{'ratio':>8}")
        v = tp["model_only"]
        print(f"{'model only (2 actors, pre-read)':<34}{v:>9.2f}{v * mp:>8.2f}")
        for w, target in ((2, "vs model only"), (1, "")):
            v = tp[f"pipeline_{w}"]
            print(
                f"{f'pipeline, {w} worker' + ('s' if w > 1 else ''):<34}{v:>9.2f}{v * mp:>8.2f}"
                f"{v / tp['model_only']:>8.2f}  {target}"
            )
        print(f"{'2 workers / 1 worker':<34}{'':>17}{tp['pipeline_2'] / tp['pipeline_1']:>8.2f}")
    head = f"{'scene':<10}{'tiles':>7}{'seconds':>9}{'driver MB':>11}{'worker MB':>11}"
    print(f"\n{head}{'private MB':>12}")
    rss = {}
    for s in sizes:
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--rss-child",
                    stores[s],
                    model,
                    "--tile-px",
                    str(args.tile_px),
                    "--overlap-px",
                    str(args.overlap_px),
                    "--batch",
                    str(args.batch),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rss[s] = json.loads(out)
        r = rss[s]
        row = f"{f'{s}^2':<10}{r['tiles']:>7}{r['seconds']:>9.1f}"
        row += "".join(f"{r[k]:>11.0f}" for k in ("driver_mb", "worker_mb"))
        print(f"{row}{r['worker_private_mb']:>12.0f}", flush=True)
    lo, hi = rss[sizes[0]], rss[sizes[-1]]
    ratios = ", ".join(
        f"{label} {hi[k] / lo[k]:.2f}"
        for label, k in (
            ("driver", "driver_mb"),
            ("worker", "worker_mb"),
            ("worker private", "worker_private_mb"),
        )
    )
    print(f"RSS ratio {sizes[-1]}^2 / {sizes[0]}^2: {ratios} (target <= 1.3)")


if __name__ == "__main__":
    main()
