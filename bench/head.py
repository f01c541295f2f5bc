"""The ``convt`` decode head as ``conv_transpose2d`` vs as one matmul (what it computes now).

    python bench/head.py [--models NAME,...] [--sides 64,256] [--batch 8] [--iters 10]

Whole relay-model forward passes (``predict_local``, as inference runs them: local and
global branch, local logits) on the CPU in float32, one torch thread, with the same weights
both ways: the head's own ``nn.ConvTranspose2d`` (before) and its matmul form (after),
timed alternately in one run so machine noise hits both alike. Prints median ms per batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from relay_models import create_model


def _conv_forward(self, feats):
    return self.proj(feats[-1])  # the head before: nn.ConvTranspose2d


def _time(model, x) -> float:
    t0 = time.perf_counter()
    model.predict_local(x, x)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", default="swinv2_nano_relay,swinv2_tiny_relay,swinv2_small_relay,vit_small_relay"
    )
    p.add_argument("--sides", default="64,256")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, CPU float32, 1 thread, batch {args.batch}")
    print("| model | side px | conv_transpose2d ms | matmul ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(name, num_classes=6, in_chans=4).eval()
        head = model.decode_head
        fast = type(head).forward
        for side in map(int, args.sides.split(",")):
            x = torch.randn(args.batch, 4, side, side)
            times = {"conv": [], "matmul": []}
            with torch.inference_mode():
                type(head).forward = _conv_forward
                ref = model.predict_local(x, x)
                type(head).forward = fast
                diff = float((model.predict_local(x, x) - ref).abs().max())
                for i in range(args.iters + 1):
                    for kind, fwd in (("conv", _conv_forward), ("matmul", fast)):
                        type(head).forward = fwd
                        t = _time(model, x)
                        if i:  # the first round warms up
                            times[kind].append(t)
            type(head).forward = fast
            conv, mm = (statistics.median(times[k]) * 1e3 for k in ("conv", "matmul"))
            print(f"| {name} | {side} | {conv:.1f} | {mm:.1f} | {conv / mm:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
