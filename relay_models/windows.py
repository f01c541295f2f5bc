"""The window reader: a local (and global) window out of a multiscale raster, normalised.

Training, validation and inference all read their windows here, from anything that is a
:class:`Pyramid`: a scene store (``ingest.SceneStore``), an in-memory :class:`ArrayPyramid`,
or a :class:`Region` pre-read from either. The rule, for a window shown at ``out_px``:

1. level: the deepest pyramid level ``k`` with ``2**k <= side_px / out_px`` (the nearest
   *finer* level; :meth:`~relay_models.geometry.Window.level`); levels are built by
   :func:`halve_mean` (imagery) and :func:`halve_mode` (labels), 2x per level;
2. resample from that level (:func:`relay_models.sampling.read_window`): a plain slice when
   the window is pixel-aligned at that level, an exact area average when it is unrotated and
   still larger than ``out_px`` (non-power-of-two factors, rescaled windows), bilinear
   otherwise (rotated or magnified windows);
3. normalise with the model's :class:`~relay_models.spec.DataSpec`: ``(x - mean) / std``,
   and 0 (the band mean) where there is no data or outside the raster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from .geometry import Window, WindowPair
from .sampling import read_window as resample

#: Label value for "no label" (also the class COG's nodata).
IGNORE = 255

Box = tuple[int, int, int, int]


class Pyramid(Protocol):
    """A raster at level 0 and ``num_levels`` levels, each 2x coarser than the one above."""

    @property
    def num_levels(self) -> int: ...

    def shape(self, level: int = 0) -> tuple[int, int]: ...

    def read_box(self, box: Box, level: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """``(y0, x0, y1, x1)`` at ``level``, padded outside the raster: ``(C, h, w)``
        float32 with NaN = no data, and ``(h, w)`` uint8 labels (255 = none) or None."""
        ...


# ---------------------------------------------------------------- pyramid levels


def _quads(block: np.ndarray) -> list[np.ndarray]:
    """The four pixels of every 2x2 cell of ``(..., 2h, 2w)`` as four ``(..., h, w)`` views."""
    return [block[..., i::2, j::2] for i in (0, 1) for j in (0, 1)]


def halve_mean(block: np.ndarray) -> np.ndarray:
    """Mean over the valid (non-NaN) pixels of each 2x2 cell of ``(..., 2h, 2w)`` float32;
    NaN where none is valid."""
    total = np.zeros(block[..., ::2, ::2].shape, dtype=np.float32)
    count = np.zeros(total.shape, dtype=np.uint8)
    for q in _quads(block):
        ok = ~np.isnan(q)
        total += np.where(ok, q, np.float32(0))
        count += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.float32(np.nan)).astype(np.float32)


def halve_mode(block: np.ndarray) -> np.ndarray:
    """Most frequent valid label of each 2x2 cell (ties: lowest class; all ignored: 255)."""
    quads = _quads(block)
    best = np.full(quads[0].shape, IGNORE, dtype=np.uint8)
    best_count = np.zeros(quads[0].shape, dtype=np.uint8)
    for c in np.unique(block[block != IGNORE]):  # ascending: ties keep the lowest class
        count = sum((q == c).astype(np.uint8) for q in quads)
        better = count > best_count
        best[better] = c
        best_count[better] = count[better]
    return best


def _pad_even(a: np.ndarray, fill: float) -> np.ndarray:
    pads = [(0, 0)] * (a.ndim - 2) + [(0, a.shape[-2] % 2), (0, a.shape[-1] % 2)]
    return np.pad(a, pads, constant_values=fill) if any(p[1] for p in pads) else a


class ArrayPyramid:
    """An in-memory raster with the same levels a scene store holds.

    Args:
        image: ``(C, H, W)`` float32, NaN = no data.
        labels: optional ``(H, W)`` uint8, 255 = none.
        num_levels: levels to build below level 0.
    """

    def __init__(
        self, image: np.ndarray, labels: np.ndarray | None = None, *, num_levels: int = 3
    ) -> None:
        img = np.asarray(image, dtype=np.float32)
        lab = None if labels is None else np.asarray(labels, dtype=np.uint8)
        self.levels: list[tuple[np.ndarray, np.ndarray | None]] = [(img, lab)]
        for _ in range(num_levels):
            img = halve_mean(_pad_even(img, np.nan))
            lab = None if lab is None else halve_mode(_pad_even(lab, IGNORE))
            self.levels.append((img, lab))

    @property
    def num_levels(self) -> int:
        return len(self.levels) - 1

    def shape(self, level: int = 0) -> tuple[int, int]:
        return tuple(self.levels[level][0].shape[1:])

    def read_box(self, box: Box, level: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        image, labels = self.levels[level]
        return _padded(image, box, np.nan), None if labels is None else _padded(labels, box, IGNORE)


def _padded(a: np.ndarray, box: Box, fill: float) -> np.ndarray:
    """``a[..., y0:y1, x0:x1]`` with ``fill`` where the box leaves ``a``."""
    y0, x0, y1, x1 = box
    h, w = a.shape[-2:]
    out = np.full((*a.shape[:-2], y1 - y0, x1 - x0), fill, dtype=a.dtype)
    ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if ys < ye and xs < xe:
        out[..., ys - y0 : ye - y0, xs - x0 : xe - x0] = a[..., ys:ye, xs:xe]
    return out


class Region:
    """A pyramid seen through one pre-read box per level: the windows of a batch of
    neighbouring tiles share chunks, so each chunk is read and decompressed once per batch."""

    def __init__(self, source: Pyramid, windows: Sequence[Window], out_px: int) -> None:
        self.source = source
        self.boxes: dict[int, tuple[Box, tuple[np.ndarray, np.ndarray | None]]] = {}
        by_level: dict[int, list[Box]] = {}
        for win in windows:
            level = window_level(source, win, out_px)
            by_level.setdefault(level, []).append(win.scale(2**level).pixel_bounds())
        for level, boxes in by_level.items():
            union = tuple(f(b[i] for b in boxes) for i, f in enumerate((min, min, max, max)))
            self.boxes[level] = (union, source.read_box(union, level))

    @property
    def num_levels(self) -> int:
        return self.source.num_levels

    def shape(self, level: int = 0) -> tuple[int, int]:
        return self.source.shape(level)

    def read_box(self, box: Box, level: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        (by0, bx0, _, _), (image, labels) = self.boxes[level]
        y0, x0, y1, x1 = box
        rows, cols = slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0)
        return image[:, rows, cols], None if labels is None else labels[rows, cols]


# ---------------------------------------------------------------- reading windows


def window_level(source: Pyramid, window: Window, out_px: int) -> int:
    """The pyramid level ``window`` is read from when shown at ``out_px`` (rule 1)."""
    return window.level(out_px, max_level=source.num_levels)[0]


def read_window(
    source: Pyramid,
    window: Window,
    out_px: int,
    norm: tuple[torch.Tensor, torch.Tensor],
    *,
    labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One window at ``out_px``, read and resampled by the module's rule, normalised.

    Args:
        source: the raster.
        window: the window in level-0 pixels.
        out_px: output side.
        norm: ``(C, 1, 1)`` mean and std (:meth:`DataSpec.norm`).
        labels: also resample the labels (nearest), when the source has them.

    Returns:
        ``(C, L, L)`` float32 normalised bands (0 where there is no data or outside), the
        ``(L, L)`` bool data mask, and ``(L, L)`` int64 labels (255 where invalid) or None.
    """
    level = window_level(source, window, out_px)
    at_level = window.scale(2**level)
    box = at_level.pixel_bounds()
    image, label = source.read_box(box, level)
    origin = box[:2]
    img, _ = resample(torch.from_numpy(image), at_level, out_px, origin_yx=origin, fill=np.nan)
    valid = torch.isfinite(img).all(0)
    mean, std = norm
    img = torch.where(valid, (img - mean) / std, torch.zeros(()))
    lab = None
    if labels and label is not None:
        lab, _ = resample(
            torch.from_numpy(label)[None],
            at_level,
            out_px,
            origin_yx=origin,
            mode="nearest",
            fill=IGNORE,
        )
        lab = lab[0].long().masked_fill(~valid, IGNORE)
    return img, valid, lab


def read_pair(
    source: Pyramid,
    pair: WindowPair,
    out_px: int,
    norm: tuple[torch.Tensor, torch.Tensor],
    *,
    with_global: bool = True,
    labels: bool = False,
    global_valid: bool = False,
) -> dict[str, torch.Tensor]:
    """A local window and (``with_global``) its global window, read by :func:`read_window`.

    Returns:
        ``{"local": (C, L, L), "valid": (L, L) bool, "global": (C, L, L)}`` (no ``global``
        without ``with_global``), plus ``"labels": (L, L)`` int64 when ``labels`` (255
        where there is no label, or everywhere when the source has none) and
        ``"global_valid": (L, L)`` bool when ``global_valid`` (pretraining's loss mask).
    """
    local, valid, lab = read_window(source, pair.local, out_px, norm, labels=labels)
    out = {"local": local, "valid": valid}
    if with_global:
        out["global"], gvalid, _ = read_window(source, pair.global_, out_px, norm)
        if global_valid:
            out["global_valid"] = gvalid
    if labels:
        out["labels"] = (
            lab if lab is not None else torch.full((out_px, out_px), IGNORE, dtype=torch.long)
        )
    return out
