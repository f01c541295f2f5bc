"""Small trained models for inference tests: a few in-process optimiser steps on a store,
saved exactly as training's export saves them (safetensors + the model's data spec)."""

from __future__ import annotations

import itertools

import torch

from relay_models import RelayLoss, create_model, save_model, train_step
from relay_models.registry import takes_global
from relaymap.flows.dataset import WindowPairDataset, data_spec
from relaymap.ingest import open_scene


def quick_model(
    store_url: str,
    path: str,
    *,
    name: str = "swinv2_nano_relay",
    window_px: int = 64,
    steps: int = 5,
    seed: int = 0,
) -> str:
    """Train ``name`` for ``steps`` on ``store_url`` (batch 4) and save it at ``path``."""
    torch.manual_seed(seed)
    store = open_scene(store_url)
    spec = data_spec([store], window_px=window_px, factor=4 if takes_global(name) else None)
    model = create_model(name, num_classes=spec.num_classes, in_chans=spec.in_chans, spec=spec)
    data = WindowPairDataset([store_url], spec, seed=seed)
    loss_fn = RelayLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = iter(data)
    for _ in range(steps):
        items = list(itertools.islice(it, 4))
        batch = {k: torch.stack([x[k] for x in items]) for k in items[0]}
        train_step(model, batch, loss_fn, opt)
    save_model(model, path, step=str(steps))
    return path
