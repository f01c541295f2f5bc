"""Ingest throughput and memory: COGs on a local S3 -> Zarr scene store with levels.

    python bench/ingest.py [--sizes 5000,10000] [--chunk-px 512]

For each scene size, writes a 4-band uint16 scene as four COGs on a local SeaweedFS S3
server, then runs, each in a fresh subprocess (so peak RSS is its own):

* ``read``: plain ``rasterio`` read of the four COGs into memory (the lower bound);
* ``ingest``: ``ingest_items`` (the product's path: ``load_scene`` + ``write_scene``,
  level 0 and x2/x4/x8) to ``s3://`` Zarr.

Prints seconds, MB/s of source pixels (uint16), peak RSS, the CPU seconds of the step's
process and of the S3 server (which shares this machine's cores), and the ingest/read
ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BANDS = ("blue", "green", "red", "nir")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_scene(size: int, prefix: str) -> dict:
    """Four uint16 COGs (512 px tiles, DEFLATE) on S3 and a STAC item dict for them."""
    import numpy as np
    import pystac
    import rasterio
    from odc.geo.geobox import GeoBox
    from rasterio.shutil import copy as rio_copy
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from relaymap.catalog.storage import atomic_upload

    transform = from_origin(500000, 4900000, 10, 10)
    rng = np.random.default_rng(0)
    # the raster's true footprint: odc-stac reads a chunk only from items whose geometry
    # meets it (a point here once made every chunk but one read nothing)
    footprint = GeoBox((size, size), transform, "EPSG:32633").footprint("EPSG:4326")
    item = pystac.Item(
        f"bench-{size}",
        footprint.json,
        list(footprint.boundingbox),
        None,
        {"start_datetime": "2024-06-01T00:00:00Z", "end_datetime": "2024-06-01T00:00:00Z"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        for b, band in enumerate(BANDS):
            strip = os.path.join(tmp, f"{band}-strips.tif")
            prof = dict(
                driver="GTiff",
                width=size,
                height=size,
                count=1,
                dtype="uint16",
                crs="EPSG:32633",
                transform=transform,
                nodata=0,
                tiled=True,
                blockxsize=512,
                blockysize=512,
            )
            with rasterio.open(strip, "w", **prof) as dst:
                for y0 in range(0, size, 512):
                    h = min(512, size - y0)
                    yy = np.arange(y0, y0 + h)[:, None]
                    xx = np.arange(size)[None, :]
                    base = 1500 + 800 * np.sin(xx / 97.0 + b) * np.cos(yy / 131.0)
                    noise = rng.normal(0, 60, (h, size))
                    dst.write(
                        (base + noise).clip(1, 10000).astype("uint16")[None],
                        window=Window(0, y0, size, h),
                    )
            href = f"{prefix}/{band}.tif"
            with atomic_upload(href, suffix=".tif") as local:
                rio_copy(strip, local, driver="COG", compress="DEFLATE", blocksize=512)
            item.add_asset(
                band,
                pystac.Asset(
                    href,
                    extra_fields={
                        "raster:bands": [
                            {"data_type": "uint16", "nodata": 0, "scale": 1e-4, "offset": 0.0}
                        ]
                    },
                ),
            )
    return item.to_dict()


def run_read(item: dict) -> None:
    import numpy as np
    import rasterio

    from relaymap.catalog.storage import gdal_env

    t0, c0 = time.perf_counter(), time.process_time()
    with rasterio.Env(**gdal_env()):
        arrays = []
        for band in BANDS:
            with rasterio.open(item["assets"][band]["href"]) as src:
                arrays.append(src.read(1))
    total = int(sum(a.sum(dtype=np.int64) for a in arrays))  # touch every pixel
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_mb": _peak_rss_mb(), "check": total}))


def run_ingest(item: dict, out_url: str, chunk_px: int) -> None:
    import pystac

    from relaymap.ingest import ingest_items

    t0, c0 = time.perf_counter(), time.process_time()
    store = ingest_items(
        [pystac.Item.from_dict(item)], out_url, BANDS, label_asset=None, chunk_px=chunk_px,
        overwrite=True,
    )  # fmt: skip
    seconds, cpu, rss = time.perf_counter() - t0, time.process_time() - c0, _peak_rss_mb()
    valid = int(store.valid(0).sum())  # untimed: every source pixel arrived
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_mb": rss, "valid_px": valid}))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process we started (the S3 server)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child(mode: str, item: dict, env: dict, server_pid: int, **kw) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import bench.ingest as b; "
        f"b.run_{mode}(json.loads(sys.stdin.read()), **{kw!r})"
    )
    server0 = _cpu_seconds(server_pid)
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(item),
        text=True,
        capture_output=True,
        env={**os.environ, **env},
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {"server_cpu": _cpu_seconds(server_pid) - server0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,10000")
    p.add_argument("--chunk-px", type=int, default=512, help="store chunk side")
    args = p.parse_args()

    from relaymap.catalog.local_s3 import seaweedfs

    print(f"# {os.cpu_count()} CPUs; SeaweedFS S3 on loopback; chunk {args.chunk_px} px")
    print(
        f"{'size':>7}{'step':>8}{'seconds':>9}{'MB/s':>8}{'peak RSS MB':>13}{'CPU s':>8}"
        f"{'S3 CPU s':>10}{'vs read':>9}"
    )
    with seaweedfs(buckets=("bench",)) as s3:
        os.environ.update(s3.env())  # this script's own process: make_scene writes to it
        for size in (int(s) for s in args.sizes.split(",")):
            item = make_scene(size, f"s3://bench/cogs-{size}")
            mb = size * size * len(BANDS) * 2 / 1e6
            read = _child("read", item, s3.env(), s3.pid)
            ingest = _child(
                "ingest",
                item,
                s3.env(),
                s3.pid,
                out_url=f"s3://bench/store-{size}.zarr",
                chunk_px=args.chunk_px,
            )
            if ingest["valid_px"] != size * size:
                raise SystemExit(f"the store holds {ingest['valid_px']} of {size**2} pixels")
            for name, r in (("read", read), ("ingest", ingest)):
                print(
                    f"{size:>7}{name:>8}{r['seconds']:>9.1f}{mb / r['seconds']:>8.0f}"
                    f"{r['rss_mb']:>13.0f}{r['cpu']:>8.1f}{r['server_cpu']:>10.1f}"
                    f"{r['seconds'] / read['seconds']:>8.2f}x"
                )


if __name__ == "__main__":
    main()
