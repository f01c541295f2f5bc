"""relay_models: relay-token Swin V2 and ViT segmentation models, losses and window geometry.

>>> from relay_models import create_model
>>> model = create_model("swinv2_nano_relay", num_classes=5)
>>> out = model(local, global_)          # two (B, C, L, L) windows -> out.local, out.global_
"""

from __future__ import annotations

import os

from . import geometry
from ._registry import list_models
from .attention_maps import relay_attention_maps
from .config import ModelConfig
from .inference import predict_array, predict_tiles, to_classes
from .losses import LossTerms, RelayLoss
from .segmenter import RelayOutput, Segmenter
from .stats import count_flops, count_params, model_stats
from .weights import LoadReport, load_pretrained

__all__ = [
    "LoadReport",
    "LossTerms",
    "ModelConfig",
    "RelayLoss",
    "RelayOutput",
    "Segmenter",
    "count_flops",
    "count_params",
    "create_model",
    "geometry",
    "list_models",
    "load_pretrained",
    "model_stats",
    "predict_array",
    "predict_tiles",
    "relay_attention_maps",
    "to_classes",
]


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    relays: int = 4,
    relay_mode: str = "sequential",
    pretrained: str | os.PathLike | None = None,
    head: str = "convt",
    separate_patch_embed: bool = True,
    factor: int = 4,
    drop_path_rate: float | None = None,
) -> Segmenter:
    """Build a registered segmentation model (timm-style).

    Args:
        name: a name from :func:`list_models`: ``{swinv2_{nano,tiny,small,base},
            vit_{small,base}}`` (sliding window) with an optional suffix ``_relay``,
            ``_registers``, ``_fusion`` (decision fusion) or ``_downsample``.
        num_classes: output classes K.
        in_chans: input bands (see :mod:`relay_models.weights` for pretrained adaptation).
        relays: relay tokens R for ``_relay`` / ``_registers`` (ignored by the others).
        relay_mode: ``sequential`` (global then local, default) or ``parallel`` (``_relay``).
        pretrained: timm-format backbone checkpoint: path, URL or ``hf-hub:ORG/NAME``
            (local cache only); loaded strictly, see :func:`load_pretrained`.
        head: ``convt`` (the paper's transposed convolution) or ``fpn`` (Swin only).
        separate_patch_embed: own patch projection for the global window (``_relay``).
        factor: global/local side ratio (two-window models crop global logits with it).
        drop_path_rate: stochastic depth; ``None`` keeps the backbone default.

    Raises:
        ValueError: unknown name, head or relay mode (the message lists valid choices), or a
            checkpoint that does not fit.
    """
    from ._registry import build_model

    model = build_model(
        name,
        num_classes=num_classes,
        in_chans=in_chans,
        relays=relays,
        relay_mode=relay_mode,
        head=head,
        separate_patch_embed=separate_patch_embed,
        factor=factor,
        drop_path_rate=drop_path_rate,
    )
    model.name = name
    model.num_classes = num_classes
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model
