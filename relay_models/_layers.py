"""Small building blocks shared by the backbones (timm-compatible names and maths)."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Two-layer MLP with GELU, as timm's ``Mlp`` (keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample; identity at eval time or when ``p == 0``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (keys ``proj`` and optional ``norm``).

    Args:
        patch_size: side of a square patch in input pixels.
        in_chans: input channels.
        dim: embedding width.
        norm: apply LayerNorm after the projection (Swin does, ViT does not).
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int, *, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H/p, W/p, D)`` (channels last)."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def init_linear(module: nn.Module) -> None:
    """timm's default: truncated normal (std 0.02) weights, zero biases for ``nn.Linear``."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing stochastic-depth rates over ``depth`` blocks, as timm does."""
    if depth <= 1:
        return [0.0] * depth
    return [rate * i / (depth - 1) for i in range(depth)]
