"""The tiled-inference engine: tiles -> windows -> model -> blended class probabilities.

One core for an in-memory scene (:func:`predict_array`) and for batch inference on Ray Data
(``relaymap.flows.infer``), which runs the same three steps on its workers:

1. :func:`plan_tiles`: overlapping local tiles over the scene (:func:`geometry.tile_grid`);
2. :func:`read_tiles`: each tile's local window and centred global window, read and
   normalised by the window reader (:mod:`relay_models.windows`) as the model's
   :class:`~relay_models.spec.DataSpec` says;
3. :func:`run_tiles`: class probabilities of the local branch, tiles without data skipped,
   by an engine (:mod:`relay_models.engines`: the model in PyTorch, or its ONNX export in
   ONNX Runtime; every function here takes a model or an engine);

and blends the tiles with :class:`~relay_models.stitch.RowStitcher` (its docstring states
the blending rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .engines import TileEngine, as_engine
from .engines import predict_tiles as predict_tiles  # its home before engines.py
from .geometry import Tile, tile_grid
from .precision import Precision
from .spec import DataSpec
from .stitch import Blend, RowStitcher, Sink
from .windows import ArrayPyramid, Pyramid, Region, read_window


def tile_overlap(tile_px: int, overlap_px: int | None = None) -> int:
    """The overlap of neighbouring tiles: ``overlap_px``, by default an eighth of a tile.

    An eighth keeps the accuracy of a quarter (the default before issue 27) at 0.78x its
    tiles: ``bench/overlap.py`` over three seeds, relay and sliding-window models
    (``docs/fidelity.md``, "Tiles")."""
    return tile_px // 8 if overlap_px is None else overlap_px


#: Tile pixels per forward pass by default (:func:`default_batch_size`): 32 tiles of 64 px.
BATCH_PIXELS = 32 * 64 * 64


def default_batch_size(tile_px: int) -> int:
    """Tiles per forward pass by default: about :data:`BATCH_PIXELS` pixels, 8 to 64 tiles
    (8 at 128 px and above, 32 at 64 px, 64 at 32 px). Small tiles need large batches: at
    64 px a batch of 32 ran the relay model 1.33x faster per CPU second than the batch of 8
    that used to be the default; at 256 px 8 is already as fast as larger batches
    (``python bench/speed.py --experiments``, ``docs/benchmarks.md``, "Speed")."""
    return min(64, max(8, BATCH_PIXELS // tile_px**2))


def plan_tiles(
    shape_yx: tuple[int, int], tile_px: int, overlap_px: int | None = None
) -> list[Tile]:
    """Tiles of ``tile_px`` over a scene, overlapping by :func:`tile_overlap`, in row-major
    order (what :class:`RowStitcher` needs)."""
    overlap_px = tile_overlap(tile_px, overlap_px)
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap_px={overlap_px} must be in [0, tile_px={tile_px})")
    return tile_grid(shape_yx, tile_px, overlap_px=overlap_px)


def read_tiles(source: Pyramid, tiles: Sequence[Tile], spec: DataSpec) -> dict[str, torch.Tensor]:
    """The model inputs of ``tiles``, read from ``source`` through one :class:`Region`.

    Returns:
        ``{"local": (N, C, L, L), "valid": (N, L, L) bool}``, plus ``"global": (N, C, L, L)``
        when the spec has a global window; float32, normalised.
    """
    out_px = tiles[0].tile_px
    norm = spec.norm()
    locals_ = [t.window for t in tiles]
    globals_ = [t.pair(spec.factor).global_ for t in tiles] if spec.takes_global else []
    region = Region(source, locals_ + globals_, out_px)
    local, valid = zip(*(read_window(region, w, out_px, norm)[:2] for w in locals_), strict=True)
    out = {"local": torch.stack(local), "valid": torch.stack(valid)}
    if globals_:
        out["global"] = torch.stack([read_window(region, w, out_px, norm)[0] for w in globals_])
    return out


def run_tiles(
    model: nn.Module | TileEngine,
    tiles: dict[str, torch.Tensor],
    device: torch.device | None = None,
    *,
    precision: Precision = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(N, K, L, L)`` float32 of :func:`read_tiles` output (zeros for tiles
    without data, which are not run) and the ``(N,)`` bool mask of tiles that ran. A model
    runs on ``device`` in ``precision`` (:mod:`relay_models.precision`: ``auto`` is bf16 on
    CUDA and on CPUs with bf16 matmuls, fp32 elsewhere); an engine as it was made.
    Probabilities are always float32."""
    engine = as_engine(model, device, precision)
    valid = tiles["valid"]
    n, size = valid.shape[0], valid.shape[-1]
    probs = np.zeros((n, engine.spec.num_classes, size, size), dtype=np.float32)
    ran = valid.reshape(n, -1).any(1).numpy()
    if ran.any():
        glob = tiles.get("global")
        probs[ran] = engine(tiles["local"][ran], None if glob is None else glob[ran]).numpy()
    return probs, ran


