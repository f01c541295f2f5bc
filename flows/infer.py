"""Batch inference on Ray Data: a scene store to a land-cover COG on object storage + STAC.

The data path, top to bottom:

1. tiles: :func:`relay_models.geometry.tile_grid` over the scene (overlapping local tiles);
2. read (Ray Data ``map_batches``): each tile's local window from level 0 and its centred
   global window from the store level that matches the model's factor, z-scored with the
   model's training statistics;
3. predict (``map_batches`` on an ``ActorPoolStrategy`` of model actors; one GPU each when
   the cluster has GPUs, bf16 there): class probabilities, skipping tiles with no data;
4. stitch (driver, tiles in order): cosine-blended rows flushed as soon as no pending tile
   touches them (:mod:`flows.stitch`), into scratch GeoTIFFs strip by strip;
5. products (:mod:`flows.cog`): class COG, probability COG and a quicklook, each uploaded
   atomically, then the map item upserted into the catalog (same id on a rerun).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pystac
import rasterio
import torch
from pydantic import Field
from tqdm.auto import tqdm

from catalog import map_item, open_catalog
from catalog.storage import join, normalize_url
from ingest import SceneStore, StoreError, ingest_items, open_scene
from relay_models.config import FrozenConfig
from relay_models.geometry import Tile, Window, tile_grid, window_pair
from relay_models.inference import predict_tiles

from .cog import GDAL_CACHE_MB, NODATA, PROB_SCALE, StripWriter, palette, publish
from .dataset import band_norm, read_normalised
from .stitch import RowStitcher
from .trained import ModelError, ModelInfo, load_trained, read_info

log = logging.getLogger(__name__)


class InferConfig(FrozenConfig):
    """One mapping job: a model, a scene store, where the products go."""

    #: Model: safetensors weights written by training, or its MLM item (``.json``).
    model: str
    #: Scene store URL (``ingest``); :func:`map_items` ingests STAC items to it first.
    scene: str
    #: Output prefix; products go to ``<out>/<item id>/``.
    out: str
    #: Static catalog URL or STAC API for the map item; none: not registered.
    catalog: str | None = None
    collection: str = "relaymap-maps"
    #: Map item id; default ``<scene name>-<model name>`` (stable, so reruns replace).
    item_id: str | None = None
    #: Local tile side; default the model's training window.
    tile_px: int | None = Field(default=None, ge=32)
    #: Overlap between neighbouring tiles; default a quarter tile.
    overlap_px: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=8, ge=1)
    #: Model actors (one GPU each on a GPU cluster, one CPU each otherwise).
    workers: int = Field(default=2, ge=1)
    #: Use GPUs; default: when the Ray cluster has any.
    use_gpu: bool | None = None
    #: Also write the per-class probability COG (K bands, round(p * 254), 255 = nodata).
    probabilities: bool = False
    quicklook: bool = True
    compress: Literal["DEFLATE", "ZSTD"] = "DEFLATE"


@dataclass(frozen=True)
class MapProduct:
    """What :func:`infer` made."""

    item: pystac.Item
    classes_url: str
    probabilities_url: str | None
    quicklook_url: str | None
    tiles: int
    skipped: int
    seconds: float


# ---------------------------------------------------------------- checks


def check_scene(store: SceneStore, trained: ModelInfo) -> None:
    """Fail before any compute when the model cannot map this scene.

    Raises:
        ModelError: bands or classes differ from the model's.
        StoreError: the scene has no valid pixel.
    """
    inputs = trained.inputs
    if store.bands != inputs.bands:
        raise ModelError(
            f"model {trained.weights_url} expects bands {list(inputs.bands)} but scene "
            f"{store.url} has {list(store.bands)}; ingest the scene with the model's bands"
        )
    if store.attrs.classes:
        names = [c["name"] for c in store.attrs.classes]
        expected = [c["name"] for c in inputs.classes]
        if names != expected:
            raise ModelError(
                f"scene {store.url} is labelled with classes {names} but the model predicts "
                f"{expected}"
            )
    coarsest = store.attrs.num_levels
    if not bool(store.valid(coarsest).any()):
        raise StoreError(f"scene {store.url} is empty: every pixel is nodata")


# ---------------------------------------------------------------- Ray Data stages


@functools.lru_cache(maxsize=8)
def _store(url: str, fingerprint: str) -> SceneStore:
    """Stores opened once per worker process; the fingerprint tells a rewritten store apart."""
    return open_scene(url)


class _Region:
    """A store seen through one pre-read box per level: the windows of a batch of adjacent
    tiles share chunks, so each chunk is read and decompressed once per batch, not per tile."""

    def __init__(self, store: SceneStore, windows: Sequence[Window], out_px: int) -> None:
        self.attrs = store.attrs
        self.boxes: dict[int, tuple[tuple[int, int, int, int], np.ndarray]] = {}
        by_level: dict[int, list[tuple[int, int, int, int]]] = {}
        for win in windows:
            level, _ = win.level(out_px, max_level=store.attrs.num_levels)
            by_level.setdefault(level, []).append(win.scale(2**level).pixel_bounds())
        for level, boxes in by_level.items():
            y0, x0, y1, x1 = (f(b[i] for b in boxes) for i, f in enumerate((min, min, max, max)))
            self.boxes[level] = ((y0, x0, y1, x1), store.read_box((y0, x0, y1, x1), level)[0])

    def read_window(self, window: Window, level: int = 0):
        (by0, bx0, _, _), image = self.boxes[level]
        y0, x0, y1, x1 = window.scale(2**level).pixel_bounds()
        return image[:, y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0], None, (y0, x0)


def read_tiles(
    batch: dict[str, np.ndarray],
    *,
    scene: str,
    fingerprint: str,
    tile_px: int,
    factor: int | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, np.ndarray]:
    """Ray Data stage: tile origins -> local (and global) windows and local data masks."""
    norm = band_norm(mean, std)
    centres = [
        (oy + tile_px / 2, ox + tile_px / 2)
        for oy, ox in zip(batch["oy"], batch["ox"], strict=True)
    ]
    locals_ = [Window(c, float(tile_px)) for c in centres]
    globals_ = [window_pair(c, tile_px, factor=factor).global_ for c in centres] if factor else []
    region = _Region(_store(scene, fingerprint), locals_ + globals_, tile_px)
    local, valid = zip(
        *(read_normalised(region, w, tile_px, norm)[:2] for w in locals_), strict=True
    )
    out = {
        "index": batch["index"],
        "local": torch.stack(local).numpy(),
        "valid": torch.stack(valid).numpy(),
    }
    if factor:
        out["global"] = torch.stack(
            [read_normalised(region, w, tile_px, norm)[0] for w in globals_]
        ).numpy()
    return out


class Predictor:
    """Ray Data actor: loads the model once, returns float32 probabilities per tile (zeros
    for tiles without data, which are not run)."""

    def __init__(self, model_url: str, use_gpu: bool) -> None:
        self.trained = load_trained(model_url)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = self.trained.model.to(self.device)
        self.k = self.trained.config.num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        valid = batch["valid"]
        n, size = valid.shape[0], valid.shape[-1]
        probs = np.zeros((n, self.k, size, size), dtype=np.float32)
        run = valid.reshape(n, -1).any(1)
        if run.any():
            local = torch.from_numpy(batch["local"][run]).to(self.device)
            glob = batch.get("global")
            glob = None if glob is None else torch.from_numpy(glob[run]).to(self.device)
            with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
                p = predict_tiles(self.model, local, glob)
            probs[run] = p.float().cpu().numpy()
        return {"index": batch["index"], "probs": probs, "valid": valid, "ran": run}


def _configure_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the stitcher needs tile_grid order
    ctx.enable_progress_bars = False  # our tqdm bar shows tiles/s and ETA


def predict_scene(
    trained_url: str,
    store: SceneStore,
    tiles: Sequence[Tile],
    *,
    factor: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    workers: int,
    use_gpu: bool,
):
    """Run the Ray Data pipeline; yields ``(index, probs, valid, ran)`` batches in tile order."""
    import ray
    from ray.data import ActorPoolStrategy

    _configure_ray_data()
    records = [
        {"index": i, "oy": t.origin_yx[0], "ox": t.origin_yx[1]} for i, t in enumerate(tiles)
    ]
    ds = (
        ray.data.from_items(
            records, override_num_blocks=max(1, math.ceil(len(records) / batch_size))
        )
        .map_batches(
            read_tiles,
            batch_size=batch_size,
            fn_kwargs={
                "scene": store.url,
                "fingerprint": store.attrs.fingerprint,
                "tile_px": tiles[0].tile_px,
                "factor": factor,
                "mean": list(mean),
                "std": list(std),
            },
        )
        .map_batches(
            Predictor,
            fn_constructor_kwargs={"model_url": trained_url, "use_gpu": use_gpu},
            compute=ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            **({"num_gpus": 1} if use_gpu else {"num_cpus": 1}),
        )
    )
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield b["index"], b["probs"], b["valid"], b["ran"]


# ---------------------------------------------------------------- the job


def map_item_id(scene: str, model_name: str) -> str:
    """The map item id of a scene (store URL or item id) and a model: stable, so a rerun
    replaces the map and never duplicates it."""
    stem = scene.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    return f"{stem}-{model_name}"


def infer(config: InferConfig, *, address: str | None = None, progress: bool = True) -> MapProduct:
    """Map one scene store with a trained model; write COGs, quicklook and the STAC item.

    Raises:
        StoreError: missing/unfinished/empty scene store.
        ModelError: unreadable model, or bands/classes that do not match the scene.
    """
    import ray

    t0 = time.perf_counter()
    trained = read_info(config.model)  # the actors load the weights; here the header will do
    store = open_scene(config.scene)
    check_scene(store, trained)
    inputs = trained.inputs
    tile_px = config.tile_px or inputs.window_px
    overlap = tile_px // 4 if config.overlap_px is None else config.overlap_px
    if overlap >= tile_px:
        raise ValueError(f"overlap_px={overlap} must be smaller than tile_px={tile_px}")
    h, w = store.shape(0)
    tiles = tile_grid((h, w), tile_px, overlap_px=overlap)
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    use_gpu = config.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    item_id = config.item_id or map_item_id(store.url, trained.name)
    prefix = join(normalize_url(config.out), item_id)
    urls = {
        "classes": join(prefix, "classes.tif"),
        "probabilities": join(prefix, "probabilities.tif") if config.probabilities else None,
        "quicklook": join(prefix, "quicklook.png") if config.quicklook else None,
    }
    gbox = store.geobox(0)
    k = trained.config.num_classes
    skipped = 0
    with (
        tempfile.TemporaryDirectory(prefix="relaymap-infer-") as tmp,
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB),
    ):
        scratch = Path(tmp)
        writers = {
            "classes": StripWriter(
                str(scratch / "classes.tif"),
                shape_yx=(h, w),
                count=1,
                crs=gbox.crs.to_wkt(),
                transform=gbox.transform,
                colormap=palette(inputs.classes),
            )
        }
        if config.probabilities:
            writers["probabilities"] = StripWriter(
                str(scratch / "probabilities.tif"),
                shape_yx=(h, w),
                count=k,
                crs=gbox.crs.to_wkt(),
                transform=gbox.transform,
            )

        def sink(y0: int, probs: np.ndarray, valid: np.ndarray) -> None:
            classes = np.where(valid, probs.argmax(0), NODATA).astype(np.uint8)
            writers["classes"].write(y0, classes[None])
            if "probabilities" in writers:
                scaled = np.rint(probs * PROB_SCALE).astype(np.uint8)
                writers["probabilities"].write(y0, np.where(valid, scaled, NODATA))

        stitcher = RowStitcher((h, w), k, tile_px, overlap, sink)
        bar = tqdm(total=len(tiles), unit="tile", desc=f"mapping {item_id}", disable=not progress)
        try:
            for index, probs, valid, ran in predict_scene(
                trained.weights_url,
                store,
                tiles,
                factor=trained.factor,
                mean=inputs.band_mean,
                std=inputs.band_std,
                batch_size=config.batch_size,
                workers=config.workers,
                use_gpu=use_gpu,
            ):
                for i, p, v, r in zip(index, probs, valid, ran, strict=True):
                    stitcher.add(tiles[int(i)], p if r else None, v)
                    skipped += not r
                bar.update(len(index))
            stitcher.close()
        finally:
            bar.close()
            for wr in writers.values():
                wr.close()
        publish(scratch, urls, inputs.classes, compress=config.compress)
    item = map_item(
        urls["classes"],
        item_id=item_id,
        collection=config.collection,
        classes=inputs.classes,
        sources=_sources(store),
        model_item=trained.item,
        datetime=_when(store),
        probabilities_url=urls["probabilities"],
        quicklook_url=urls["quicklook"],
    )
    if config.catalog:
        catalog = open_catalog(config.catalog)
        catalog.add_items([item])
    return MapProduct(
        item,
        urls["classes"],
        urls["probabilities"],
        urls["quicklook"],
        len(tiles),
        skipped,
        time.perf_counter() - t0,
    )


def _when(store: SceneStore) -> dt.datetime | None:
    return dt.datetime.fromisoformat(store.attrs.datetime) if store.attrs.datetime else None


def _sources(store: SceneStore) -> list[tuple[str, str]]:
    ids = store.attrs.source_items
    return list(zip(ids, store.attrs.source_hrefs or ("",) * len(ids), strict=True))


def map_items(items: Sequence[pystac.Item], config: InferConfig, **kw) -> MapProduct:
    """Ingest STAC ``items`` (the model's bands, no labels) to ``config.scene``, then map it."""
    bands = read_info(config.model).inputs.bands
    ingest_items(items, config.scene, bands, label_asset=None)
    return infer(config, **kw)
