"""Inference options, declared once: the CLI's flags, Prefect parameters and Ray job configs
are all made from :class:`MapOptions` (a new option is one field here)."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import AfterValidator, Field, model_validator

from relay_models.config import FrozenConfig
from relay_models.engines import Engine
from relay_models.precision import Precision
from relaymap.catalog.storage import check_id

#: An id that becomes part of a path or URL (run names, collections, item ids): validated
#: where the config is read, with :func:`relaymap.catalog.storage.check_id`.
SafeId = Annotated[str, AfterValidator(check_id)]


class MapOptions(FrozenConfig):
    """How a scene is mapped: the one place inference options are declared. The CLI's flags
    (``relaymap infer --help``), Prefect parameters and Ray job configs are made from it."""

    tile_px: int | None = Field(
        default=None, ge=32, description="Tile side in pixels (default: the model's window)."
    )
    overlap_px: int | None = Field(
        default=None,
        ge=0,
        description="Overlap of neighbouring tiles (default: an eighth of a tile).",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Tiles per forward pass (default: by tile size, 32 for 64 px tiles, 8 from "
        "128 px).",
    )
    precision: Precision = Field(
        default="auto",
        description="Forward-pass precision of engine torch: auto is bf16 autocast on CUDA and "
        "on CPUs with native bf16 matmuls (AMX, AVX512-BF16), fp32 elsewhere; blending stays "
        "fp32. Engine onnxruntime runs fp32.",
    )
    engine: Engine = Field(
        default="auto",
        description="What runs the model: torch, or onnxruntime (fp32, CPU; the model's ONNX "
        "export, made once and cached beside the weights); auto is onnxruntime on CPUs (the "
        "faster there, bf16 CPUs included) unless precision is bf16, torch on GPUs.",
    )
    workers: int = Field(
        default=2, ge=1, description="Model actors (one GPU each on a GPU cluster, else 1 CPU)."
    )
    use_gpu: bool | None = Field(
        default=None, description="Run the model on GPUs (default: when the cluster has any)."
    )
    probabilities: bool = Field(
        default=False,
        description="Also write the class probability COG (round(p * 254), 255 = nodata).",
    )
    quicklook: bool = Field(default=True, description="Write a PNG quicklook with a legend.")
    compress: Literal["DEFLATE", "ZSTD"] = Field(default="DEFLATE", description="COG compression.")

    @model_validator(mode="after")
    def _engine_runs_precision(self) -> Self:
        if self.engine == "onnxruntime" and self.precision == "bf16":
            raise ValueError("engine onnxruntime runs fp32: use precision fp32 or auto")
        return self
