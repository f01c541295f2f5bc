"""Mapping one grid cell for one period, on a Ray worker: composite -> scene store ->
tiled model -> cell COG on object storage -> a STAC item (returned, small).

Nothing here returns pixels: the driver of :mod:`relaymap.flows.area` only sends task
descriptors (a cell's grid, the period, its items as STAC JSON) and gets items back.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import dask
import numpy as np
import pystac
import rasterio
import ray
import torch
from affine import Affine
from odc.geo.geobox import GeoBox

from relay_models.engines import TileEngine
from relay_models.inference import predict_source
from relay_models.stitch import crop_sink
from relay_models.windows import ArrayPyramid
from relaymap.catalog import map_item
from relaymap.catalog.faults import fault_point
from relaymap.catalog.items import SAFETENSORS_TYPE
from relaymap.catalog.storage import join
from relaymap.ingest import IngestError, write_scene
from relaymap.ingest.composite import CompositeConfig, composite
from relaymap.ingest.profiles import ReadOptions
from relaymap.ingest.ranges import check_range

from .engine import load_engine
from .infer import actor_cpus, new_generation, scratch_dir
from .options import MapOptions
from .products.cog import GDAL_CACHE_MB, MapWriter, publish
from .trained import ModelInfo


def geobox_to_dict(gbox: GeoBox) -> dict[str, Any]:
    """A grid as JSON: CRS (WKT), affine transform and ``(height, width)``."""
    return {
        "crs": gbox.crs.to_wkt(),
        "transform": list(gbox.transform)[:6],
        "shape": list(gbox.shape),
    }


def geobox_from_dict(d: dict[str, Any]) -> GeoBox:
    return GeoBox(tuple(d["shape"]), Affine(*d["transform"]), d["crs"])


#: Cells in flight per actor: while one holds the model, the next is composited (reads,
#: decodes) and the previous one's COG is written, so I/O hides behind the forward pass.
CELLS_IN_FLIGHT = 2


class CellMapper:
    """Model actor of the area job (:mod:`relaymap.flows.pool`): loads its engine once
    (:func:`relaymap.flows.engine.load_engine`: the model in torch, or its ONNX export in
    ONNX Runtime), then maps one ``(cell, period)`` task per call (:func:`map_cell`). Up to
    :data:`CELLS_IN_FLIGHT` calls run at once, in threads; only one at a time runs the
    model (``model_lock``), so memory holds at most that many cells and the model's threads
    are never shared, and only one at a time composites (``composite_lock``: on an actor's
    first two calls, the first cell is not slowed by the second's)."""

    def __init__(
        self,
        model_url: str,
        use_gpu: bool,
        engine: Literal["torch", "onnxruntime"] = "torch",
        onnx: str | None = None,
    ) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # dask (compositing) and the engine get the CPUs Ray gave this actor, as torch does
        # (Ray sets OMP_NUM_THREADS): never more threads than the actor's share of the node
        cpus = actor_cpus()
        self.info, self.model = load_engine(
            model_url, engine, onnx, device=self.device, threads=cpus
        )
        dask.config.set(scheduler="threads", num_workers=cpus)
        self.model_lock, self.composite_lock = threading.Lock(), threading.Lock()

    def map(self, task: str) -> str:
        """One task (its JSON) -> its result (JSON): small strings both ways."""
        locks = {"model_lock": self.model_lock, "composite_lock": self.composite_lock}
        return json.dumps(map_cell(self.model, self.info, json.loads(task), self.device, **locks))


def map_cell(
    model: torch.nn.Module | TileEngine,
    info: ModelInfo,
    task: dict[str, Any],
    device: torch.device,
    *,
    model_lock: AbstractContextManager | None = None,
    composite_lock: AbstractContextManager | None = None,
) -> dict[str, Any]:
    """Map one task (see :func:`relaymap.flows.area.plan`); returns a small result:
    ``status`` (``mapped``, ``nodata`` or ``failed``), the item as JSON, pixel counts.
    ``model_lock`` is held only while the model runs: the composite before it and the
    COG upload after it run alongside another cell's forward pass. ``composite_lock`` is
    held while the cell is composited: two cells in flight composite one after the other,
    so the first reaches the model as soon as it can."""
    t0 = time.perf_counter()
    spec = info.spec
    opts = MapOptions.model_validate(task["options"])
    recipe = CompositeConfig.model_validate(task["composite"])
    read = ReadOptions.model_validate(task["read"])
    cell = geobox_from_dict(task["geobox"])
    halo = task["halo"]
    padded = cell.pad(halo)
    h, w = cell.shape
    result: dict[str, Any] = {
        "cell": task["cell"],
        "period": task["period"],
        "item_id": task["item_id"],
        "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
        "threads": torch.get_num_threads(),
        "pixels": h * w,
        "mapped_px": 0,
        "tiles": 0,
        "counts": [0] * spec.num_classes,
        "warnings": [],
        "stage_seconds": {},
    }
    stages = result["stage_seconds"]
    try:
        items = [pystac.Item.from_dict(d, migrate=False) for d in task["items"]]
        with composite_lock or nullcontext():
            t1 = time.perf_counter()
            stages["wait"] = t1 - t0
            # 1024 px read chunks: a third less dask overhead than 512 (bench/aoi.py)
            image, warnings = composite(items, spec.bands, padded, recipe, read=read, chunk_px=1024)
            result["warnings"] = warnings
            store = write_scene(task["store"], image, overwrite=True)
            # the padded cell in memory (bounded by the cell size): tiles read slices, not
            # zarr chunks again and again
            h_px, w_px = store.shape(0)
            image = store.read_box((0, 0, h_px, w_px))[0]
            stages["composite"] = time.perf_counter() - t1
        crop = (halo, halo, halo + h, halo + w)
        inside = image[:, crop[0] : crop[2], crop[1] : crop[3]]
        where = f"the composite of cell {task['cell']} in {task['period']}"
        check_range(inside, spec.bands, spec.mean, spec.std, where=where)
        clear = int(np.isfinite(inside).all(0).sum())
        if clear == 0:
            result["status"] = "nodata"
            result["seconds"] = time.perf_counter() - t0
            return result
        urls = {
            "classes": join(task["prefix"], generation := new_generation(), "classes.tif"),
            "probabilities": join(task["prefix"], generation, "probabilities.tif")
            if opts.probabilities
            else None,
            "quicklook": join(task["prefix"], generation, "quicklook.png")
            if opts.quicklook
            else None,
        }
        with scratch_dir() as tmp, rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            writer = MapWriter(
                Path(tmp),
                cell,
                spec.class_table(),
                probabilities=opts.probabilities,
                low_confidence=task.get("low_confidence"),
            )
            try:
                waiting = time.perf_counter()
                with model_lock or nullcontext():
                    t1 = time.perf_counter()
                    stages["wait"] += t1 - waiting
                    tiles_run, _ = predict_source(
                        model,
                        ArrayPyramid(image, num_levels=store.num_levels),
                        crop_sink(writer.sink, crop),
                        tile_px=opts.tile_px,
                        overlap_px=opts.overlap_px,
                        crop=crop,
                        batch_size=opts.batch_size,
                        device=device,
                        precision=opts.precision,
                    )
                    stages["predict"] = time.perf_counter() - t1
            finally:
                writer.close()
            publish(Path(tmp), urls, spec.class_table(), compress=opts.compress)
        fault_point("area:cell-uploaded")  # crash tests: a COG no item points at yet
        item = _item(task, info, store, urls, writer.counts, cell)
        pixel_km2 = abs(cell.transform.determinant) / 1e6  # the doubtful part of each class
        item.properties["relaymap:low_confidence_km2"] = {
            n: round(float(c) * pixel_km2, 6)
            for n, c in zip(spec.class_names, writer.low_counts, strict=True)
        }
        result.update(
            status="mapped",
            item=item.to_dict(transform_hrefs=False),
            generation=generation,
            mapped_px=int(writer.counts.sum()),
            tiles=tiles_run,
            counts=[int(c) for c in writer.counts],
        )
    except IngestError as e:  # bad input in this cell: reported, the other cells go on
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
    result["seconds"] = time.perf_counter() - t0
    stages["write"] = result["seconds"] - sum(stages.values())
    return result


def _item(task, info: ModelInfo, store, urls, counts: np.ndarray, cell: GeoBox) -> pystac.Item:
    spec = info.spec
    start = dt.datetime.fromisoformat(task["start"])
    item = map_item(
        urls["classes"],
        item_id=task["item_id"],
        collection=task["collection"],
        classes=spec.class_table(),
        sources=list(zip(store.attrs.source_items, store.attrs.source_hrefs, strict=True)),
        model_item=info.item,
        datetime=start,
        probabilities_url=urls["probabilities"],
        quicklook_url=urls["quicklook"],
    )
    if info.item is None:  # weights without an MLM item: link the weights themselves
        item.add_link(
            pystac.Link(
                "derived_from",
                info.weights_url,
                media_type=SAFETENSORS_TYPE,
                title=f"model {info.name}",
            )
        )
    pixel_km2 = abs(cell.transform.determinant) / 1e6
    total = cell.shape[0] * cell.shape[1]
    item.properties.update(
        {
            "start_datetime": task["start"].replace("+00:00", "Z"),
            "end_datetime": task["end"].replace("+00:00", "Z"),
            "relaymap:cell": task["cell"],
            "relaymap:period": task["period"],
            "relaymap:model": info.name,
            "relaymap:inputs": task["fingerprint"],
            "relaymap:valid_fraction": round(float(counts.sum()) / total, 6),
            "relaymap:observable_km2": round(float(counts.sum()) * pixel_km2, 6),
            "relaymap:class_areas_km2": {
                n: round(float(c) * pixel_km2, 6)
                for n, c in zip(spec.class_names, counts, strict=True)
            },
            "relaymap:options": task["options"],
            "relaymap:composite": task["composite"],
        }
    )
    return item
