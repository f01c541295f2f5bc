"""Tiled inference on an in-memory scene: the core that batch inference calls per tile batch.

A scene is cut into overlapping local tiles (:func:`geometry.tile_grid`); each tile gets its
centred global window, read from the scene downsampled ``factor`` times (area average, the
same pyramid a scene store holds) with the band mean (0 after normalisation) outside the
scene. Per-tile class probabilities of the local branch are blended over the overlaps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .geometry import Tile, blend_weights, tile_grid
from .sampling import read_window

Blend = Literal["cosine", "center"]


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Area-average ``(C, H, W)`` by ``factor`` (partial edge cells average their pixels)."""
    if factor == 1:
        return image
    return F.avg_pool2d(image.unsqueeze(0).float(), factor, ceil_mode=True)[0]


def read_tiles(
    image: torch.Tensor,
    tiles: Sequence[Tile],
    *,
    factor: int | None,
    coarse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Local windows ``(N, C, L, L)`` and, if ``factor``, global windows from ``coarse``
    (``image`` downsampled ``factor`` times; computed here when not given)."""
    local = torch.stack([read_window(image, t.window, t.tile_px)[0] for t in tiles])
    if factor is None:
        return local, None
    if coarse is None:
        coarse = downsample(image, factor)
    glob = torch.stack(
        [read_window(coarse, t.pair(factor).global_.scale(factor), t.tile_px)[0] for t in tiles]
    )
    return local, glob


@torch.inference_mode()
def predict_tiles(
    model: nn.Module, local: torch.Tensor, global_: torch.Tensor | None = None
) -> torch.Tensor:
    """Class probabilities ``(N, K, L, L)`` float32 of the local windows (local branch)."""
    out = model(local, global_) if getattr(model, "takes_global", False) else model(local)
    logits = out.local if isinstance(out, tuple) else out
    return logits.float().softmax(1)


def _batches(items: Sequence[Tile], size: int) -> Iterator[Sequence[Tile]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.inference_mode()
def predict_array(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    tile_px: int = 256,
    overlap_px: int | None = None,
    valid: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 8,
    blend: Blend = "cosine",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Segment a whole in-memory scene with overlapping tiles.

    Args:
        model: a registered model in eval mode (two-window models get global windows).
        image: ``(C, H, W)`` normalised bands (0 = band mean), any size.
        tile_px: local window side L.
        overlap_px: overlap between neighbouring tiles (default: a quarter tile).
        valid: optional ``(H, W)`` bool data mask; tiles with no valid pixel are skipped.
        batch_size: tiles per forward pass.
        blend: ``cosine`` fades tiles into each other over the overlap; ``center`` keeps
            only each tile's central part (``Tile.keep``), as the paper does.
        device: where to run the model (default: the model's device).
        progress: show a tile progress bar.

    Returns:
        ``(K, H, W)`` float32 probabilities on the CPU; all zero where no tile was run.
    """
    image = torch.as_tensor(image, dtype=torch.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if image.shape[0] != model.backbone.in_chans:
        raise ValueError(
            f"image has {image.shape[0]} bands but the model expects "
            f"in_chans={model.backbone.in_chans}"
        )
    if overlap_px is None:
        overlap_px = tile_px // 4
    if blend not in ("cosine", "center"):
        raise ValueError(f"blend must be 'cosine' or 'center', got {blend!r}")
    device = torch.device(device) if device else next(model.parameters()).device
    _, h, w = image.shape
    factor = model.factor if getattr(model, "takes_global", False) else None
    coarse = downsample(image, factor) if factor else None
    tiles = tile_grid((h, w), tile_px, overlap_px=overlap_px)
    if valid is not None:
        valid = torch.as_tensor(valid, dtype=torch.bool)
        tiles = [t for t in tiles if valid[t.keep[0] : t.keep[2], t.keep[1] : t.keep[3]].any()]
    weights = torch.from_numpy(blend_weights(tile_px, overlap_px if blend == "cosine" else 0))
    acc: torch.Tensor | None = None
    norm = torch.zeros(h, w)
    bar = tqdm(total=len(tiles), unit="tile", disable=not progress, desc="tiles")
    for batch in _batches(tiles, batch_size):
        local, glob = read_tiles(image, batch, factor=factor, coarse=coarse)
        probs = predict_tiles(
            model, local.to(device), None if glob is None else glob.to(device)
        ).cpu()
        if acc is None:
            acc = torch.zeros(probs.shape[1], h, w)
        for t, p in zip(batch, probs, strict=True):
            oy, ox = t.origin_yx
            y0, x0, y1, x1 = (
                t.keep
                if blend == "center"
                else (oy, ox, min(oy + tile_px, h), min(ox + tile_px, w))
            )
            wt = weights[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
            acc[:, y0:y1, x0:x1] += p[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox] * wt
            norm[y0:y1, x0:x1] += wt
        bar.update(len(batch))
    bar.close()
    if acc is None:
        raise ValueError("no tile has valid data: the scene is empty (all nodata)")
    return acc / norm.clamp(min=1e-12)


def to_classes(
    probs: torch.Tensor, valid: torch.Tensor | None = None, nodata: int = 255
) -> torch.Tensor:
    """``(K, H, W)`` probabilities -> ``(H, W)`` uint8 classes, ``nodata`` where invalid or
    where no tile was run."""
    classes = probs.argmax(0).to(torch.uint8)
    covered = probs.sum(0) > 0
    if valid is not None:
        covered &= torch.as_tensor(valid, dtype=torch.bool)
    return classes.masked_fill(~covered, nodata)
