"""Relay-token fine-tuning on Ray Train, from scene stores to safetensors + a STAC MLM item.

One laptop or a multi-node GPU cluster run the same code: only ``run.num_workers``,
``run.use_gpu`` and the storage URL change. The per-worker loop only wires: model from
``create_model``, DDP from ``prepare_model``, batches from :mod:`relaymap.flows.dataset`, the
paper's loss, AdamW with linear warm-up then a cosine decay (or the paper's
ReduceLROnPlateau on validation mIoU). Rank 0 writes checkpoints (model, optimiser,
schedulers, step) to the run's storage, and the best-validation model to ``best/``; a rerun
of the same run name resumes from the latest checkpoint, and a worker that dies is replaced
and continues from it (``run.max_failures``). The best-validation model is exported by
default, and the model item says which one it is.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import pystac
import torch
from pydantic import Field

from relay_models import (
    ConfusionMatrix,
    DataSpec,
    FrozenConfig,
    LoadReport,
    ModelConfig,
    RelayLoss,
    create_model,
    evaluate,
    load_pretrained,
    save_model,
    train_step,
    warmup_cosine,
)
from relay_models.precision import autocast as precision_autocast
from relaymap.catalog import StaticCatalog, model_item, open_catalog
from relaymap.catalog.faults import fault_point
from relaymap.catalog.storage import atomic_upload, atomic_write, join, read_bytes
from relaymap.ingest import StoreError, open_scene

from .dataset import Augment, TileDataset, WindowPairDataset, check_stores, data_spec
from .options import SafeId
from .products.report import plot_confusion, plot_iou, plot_learning_curve, scores
from .raytrain import (
    RunConfig,
    StoreUrl,
    WindowPx,
    check_storage,
    device_batches,
    final_state,
    fit,
    num_nodes,
    remove_unregistered_checkpoints,
    report,
    resume,
)
from .raytrain import claim_run as claim

log = logging.getLogger(__name__)


class DataConfig(FrozenConfig):
    """Which stores, which windows."""

    #: Training scene stores (URLs); every one labelled, all with the same bands.
    train: list[StoreUrl] = Field(min_length=1)
    #: Validation stores, split by scene (a fixed tile grid over each); empty: none.
    val: list[StoreUrl] = Field(default_factory=list)
    #: Local window side L in pixels.
    window_px: WindowPx = 64
    #: DataLoader worker processes per training worker (0: load in the training process).
    loader_workers: int = Field(default=0, ge=0)
    p_rescale: float = Field(default=0.5, ge=0, le=1)
    p_rotate: float = Field(default=0.5, ge=0, le=1)


class OptimConfig(FrozenConfig):
    """The paper's recipe, with a cosine decay after the warm-up (``schedule``)."""

    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = 0.0
    warmup_frac: float = Field(default=0.05, ge=0, lt=1)
    #: After the warm-up: ``cosine`` decay to 0, or ``plateau`` (the paper's
    #: ReduceLROnPlateau on validation mIoU; needs validation stores).
    schedule: Literal["cosine", "plateau"] = "cosine"
    grad_clip: float = Field(default=1.0, gt=0)
    global_weight: float = Field(default=0.1, ge=0)
    consistency_weight: float = Field(default=0.1, ge=0)
    #: No gradient through the local side of the consistency term (ours; authors: False).
    detach_consistency: bool = True
    plateau_patience: int = 2
    plateau_factor: float = 0.5


class OutputConfig(FrozenConfig):
    """What the run leaves behind."""

    #: Weights file; default ``<storage_url>/<name>/model.safetensors``.
    weights_url: str | None = None
    #: Catalog (static catalog URL or STAC API) for the MLM model item; none: not registered.
    catalog_url: str | None = None
    collection: SafeId = "relaymap-models"
    #: Which weights to export: the ``best`` validation mIoU seen (the last when the run
    #: has no validation stores) or the ``last`` step's.
    export: Literal["best", "last"] = "best"


