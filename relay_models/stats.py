"""Parameter and FLOP counts, computed on the meta device (no memory, no weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .factory import create_model


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of one forward pass of a model on one ``side_px`` window (pair)."""

    name: str
    params: int
    gflops: float


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, side_px: int = 256, batch: int = 1) -> float:
    """Forward FLOPs (multiply-add = 2) at ``side_px``, counted by ``torch.utils.flop_counter``.

    Two-window models get both windows, as they run in training and inference.
    """
    p = next(model.parameters())
    x = torch.zeros(
        batch, model.backbone.in_chans, side_px, side_px, device=p.device, dtype=p.dtype
    )
    with FlopCounterMode(display=False) as counter:
        model(x, x) if model.takes_global else model(x)
    return float(counter.get_total_flops())


def model_stats(
    name: str, *, num_classes: int = 10, side_px: int = 256, flops: bool = True
) -> ModelStats:
    """Params and GFLOPs of a registered model, built on the meta device."""
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes)
    gflops = count_flops(model, side_px) / 1e9 if flops else float("nan")
    return ModelStats(name, count_params(model), gflops)
