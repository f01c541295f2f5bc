"""A trained model at a storage URL: its safetensors weights, or the STAC MLM item pointing at
them (asset role ``mlm:model``). :func:`read_info` reads the header only (the model's config
and data contract: enough to check a scene, name products and plan tiles);
:func:`load_trained` also builds the network and loads the weights (the model actors)."""

from __future__ import annotations

from dataclasses import dataclass

import pystac
from torch import nn

from relay_models import DataSpec, ModelConfig, load_saved, read_saved
from relay_models.saved import SavedModelError
from relaymap.catalog.items import read_item
from relaymap.catalog.storage import filesystem, normalize_url, read_bytes


class ModelError(ValueError):
    """A model file or item that cannot be used (not relaymap's, corrupt, or mismatched)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a trained model is, from its file's header alone (no weights read)."""

    config: ModelConfig
    spec: DataSpec
    weights_url: str
    #: SHA-256 of the weights, from the header.
    digest: str
    item: pystac.Item | None = None

    @property
    def name(self) -> str:
        """The model's identity in product names: its MLM item id (the training run), else
        its architecture and weights digest; never the architecture alone, which two
        different models share."""
        if self.item is not None:
            return self.item.id
        return f"{self.config.name}-{self.digest[:8]}" if self.digest else self.config.name


def _weights_href(item: pystac.Item) -> str:
    for asset in item.assets.values():
        if "mlm:model" in (asset.roles or []):
            return asset.get_absolute_href() or asset.href
    raise ModelError(f"MLM item {item.id} has no asset with role 'mlm:model'")


def read_info(url: str) -> ModelInfo:
    """A model's info from its safetensors file or its MLM item (``.json``), any storage
    URL; of the weights file only the header is read.

    Raises:
        ModelError: no such file, not a safetensors file, or not a relaymap model.
    """
    url = normalize_url(url)
    item = None
    if url.endswith(".json"):
        try:
            item = read_item(url)
        except FileNotFoundError:
            raise ModelError(f"no model item at {url}") from None
        except ValueError as e:
            raise ModelError(str(e)) from None
        url = normalize_url(_weights_href(item))
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            saved = read_saved(f, url)
    except FileNotFoundError:
        raise ModelError(f"no model file at {url}") from None
    except SavedModelError as e:
        raise ModelError(str(e)) from None
    return ModelInfo(saved.config, saved.spec, url, saved.digest, item)


def load_trained(url: str) -> tuple[ModelInfo, nn.Module]:
    """:func:`read_info`, and the model with its weights loaded strictly, in eval mode.

    Raises:
        ModelError: as :func:`read_info`, or weights that do not fit the config.
    """
    info = read_info(url)
    try:
        return info, load_saved(read_bytes(info.weights_url), info.weights_url)
    except SavedModelError as e:
        raise ModelError(str(e)) from None
