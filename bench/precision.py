"""bf16 vs fp32 maps of trained models: class agreement and mIoU on held-out scenes.

    python bench/precision.py [--seeds 0] [--models swinv2_nano_relay,...] [--threads 2]
                              [--cache .cache/bench-context] [context.py data options]

The context benchmark's models (``bench/context.py``: trained from scratch, scored on two
held-out scenes per seed), trained once and kept in ``--cache`` (``bench/overlap.py``
shares it), map their held-out scenes whole with the tiled engine
(``relay_models.predict_array``, default tiling) in fp32 and in bf16 autocast
(``precision="bf16"``: logits cast to float32, blending in float32). Prints, per model and
seed, the share of pixels whose class is the same in both maps, both mIoU against the
labels, and the seconds of each map on this CPU; then the issue's target line: the lowest
agreement of all maps, and the largest mIoU drop.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from context import MODELS, parser  # noqa: E402
from overlap import add_data_options, finish_args, held_out, trained  # noqa: E402


def compare(model, arrays, *, batch_size: int = 64) -> dict:
    """fp32 and bf16 maps of ``arrays`` (``(image, labels)`` pairs): agreement of the
    class maps over the pixels with data, each map's mIoU and seconds."""
    import numpy as np
    import torch

    from relay_models import ConfusionMatrix, predict_array

    out: dict = {"same": 0, "pixels": 0}
    cms = {p: ConfusionMatrix(model.num_classes) for p in ("fp32", "bf16")}
    secs = {"fp32": 0.0, "bf16": 0.0}
    for image, labels in arrays:
        classes = {}
        for precision in ("fp32", "bf16"):
            t0 = time.perf_counter()
            probs = predict_array(model, image, batch_size=batch_size, precision=precision)
            secs[precision] += time.perf_counter() - t0
            classes[precision] = probs.argmax(0)
            cms[precision].update(classes[precision], torch.from_numpy(labels.astype("int64")))
        valid = torch.from_numpy(np.isfinite(image).all(0))
        out["same"] += int((classes["fp32"] == classes["bf16"])[valid].sum())
        out["pixels"] += int(valid.sum())
    out |= {f"miou_{p}": cm.miou() for p, cm in cms.items()}
    out |= {f"seconds_{p}": s for p, s in secs.items()}
    out["agreement"] = out["same"] / out["pixels"]
    return out


def main() -> None:
    import torch

    p = parser(__doc__.splitlines()[0])
    add_data_options(p)
    p.set_defaults(seeds="0")
    p.add_argument("--models", default=",".join(MODELS))
    args = finish_args(p.parse_args())
    models = args.models.split(",")
    for seed in args.seed_list:  # train what the cache lacks first (one thread each)
        for name in models:
            trained(args, seed, name, args.cache, threads=args.train_threads)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seed_list:
        for name in models:
            model, urls = trained(args, seed, name, args.cache)
            r = compare(model, held_out(urls))
            rows.append((name, seed, r))
            print(f"  {name} seed {seed}: agreement {r['agreement']:.4f}", flush=True)
    print(
        f"\n# {len(args.seed_list)} seed(s), 2 held-out {args.size_px} px scenes each, "
        f"{args.window_px} px tiles (default overlap), batch 64, {args.threads} threads, "
        f"torch {torch.__version__}\n"
    )
    print("| model | seed | pixels | bf16 = fp32 | mIoU fp32 | mIoU bf16 | Δ | s fp32 | s bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, seed, r in rows:
        d = 100 * (r["miou_bf16"] - r["miou_fp32"])
        print(
            f"| {name} | {seed} | {r['pixels']:,} | {r['agreement']:.4f} | "
            f"{100 * r['miou_fp32']:.2f} | {100 * r['miou_bf16']:.2f} | {d:+.2f} | "
            f"{r['seconds_fp32']:.1f} | {r['seconds_bf16']:.1f} |"
        )
    worst = min(r["agreement"] for *_, r in rows)
    drop = max(100 * (r["miou_fp32"] - r["miou_bf16"]) for *_, r in rows)
    print(f"\nbf16 / fp32 pixel agreement: {worst:.4f}")
    print(f"largest mIoU drop bf16 vs fp32: {drop:+.2f}")


if __name__ == "__main__":
    main()
