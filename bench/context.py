"""Do relay tokens use context? Sliding window vs registers vs decision fusion vs relays.

    python bench/context.py [--steps 1200] [--scenes 6] [--size-px 512] [--window-px 32]
                            [--feature-px 64] [--seed 0]

Sample scenes hold classes that look alike up close and differ by their surroundings
(forest vs park, lake vs river; see ``relaymap.ingest.sample``). Each model trains from scratch with
the same steps, seed and data (Ray Train, 2 CPU workers), then is scored on held-out scenes
(a fixed tile grid, each tile with its global window). Prints mIoU, the mean IoU of the
context classes and per-class IoU. Expected: relays beat the sliding window clearly on the
context classes; registers (relays without the global window) do not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("swinv2_nano", "swinv2_nano_registers", "swinv2_nano_fusion", "swinv2_nano_relay")


def make_stores(root: Path, scenes: int, size_px: int, feature_px: int, seed: int) -> list[str]:
    from relaymap.ingest import ingest_items, make_sample_scenes

    col = make_sample_scenes(
        str(root / "sample"),
        n_scenes=scenes,
        size_px=size_px,
        feature_px=feature_px,
        seed=seed,
        nodata_corner=False,
    )
    bands = ["blue", "green", "red", "nir"]
    return [ingest_items([it], str(root / f"{it.id}.zarr"), bands).url for it in col.get_items()]


def main() -> None:
    import ray

    from relaymap.flows.train import TrainConfig, train
    from relaymap.ingest.sample import CLASSES, CONTEXT_PAIRS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--scenes", type=int, default=6, help="2 of them are held out")
    p.add_argument("--size-px", type=int, default=512)
    p.add_argument("--window-px", type=int, default=32)
    p.add_argument(
        "--feature-px", type=int, default=None, help="park/forest/river size (default 2x window)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args()
    names = [c.name for c in CLASSES]
    context = sorted({names.index(n) for pair in CONTEXT_PAIRS for n in pair})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        feature_px = args.feature_px or 2 * args.window_px
        urls = make_stores(Path(tmp), args.scenes, args.size_px, feature_px, args.seed)
        train_urls, val_urls = urls[:-2], urls[-2:]
        for name in args.models.split(","):
            t0 = time.perf_counter()
            cfg = TrainConfig.model_validate(
                {
                    "model": {"name": name, "num_classes": len(CLASSES), "in_chans": 4},
                    "data": {"train": train_urls, "val": val_urls, "window_px": args.window_px},
                    "optim": {"steps": args.steps, "batch_size": args.batch, "lr": args.lr},
                    "run": {
                        "name": f"context-{name}",
                        "storage_url": f"{tmp}/runs",
                        "num_workers": 2,
                        "checkpoint_every": args.steps,
                        "val_every": args.steps,
                        "log_every": args.steps,
                        "seed": args.seed,
                    },
                }
            )
            result = train(cfg)
            iou = result.metrics["val_iou"]
            ctx = sum(iou[i] for i in context) / len(context)
            rows.append((name, result.metrics["val_miou"], ctx, iou, time.perf_counter() - t0))
    ray.shutdown()
    print(
        f"# {args.steps} steps x batch {args.batch} x 2 workers, lr {args.lr}, local "
        f"{args.window_px} px + global {4 * args.window_px}↓4, features "
        f"{args.feature_px or 2 * args.window_px} px, {args.scenes - 2} training / 2 held-out "
        f"{args.size_px} px scenes, seed {args.seed}"
    )
    head = "".join(f"{n[:8]:>9}" for n in names)
    print(f"{'model':<24}{'mIoU':>7}{'context':>9}{head}{'minutes':>9}")
    for name, miou, ctx, iou, secs in rows:
        cells = "".join(f"{100 * v:>9.1f}" for v in iou)
        print(f"{name:<24}{100 * miou:>7.1f}{100 * ctx:>9.1f}{cells}{secs / 60:>9.1f}")


if __name__ == "__main__":
    main()
