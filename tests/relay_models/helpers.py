"""Test helpers for models."""

from __future__ import annotations

import torch
from torch import nn


def perturb_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every LayerNorm random non-trivial weights.

    Swin V2 (as timm) initialises its residual post-norms to zero, which makes every block
    an identity map at init: nothing flows through attention, relays included. Tests about
    information flow use weights like a trained model's instead.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def perturb_all(model: nn.Module, seed: int = 0, scale: float = 0.02) -> nn.Module:
    """Add small noise to every parameter (so no weight is at a special init value)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model
