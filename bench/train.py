"""Training throughput: data loading alone vs model alone vs both, per model.

    python bench/train.py [--window-px 64] [--batch 8] [--seconds 20] [--loader-workers 0]

Writes two 512 px sample scene stores to a temporary folder, then for swinv2_nano
(sliding window: local windows only) and swinv2_nano_relay (local + global windows)
measures, side by side in one process: the DataLoader alone (random window pairs with
rescale/rotation, as in training), the model alone (forward, loss, backward, AdamW step on
a batch already in memory) and the training step with both. The data path must not be the
bottleneck: loader samples/s >= 2x model samples/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_stores(root: Path) -> list[str]:
    from relaymap.ingest import ingest_items, make_sample_scenes

    col = make_sample_scenes(str(root / "sample"), n_scenes=2, size_px=512, feature_px=64)
    bands = ["blue", "green", "red", "nir"]
    return [ingest_items([it], str(root / f"{it.id}.zarr"), bands).url for it in col.get_items()]


def rate(fn, seconds: float, batch: int) -> float:
    """Samples per second of ``fn`` (one batch per call) over about ``seconds``."""
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window-px", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="DataLoader workers (the training default is 0)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_stores(Path(tmp))
        print(
            f"# CPU, {torch.get_num_threads()} threads; window {args.window_px} px; "
            f"batch {args.batch}; loader workers {args.loader_workers}"
        )
        print(f"{'model':<20}{'loader':>10}{'model':>10}{'train':>10}{'loader/model':>14}")
        for name in ("swinv2_nano", "swinv2_nano_relay"):
            r_load, r_model, r_train = measure(name, urls, args)
            print(
                f"{name:<20}{r_load:>10.1f}{r_model:>10.1f}{r_train:>10.1f}"
                f"{r_load / r_model:>13.1f}x"
            )


def measure(name: str, urls: list[str], args) -> tuple[float, float, float]:
    """Samples/s of the loader alone, the model step alone, and both, for one model."""
    import torch

    from relay_models import RelayLoss, create_model, train_step
    from relay_models.registry import takes_global
    from relaymap.flows.dataset import WindowPairDataset, data_spec
    from relaymap.ingest import open_scene

    torch.manual_seed(0)
    factor = 4 if takes_global(name) else None
    spec = data_spec([open_scene(u) for u in urls], window_px=args.window_px, factor=factor)
    model = create_model(name, num_classes=6, in_chans=4, spec=spec)
    data = WindowPairDataset(urls, spec, seed=0)
    loader = iter(
        torch.utils.data.DataLoader(data, batch_size=args.batch, num_workers=args.loader_workers)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    loss_fn = RelayLoss(factor=factor or 1)
    fixed = next(loader)

    def step(batch):
        train_step(model, batch, loss_fn, opt)

    return (
        rate(lambda: next(loader), args.seconds, args.batch),
        rate(lambda: step(fixed), args.seconds, args.batch),
        rate(lambda: step(next(loader)), args.seconds, args.batch),
    )


if __name__ == "__main__":
    main()
