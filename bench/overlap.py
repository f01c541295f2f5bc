"""Mapping cost vs accuracy: tile overlap and blending, on the context benchmark's scenes.

    python bench/overlap.py [--seed 0] [--steps 400] [--threads 2] [context.py data options]

Trains ``swinv2_nano_relay`` once as ``bench/context.py`` does (one seed), then maps the two
held-out scenes whole with the tiled engine (``relay_models.predict_array``) for each tile
overlap and blend: ``cosine`` (overlapping tiles weighted by a cosine window, our default)
and ``center`` (each pixel from the tile whose centre is nearest, the paper's "keep the
central part"). Prints mIoU against the labels and throughput in km2/hour (10 m pixels) on
this machine's CPU, all in one run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from context import make_job, make_stores, parser, train_model  # noqa: E402

#: Overlaps as fractions of the tile (0 / 32 / 64 px of a 256 px tile are 0, 1/8, 1/4).
OVERLAPS = (0.0, 0.125, 0.25, 0.5)
BLENDS = ("cosine", "center")


def main() -> None:
    import torch

    from relay_models import ConfusionMatrix, predict_array
    from relaymap.ingest import open_scene

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_stores(Path(tmp), args, args.seed)
        t0 = time.perf_counter()
        job = make_job(args, urls, args.seed, "relay", "swinv2_nano_relay")
        model = train_model(job)
        print(f"trained in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        scenes = [open_scene(u) for u in job["test"]]
        arrays = [s.read_box((0, 0, *s.shape(0))) for s in scenes]
        tile = args.window_px
        rows = []
        for frac in OVERLAPS:
            for blend in BLENDS:
                if frac == 0 and blend == "center":
                    continue  # without overlap both keep every tile whole
                cm, secs, pixels = ConfusionMatrix(model.num_classes), 0.0, 0
                for image, labels in arrays:
                    t = time.perf_counter()
                    probs = predict_array(
                        model, image, overlap_px=round(frac * tile), blend=blend, batch_size=64
                    )
                    secs += time.perf_counter() - t
                    pixels += labels.size
                    cm.update(probs.argmax(0), torch.from_numpy(labels.astype("int64")))
                rows.append((frac, blend, cm.miou(), pixels * 1e-4 / (secs / 3600)))
                print(f"  overlap {frac:.3f} {blend}: done", flush=True)
    print(
        f"\n# swinv2_nano_relay, {args.steps} steps, seed {args.seed}; 2 held-out "
        f"{args.size_px} px scenes; {tile} px tiles; {args.threads} CPU threads"
    )
    print("| overlap (of tile) | at 256 px | blend | mIoU | km²/h | cost vs no overlap |")
    print("|---:|---:|---|---:|---:|---:|")
    base = rows[0][3]
    for frac, blend, miou, rate in rows:
        print(
            f"| {frac:.3f} | {round(frac * 256)} | {blend} | {100 * miou:.2f} | {rate:,.0f} "
            f"| {base / rate:.2f}x |"
        )


if __name__ == "__main__":
    main()
