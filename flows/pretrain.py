"""Self-supervised pretraining on Ray Train: unlabelled scene stores to a backbone checkpoint.

``relaymap pretrain run.yaml`` pretrains the backbone of a model with masked image modelling
(SimMIM, :mod:`relay_models.pretraining`) on scene stores without labels, such as an
archive of the area a user will map, and writes a timm-format safetensors checkpoint and a
STAC MLM item that ``relaymap train`` takes as ``pretrained:``. It runs as ``train`` does
(:mod:`relaymap.flows.raytrain`: workers, checkpoints, progress, ``precision``) and reads
windows with the same sampler and window reader, in the model's own view: a relay model
pretrains on local and global windows at once with its relays (so the relays learn to carry
content between the windows before any label is seen), a sliding-window model on local
windows.

Resuming is exact: sample ``i`` of a rank and the masks and stochastic depth of step ``k``
are drawn from generators seeded by ``(seed, rank, i)`` and ``(seed, rank, k)``, so a run
killed and resumed from its last checkpoint ends with the weights of a run never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pystac
import torch
from pydantic import Field

from relay_models import DataSpec, FrozenConfig, ModelOptions, create_model, warmup_cosine
from relay_models.precision import autocast as precision_autocast
from relay_models.pretraining import MaskedImageModel, pretrain_step, save_backbone
from relaymap.catalog import StaticCatalog, backbone_item, open_catalog
from relaymap.catalog.faults import fault_point
from relaymap.catalog.storage import atomic_upload, filesystem, join
from relaymap.ingest import StoreError, open_scene

from .dataset import UNLABELLED, Augment, IndexedWindowPairs, check_stores, data_spec
from .options import SafeId
from .raytrain import (
    RunConfig,
    StoreUrl,
    WindowPx,
    check_storage,
    claim_run,
    final_state,
    fit,
    num_nodes,
    remove_unregistered_checkpoints,
    report,
    resume,
)


class PretrainData(FrozenConfig):
    """Which stores, which windows."""

    #: Scene stores (URLs, or glob patterns such as ``s3://archive/*/*.zarr``), all with
    #: the same bands; labels, where a store has them, are not read.
    stores: list[StoreUrl] = Field(min_length=1)
    #: Local window side L in pixels (the global one is ``model.factor`` times larger).
    window_px: WindowPx = 64
    #: DataLoader worker processes per training worker (0: load in the training process).
    loader_workers: int = Field(default=0, ge=0)
    p_rescale: float = Field(default=0.5, ge=0, le=1)
    p_rotate: float = Field(default=0.5, ge=0, le=1)


class MaskConfig(FrozenConfig):
    """SimMIM's masking."""

    #: Side of a hidden block in pixels (a multiple of the patch size dividing the window
    #: side); default two patches (8 px for Swin V2).
    block_px: int | None = Field(default=None, ge=1)
    #: Share of each window's blocks hidden.
    ratio: float = Field(default=0.6, gt=0, lt=1)


class PretrainOptim(FrozenConfig):
    """AdamW with a linear warm-up then a cosine decay (SimMIM's recipe, scaled down)."""

    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_frac: float = Field(default=0.05, ge=0, lt=1)
    grad_clip: float = Field(default=5.0, gt=0)


class PretrainOutput(FrozenConfig):
    """What the run leaves behind."""

    #: Backbone checkpoint; default ``<storage_url>/<name>/backbone.safetensors``.
    weights_url: str | None = None
    #: Catalog (static catalog URL or STAC API) for the MLM item; none: not registered.
    catalog_url: str | None = None
    collection: SafeId = "relaymap-backbones"


