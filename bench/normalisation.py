"""Which normalisation rule: band statistics pooled over the training stores (saved with the
model, the same for every scene it maps) or each scene standardised with its own?

    python bench/normalisation.py [--steps 300] [--seeds 0,1]

The demo's sample scenes: three for training, two held out (labelled). For each rule and
seed, ``swinv2_nano_relay`` trains in this process with ``train_step`` (the demo's recipe:
64 px windows, batch 8, lr 1e-3), then is scored on the held-out scenes' tiles with the
rule's own statistics (pooled: the training spec; per-scene: each held-out scene's). A
third column scores the pooled model with per-scene statistics: how much a model loses
when training and serving disagree (the skew issue 15 found).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from relay_models import RelayLoss, create_model, evaluate, train_step
    from relaymap.flows.dataset import TileDataset, WindowPairDataset, data_spec
    from relaymap.ingest import ingest_items, make_sample_scenes, open_scene

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        col = make_sample_scenes(f"{tmp}/sample", n_scenes=5, size_px=640, feature_px=48)
        items = sorted(col.get_items(), key=lambda i: i.id)
        bands = ["blue", "green", "red", "nir"]
        urls = [ingest_items([it], f"{tmp}/{it.id}.zarr", bands).url for it in items]
        train, held = urls[:3], urls[3:]
        pooled = data_spec([open_scene(u) for u in train], window_px=64, factor=4)

        def own(url):  # per-scene rule: the scene's own statistics
            return data_spec([open_scene(url)], window_px=64, factor=4)

        def fit(seed: int, per_scene: bool):
            torch.manual_seed(seed)
            model = create_model(
                "swinv2_nano_relay", num_classes=pooled.num_classes, in_chans=4, spec=pooled
            )
            specs = [own(u) if per_scene else pooled for u in train]
            streams = [
                iter(WindowPairDataset([u], s, seed=seed + i))
                for i, (u, s) in enumerate(zip(train, specs, strict=True))
            ]
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            loss_fn = RelayLoss(factor=4)
            for step in range(args.steps):
                samples = list(itertools.islice(streams[step % len(streams)], 8))
                batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
                train_step(model, batch, loss_fn, opt)
            return model

        def score(model, per_scene: bool) -> float:
            cms = []
            for url in held:
                tiles = TileDataset([url], own(url) if per_scene else pooled)
                cms.append(
                    evaluate(model, torch.utils.data.DataLoader(tiles, batch_size=8), 6).counts
                )
            from relay_models import ConfusionMatrix

            cm = ConfusionMatrix(6)
            cm.counts = sum(cms)
            return cm.miou()

        print(f"# {args.steps} steps, held-out scenes {[u.rsplit('/', 1)[-1] for u in held]}")
        print(f"{'seed':>4}  {'pooled':>8}  {'per-scene':>10}  {'pooled, served per-scene':>25}")
        for seed in (int(s) for s in args.seeds.split(",")):
            a = fit(seed, per_scene=False)
            b = fit(seed, per_scene=True)
            print(
                f"{seed:>4}  {score(a, False):>8.3f}  {score(b, True):>10.3f}  "
                f"{score(a, True):>25.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
