"""Vision Transformer backbone with optional relay tokens.

ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
Relay tokens: Perron et al., TMLR 2026 (see ``shared/paper/relay-tokens.md``).

State-dict keys and maths match timm's ``vit_*_patch16_224`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.attn.qkv`` ..., LayerNorm eps 1e-6). The absolute position
embedding is resampled (bicubic) to the input grid, so any multiple of 16 px works.
Relay additions: ``relay_tokens`` ``(R, D)`` prepended to ``[cls; patches]`` in every block
(no position embedding), ``patch_embed_global`` for the global window.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._backbone import Backbone, Step, TokenMask
from ._layers import DropPath, Mlp, PatchEmbed, drop_path_rates, init_linear


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resample of a square patch position embedding ``(1, N, D)`` to ``(1, gh*gw, D)``."""
    n, d = pos.shape[1:]
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(f"position embedding of {n} patch tokens is not a square grid")
    if (side, side) == tuple(grid):
        return pos
    pos = pos.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    pos = F.interpolate(pos, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)


class Attention(nn.Module):
    """Multi-head self-attention (timm keys ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, num_relays: int = 0, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, T, D)`` tokens laid out ``[relays; cls; patches]`` -> ``(B, T, D)`` and, if
        asked, the ``(B, T, T)`` attention averaged over heads."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        weights = None
        if need_weights and num_relays:
            attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
            weights = attn.mean(1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d)), weights


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block``)."""

    def __init__(
        self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)
        #: When a list, each step with relays appends ``{"map": (B, h, w), "reads": (B, h,
        #: w)}``: the relays' attention on each patch (mean over heads and relays) and each
        #: patch's attention on the relays (summed), for :mod:`relay_models.attention_maps`.
        self.capture: list[dict[str, torch.Tensor]] | None = None

    def forward(
        self, x: torch.Tensor, num_relays: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, weights = self.attn(self.norm1(x), num_relays, self.capture is not None)
        x = x + self.drop_path1(attn)
        return x + self.drop_path2(self.mlp(self.norm2(x))), weights

    def step(
        self, state: tuple[torch.Tensor, torch.Tensor], relays: torch.Tensor | None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """One block on ``(cls (B, 1, D), patches (B, h, w, D))`` with relays ``(B, R, D)``."""
        cls, patches = state
        b, h, w, d = patches.shape
        r = 0 if relays is None else relays.shape[1]
        parts = [cls, patches.reshape(b, h * w, d)]
        if relays is not None:
            parts.insert(0, relays)
        tokens, weights = self(torch.cat(parts, dim=1), r)  # B, R+1+hw, D
        if weights is not None:
            amap = weights[:, :r, r + 1 :].mean(1).reshape(b, h, w).detach()
            reads = weights[:, r + 1 :, :r].sum(2).reshape(b, h, w).detach()
            self.capture.append({"map": amap, "reads": reads})
        new_relays = tokens[:, :r] if relays is not None else None
        return (tokens[:, r : r + 1], tokens[:, r + 1 :].reshape(b, h, w, d)), new_relays


class VisionTransformer(Backbone):
    """ViT backbone returning one ``(B, D, H/16, W/16)`` feature map.

    Args:
        in_chans: input bands.
        img_size: side the position embedding is built for (resampled for other sides).
        patch_size: patch side in pixels.
        embed_dim: token width D.
        depth: blocks.
        num_heads: attention heads.
        relays: relay tokens R (0: plain backbone).
        separate_patch_embed: give the global window its own patch projection.
        relay_init_std: standard deviation of the relay tokens' initial values (normal
            truncated at +-2).
        drop_path_rate: stochastic depth at the last block.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        img_size: int = 256,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        relays: int = 0,
        separate_patch_embed: bool = True,
        relay_init_std: float = 1.0,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        grid = img_size // patch_size
        self.num_relays = relays
        self.patch_size = patch_size
        self.side_multiple = patch_size
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=False)
        self.patch_embed_global = (
            PatchEmbed(patch_size, in_chans, embed_dim, norm=False)
            if relays and separate_patch_embed
            else None
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.relay_tokens = nn.Parameter(torch.zeros(relays, embed_dim)) if relays else None
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, drop_path=dpr[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module="blocks")]
        self.relay_init_std = relay_init_std
        self.init_weights()

    def init_weights(self) -> None:
        """timm's init: truncated-normal position embedding and linears, small cls token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_linear)
        if self.relay_tokens is not None:
            nn.init.trunc_normal_(self.relay_tokens, std=self.relay_init_std)

    def embed(
        self, x: torch.Tensor, branch: str, mask: TokenMask | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> ``(cls (B, 1, D), patches (B, H/16, W/16, D))`` with positions
        (added after ``mask``, so a masked token still knows where it is)."""
        proj = self.patch_embed_global if branch == "global" else None
        patches = (proj or self.patch_embed)(x)
        if mask is not None:
            patches = mask.apply(patches)
        b, h, w, d = patches.shape
        pos = resample_pos_embed(self.pos_embed[:, 1:], (h, w)).to(patches.dtype)
        patches = patches + pos.view(1, h, w, d)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        return cls, patches

    def steps(self) -> Iterator[tuple[Step, int | None]]:
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            yield blk.step, (0 if i == last else None)

    def stage_output(self, state: Any, stage: int) -> torch.Tensor:
        """Final-normed patch tokens as ``(B, D, H/16, W/16)``."""
        return self.norm(state[1]).permute(0, 3, 1, 2)
