"""Relay attention maps (the paper's Figure 8): where relay tokens look in each window."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .segmenter import RelayOutput


def _capturing_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "capture")]


@torch.inference_mode()
def relay_attention_maps(
    model: nn.Module, local: torch.Tensor, global_: torch.Tensor
) -> dict[str, np.ndarray]:
    """Average relay-to-patch attention over heads, relays and blocks, per window.

    Each block's map (at its own token grid; for Swin, attention is normalised within each
    window) is upsampled to the input size, then maps are averaged over blocks.

    Args:
        model: a ``_relay`` (or ``_registers``) model.
        local: ``(B, C, L, L)`` local windows.
        global_: ``(B, C, L, L)`` global windows.

    Returns:
        ``{"local": (B, L, L), "global": (B, L, L)}`` float32 arrays (``global`` absent for
        models that never attend to the global window).
    """
    if getattr(model.backbone, "relay_tokens", None) is None:
        raise ValueError("attention maps need a model with relay tokens (a _relay model)")
    blocks = _capturing_blocks(model)
    for blk in blocks:
        blk.capture = []
    try:
        out: RelayOutput = model(local, global_)
        captured = [blk.capture for blk in blocks]
    finally:
        for blk in blocks:
            blk.capture = None
    size = local.shape[-2:]
    # per block, branches run global then local (registers: local only)
    names = ["global", "local"] if out.global_ is not None else ["local"]
    maps: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for caps in captured:
        for name, amap in zip(names, caps, strict=True):
            up = F.interpolate(amap.unsqueeze(1).float(), size=size, mode="nearest")[:, 0]
            maps[name].append(up)
    return {n: torch.stack(m).mean(0).cpu().numpy() for n, m in maps.items()}
