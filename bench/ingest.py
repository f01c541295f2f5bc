"""Ingest throughput, memory and store size: COGs -> Zarr scene store with levels, on local
disk or S3.

    python bench/ingest.py [--sizes 5000,10000] [--chunk-px 512] [--where local,s3]
                           [--repeat 1] [--float] [--old DIR] [--codecs SPEC,...]

For each scene size and place (``local``: COGs and store in a local folder; ``s3``: on a
local SeaweedFS S3 server, which shares this machine's cores), writes a 4-band uint16
scene as four COGs, then runs, each in a fresh subprocess (so peak RSS is its own),
``--repeat`` times in turn:

* ``read``: plain ``rasterio`` read of the four COGs into memory (the lower bound);
* ``ingest``: ``ingest_items`` (the product's path: ``load_scene`` + ``write_scene``,
  level 0 and x2/x4/x8; integer sources as int16 counts, no float32 copy);
* ``float`` (with ``--float``): the same through float32 values, the path before issue 27
  (``load_scene(counts=False)`` + ``write_scene``);
* ``old`` (with ``--old DIR``): ``ingest_items`` of another checkout of this repository
  (e.g. ``git worktree add /tmp/old HEAD``), so old and new run side by side;
* one step per ``--codecs`` spec: ``ingest`` with the store's chunks compressed by that
  codec instead (``blosc-<cname>-<clevel>-<shuffle>``, e.g. ``blosc-lz4-5-bitshuffle``,
  ``blosc-zstd-1-shuffle``; ``zstd-<level>``).

Prints, per place, the median seconds, MB/s of source pixels (uint16), peak RSS, the CPU
seconds of the step's process and of the S3 server, the store's size and each step's ratio
to the read.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import resource
import shutil
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


def make_codec(spec: str):
    """A zarr v3 bytes-to-bytes codec from a ``--codecs`` spec."""
    from zarr.codecs import BloscCodec, ZstdCodec

    kind, *args = spec.split("-")
    if kind == "blosc":
        cname, clevel, shuffle = args
        return BloscCodec(cname=cname, clevel=int(clevel), shuffle=shuffle)
    if kind == "zstd":
        return ZstdCodec(level=int(args[0]))
    raise SystemExit(f"unknown codec spec {spec!r}")


def run_ingest(
    item: dict, out_url: str, chunk_px: int, counts: bool = True, codec: str | None = None
) -> None:
    import pystac

    import relaymap.ingest.store as store_module
    from relaymap.ingest import ingest_items, load_scene, write_scene
    from relaymap.ingest.pipeline import READ_CHUNK_PX

    if codec is not None:  # the store's codec, swapped for this run only
        chosen = make_codec(codec)
        store_module._compressor = lambda: chosen

    t0, c0 = time.perf_counter(), time.process_time()
    items = [pystac.Item.from_dict(item)]
    if counts:
        store = ingest_items(
            items, out_url, BANDS, label_asset=None, chunk_px=chunk_px, overwrite=True
        )
    else:  # the float32 detour: what ingest_items did before issue 27
        image = load_scene(items, BANDS, chunk_px=READ_CHUNK_PX)
        store = write_scene(out_url, image, chunk_px=chunk_px, overwrite=True)
    seconds, cpu, rss = time.perf_counter() - t0, time.process_time() - c0, _peak_rss_mb()
    valid = int(store.valid(0).sum())  # untimed: every source pixel arrived
    size_mb = _store_mb(out_url)
    print(
        json.dumps(
            {"seconds": seconds, "cpu": cpu, "rss_mb": rss, "valid_px": valid, "store_mb": size_mb}
        )
    )


def _store_mb(url: str) -> float:
    """Bytes under a store URL, in MB (1e6)."""
    from relaymap.catalog.storage import filesystem

    fs, path = filesystem(url)
    return fs.du(path, total=True) / 1e6


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process we started (the S3 server); 0 without one."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _old_tree(checkout: str) -> str:
    """A folder that makes ``relaymap`` and ``relay_models`` import from ``checkout`` (put
    first on PYTHONPATH: it wins over the editable install of this tree)."""
    shim = Path(tempfile.mkdtemp(prefix="bench-ingest-old-"))
    atexit.register(shutil.rmtree, shim, ignore_errors=True)
    (shim / "relaymap").mkdir()
    (shim / "relay_models").symlink_to(Path(checkout, "relay_models").resolve())
    for pkg in ("ingest", "catalog", "flows"):
        (shim / "relaymap" / pkg).symlink_to(Path(checkout, pkg).resolve())
    return str(shim)


def _child(mode: str, item: dict, env: dict, server_pid: int | None, **kw) -> dict:
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


STEPS = ("read", "ingest", "float")


def measure(
    size: int,
    prefix: str,
    env: dict,
    server_pid: int | None,
    *,
    chunk_px: int = 512,
    repeat: int = 1,
    steps: tuple[str, ...] = ("read", "ingest"),
    old: str | None = None,
) -> dict[str, dict]:
    """Median of ``repeat`` runs of each step, the steps taking turns, on a ``size``
    square scene written under ``prefix`` (a folder URL). Steps: ``read``, ``ingest``,
    ``float``, ``old`` (the ingest of the checkout ``old``) and ``codec:<spec>``."""
    import statistics

    item = make_scene(size, f"{prefix}/cogs-{size}")
    shim = _old_tree(old) if old else None
    runs: dict[str, list[dict]] = {s: [] for s in steps}
    for i in range(repeat):
        for step in steps:
            if step == "read":
                r = _child("read", item, env, server_pid)
            else:
                # a fresh store each time: an existing complete one is skipped (resumable)
                name = step.replace(":", "-")
                out = f"{prefix}/store-{size}-{name}-{i}.zarr"
                kw = {"out_url": out, "chunk_px": chunk_px, "counts": step != "float"}
                if step.startswith("codec:"):
                    kw["codec"] = step.removeprefix("codec:")
                child_env = env
                if step == "old":
                    path = os.pathsep.join(filter(None, [shim, os.environ.get("PYTHONPATH")]))
                    child_env = {**env, "PYTHONPATH": path}
                r = _child("ingest", item, child_env, server_pid, **kw)
                if r["valid_px"] != size * size:
                    raise SystemExit(f"the store holds {r['valid_px']} of {size**2} pixels")
                _remove(out)  # the disk holds one store at a time
            runs[step].append(r)
    keys = ("seconds", "cpu", "rss_mb", "server_cpu", "store_mb")
    return {
        s: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys} | {"runs": len(rs)}
        for s, rs in runs.items()
    }


def _remove(url: str) -> None:
    from relaymap.catalog.storage import filesystem

    fs, path = filesystem(url)
    fs.rm(path, recursive=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,10000")
    p.add_argument("--chunk-px", type=int, default=512, help="store chunk side")
    p.add_argument("--where", default="local,s3", help="local and/or s3")
    p.add_argument("--repeat", type=int, default=1, help="runs of each step, in turn")
    p.add_argument("--float", action="store_true", help="also the float32 path (before)")
    p.add_argument("--old", help="also the ingest of this checkout (e.g. a worktree of HEAD)")
    p.add_argument("--codecs", default="", help="also ingest with these store codecs")
    args = p.parse_args()
    steps = (*(STEPS if args.float else STEPS[:2]), *(("old",) if args.old else ()))
    steps += tuple(f"codec:{c}" for c in args.codecs.split(",") if c)

    from relaymap.catalog.local_s3 import seaweedfs

    print(f"# {os.cpu_count()} CPUs; chunk {args.chunk_px} px; median of {args.repeat} run(s)")
    print(
        f"{'where':>6}{'size':>7}{'step':>30}{'seconds':>9}{'MB/s':>8}{'peak RSS MB':>13}"
        f"{'CPU s':>8}{'S3 CPU s':>10}{'store MB':>10}{'vs read':>9}"
    )
    for where in args.where.split(","):
        with contextlib.ExitStack() as stack:
            if where == "s3":
                s3 = stack.enter_context(seaweedfs(buckets=("bench",)))
                os.environ.update(s3.env())  # this process too: make_scene writes to it
                prefix, env, pid = "s3://bench", s3.env(), s3.pid
            else:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-"))
                prefix, env, pid = f"file://{tmp}", {}, None
            for size in (int(s) for s in args.sizes.split(",")):
                res = measure(
                    size, prefix, env, pid, chunk_px=args.chunk_px, repeat=args.repeat,
                    steps=steps, old=args.old,
                )  # fmt: skip
                mb = size * size * len(BANDS) * 2 / 1e6
                for name, r in res.items():
                    print(
                        f"{where:>6}{size:>7}{name:>30}{r['seconds']:>9.2f}"
                        f"{mb / r['seconds']:>8.0f}{r['rss_mb']:>13.0f}{r['cpu']:>8.2f}"
                        f"{r['server_cpu']:>10.1f}{r['store_mb']:>10.1f}"
                        f"{r['seconds'] / res['read']['seconds']:>8.2f}x"
                    )


if __name__ == "__main__":
    main()
