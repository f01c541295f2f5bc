"""Batch inference on Ray Data: a scene store to a land-cover COG on object storage + STAC.

The tiled-inference engine of :mod:`relay_models.inference`, spread over a Ray cluster:

1. tiles: :func:`~relay_models.inference.plan_tiles` over the scene;
2. read (Ray Data ``map_batches``): :func:`~relay_models.inference.read_tiles` from the
   store, as the model's data spec says;
3. predict (``map_batches`` on an ``ActorPoolStrategy`` of model actors; one GPU each when
   the cluster has GPUs; ``options.precision``, bf16 on GPUs and on CPUs with native bf16
   matmuls): :func:`~relay_models.inference.run_tiles`;
4. stitch (driver, tiles in order): :class:`~relay_models.stitch.RowStitcher` hands
   finished rows to scratch GeoTIFFs strip by strip;
5. products (:mod:`relaymap.flows.cog`): class COG, probability COG and a quicklook, each
   uploaded atomically into a new generation folder ``<out>/<item id>/<generation>/``;
   then the map item (same id on a rerun) is upserted to point at them, and only then are
   older generations removed. A crash at any point leaves the item and the files it points
   at consistent; what a crashed run left is removed by the next one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pystac
import rasterio
import torch
from tqdm.auto import tqdm

from relay_models import DataSpec, FrozenConfig
from relay_models.geometry import Tile
from relay_models.inference import (
    default_batch_size,
    plan_tiles,
    read_tiles,
    run_tiles,
    tile_overlap,
)
from relay_models.precision import Precision
from relay_models.spec import PIXEL_SIZE_TOLERANCE
from relay_models.stitch import RowStitcher
from relaymap.catalog import map_item, open_catalog
from relaymap.catalog.faults import fault_point
from relaymap.catalog.storage import check_id, check_writable, filesystem, join, normalize_url
from relaymap.ingest import SceneStore, StoreError, ingest_items, open_scene
from relaymap.ingest.ranges import check_range

from .cog import GDAL_CACHE_MB, MapWriter, publish
from .jobs import connect_ray
from .options import MapOptions, SafeId
from .trained import ModelError, ModelInfo, load_trained, read_info

log = logging.getLogger(__name__)


class InferConfig(FrozenConfig):
    """One mapping job: a model, a scene store, where the products go, and how."""

    #: Model: safetensors weights written by training, or its MLM item (``.json``).
    model: str
    #: Scene store URL (``ingest``); :func:`map_items` ingests STAC items to it first.
    scene: str
    #: Output prefix; products go to ``<out>/<item id>/``.
    out: str
    #: Static catalog URL or STAC API for the map item; none: not registered.
    catalog: str | None = None
    collection: SafeId = "relaymap-maps"
    #: Map item id; default ``<scene name>-<model name>`` (stable, so reruns replace).
    item_id: SafeId | None = None
    options: MapOptions = MapOptions()


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


def check_scene(store: SceneStore, info: ModelInfo) -> None:
    """Fail before any compute when the model cannot map this scene.

    Raises:
        ModelError: bands, classes or pixel size differ from the model's.
        StoreError: the scene has no valid pixel.
        OutOfRangeError: values far from what the model was trained on (e.g. raw counts).
    """
    spec = info.spec
    if store.bands != spec.bands:
        raise ModelError(
            f"model {info.weights_url} expects bands {list(spec.bands)} but scene "
            f"{store.url} has {list(store.bands)}; ingest the scene with the model's bands"
        )
    if store.attrs.classes:
        names = [c["name"] for c in store.attrs.classes]
        if names != spec.class_names:
            raise ModelError(
                f"scene {store.url} is labelled with classes {names} but the model predicts "
                f"{spec.class_names}"
            )
    size = abs(store.geobox(0).resolution.x)
    if spec.pixel_size and abs(size / spec.pixel_size - 1) > PIXEL_SIZE_TOLERANCE:
        raise ModelError(
            f"scene {store.url} has {size:g} m pixels but model {info.weights_url} was trained "
            f"on {spec.pixel_size:g} m pixels; ingest the scene at {spec.pixel_size:g} m "
            f"(relaymap ingest --resolution {spec.pixel_size:g}, or --model with this model)"
        )
    coarsest = store.level(store.num_levels)["image"].values  # what the model would see
    if not np.isfinite(coarsest).all(0).any():
        raise StoreError(f"scene {store.url} is empty: every pixel is nodata")
    check_range(coarsest, spec.bands, spec.mean, spec.std, where=f"scene {store.url}")


# ---------------------------------------------------------------- Ray Data stages


@functools.lru_cache(maxsize=8)
def _store(url: str, fingerprint: str) -> SceneStore:
    """Stores opened once per worker process; the fingerprint tells a rewritten store apart."""
    return open_scene(url)


@functools.lru_cache(maxsize=8)
def _plan(shape_yx: tuple[int, int], tile_px: int, overlap_px: int) -> list[Tile]:
    return plan_tiles(shape_yx, tile_px, overlap_px)


def read_stage(
    batch: dict[str, np.ndarray],
    *,
    scene: str,
    fingerprint: str,
    spec: str,
    tile_px: int,
    overlap_px: int,
) -> dict[str, np.ndarray]:
    """Ray Data stage: tile indices -> the tiles' model inputs (:func:`read_tiles`)."""
    store = _store(scene, fingerprint)
    tiles = _plan(store.shape(0), tile_px, overlap_px)
    out = read_tiles(store, [tiles[int(i)] for i in batch["index"]], _spec(spec))
    return {"index": batch["index"], **{k: v.numpy() for k, v in out.items()}}


