"""Swin Transformer V2 backbone with optional relay tokens.

Swin V2: Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022.
Relay tokens: Perron et al., "Relay tokens", TMLR 2026 (see ``shared/paper/relay-tokens.md``).

State-dict keys and maths match timm's ``swinv2_*_window8_256`` (``patch_embed``,
``layers.{i}.downsample``, ``layers.{i}.blocks.{j}.attn.cpb_mlp`` ...), so timm checkpoints load
by key. Relay additions, all new keys: ``relay_tokens`` ``(R, D0)``; ``layers.{i}.relay_proj``
(``Linear(dim, 2*dim)`` at each patch merging); ``patch_embed_global`` (separate projection
for the global window). Relays are appended to *every* attention window with a zero
relative-position input to the bias (see :meth:`WindowAttention.position_bias`) and no shift
mask, pooled over windows after attention (the authors' code: averaged; see
:meth:`WindowAttention.pool_relays`), then share the block's res-post-norm and MLP.

Read bottom-up: window helpers, attention, block, patch merging, stage, backbone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._backbone import Backbone, Step, TokenMask, Transition
from ._layers import DropPath, Mlp, PatchEmbed, drop_path_rates, init_linear

#: Ways to pool the windows' relay copies after attention (``WindowAttention.pool_relays``).
RELAY_POOLS: tuple[str, ...] = ("mean", "softmax", "max")


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, nW, ws*ws, C)`` non-overlapping windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """``(B, nW, ws*ws, C)`` -> ``(B, H, W, C)``; inverse of :func:`window_partition`."""
    b, _, _, c = windows.shape
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shift_mask(h: int, w: int, ws: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive mask ``(nW, ws*ws, ws*ws)`` (0 or -100) for shifted windows, as Swin builds it."""
    img = torch.zeros(1, h, w, 1, device=device)
    region = 0
    for ys in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for xs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, ys, xs, :] = region
            region += 1
    ids = window_partition(img, ws).squeeze(-1)[0]  # nW, ws*ws
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def relative_coords_table(ws: int, pretrained_ws: int, device: torch.device) -> torch.Tensor:
    """Log-spaced relative coordinates ``(2ws-1, 2ws-1, 2)`` fed to the continuous bias MLP."""
    coords = torch.arange(-(ws - 1), ws, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(coords, coords, indexing="ij"), dim=-1)
    table = table / max((pretrained_ws or ws) - 1, 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(ws: int, device: torch.device) -> torch.Tensor:
    """``(ws*ws, ws*ws)`` index into the flattened ``(2ws-1)^2`` bias table."""
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(ws, device=device), torch.arange(ws, device=device), indexing="ij"
        )
    ).flatten(1)  # 2, ws*ws
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Scaled-cosine window attention with continuous relative position bias (Swin V2).

    Args:
        dim: token width.
        num_heads: attention heads.
        pretrained_window_size: window of the pretraining run, used to scale the bias
            coordinates (0: the current window).
    """

    def __init__(self, dim: int, num_heads: int, *, pretrained_window_size: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pretrained_window_size = pretrained_window_size
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    #: Bias of a pair involving a relay: ``mid`` (ours) or ``zero`` (the authors' code).
    relay_bias: str = "mid"
    #: How the windows' copies of the relays are pooled (:data:`RELAY_POOLS`).
    relay_pool: str = "mean"

    def position_bias(self, ws: int, num_relays: int = 0) -> torch.Tensor:
        """Relative position bias ``(nH, T, T)``, ``T = ws*ws + R``: ``16 * sigmoid(cpb)``.

        A pair involving a relay has no relative position. ``mid``: its ``cpb`` output is 0,
        so its bias is ``16 * sigmoid(0) = 8``, the bias of a pair the MLP has not learned
        about. ``zero`` (the authors' code): bias 0 *after* the sigmoid, which puts every
        relay up to ``e**8`` times below a patch in each softmax at initialisation.
        """
        device = self.q_bias.device
        table = self.cpb_mlp(relative_coords_table(ws, self.pretrained_window_size, device))
        raw = table.view(-1, self.num_heads)[relative_position_index(ws, device).view(-1)]
        raw = raw.view(ws * ws, ws * ws, self.num_heads).permute(2, 0, 1)
        if self.relay_bias == "zero":
            return F.pad(16 * torch.sigmoid(raw), (0, num_relays, 0, num_relays))
        return 16 * torch.sigmoid(F.pad(raw, (0, num_relays, 0, num_relays)))

    def pool_relays(
        self, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """One relay update from every window's copy, by :attr:`relay_pool`.

        Args:
            q: ``(B, nW, nH, R, d)`` scaled relay queries (the same in every window).
            k: ``(B, nW, nH, T, d)`` normalised keys of each window.
            out: ``(B, nW, nH, R, d)`` each window's attention output for its relay copy.
            bias: the relay rows of the additive bias, ``(nH, R, T)`` or ``(nW, nH, R, T)``.

        Returns:
            ``(B, nH, R, d)``: ``mean`` over windows (the authors' code); ``softmax``: each
            window weighted by its share of the relay's softmax mass, ``Z_w / sum(Z)`` with
            ``Z_w = sum_j exp(q.k_j + b_j)`` over the window's tokens, which is one softmax
            over the tokens of all windows together (the relays' own keys, present in every
            window, counted once per window); ``max``: the largest value over windows, per
            channel.
        """
        if self.relay_pool == "mean":
            return out.mean(1)
        if self.relay_pool == "max":
            return out.amax(1)
        lse = torch.logsumexp(q @ k.transpose(-2, -1) + bias, dim=-1)  # B, nW, nH, R
        return (torch.softmax(lse, dim=1).unsqueeze(-1) * out).sum(1)

    def forward(
        self,
        x: torch.Tensor,
        ws: int,
        mask: torch.Tensor | None,
        num_relays: int = 0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Attend within windows.

        Args:
            x: ``(B, nW, N + R, C)`` windows of ``N = ws*ws`` patch tokens, then R relays.
            ws: window side in tokens.
            mask: ``(nW, N, N)`` additive shift mask or ``None``.
            num_relays: R; relay pairs get the ``relay_bias`` and are never masked.
            need_weights: also return the attention (explicit softmax).

        Returns:
            ``(B, nW, N, C)`` patch tokens; ``(B, R, C)`` relays pooled over the windows
            (:meth:`pool_relays`), or ``None`` without relays; and, if asked, the
            ``(B, nW, N + R, N + R)`` attention averaged over heads (rows: queries, patches
            then relays).
        """
        b, nw, t, c = x.shape
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(b, nw, t, 3, self.num_heads, -1)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each B, nW, nH, T, d
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # nH, 1, 1
        q = F.normalize(q, dim=-1) * scale
        k = F.normalize(k, dim=-1)
        bias = self.position_bias(ws, num_relays)  # nH, T, T
        if mask is not None:
            bias = bias + F.pad(mask, (0, num_relays, 0, num_relays)).unsqueeze(1)  # nW,nH,T,T
        weights = None
        if need_weights and num_relays:
            attn = torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1)  # B, nW, nH, T, T
            weights = attn.mean(2)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        n = t - num_relays
        patches = self.proj(out[..., :n, :].transpose(2, 3).reshape(b, nw, n, c))
        if not num_relays:
            return patches, None, weights
        pooled = self.pool_relays(q[..., n:, :], k, out[..., n:, :], bias[..., n:, :])
        return patches, self.proj(pooled.transpose(1, 2).reshape(b, num_relays, c)), weights


class SwinTransformerV2Block(nn.Module):
    """Window attention then MLP, each with residual post-norm (Swin V2)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int,
        shifted: bool,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        pretrained_window_size: int = 0,
        relay_norm: bool = False,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.attn = WindowAttention(dim, num_heads, pretrained_window_size=pretrained_window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path2 = DropPath(drop_path)
        #: The relays' own post-norm after attention (``relay_norm="own"``), initialised to
        #: ones unlike ``norm1``; ``None``: relays share ``norm1`` (the authors' code).
        self.relay_norm1 = nn.LayerNorm(dim) if relay_norm else None
        #: When a list, each forward with relays appends ``{"map": (B, H, W), "reads":
        #: (B, H, W)}``: the relays' attention on each patch (mean over heads and relays) and
        #: each patch's attention on the relays (summed over relays, mean over heads), for
        #: :mod:`relay_models.attention_maps`.
        self.capture: list[dict[str, torch.Tensor]] | None = None

    def window_and_shift(self, h: int, w: int) -> tuple[int, int]:
        """Window side and shift at a ``h x w`` map: a map no larger than the window is one
        unshifted window (timm's rule)."""
        if min(h, w) <= self.window_size:
            return min(h, w), 0
        return self.window_size, (self.window_size // 2 if self.shifted else 0)

    def _attn(
        self, x: torch.Tensor, relays: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _b, h, w, _c = x.shape
        ws, shift = self.window_and_shift(h, w)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        pad_h, pad_w = (-h) % ws, (-w) % ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        windows = window_partition(x, ws)  # B, nW, N, C
        num_relays = 0 if relays is None else relays.shape[1]
        if relays is not None:
            copies = relays.unsqueeze(1).expand(-1, windows.shape[1], -1, -1)
            windows = torch.cat([windows, copies], dim=2)  # B, nW, N+R, C
        mask = shift_mask(hp, wp, ws, shift, x.device) if shift else None
        out, relay_out, weights = self.attn(windows, ws, mask, num_relays, self.capture is not None)
        n = ws * ws
        x = window_reverse(out, ws, hp, wp)[:, :h, :w]
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        if weights is not None:
            per_patch = torch.stack(
                [
                    weights[..., n:, :n].mean(2),  # relays -> each patch: B, nW, N
                    weights[..., :n, n:].sum(3),  # each patch -> relays
                ],
                dim=-1,
            )
            maps = window_reverse(per_patch, ws, hp, wp)[:, :h, :w]
            maps = torch.roll(maps, shifts=(shift, shift), dims=(1, 2)).detach()
            self.capture.append({"map": maps[..., 0], "reads": maps[..., 1]})
        # each window updated its own copy of the relays: pooled over the image (attn)
        return x, relay_out

    def forward(
        self, x: torch.Tensor, relays: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x``: ``(B, H, W, C)``; ``relays``: ``(B, R, C)`` or ``None``; returns both updated."""
        b, h, w, c = x.shape
        attn_x, attn_r = self._attn(x, relays)
        tokens = (x + self.drop_path1(self.norm1(attn_x))).reshape(b, h * w, c)
        if relays is not None:
            relays = relays + self.drop_path1((self.relay_norm1 or self.norm1)(attn_r))
            tokens = torch.cat([tokens, relays], dim=1)  # B, HW+R, C
        tokens = tokens + self.drop_path2(self.norm2(self.mlp(tokens)))
        if relays is not None:
            relays = tokens[:, h * w :]
        return tokens[:, : h * w].reshape(b, h, w, c), relays


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation, ``Linear(4C, 2C)`` and LayerNorm (Swin V2 order)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``."""
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1:3]
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x))


class SwinTransformerV2Stage(nn.Module):
    """Optional patch merging (with its relay projection) followed by ``depth`` blocks."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: int,
        downsample: bool,
        relays: bool,
        drop_path: list[float],
        mlp_ratio: float = 4.0,
        pretrained_window_size: int = 0,
        relay_norm: bool = False,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        #: relays change width with the patches: their own ``Linear(dim, out_dim)``.
        self.relay_proj = nn.Linear(dim, out_dim) if downsample and relays else None
        self.blocks = nn.ModuleList(
            SwinTransformerV2Block(
                out_dim,
                num_heads,
                window_size=window_size,
                shifted=i % 2 == 1,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path[i],
                pretrained_window_size=pretrained_window_size,
                relay_norm=relays and relay_norm,
            )
            for i in range(depth)
        )

    def transition(self) -> Transition:
        """The stage's first step: merge patches (per window), project relays (once)."""
        if self.relay_proj is None:
            return Transition(self.downsample, _no_relays)
        return Transition(self.downsample, self.relay_proj)


def _no_relays(relays: torch.Tensor) -> torch.Tensor:
    raise ValueError("relays reached a patch merging without a relay projection (relays=0)")


class SwinTransformerV2(Backbone):
    """Swin Transformer V2 backbone returning one feature map per stage.

    Args:
        in_chans: input bands.
        patch_size: first-stage patch side in pixels.
        embed_dim: first-stage width ``D0``; stage ``i`` has ``D0 * 2**i``.
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: attention window side in tokens (clamped to small maps).
        relays: relay tokens R (0: plain backbone, no relay parameters).
        separate_patch_embed: give the global window its own patch projection (needs relays).
        relay_init_std: standard deviation of the relay tokens' initial values (normal
            truncated at +-2).
        relay_bias: position bias of relay pairs, ``mid`` or ``zero`` (``WindowAttention``).
        relay_pool: how the windows' relay copies are pooled after attention: ``mean``,
            ``softmax`` or ``max`` (:meth:`WindowAttention.pool_relays`).
        relay_norm: post-norm of the relays' attention update: ``shared`` (the block's
            ``norm1``, zero-initialised like every Swin V2 res-post-norm: the authors' code)
            or ``own`` (a LayerNorm of their own per block, initialised to ones, so what
            relays gather reaches them at full scale from the first step).
        post_norm_init: initial weight of every block's residual post-norms (timm: 0, so
            every block starts as an identity and nothing reaches a token through attention,
            relays included, until those weights grow).
        drop_path_rate: stochastic depth at the last block.
        pretrained_window_sizes: per-stage pretraining windows (0: same as ``window_size``).
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 8,
        relays: int = 0,
        separate_patch_embed: bool = True,
        relay_init_std: float = 1.0,
        relay_bias: str = "mid",
        relay_pool: str = "mean",
        relay_norm: str = "shared",
        post_norm_init: float = 0.0,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0),
    ) -> None:
        super().__init__()
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_relays = relays
        self.patch_size = patch_size
        self.side_multiple = patch_size * 2 ** (len(depths) - 1)
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=True)
        self.patch_embed_global = (
            PatchEmbed(patch_size, in_chans, embed_dim, norm=True)
            if relays and separate_patch_embed
            else None
        )
        self.relay_tokens = nn.Parameter(torch.zeros(relays, embed_dim)) if relays else None
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.layers = nn.Sequential(
            *(
                SwinTransformerV2Stage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    window_size=window_size,
                    downsample=i > 0,
                    relays=relays > 0,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    mlp_ratio=mlp_ratio,
                    pretrained_window_size=pretrained_window_sizes[i],
                    relay_norm=relay_norm == "own",
                )
                for i in range(len(depths))
            )
        )
        self.norm = nn.LayerNorm(self.num_features)
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"layers.{i}")
            for i, d in enumerate(dims)
        ]
        if relay_bias not in ("mid", "zero"):
            raise ValueError(f"relay_bias must be 'mid' or 'zero', got {relay_bias!r}")
        if relay_norm not in ("shared", "own"):
            raise ValueError(f"relay_norm must be 'shared' or 'own', got {relay_norm!r}")
        if relay_pool not in RELAY_POOLS:
            raise ValueError(f"relay_pool must be one of {RELAY_POOLS}, got {relay_pool!r}")
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.relay_bias = relay_bias
                m.relay_pool = relay_pool
        self.relay_init_std = relay_init_std
        self.post_norm_init = post_norm_init
        self.init_weights()

    def init_weights(self) -> None:
        """timm's init: truncated-normal linears, res-post-norms at ``post_norm_init`` (timm:
        0, every block an identity), relays at ``relay_init_std``."""
        self.apply(init_linear)
        for stage in self.layers:
            for blk in stage.blocks:
                for norm in (blk.norm1, blk.norm2):
                    nn.init.constant_(norm.weight, self.post_norm_init)
                    nn.init.zeros_(norm.bias)
        if self.relay_tokens is not None:
            nn.init.trunc_normal_(self.relay_tokens, std=self.relay_init_std)

    def embed(self, x: torch.Tensor, branch: str, mask: TokenMask | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H/4, W/4, D0)``; the global window may use its own proj."""
        proj = self.patch_embed
        if branch == "global" and self.patch_embed_global is not None:
            proj = self.patch_embed_global
        tokens = proj(x)
        return tokens if mask is None else mask.apply(tokens)

    def steps(self) -> Iterator[tuple[Step, int | None]]:
        for i, stage in enumerate(self.layers):
            if i > 0:
                yield stage.transition(), None
            for j, blk in enumerate(stage.blocks):
                yield blk, (i if j == len(stage.blocks) - 1 else None)

    def stage_output(self, state: Any, stage: int) -> torch.Tensor:
        """NHWC state -> NCHW map; the last stage gets the final norm (timm's features)."""
        if stage == len(self.layers) - 1:
            state = self.norm(state)
        return state.permute(0, 3, 1, 2)
