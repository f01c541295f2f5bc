"""Batch inference on Ray: a scene store to a land-cover COG on object storage + STAC.

The tiled-inference engine of :mod:`relay_models.inference`, spread over a Ray cluster:

1. tiles: :func:`~relay_models.inference.plan_tiles` over the scene;
2. read and predict, on a pool of model actors (:mod:`relaymap.flows.pool`; one GPU each
   when the cluster has GPUs), a batch of tiles per call:
   :func:`~relay_models.inference.read_tiles` from the store, as the model's data spec
   says, then :func:`~relay_models.inference.run_tiles` by the job's engine
   (:mod:`relaymap.flows.engine`: torch in ``options.precision``, bf16 on GPUs and on CPUs
   with native bf16 matmuls, or the model's ONNX export in ONNX Runtime);
4. stitch (driver, tiles in order): :class:`~relay_models.stitch.RowStitcher` hands
   finished rows to scratch GeoTIFFs strip by strip;
5. products (:mod:`relaymap.flows.products.cog`): class COG, probability COG and a quicklook, each
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
from typing import Literal

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
from relaymap.ingest.ranges import FIX_BY_REINGEST, check_range

from .engine import load_engine, plan_engine
from .jobs import connect_ray
from .options import MapOptions, SafeId
from .pool import actor_pool, run_ordered
from .products.cog import GDAL_CACHE_MB, MapWriter, publish
from .trained import ModelError, ModelInfo, read_info

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
    where = f"scene {store.url}"  # infer has no --scale: the fix is to ingest again
    check_range(coarsest, spec.bands, spec.mean, spec.std, where=where, fix=FIX_BY_REINGEST)


# ---------------------------------------------------------------- the actors


@functools.lru_cache(maxsize=8)
def _store(url: str, fingerprint: str) -> SceneStore:
    """Stores opened once per actor; the fingerprint tells a rewritten store apart."""
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
    """Tile indices -> the tiles' model inputs (:func:`read_tiles`)."""
    store = _store(scene, fingerprint)
    tiles = _plan(store.shape(0), tile_px, overlap_px)
    out = read_tiles(store, [tiles[int(i)] for i in batch["index"]], _spec(spec))
    return {"index": batch["index"], **{k: v.numpy() for k, v in out.items()}}


@functools.lru_cache(maxsize=8)
def _spec(text: str) -> DataSpec:
    return DataSpec.model_validate_json(text)


class Predictor:
    """Model actor of :func:`predict_scene`: loads its engine once
    (:func:`relaymap.flows.engine.load_engine`: the model in torch, in ``precision``, or its
    ONNX export in ONNX Runtime with the actor's CPUs as threads); per call, reads a batch
    of tiles from the store (:func:`read_stage`) and gives the class probabilities of those
    with data (:func:`run_tiles`)."""

    def __init__(
        self,
        model_url: str,
        use_gpu: bool,
        precision: Precision = "auto",
        engine: Literal["torch", "onnxruntime"] = "torch",
        onnx: str | None = None,
        read: dict | None = None,
    ) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.precision, self.read = precision, read
        _, self.model = load_engine(
            model_url, engine, onnx, device=self.device, threads=actor_cpus()
        )

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:func:`read_stage` output -> ``index``, ``probs``, ``valid``, ``ran``."""
        tiles = {k: torch.from_numpy(batch[k]) for k in ("local", "valid", "global") if k in batch}
        probs, ran = run_tiles(self.model, tiles, self.device, precision=self.precision)
        return {"index": batch["index"], "probs": probs, "valid": batch["valid"], "ran": ran}

    def map_tiles(self, index: list[int]) -> dict[str, np.ndarray]:
        """Tiles ``index`` of the scene (``read``: :func:`read_stage`'s keywords), read and
        run."""
        return self.predict(read_stage({"index": np.asarray(index)}, **self.read))


def actor_cpus() -> int:
    """The CPUs Ray gave this actor (1 outside Ray): the threads its engine may use."""
    import ray

    if not ray.is_initialized():
        return max(1, torch.get_num_threads())
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


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
    engine: Literal["torch", "onnxruntime"] = "torch",
    onnx: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Run the tiles through a pool of :class:`Predictor` actors (:mod:`relaymap.flows.pool`);
    yields ``(index, probs, valid, ran)`` batches in tile order."""
    n = len(_plan(store.shape(0), tile_px, overlap_px))
    read = {
        "scene": store.url,
        "fingerprint": store.attrs.fingerprint,
        "spec": info.spec.model_dump_json(),
        "tile_px": tile_px,
        "overlap_px": overlap_px,
    }
    kwargs = {
        "model_url": info.weights_url,
        "use_gpu": use_gpu,
        "precision": precision,
        "engine": engine,
        "onnx": onnx,
        "read": read,
    }
    batches = (list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size))
    size = max(1, min(workers, math.ceil(n / batch_size)))
    with actor_pool(Predictor, kwargs, size=size, use_gpu=use_gpu) as actors:
        # two batches queued per actor: the next one is there when one ends
        for b in run_ordered(actors, "map_tiles", batches, in_flight=2):
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
    engine, onnx = plan_engine(info, opts, tile_px, use_gpu=use_gpu)  # before the actors
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
                engine=engine,
                onnx=onnx,
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