class PretrainConfig(FrozenConfig):
    """One pretraining run, loadable from YAML (``relaymap pretrain run.yaml``)."""

    #: The model whose backbone is pretrained, in its view (relay models: both windows and
    #: relays); ``pretrained`` continues from published or earlier weights.
    model: ModelOptions = ModelOptions()
    data: PretrainData
    mask: MaskConfig = MaskConfig()
    optim: PretrainOptim = PretrainOptim()
    run: RunConfig = RunConfig(name="relaymap-pretrain")
    output: PretrainOutput = PretrainOutput()

    @property
    def weights_url(self) -> str:
        return self.output.weights_url or join(self.run.url, "backbone.safetensors")


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` returns."""

    metrics: dict[str, Any]
    weights_url: str
    item: pystac.Item


def _masked_model(config: PretrainConfig, spec: DataSpec) -> MaskedImageModel:
    model = create_model(
        **config.model.model_dump(), num_classes=1, in_chans=spec.in_chans, spec=spec
    )
    return MaskedImageModel(model, mask_px=config.mask.block_px, mask_ratio=config.mask.ratio)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: independent streams)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


# ---------------------------------------------------------------- the per-worker loop


def pretrain_loop_per_worker(raw: dict) -> None:
    """Ray Train's per-worker function: wires data, the masked-image model,
    :func:`pretrain_step`, checkpoints and reports together."""
    import ray.train
    import ray.train.torch

    config = PretrainConfig.model_validate(raw["config"])
    spec = DataSpec.model_validate(raw["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per worker; no oversubscription
    optim, run = config.optim, config.run
    torch.manual_seed(run.seed)
    mim = _masked_model(config, spec)
    state = resume(mim)
    start = int(state["step"]) if state else 0
    net = ray.train.torch.prepare_model(mim)
    optimizer = torch.optim.AdamW(net.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    augment = Augment(p_rescale=config.data.p_rescale, p_rotate=config.data.p_rotate)
    batch = optim.batch_size
    data = IndexedWindowPairs(
        config.data.stores,
        spec,
        length=optim.steps * batch,
        augment=augment,
        seed=run.seed,
        rank=rank,
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch,
        sampler=range(start * batch, optim.steps * batch),  # the samples from step `start`
        num_workers=config.data.loader_workers,
    )
    autocast = precision_autocast(run.precision, device)
    nodes, seen, t0 = num_nodes(world), 0, time.perf_counter()
    net.train()
    for step, sample in enumerate(loader, start):
        sample = {k: v.to(device, non_blocking=True) for k, v in sample.items()}
        lr = warmup_cosine(step, optim.steps, optim.lr, optim.warmup_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(_seed(run.seed, rank, step))  # stochastic depth of this step
        masks = torch.Generator().manual_seed(_seed(run.seed, rank, step, 1))
        terms = pretrain_step(
            net,
            sample,
            optimizer,
            generator=masks,
            grad_clip=optim.grad_clip,
            autocast=autocast,
        )
        seen += sample["local"].shape[0]
        done = step + 1
        save = done % run.checkpoint_every == 0 or done == optim.steps
        if not (save or done % run.log_every == 0):
            continue
        metrics = {
            "step": done,
            "start_step": start,
            "num_nodes": nodes,
            "loss": terms.total.item(),
            "loss_local": terms.local.item(),
            "loss_global": terms.global_.item(),
            "lr": lr,
            "samples_per_s": seen * world / max(time.perf_counter() - t0, 1e-9),
        }
        keep = {"model": mim.state_dict(), "optimizer": optimizer.state_dict(), "step": done}
        report(metrics, keep if save and rank == 0 else None)
        if rank == world - 1:
            fault_point(f"pretrain:step-{done}")  # crash tests: a worker lost after a checkpoint


# ---------------------------------------------------------------- the driver


def expand_stores(config: PretrainConfig) -> PretrainConfig:
    """``config`` with every glob pattern of ``data.stores`` replaced by the stores it
    matches (sorted; a run records and reads exactly these).

    Raises:
        StoreError: a pattern that matches no store.
    """
    stores: list[str] = []
    for pattern in config.data.stores:
        if not any(c in pattern for c in "*?["):
            stores.append(pattern)
            continue
        fs, path = filesystem(pattern)
        found = sorted(fs.glob(path))
        if not found:
            raise StoreError(f"no scene store matches data.stores pattern {pattern}")
        stores += [fs.unstrip_protocol(p) for p in found]
    data = config.data.model_copy(update={"stores": list(dict.fromkeys(stores))})
    return config.model_copy(update={"data": data})


def check_inputs(config: PretrainConfig) -> DataSpec:
    """Fail before any compute: stores readable with one band order, the model's window
    sides possible, the storage URL writable. Returns the run's data spec (bands and
    band statistics pooled over the stores; no classes)."""
    stores = [open_scene(u) for u in config.data.stores]
    check_stores(stores, need_labels=False)
    spec = data_spec(
        stores,
        window_px=config.data.window_px,
        factor=config.model.global_factor,
        classes=UNLABELLED,
    )
    try:
        _masked_model(config, spec)
    except ValueError as e:
        raise StoreError(f"{config.model.name} cannot pretrain on these windows: {e}") from None
    check_storage(config.run)
    return spec


def pretrain(config: PretrainConfig, *, address: str | None = None) -> PretrainResult:
    """Run (or resume) a pretraining run on Ray; export the backbone and its MLM item.

    Args:
        config: the run.
        address: an existing Ray cluster; default: local Ray (or ``RAY_ADDRESS``'s).
    """
    config = expand_stores(config)
    spec = check_inputs(config)
    claim_run(config, config.data.stores, spec=spec.model_dump(mode="json"))
    result, history = fit(
        pretrain_loop_per_worker,
        {"config": config.model_dump(mode="json"), "spec": spec.model_dump(mode="json")},
        config.run,
        steps=config.optim.steps,
        desc=f"pretraining {config.run.name}",
        address=address,
    )
    return export(config, spec, result, history)


def export(config: PretrainConfig, spec: DataSpec, result, history: list[dict]) -> PretrainResult:
    """Write the backbone checkpoint (timm-format keys, relay parameters included; how it
    was made in its header) and its MLM item (added to ``output.catalog_url`` when set)."""
    state = final_state(result)
    mim = _masked_model(config.model_copy(update={"model": _no_source(config)}), spec)
    mim.load_state_dict(state["model"])
    model_config = config.model.model_dump(mode="json")
    about = {
        "model": model_config,
        "spec": spec.model_dump(mode="json"),
        "method": "simmim",
        "mask": config.mask.model_dump(mode="json"),
        "steps": state["step"],
    }
    url = config.weights_url
    with atomic_upload(url, suffix=".safetensors") as tmp:
        save_backbone(mim, tmp, about)
    losses = [h["loss"] for h in history if "loss" in h]
    backbone = mim.backbone
    continued = f", continued from {config.model.pretrained}" if config.model.pretrained else ""
    item = backbone_item(
        url,
        item_id=config.run.name,
        collection=config.output.collection,
        spec=spec,
        model_name=config.model.name,
        architecture=type(backbone).__name__ + (" + relay tokens" if backbone.num_relays else ""),
        total_parameters=sum(p.numel() for p in backbone.parameters()),
        features=(backbone.feature_info[-1]["num_chs"], backbone.feature_info[-1]["reduction"]),
        pretrained_source=f"SimMIM on {len(config.data.stores)} unlabelled scene stores "
        f"({', '.join(mim.view.branches)} windows{', relays' if mim.view.relay_mode else ''})"
        + continued,
        hyperparameters={
            **config.optim.model_dump(),
            **config.mask.model_dump(),
            **config.model.model_dump(exclude={"name"}),
            "steps_done": state["step"],
        },
        training_data=[
            ("pretraining", store.url, store.attrs.source_items)
            for store in map(open_scene, config.data.stores)
        ],
    )
    item.properties["relaymap:pretraining"] = {
        "method": "SimMIM",
        "steps": state["step"],
        "final_loss": losses[-1] if losses else None,
    }
    if config.output.catalog_url:
        catalog = open_catalog(config.output.catalog_url)
        catalog.add_items([item])
        if isinstance(catalog, StaticCatalog):
            item = catalog.get_item(config.output.collection, item.id)
    remove_unregistered_checkpoints(config.run.url)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return PretrainResult(metrics, url, item)


def _no_source(config: PretrainConfig) -> ModelOptions:
    """The model options without ``pretrained``: exporting rebuilds the network and loads
    the run's own weights, not the source it started from."""
    return config.model.model_copy(update={"pretrained": None})
