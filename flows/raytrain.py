"""What a Ray Train run needs around its per-worker loop, shared by ``train`` and ``pretrain``.

Where the run lives (``storage_url/name``, local or S3), what claims a run name (its
settings and data, so a rerun resumes and a different run is refused), the checkpoints rank
0 writes and every worker resumes from, the driver's progress bar fed by the reports, and
the ``TorchTrainer`` that runs it all. The jobs themselves (:mod:`relaymap.flows.train`,
:mod:`relaymap.flows.pretrain`) only say what a step is and what the run exports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field
from ray.train import UserCallback
from tqdm.auto import tqdm

from relay_models import FrozenConfig
from relay_models.precision import Precision
from relaymap.catalog.storage import (
    StorageError,
    atomic_write,
    filesystem,
    join,
    normalize_url,
    read_bytes,
    remove,
)
from relaymap.ingest import open_scene

from .jobs import connect_ray
from .options import SafeId

log = logging.getLogger(__name__)


def _multiple_of_32(px: int) -> int:
    if px % 32:
        raise ValueError(f"must be a multiple of 32 (a Swin V2 backbone's side), got {px}")
    return px


#: A local window side in pixels, as training and pretraining read it.
WindowPx = Annotated[int, Field(ge=32), AfterValidator(_multiple_of_32)]
#: A scene store's URL; a path becomes an absolute ``file://`` URL where the config is read
#: (Ray workers run in a working directory of their own).
StoreUrl = Annotated[str, AfterValidator(normalize_url)]


class RunConflictError(ValueError):
    """A run name already taken by a run of other settings (bad input: exit 2)."""


class RunConfig(FrozenConfig):
    """Where and how the run executes."""

    name: SafeId = "relaymap-run"
    #: Checkpoints and results go to ``storage_url/name`` (file:// or s3://).
    storage_url: str = "relaymap-runs"
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    #: Forward-pass precision: ``auto`` is bf16 autocast on CUDA and on CPUs with native
    #: bf16 matmuls (AMX, AVX512-BF16), fp32 elsewhere; weights and optimiser stay fp32
    #: (:mod:`relay_models.precision`). A resumed run may change it.
    precision: Precision = "auto"
    max_failures: int = Field(default=1, ge=0)
    checkpoint_every: int = Field(default=50, ge=1)
    val_every: int = Field(default=50, ge=1)
    log_every: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    seed: int = 0

    @property
    def url(self) -> str:
        """The run's folder: ``storage_url/name``."""
        return join(self.storage_url, self.name)


#: ``run`` settings a resumed run may change (with ``optim.steps``): how it executes.
OPERATIONAL = {
    "num_workers",
    "use_gpu",
    "precision",
    "max_failures",
    "checkpoint_every",
    "val_every",
    "log_every",
    "keep_checkpoints",
}


# ---------------------------------------------------------------- on the workers


