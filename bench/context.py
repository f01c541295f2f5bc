"""Do relay tokens use context? Five context strategies and the relay ablations, over seeds.

    python bench/context.py [--seeds 0,1,2] [--steps 400] [--ablations] [--jobs 2]
                            [--json results.json]
    python bench/context.py --report results.json   # the tables again

Each seed draws its own sample scenes (``relaymap.ingest.sample``) and its own model init.
The scenes hold classes that look alike up close and differ by their surroundings (forest vs
park, lake vs river) at a scale only a window >= 4x the local one resolves: parks and
forests are about 3 local windows across, so a local window (or one twice its side) inside
one sees only trees; the global window (4x) sees the town or the fields around. Small
houses (3-5 px) in the fields are objects only full resolution shows. Every model trains
from scratch for the same steps on the same windows (one process, one thread each, the
plain-PyTorch loop of ``relay_models``: ``train_step``, ``warmup_cosine``, ``evaluate``) and
is scored on two held-out scenes (a fixed tile grid, each tile with its global window).
``--ablations`` adds one run per seed for each variant of ``swinv2_nano_relay`` in
:data:`ABLATIONS`. Prints mean +- sd over seeds of mIoU, the context classes' mean IoU and
per-class IoU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = (
    "swinv2_nano",
    "swinv2_nano_registers",
    "swinv2_nano_downsample",
    "swinv2_nano_fusion",
    "swinv2_nano_relay",
)
#: Variants of ``swinv2_nano_relay``: (model options, loss options) changed from the default.
ABLATIONS: dict[str, tuple[dict, dict]] = {
    "relays 2": ({"relays": 2}, {}),
    "relays 8": ({"relays": 8}, {}),
    "shared projector": ({"separate_patch_embed": False}, {}),
    "parallel relays": ({"relay_mode": "parallel"}, {}),
    "consistency weight 0": ({}, {"consistency_weight": 0.0}),
    "consistency weight 1": ({}, {"consistency_weight": 1.0}),
    "global weight 0": ({}, {"global_weight": 0.0}),
    "global weight 1": ({}, {"global_weight": 1.0}),
    "consistency not detached (authors')": ({}, {"detach_consistency": False}),
    "relay bias 0 (authors')": ({"relay_bias": "zero"}, {}),
    "relay init std 1 (authors')": ({"relay_init_std": 1.0}, {}),
    "global branch in first 4 of 8 blocks": ({"relay_blocks": 4}, {}),
}


def make_stores(root: Path, args: argparse.Namespace, seed: int) -> list[str]:
    """Ingest ``args.scenes`` sample scenes of ``seed``; the last two are held out."""
    from relaymap.ingest import ingest_items, make_sample_scenes

    col = make_sample_scenes(
        str(root / "sample"),
        n_scenes=args.scenes,
        size_px=args.size_px,
        feature_px=args.feature_px,
        seed=seed,
        nodata_corner=False,
        houses=args.houses,
    )
    bands = ["blue", "green", "red", "nir"]
    return [ingest_items([it], str(root / f"{it.id}.zarr"), bands).url for it in col.get_items()]


def train_model(job: dict):
    """A model trained from scratch as ``job`` says (see :func:`main`), in this process."""
    import torch

    from relay_models import ModelOptions, RelayLoss, create_model, train_step, warmup_cosine
    from relaymap.flows.dataset import Augment, WindowPairDataset, data_spec
    from relaymap.ingest import open_scene

    train_urls = job["train"]
    options = {"name": job["model"], **job["model_options"]}
    spec = data_spec(
        [open_scene(u) for u in train_urls],
        window_px=job["window_px"],
        factor=ModelOptions(**options).global_factor,
    )
    torch.manual_seed(job["seed"])
    model = create_model(**options, num_classes=spec.num_classes, in_chans=4, spec=spec)
    loss_fn = RelayLoss(factor=spec.factor or 1, **job["loss_options"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"], weight_decay=0.0)
    data = WindowPairDataset(train_urls, spec, augment=Augment(), seed=job["seed"])
    batches = iter(torch.utils.data.DataLoader(data, batch_size=job["batch"]))
    model.train()
    for step in range(job["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, job["steps"], job["lr"], 0.05)
        train_step(model, next(batches), loss_fn, optimizer)
    return model.eval()


def run_one(job: dict) -> dict:
    """Train one model from scratch and score it on the held-out stores (one thread)."""
    import torch

    from relay_models import evaluate
    from relaymap.flows.dataset import TileDataset

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = train_model(job)
    tiles = TileDataset(job["test"], model.spec)
    cm = evaluate(model, torch.utils.data.DataLoader(tiles, batch_size=64), model.num_classes)
    return {
        "label": job["label"],
        "seed": job["seed"],
        "miou": cm.miou(),
        "iou": cm.iou().nan_to_num(0).tolist(),
        "seconds": time.perf_counter() - t0,
    }


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * sd:.1f}"


def parser(description: str) -> argparse.ArgumentParser:
    """The data and training options (shared with ``bench/overlap.py``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--scenes", type=int, default=6, help="2 of them are held out")
    p.add_argument("--size-px", type=int, default=768)
    p.add_argument("--window-px", type=int, default=32)
    p.add_argument("--feature-px", type=int, default=96, help="park/forest size, river width")
    p.add_argument("--houses", type=int, default=300, help="small buildings per scene")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    return p


def make_job(args, urls: list[str], seed: int, label: str, model: str, mo=None, lo=None) -> dict:
    """One training run: ``model`` with model options ``mo`` and loss options ``lo``."""
    return dict(
        label=label,
        model=model,
        model_options=mo or {},
        loss_options=lo or {},
        seed=seed,
        train=urls[:-2],
        test=urls[-2:],
        window_px=args.window_px,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
    )


def main() -> None:
    from relaymap.ingest.sample import CLASSES, CONTEXT_PAIRS

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ablations", action="store_true", help="also the relay variants")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--json", default=None, help="also write every run's scores here")
    args = p.parse_args()
    names = [c.name for c in CLASSES]
    context = sorted({names.index(n) for pair in CONTEXT_PAIRS for n in pair})
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [(m, m, {}, {}) for m in args.models.split(",")]
    if args.ablations:
        variants += [
            (f"relay: {k}", "swinv2_nano_relay", mo, lo) for k, (mo, lo) in ABLATIONS.items()
        ]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for seed in seeds:
            urls = make_stores(Path(tmp) / f"seed-{seed}", args, seed)
            jobs += [make_job(args, urls, seed, *v) for v in variants]
        runs = []
        spawn = get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            for r in pool.map(run_one, jobs):
                ctx = sum(r["iou"][i] for i in context) / len(context)
                r["context"] = ctx
                runs.append(r)
                print(
                    f"  {r['label']:<44} seed {r['seed']}: mIoU {100 * r['miou']:.1f} "
                    f"context {100 * ctx:.1f} ({r['seconds']:.0f} s)",
                    flush=True,
                )
    minutes = (time.perf_counter() - t0) / 60
    if args.json:
        doc = {"args": vars(args), "minutes": minutes, "runs": runs}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    report(vars(args), runs, minutes)


