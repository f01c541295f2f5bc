"""Loading timm-format checkpoints into relaymap backbones, strictly and with a report.

``pretrained`` may be a local path, an fsspec URL (``s3://``, ``https://`` ...) or
``hf-hub:ORG/NAME``, resolved from the local Hugging Face cache only (never downloaded at run
time). Files are safetensors or torch pickles loaded with ``weights_only=True``.

Input channels other than the checkpoint's get this initialisation:

* **more bands** (e.g. RGB+NIR with an RGB checkpoint): the first bands take the checkpoint's
  kernels in order, so the band order must start with the checkpoint's (red, green, blue);
  extra bands start at zero, so at step 0 the model computes exactly the pretrained features
  and fine-tuning grows the new bands' kernels from there.
* **fewer bands**: every band gets the sum of the checkpoint's kernels divided by the band
  count, so a grey image (all bands equal) gives the pretrained response.
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


def _hf_cache_file(ref: str) -> Path:
    repo = ref.removeprefix("hf-hub:")
    roots = [
        os.environ.get("HF_HUB_CACHE"),
        os.environ.get("HF_HOME") and os.path.join(os.environ["HF_HOME"], "hub"),
        os.path.expanduser("~/.cache/huggingface/hub"),
    ]
    folder = "models--" + repo.replace("/", "--")
    for root in filter(None, roots):
        for name in ("model.safetensors", "pytorch_model.bin"):
            hits = sorted(Path(root, folder, "snapshots").glob(f"*/{name}"))
            if hits:
                return hits[-1]
    raise FileNotFoundError(
        f"{ref}: no model.safetensors or pytorch_model.bin for {repo} in the Hugging Face cache "
        f"({', '.join(filter(None, roots))}); relaymap never downloads weights at run time: "
        f"fetch them once (e.g. huggingface-cli download {repo}) or pass a file path"
    )


def read_checkpoint(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a path, URL or ``hf-hub:`` reference (unwrapping ``model`` /
    ``state_dict`` wrappers)."""
    import fsspec
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    ref = str(source)
    if ref.startswith("hf-hub:"):
        ref = str(_hf_cache_file(ref))
    try:
        with fsspec.open(ref, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {source}") from None
    if ref.endswith(".safetensors") or blob[8:9] == b"{":  # u64 header length, then JSON
        try:
            sd = load_safetensors(blob)
        except SafetensorError as e:
            raise ValueError(f"{source} is not a readable safetensors file: {e}") from e
    elif not blob.startswith((b"PK\x03\x04", b"\x80")):  # torch zip, or a legacy pickle
        raise ValueError(f"{source} is not a readable torch checkpoint or safetensors file")
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
            raise ValueError(f"{source} is not a readable torch checkpoint: {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors")
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
    projections, second patch embedding), and every checkpoint key must be a backbone key
    except the classifier's; shapes must match. The global patch embedding, when absent,
    starts as a copy of the local one.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped keys: the checkpoint is of
            another architecture.
    """
    backbone: Backbone = model.backbone
    sd = checkpoint_filter_fn(read_checkpoint(source), backbone)
    own = backbone.state_dict()
    missing = sorted(k for k in own if k not in sd and not NEW_KEY.match(k))
    unexpected = sorted(k for k in sd if k not in own and not CLASSIFIER_KEY.match(k))
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
        raise ValueError(
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
    return LoadReport(str(source), tuple(initialised), tuple(unused))
