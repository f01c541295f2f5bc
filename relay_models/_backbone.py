"""The one loop that runs a backbone on one or two windows, with or without relay tokens.

A backbone is a list of *steps* (transformer blocks, patch mergings). Each step maps
``(state, relays) -> (state, relays)``; ``relays`` is ``None`` for a plain backbone. With two
windows the steps run in lockstep, global window first then local (paper, "sequential"),
or both on the same incoming relays, averaging their outputs ("parallel", paper Table 7).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

RelayMode = Literal["sequential", "parallel"]
RELAY_MODES: tuple[str, ...] = ("sequential", "parallel")

#: A block step: ``(state, relays) -> (state, relays)``, run once per window.
Block = Callable[[Any, torch.Tensor | None], tuple[Any, torch.Tensor | None]]


class Transition(NamedTuple):
    """A step that changes resolution (patch merging): ``state`` runs once per window, and
    ``relays`` once per step, whatever the number of windows."""

    state: Callable[[Any], Any]
    relays: Callable[[torch.Tensor], torch.Tensor]


Step = Block | Transition


class TokenMask(NamedTuple):
    """Patch tokens to hide from a backbone (masked image modelling): ``where`` ``(B, h, w)``
    bool on the first stage's token grid, replaced by ``token`` ``(D0,)``."""

    where: torch.Tensor
    token: torch.Tensor

    def apply(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, D0)`` patch tokens with the masked ones replaced."""
        return torch.where(self.where[..., None], self.token.to(tokens.dtype), tokens)


class Backbone(nn.Module, ABC):
    """Base for relay-capable backbones; subclasses define ``embed``, ``steps``, ``stage_output``.

    A step is a :data:`Block` or a :class:`Transition`.

    Attributes:
        num_relays: relay tokens R (0 for a plain backbone).
        relay_tokens: ``(R, D0)`` learnable tokens, ``D0`` the first-stage width, or ``None``.
        feature_info: one dict per output stage with ``num_chs``, ``reduction``, ``module``.
        patch_size: input pixels per token side at the first stage.
        side_multiple: input sides must be a multiple of this many pixels.
    """

    num_relays: int
    relay_tokens: nn.Parameter | None
    feature_info: list[dict[str, Any]]
    patch_size: int
    side_multiple: int

    @abstractmethod
    def embed(self, x: torch.Tensor, branch: str, mask: TokenMask | None = None) -> Any:
        """Turn an image ``(B, C, H, W)`` into the first step's state for ``branch``; with
        ``mask``, the masked patch tokens are replaced by its token before positions are
        added (masked image modelling, :mod:`relay_models.pretraining`)."""

    @abstractmethod
    def steps(self) -> Iterator[tuple[Step, int | None]]:
        """Yield ``(step, stage)``; ``stage`` is set on a stage's last step, else ``None``."""

    @abstractmethod
    def stage_output(self, state: Any, stage: int) -> torch.Tensor:
        """Feature map ``(B, C_stage, H/r, W/r)`` of ``stage`` from a step state."""

    def check_input(self, x: torch.Tensor, name: str = "input") -> None:
        """Raise ``ValueError`` naming the problem if ``x`` is not ``(B, in_chans, S, S')``."""
        in_chans = self.in_chans
        if x.ndim != 4:
            raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != in_chans:
            raise ValueError(
                f"{name} has {x.shape[1]} channels but the model expects in_chans={in_chans}"
            )
        h, w = x.shape[-2:]
        m = self.side_multiple
        if h % m or w % m:
            raise ValueError(
                f"{name} size {h}x{w} px is not a multiple of {m} px, the smallest side this "
                f"backbone accepts (patch size and downsampling); e.g. use {max(m, h // m * m)}"
            )

    @property
    def in_chans(self) -> int:
        return self.patch_embed.proj.in_channels

    def forward_branches(
        self,
        inputs: dict[str, torch.Tensor],
        *,
        relay_mode: RelayMode | None = None,
        global_blocks: int | None = None,
        masks: dict[str, TokenMask] | None = None,
    ) -> dict[str, list[torch.Tensor]]:
        """Run the backbone on each named window, exchanging relays when ``relay_mode`` is set.

        Args:
            inputs: windows keyed by branch name, ``(B, C, L, L)`` each, in execution order
                (``{"global": g, "local": l}`` runs the global window first in each block).
            relay_mode: ``None`` runs without relays; otherwise ``"sequential"`` or
                ``"parallel"``; with one window both mean "registers".
            global_blocks: run the ``global`` branch through the first N blocks only (its
                feature list then stops short); ``None``: through all.
            masks: per branch, patch tokens to replace by a mask token (pretraining).

        Returns:
            Per branch, one ``(B, C_i, L/r_i, L/r_i)`` feature map per stage in ``feature_info``.
        """
        if relay_mode is not None and relay_mode not in RELAY_MODES:
            raise ValueError(f"relay_mode must be one of {RELAY_MODES}, got {relay_mode!r}")
        if relay_mode is not None and self.relay_tokens is None:
            raise ValueError("this backbone was built with relays=0; build it with relays > 0")
        names: Sequence[str] = list(inputs)
        masks = masks or {}
        states = {b: self.embed(x, b, masks.get(b)) for b, x in inputs.items()}
        batch = next(iter(inputs.values())).shape[0]
        relays = None
        if relay_mode is not None:
            relays = self.relay_tokens.unsqueeze(0).expand(batch, -1, -1)
        feats: dict[str, list[torch.Tensor]] = {b: [] for b in names}
        blocks = 0
        for step, stage in self.steps():
            if global_blocks is not None and blocks == global_blocks and "global" in names:
                names = [b for b in names if b != "global"]
            if isinstance(step, Transition):
                for b in names:
                    states[b] = step.state(states[b])
                if relays is not None:
                    relays = step.relays(relays)
            elif relays is not None and relay_mode == "parallel" and len(names) > 1:
                outs = [step(states[b], relays) for b in names]
                for b, (state, _) in zip(names, outs, strict=True):
                    states[b] = state
                relays = torch.stack([r for _, r in outs]).mean(0)
            else:
                for b in names:
                    states[b], relays = step(states[b], relays)
            blocks += not isinstance(step, Transition)
            if stage is not None:
                for b in names:
                    feats[b].append(self.stage_output(states[b], stage))
        return feats

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Plain single-window features, one ``(B, C_i, H/r_i, W/r_i)`` map per stage."""
        self.check_input(x)
        return self.forward_branches({"local": x})["local"]
