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


#: bf16 against fp32, the one stated tolerance of every engine path's bf16 test: the largest
#: difference of a class probability...
BF16_PROB_ATOL = 0.05
#: ...and the share of pixels given the same class (the small, barely trained models of the
#: tests have many near-ties, which bf16 rounding may flip; a trained model agrees on
#: 99.99% of pixels, ``docs/benchmarks.md`` "Speed")...
BF16_AGREEMENT = 0.95


def assert_bf16_agrees(bf16, fp32, valid=None) -> None:
    """``bf16`` probabilities ``(K, H, W)`` agree with ``fp32``'s within the stated bf16
    tolerance: every probability within :data:`BF16_PROB_ATOL`, classes the same on at least
    :data:`BF16_AGREEMENT` of the pixels and on every pixel whose fp32 class leads the next
    one by more than twice that tolerance (``valid``: the pixels compared)."""
    bf16, fp32 = torch.as_tensor(bf16).float(), torch.as_tensor(fp32).float()
    if valid is not None:
        valid = torch.as_tensor(valid)
        bf16, fp32 = bf16[:, valid], fp32[:, valid]
    diff = (bf16 - fp32).abs().max().item()
    assert diff < BF16_PROB_ATOL, f"bf16 probabilities differ from fp32 by {diff:.3f}"
    same = bf16.argmax(0) == fp32.argmax(0)
    assert same.float().mean() >= BF16_AGREEMENT, f"classes agree on {same.float().mean():.3f}"
    top2 = fp32.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 2 * BF16_PROB_ATOL
    assert same[clear].all(), "bf16 changed a class fp32 gives with a clear margin"