@functools.lru_cache(maxsize=8)
def _spec(text: str) -> DataSpec:
    return DataSpec.model_validate_json(text)


class Predictor:
    """Ray Data actor: loads the model once; per batch, class probabilities of the tiles
    with data (:func:`run_tiles`), in ``precision`` (:mod:`relay_models.precision`)."""

    def __init__(self, model_url: str, use_gpu: bool, precision: Precision = "auto") -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.precision = precision
        self.model = load_trained(model_url)[1].to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tiles = {k: torch.from_numpy(batch[k]) for k in ("local", "valid", "global") if k in batch}
        probs, ran = run_tiles(self.model, tiles, self.device, precision=self.precision)
        return {"index": batch["index"], "probs": probs, "valid": batch["valid"], "ran": ran}


def configure_ray_data() -> None:
    """Ray Data settings of the mapping job: results in tile order, our own progress bar."""
    from ray.data import DataContext

    if not logging.getLogger("relaymap").isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # set up by Ray Data's import
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the stitcher needs tile_grid order
    ctx.enable_progress_bars = False  # our tqdm bar shows tiles/s and ETA


def predict_scene(
    info: ModelInfo,
    store: SceneStore,
    tile_px: int,
    overlap_px: int,
    *,
    batch_size: int,
    workers: int,
    use_gpu: bool,
    precision: Precision = "auto",
):
    """Run the Ray Data pipeline; yields ``(index, probs, valid, ran)`` batches in tile order."""
    import ray
    from ray.data import ActorPoolStrategy

    configure_ray_data()
    n = len(_plan(store.shape(0), tile_px, overlap_px))
    ds = (
        ray.data.from_items(
            [{"index": i} for i in range(n)], override_num_blocks=max(1, math.ceil(n / batch_size))
        )
        .map_batches(
            read_stage,
            batch_size=batch_size,
            fn_kwargs={
                "scene": store.url,
                "fingerprint": store.attrs.fingerprint,
                "spec": info.spec.model_dump_json(),
                "tile_px": tile_px,
                "overlap_px": overlap_px,
            },
        )
        .map_batches(
            Predictor,
            fn_constructor_kwargs={
                "model_url": info.weights_url,
                "use_gpu": use_gpu,
                "precision": precision,
            },
            compute=ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            **({"num_gpus": 1} if use_gpu else {"num_cpus": 1}),
        )
    )
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield b["index"], b["probs"], b["valid"], b["ran"]


# ---------------------------------------------------------------- the job


def map_item_id(scene: str, model_name: str) -> str:
    """The map item id of a scene (store URL or item id) and a model's identity
    (:attr:`ModelInfo.name`): stable, so a rerun replaces the map and never duplicates it.

    Raises:
        ValueError: an id unsafe as a path or URL segment.
    """
    stem = scene.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    return check_id(f"{stem}-{model_name}", "map item id")


