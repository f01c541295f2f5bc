"""Self-supervised pretraining of a backbone: masked image modelling (SimMIM).

Relay tokens are meant to be added to a *pretrained* backbone (the paper starts every model
from ImageNet). Users have archives of unlabelled imagery of their own area; SimMIM (Xie et
al., CVPR 2022), which the Swin V2 authors used to pretrain Swin V2, needs nothing else:
hide 60% of the image in square blocks, replace the hidden patch tokens with a learnt mask
token, and regress the hidden pixels from the last stage's features through a 1x1
convolution and a pixel shuffle, with an L1 loss on the hidden pixels only.

A model is pretrained in its own view of the data, the windows and relays it is called
with (:func:`model_view`): a sliding-window model on local windows; a relay model on both
windows at once, each masked independently, relays exchanged in every block. Then a hidden
block of the local window can be inferred from what the global window shows of the same
ground (at 1/f resolution) only through the relays, and the reverse: the relays learn to
carry content between the branches before any label is seen. The backbone's state dict,
relay parameters included, is the pretrained checkpoint (timm-format keys): a relay model
uses all of it; its sliding-window, fusion and downsampling twins use the backbone keys and
report the relay keys as unused (:func:`relay_models.load_pretrained`).

Everything here is plain PyTorch: the Ray Train worker (``relaymap pretrain``) and the
benchmarks call :func:`pretrain_step` as they call :func:`relay_models.train_step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._backbone import Backbone, RelayMode, TokenMask
from .segmenter import (
    DecisionFusionSegmenter,
    DownsamplingSegmenter,
    RegistersSegmenter,
    RelaySegmenter,
    Segmenter,
)


class ModelView(NamedTuple):
    """How a model calls its backbone: the windows it sees, in execution order, and its
    relay mode (None: no relays)."""

    branches: tuple[str, ...]
    relay_mode: RelayMode | None


def model_view(model: Segmenter) -> ModelView:
    """The windows and relay mode ``model`` runs its backbone with."""
    if isinstance(model, RelaySegmenter):
        return ModelView(("global", "local"), model.relay_mode)
    if isinstance(model, RegistersSegmenter):
        return ModelView(("local",), "sequential")
    if isinstance(model, DecisionFusionSegmenter):
        return ModelView(("global", "local"), None)
    if isinstance(model, DownsamplingSegmenter):
        return ModelView(("global",), None)
    return ModelView(("local",), None)


def random_masks(
    batch: int,
    tokens: int,
    block: int,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """SimMIM's masks: ``(batch, tokens, tokens)`` bool, ``round(ratio * n)`` of the ``n``
    square blocks of ``block`` x ``block`` tokens hidden in each image."""
    if tokens % block:
        raise ValueError(f"the mask block ({block} tokens) must divide the token grid ({tokens})")
    side = tokens // block
    n = side * side
    hide = max(1, round(ratio * n))
    order = torch.rand(batch, n, generator=generator).argsort(1)
    hidden = torch.zeros(batch, n, dtype=torch.bool)
    hidden.scatter_(1, order[:, :hide], True)
    grid = hidden.view(batch, side, side)
    grid = grid.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return grid.to(device)


class MIMTerms(NamedTuple):
    """Reconstruction losses: the total and each window's (``nan`` for a window not seen)."""

    total: torch.Tensor
    local: torch.Tensor
    global_: torch.Tensor


