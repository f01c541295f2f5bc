"""Reading a :class:`~relay_models.geometry.Window` out of an in-memory raster."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .geometry import Window


def read_window(
    image: torch.Tensor,
    window: Window,
    out_px: int,
    *,
    origin_yx: tuple[int, int] = (0, 0),
    mode: Literal["bilinear", "nearest"] = "bilinear",
    fill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``window`` from ``image`` onto an ``out_px x out_px`` grid.

    Args:
        image: ``(C, H, W)`` raster, or a region of one whose top-left pixel is ``origin_yx``.
        window: window in the (full) raster's pixel coordinates.
        out_px: output side.
        origin_yx: scene pixel of ``image[:, 0, 0]`` when ``image`` is a region read from a
            larger raster (e.g. a Zarr chunk range around ``window.pixel_bounds()``).
        mode: ``"bilinear"`` for imagery, ``"nearest"`` for labels. An unrotated window
            larger than ``out_px`` is area-averaged instead of bilinear (no aliasing): each
            output pixel is the exact area-weighted mean of the input pixels it covers.
        fill: value for samples outside ``image`` (0 = band mean after normalisation; 255
            for ignored labels).

    Returns:
        ``(C, out_px, out_px)`` samples in ``image``'s dtype for ``nearest`` (float otherwise),
        and a ``(out_px, out_px)`` bool mask of samples that fell inside ``image``.
    """
    c, h, w = image.shape
    local = Window(
        (window.center_yx[0] - origin_yx[0], window.center_yx[1] - origin_yx[1]),
        window.side_px,
        window.angle_deg,
    )
    aligned = local.aligned_origin()
    if aligned is not None and local.side_px == out_px:
        # plain slice with padding: exact, and what untransformed tiles take
        y0, x0 = aligned
        out = image.new_full((c, out_px, out_px), fill)
        valid = torch.zeros(out_px, out_px, dtype=torch.bool, device=image.device)
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + out_px, h), min(x0 + out_px, w)
        if ys < ye and xs < xe:
            out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = image[:, ys:ye, xs:xe]
            valid[ys - y0 : ye - y0, xs - x0 : xe - x0] = True
        return out, valid
    if mode == "bilinear" and local.angle_deg % 360 == 0 and local.side_px > out_px * (1 + 1e-9):
        return _area(image, local, out_px, fill)
    pts = torch.as_tensor(local.sample_points(out_px), dtype=torch.float32, device=image.device)
    valid = (pts[..., 0] >= 0) & (pts[..., 0] < h) & (pts[..., 1] >= 0) & (pts[..., 1] < w)
    # grid_sample, align_corners=False: -1 and 1 are the outer pixel edges, as in our convention
    grid = torch.stack([pts[..., 1] / w * 2 - 1, pts[..., 0] / h * 2 - 1], dim=-1)
    src = image.unsqueeze(0).float()
    out = F.grid_sample(
        src, grid.unsqueeze(0), mode=mode, padding_mode="border", align_corners=False
    )[0]
    out = torch.where(valid, out, torch.full_like(out, fill))
    if mode == "nearest":
        out = out.to(image.dtype)
    return out, valid


def _area_weights(start: float, cell: float, n_out: int, n_in: int) -> torch.Tensor:
    """``(n_out, n_in)`` weights: the fraction of output cell ``i`` (``[start + i * cell,
    start + (i + 1) * cell)`` in input pixels) covered by input pixel ``j``."""
    lo = start + torch.arange(n_out, dtype=torch.float64)[:, None] * cell
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    overlap = torch.minimum(lo + cell, j + 1) - torch.maximum(lo, j)
    return overlap.clamp(min=0) / cell


def _area(image: torch.Tensor, window: Window, out_px: int, fill: float):
    """Area-average an unrotated ``window`` of ``image`` onto ``out_px x out_px``; an output
    pixel touching a NaN (or the outside) is NaN before ``fill``."""
    h, w = image.shape[1:]
    y0, x0, _, _ = window.bounds()
    cell = window.side_px / out_px
    wy = _area_weights(y0, cell, out_px, h)
    wx = _area_weights(x0, cell, out_px, w)
    img = image.double()
    bad = torch.isnan(img).any(0).double()
    out = torch.einsum("yh,chw,xw->cyx", wy, torch.nan_to_num(img, nan=0.0), wx)
    touched_bad = torch.einsum("yh,hw,xw->yx", wy, bad, wx) > 0
    # covered fraction < 1: part of the cell lies outside the image
    inside = torch.outer(wy.sum(1), wx.sum(1)) > 1 - 1e-6
    valid = inside & ~touched_bad
    out = torch.where(valid, out, torch.full_like(out, fill)).to(torch.float32)
    return out.to(image.device), valid.to(image.device)