def infer(config: InferConfig, *, address: str | None = None, progress: bool = True) -> MapProduct:
    """Map one scene store with a trained model; write COGs, quicklook and the STAC item.

    Raises:
        StoreError: missing/unfinished/empty scene store.
        ModelError: unreadable model, or bands/classes that do not match the scene.
        StorageError: an output location that cannot be written.
    """
    import ray

    t0 = time.perf_counter()
    info = read_info(config.model)  # the actors load the weights; here the header will do
    store = open_scene(config.scene)
    check_scene(store, info)
    opts, spec = config.options, info.spec
    tile_px = opts.tile_px or spec.window_px
    overlap = tile_overlap(tile_px, opts.overlap_px)
    tiles = _plan(store.shape(0), tile_px, overlap)  # raises on a bad overlap
    check_writable(normalize_url(config.out))  # before any compute
    connect_ray(address)
    use_gpu = opts.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    item_id = config.item_id or map_item_id(store.url, info.name)  # both checked ids
    prefix = join(normalize_url(config.out), item_id)
    generation = join(prefix, new_generation())
    urls = {
        "classes": join(generation, "classes.tif"),
        "probabilities": join(generation, "probabilities.tif") if opts.probabilities else None,
        "quicklook": join(generation, "quicklook.png") if opts.quicklook else None,
    }
    skipped = 0
    with (
        scratch_dir() as tmp,
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB),
    ):
        writer = MapWriter(
            Path(tmp), store.geobox(0), spec.class_table(), probabilities=opts.probabilities
        )
        stitcher = RowStitcher(store.shape(0), spec.num_classes, tile_px, overlap, writer.sink)
        bar = tqdm(total=len(tiles), unit="tile", desc=f"mapping {item_id}", disable=not progress)
        try:
            for index, probs, valid, ran in predict_scene(
                info,
                store,
                tile_px,
                overlap,
                batch_size=opts.batch_size or default_batch_size(tile_px),
                workers=opts.workers,
                use_gpu=use_gpu,
                precision=opts.precision,
            ):
                for i, p, v, r in zip(index, probs, valid, ran, strict=True):
                    stitcher.add(tiles[int(i)], p if r else None, v)
                    skipped += not r
                bar.update(len(index))
            stitcher.close()
        finally:
            bar.close()
            writer.close()
        publish(Path(tmp), urls, spec.class_table(), compress=opts.compress)
    item = map_item(
        urls["classes"],
        item_id=item_id,
        collection=config.collection,
        classes=spec.class_table(),
        sources=_sources(store),
        model_item=info.item,
        datetime=_when(store),
        probabilities_url=urls["probabilities"],
        quicklook_url=urls["quicklook"],
    )
    item.properties["relaymap:options"] = opts.model_dump(mode="json")
    pixel_km2 = abs(store.geobox(0).transform.determinant) / 1e6  # metres: projected grids
    item.properties["relaymap:class_areas_km2"] = {
        name: round(float(n) * pixel_km2, 6)
        for name, n in zip(spec.class_names, writer.counts, strict=True)
    }
    if config.catalog:
        fault_point("infer:products-written")  # crash tests: uploaded, not yet pointed at
        open_catalog(config.catalog).add_items([item])  # the flip: readers see the new files
    remove_generations(prefix, keep=generation)
    return MapProduct(
        item,
        urls["classes"],
        urls["probabilities"],
        urls["quicklook"],
        len(tiles),
        skipped,
        time.perf_counter() - t0,
    )


#: Scratch folders of mapping runs: ``relaymap-infer-<pid>-<random>`` in the temp dir.
SCRATCH = re.compile(r"relaymap-infer-(\d+)-\w+")


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """A scratch folder for this run, named by our pid; first removes the folders of runs
    whose process is gone (a ``kill -9`` skips ``TemporaryDirectory``'s clean-up)."""
    root = Path(tempfile.gettempdir())
    for old in root.glob("relaymap-infer-*"):
        m = SCRATCH.fullmatch(old.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"relaymap-infer-{os.getpid()}-") as tmp:
        yield tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


#: A product generation folder: ``<UTC time>-<random>``, sortable, never reused.
GENERATION = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")


def new_generation() -> str:
    """A fresh generation name: a rerun writes new keys, never over the files an item
    points at."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def remove_generations(prefix: str, *, keep: str) -> None:
    """Remove the product generations under ``prefix`` other than ``keep`` (after the item
    points at ``keep``; leftovers of a crashed run go the same way). Only folders named
    like a generation are touched."""
    fs, path = filesystem(prefix)
    fs.invalidate_cache(path)
    keep_name = keep.rstrip("/").rsplit("/", 1)[-1]
    for child in fs.ls(path, detail=False) if fs.exists(path) else []:
        name = child.rstrip("/").rsplit("/", 1)[-1]
        if GENERATION.fullmatch(name) and name != keep_name:
            fs.rm(child, recursive=True)


def _when(store: SceneStore) -> dt.datetime | None:
    return dt.datetime.fromisoformat(store.attrs.datetime) if store.attrs.datetime else None


def _sources(store: SceneStore) -> list[tuple[str, str]]:
    ids = store.attrs.source_items
    return list(zip(ids, store.attrs.source_hrefs or ("",) * len(ids), strict=True))


def map_items(items: Sequence[pystac.Item], config: InferConfig, **kw) -> MapProduct:
    """Ingest STAC ``items`` (the model's bands, no labels) to ``config.scene``, then map it."""
    bands = read_info(config.model).spec.bands
    ingest_items(items, config.scene, bands, label_asset=None)
    return infer(config, **kw)
