"""relay_models: relay-token Swin V2 and ViT segmentation models, losses and window geometry.

>>> from relay_models import create_model
>>> model = create_model("swinv2_nano_relay", num_classes=5)
>>> out = model(local, global_)          # two (B, C, L, L) windows -> out.local, out.global_
"""

from __future__ import annotations

from . import geometry
from .attention_maps import relay_attention_maps, relay_read_shares
from .config import FrozenConfig, ModelConfig, ModelOptions
from .factory import create_model
from .hub import WeightsError, WeightsNotFound, fetch_weights
from .inference import predict_array, predict_tiles, to_classes
from .losses import LossTerms, RelayLoss
from .metrics import ConfusionMatrix
from .registry import list_models, split_name
from .saved import SavedModel, load_saved, read_saved, save_model
from .segmenter import RelayOutput, Segmenter
from .spec import ClassSpec, DataSpec
from .stats import count_flops, count_params, model_stats
from .training import evaluate, train_step, warmup_cosine
from .weights import LoadReport, load_pretrained

__all__ = [
    "ClassSpec",
    "ConfusionMatrix",
    "DataSpec",
    "FrozenConfig",
    "LoadReport",
    "LossTerms",
    "ModelConfig",
    "ModelOptions",
    "RelayLoss",
    "RelayOutput",
    "SavedModel",
    "Segmenter",
    "WeightsError",
    "WeightsNotFound",
    "count_flops",
    "count_params",
    "create_model",
    "evaluate",
    "fetch_weights",
    "geometry",
    "list_models",
    "load_pretrained",
    "load_saved",
    "model_stats",
    "predict_array",
    "predict_tiles",
    "read_saved",
    "relay_attention_maps",
    "relay_read_shares",
    "save_model",
    "split_name",
    "to_classes",
    "train_step",
    "warmup_cosine",
]
