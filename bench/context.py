"""Do relay tokens use context? Five context strategies and the relay variants, over seeds.

    python bench/context.py [--family context|sparse] [--factor 4] [--seeds 0,1,2]
                            [--steps 400] [--budgets 1,3] [--curve-every 50]
                            [--models ...] [--variants ...] [--ablations] [--jobs 2]
                            [--json results.json] [--plot curves.png]
    python bench/context.py --report results.json [--plot curves.png]   # the tables again

Two scene families, each seed drawing its own scenes and model init:

* ``context`` (``relaymap.ingest.sample``): classes that look alike up close and differ by
  their surroundings (forest vs park, lake vs river) at a scale only a window >= 4x the
  local one resolves; small houses (3-5 px) only full resolution shows.
* ``sparse`` (:mod:`bench.sparse`): two field classes told apart only by the density of
  small bright objects over their district (a local window sees none or one, whichever the
  class; the global window counts tens), next to water, forest and urban, which any local
  window sees. Object size, density, density contrast and district size vary by seed.

Every model trains from scratch for the same steps on the same windows (one process, one
thread each, the plain-PyTorch loop of ``relay_models``: ``train_step``, ``warmup_cosine``,
``evaluate``; training windows are read by the pipeline's sampler from in-memory copies of
the stores' levels, the same pixels without the Zarr decoding) and is scored on two held-out
scenes (a fixed tile grid, each tile with its global window). ``--budgets 1,3`` trains every
model at 1x and 3x ``--steps``. ``--curve-every N`` scores a fixed subset of held-out tiles
every N steps (learning curves). ``--variants`` adds named variants of the relay model
(:data:`VARIANTS`), ``--ablations`` those of :data:`ABLATIONS`.

Prints, per budget, mean ± sd over seeds of mIoU, the context classes' mean IoU, the
context-decision accuracy (of the pixels labelled with one class of a context pair and
predicted as one of that pair, the share given the right one), per-class IoU, the paired
differences from the relay model, the step at which each model's context accuracy first
reaches 80% of its final value, and (``sparse``) the issue's target lines.
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

FAMILIES = ("context", "sparse")
MODELS = (
    "swinv2_nano",
    "swinv2_nano_registers",
    "swinv2_nano_downsample",
    "swinv2_nano_fusion",
    "swinv2_nano_relay",
)
#: The relay model the paired differences and the targets are about.
RELAY = "swinv2_nano_relay"
#: Label prefix of the runs fine-tuned from a pretrained backbone (``--pretrain``).
PRETRAINED = "pretrained: "
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
#: Named variants for ``--variants``: (model name, model options, loss options, optimiser
#: options). Optimiser options: ``relay_lr_scale`` (lr of the relay parameters over the
#: rest), ``warmup`` (warm-up fraction of the steps).
#: The relay options before issue 29, spelled out (they no longer depend on the defaults).
PREVIOUS = {
    "relay_pool": "mean",
    "relay_norm": "shared",
    "relay_init_std": 0.02,
    "relay_bias": "mid",
}
VARIANTS: dict[str, tuple[str, dict, dict, dict]] = {
    "relay: previous default": (RELAY, PREVIOUS, {}, {}),
    "relayfusion: previous default": ("swinv2_nano_relayfusion", PREVIOUS, {}, {}),
    "relayfusion: init std 1": (
        "swinv2_nano_relayfusion",
        {**PREVIOUS, "relay_init_std": 1.0},
        {},
        {},
    ),
    "relay: own norm": (RELAY, {**PREVIOUS, "relay_norm": "own"}, {}, {}),
    "relay: own norm + init std 1": (
        RELAY,
        {**PREVIOUS, "relay_norm": "own", "relay_init_std": 1.0},
        {},
        {},
    ),
    "relay: post-norm init 1": (RELAY, {**PREVIOUS, "post_norm_init": 1.0}, {}, {}),
    "relay: post-norm init 0.1": (RELAY, {**PREVIOUS, "post_norm_init": 0.1}, {}, {}),
    "relay: global weight 1": (RELAY, PREVIOUS, {"global_weight": 1.0}, {}),
    "relay: relay lr x10": (RELAY, PREVIOUS, {}, {"relay_lr_scale": 10.0}),
    "relay: init std 1": (RELAY, {**PREVIOUS, "relay_init_std": 1.0}, {}, {}),
    "relay: relay bias 0": (RELAY, {**PREVIOUS, "relay_bias": "zero"}, {}, {}),
    "relay: no warm-up": (RELAY, PREVIOUS, {}, {"warmup": 0.0}),
    "relay: warm-up 20%": (RELAY, PREVIOUS, {}, {"warmup": 0.2}),
    "relay: global branch in 4 of 8 blocks": (RELAY, {**PREVIOUS, "relay_blocks": 4}, {}, {}),
    # with --pretrain (``--tuned-variants``): the pretrained backbone, relay parameters at
    # their init (as a published checkpoint without relays leaves them)
    "relay: fresh relays": (RELAY, {}, {}, {"fresh_relays": True}),
    "relay: global loss weight 1": (RELAY, {}, {"global_weight": 1.0}, {}),
    "relay: fresh relays + relay lr x10": (
        RELAY,
        {},
        {},
        {"fresh_relays": True, "relay_lr_scale": 10.0},
    ),
}


# ---------------------------------------------------------------- data


def class_names(family: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The family's class names and its context pairs as index pairs."""
    if family == "sparse":
        from bench.sparse import CLASS_NAMES, CONTEXT_PAIR

        names, pairs = list(CLASS_NAMES), [CONTEXT_PAIR]
    else:
        from relaymap.ingest.sample import CLASSES, CONTEXT_PAIRS

        names, pairs = [c.name for c in CLASSES], list(CONTEXT_PAIRS)
    return names, [(names.index(a), names.index(b)) for a, b in pairs]


