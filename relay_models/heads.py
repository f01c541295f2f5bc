"""Decode heads: backbone stage features -> per-pixel class logits at input resolution."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

HeadName = Literal["convt", "fpn"]
HEADS: tuple[str, ...] = ("convt", "fpn")


class ConvTransposeHead(nn.Module):
    """The paper's head: one ``ConvTranspose2d(C_last, K, kernel=r, stride=r)`` on the last
    stage (``r`` = 32 for Swin, 16 for ViT); each token paints its ``r x r`` pixels."""

    def __init__(self, feature_info: list[dict[str, Any]], num_classes: int) -> None:
        super().__init__()
        info = feature_info[-1]
        r = info["reduction"]
        self.proj = nn.ConvTranspose2d(info["num_chs"], num_classes, kernel_size=r, stride=r)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps -> ``(B, K, H, W)`` logits: ``self.proj`` computed as one matmul.

        With kernel = stride the blocks do not overlap, so the transposed convolution is a
        per-token linear map to ``K * r * r`` values; on CPU, ``conv_transpose2d`` with a
        32 px kernel took a quarter of the whole forward pass, the matmul a few percent.
        """
        x, w = feats[-1], self.proj.weight  # (B, C, h, w), (C, K, r, r)
        b, c, h, wd = x.shape
        k, r = w.shape[1], w.shape[2]
        y = x.flatten(2).transpose(1, 2) @ w.reshape(c, k * r * r)  # (B, h*w, K*r*r)
        y = y.view(b, h, wd, k, r, r).permute(0, 3, 1, 4, 2, 5).reshape(b, k, h * r, wd * r)
        return y + self.proj.bias.view(1, k, 1, 1)


class FPNHead(nn.Module):
    """A light FPN over the stages of a hierarchical backbone (Swin).

    1x1 laterals to ``channels``, a top-down pathway summing each coarser level into the
    next finer one, a 3x3 conv + GroupNorm + GELU at the finest stride, a 1x1 classifier,
    and bilinear upsampling to the input size.
    """

    def __init__(
        self, feature_info: list[dict[str, Any]], num_classes: int, channels: int = 64
    ) -> None:
        super().__init__()
        if len(feature_info) < 2:
            raise ValueError(
                "the 'fpn' head needs a multi-stage backbone (swinv2_*); use head='convt' for vit_*"
            )
        self.lateral = nn.ModuleList(nn.Conv2d(i["num_chs"], channels, 1) for i in feature_info)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8 if channels % 8 == 0 else 1, channels),
            nn.GELU(),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.stride = feature_info[0]["reduction"]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps -> ``(B, K, H, W)`` logits."""
        x = self.lateral[-1](feats[-1])
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1]), strict=True):
            x = lateral(f) + F.interpolate(
                x, size=f.shape[-2:], mode="bilinear", align_corners=False
            )
        x = self.classifier(self.fuse(x))
        return F.interpolate(x, scale_factor=self.stride, mode="bilinear", align_corners=False)


def create_head(name: str, feature_info: list[dict[str, Any]], num_classes: int) -> nn.Module:
    """Build a decode head by name (``"convt"`` or ``"fpn"``)."""
    if name == "convt":
        return ConvTransposeHead(feature_info, num_classes)
    if name == "fpn":
        return FPNHead(feature_info, num_classes)
    raise ValueError(f"unknown head {name!r}; valid heads: {', '.join(HEADS)}")
