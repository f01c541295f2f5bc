"""A trained model as inference needs it: weights, the model config and what its inputs are.

Training writes one safetensors file whose metadata holds the model config
(``relaymap_config``) and the inputs contract (``relaymap_inputs``: band order, the
training stores' per-band mean/std, classes, window side). Either that file or the STAC
MLM item pointing at it (asset role ``mlm:model``) loads back into a ready model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pystac
import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load

from catalog.storage import normalize_url, read_bytes
from relay_models import create_model
from relay_models.config import FrozenConfig, ModelConfig


class ModelError(ValueError):
    """A model file or item that cannot be used (not relaymap's, corrupt, or mismatched)."""


class ModelInputs(FrozenConfig):
    """What a trained model expects: bands in order, their normalisation, its classes."""

    bands: tuple[str, ...]
    band_mean: tuple[float, ...]
    band_std: tuple[float, ...]
    #: ``{"index", "value", "name", "color_hint"}`` per class, index 0..K-1.
    classes: tuple[dict[str, Any], ...] = Field(min_length=1)
    window_px: int = Field(ge=16)


def weights_metadata(model: ModelConfig, inputs: ModelInputs, step: int) -> dict[str, str]:
    """The safetensors metadata :func:`load_trained` reads back."""
    return {
        "relaymap_config": json.dumps(model.model_dump(mode="json")),
        "relaymap_inputs": json.dumps(inputs.model_dump(mode="json")),
        "step": str(step),
    }


@dataclass(frozen=True)
class TrainedModel:
    """A model in eval mode with its config, input contract and (if known) MLM item."""

    model: torch.nn.Module
    config: ModelConfig
    inputs: ModelInputs
    weights_url: str
    item: pystac.Item | None = None

    @property
    def factor(self) -> int | None:
        """Global/local side ratio, or None for single-window models."""
        return self.model.factor if getattr(self.model, "takes_global", False) else None

    @property
    def name(self) -> str:
        return self.item.id if self.item is not None else self.config.name


def _weights_href(item: pystac.Item) -> str:
    for asset in item.assets.values():
        if "mlm:model" in (asset.roles or []):
            return asset.get_absolute_href() or asset.href
    raise ModelError(f"MLM item {item.id} has no asset with role 'mlm:model'")


def load_trained(url: str) -> TrainedModel:
    """Load a model from its safetensors file or its MLM item (``.json``), any storage URL.

    Raises:
        ModelError: the file is not a relaymap model (no config metadata) or is corrupt.
    """
    url = normalize_url(url)
    item = None
    if url.endswith(".json"):
        item = pystac.Item.from_dict(json.loads(read_bytes(url)))
        item.set_self_href(url)
        url = normalize_url(_weights_href(item))
    raw = read_bytes(url)
    try:
        state = load(raw)
        meta = _metadata(raw)
    except (SafetensorError, ValueError) as e:
        raise ModelError(f"{url} is not a readable safetensors file: {e}") from None
    if "relaymap_config" not in meta or "relaymap_inputs" not in meta:
        raise ModelError(
            f"{url} has no relaymap metadata (relaymap_config, relaymap_inputs): export "
            f"models with flows.train.export, or pretrained backbones via ModelConfig.pretrained"
        )
    config = ModelConfig.model_validate_json(meta["relaymap_config"])
    inputs = ModelInputs.model_validate_json(meta["relaymap_inputs"])
    model = create_model(**config.model_dump(exclude={"pretrained"}))
    model.load_state_dict(state, strict=True)
    return TrainedModel(model.eval(), config, inputs, url, item)


def _metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (an 8-byte length, then a JSON header)."""
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or n > len(raw) - 8:
        raise ValueError("bad header length")
    return json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