def report(args: dict, runs: list[dict], minutes: float) -> None:
    """Markdown tables: mean ± sd over seeds per model and variant; for the variants, the
    change from ``swinv2_nano_relay`` paired by seed."""
    from relaymap.ingest.sample import CLASSES

    names = [c.name for c in CLASSES]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    print(
        f"\n# {args['steps']} steps x batch {args['batch']}, lr {args['lr']} warm-up + cosine, "
        f"local {args['window_px']} px + global {4 * args['window_px']}↓4, features "
        f"{args['feature_px']} px, {args['houses']} houses/scene, {args['scenes'] - 2} training "
        f"/ 2 held-out {args['size_px']} px scenes per seed, seeds {args['seeds']}; mean ± sd "
        f"over seeds; {minutes:.1f} min"
    )
    print("| model | mIoU | context | " + " | ".join(names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for label in labels:
        if label.startswith("relay: "):
            continue
        mine = [r for r in runs if r["label"] == label]
        cells = [_mean_sd([r["miou"] for r in mine]), _mean_sd([r["context"] for r in mine])]
        cells += [_mean_sd([r["iou"][k] for r in mine]) for k in range(len(names))]
        print(f"| {label} | " + " | ".join(cells) + " |")
    base = {r["seed"]: r for r in runs if r["label"] == "swinv2_nano_relay"}
    variants = [lb for lb in labels if lb.startswith("relay: ")]
    if not variants or not base:
        return
    print("\n| swinv2_nano_relay variant | mIoU | Δ mIoU (paired) | context | Δ context (paired) |")
    print("|---|---:|---:|---:|---:|")
    for label in ["swinv2_nano_relay", *variants]:
        mine = [r for r in runs if r["label"] == label and r["seed"] in base]
        d_miou = [r["miou"] - base[r["seed"]]["miou"] for r in mine]
        d_ctx = [r["context"] - base[r["seed"]]["context"] for r in mine]
        print(
            f"| {label.removeprefix('relay: ')} | {_mean_sd([r['miou'] for r in mine])} | "
            f"{_mean_sd(d_miou)} | {_mean_sd([r['context'] for r in mine])} | {_mean_sd(d_ctx)} |"
        )


def _from_json(path: str) -> None:
    doc = json.loads(Path(path).read_text())
    report(doc["args"], doc["runs"], doc.get("minutes", float("nan")))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        _from_json(sys.argv[2])  # the tables again, from a --json file
    else:
        main()
