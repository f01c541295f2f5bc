"""Params, GFLOPs and forward throughput: sliding-window baselines vs relay-token twins.

    python bench/models.py [--batch 8] [--side-px 256] [--iters 5] [--pairs swinv2_small,vit_small]

Runs on CUDA when available (bf16 autocast), else on the CPU in float32. Baseline and relay
model are timed alternately in the same run, so machine noise hits both alike; the
relay/baseline throughput ratio is the number to compare with the FLOPs bound (~0.48).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch

from relay_models import create_model, model_stats


def _forward(model, x):
    return model(x, x) if model.takes_global else model(x)


def _time_once(model, x, device):
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast:
        _forward(model, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--side-px", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--pairs", default="swinv2_small,vit_small")
    p.add_argument("--num-classes", type=int, default=10)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
    )
    dtype = "bf16 autocast" if device.type == "cuda" else "float32"
    print(
        f"# device: {where}; {dtype}; batch {args.batch} at {args.side_px} px; "
        f"torch {torch.__version__}"
    )
    print(
        f"{'model':<22}{'params (M)':>11}{'GFLOPs':>9}{'img/s':>9}{'ratio':>8}{'FLOPs bound':>13}"
    )
    for base in args.pairs.split(","):
        names = [base, base + "_relay"]
        models, stats, times = {}, {}, {n: [] for n in names}
        x = torch.randn(args.batch, 3, args.side_px, args.side_px, device=device)
        for n in names:
            stats[n] = model_stats(n, num_classes=args.num_classes, side_px=args.side_px)
            models[n] = create_model(n, num_classes=args.num_classes).to(device).eval()
            _time_once(models[n], x, device)  # warm-up
        for _ in range(args.iters):  # alternate, so drift hits both models alike
            for n in names:
                times[n].append(_time_once(models[n], x, device))
        ips = {n: args.batch / statistics.median(times[n]) for n in names}
        for n in names:
            ratio = ips[n] / ips[base]
            bound = stats[base].gflops / stats[n].gflops
            print(
                f"{n:<22}{stats[n].params / 1e6:>11.2f}{stats[n].gflops:>9.2f}"
                f"{ips[n]:>9.2f}{ratio:>8.2f}{bound:>13.2f}"
            )


if __name__ == "__main__":
    main()
