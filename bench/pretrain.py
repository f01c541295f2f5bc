"""Pretraining speed and memory: a SimMIM step against a supervised training step.

    python bench/pretrain.py [--models swinv2_nano_relay,swinv2_nano,swinv2_tiny_relay]
                             [--window-px 64] [--batch 8] [--steps 8] [--threads 2]
                             [--precision fp32,bf16]

For each model and precision, one fresh process (so its peak memory is its own) builds the
model, runs two warm-up steps, then ``--steps`` timed steps of
:func:`relay_models.pretraining.pretrain_step` (both windows and relays for a relay model,
as ``relaymap pretrain`` runs it) and of :func:`relay_models.train_step` on the same random
batch; prints seconds per step, samples per second, the ratio, and the process's peak
resident memory after each (``ru_maxrss``; the supervised step runs second, so its peak
includes the first's).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(cfg: dict) -> dict:
    """One model and precision, in this process: seconds per step and peak RSS for the
    pretraining step, then the training step."""
    import resource

    import torch

    from relay_models import RelayLoss, create_model, train_step
    from relay_models import precision as prec
    from relay_models.pretraining import MaskedImageModel, pretrain_step

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    px, b = cfg["window_px"], cfg["batch"]
    model = create_model(cfg["model"], num_classes=6, in_chans=4)
    batch = {
        "local": torch.randn(b, 4, px, px),
        "global": torch.randn(b, 4, px, px),
        "valid": torch.ones(b, px, px, dtype=torch.bool),
        "global_valid": torch.ones(b, px, px, dtype=torch.bool),
        "labels": torch.randint(0, 6, (b, px, px)),
    }
    autocast = prec.autocast(cfg["precision"], "cpu")
    mim = MaskedImageModel(model)
    out = {}
    for kind in ("pretrain", "train"):
        if kind == "pretrain":
            opt = torch.optim.AdamW(mim.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(0)

            def step(opt=opt, gen=gen, batch=batch):
                return pretrain_step(mim, batch, opt, generator=gen, autocast=autocast)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            loss = RelayLoss(factor=4)
            if not model.spec.takes_global:
                batch = {k: v for k, v in batch.items() if k != "global"}

            def step(opt=opt, loss=loss, batch=batch):
                return train_step(model, batch, loss, opt, autocast=autocast)

        for _ in range(2):
            step()
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            step()
        seconds = (time.perf_counter() - t0) / cfg["steps"]
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out[kind] = {"s_per_step": seconds, "samples_per_s": b / seconds, "peak_mb": peak_mb}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="swinv2_nano_relay,swinv2_nano,swinv2_tiny_relay")
    p.add_argument("--window-px", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's config (JSON)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    import torch

    from relay_models.precision import native_bf16

    caps = torch._C._cpu._get_cpu_capability()
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, CPU capability {caps.get('capability', '?')}, native bf16: "
        f"{native_bf16('cpu')}; window {args.window_px} px (+ global), batch {args.batch}, "
        f"{args.steps} timed steps\n"
    )
    print(
        "| model | precision | pretrain s/step | pretrain samples/s | train s/step | "
        "pretrain / train time | peak RSS pretrain MB | peak RSS after train MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        for precision in args.precision.split(","):
            cfg = {
                "model": model,
                "precision": precision,
                "window_px": args.window_px,
                "batch": args.batch,
                "steps": args.steps,
                "threads": args.threads,
            }
            done = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(cfg)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            pre, tr = r["pretrain"], r["train"]
            print(
                f"| {model} | {precision} | {pre['s_per_step']:.3f} | "
                f"{pre['samples_per_s']:.1f} | {tr['s_per_step']:.3f} | "
                f"{pre['s_per_step'] / tr['s_per_step']:.2f} | {pre['peak_mb']:.0f} | "
                f"{tr['peak_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
