"""Prefect flows: STAC -> scene stores -> model -> maps -> STAC, retried, idempotent.

* :func:`ingest_flow`: search a STAC API, write one scene store per item;
* :func:`train_flow`: a training run (:mod:`relaymap.flows.train`);
* :func:`infer_flow`: map scene stores, register the map items (:mod:`relaymap.flows.infer`);
* :func:`mapping_pipeline`: AOI + dates -> the scenes not mapped yet -> maps -> STAC,
  training a model first when asked to (one map per scene);
* :func:`area_flow`: an area every period on a fixed grid (:mod:`relaymap.flows.area`), the
  product's main job: scheduled monthly with ``period: last``, or given a range to backfill.

Tasks retry transient failures (network, S3, STAC API) with backoff and fail fast on bad
input. Reruns are cheap: finished stores are kept (``write_scene`` is a no-op on them), map
items are upserted by id, and the pipeline skips scenes whose map item exists. Heavy steps
run on Ray: in-process on local Ray by default, or as Ray jobs (:mod:`relaymap.flows.jobs`) when a
cluster address (``RAY_ADDRESS`` or ``address``, the dashboard URL) is set.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import pystac
import yaml
from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from relay_models.config import FrozenConfig, ModelConfig, ModelOptions
from relaymap.catalog import ItemNotFound, open_catalog
from relaymap.catalog.storage import (
    TRANSPORT_ERRORS,
    StorageError,
    check_id,
    join,
    normalize_url,
)
from relaymap.ingest import NoItemsFound, StacApiError, ingest_items, search
from relaymap.ingest.profiles import ReadOptions

from .area import AreaConfig
from .infer import InferConfig, map_item_id
from .jobs import cluster_address, run_job
from .options import MapOptions, SafeId
from .train import DataConfig, OptimConfig, OutputConfig, RunConfig, TrainConfig
from .trained import read_info

#: Failures worth retrying: the network, object storage, a STAC API.
TRANSIENT = (StacApiError, StorageError, ConnectionError, TimeoutError, *TRANSPORT_ERRORS)
RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=1)}


def _transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only transient errors, never bad input."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


retrying = {**RETRIES, "retry_condition_fn": _transient}


# ---------------------------------------------------------------- parameters


class SceneQuery(ReadOptions):
    """Which imagery: a STAC API search, and how its items become the bands (the source
    profile and overrides, :class:`relaymap.ingest.profiles.ReadOptions`)."""

    stac_api: str
    collections: list[str] = Field(min_length=1)
    #: ``[minlon, minlat, maxlon, maxlat]`` (WGS84).
    bbox: tuple[float, float, float, float] | None = None
    #: RFC 3339 interval, e.g. ``2024-06-01/2024-06-30``.
    datetime: str | None = None
    #: Instead of ``datetime``: the last N days up to now (scheduled runs).
    lookback_days: int | None = Field(default=None, ge=1)
    max_cloud_cover: float | None = Field(default=None, ge=0, le=100)
    bands: list[str] = Field(default=["blue", "green", "red", "nir"], min_length=1)

    @model_validator(mode="after")
    def _one_time_filter(self) -> SceneQuery:
        if self.datetime and self.lookback_days:
            raise ValueError("give 'datetime' or 'lookback_days', not both")
        return self

    def interval(self) -> str | None:
        """The search's datetime interval."""
        if not self.lookback_days:
            return self.datetime
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        start = now - dt.timedelta(days=self.lookback_days)
        return (
            f"{start.isoformat().replace('+00:00', 'Z')}/{now.isoformat().replace('+00:00', 'Z')}"
        )


class IngestParams(FrozenConfig):
    query: SceneQuery
    #: Scene stores go to ``<stores_url>/<item id>.zarr``.
    stores_url: str
    #: Asset with labels (``classification:classes``); none for unlabelled scenes.
    label_asset: str | None = None
    #: Only these item ids (default: every item found).
    item_ids: list[str] | None = None


class InferParams(FrozenConfig):
    model: str
    stores: list[str] = Field(min_length=1)
    out_url: str
    catalog_url: str | None = None
    options: MapOptions = MapOptions()
    address: str | None = None


class TrainParams(FrozenConfig):
    config: TrainConfig
    address: str | None = None