def scene_px(args: argparse.Namespace) -> int:
    """The scene side: ``--size-px``, else 768 px (``sparse``: 1024 px)."""
    return args.size_px or (1024 if getattr(args, "family", "context") == "sparse" else 768)


def make_stores(root: Path, args: argparse.Namespace, seed: int, extra: int = 0) -> list[str]:
    """Write ``args.scenes`` scene stores of ``seed``'s family (the last two are held out),
    then ``extra`` more of the same generator (unlabelled data for pretraining: scenes are
    drawn one after another, so the first ``args.scenes`` do not depend on ``extra``)."""
    n_scenes = args.scenes + extra
    if getattr(args, "family", "context") == "sparse":
        from bench.sparse import draw_family, write_sparse_stores

        gen = draw_family(seed, window_px=args.window_px, factor=args.factor)
        print(f"  seed {seed}: {gen}", flush=True)
        return write_sparse_stores(root, gen, n_scenes=n_scenes, size_px=scene_px(args), seed=seed)
    from relaymap.ingest import ingest_items, make_sample_scenes

    col = make_sample_scenes(
        str(root / "sample"),
        n_scenes=n_scenes,
        size_px=scene_px(args),
        feature_px=args.feature_px,
        seed=seed,
        nodata_corner=False,
        houses=args.houses,
    )
    bands = ["blue", "green", "red", "nir"]
    return [ingest_items([it], str(root / f"{it.id}.zarr"), bands).url for it in col.get_items()]


def _pairs_in_memory():
    """``WindowPairDataset`` reading its windows from in-memory copies of the stores' levels
    (:class:`relay_models.windows.ArrayPyramid`): the same sampler, the same pixels (levels
    by the same 2x2 rule), without decoding Zarr chunks for every window."""
    from relay_models.windows import ArrayPyramid
    from relaymap.flows.dataset import WindowPairDataset
    from relaymap.ingest import open_scene

    class InMemoryPairs(WindowPairDataset):
        def __iter__(self):
            rng = self._generator()
            stores = [open_scene(u) for u in self.urls]
            pyramids = [
                ArrayPyramid(*s.read_box((0, 0, *s.shape(0))), num_levels=s.num_levels)
                for s in stores
            ]
            while True:
                yield self.draw(pyramids, rng)

    return InMemoryPairs


# ---------------------------------------------------------------- training and scoring


def context_accuracy(counts, pairs: list[tuple[int, int]]) -> float:
    """Of the pixels labelled with one class of a pair and predicted as one of that pair,
    the share predicted as the right one (pooled over ``pairs``; ``counts[label][pred]``)."""
    right = total = 0
    for a, b in pairs:
        right += counts[a][a] + counts[b][b]
        total += counts[a][a] + counts[a][b] + counts[b][a] + counts[b][b]
    return right / total if total else float("nan")


def param_groups(model, lr: float, relay_lr_scale: float) -> list[dict]:
    """AdamW groups: the relay parameters (tokens, their projections) at ``relay_lr_scale``
    times ``lr``, the rest at ``lr``; each group keeps its scale for the schedule."""
    relay = [p for n, p in model.named_parameters() if "relay" in n]
    rest = [p for n, p in model.named_parameters() if "relay" not in n]
    groups = [{"params": rest, "scale": 1.0}]
    if relay:
        groups.append({"params": relay, "scale": relay_lr_scale})
    return [dict(g, lr=lr * g["scale"]) for g in groups]


