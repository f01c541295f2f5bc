"""Segmentation models over a backbone: the sliding-window baseline, relay tokens, and the
context baselines of the paper (registers, decision fusion, downsampling).

Every two-window model is called as ``model(local, global_)`` with two ``(B, C, L, L)``
windows (the global one centred on the local one, ``factor`` times larger, shown at the same
``L``) and returns a :class:`RelayOutput`; the sliding-window baseline is ``model(x)``.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._backbone import RELAY_MODES, Backbone, RelayMode
from .geometry import global_crop


class RelayOutput(NamedTuple):
    """Logits of a two-window model.

    Attributes:
        local: ``(B, K, L, L)`` logits of the local window: the model's prediction.
        global_: ``(B, K, L, L)`` logits of the global window, or ``None`` for models that
            never look at it (registers).
    """

    local: torch.Tensor
    global_: torch.Tensor | None


class Segmenter(nn.Module):
    """A backbone (timm-compatible keys under ``backbone.``) and a decode head."""

    #: Whether ``forward`` takes ``(local, global_)`` and returns :class:`RelayOutput`.
    takes_global: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, decode_head: nn.Module, *, factor: int = 4) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        #: Global/local side ratio the model is trained and run with.
        self.factor = factor

    @property
    def feature_info(self) -> list[dict]:
        return self.backbone.feature_info

    def forward_head(self, *branch_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decode one or more branches with the shared head in a single batched call."""
        if len(branch_feats) == 1:
            return [self.decode_head(branch_feats[0])]
        stacked = [torch.cat(level, dim=0) for level in zip(*branch_feats, strict=True)]
        return list(self.decode_head(stacked).chunk(len(branch_feats), dim=0))

    def predict_local(
        self, local: torch.Tensor, global_: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, K, L, L)`` logits of the local window: all a map needs (the tiled engine
        calls this; relay models skip decoding their global branch here)."""
        out = self(local, global_) if self.takes_global else self(local)
        return out.local if isinstance(out, tuple) else out

    def _check_pair(self, local: torch.Tensor, global_: torch.Tensor) -> None:
        self.backbone.check_input(local, "local window")
        self.backbone.check_input(global_, "global window")
        if local.shape != global_.shape:
            raise ValueError(
                f"local and global windows must have the same shape (B, C, L, L); got "
                f"{tuple(local.shape)} and {tuple(global_.shape)}"
            )
        global_crop(local.shape[-1], self.factor)  # raises if L has no centred crop

    def _crop_up(self, global_logits: torch.Tensor) -> torch.Tensor:
        """The part of global logits over the local window, upsampled to ``(B, K, L, L)``."""
        rows, cols = global_crop(global_logits.shape[-1], self.factor)
        crop = global_logits[..., rows, cols]
        return F.interpolate(
            crop, size=global_logits.shape[-2:], mode="bilinear", align_corners=False
        )


class SlidingWindowSegmenter(Segmenter):
    """Sliding-window baseline: the plain backbone on the local window only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, L, L)`` normalised bands -> ``(B, K, L, L)`` logits."""
        return self.forward_head(self.backbone.forward_features(x))[0]


class RelaySegmenter(Segmenter):
    """Relay tokens: one backbone on both windows, relays exchanged in every block."""

    takes_global = True

    def __init__(
        self,
        backbone: Backbone,
        decode_head: nn.Module,
        *,
        factor: int = 4,
        relay_mode: RelayMode = "sequential",
        relay_blocks: int | None = None,
    ) -> None:
        super().__init__(backbone, decode_head, factor=factor)
        if relay_mode not in RELAY_MODES:
            raise ValueError(f"relay_mode must be one of {RELAY_MODES}, got {relay_mode!r}")
        if backbone.relay_tokens is None:
            raise ValueError("a relay model needs a backbone with relays > 0")
        self.relay_mode = relay_mode
        #: The global branch runs in the first N blocks only (no global logits then).
        self.relay_blocks = relay_blocks

    def _features(self, local: torch.Tensor, global_: torch.Tensor) -> dict:
        self._check_pair(local, global_)
        return self.backbone.forward_branches(
            {"global": global_, "local": local},
            relay_mode=self.relay_mode,
            global_blocks=self.relay_blocks,
        )

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> RelayOutput:
        """Two ``(B, C, L, L)`` windows -> local and global ``(B, K, L, L)`` logits (global
        ``None`` when the global branch stops early, ``relay_blocks``)."""
        feats = self._features(local, global_)
        if len(feats["global"]) < len(feats["local"]):
            return RelayOutput(local=self.forward_head(feats["local"])[0], global_=None)
        glob, loc = self.forward_head(feats["global"], feats["local"])
        return RelayOutput(local=loc, global_=glob)

    def predict_local(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """Local logits without decoding the global branch (the head is per-branch, so the
        result equals ``forward(...).local``)."""
        return self.forward_head(self._features(local, global_)["local"])[0]


class RelayFusionSegmenter(RelaySegmenter):
    """A hybrid, not the paper's model: the relay model, whose local prediction is then fused
    with its own global decision as decision fusion does (the mean of the local logits and
    the upsampled global logits over the local window)."""

    def __init__(
        self,
        backbone: Backbone,
        decode_head: nn.Module,
        *,
        factor: int = 4,
        relay_mode: RelayMode = "sequential",
        relay_blocks: int | None = None,
    ) -> None:
        if relay_blocks is not None:
            raise ValueError("a _relayfusion model needs the global logits: relay_blocks=None")
        super().__init__(backbone, decode_head, factor=factor, relay_mode=relay_mode)

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> RelayOutput:
        """Two ``(B, C, L, L)`` windows -> fused local and global ``(B, K, L, L)`` logits."""
        out = super().forward(local, global_)
        return RelayOutput(local=(out.local + self._crop_up(out.global_)) / 2, global_=out.global_)

    def predict_local(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """The fused local logits (the global branch is decoded: the fusion needs it)."""
        return self(local, global_).local


class RegistersSegmenter(Segmenter):
    """Registers baseline: relay tokens on the local window alone; the global input is
    accepted (same call as a relay model) and ignored."""

    takes_global = True

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> RelayOutput:
        self._check_pair(local, global_)
        feats = self.backbone.forward_branches({"local": local}, relay_mode="sequential")
        return RelayOutput(local=self.forward_head(feats["local"])[0], global_=None)


class DecisionFusionSegmenter(Segmenter):
    """Decision fusion baseline: the plain model on both windows; the local prediction is
    the mean of the local logits and the upsampled global logits over the local window."""

    takes_global = True

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> RelayOutput:
        self._check_pair(local, global_)
        feats = self.backbone.forward_branches({"global": global_, "local": local})
        glob, loc = self.forward_head(feats["global"], feats["local"])
        return RelayOutput(local=(loc + self._crop_up(glob)) / 2, global_=glob)


class DownsamplingSegmenter(Segmenter):
    """Downsampling baseline: the plain model on the global window only; the local
    prediction is the upsampled global logits over the local window."""

    takes_global = True

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> RelayOutput:
        self._check_pair(local, global_)
        g = self.forward_head(self.backbone.forward_branches({"global": global_})["global"])[0]
        return RelayOutput(local=self._crop_up(g), global_=g)