class TrainSpec(FrozenConfig):
    """Training inside the pipeline: labelled items of the search, one model."""

    train_items: list[str] = Field(min_length=1)
    val_items: list[str] = Field(default_factory=list)
    label_asset: str = "labels"
    #: The model's options, as ``model`` of a training config (classes and bands come from
    #: the data); a name alone is ``{name: ...}``.
    model: ModelOptions = ModelOptions()
    steps: int = Field(default=200, ge=1)
    window_px: int = 64
    batch_size: int = 8
    #: From-scratch models want more than the paper's fine-tuning 1e-4.
    lr: float = Field(default=1e-3, gt=0)
    workers: int = Field(default=2, ge=1)
    run_name: SafeId = "relaymap-pipeline"

    @field_validator("model", mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class PipelineParams(FrozenConfig):
    """An AOI and dates to keep mapped with a model (given, or trained first)."""

    query: SceneQuery
    #: Scene stores go to ``<work_url>/scenes``, training runs to ``<work_url>/runs``.
    work_url: str
    #: Map products go to ``<out_url>/<map item id>/``.
    out_url: str
    #: Static catalog URL or STAC API for map (and model) items.
    catalog_url: str
    #: A trained model (weights or MLM item); or ``train`` to train one first.
    model: str | None = None
    train: TrainSpec | None = None
    infer: MapOptions = MapOptions()
    collection: SafeId = "relaymap-maps"
    address: str | None = None

    @model_validator(mode="after")
    def _one_model(self) -> PipelineParams:
        if (self.model is None) == (self.train is None):
            raise ValueError("give exactly one of 'model' (a trained model) or 'train'")
        return self


# ---------------------------------------------------------------- tasks


@task(**retrying, persist_result=True)
def search_scenes(query: SceneQuery) -> list[dict]:
    """The query's items (as dicts: small, persistable); none is a normal outcome for a
    scheduled run (nothing new), not an error."""
    try:
        items = search(
            query.stac_api,
            collections=query.collections,
            bbox=query.bbox,
            datetime=query.interval(),
            max_cloud_cover=query.max_cloud_cover,
            require_assets=query.bands,
            read=query.read_options(),
        )
    except NoItemsFound as e:
        get_run_logger().info("nothing to do: %s", e)
        return []
    get_run_logger().info("%d scenes match on %s", len(items), query.stac_api)
    stage(f"search: {len(items)} scenes on {query.stac_api}")
    return [it.to_dict() for it in items]


@task(**retrying, persist_result=True, task_run_name="ingest {item[id]}")
def ingest_scene(item: dict, stores_url: str, query: SceneQuery, label_asset: str | None) -> str:
    """One item to its scene store (a no-op when the store is complete); the store URL."""
    it = pystac.Item.from_dict(item, migrate=False)
    url = join(normalize_url(stores_url), f"{check_id(it.id, 'STAC item id')}.zarr")
    store = ingest_items([it], url, query.bands, label_asset=label_asset, read=query.read_options())
    get_run_logger().info("scene %s -> %s", it.id, store.url)
    return store.url


@task(**retrying, persist_result=True)
def train_task(config: TrainConfig, address: str | None = None) -> dict:
    """Train (or resume) locally on Ray, or as a Ray job on a cluster; the model's URLs."""
    logger = get_run_logger()
    jobs = cluster_address(address)
    if jobs:
        files = {"train.yaml": yaml.safe_dump(config.model_dump(mode="json"))}
        run_job(jobs, ["train", "train.yaml"], files=files, log=logger.info)
        return _model_urls(config, metrics=None)
    from .train import train

    result = train(config, address=address)
    logger.info("trained %s: %s", config.run.name, result.metrics)
    return _model_urls(config, metrics=result.metrics)


def _model_urls(config: TrainConfig, metrics: dict | None) -> dict:
    """Where a finished run's weights and MLM item are (the item when a catalog is set)."""
    item_url = None
    if config.output.catalog_url:
        catalog = open_catalog(config.output.catalog_url)
        item = catalog.get_item(config.output.collection, config.run.name)
        item_url = item.get_self_href()
        metrics = metrics or item.properties.get("relaymap:metrics", {})
    metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float)}
    return {"weights": config.weights_url, "item": item_url, "metrics": metrics}


