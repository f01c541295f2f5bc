"""The model registry: every name is data (backbone family + config + context variant)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._backbone import Backbone
from .heads import create_head
from .segmenter import (
    DecisionFusionSegmenter,
    DownsamplingSegmenter,
    RegistersSegmenter,
    RelayFusionSegmenter,
    RelaySegmenter,
    Segmenter,
    SlidingWindowSegmenter,
)
from .swin_transformer_v2 import SwinTransformerV2
from .vision_transformer import VisionTransformer


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone variant: its class, its arguments, and the timm model sharing its keys."""

    cls: type[Backbone]
    kwargs: dict[str, Any] = field(hash=False)
    timm_name: str | None


#: Backbones. ``nano`` is a CPU-sized Swin V2 for tests and the demo (no timm twin).
BACKBONES: dict[str, BackboneSpec] = {
    "swinv2_nano": BackboneSpec(
        SwinTransformerV2, dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)), None
    ),
    "swinv2_tiny": BackboneSpec(
        SwinTransformerV2,
        dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
        "swinv2_tiny_window8_256",
    ),
    "swinv2_small": BackboneSpec(
        SwinTransformerV2,
        dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
        "swinv2_small_window8_256",
    ),
    "swinv2_base": BackboneSpec(
        SwinTransformerV2,
        dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
        "swinv2_base_window8_256",
    ),
    "vit_small": BackboneSpec(
        VisionTransformer, dict(embed_dim=384, depth=12, num_heads=6), "vit_small_patch16_224"
    ),
    "vit_base": BackboneSpec(
        VisionTransformer, dict(embed_dim=768, depth=12, num_heads=12), "vit_base_patch16_224"
    ),
}

#: Context variants, by name suffix: the segmenter class and whether it has relay tokens.
VARIANTS: dict[str, tuple[type[Segmenter], bool]] = {
    "": (SlidingWindowSegmenter, False),
    "_relay": (RelaySegmenter, True),
    "_registers": (RegistersSegmenter, True),
    "_fusion": (DecisionFusionSegmenter, False),
    "_downsample": (DownsamplingSegmenter, False),
    "_relayfusion": (RelayFusionSegmenter, True),
}


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    names = [b + v for b in BACKBONES for v in VARIANTS]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def split_name(name: str) -> tuple[str, str]:
    """``"swinv2_tiny_relay"`` -> ``("swinv2_tiny", "_relay")``; ``ValueError`` if unknown."""
    for suffix in sorted(VARIANTS, key=len, reverse=True):
        base = name.removesuffix(suffix) if suffix else name
        if (not suffix or name.endswith(suffix)) and base in BACKBONES:
            return base, suffix
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")


def build_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    relays: int,
    relay_mode: str,
    relay_bias: str,
    relay_pool: str,
    relay_norm: str,
    post_norm_init: float,
    relay_init_std: float,
    relay_blocks: int | None,
    head: str,
    separate_patch_embed: bool,
    factor: int,
    drop_path_rate: float | None,
) -> Segmenter:
    """Instantiate a registered model with fresh weights (see ``create_model``)."""
    base, suffix = split_name(name)
    spec = BACKBONES[base]
    seg_cls, has_relays = VARIANTS[suffix]
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if has_relays and relays < 1:
        raise ValueError(f"{name} needs relays >= 1, got {relays}")
    # only a model that embeds both windows with relays can use a second patch projection
    separate = separate_patch_embed and issubclass(seg_cls, RelaySegmenter)
    kwargs = dict(
        spec.kwargs,
        in_chans=in_chans,
        relays=relays if has_relays else 0,
        separate_patch_embed=separate,
        relay_init_std=relay_init_std,
    )
    if spec.cls is SwinTransformerV2:
        kwargs["relay_bias"] = relay_bias
        kwargs["relay_pool"] = relay_pool
        kwargs["relay_norm"] = relay_norm
        kwargs["post_norm_init"] = post_norm_init
    elif relay_bias != "mid":
        raise ValueError(f"relay_bias={relay_bias!r} applies to Swin V2 models only")
    elif relay_pool != "mean":
        # one attention over the whole window: there are no per-window copies to pool
        raise ValueError(f"relay_pool={relay_pool!r} applies to Swin V2 models only")
    elif relay_norm != "shared":
        # pre-norm blocks: nothing gates the relays' updates at initialisation
        raise ValueError(f"relay_norm={relay_norm!r} applies to Swin V2 models only")
    elif post_norm_init != 0.0:
        raise ValueError(f"post_norm_init={post_norm_init} applies to Swin V2 models only")
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    backbone = spec.cls(**kwargs)
    decode_head: nn.Module = create_head(head, backbone.feature_info, num_classes)
    extra = (
        {"relay_mode": relay_mode, "relay_blocks": relay_blocks}
        if issubclass(seg_cls, RelaySegmenter)
        else {}
    )
    return seg_cls(backbone, decode_head, factor=factor, **extra)


def takes_global(name: str) -> bool:
    """Whether the registered model ``name`` is called as ``model(local, global_)``."""
    return VARIANTS[split_name(name)[1]][0].takes_global
