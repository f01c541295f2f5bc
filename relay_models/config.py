"""Model configuration: one frozen pydantic model, loadable from YAML, validated at the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator


class FrozenConfig(BaseModel):
    """Base of relaymap's configs: immutable, unknown keys rejected, loadable from YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Read and validate a YAML mapping (a ``pydantic.ValidationError`` names bad keys)."""
        data: Any = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)


class ModelOptions(FrozenConfig):
    """A model's architecture choices: all of :class:`ModelConfig` but the sizes the data
    sets (classes, bands). The pipeline's training spec takes these."""

    #: Registered name, e.g. ``swinv2_small_relay`` (see ``relaymap models``).
    name: str = "swinv2_nano_relay"
    #: Relay tokens R (used by ``_relay`` and ``_registers`` models).
    relays: int = Field(default=4, ge=1)
    #: ``sequential`` (global then local in each block, the paper's) or ``parallel``.
    relay_mode: Literal["sequential", "parallel"] = "sequential"
    #: Swin V2 position bias of a pair involving a relay: ``mid`` (``16 * sigmoid(0) = 8``,
    #: ours) or ``zero`` (the authors' code); see ``docs/fidelity.md``.
    relay_bias: Literal["mid", "zero"] = "mid"
    #: Swin V2: how each window's copy of the relays is pooled over the windows after
    #: attention: ``mean`` (the authors' code), ``softmax`` (each window weighted by its
    #: share of the relay's attention mass: one softmax over every window's tokens) or
    #: ``max``; see ``docs/fidelity.md``.
    relay_pool: Literal["mean", "softmax", "max"] = "mean"
    #: Swin V2: post-norm of the relays' attention update: ``shared`` (the block's
    #: ``norm1``, zero-initialised as every Swin V2 res-post-norm; the authors' code) or
    #: ``own`` (a LayerNorm per block initialised to ones); see ``docs/fidelity.md``.
    relay_norm: Literal["shared", "own"] = "shared"
    #: Swin V2: initial weight of every block's residual post-norms (timm's and the
    #: authors' init: 0, each block an identity until trained); see ``docs/fidelity.md``.
    post_norm_init: float = Field(default=0.0, ge=0.0)
    #: Standard deviation of the relay tokens' initial values, drawn from a normal truncated
    #: at +-2 (1: the authors' unit normal, default since issue 29; 0.02: timm's token init,
    #: the default before); see ``docs/fidelity.md``.
    relay_init_std: float = Field(default=1.0, gt=0)
    #: Blocks in which the global branch runs and relays carry its context (the first N);
    #: then the local branch goes on alone. ``None``: every block (the paper's).
    relay_blocks: int | None = Field(default=None, ge=1)
    #: ``convt`` (the paper's transposed convolution) or ``fpn`` (Swin only).
    head: Literal["convt", "fpn"] = "convt"
    #: Separate patch projection for the global window (relay models).
    separate_patch_embed: bool = True
    #: Global window side / local window side.
    factor: int = Field(default=4, ge=1)
    #: Stochastic depth at the last block; ``None`` keeps the backbone's default.
    drop_path_rate: float | None = Field(default=None, ge=0.0, lt=1.0)
    #: timm-format checkpoint for the backbone: a path, an fsspec URL,
    #: ``hf-hub:ORG/NAME[@REVISION]``, timm's ``NAME.TAG`` (``timm/NAME.TAG`` on the Hub) or
    #: an MLM item (``.json``), fetched once into the Hugging Face cache
    #: (:mod:`relay_models.hub`). A relative path is made absolute where the config is
    #: read: Ray workers, which build the model, run in a working directory of their own.
    pretrained: str | None = None

    @field_validator("pretrained")
    @classmethod
    def _absolute(cls, ref: str | None) -> str | None:
        from .hub import absolute

        return None if ref is None else absolute(ref)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from .registry import split_name

        split_name(name)  # ValueError listing valid names
        return name

    @property
    def global_factor(self) -> int | None:
        """The data spec's factor: ``factor`` for models that take a global window, else
        None."""
        from .registry import takes_global

        return self.factor if takes_global(self.name) else None


class ModelConfig(ModelOptions):
    """Everything :func:`relay_models.create_model` needs to build a model."""

    #: Output classes K.
    num_classes: int = Field(ge=1)
    #: Input bands C.
    in_chans: int = Field(default=3, ge=1)
