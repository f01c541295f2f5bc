"""Loading timm-format checkpoints into relaymap backbones, strictly and with a report.

``pretrained`` may be a local path, an fsspec URL (``s3://``, ``https://`` ...),
``hf-hub:ORG/NAME[@REVISION]``, timm's ``NAME.TAG`` (published as ``timm/NAME.TAG``) or a
STAC MLM item (``.json``) whose model asset holds the weights. :mod:`relay_models.hub` fetches
each once into the Hugging Face cache and verifies what its source publishes (the Hub's LFS
SHA-256, an MLM asset's ``file:checksum``); later uses read the cache without a request.
Files are safetensors or torch pickles loaded with ``weights_only=True``.

Input channels other than the checkpoint's get this initialisation:

* **more bands** (e.g. RGB+NIR with an RGB checkpoint): the first bands take the checkpoint's
  kernels in order, so the band order must start with the checkpoint's (red, green, blue);
  extra bands start at zero, so at step 0 the model computes exactly the pretrained features
  and fine-tuning grows the new bands' kernels from there.
* **fewer bands**: every band gets the sum of the checkpoint's kernels divided by the band
  count, so a grey image (all bands equal) gives the pretrained response.

A checkpoint of a relay backbone (``relaymap pretrain`` writes them) loads into every twin
of that backbone: a relay model uses its relay keys (:data:`NEW_KEY`), the others report
them as unused.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._backbone import Backbone
from .hub import WeightsError, fetch_weights
from .vision_transformer import VisionTransformer, resample_pos_embed

log = logging.getLogger(__name__)

#: Keys of parameters relaymap adds to a timm backbone; a timm checkpoint cannot have them.
NEW_KEY = re.compile(
    r"^(relay_tokens|patch_embed_global\..*|layers\.\d+\.relay_proj\..*"
    r"|layers\.\d+\.blocks\.\d+\.relay_norm1\..*)$"
)
#: Classification-head keys of timm checkpoints: not used by a segmentation model.
CLASSIFIER_KEY = re.compile(r"^(head(\.fc)?\.(weight|bias)|fc_norm\..*|head_drop\..*)$")
#: Non-persistent buffers some checkpoints carry.
BUFFER_KEY = re.compile(r"(relative_position_index|relative_coords_table|attn_mask|k_bias)$")


@dataclass(frozen=True)
class LoadReport:
    """What a pretrained load did: new parameters left at init, checkpoint keys not used."""

    source: str
    initialised: tuple[str, ...]
    unused: tuple[str, ...]
    #: Backbone tensors loaded from the checkpoint.
    loaded: int = 0
    #: The local file read (in the cache for a download).
    file: str = ""

    def summary(self) -> str:
        """Two lines: what was loaded and left at init, and what was not used."""
        new = f": {_first(list(self.initialised), 4)}" if self.initialised else ""
        unused = f": {_first(list(self.unused), 4)}" if self.unused else ""
        where = f" ({self.file})" if self.file and self.file != self.source else ""
        return (
            f"pretrained {self.source}{where}: {self.loaded} backbone tensors loaded, "
            f"{len(self.initialised)} new left at init{new}\n"
            f"unused checkpoint keys: {len(self.unused)}{unused}"
        )


def read_checkpoint(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from any ``pretrained`` reference (fetched by
    :func:`~relay_models.hub.fetch_weights`), unwrapping ``model`` / ``state_dict``
    wrappers."""
    return _read_file(fetch_weights(source), source)