def device_batches(loader, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of ``loader`` on ``device``."""
    while True:
        for batch in loader:
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def resume(model: torch.nn.Module) -> dict | None:
    """The latest checkpoint's state (model loaded into ``model``), or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    # each worker its own copy: as_directory() shares one download folder between the
    # workers of a node, and a torch.load of it once failed on a restart after a kill
    with tempfile.TemporaryDirectory(prefix="relaymap-resume-") as d:
        checkpoint.to_directory(d)
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return state


def num_nodes(world: int) -> int:
    """How many nodes the run's ``world`` workers are spread over."""
    import ray

    nodes = [None] * world
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return len(set(nodes)) if nodes[0] is not None else 1


def report(metrics: dict[str, Any], state: dict | None) -> None:
    """``ray.train.report`` from every worker; ``state`` (rank 0, on a checkpoint step:
    model, optimiser, schedulers, step) becomes the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            torch.save(state, Path(tmp) / "state.pt")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------- on the driver


def ray_storage(url: str) -> tuple[str, Any]:
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


def check_storage(run: RunConfig) -> None:
    """Fail before any compute when ``run.storage_url`` cannot be written."""
    import uuid

    probe = join(run.url, f".write-probe-{uuid.uuid4().hex}")
    try:
        atomic_write(probe, b"ok")
    except (StorageError, OSError) as e:
        raise StorageError(f"cannot write to run.storage_url={run.storage_url}: {e}") from None
    remove(probe)


def claim_run(config: FrozenConfig, stores: Sequence[str], **facts: Any) -> None:
    """Record what a run is (its settings, the fingerprints of the stores it reads and
    ``facts`` such as its data spec) in ``<storage_url>/<name>/relaymap-run.json``, or
    check that a rerun of the same name is the same run. Only ``optim.steps`` and the
    execution settings (:data:`OPERATIONAL`) may change on a resume: anything else would
    export old weights under new metadata.

    Raises:
        ValueError: the run name is taken by a run of other settings or data (the message
            lists them).
    """
    run: RunConfig = config.run
    doc = config.model_dump(mode="json", exclude={"output": True, "optim": {"steps"}})
    doc["run"] = {k: v for k, v in doc["run"].items() if k not in OPERATIONAL}
    doc["stores"] = {u: open_scene(u).attrs.fingerprint for u in stores}
    doc |= facts
    url = join(run.url, "relaymap-run.json")
    try:
        before = json.loads(read_bytes(url))
    except FileNotFoundError:
        atomic_write(url, json.dumps(doc, indent=1, sort_keys=True).encode())
        return
    if before != doc:
        changed = sorted(k for k in doc.keys() | before.keys() if doc.get(k) != before.get(k))
        raise RunConflictError(
            f"run {run.name!r} in {run.storage_url} was started with other "
            f"{', '.join(changed)}; resume it with its own settings (only optim.steps and "
            f"execution settings may change), or give the new run another run.name"
        )


class ReportQueue(UserCallback):
    """Ray Train callback (it runs in the train controller): hands every report's metrics
    (rank 0's) to a ``ray.util.queue.Queue`` the driver reads for its progress bar and the
    run's history."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = {k: v for k, v in metrics[0].items() if isinstance(v, int | float | list)}
        try:  # progress is best-effort: it must never stop the training it reports on
            self.queue.put({**m, "checkpoint": checkpoint is not None}, timeout=10)
        except Exception as e:
            log.warning("progress report lost: %s", e)


@contextlib.contextmanager
def progress(steps: int, desc: str, history: list[dict]) -> Iterator[ReportQueue]:
    """A tqdm bar over a run's ``steps`` (loss, validation mIoU, ETA), fed from the reports
    while ``trainer.fit()`` runs in this thread; every report lands in ``history``."""
    import ray
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on this (the driver's) node: a worker node may die mid-run, the driver's may not
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    done = threading.Event()
    bar = tqdm(total=steps, unit="step", desc=desc)

    def consume() -> None:
        while not (done.is_set() and queue.empty()):
            try:
                m = queue.get(timeout=0.5)
            except Empty:
                continue
            history.append(m)
            bar.update(int(m.get("step", 0)) - bar.n)
            shown = {"loss": f"{m.get('loss', float('nan')):.3f}"}
            if "val_miou" in m:
                shown["val mIoU"] = f"{m['val_miou']:.3f}"
            bar.set_postfix(shown, refresh=True)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        yield ReportQueue(queue)
    finally:
        done.set()
        reader.join()
        bar.close()
        queue.shutdown()


#: How often Ray Train's controller polls its workers (Ray's default: 2 s). Each poll takes
#: at most one report per worker and a worker's ``report`` waits while its last is untaken,
#: so at 2 s a run reporting faster is slowed to one report per 2 s, ends up to seconds
#: after its loop and notices a dead worker late. The user's own setting wins.
HEALTH_CHECK_INTERVAL_S = "0.2"


def fit(
    loop: Callable[[dict], None],
    loop_config: dict,
    run: RunConfig,
    *,
    steps: int,
    desc: str,
    address: str | None = None,
) -> tuple[Any, list[dict]]:
    """Run (or resume) ``loop`` on Ray Train with ``run``'s workers, storage and failure
    settings, a progress bar over ``steps``; returns Ray's result and the run's history of
    reports (kept in ``storage_url/name/history.json`` across resumes)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    connect_ray(address)
    # read by the driver and handed to the run's controller
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    history_url = join(run.url, "history.json")
    try:
        history = json.loads(read_bytes(history_url))
    except FileNotFoundError:
        history = []
    with progress(steps, desc, history) as reports:
        path, fs = ray_storage(run.storage_url)
        trainer = TorchTrainer(
            loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=run.num_workers,
                use_gpu=run.use_gpu,
                resources_per_worker={"CPU": 1},
            ),
            run_config=RayRunConfig(
                name=run.name,
                storage_path=path,
                storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=run.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
                callbacks=[reports],
            ),
        )
        result = trainer.fit()
    atomic_write(history_url, json.dumps(history).encode())
    return result, history


def final_state(result) -> dict:
    """The state (``model``, ``step``, ...) of a finished run's last checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError("the run reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)


def remove_unregistered_checkpoints(run_url: str) -> list[str]:
    """Remove checkpoint folders Ray Train never registered (a worker killed while
    uploading one leaves it behind: resume never uses it); the folders removed."""
    fs, path = filesystem(run_url)
    fs.invalidate_cache(path)
    try:
        snapshot = read_bytes(join(run_url, "checkpoint_manager_snapshot.json")).decode()
    except FileNotFoundError:
        return []
    registered = set(re.findall(r'"checkpoint_dir_name":\s*"([^"]+)"', snapshot))
    gone = []
    for child in fs.ls(path, detail=False):
        name = child.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("checkpoint_") and fs.isdir(child) and name not in registered:
            fs.rm(child, recursive=True)
            gone.append(name)
    return gone
