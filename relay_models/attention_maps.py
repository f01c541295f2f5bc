"""Relay attention maps (the paper's Figure 8): where relay tokens look in each window, and
how much each window's patches listen to the relays."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _capturing_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "capture")]


def _capture(
    model: nn.Module, local: torch.Tensor, global_: torch.Tensor
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Run ``model`` once with every block capturing; per branch, one capture per block."""
    if getattr(model.backbone, "relay_tokens", None) is None:
        raise ValueError("attention maps need a model with relay tokens (a _relay model)")
    blocks = _capturing_blocks(model)
    for blk in blocks:
        blk.capture = []
    try:
        model(local, global_)
        captured = [blk.capture for blk in blocks]
    finally:
        for blk in blocks:
            blk.capture = None
    # per block, branches run global then local; registers, and blocks past the global
    # branch's last (``relay_blocks``), run the local one only
    per_branch: dict[str, list[dict[str, torch.Tensor]]] = {}
    for caps in captured:
        names = ["global", "local"][-len(caps) :]
        for name, cap in zip(names, caps, strict=True):
            per_branch.setdefault(name, []).append(cap)
    return per_branch


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
    size = local.shape[-2:]
    maps = {}
    for name, caps in _capture(model, local, global_).items():
        up = [
            F.interpolate(c["map"].unsqueeze(1).float(), size=size, mode="nearest")[:, 0]
            for c in caps
        ]
        maps[name] = torch.stack(up).mean(0).cpu().numpy()
    return maps


@torch.inference_mode()
def relay_read_shares(
    model: nn.Module, local: torch.Tensor, global_: torch.Tensor
) -> dict[str, np.ndarray]:
    """How much the patches listen to the relays: per branch and block, the share of a patch
    token's attention (summed over the relays, mean over heads, patches and samples) that
    goes to relay tokens. Near 0: that branch ignores what the relays carry.

    Args:
        model: a ``_relay`` (or ``_registers``) model.
        local: ``(B, C, L, L)`` local windows.
        global_: ``(B, C, L, L)`` global windows.

    Returns:
        ``{"local": (n_blocks,), "global": (n_blocks,)}`` float64 shares in [0, 1] (blocks in
        execution order; ``global`` absent as in :func:`relay_attention_maps`).
    """
    return {
        name: np.array([float(c["reads"].double().mean()) for c in caps])
        for name, caps in _capture(model, local, global_).items()
    }