class MaskedImageModel(nn.Module):
    """SimMIM around a segmentation model's backbone (the head is not used).

    Args:
        model: the model whose backbone is pretrained, in its own view (:func:`model_view`).
        mask_px: side of a hidden block in input pixels (a multiple of the patch size that
            divides the window side); default two patches (8 px for Swin V2, whose 4 px
            patches make SimMIM's 32 px blocks too coarse for 32-64 px windows).
        mask_ratio: share of the blocks hidden in each window.
    """

    def __init__(
        self, model: Segmenter, *, mask_px: int | None = None, mask_ratio: float = 0.6
    ) -> None:
        super().__init__()
        backbone: Backbone = model.backbone
        self.backbone = backbone
        self.view = model_view(model)
        mask_px = mask_px or 2 * backbone.patch_size
        if mask_px % backbone.patch_size:
            raise ValueError(
                f"mask_px={mask_px} must be a multiple of the patch size {backbone.patch_size}"
            )
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_px, self.mask_ratio = mask_px, mask_ratio
        first, last = backbone.feature_info[0], backbone.feature_info[-1]
        self.mask_token = nn.Parameter(torch.zeros(first["num_chs"]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        stride = last["reduction"]
        self.decoder = nn.Sequential(
            nn.Conv2d(last["num_chs"], stride * stride * backbone.in_chans, kernel_size=1),
            nn.PixelShuffle(stride),
        )

    def forward(
        self, batch: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Reconstructions ``(B, C, L, L)`` per branch of :attr:`view`.

        Args:
            batch: ``local`` and/or ``global`` ``(B, C, L, L)`` normalised windows.
            masks: per branch, ``(B, L/p, L/p)`` bool hidden patch tokens.
        """
        feats = self.backbone.forward_branches(
            {b: batch[b] for b in self.view.branches},
            relay_mode=self.view.relay_mode,
            masks={b: TokenMask(masks[b], self.mask_token) for b in self.view.branches},
        )
        return {b: self.decoder(f[-1]) for b, f in feats.items()}

    def draw_masks(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Independent random masks for each branch of :attr:`view`."""
        x = batch[self.view.branches[0]]
        p = self.backbone.patch_size
        return {
            b: random_masks(
                x.shape[0],
                x.shape[-1] // p,
                self.mask_px // p,
                self.mask_ratio,
                generator=generator,
                device=x.device,
            )
            for b in self.view.branches
        }


def reconstruction_loss(
    recon: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """SimMIM's L1 over the hidden pixels that hold data, mean per pixel and band.

    Args:
        recon, target: ``(B, C, L, L)``.
        hidden: ``(B, h, w)`` bool hidden tokens (upsampled to pixels here).
        valid: ``(B, L, L)`` bool pixels with data (None: all).
    """
    scale = target.shape[-1] // hidden.shape[-1]
    weight = hidden.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    if valid is not None:
        weight = weight & valid
    weight = weight.unsqueeze(1).to(recon.dtype)
    l1 = F.l1_loss(recon, target, reduction="none")
    return (l1 * weight).sum() / (weight.sum() * target.shape[1]).clamp(min=1.0)


def pretrain_step(
    mim: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    generator: torch.Generator | None = None,
    grad_clip: float | None = 1.0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> MIMTerms:
    """Masks, forward, loss, backward, gradient clipping and one optimiser step.

    Args:
        mim: a :class:`MaskedImageModel` (or its DDP wrapper), in train mode.
        batch: ``local``/``global`` ``(B, C, L, L)`` float32 normalised windows, and
            ``valid``/``global_valid`` ``(B, L, L)`` bool where they hold data.
        optimizer: steps ``mim``'s parameters.
        generator: draws the masks (randomness is a parameter).
        grad_clip: max gradient norm; None: no clipping.
        autocast: the forward pass's precision context (see :func:`relay_models.train_step`);
            the loss is computed in float32.

    Returns:
        The loss terms, detached.
    """
    inner: MaskedImageModel = getattr(mim, "module", mim)
    masks = inner.draw_masks(batch, generator)
    with autocast or contextlib.nullcontext():
        recon = mim(batch, masks)
    valid_key = {"local": "valid", "global": "global_valid"}
    losses = {
        b: reconstruction_loss(r.float(), batch[b], masks[b], batch.get(valid_key[b]))
        for b, r in recon.items()
    }
    total = torch.stack(list(losses.values())).mean()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(mim.parameters(), grad_clip)
    optimizer.step()
    nan = torch.tensor(float("nan"))
    return MIMTerms(
        total.detach(),
        losses.get("local", nan).detach(),
        losses.get("global", nan).detach(),
    )


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The pretrained checkpoint: the backbone's state dict (timm-format keys, relay
    parameters included), contiguous CPU tensors ready for safetensors."""
    inner = getattr(model, "module", model)
    backbone = inner.backbone
    return {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}


#: safetensors metadata key of a pretrained backbone: what it is and how it was made.
BACKBONE_KEY = "relaymap:backbone"


def save_backbone(model: nn.Module, path: str, about: Mapping[str, object]) -> None:
    """Write ``model``'s backbone as a timm-format safetensors checkpoint; ``about`` (the
    model's config, the data's bands and normalisation, the method) goes into its header as
    JSON under :data:`BACKBONE_KEY`."""
    import json

    from safetensors.torch import save_file

    save_file(backbone_state_dict(model), path, metadata={BACKBONE_KEY: json.dumps(about)})
