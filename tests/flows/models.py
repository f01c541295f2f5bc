"""Small trained models for inference tests: a few in-process optimiser steps on a store,
saved exactly as training's export saves them (safetensors + relaymap metadata)."""

from __future__ import annotations

import itertools

import torch
from safetensors.torch import save_file

from flows.dataset import WindowPairDataset
from flows.trained import ModelInputs, weights_metadata
from ingest import open_scene
from relay_models import RelayLoss, create_model
from relay_models.config import ModelConfig


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
    config = ModelConfig(name=name, num_classes=len(store.attrs.classes), in_chans=len(store.bands))
    model = create_model(**config.model_dump(exclude={"pretrained"}))
    factor = model.factor if model.takes_global else 0
    data = WindowPairDataset([store_url], window_px=window_px, factor=factor, seed=seed)
    loss_fn = RelayLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = iter(data)
    for _ in range(steps):
        items = list(itertools.islice(it, 4))
        batch = {k: torch.stack([x[k] for x in items]) for k in items[0]}
        out = model(batch["local"], batch["global"]) if factor else model(batch["local"])
        loss = loss_fn(out, batch["labels"]).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    inputs = ModelInputs.of_store(store, window_px)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata=weights_metadata(config, inputs, steps))
    return path
