"""A trained model on disk: safetensors weights whose header carries the model's config and
its data contract, so a reader learns what the model is without building it.

Header metadata keys: ``relaymap_config`` (:class:`~relay_models.config.ModelConfig` JSON),
``relaymap_spec`` (:class:`~relay_models.spec.DataSpec` JSON), plus any string extras
(e.g. ``step``). Storage is the caller's business: these functions take local paths, open
binary files or bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from .config import ModelConfig
from .factory import create_model
from .segmenter import Segmenter
from .spec import DataSpec

CONFIG_KEY, SPEC_KEY, DIGEST_KEY = "relaymap_config", "relaymap_spec", "weights_sha256"
#: The safetensors format caps its JSON header at 100 MB.
MAX_HEADER = 100_000_000


class SavedModelError(ValueError):
    """A file that is not a readable relaymap model (not safetensors, or no relaymap header)."""


@dataclass(frozen=True)
class SavedModel:
    """What a saved model is, from its header alone."""

    config: ModelConfig
    spec: DataSpec
    #: SHA-256 of the weights (tensor names, shapes, dtypes and bytes): the model's identity.
    digest: str = ""
    #: Other header metadata (strings), e.g. ``{"step": "300"}``.
    extra: dict[str, str] = field(default_factory=dict)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(model: Segmenter, path: str | os.PathLike, **extra: str) -> None:
    """Write ``model``'s weights with its ``config``, ``spec`` (from ``create_model``) and
    the weights' digest."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {
        CONFIG_KEY: model.config.model_dump_json(),
        SPEC_KEY: model.spec.model_dump_json(),
        DIGEST_KEY: weights_digest(state),
        **{k: str(v) for k, v in extra.items()},
    }
    save_file(state, str(path), metadata=meta)


def read_saved(f: BinaryIO, name: str = "model") -> SavedModel:
    """The :class:`SavedModel` in a safetensors file's header (only the header is read).

    Raises:
        SavedModelError: not a safetensors file, or one without relaymap's metadata.
    """
    try:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n) if 0 < n <= MAX_HEADER else b""
        if len(header) != n or not n:
            raise ValueError("bad header length")
        meta = json.loads(header).get("__metadata__") or {}
    except ValueError as e:  # JSON errors are ValueErrors too
        raise SavedModelError(f"{name} is not a readable safetensors file: {e}") from None
    if CONFIG_KEY not in meta or SPEC_KEY not in meta:
        raise SavedModelError(
            f"{name} has no relaymap metadata ({CONFIG_KEY}, {SPEC_KEY}): save models with "
            f"relay_models.save_model (training's export does)"
        )
    config = ModelConfig.model_validate_json(meta.pop(CONFIG_KEY))
    spec = DataSpec.model_validate_json(meta.pop(SPEC_KEY))
    return SavedModel(config, spec, meta.pop(DIGEST_KEY, ""), meta)


def load_saved(data: bytes, name: str = "model") -> Segmenter:
    """Build the saved model and load its weights strictly; in eval mode.

    Raises:
        SavedModelError: as :func:`read_saved`, or weights that do not fit the config.
    """
    saved = read_saved(io.BytesIO(data), name)
    try:
        state = load(data)
    except SafetensorError as e:
        raise SavedModelError(f"{name} is not a readable safetensors file: {e}") from None
    model = create_model(**saved.config.model_dump(exclude={"pretrained"}), spec=saved.spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SavedModelError(f"{name}: the weights do not fit {saved.config.name}: {e}") from None
    return model.eval()
