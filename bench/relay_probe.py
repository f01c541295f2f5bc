"""Where a relay model loses the context: linear probes, attention and swap tests over training.

    python bench/relay_probe.py [--family sparse] [--factor 8] [--seed 0] [--steps 400]
                                [--every 50] [--model swinv2_nano_relay]
                                [--model-options JSON] [--loss-options JSON]
                                [--optim-options JSON] [--json out.json]
                                [context.py data options]

Trains one model as ``bench/context.py`` does and, every ``--every`` steps, looks at a fixed
set of held-out tiles whose local window is mostly one class of the context pair (sparse
family: ``field_a`` or ``field_b``), labelled by that class:

* ``pred``: context-decision accuracy of the model's local prediction on those tiles;
* ``probe ...``: accuracy of a linear probe (ridge classifier on standardised features,
  2-fold cross-validation over tiles) for the tile's context label, from the global
  branch's last-stage tokens (mean over the window), the relays after each block's global
  step and local step (``relays g<i>`` / ``relays l<i>``) and the local branch's last-stage
  tokens: the chain the context must travel, global tokens -> relays -> local tokens ->
  prediction;
* ``rms g<i>``: the relays' root mean square after block i's global step (the patch
  tokens' is about 1: every patch merging ends in a LayerNorm);
* ``spread g<i>``: how much of the relays after block i's global step varies from tile to
  tile (RMS over channels of the standard deviation over tiles, over the relays' RMS): a
  probe sees a signal whatever its size, the next block only if it is not buried under
  the relays' constant part;
* ``reads``: the share of the local (and global) patches' attention that goes to the relays,
  per block (:func:`relay_models.relay_read_shares`);
* ``swap``: the share of context-pair pixels whose decision flips when each tile gets the
  global window of a tile of the other label (0: the global window is not used at all).

``--readout`` (a diagnostic, not a model option): the final relays of the local step, averaged,
are added to the local branch's last feature map before the head, a direct path from the
relays to the prediction that skips the local blocks' reading of them.

Prints one row per check; ``--json`` keeps them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from context import class_names, make_job, make_stores, parser, train_model  # noqa: E402


def ridge_probe(x, y, lam: float = 10.0) -> float:
    """2-fold cross-validated accuracy of a ridge classifier on standardised ``x`` ``(n, d)``
    for binary ``y`` ``(n,)``."""
    import torch

    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    folds = [perm[: n // 2], perm[n // 2 :]]
    right = 0
    for k in (0, 1):
        tr, te = folds[k], folds[1 - k]
        mu, sd = x[tr].mean(0), x[tr].std(0).clamp(min=1e-6)
        a, b = (x[tr] - mu) / sd, (x[te] - mu) / sd
        a = torch.cat([a, torch.ones(len(a), 1)], 1).double()
        b = torch.cat([b, torch.ones(len(b), 1)], 1).double()
        t = (2.0 * y[tr] - 1).double()
        w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)
        right += int(((b @ w > 0).long() == y[te]).sum())
    return right / n


def probe_tiles(urls: list[str], spec, pair: tuple[int, int], n: int) -> dict:
    """Up to ``n`` held-out tiles whose local window is at least 60% one class of ``pair``,
    half of each where possible: stacked ``local``, ``global``, ``labels`` and ``y``."""
    import numpy as np
    import torch

    from relaymap.flows.dataset import TileDataset

    tiles = TileDataset(urls, spec)
    order = np.random.default_rng(3).permutation(len(tiles))
    keep: dict[int, list[dict]] = {0: [], 1: []}
    for i in order:
        t = tiles[int(i)]
        share = [(t["labels"] == c).float().mean().item() for c in pair]
        y = int(np.argmax(share))
        if share[y] >= 0.6 and len(keep[y]) < n // 2:
            keep[y].append({**t, "y": torch.tensor(y)})
        if all(len(v) >= n // 2 for v in keep.values()):
            break
    batch = keep[0] + keep[1]
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def _decision(logits, pair):
    """Per pixel: 1 where the ``pair[1]`` logit beats the ``pair[0]`` one."""
    return (logits[:, pair[1]] > logits[:, pair[0]]).long()


def look(model, tiles: dict, pair: tuple[int, int]) -> dict:
    """The row of one check (see the module docstring)."""
    import torch

    from relay_models import relay_read_shares
    from relay_models.swin_transformer_v2 import SwinTransformerV2Block

    was = model.training
    model.eval()
    local, glob, labels, y = tiles["local"], tiles["global"], tiles["labels"], tiles["y"]
    in_pair = (labels == pair[0]) | (labels == pair[1])
    truth = (labels == pair[1]).long()
    row: dict = {}
    relays: list = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: relays.append(out[1]))
        for m in model.modules()
        if isinstance(m, SwinTransformerV2Block)
    ]
    try:
        with torch.no_grad():
            out = model(local, glob)
    finally:
        for h in hooks:
            h.remove()
    dec = _decision(out.local, pair)
    row["pred"] = float((dec == truth)[in_pair].float().mean())
    bb = model.backbone
    with torch.no_grad():
        feats = bb.forward_branches(
            {"global": glob, "local": local}, relay_mode=getattr(model, "relay_mode", None)
        )
    row["probe global tokens"] = ridge_probe(feats["global"][-1].mean((2, 3)), y)
    if relays and relays[0] is not None:
        for i in range(len(relays) // 2):
            for j, branch in enumerate("gl"):
                r = relays[2 * i + j]
                row[f"probe relays {branch}{i}"] = ridge_probe(r.flatten(1), y)
            # their size, and how much of it varies with the window
            r = relays[2 * i]
            row[f"rms g{i}"] = float(r.pow(2).mean().sqrt())
            row[f"spread g{i}"] = float(r.std(0).pow(2).mean().sqrt() / r.pow(2).mean().sqrt())
        row.update(
            {
                f"reads {k}": v.round(4).tolist()
                for k, v in relay_read_shares(model, local, glob).items()
            }
        )
    row["probe local tokens"] = ridge_probe(feats["local"][-1].mean((2, 3)), y)
    # swap: each tile gets the global window of a tile of the other label
    n0, n1 = int((y == 0).sum()), int((y == 1).sum())  # tiles come sorted by label
    idx = torch.cat([n0 + torch.arange(n0) % n1, torch.arange(n1) % n0])
    with torch.no_grad():
        swapped = _decision(model(local, glob[idx]).local, pair)
    row["swap"] = float((swapped != dec)[in_pair].float().mean())
    model.train(was)
    return row


def add_readout() -> None:
    """Patch ``RelaySegmenter.forward`` (this process only): local features + mean of the final
    relays of the local step, broadcast over the last stage's map."""
    from relay_models.segmenter import RelayOutput, RelaySegmenter

    def forward(self, local, global_):
        seen: list = []
        last = self.backbone.layers[-1].blocks[-1]
        hook = last.register_forward_hook(lambda _m, _i, out: seen.append(out[1]))
        try:
            feats = self._features(local, global_)
        finally:
            hook.remove()
        loc = [*feats["local"][:-1], feats["local"][-1] + seen[-1].mean(1)[:, :, None, None]]
        glob, out = self.forward_head(feats["global"], loc)
        return RelayOutput(local=out, global_=glob)

    RelaySegmenter.forward = forward


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--tiles", type=int, default=512, help="probe tiles (half of each label)")
    p.add_argument("--model", default="swinv2_nano_relay")
    p.add_argument("--model-options", default="{}", help="JSON, as create_model keywords")
    p.add_argument("--loss-options", default="{}", help="JSON, as RelayLoss keywords")
    p.add_argument("--optim-options", default="{}", help="JSON: relay_lr_scale, warmup")
    p.add_argument("--readout", action="store_true", help="diagnostic: relays -> head directly")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.readout:
        add_readout()
    import tempfile

    import torch

    torch.set_num_threads(1)
    _, pairs = class_names(args.family)
    pair = pairs[0]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_stores(Path(tmp), args, args.seed)
        job = make_job(
            args,
            urls,
            args.seed,
            args.model,
            args.model,
            json.loads(args.model_options),
            json.loads(args.loss_options),
            json.loads(args.optim_options),
        )
        job["curve_every"] = args.every
        tiles: dict = {}
        t0 = time.perf_counter()

        def check(step: int, model) -> None:
            if not tiles:
                tiles.update(probe_tiles(job["test"], model.spec, pair, args.tiles))
            row = {"step": step, **look(model, tiles, pair)}
            rows.append(row)
            short = {k: v for k, v in row.items() if not k.startswith("reads")}
            print(
                f"[{time.perf_counter() - t0:5.0f} s] "
                + " ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in short.items()
                ),
                flush=True,
            )
            print(
                "    reads " + str({k: v for k, v in row.items() if k.startswith("reads")}),
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))

        train_model(job, check)


if __name__ == "__main__":
    main()
