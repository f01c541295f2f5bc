"""A trained model as inference needs it: weights, the model config and what its inputs are.

Training writes one safetensors file whose metadata holds the model config
(``relaymap_config``) and the inputs contract (``relaymap_inputs``: band order, the
training stores' per-band mean/std, classes, window side). Either that file or the STAC
MLM item pointing at it (asset role ``mlm:model``) gives a :class:`ModelInfo` (header
only: for planning and checks) or a ready :class:`TrainedModel` (for the model actors).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import pystac
import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load

from catalog.storage import filesystem, normalize_url, read_bytes
from ingest import SceneStore
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

    @classmethod
    def of_store(cls, store: SceneStore, window_px: int) -> ModelInputs:
        """The contract of a model trained on ``store`` (its bands, statistics, classes)."""
        a = store.attrs
        return cls(
            bands=a.bands,
            band_mean=a.band_mean,
            band_std=a.band_std,
            classes=a.classes,
            window_px=window_px,
        )


def weights_metadata(model: ModelConfig, inputs: ModelInputs, step: int) -> dict[str, str]:
    """The safetensors metadata :func:`load_trained` reads back."""
    return {
        "relaymap_config": json.dumps(model.model_dump(mode="json")),
        "relaymap_inputs": json.dumps(inputs.model_dump(mode="json")),
        "step": str(step),
    }


@dataclass(frozen=True)
class ModelInfo:
    """What a trained model is, from its file's metadata alone (no weights read): enough to
    check a scene, name the products and plan the tiles."""

    config: ModelConfig
    inputs: ModelInputs
    weights_url: str
    item: pystac.Item | None = None

    @functools.cached_property
    def factor(self) -> int | None:
        """Global/local side ratio, or None for single-window models."""
        with torch.device("meta"):  # structure only: no memory, no initialisation cost
            model = create_model(**self.config.model_dump(exclude={"pretrained"}))
        return model.factor if model.takes_global else None

    @property
    def name(self) -> str:
        return self.item.id if self.item is not None else self.config.name


@dataclass(frozen=True)
class TrainedModel(ModelInfo):
    """A :class:`ModelInfo` with its model loaded, in eval mode."""

    model: torch.nn.Module = field(kw_only=True)


def _weights_href(item: pystac.Item) -> str:
    for asset in item.assets.values():
        if "mlm:model" in (asset.roles or []):
            return asset.get_absolute_href() or asset.href
    raise ModelError(f"MLM item {item.id} has no asset with role 'mlm:model'")


#: The safetensors format caps its JSON header at 100 MB.
_MAX_HEADER = 100_000_000


def read_info(url: str) -> ModelInfo:
    """A model's info from its safetensors file or its MLM item (``.json``), any storage
    URL; of the weights file only the header is read.

    Raises:
        ModelError: no such file, not a safetensors file, or not a relaymap model.
    """
    url = normalize_url(url)
    item = None
    if url.endswith(".json"):
        item = pystac.Item.from_dict(json.loads(read_bytes(url)))
        item.set_self_href(url)
        url = normalize_url(_weights_href(item))
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(n) if 0 < n <= _MAX_HEADER else b""
        if len(header) != n or not n:
            raise ValueError("bad header length")
        meta = json.loads(header).get("__metadata__") or {}
    except FileNotFoundError:
        raise ModelError(f"no model file at {url}") from None
    except ValueError as e:  # JSON errors are ValueErrors too
        raise ModelError(f"{url} is not a readable safetensors file: {e}") from None
    if "relaymap_config" not in meta or "relaymap_inputs" not in meta:
        raise ModelError(
            f"{url} has no relaymap metadata (relaymap_config, relaymap_inputs): export "
            f"models with flows.train.export, or pretrained backbones via ModelConfig.pretrained"
        )
    config = ModelConfig.model_validate_json(meta["relaymap_config"])
    inputs = ModelInputs.model_validate_json(meta["relaymap_inputs"])
    return ModelInfo(config, inputs, url, item)


def load_trained(url: str) -> TrainedModel:
    """:func:`read_info`, then the weights, strictly, into a model in eval mode.

    Raises:
        ModelError: as :func:`read_info`, or weights that do not fit the config.
    """
    info = read_info(url)
    try:
        state = load(read_bytes(info.weights_url))
    except SafetensorError as e:
        raise ModelError(f"{info.weights_url} is not a readable safetensors file: {e}") from None
    model = create_model(**info.config.model_dump(exclude={"pretrained"}))
    model.load_state_dict(state, strict=True)
    return TrainedModel(info.config, info.inputs, info.weights_url, info.item, model=model.eval())
