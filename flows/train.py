"""Relay-token fine-tuning on Ray Train, from scene stores to safetensors + a STAC MLM item.

One laptop or a multi-node GPU cluster run the same code: only ``run.num_workers``,
``run.use_gpu`` and the storage URL change. The per-worker loop only wires: model from
``create_model``, DDP from ``prepare_model``, batches from :mod:`flows.dataset`, the
paper's loss, AdamW with linear warm-up then ReduceLROnPlateau on validation mIoU. Rank 0
writes checkpoints (model, optimiser, schedulers, step) to the run's storage; a rerun of
the same run name resumes from the latest one, and a worker that dies is replaced and
continues from it (``run.max_failures``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from ray.train import UserCallback

from catalog import StaticCatalog, model_item, open_catalog
from catalog.storage import StorageError, atomic_upload, atomic_write, join, normalize_url, remove
from ingest import StoreError, open_scene
from relay_models import RelayLoss, create_model
from relay_models.config import FrozenConfig, ModelConfig

from .dataset import Augment, TileDataset, WindowPairDataset, check_stores
from .metrics import ConfusionMatrix
from .trained import ModelInputs, weights_metadata

log = logging.getLogger(__name__)


class DataConfig(FrozenConfig):
    """Which stores, which windows."""

    #: Training scene stores (URLs); every one labelled, all with the same bands.
    train: list[str] = Field(min_length=1)
    #: Validation stores, split by scene (a fixed tile grid over each); empty: none.
    val: list[str] = Field(default_factory=list)
    #: Local window side L in pixels.
    window_px: int = Field(default=64, ge=16)
    #: DataLoader worker processes per training worker (0: load in the training process).
    loader_workers: int = Field(default=0, ge=0)
    p_rescale: float = Field(default=0.5, ge=0, le=1)
    p_rotate: float = Field(default=0.5, ge=0, le=1)


class OptimConfig(FrozenConfig):
    """The paper's recipe by default."""

    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = 0.0
    warmup_frac: float = Field(default=0.05, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    global_weight: float = 0.1
    consistency_weight: float = 0.1
    plateau_patience: int = 2
    plateau_factor: float = 0.5


class RunConfig(FrozenConfig):
    """Where and how the run executes."""

    name: str = "relaymap-run"
    #: Checkpoints and results go to ``storage_url/name`` (file:// or s3://).
    storage_url: str = "relaymap-runs"
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(default=1, ge=0)
    checkpoint_every: int = Field(default=50, ge=1)
    val_every: int = Field(default=50, ge=1)
    log_every: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    seed: int = 0


class OutputConfig(FrozenConfig):
    """What the run leaves behind."""

    #: Weights file; default ``<storage_url>/<name>/model.safetensors``.
    weights_url: str | None = None
    #: Catalog (static catalog URL or STAC API) for the MLM model item; none: not registered.
    catalog_url: str | None = None
    collection: str = "relaymap-models"


class TrainConfig(FrozenConfig):
    """One training run, loadable from YAML (``relaymap train run.yaml``)."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _windows_fit_the_model(self) -> TrainConfig:
        if self.data.window_px % 32:
            raise ValueError(f"data.window_px={self.data.window_px} must be a multiple of 32")
        return self

    @property
    def weights_url(self) -> str:
        return self.output.weights_url or join(
            self.run.storage_url, self.run.name, "model.safetensors"
        )


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns."""

    metrics: dict[str, Any]
    weights_url: str
    model_item: Any
    checkpoint_path: str | None


# ---------------------------------------------------------------- the per-worker loop


def _learning_rate(cfg: OptimConfig, step: int) -> float | None:
    """Warm-up learning rate for ``step``, or None once warm-up is over."""
    warmup = math.ceil(cfg.warmup_frac * cfg.steps)
    return cfg.lr * (step + 1) / warmup if step < warmup else None


def _batches(loader):
    while True:
        yield from loader


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(model, batch):
    return model(batch["local"], batch["global"]) if "global" in batch else model(batch["local"])


@torch.no_grad()
def validate(
    model, tiles: TileDataset, indices: list[int], num_classes: int, device, batch_size: int
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` on the given validation tiles, summed over workers."""
    cm = ConfusionMatrix(num_classes)
    model.eval()
    for i in range(0, len(indices), batch_size):
        items = [tiles[j] for j in indices[i : i + batch_size]]
        batch = _to({k: torch.stack([it[k] for it in items]) for k in items[0]}, device)
        out = _forward(model, batch)
        logits = out.local if isinstance(out, tuple) else out
        cm.update(logits.argmax(1), batch["labels"])
    model.train()
    cm.all_reduce()
    return cm


def train_loop_per_worker(raw_config: dict) -> None:
    """Ray Train's per-worker function: build, restore, train, validate, report."""
    import ray
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(raw_config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per worker; no oversubscription
    torch.manual_seed(config.run.seed)
    model = create_model(
        **config.model.model_dump(exclude={"pretrained"}), pretrained=config.model.pretrained
    )
    factor = model.factor if model.takes_global else 0
    optim = config.optim
    state, start = None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        # each worker its own copy: as_directory() shares one download folder between the
        # workers of a node, and a torch.load of it once failed on a restart after a kill
        with tempfile.TemporaryDirectory(prefix="relaymap-resume-") as d:
            checkpoint.to_directory(d)
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        start = int(state["step"])
    net = ray.train.torch.prepare_model(model)
    nodes = [None] * world
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    num_nodes = len(set(nodes)) if nodes[0] is not None else 1
    optimizer = torch.optim.AdamW(net.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=optim.plateau_factor, patience=optim.plateau_patience
    )
    if state:
        optimizer.load_state_dict(state["optimizer"])
        plateau.load_state_dict(state["plateau"])
    loss_fn = RelayLoss(
        factor=max(factor, 1),
        global_weight=optim.global_weight,
        consistency_weight=optim.consistency_weight,
    )
    augment = Augment(p_rescale=config.data.p_rescale, p_rotate=config.data.p_rotate)
    # a resumed run draws new samples: the seed includes the step it resumes at
    data = WindowPairDataset(
        config.data.train,
        window_px=config.data.window_px,
        factor=factor,
        augment=augment,
        seed=config.run.seed + start,
        rank=rank,
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=optim.batch_size,
        num_workers=config.data.loader_workers,
        persistent_workers=config.data.loader_workers > 0,
    )
    tiles = (
        TileDataset(config.data.val, window_px=config.data.window_px, factor=factor)
        if config.data.val
        else None
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    batches = _batches(loader)
    run, seen, t0 = config.run, 0, time.perf_counter()
    net.train()
    for step in range(start, optim.steps):
        lr = _learning_rate(optim, step)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        batch = _to(next(batches), device)
        with autocast:
            terms = loss_fn(_forward(net, batch), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), optim.grad_clip)
        optimizer.step()
        seen += batch["local"].shape[0]
        done = step + 1
        last = done == optim.steps
        metrics: dict[str, Any] = {}
        if tiles is not None and (done % run.val_every == 0 or last):
            cm = validate(
                model,
                tiles,
                list(range(rank, len(tiles), world)),
                config.model.num_classes,
                device,
                optim.batch_size,
            )
            metrics |= {"val_miou": cm.miou(), "val_iou": cm.iou().nan_to_num(-1).tolist()}
            if _learning_rate(optim, step) is None:
                plateau.step(metrics["val_miou"])
        save = done % run.checkpoint_every == 0 or last
        if not (save or metrics or done % run.log_every == 0):
            continue
        elapsed = time.perf_counter() - t0
        metrics |= {
            "step": done,
            "start_step": start,
            "num_nodes": num_nodes,
            "loss": terms.total.item(),
            "loss_local": terms.local.item(),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": seen * world / max(elapsed, 1e-9),
        }
        ckpt = None
        with tempfile.TemporaryDirectory() as tmp:
            if save and rank == 0:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "plateau": plateau.state_dict(),
                        "step": done,
                    },
                    Path(tmp) / "state.pt",
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


# ---------------------------------------------------------------- the driver


def _ray_storage(url: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train, honouring an S3 endpoint."""
    url = normalize_url(url)
    if url.startswith("file://"):
        return url.removeprefix("file://"), None
    if url.startswith("s3://"):
        from urllib.parse import urlparse

        import pyarrow.fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw: dict[str, Any] = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kw = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return url.removeprefix("s3://"), pyarrow.fs.S3FileSystem(region=region, **kw)
    return url, None


def check_inputs(config: TrainConfig) -> None:
    """Fail before any compute: stores readable and labelled with one band order matching
    the model, and the storage URL writable."""
    stores = [open_scene(u) for u in config.data.train]
    bands = check_stores(stores, need_labels=True)
    if config.data.val:
        val_bands = check_stores([open_scene(u) for u in config.data.val], need_labels=True)
        if val_bands != bands:
            raise StoreError(
                f"validation stores have bands {list(val_bands)}, training stores {list(bands)}"
            )
    if config.model.in_chans != len(bands):
        raise StoreError(
            f"model.in_chans={config.model.in_chans} but the stores have "
            f"{len(bands)} bands {list(bands)}"
        )
    classes = len(stores[0].attrs.classes)
    if classes and classes != config.model.num_classes:
        raise StoreError(
            f"model.num_classes={config.model.num_classes} but the stores' "
            f"labels have {classes} classes"
        )
    probe = join(config.run.storage_url, config.run.name, f".write-probe-{uuid.uuid4().hex}")
    try:
        atomic_write(probe, b"ok")
    except (StorageError, OSError) as e:
        raise StorageError(
            f"cannot write to run.storage_url={config.run.storage_url}: {e}"
        ) from None
    remove(probe)


class ProgressLog(UserCallback):
    """One line per report, printed by the Ray Train controller (forwarded to the driver):
    step, loss, throughput, validation mIoU and ETA."""

    def __init__(self, total_steps: int) -> None:
        self.total = total_steps
        self.first: tuple[int, float] | None = None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = metrics[0]
        step, now = int(m.get("step", 0)), time.monotonic()
        self.first = self.first or (step, now)
        done, elapsed = step - self.first[0], now - self.first[1]
        eta = (self.total - step) * elapsed / done if done else float("nan")
        line = (
            f"[relaymap train] step {step}/{self.total} loss {m.get('loss', 0):.4f} "
            f"{m.get('samples_per_s', 0.0):.1f} samples/s"
        )
        if "val_miou" in m:
            line += f" val mIoU {m['val_miou']:.3f}"
        line += f" ETA {eta:.0f} s" if eta == eta else ""
        print(line + (" (checkpoint)" if checkpoint else ""), flush=True)


def train(config: TrainConfig, *, address: str | None = None) -> TrainResult:
    """Run (or resume) a training run on Ray; export weights and the MLM model item.

    Args:
        config: the run.
        address: an existing Ray cluster (``ray://`` or ``host:port``); default: local Ray
            (or the cluster ``RAY_ADDRESS`` names).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    check_inputs(config)
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    path, fs = _ray_storage(config.run.storage_url)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=config.run.num_workers,
            use_gpu=config.run.use_gpu,
            resources_per_worker={"CPU": 1},
        ),
        run_config=RayRunConfig(
            name=config.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
            callbacks=[ProgressLog(config.optim.steps)],
        ),
    )
    result = trainer.fit()
    return export(config, result)


def export(config: TrainConfig, result) -> TrainResult:
    """Write the final weights (safetensors, with the config in its metadata) and the MLM
    model item (added to ``output.catalog_url`` when set)."""
    from safetensors.torch import save_file

    if result.checkpoint is None:
        raise RuntimeError(f"run {config.run.name} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    url = config.weights_url
    store = open_scene(config.data.train[0])
    inputs = ModelInputs.of_store(store, config.data.window_px)
    with atomic_upload(url, suffix=".safetensors") as tmp:
        save_file(weights, tmp, metadata=weights_metadata(config.model, inputs, state["step"]))
    model = create_model(**config.model.model_dump(exclude={"pretrained"}))
    metrics = dict(result.metrics or {})
    item = model_item(
        url,
        item_id=config.run.name,
        collection=config.output.collection,
        model_name=config.model.name,
        architecture=type(model.backbone).__name__
        + (" + relay tokens" if getattr(model.backbone, "num_relays", 0) else ""),
        bands=list(store.bands),
        band_mean=list(store.attrs.band_mean),
        band_std=list(store.attrs.band_std),
        classes=list(store.attrs.classes),
        window_px=config.data.window_px,
        factor=model.factor if model.takes_global else 0,
        total_parameters=sum(p.numel() for p in model.parameters()),
        hyperparameters={
            **config.optim.model_dump(),
            "relays": config.model.relays,
            "relay_mode": config.model.relay_mode,
            "steps_done": state["step"],
            "pretrained": config.model.pretrained is not None,
        },
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
    )
    if config.output.catalog_url:
        catalog = open_catalog(config.output.catalog_url)
        catalog.add_items([item])
        if isinstance(catalog, StaticCatalog):
            item = catalog.get_item(config.output.collection, item.id)
    path = getattr(result.checkpoint, "path", None)
    return TrainResult(metrics, url, item, path)
