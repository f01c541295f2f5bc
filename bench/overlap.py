"""Mapping cost vs accuracy: tile overlap and blending, on the context benchmark's scenes.

    python bench/overlap.py [--seeds 0,1,2] [--models swinv2_nano_relay,swinv2_nano]
                            [--threads 2] [--cache .cache/bench-context] [--train-only]
                            [context.py data options]

Trains each model once per seed as ``bench/context.py`` does (or loads it from ``--cache``,
where trained models and the seeds' scene stores are kept for the other benchmarks:
``bench/precision.py``, ``bench/speed.py``), then maps the two held-out scenes whole with
the tiled engine (``relay_models.predict_array``) for each tile overlap and blend:
``cosine`` (overlapping tiles weighted by a cosine window, our default) and ``center``
(each pixel from the tile whose centre is nearest, the paper's "keep the central part").
Prints mIoU against the labels and throughput in km2/hour (10 m pixels) on this machine's
CPU, all in one run, per model and seed; then, per model, each overlap's mIoU minus the
quarter tile's (the previous default), paired by seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from context import make_job, make_stores, parser, train_model  # noqa: E402

#: Overlaps as fractions of the tile (0 / 32 / 64 px of a 256 px tile are 0, 1/8, 1/4).
OVERLAPS = (0.0, 0.125, 0.25, 0.5)
BLENDS = ("cosine", "center")
#: The default overlap before issue 27 (a quarter tile): the reference of the paired deltas.
QUARTER = 0.25
DEFAULT_CACHE = ROOT / ".cache" / "bench-context"


def data_key(args: argparse.Namespace) -> str:
    """A short hash of the data options: the cache folder of a seed's scenes and models."""
    keys = ("family", "scenes", "size_px", "window_px", "factor", "feature_px", "houses")
    doc = {k: getattr(args, k, None) for k in keys}
    doc |= {"steps": args.steps, "batch": args.batch, "lr": args.lr}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]


def context_scenes(args: argparse.Namespace, seed: int, cache: Path) -> list[str]:
    """The seed's scene stores (the last two held out), written once into ``cache``."""
    root = cache / f"{data_key(args)}-seed-{seed}"
    done = root / "stores.json"
    if done.exists():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    urls = make_stores(root, args, seed)
    done.write_text(json.dumps(urls))
    return urls


def trained(args: argparse.Namespace, seed: int, name: str, cache: Path, *, threads: int = 1):
    """``name`` trained as ``bench/context.py`` trains it at ``seed`` (eval mode), from
    ``cache`` when it is there; else trained here (``threads`` torch threads) and saved."""
    import torch

    from relay_models import load_saved, save_model

    urls = context_scenes(args, seed, cache)
    path = cache / f"{data_key(args)}-seed-{seed}" / f"{name}.safetensors"
    if path.exists():
        return load_saved(path.read_bytes(), str(path)), urls
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = train_model(make_job(args, urls, seed, name, name))
    torch.set_num_threads(before)
    save_model(model, path)
    print(f"  trained {name} seed {seed} in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return model.eval(), urls


def held_out(urls: list[str]) -> list[tuple]:
    """The held-out scenes' ``(image, labels)`` arrays, read whole."""
    from relaymap.ingest import open_scene

    scenes = [open_scene(u) for u in urls[-2:]]
    return [s.read_box((0, 0, *s.shape(0))) for s in scenes]


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2, help="torch threads while mapping")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads while training")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--train-only", action="store_true", help="fill the cache and stop")


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if getattr(args, "size_px", None) is None:
        args.size_px = 1024 if getattr(args, "family", "context") == "sparse" else 768
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    return args


def main() -> None:
    import torch

    from relay_models import ConfusionMatrix, predict_array

    p = parser(__doc__.splitlines()[0])
    add_data_options(p)
    p.add_argument("--models", default="swinv2_nano_relay,swinv2_nano")
    args = finish_args(p.parse_args())
    models = args.models.split(",")
    for seed in args.seed_list:
        for name in models:
            trained(args, seed, name, args.cache, threads=args.train_threads)
    if args.train_only:
        return
    torch.set_num_threads(args.threads)
    tile = args.window_px
    results: dict[tuple[str, int], list[tuple]] = {}
    for seed in args.seed_list:
        for name in models:
            model, urls = trained(args, seed, name, args.cache)
            arrays = held_out(urls)
            rows = []
            for frac in OVERLAPS:
                for blend in BLENDS:
                    if frac == 0 and blend == "center":
                        continue  # without overlap both keep every tile whole
                    cm, secs, pixels = ConfusionMatrix(model.num_classes), 0.0, 0
                    for image, labels in arrays:
                        t = time.perf_counter()
                        probs = predict_array(
                            model,
                            image,
                            overlap_px=round(frac * tile),
                            blend=blend,
                            batch_size=64,
                            precision="fp32",
                        )
                        secs += time.perf_counter() - t
                        pixels += labels.size
                        cm.update(probs.argmax(0), torch.from_numpy(labels.astype("int64")))
                    rows.append((frac, blend, cm.miou(), pixels * 1e-4 / (secs / 3600)))
            results[name, seed] = rows
            print(f"  {name} seed {seed}: done", flush=True)
    print(
        f"\n# {args.steps} steps; 2 held-out {args.size_px} px scenes per seed; {tile} px "
        f"tiles; {args.threads} CPU threads; fp32; torch {torch.__version__}"
    )
    for (name, seed), rows in results.items():
        print(f"\n## {name}, seed {seed}\n")
        print("| overlap (of tile) | at 256 px | blend | mIoU | km²/h | cost vs no overlap |")
        print("|---:|---:|---|---:|---:|---:|")
        base = rows[0][3]
        for frac, blend, miou, rate in rows:
            print(
                f"| {frac:.3f} | {round(frac * 256)} | {blend} | {100 * miou:.2f} | "
                f"{rate:,.0f} | {base / rate:.2f}x |"
            )
    print("\n## mIoU minus the quarter tile's (cosine), paired by seed; cost vs no overlap\n")
    print("| model | overlap | blend | " + " | ".join(f"seed {s}" for s in args.seed_list))
    print(" | mean ± sd | cost (mean) |")
    print("|---|---:|---|" + "---:|" * (len(args.seed_list) + 2))
    for name in models:
        per_seed = {s: results[name, s] for s in args.seed_list}
        ref = {
            s: next(r[2] for r in rows if r[0] == QUARTER and r[1] == "cosine")
            for s, rows in per_seed.items()
        }
        for i, (frac, blend, *_) in enumerate(per_seed[args.seed_list[0]]):
            d = [100 * (per_seed[s][i][2] - ref[s]) for s in args.seed_list]
            cost = statistics.fmean(per_seed[s][0][3] / per_seed[s][i][3] for s in args.seed_list)
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            cells = " | ".join(f"{x:+.2f}" for x in d)
            print(
                f"| {name} | {frac:.3f} | {blend} | {cells} | {statistics.fmean(d):+.2f} ± "
                f"{sd:.2f} | {cost:.2f}x |"
            )


if __name__ == "__main__":
    main()