def predict_source(
    model: nn.Module | TileEngine,
    source: Pyramid,
    sink: Sink,
    *,
    tile_px: int | None = None,
    overlap_px: int | None = None,
    crop: tuple[int, int, int, int] | None = None,
    batch_size: int | None = None,
    blend: Blend = "cosine",
    device: str | torch.device | None = None,
    precision: Precision = "auto",
    progress: bool = False,
) -> tuple[int, int]:
    """Segment a whole :class:`Pyramid` (a scene store, an array) tile by tile; the blended
    rows go to ``sink`` top to bottom (:class:`RowStitcher`).

    Args:
        model, tile_px, overlap_px, batch_size, blend, device, precision, progress: as
            :func:`predict_array`.
        source: the scene, level 0 of ``source.shape(0)`` pixels.
        sink: receives ``(y0, probs, valid)`` rows of the whole scene.
        crop: ``(y0, x0, y1, x1)``: only tiles that touch this box run (the rest of the
            scene is context, e.g. a cell's halo); wrap ``sink`` in :func:`crop_sink`.

    Returns:
        ``(tiles run, tiles planned)``.
    """
    engine = as_engine(model, device, precision)
    spec: DataSpec = engine.spec
    tile_px = tile_px or spec.window_px
    batch_size = batch_size or default_batch_size(tile_px)
    overlap = tile_overlap(tile_px, overlap_px)
    shape = source.shape(0)
    tiles = plan_tiles(shape, tile_px, overlap)
    if crop is not None:
        cy0, cx0, cy1, cx1 = crop
        wanted = [
            t.origin_yx[0] < cy1
            and t.origin_yx[0] + tile_px > cy0
            and t.origin_yx[1] < cx1
            and t.origin_yx[1] + tile_px > cx0
            for t in tiles
        ]
    else:
        wanted = [True] * len(tiles)
    todo = [t for t, w in zip(tiles, wanted, strict=True) if w]
    stitcher = RowStitcher(shape, spec.num_classes, tile_px, overlap, sink, blend=blend)
    done: dict[int, tuple[np.ndarray | None, np.ndarray]] = {}
    ran_count, next_tile = 0, 0
    with tqdm(total=len(todo), unit="tile", disable=not progress, desc="tiles") as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            inputs = read_tiles(source, batch, spec)
            probs, ran = run_tiles(engine, inputs)
            for t, p, r, v in zip(batch, probs, ran, inputs["valid"].numpy(), strict=True):
                done[id(t)] = (p if r else None, v)
            ran_count += int(ran.sum())
            bar.update(len(batch))
            # tiles go to the stitcher in grid order: skipped ones as no data
            while next_tile < len(tiles) and (
                id(tiles[next_tile]) in done or not wanted[next_tile]
            ):
                result = done.pop(id(tiles[next_tile]), (None, None))
                stitcher.add(tiles[next_tile], *result)
                next_tile += 1
    stitcher.close()
    return ran_count, len(tiles)


@torch.inference_mode()
def predict_array(
    model: nn.Module | TileEngine,
    image: np.ndarray | torch.Tensor,
    *,
    tile_px: int | None = None,
    overlap_px: int | None = None,
    valid: np.ndarray | torch.Tensor | None = None,
    batch_size: int | None = None,
    blend: Blend = "cosine",
    device: str | torch.device | None = None,
    precision: Precision = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """Segment a whole in-memory scene with overlapping tiles.

    Args:
        model: a model from ``create_model`` in eval mode, or an engine running one
            (:mod:`relay_models.engines`); its ``spec`` says how to normalise the bands and
            how large the global window is.
        image: ``(C, H, W)`` bands in the spec's units (``spec.mean`` / ``spec.std``), any
            size; NaN = no data.
        tile_px: local window side L (default ``spec.window_px``).
        overlap_px: overlap between neighbouring tiles (default: an eighth of a tile,
            :func:`tile_overlap`).
        valid: optional ``(H, W)`` bool data mask; pixels outside it count as no data.
        batch_size: tiles per forward pass (default: :func:`default_batch_size`).
        blend: ``cosine`` or ``center`` (:mod:`relay_models.stitch`).
        device: where to run a model (default: the model's device; an engine's own).
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16 matmuls,
            else fp32), ``fp32`` or ``bf16`` (:mod:`relay_models.precision`) for a model (an
            engine has its own); blending and the returned probabilities are float32 either
            way.
        progress: show a tile progress bar.

    Returns:
        ``(K, H, W)`` float32 probabilities on the CPU; all zero where no tile ran.

    Raises:
        ValueError: wrong band count, or no pixel with data.
    """
    spec: DataSpec = model.spec
    image = torch.as_tensor(image, dtype=torch.float32).numpy().copy()
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if image.shape[0] != spec.in_chans:
        raise ValueError(
            f"image has {image.shape[0]} bands but the model expects {spec.in_chans} "
            f"({list(spec.bands)})"
        )
    if valid is not None:
        image[:, ~np.asarray(valid, dtype=bool)] = np.nan
    _, h, w = image.shape
    levels = int(math.log2(spec.factor)) if spec.takes_global else 0
    out = torch.zeros(spec.num_classes, h, w)

    def sink(y0: int, probs: np.ndarray, _valid: np.ndarray) -> None:
        out[:, y0 : y0 + probs.shape[1]] = torch.from_numpy(probs)

    ran, _ = predict_source(
        model,
        ArrayPyramid(image, num_levels=levels),
        sink,
        tile_px=tile_px,
        overlap_px=overlap_px,
        batch_size=batch_size,
        blend=blend,
        device=device,
        precision=precision,
        progress=progress,
    )
    if not ran:
        raise ValueError("no tile has valid data: the scene is empty (all nodata)")
    return out


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
