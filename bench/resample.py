"""Going coarser: the cost of one block's area average, by numpy against GDAL's warper,
with and without AWS variables in the environment.

    python bench/resample.py [--src-m 0.6] [--dst-m 10] [--block 64] [--repeat 200]

A block is what :func:`relaymap.ingest.load._native_block` reduces per band: a target chunk
of ``--block`` px at ``--dst-m`` from the source pixels of ``--src-m`` that cover it (NAIP at
0.6 m onto a 10 m grid by default), 30% of them no data. Each call to GDAL's warper through
rasterio (``reproject``) makes rasterio ``Env`` objects, and where ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` are set (any machine that reads or writes S3) every ``Env`` builds
a boto3 session. All four rows run in one process, one after the other, per repeat.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "eu-west-1"}


def main() -> None:
    from affine import Affine
    from odc.geo.geobox import GeoBox
    from rasterio.warp import Resampling

    from relaymap.ingest import resample

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src-m", type=float, default=0.6)
    p.add_argument("--dst-m", type=float, default=10.0)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args()

    n = int(np.ceil(args.block * args.dst_m / args.src_m)) + 2
    src = GeoBox((n, n), Affine(args.src_m, 0, 5e5, 0, -args.src_m, 5e6), "EPSG:32633")
    dst = GeoBox((args.block,) * 2, Affine(args.dst_m, 0, 5e5, 0, -args.dst_m, 5e6), "EPSG:32633")
    values = np.random.default_rng(0).random((n, n)).astype(np.float32)
    values[np.random.default_rng(1).random((n, n)) < 0.3] = np.nan
    valid = np.isfinite(values)

    def gdal() -> np.ndarray:  # what average_valid ran before: two warps
        mean = resample._warp(values, src, dst, Resampling.average, np.nan, np.float32)
        share = resample._warp(valid.astype(np.float32), src, dst, Resampling.average, None, "f4")
        mean[share < resample.MIN_VALID_SHARE - 1e-6] = np.nan
        return mean

    def numpy() -> np.ndarray:
        return resample.average_valid(values, src, dst)

    assert resample._area_weights(src, dst) is not None
    np.testing.assert_allclose(numpy(), gdal(), atol=1e-6, equal_nan=True)
    rows = [(how, aws) for how in ("gdal", "numpy") for aws in (False, True)]
    seconds = dict.fromkeys(rows, 0.0)
    for _ in range(args.repeat):  # the variables as rasterio reads them: the process's own
        for how, aws in rows:
            for k, v in AWS.items():
                if aws:
                    os.environ[k] = v
                else:
                    os.environ.pop(k, None)
            t = time.perf_counter()
            (gdal if how == "gdal" else numpy)()
            seconds[(how, aws)] += time.perf_counter() - t
    b = args.block
    print(f"one block: {n}x{n} px at {args.src_m} m -> {b}x{b} px at {args.dst_m} m")
    print(f"{'average by':<12}{'AWS variables':>15}{'ms per block':>15}{'vs numpy':>10}")
    for how, aws in rows:
        ms = 1e3 * seconds[(how, aws)] / args.repeat
        base = 1e3 * seconds[("numpy", aws)] / args.repeat
        print(f"{how:<12}{'set' if aws else 'unset':>15}{ms:>15.2f}{ms / base:>9.1f}x")


if __name__ == "__main__":
    main()
