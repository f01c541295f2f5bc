"""``create_model``: a registered model with its config and its data contract attached."""

from __future__ import annotations

import os

from .config import ModelConfig
from .registry import build_model
from .segmenter import Segmenter
from .spec import DataSpec
from .weights import load_pretrained


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    relays: int = 4,
    relay_mode: str = "sequential",
    relay_bias: str = "mid",
    relay_pool: str = "mean",
    relay_norm: str = "shared",
    post_norm_init: float = 0.0,
    relay_init_std: float = 1.0,
    relay_blocks: int | None = None,
    pretrained: str | os.PathLike | None = None,
    head: str = "convt",
    separate_patch_embed: bool = True,
    factor: int = 4,
    drop_path_rate: float | None = None,
    spec: DataSpec | None = None,
) -> Segmenter:
    """Build a registered segmentation model (timm-style).

    Args:
        name: a name from :func:`list_models`: ``{swinv2_{nano,tiny,small,base},
            vit_{small,base}}`` (sliding window) with an optional suffix ``_relay``,
            ``_registers``, ``_fusion`` (decision fusion), ``_downsample`` or
            ``_relayfusion`` (a hybrid: the relay model with decision fusion of its own
            global logits).
        num_classes: output classes K.
        in_chans: input bands (see :mod:`relay_models.weights` for pretrained adaptation).
        relays: relay tokens R for ``_relay`` / ``_registers`` (ignored by the others).
        relay_mode: ``sequential`` (global then local, default) or ``parallel`` (``_relay``).
        relay_bias: Swin V2 bias of relay pairs: ``mid`` (8, ours) or ``zero`` (authors').
        relay_pool: Swin V2 pooling of the windows' relay copies after attention: ``mean``
            (authors'), ``softmax`` (one softmax over all windows' tokens) or ``max``.
        relay_norm: Swin V2 post-norm of the relays' attention update: ``shared`` with the
            patches (zero-initialised; authors') or ``own`` (initialised to ones).
        post_norm_init: Swin V2 initial weight of the blocks' residual post-norms (timm: 0).
        relay_init_std: standard deviation of the relay tokens' initial values (normal
            truncated at +-2; 1: the authors' unit normal, the default).
        relay_blocks: run the global branch (and so relay context) in the first N blocks
            only; ``None``: all (``_relay``).
        pretrained: timm-format backbone checkpoint: a path, an fsspec URL,
            ``hf-hub:ORG/NAME[@REVISION]``, timm's ``NAME.TAG`` or an MLM item (``.json``),
            fetched once into the Hugging Face cache (:mod:`relay_models.hub`); loaded
            strictly, see :func:`load_pretrained`.
        head: ``convt`` (the paper's transposed convolution) or ``fpn`` (Swin only).
        separate_patch_embed: own patch projection for the global window (``_relay``).
        factor: global/local side ratio (two-window models crop global logits with it).
        drop_path_rate: stochastic depth; ``None`` keeps the backbone default.
        spec: the model's data contract (bands, normalisation, classes, window); default
            :meth:`DataSpec.default`. It must agree with ``in_chans``, ``num_classes`` and
            ``factor``.

    Returns:
        The model, with ``model.config`` (a :class:`ModelConfig`, ``pretrained`` dropped)
        and ``model.spec`` (its :class:`DataSpec`).

    Raises:
        ValueError: unknown name, head or relay mode (the message lists valid choices), a
            spec that does not fit, or a checkpoint that does not fit (``WeightsError``).
        WeightsNotFound: the checkpoint is missing or unreachable and not cached.
    """
    arch = dict(
        num_classes=num_classes,
        in_chans=in_chans,
        relays=relays,
        relay_mode=relay_mode,
        relay_bias=relay_bias,
        relay_pool=relay_pool,
        relay_norm=relay_norm,
        post_norm_init=post_norm_init,
        relay_init_std=relay_init_std,
        relay_blocks=relay_blocks,
        head=head,
        separate_patch_embed=separate_patch_embed,
        factor=factor,
        drop_path_rate=drop_path_rate,
    )
    model = build_model(name, **arch)  # first: its errors name the valid choices
    config = ModelConfig(name=name, **arch)
    model_factor = config.global_factor
    if spec is None:
        spec = DataSpec.default(in_chans=in_chans, num_classes=num_classes, factor=model_factor)
    if (spec.in_chans, spec.num_classes, spec.factor) != (in_chans, num_classes, model_factor):
        raise ValueError(
            f"the data spec of {name} (bands {list(spec.bands)}, {spec.num_classes} classes, "
            f"factor {spec.factor}) does not fit the model (in_chans={in_chans}, "
            f"num_classes={num_classes}, factor={model_factor})"
        )
    model.name = name
    model.num_classes = num_classes
    model.config = config
    model.spec = spec
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model