def train_model(job: dict, on_check=None):
    """A model trained from scratch as ``job`` says (see :func:`make_job`), in this
    process; ``on_check(step, model)`` is called every ``job["curve_every"]`` steps."""
    import torch

    from relay_models import ModelOptions, RelayLoss, create_model, train_step, warmup_cosine
    from relaymap.flows.dataset import Augment, data_spec
    from relaymap.ingest import open_scene

    train_urls = job["train"]
    options = {"name": job["model"], "factor": job.get("factor", 4), **job["model_options"]}
    spec = data_spec(
        [open_scene(u) for u in train_urls],
        window_px=job["window_px"],
        factor=ModelOptions(**options).global_factor,
    )
    optim = job.get("optim_options", {})
    torch.manual_seed(job["seed"])
    model = create_model(**options, num_classes=spec.num_classes, in_chans=4, spec=spec)
    if optim.get("fresh_relays"):  # the relay parameters as a model without them starts
        from relay_models.weights import NEW_KEY

        torch.manual_seed(job["seed"])
        fresh = create_model(
            **{**options, "pretrained": None}, num_classes=spec.num_classes, in_chans=4
        )
        state = {
            k: v
            for k, v in fresh.backbone.state_dict().items()
            if NEW_KEY.match(k) and not k.startswith("patch_embed_global.")
        }
        model.backbone.load_state_dict(state, strict=False)
        glob = model.backbone.patch_embed_global  # as load_pretrained starts it: a copy
        if glob is not None:
            glob.load_state_dict(model.backbone.patch_embed.state_dict())
    loss_fn = RelayLoss(factor=spec.factor or 1, **job["loss_options"])
    groups = param_groups(model, job["lr"], optim.get("relay_lr_scale", 1.0))
    optimizer = torch.optim.AdamW(groups, lr=job["lr"], weight_decay=0.0)
    data = _pairs_in_memory()(train_urls, spec, augment=Augment(), seed=job["seed"])
    batches = iter(torch.utils.data.DataLoader(data, batch_size=job["batch"]))
    warmup = optim.get("warmup", 0.05)
    model.train()
    for step in range(job["steps"]):
        lr = warmup_cosine(step, job["steps"], job["lr"], warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        train_step(model, next(batches), loss_fn, optimizer)
        every = job.get("curve_every") or 0
        if on_check is not None and every and ((step + 1) % every == 0 or step == 0):
            on_check(step + 1, model)
    return model.eval()


def run_pretrain(job: dict) -> dict:
    """Pretrain ``job["model"]``'s backbone with SimMIM on ``job["stores"]`` without their
    labels (the plain-PyTorch loop of ``relay_models.pretraining``, the calls the Ray Train
    worker of ``relaymap pretrain`` makes), one thread; save the checkpoint to
    ``job["path"]``."""
    import torch

    from relay_models import ModelOptions, create_model, warmup_cosine
    from relay_models.pretraining import MaskedImageModel, pretrain_step, save_backbone
    from relaymap.flows.dataset import UNLABELLED, Augment, data_spec
    from relaymap.ingest import open_scene

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    options = {"name": job["model"], "factor": job["factor"]}
    spec = data_spec(
        [open_scene(u) for u in job["stores"]],
        window_px=job["window_px"],
        factor=ModelOptions(**options).global_factor,
        classes=UNLABELLED,
    )
    torch.manual_seed(job["seed"])
    model = create_model(**options, num_classes=1, in_chans=4, spec=spec)
    mim = MaskedImageModel(model)
    optimizer = torch.optim.AdamW(mim.parameters(), lr=job["lr"], weight_decay=0.05)
    data = _pairs_in_memory()(
        job["stores"], spec, augment=Augment(), seed=job["seed"], labels=False
    )
    batches = iter(torch.utils.data.DataLoader(data, batch_size=job["batch"]))
    masks = torch.Generator().manual_seed(job["seed"])
    curve = []
    mim.train()
    for step in range(job["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, job["steps"], job["lr"], 0.05)
        terms = pretrain_step(mim, next(batches), optimizer, generator=masks, grad_clip=5.0)
        if (step + 1) % 50 == 0 or step == 0:
            curve.append({"step": step + 1, "loss": terms.total.item()})
    Path(job["path"]).parent.mkdir(parents=True, exist_ok=True)
    save_backbone(model, job["path"], {"model": options, "method": "simmim", "steps": job["steps"]})
    return {
        "kind": "pretrain",
        "seed": job["seed"],
        "model": job["model"],
        "steps": job["steps"],
        "scenes": len(job["stores"]),
        "path": job["path"],
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def _curve_tiles(urls: list[str], spec, n: int, seed: int) -> list[dict]:
    """A fixed random subset of ``n`` held-out tiles, read once (learning curves)."""
    import numpy as np
    import torch

    from relaymap.flows.dataset import TileDataset

    tiles = TileDataset(urls, spec)
    pick = np.random.default_rng([seed, 7]).permutation(len(tiles))[:n]
    batch = [tiles[int(i)] for i in sorted(pick)]
    return [
        {k: torch.stack([b[k] for b in batch[i : i + 64]]) for k in batch[0]}
        for i in range(0, len(batch), 64)
    ]


def run_one(job: dict) -> dict:
    """Train one model from scratch and score it on the held-out stores (one thread)."""
    import torch

    from relay_models import evaluate
    from relaymap.flows.dataset import TileDataset

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    _, pairs = class_names(job.get("family", "context"))
    curve: list[dict] = []
    subset: list[dict] = []

    def check(step: int, model) -> None:
        if not subset:
            subset.extend(_curve_tiles(job["test"], model.spec, job["curve_tiles"], job["seed"]))
        cm = evaluate(model, subset, model.num_classes)
        counts = cm.counts.tolist()
        curve.append(
            {
                "step": step,
                "iou": cm.iou().nan_to_num(0).tolist(),
                "ctx_acc": context_accuracy(counts, pairs),
            }
        )

    model = train_model(job, check)
    tiles = TileDataset(job["test"], model.spec)
    cm = evaluate(model, torch.utils.data.DataLoader(tiles, batch_size=64), model.num_classes)
    counts = cm.counts.tolist()
    return {
        "label": job["label"],
        "seed": job["seed"],
        "budget": job.get("budget", 1),
        "steps": job["steps"],
        "miou": cm.miou(),
        "iou": cm.iou().nan_to_num(0).tolist(),
        "ctx_acc": context_accuracy(counts, pairs),
        "counts": counts,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------- the command line


def parser(description: str) -> argparse.ArgumentParser:
    """The data and training options (shared with ``bench/overlap.py``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--family", choices=FAMILIES, default="context")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--scenes", type=int, default=6, help="2 of them are held out")
    p.add_argument("--size-px", type=int, default=None, help="scene side; default 768, sparse 1024")
    p.add_argument("--window-px", type=int, default=32)
    p.add_argument("--factor", type=int, default=4, help="global window side / local")
    p.add_argument("--feature-px", type=int, default=96, help="park/forest size, river width")
    p.add_argument("--houses", type=int, default=300, help="small buildings per scene")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    return p


def make_job(
    args,
    urls: list[str],
    seed: int,
    label: str,
    model: str,
    mo=None,
    lo=None,
    oo=None,
    budget: int = 1,
    pretrained: str | None = None,
) -> dict:
    """One training run: ``model`` with model options ``mo``, loss options ``lo`` and
    optimiser options ``oo``, for ``budget`` times ``args.steps`` steps; ``pretrained``: from
    that backbone checkpoint (label prefixed ``pretrained: ``, lr ``args.ft_lr``)."""
    if pretrained:
        label, mo = f"{PRETRAINED}{label}", {**(mo or {}), "pretrained": pretrained}
    lr = getattr(args, "ft_lr", None) if pretrained else None
    return dict(
        label=label,
        family=getattr(args, "family", "context"),
        model=model,
        model_options=mo or {},
        loss_options=lo or {},
        optim_options=oo or {},
        seed=seed,
        budget=budget,
        factor=args.factor,
        train=urls[:-2],
        test=urls[-2:],
        window_px=args.window_px,
        steps=budget * args.steps,
        batch=args.batch,
        lr=lr or args.lr,
        curve_every=getattr(args, "curve_every", 0),
        curve_tiles=getattr(args, "curve_tiles", 256),
    )


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="1", help="multiples of --steps, e.g. 1,3")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument(
        "--long-models",
        default=None,
        help="the models (labels) run at budgets above 1; default: all of them",
    )
    p.add_argument("--variants", default="", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument(
        "--tuned-variants", default="", help="variants run only from the pretrained backbone"
    )
    p.add_argument("--ablations", action="store_true", help="also the relay ablations")
    p.add_argument("--curve-every", type=int, default=0, help="score held-out tiles every N")
    p.add_argument("--curve-tiles", type=int, default=256)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--json", default=None, help="also write every run's scores here")
    p.add_argument(
        "--resume", action="store_true", help="keep the runs already in --json, run the rest"
    )
    p.add_argument("--relay", default=RELAY, help="the run label the comparisons are about")
    p.add_argument("--plot", default=None, help="learning curves of the context decision (PNG)")
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="per seed, pretrain one backbone (SimMIM, --pretrain-model) on the seed's "
        "training scenes and --extra-scenes more, without labels, and fine-tune every model "
        "from it too (labels 'pretrained: <model>')",
    )
    p.add_argument("--no-scratch", action="store_true", help="with --pretrain: no scratch runs")
    p.add_argument("--pretrain-model", default=RELAY)
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--extra-scenes", type=int, default=4, help="unlabelled scenes per seed")
    p.add_argument("--ft-lr", type=float, default=None, help="fine-tuning lr (default --lr)")
    p.add_argument(
        "--pretrain-dir", default=None, help="where checkpoints go (default: beside --json)"
    )
    args = p.parse_args()
    args.size_px = scene_px(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    variants = [(m, m, {}, {}, {}) for m in args.models.split(",") if m]
    for name in filter(None, args.variants.split(",")):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        variants.append((name, *VARIANTS[name]))
    if args.ablations:
        variants += [(f"relay: {k}", RELAY, mo, lo, {}) for k, (mo, lo) in ABLATIONS.items()]
    tuned_only = []
    for name in filter(None, args.tuned_variants.split(",")):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        tuned_only.append((name, *VARIANTS[name]))
    long = set(args.long_models.split(",")) if args.long_models else None
    t0 = time.perf_counter()
    runs, pretrains, before = [], [], 0.0
    if args.resume and args.json and Path(args.json).exists():
        doc = json.loads(Path(args.json).read_text())
        same = ("family", "factor", "steps", "batch", "lr", "window_px", "size_px", "scenes")
        changed = [k for k in same if doc["args"].get(k) != getattr(args, k)]
        if changed:
            raise SystemExit(f"--resume: {args.json} was run with other {', '.join(changed)}")
        runs, before = doc["runs"], doc.get("minutes", 0.0)
        pretrains = [r for r in doc.get("pretrains", []) if Path(r["path"]).exists()]
    done = {(r["label"], r["seed"], r["budget"]) for r in runs}
    pretrained_at = {r["seed"]: r["path"] for r in pretrains}
    ckpt_dir = Path(
        args.pretrain_dir or (Path(args.json).with_suffix(".pretrained") if args.json else ".")
    )
    with tempfile.TemporaryDirectory() as tmp:
        first, later = [], {}  # jobs to run now; per seed, the jobs that need its backbone
        for seed in seeds:
            todo = [
                (b, v) for b in budgets for v in variants if b == 1 or long is None or v[0] in long
            ]
            scratch = [] if args.pretrain and args.no_scratch else todo
            scratch = [(b, v) for b, v in scratch if (v[0], seed, b) not in done]
            tuned = todo + [(1, v) for v in tuned_only]
            tuned = [(b, v) for b, v in tuned if (PRETRAINED + v[0], seed, b) not in done]
            if not args.pretrain:
                tuned = []
            if not (scratch or tuned):
                continue
            extra = args.extra_scenes if tuned and seed not in pretrained_at else 0
            urls = make_stores(Path(tmp) / f"seed-{seed}", args, seed, extra=extra)
            labelled = urls[: args.scenes]
            first += [make_job(args, labelled, seed, *v, budget=b) for b, v in scratch]
            if not tuned:
                continue
            later[seed] = lambda path, labelled=labelled, seed=seed, tuned=tuned: [
                make_job(args, labelled, seed, *v, budget=b, pretrained=path) for b, v in tuned
            ]
            if seed not in pretrained_at:
                first.insert(
                    0,
                    {
                        "kind": "pretrain",
                        "seed": seed,
                        "model": args.pretrain_model,
                        "factor": args.factor,
                        "stores": labelled[:-2] + urls[args.scenes :],
                        "window_px": args.window_px,
                        "steps": args.pretrain_steps,
                        "batch": args.batch,
                        "lr": args.pretrain_lr,
                        "path": str(ckpt_dir / f"{args.family}-seed{seed}.safetensors"),
                    },
                )
        first[sum(j.get("kind") == "pretrain" for j in first) :] = sorted(
            (j for j in first if j.get("kind") != "pretrain"), key=lambda j: -j["budget"]
        )  # pretraining first (the fine-tunes wait for it), then the longest runs
        for seed in [s for s in later if s in pretrained_at]:
            first += later.pop(seed)(pretrained_at[seed])

        def finished(r: dict) -> list[dict]:
            """Record a finished job; the jobs it unlocks."""
            if r.get("kind") == "pretrain":
                pretrains.append(r)
                print(
                    f"  pretrained {r['model']} seed {r['seed']}: {r['steps']} steps on "
                    f"{r['scenes']} unlabelled scenes, loss {r['curve'][0]['loss']:.3f} -> "
                    f"{r['curve'][-1]['loss']:.3f} ({r['seconds']:.0f} s)",
                    flush=True,
                )
                unlocked = later.pop(r["seed"])(r["path"])
            else:
                runs.append(r)
                print(
                    f"  {r['label']:<44} seed {r['seed']} x{r['budget']}: mIoU "
                    f"{100 * r['miou']:.1f} context acc {100 * r['ctx_acc']:.1f} "
                    f"({r['seconds']:.0f} s)",
                    flush=True,
                )
                unlocked = []
            if args.json:  # after every run: a long benchmark survives an interruption
                _write(args, runs, before + (time.perf_counter() - t0) / 60, pretrains)
            return unlocked

        _run_jobs(first, finished, args.jobs)
    minutes = before + (time.perf_counter() - t0) / 60
    if args.json:
        _write(args, runs, minutes, pretrains)
    report(vars(args), runs, minutes)
    if args.plot:
        plot_curves(vars(args), runs, args.plot)


def _run_jobs(jobs: list[dict], finished, workers: int) -> None:
    """Run ``jobs`` (training or pretraining) ``workers`` at a time in spawned processes,
    in order; ``finished(result)`` returns jobs to queue next (fine-tunes of a backbone)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    spawn = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        queue, running = list(jobs), set()
        while queue or running:
            while queue and len(running) < workers:
                job = queue.pop(0)
                running.add(pool.submit(run_pretrain if job.get("kind") else run_one, job))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                unlocked = sorted(finished(future.result()), key=lambda j: -j["budget"])
                queue = unlocked + queue  # a backbone's runs go first, the longest first


def _write(args, runs: list[dict], minutes: float, pretrains: list[dict] = ()) -> None:
    doc = {"args": vars(args), "minutes": minutes, "runs": runs, "pretrains": list(pretrains)}
    Path(args.json).write_text(json.dumps(doc, indent=1))


# ---------------------------------------------------------------- reports


def _mean_sd(values: list[float], scale: float = 100.0) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.1f} ± {scale * sd:.1f}"


def _signed(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):+.1f} ± {100 * sd:.1f}"


def step_to_80(run: dict, chance: float = 0.0) -> int | None:
    """First curve step whose context accuracy reaches 80% of the curve's last value
    (``chance`` 0: the issue's definition), or 80% of the way from ``chance`` to it (None
    when the last value is not 5 points above chance: no context was learnt)."""
    curve = run.get("curve") or []
    if not curve:
        return None
    final = curve[-1]["ctx_acc"]
    if chance and final < chance + 0.05:
        return None
    return next(c["step"] for c in curve if c["ctx_acc"] >= chance + 0.8 * (final - chance))


def report(args: dict, runs: list[dict], minutes: float) -> None:
    """Markdown tables per budget: mean ± sd over seeds per model and variant; the changes
    from :data:`RELAY` paired by seed; steps to 80% of the final context accuracy; the
    targets (sparse family)."""
    family = args.get("family", "context")
    names, pairs = class_names(family)
    context = sorted({i for pair in pairs for i in pair})
    for r in runs:
        r.setdefault("budget", 1)
        r["context"] = sum(r["iou"][i] for i in context) / len(context)
        if "counts" in r:
            r["ctx_acc"] = context_accuracy(r["counts"], pairs)
    factor = args.get("factor", 4)
    print(
        f"\n# family {family}: {args['steps']} steps (x budget) x batch {args['batch']}, lr "
        f"{args['lr']} warm-up + cosine, local {args['window_px']} px + global "
        f"{factor * args['window_px']}↓{factor}, {args['scenes'] - 2} training / 2 held-out "
        f"{args['size_px']} px scenes per seed, seeds {args['seeds']}; mean ± sd over seeds; "
        f"{minutes:.1f} min"
    )
    relay = args.get("relay", RELAY)
    for budget in sorted({r["budget"] for r in runs}):
        mine = [r for r in runs if r["budget"] == budget]
        _report_budget(mine, names, budget, family, relay)
    _report_gains(runs)


def _report_gains(runs: list[dict]) -> None:
    """Per model and budget: mIoU from scratch, from the pretrained backbone, and the gain
    paired by seed (``--pretrain`` runs; variants have no scratch twin and are left out)."""
    miou = {(r["label"], r["seed"], r["budget"]): r["miou"] for r in runs}
    pairs: dict[tuple[str, int], list[int]] = {}
    for label, seed, budget in miou:
        scratch = label.removeprefix(PRETRAINED)
        if label.startswith(PRETRAINED) and (scratch, seed, budget) in miou:
            pairs.setdefault((scratch, budget), []).append(seed)
    if not pairs:
        return
    print("\nmIoU from scratch and from the pretrained backbone (paired by seed):\n")
    print("| model | budget | from scratch | pretrained | pretraining gain |")
    print("|---|---:|---:|---:|---:|")
    for (scratch, budget), seeds in sorted(pairs.items(), key=lambda kv: kv[0][::-1]):
        a = [miou[(scratch, s, budget)] for s in sorted(seeds)]
        p = [miou[(PRETRAINED + scratch, s, budget)] for s in sorted(seeds)]
        gain = _signed([y - x for x, y in zip(a, p, strict=True)])
        print(f"| {scratch} | x{budget} | {_mean_sd(a)} | {_mean_sd(p)} | {gain} |")


def _report_budget(
    runs: list[dict], names: list[str], budget: int, family: str, relay: str
) -> None:
    labels = list(dict.fromkeys(r["label"] for r in runs))
    has_acc = all("ctx_acc" in r for r in runs)
    print(f"\n## budget x{budget} ({runs[0].get('steps', '?')} steps)\n")
    head = "| model | mIoU | context IoU | " + ("context acc | " if has_acc else "")
    print(head + " | ".join(names) + " |")
    print("|---|---:|---:|" + ("---:|" if has_acc else "") + "---:|" * len(names))
    by = {lb: [r for r in runs if r["label"] == lb] for lb in labels}
    for label in labels:
        rs = by[label]
        cells = [_mean_sd([r["miou"] for r in rs]), _mean_sd([r["context"] for r in rs])]
        if has_acc:
            cells.append(_mean_sd([r["ctx_acc"] for r in rs]))
        cells += [_mean_sd([r["iou"][k] for r in rs]) for k in range(len(names))]
        print(f"| {label.removeprefix('relay: ')} | " + " | ".join(cells) + " |")
    base = {r["seed"]: r for r in by.get(relay, [])}
    if not base:
        return
    print(f"\nPaired by seed, {relay} minus each other model:\n")
    head = " | ".join(f"seed {s}" for s in sorted(base))
    print(f"| other | mIoU {head} | mIoU mean ± sd | context acc mean ± sd |")
    print("|---|" + "---:|" * (len(base) + 2))
    for label in labels:
        if label == relay:
            continue
        rs = {r["seed"]: r for r in by[label] if r["seed"] in base}
        d = [base[s]["miou"] - rs[s]["miou"] for s in sorted(rs)]
        cells = [
            f"{100 * (base[s]['miou'] - rs[s]['miou']):+.1f}" if s in rs else "-"
            for s in sorted(base)
        ]
        acc = [base[s]["ctx_acc"] - rs[s]["ctx_acc"] for s in sorted(rs)] if has_acc else []
        line = f"| {label.removeprefix('relay: ')} | " + " | ".join(cells)
        print(line + f" | **{_signed(d)}** | {_signed(acc) if acc else '-'} |")
    if all(r.get("curve") for r in runs):
        print(
            "\nStep at which the context accuracy first reaches 80% of its final value (the "
            "issue's definition; a model that stays at chance 'reaches' it at once), and 80% "
            "of the way from chance (50%) to its final value ('-': never 5 points above "
            "chance):\n"
        )
        seeds = sorted(base)
        head = " | ".join(f"seed {s}" for s in seeds)
        print(f"| model | {head} | mean | from chance: {head} | mean |")
        print("|---|" + "---:|" * (2 * len(seeds) + 2))
        for label in labels:
            cells = []
            for chance in (0.0, 0.5):
                steps = {r["seed"]: step_to_80(r, chance) for r in by[label]}
                cells += [str(steps.get(s) or "-") for s in seeds]
                got = [v for v in steps.values() if v is not None]
                cells.append(f"{statistics.fmean(got):.0f}" if got else "-")
            print(f"| {label.removeprefix('relay: ')} | " + " | ".join(cells) + " |")
    if family == "sparse" or PRETRAINED + relay in by:
        print_targets(by, names, relay)
    if PRETRAINED + relay in by:
        print_targets(by, names, relay, pretrained=True)


def print_targets(
    by: dict[str, list[dict]], names: list[str], relay_label: str, *, pretrained: bool = False
) -> None:
    """The issues' target lines: relay minus fusion and sliding window (mIoU), relay's
    context accuracy minus the global-only model's (paired by seed), and relay's worst class
    against the better of sliding window and global-only (mean IoU over seeds); with
    ``pretrained``, of the runs fine-tuned from a pretrained backbone, and the pretraining
    gain (relay from the pretrained start minus relay from scratch)."""
    pre = PRETRAINED if pretrained else ""
    need = (relay_label, "swinv2_nano_fusion", "swinv2_nano", "swinv2_nano_downsample")
    if not all(by.get(pre + m) for m in need):
        return
    scratch = {r["seed"]: r for r in by.get(relay_label, [])}
    by = {k.removeprefix(pre): v for k, v in by.items() if k.startswith(pre)}
    relay = {r["seed"]: r for r in by[relay_label]}

    def paired(other: str, key: str) -> str:
        rs = {r["seed"]: r for r in by[other] if r["seed"] in relay}
        return _signed([relay[s][key] - rs[s][key] for s in sorted(rs)])

    def mean_iou(label: str, k: int) -> float:
        return statistics.fmean(r["iou"][k] for r in by[label])

    gaps = {
        names[k]: mean_iou(relay_label, k)
        - max(mean_iou("swinv2_nano", k), mean_iou("swinv2_nano_downsample", k))
        for k in range(len(names))
    }
    worst = min(gaps.values())
    text = "pretrained relay" if pretrained else "relay"
    print(f"\nTargets ({text} = {pre}{relay_label}):\n")
    print(f"{text} - fusion: {paired('swinv2_nano_fusion', 'miou')}\n")
    print(f"{text} - sliding window: {paired('swinv2_nano', 'miou')}\n")
    acc = paired("swinv2_nano_downsample", "ctx_acc")
    print(f"{text} context accuracy - global-only: {acc}\n")
    print(f"{text} worst class vs best single view: {100 * worst:+.1f}")
    print("\n(per class: " + ", ".join(f"{k} {100 * v:+.1f}" for k, v in gaps.items()) + ")")
    if pretrained and scratch:
        gain = [relay[s]["miou"] - scratch[s]["miou"] for s in sorted(relay) if s in scratch]
        print(f"\npretraining gain for relay: {_signed(gain)}")


def plot_curves(args: dict, runs: list[dict], path: str) -> None:
    """Context-decision accuracy and the context classes' IoU against steps, one panel per
    budget, a line per model (mean over seeds, each seed faint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, pairs = class_names(args.get("family", "context"))
    context = sorted({i for pair in pairs for i in pair})
    runs = [r for r in runs if r.get("curve")]
    budgets = sorted({r["budget"] for r in runs})
    fig, axes = plt.subplots(
        len(context) + 1,
        len(budgets),
        figsize=(6 * len(budgets), 3.2 * (len(context) + 1)),
        squeeze=False,
    )
    labels = list(dict.fromkeys(r["label"] for r in runs))
    palette = plt.cm.tab10.colors if len(labels) <= 10 else plt.cm.tab20.colors
    colours = dict(zip(labels, palette, strict=False))
    for col, budget in enumerate(budgets):
        for label in labels:
            rs = [r for r in runs if r["label"] == label and r["budget"] == budget]
            if not rs:
                continue
            steps = [c["step"] for c in rs[0]["curve"]]
            rows = [("ctx_acc", "context-decision accuracy")]
            rows += [(k, f"IoU {names[k]}") for k in context]
            for row, (key, title) in enumerate(rows):
                ax = axes[row][col]
                series = [
                    [c[key] if key == "ctx_acc" else c["iou"][key] for c in r["curve"]] for r in rs
                ]
                for s in series:
                    ax.plot(steps, s, color=colours[label], alpha=0.25, lw=0.8)
                mean = [statistics.fmean(v) for v in zip(*series, strict=True)]
                ax.plot(steps, mean, color=colours[label], lw=2, label=label)
                ax.set_title(f"{title}, budget x{budget}")
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"\nlearning curves: {path}")


def _from_json(path: str, plot: str | None) -> None:
    doc = json.loads(Path(path).read_text())
    report(doc["args"], doc["runs"], doc.get("minutes", float("nan")))
    if plot:
        plot_curves(doc["args"], doc["runs"], plot)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--report":
        # the tables again from a --json file (and the curves: --plot PATH)
        _from_json(sys.argv[2], sys.argv[4] if sys.argv[3:4] == ["--plot"] else None)
    else:
        main()