class TrainConfig(FrozenConfig):
    """One training run, loadable from YAML (``relaymap train run.yaml``)."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    output: OutputConfig = OutputConfig()

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
    """The learning rate for ``step``, or None when ReduceLROnPlateau sets it."""
    if cfg.schedule == "cosine":
        return warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_frac)
    warmup = math.ceil(cfg.warmup_frac * cfg.steps)
    return cfg.lr * (step + 1) / warmup if step < warmup else None


def read_best(run_url: str, *, weights: bool = True) -> dict | None:
    """The run's best-validation record (``step``, ``val_miou``, ``val_iou``,
    ``val_confusion``, and ``model``, its state dict, when ``weights``), or None."""
    try:
        best = json.loads(read_bytes(join(run_url, "best", "best.json")))
    except FileNotFoundError:
        return None
    if weights:
        data = io.BytesIO(read_bytes(join(run_url, "best", "model.pt")))
        best["model"] = torch.load(data, map_location="cpu", weights_only=True)
    return best


def _save_best(run_url: str, model: torch.nn.Module, metrics: dict) -> None:
    """Weights first, then the record that names them (a crash between leaves the older
    record pointing at newer weights of the same run: a model at least as good)."""
    with atomic_upload(join(run_url, "best", "model.pt"), suffix=".pt") as tmp:
        torch.save(model.state_dict(), tmp)
    keys = ("step", "val_miou", "val_iou", "val_confusion")
    atomic_write(
        join(run_url, "best", "best.json"), json.dumps({k: metrics[k] for k in keys}).encode()
    )


def train_loop_per_worker(raw: dict) -> None:
    """Ray Train's per-worker function: it only wires data, model, :func:`train_step`,
    validation, checkpoints and reports together."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(raw["config"])
    spec = DataSpec.model_validate(raw["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per worker; no oversubscription
    torch.manual_seed(config.run.seed)
    model = create_model(**config.model.model_dump(), spec=spec)
    state = resume(model)
    start = int(state["step"]) if state else 0
    net = ray.train.torch.prepare_model(model)
    optim, run = config.optim, config.run
    optimizer = torch.optim.AdamW(net.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=optim.plateau_factor, patience=optim.plateau_patience
    )
    if state:
        optimizer.load_state_dict(state["optimizer"])
        plateau.load_state_dict(state["plateau"])
    loss_fn = RelayLoss(
        factor=spec.factor or 1,
        global_weight=optim.global_weight,
        consistency_weight=optim.consistency_weight,
        detach_consistency=optim.detach_consistency,
    )
    run_url = run.url
    best = read_best(run_url, weights=False)
    best_miou = best["val_miou"] if best else -1.0
    augment = Augment(p_rescale=config.data.p_rescale, p_rotate=config.data.p_rotate)
    # a resumed run draws new samples: the seed includes the step it resumes at
    data = WindowPairDataset(
        config.data.train, spec, augment=augment, seed=run.seed + start, rank=rank
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=optim.batch_size,
        num_workers=config.data.loader_workers,
        persistent_workers=config.data.loader_workers > 0,
    )
    tiles = TileDataset(config.data.val, spec) if config.data.val else None
    autocast = precision_autocast(run.precision, device)
    batches = device_batches(loader, device)
    nodes, seen, t0 = num_nodes(world), 0, time.perf_counter()
    net.train()
    for step in range(start, optim.steps):
        lr = _learning_rate(optim, step)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        batch = next(batches)
        terms = train_step(
            net, batch, loss_fn, optimizer, grad_clip=optim.grad_clip, autocast=autocast
        )
        seen += batch["local"].shape[0]
        done = step + 1
        last = done == optim.steps
        metrics: dict[str, Any] = {}
        if tiles is not None and (done % run.val_every == 0 or last):
            mine = torch.utils.data.Subset(tiles, range(rank, len(tiles), world))
            cm = evaluate(
                model,
                torch.utils.data.DataLoader(mine, batch_size=optim.batch_size),
                spec.num_classes,
                device=device,
                precision=run.precision,
            )
            cm.all_reduce()
            metrics |= {
                "step": done,
                "val_miou": cm.miou(),
                "val_iou": cm.iou().nan_to_num(-1).tolist(),
                "val_confusion": cm.counts.tolist(),
            }
            if lr is None:
                plateau.step(metrics["val_miou"])
            if metrics["val_miou"] > best_miou:  # every rank: the same all-reduced score
                best_miou = metrics["val_miou"]
                if rank == 0:
                    _save_best(run_url, model, metrics)
        save = done % run.checkpoint_every == 0 or last
        if not (save or metrics or done % run.log_every == 0):
            continue
        metrics |= {
            "step": done,
            "start_step": start,
            "num_nodes": nodes,
            "loss": terms.total.item(),
            "loss_local": terms.local.item(),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": seen * world / max(time.perf_counter() - t0, 1e-9),
        }
        state = None
        if save and rank == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "plateau": plateau.state_dict(),
                "step": done,
            }
        report(metrics, state)
        if rank == world - 1:
            fault_point(f"train:step-{done}")  # crash tests: a worker lost after a checkpoint


# ---------------------------------------------------------------- the driver


def check_pretrained(config: TrainConfig) -> LoadReport | None:
    """Fetch ``model.pretrained`` here on the driver, once, into the Hugging Face cache (the
    workers of this node read it from there), and load it strictly into the run's model: a
    missing source or a checkpoint that does not fit stops the run before anything is
    written. The load report, or None without ``pretrained``."""
    if config.model.pretrained is None:
        return None
    model = create_model(**config.model.model_dump(exclude={"pretrained"}))
    return load_pretrained(model, config.model.pretrained)


def check_inputs(config: TrainConfig) -> DataSpec:
    """Fail before any compute: stores readable and labelled with one band order matching
    the model, and the storage URL writable. Returns the run's data spec."""
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
    if classes != config.model.num_classes:
        raise StoreError(
            f"model.num_classes={config.model.num_classes} but the stores' "
            f"labels have {classes} classes"
        )
    check_storage(config.run)
    return data_spec(stores, window_px=config.data.window_px, factor=config.model.global_factor)


def claim_run(config: TrainConfig, spec: DataSpec) -> None:
    """Claim the run name for these settings, stores and data spec
    (:func:`relaymap.flows.raytrain.claim_run`)."""
    claim(config, config.data.train + config.data.val, spec=spec.model_dump(mode="json"))


def train(config: TrainConfig, *, address: str | None = None) -> TrainResult:
    """Run (or resume) a training run on Ray; export weights and the MLM model item.

    Args:
        config: the run.
        address: an existing Ray cluster (``ray://`` or ``host:port``); default: local Ray
            (or the cluster ``RAY_ADDRESS`` names).
    """
    check_pretrained(config)
    spec = check_inputs(config)
    claim_run(config, spec)
    result, history = fit(
        train_loop_per_worker,
        {"config": config.model_dump(mode="json"), "spec": spec.model_dump(mode="json")},
        config.run,
        steps=config.optim.steps,
        desc=f"training {config.run.name}",
        address=address,
    )
    return export(config, spec, result, history)


def export(
    config: TrainConfig, spec: DataSpec, result, history: list[dict] | None = None
) -> TrainResult:
    """Write the final weights (safetensors, with the model config and data spec in its
    header) and the MLM model item (added to ``output.catalog_url`` when set)."""
    state = final_state(result)
    run_url = config.run.url
    best = read_best(run_url) if config.output.export == "best" else None
    checks = [h for h in history or [] if "val_miou" in h]
    exported = {
        "exported": "best" if best else "last",
        "step": best["step"] if best else state["step"],
        "val_miou": best["val_miou"] if best else (checks[-1]["val_miou"] if checks else None),
        "last_step": state["step"],
        "last_val_miou": checks[-1]["val_miou"] if checks else None,
    }
    model = create_model(**config.model.model_dump(exclude={"pretrained"}), spec=spec)
    model.load_state_dict(best["model"] if best else state["model"])
    url = config.weights_url
    with atomic_upload(url, suffix=".safetensors") as tmp:
        save_model(model, tmp, step=str(exported["step"]), checkpoint=exported["exported"])
    metrics = dict(result.metrics or {})
    item = model_item(
        url,
        item_id=config.run.name,
        collection=config.output.collection,
        spec=spec,
        model_name=config.model.name,
        architecture=type(model.backbone).__name__
        + (" + relay tokens" if getattr(model.backbone, "num_relays", 0) else ""),
        total_parameters=sum(p.numel() for p in model.parameters()),
        hyperparameters={
            **config.optim.model_dump(),
            **config.model.model_dump(exclude={"name", "num_classes", "in_chans"}),
            "steps_done": state["step"],
            "pretrained": config.model.pretrained is not None,
        },
        pretrained_source=public_source(config.model.pretrained),
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        training_data=[
            (role, s.url, s.attrs.source_items)
            for role, urls in (("training", config.data.train), ("validation", config.data.val))
            for s in map(open_scene, urls)
        ],
    )
    item.properties["relaymap:checkpoint"] = exported
    add_training_report(item, spec, history or [], run_url, exported["step"])
    if config.output.catalog_url:
        catalog = open_catalog(config.output.catalog_url)
        catalog.add_items([item])
        if isinstance(catalog, StaticCatalog):
            item = catalog.get_item(config.output.collection, item.id)
    remove_unregistered_checkpoints(run_url)
    path = getattr(result.checkpoint, "path", None)
    return TrainResult(metrics, url, item, path)


def public_source(ref: str | None) -> str | None:
    """A weights reference as it may be published in an item: a URL without its query and
    user info (signatures, tokens), anything else as it is."""
    from urllib.parse import urlsplit, urlunsplit

    if ref is None:
        return None
    parts = urlsplit(ref)
    if not parts.netloc:
        return ref
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def add_training_report(
    item, spec: DataSpec, history: list[dict], run_url: str, step: int | None = None
) -> None:
    """The run's report on its model item: the validation scores of the exported model (the
    check at ``step``, default the last; ``relaymap:validation``: overall accuracy, mIoU,
    per-class IoU and F1), the validation curve (CSV) and PNG assets: the learning curve,
    per-class IoU bars and the validation confusion matrix."""
    checks = [h for h in history if "val_confusion" in h]
    plots = {"learning_curve": plot_learning_curve} if history else {}
    if checks:
        exported = next((h for h in reversed(checks) if h["step"] == step), checks[-1])
        cm = ConfusionMatrix(spec.num_classes)
        cm.counts = torch.tensor(exported["val_confusion"], dtype=torch.int64)
        validation = scores(cm, spec.class_names)
        item.properties["relaymap:validation"] = validation
        plots |= {
            "validation_iou": lambda h, path: plot_iou(validation["classes"], path),
            "validation_confusion": lambda h, path: plot_confusion(cm, spec.class_names, path),
        }
    titles = {
        "learning_curve": "training loss and validation mIoU per step",
        "validation_iou": "per-class IoU on the validation scenes",
        "validation_confusion": "confusion matrix on the validation scenes",
    }
    if checks:
        url = join(run_url, "report", "validation_curve.csv")
        rows = ["step,val_miou," + ",".join(f"iou_{n}" for n in spec.class_names)]
        rows += [
            f"{h['step']},{h['val_miou']:.6f}," + ",".join(f"{v:.6f}" for v in h["val_iou"])
            for h in checks
        ]
        atomic_write(url, ("\n".join(rows) + "\n").encode())
        item.add_asset(
            "validation_curve",
            pystac.Asset(
                url,
                title="validation mIoU and per-class IoU per check (-1: class absent)",
                media_type="text/csv",
                roles=["metadata"],
            ),
        )
    for key, plot in plots.items():
        url = join(run_url, "report", f"{key}.png")
        with atomic_upload(url, suffix=".png") as tmp:
            plot(history, tmp)
        roles = ["overview", "metadata"] if key == "learning_curve" else ["metadata"]
        item.add_asset(
            key, pystac.Asset(url, title=titles[key], media_type="image/png", roles=roles)
        )