def _read_file(path: Path, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    blob = path.read_bytes()
    if path.name.endswith(".safetensors") or blob[8:9] == b"{":  # u64 header length, JSON
        try:
            sd = load_safetensors(blob)
        except SafetensorError as e:
            raise WeightsError(f"{source} is not a readable safetensors file: {e}") from e
    elif not blob.startswith((b"PK\x03\x04", b"\x80")):  # torch zip, or a legacy pickle
        raise WeightsError(f"{source} is not a readable torch checkpoint or safetensors file")
    else:
        try:
            sd = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            IndexError,
            zipfile.BadZipFile,
        ) as e:
            raise WeightsError(f"{source} is not a readable torch checkpoint: {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{source} does not hold a state dict of tensors")
    return sd


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt patch-projection kernels ``(D, C_ckpt, p, p)`` to ``in_chans`` (module docstring)."""
    c = weight.shape[1]
    if c == in_chans:
        return weight
    if in_chans > c:
        out = weight.new_zeros(weight.shape[0], in_chans, *weight.shape[2:])
        out[:, :c] = weight
        return out
    return (weight.sum(1, keepdim=True) / in_chans).repeat(1, in_chans, 1, 1)


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], backbone: Backbone
) -> dict[str, torch.Tensor]:
    """Map a timm-format (or original Swin V2) state dict onto ``backbone``'s keys.

    Pure: drops non-persistent buffers, moves original-Swin downsample keys to timm's stage
    order, resamples a ViT position embedding to the backbone's grid and adapts the patch
    projection to the backbone's input channels. Classifier keys pass through (reported as
    unused by :func:`load_pretrained`).
    """
    sd = {k: v for k, v in state_dict.items() if not BUFFER_KEY.search(k)}
    if "layers.0.downsample.reduction.weight" in sd:  # original Swin: merging ends a stage
        sd = {
            re.sub(
                r"^layers\.(\d+)\.downsample",
                lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
                k,
            ): v
            for k, v in sd.items()
        }
    proj = sd.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        sd["patch_embed.proj.weight"] = adapt_input_conv(proj, backbone.in_chans)
    pos = sd.get("pos_embed")
    if isinstance(backbone, VisionTransformer) and pos is not None and pos.ndim == 3:
        target = backbone.pos_embed.shape[1] - 1
        side = round(target**0.5)
        if pos.shape[1] - 1 != target and pos.shape[-1] == backbone.pos_embed.shape[-1]:
            patches = resample_pos_embed(pos[:, 1:], (side, side)).to(pos.dtype)
            sd["pos_embed"] = torch.cat([pos[:, :1], patches], dim=1)
    return sd


def _first(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_pretrained(model: nn.Module, source: str | os.PathLike) -> LoadReport:
    """Load a timm-format backbone checkpoint into ``model.backbone``, strictly.

    Every backbone key must be in the checkpoint except relaymap's new ones (relays, relay
    projections, second patch embedding: :data:`NEW_KEY`), and every checkpoint key must be
    a backbone key except the classifier's and relaymap's new ones (a relay backbone's
    checkpoint fits its sliding-window, fusion and downsample twins); shapes must match.
    The global patch embedding, when absent, starts as a copy of the local one.

    Args:
        model: a model from :func:`relay_models.create_model`.
        source: any ``pretrained`` reference (:mod:`relay_models.hub`), fetched once.

    Raises:
        WeightsError: (a ``ValueError``) naming the missing, unexpected or mis-shaped keys
            (the checkpoint is of another architecture), or an unreadable file.
        WeightsNotFound: the source is missing or unreachable and not cached.
        ChecksumMismatch: the downloaded file is not the one its source publishes.
    """
    backbone: Backbone = model.backbone
    path = fetch_weights(source)
    sd = checkpoint_filter_fn(_read_file(path, source), backbone)
    own = backbone.state_dict()
    missing = sorted(k for k in own if k not in sd and not NEW_KEY.match(k))
    unexpected = sorted(
        k for k in sd if k not in own and not (CLASSIFIER_KEY.match(k) or NEW_KEY.match(k))
    )
    shapes = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing backbone keys: {_first(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_first(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches (checkpoint vs model): {_first(shapes, 4)}")
        raise WeightsError(
            f"checkpoint {source} does not fit {type(backbone).__name__} "
            f"(is it of another architecture or size?): " + "; ".join(problems)
        )
    used = {k: v for k, v in sd.items() if k in own}
    backbone.load_state_dict(used, strict=False)
    initialised = sorted(k for k in own if k not in sd)
    if backbone.patch_embed_global is not None and not any(
        k.startswith("patch_embed_global.") for k in sd
    ):
        backbone.patch_embed_global.load_state_dict(backbone.patch_embed.state_dict())
    unused = sorted(k for k in sd if k not in own)
    if initialised:
        log.info("%s: new parameters not in the checkpoint: %s", source, _first(initialised))
    if unused:
        log.info("%s: checkpoint keys not used: %s", source, _first(unused))
    return LoadReport(str(source), tuple(initialised), tuple(unused), len(used), str(path))
