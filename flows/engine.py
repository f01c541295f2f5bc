"""The engine of a mapping job (:mod:`relay_models.engines`): chosen once by the driver, and
the model's ONNX export made once, beside its weights, before any actor starts.

Why here: an export takes seconds to minutes (a trace of the whole network), so it must not
run per actor or per job. The driver resolves ``options.engine`` for the job's device
(:func:`relay_models.engines.resolve_engine`; ``auto`` by the driver's host, which is the
workers' host on local Ray: on a cluster of mixed CPUs, name the engine), and for ONNX
Runtime makes sure the export exists at :func:`onnx_url`: beside the weights, keyed by
their digest and the model's config (so new weights or another config never meet an old
export) and by the tile side (the graph is traced for one). It is written atomically; a
second run, or a second job at once, reads it. The actors only load it
(:func:`load_engine`).

An export that fails (the exporter, its check against the model, or a location that cannot
be written) does not stop the job: one warning line says why, and the job runs in torch.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Literal

import torch
from torch import nn

from relay_models.engines import ExportError, OnnxEngine, TileEngine, export_onnx, resolve_engine
from relaymap.catalog.storage import atomic_write, exists, read_bytes

from .options import MapOptions
from .trained import ModelInfo, load_trained, read_info

log = logging.getLogger(__name__)


def onnx_url(info: ModelInfo, tile_px: int) -> str:
    """Where the ONNX export of ``info``'s model for ``tile_px`` tiles lives: beside the
    weights, ``<weights>.<key>.<tile_px>px.onnx``, ``key`` the first 16 hex digits of the
    SHA-256 of the weights' digest and the model's config."""
    # a model saved before headers carried the digest: the file's own bytes identify it
    digest = info.digest or hashlib.sha256(read_bytes(info.weights_url)).hexdigest()
    key = hashlib.sha256(f"{digest}\n{info.config.model_dump_json()}".encode())
    return f"{info.weights_url}.{key.hexdigest()[:16]}.{tile_px}px.onnx"


def plan_engine(
    info: ModelInfo, options: MapOptions, tile_px: int, *, use_gpu: bool
) -> tuple[Literal["torch", "onnxruntime"], str | None]:
    """The driver's part: the engine the actors run and, for ``onnxruntime``, the URL of the
    export, made now if it is not there yet.

    Returns:
        ``("torch", None)`` or ``("onnxruntime", url)``; ``("torch", None)`` with a warning
        when the export cannot be made or written.

    Raises:
        ValueError: an engine that cannot run here (:func:`resolve_engine`).
    """
    device = "cuda" if use_gpu else "cpu"
    engine = resolve_engine(options.engine, options.precision, device)
    if engine == "torch":
        return "torch", None
    url = onnx_url(info, tile_px)
    if exists(url):
        return "onnxruntime", url
    try:
        data = export_onnx(load_trained(info.weights_url)[1], tile_px)
    except ExportError as e:
        return _with_torch(str(e))
    try:
        atomic_write(url, data)
    except (OSError, NotImplementedError) as e:  # StorageError is an OSError; read-only http
        return _with_torch(f"cannot write the ONNX export {url}: {str(e) or type(e).__name__}")
    return "onnxruntime", url


def _with_torch(reason: str) -> tuple[Literal["torch"], None]:
    """The fallback: one warning line (the reason's first line), then torch."""
    log.warning("%s; mapping with torch instead", (reason.strip().splitlines() or [""])[0])
    return "torch", None


def load_engine(
    model_url: str,
    engine: Literal["torch", "onnxruntime"],
    onnx: str | None,
    *,
    device: torch.device,
    threads: int,
) -> tuple[ModelInfo, nn.Module | TileEngine]:
    """The actors' part: the model's info and what runs it. ``torch``: the model on
    ``device`` (its precision is each call's); ``onnxruntime``: a session of the export at
    ``onnx`` with ``threads`` intra-op threads (the actor's CPUs), no torch model loaded."""
    if engine == "torch":
        info, model = load_trained(model_url)
        return info, model.to(device)
    if onnx is None:
        raise ValueError("engine onnxruntime needs the export's URL (plan_engine)")
    info = read_info(model_url)
    return info, OnnxEngine(read_bytes(onnx), info.spec, threads=threads)