@task(**retrying, task_run_name="map {config.scene}")
def infer_task(config: InferConfig, address: str | None = None) -> str:
    """Map one scene; the map item's id."""
    logger = get_run_logger()
    jobs = cluster_address(address)
    if jobs:
        files = {"infer.yaml": yaml.safe_dump(config.model_dump(mode="json"))}
        run_job(jobs, ["infer", "--config", "infer.yaml"], files=files, log=logger.info)
        return config.item_id
    from .infer import infer

    product = infer(config, address=address, progress=True)
    logger.info(
        "mapped %s: %d tiles in %.1f s -> %s",
        config.scene,
        product.tiles,
        product.seconds,
        product.classes_url,
    )
    return product.item.id


def stage(message: str) -> None:
    """One line on the console for a pipeline stage (not a log record: the console stays
    readable with Prefect's logging at WARNING)."""
    tqdm.write(message, file=sys.stderr)


def _gather(
    futures: dict[str, Any], desc: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Results by key, and the error of each key whose task failed (others go on); with
    ``desc``, a progress bar while they finish."""
    done, failed = {}, {}
    for key, fut in tqdm(futures.items(), desc=desc, unit="scene", disable=desc is None):
        fut.wait()
        state = fut.state
        if state.is_completed():
            done[key] = state.result()
        else:
            failed[key] = _message(state)
    return done, failed


def _message(state) -> str:
    try:
        state.result()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return state.message or state.name


# ---------------------------------------------------------------- flows


@flow(name="ingest", log_prints=True)
def ingest_flow(params: IngestParams) -> dict:
    """Search, then one store per item; a scene that fails does not stop the others.

    Returns ``{"stores": {item id: store url}, "failed": {item id: error}}``.
    """
    items = search_scenes(params.query)
    if params.item_ids is not None:
        wanted = set(params.item_ids)
        items = [it for it in items if it["id"] in wanted]
        missing = wanted - {it["id"] for it in items}
        if missing:
            raise ValueError(f"items {sorted(missing)} are not in the search results")
    futures = {
        it["id"]: ingest_scene.submit(it, params.stores_url, params.query, params.label_asset)
        for it in items
    }
    stores, failed = _gather(futures, desc="ingest")
    logger = get_run_logger()
    for item_id, err in failed.items():
        logger.error("scene %s failed to ingest: %s", item_id, err)
    if failed and not stores:
        raise RuntimeError(f"no scene could be ingested: {json.dumps(failed)}")
    return {"stores": stores, "failed": failed}


@flow(name="train", log_prints=True)
def train_flow(params: TrainParams) -> dict:
    """Train (or resume) one run; returns ``{"weights", "item", "metrics"}``."""
    return train_task(params.config, params.address)


@flow(name="infer", log_prints=True)
def infer_flow(params: InferParams) -> dict:
    """Map every store; a scene that fails does not stop the others.

    Returns ``{"items": {store: map item id}, "failed": {store: error}}``.
    """
    name = read_info(params.model).name
    futures = {}
    for store in params.stores:
        cfg = InferConfig(
            model=params.model,
            scene=store,
            out=params.out_url,
            catalog=params.catalog_url,
            item_id=map_item_id(store, name),
            options=params.options,
        )
        # one scene at a time: each uses every Ray worker
        futures[store] = infer_task.submit(cfg, params.address)
        futures[store].wait()
    items, failed = _gather(futures)
    if not items:
        raise RuntimeError(f"no scene could be mapped: {json.dumps(failed)}")
    return {"items": items, "failed": failed}


@flow(name="mapping-pipeline", log_prints=True)
def mapping_pipeline(params: PipelineParams) -> dict:
    """AOI + dates -> scenes not mapped yet -> (train) -> maps -> STAC.

    Returns what it did: ``{"model", "metrics", "mapped", "skipped", "failed"}``.
    """
    logger = get_run_logger()
    stores_url = join(normalize_url(params.work_url), "scenes")
    items = search_scenes(params.query)
    train_ids = set(params.train.train_items) if params.train else set()
    result: dict[str, Any] = {"failed": {}}
    stores: dict[str, str] = {}  # scenes ingested with labels for training are reused
    if params.train is not None:
        spec = params.train
        labelled = ingest_flow(
            IngestParams(
                query=params.query,
                stores_url=stores_url,
                label_asset=spec.label_asset,
                item_ids=spec.train_items + spec.val_items,
            )
        )
        if labelled["failed"]:
            raise RuntimeError(f"training scenes failed to ingest: {labelled['failed']}")
        stores = labelled["stores"]
        config = train_config(params.work_url, params.catalog_url, spec, stores)
        trained = train_task(config, params.address)
        model, model_name = trained["item"] or trained["weights"], spec.run_name
        result["metrics"] = trained["metrics"]
    else:
        model = params.model
        model_name = read_info(model).name
    result["model"] = model
    catalog = open_catalog(params.catalog_url)
    todo, skipped = [], []
    for it in items:
        if it["id"] in train_ids:
            continue
        try:
            catalog.get_item(params.collection, map_item_id(it["id"], model_name))
            skipped.append(it["id"])
        except ItemNotFound:
            todo.append(it)
    logger.info("%d scenes to map, %d already mapped", len(todo), len(skipped))
    stage(f"map: {len(todo)} scenes to map, {len(skipped)} already mapped")
    result["skipped"] = skipped
    result["mapped"] = {}
    if not todo:
        return result
    futures = {
        it["id"]: ingest_scene.submit(it, stores_url, params.query, None)
        for it in todo
        if it["id"] not in stores
    }
    ingested, failed = _gather(futures, desc="ingest")
    result["failed"].update(failed)
    to_map = {it["id"]: stores[it["id"]] for it in todo if it["id"] in stores}
    to_map.update(ingested)
    for item_id, store in sorted(to_map.items()):
        cfg = InferConfig(
            model=model,
            scene=store,
            out=params.out_url,
            catalog=params.catalog_url,
            collection=params.collection,
            item_id=map_item_id(item_id, model_name),
            options=params.infer,
        )
        fut = infer_task.submit(cfg, params.address)
        mapped, err = _gather({item_id: fut})
        result["mapped"].update(mapped)
        result["failed"].update(err)
    for item_id, err in result["failed"].items():
        logger.error("scene %s failed: %s", item_id, err)
    return result


def train_config(
    work_url: str, catalog_url: str | None, spec: TrainSpec, stores: dict[str, str]
) -> TrainConfig:
    """The training run of ``spec`` on ingested ``stores`` (item id -> store URL); runs go
    to ``<work_url>/runs``, the model item to ``catalog_url``."""
    from relaymap.ingest import open_scene

    store = open_scene(stores[spec.train_items[0]])
    return TrainConfig(
        model=ModelConfig(
            **spec.model.model_dump(),
            num_classes=len(store.attrs.classes),
            in_chans=len(store.bands),
        ),
        data=DataConfig(
            train=[stores[i] for i in spec.train_items],
            val=[stores[i] for i in spec.val_items],
            window_px=spec.window_px,
        ),
        optim=OptimConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr),
        run=RunConfig(
            name=spec.run_name,
            storage_url=join(normalize_url(work_url), "runs"),
            num_workers=spec.workers,
            checkpoint_every=max(spec.steps // 4, 1),
            val_every=max(spec.steps // 4, 1),
            log_every=max(spec.steps // 10, 1),
        ),
        output=OutputConfig(catalog_url=catalog_url),
    )


def run_pipeline(params: PipelineParams | dict) -> dict:
    """Validate ``params`` (a clear error naming the bad field), then run the pipeline."""
    return mapping_pipeline(PipelineParams.model_validate(params))


@task(**retrying, task_run_name="map {config.collection} {config.period}")
def area_task(config: AreaConfig, address: str | None = None) -> dict:
    """Map an area for its periods, locally on Ray or as a Ray job on a cluster; a summary.
    Retrying is cheap: cells whose map is done are skipped."""
    jobs = cluster_address(address)
    if jobs:
        files = {"area.yaml": yaml.safe_dump(config.model_dump(mode="json"))}
        run_job(jobs, ["map", "--config", "area.yaml"], files=files, log=get_run_logger().info)
        return {"job": True}
    from .area import map_area

    result = map_area(config, address=address)
    for w in result.warnings:
        get_run_logger().warning(w)
    return result.summary()


@flow(name="map-area", log_prints=True)
def area_flow(config: AreaConfig, address: str | None = None) -> dict:
    """Map an area every period (``config.period``: a range to backfill, or ``last``, the
    last finished period, for a schedule). Returns what was mapped, skipped and failed."""
    stage(f"map: {config.collection}, period {config.period} every {config.every}")
    summary = area_task(config, address)
    if summary.get("failed"):
        raise RuntimeError(f"cells failed: {json.dumps(summary['failed'])}")
    return summary
