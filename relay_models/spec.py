"""A model's data contract: what goes in and what comes out, fixed when the model is made.

Like timm's ``pretrained_cfg``, every model from :func:`relay_models.create_model` carries
one immutable :class:`DataSpec` (``model.spec``); it is saved with the weights
(:mod:`relay_models.saved`) and read back from the file header alone. Training, validation,
inference, STAC writing and the CLI read these facts from the spec and nowhere else.
"""

from __future__ import annotations

from typing import Self

import torch
from pydantic import Field, model_validator

from .config import FrozenConfig

#: Relative pixel-size difference a scene may have from the model's training data.
PIXEL_SIZE_TOLERANCE = 0.1


class ClassSpec(FrozenConfig):
    """One output class; its index is its position in :attr:`DataSpec.classes`."""

    index: int = Field(ge=0, le=254)
    #: The label value in the source data (``classification:classes`` value).
    value: int
    name: str
    #: ``RRGGBB`` display colour, if the source gives one.
    color_hint: str | None = None
    description: str | None = None


class DataSpec(FrozenConfig):
    """The inputs a model expects and the classes it predicts.

    Attributes:
        bands: input band names in order (C of them).
        mean, std: per-band normalisation: the model sees ``(x - mean) / std``, 0 where
            there is no data.
        classes: the K output classes, index 0..K-1.
        window_px: local window side L the model was trained with (pixels at full
            resolution); inference tiles default to it.
        factor: global window side / local window side, or ``None`` when the model takes
            no global window (the one way to say so).
        pixel_size: ground size of a pixel the model was trained on (CRS units, e.g. 10.0
            m for Sentinel-2), or ``None`` when unknown; maps at another pixel size are
            refused (:data:`PIXEL_SIZE_TOLERANCE`).
    """

    bands: tuple[str, ...] = Field(min_length=1)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[ClassSpec, ...] = Field(min_length=1)
    window_px: int = Field(default=256, ge=16)
    factor: int | None = Field(default=None, ge=1)
    pixel_size: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        n = len(self.bands)
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(
                f"mean ({len(self.mean)}) and std ({len(self.std)}) need one value per band "
                f"({n}: {list(self.bands)})"
            )
        if [c.index for c in self.classes] != list(range(len(self.classes))):
            raise ValueError("class indices must be 0..K-1 in order")
        return self

    @classmethod
    def default(
        cls, *, in_chans: int, num_classes: int, factor: int | None, window_px: int = 256
    ) -> DataSpec:
        """The contract of a freshly built model: bands ``b0..``, classes ``class_0..``,
        identity normalisation."""
        return cls(
            bands=tuple(f"b{i}" for i in range(in_chans)),
            mean=(0.0,) * in_chans,
            std=(1.0,) * in_chans,
            classes=tuple(
                ClassSpec(index=i, value=i, name=f"class_{i}") for i in range(num_classes)
            ),
            window_px=window_px,
            factor=factor,
        )

    @property
    def in_chans(self) -> int:
        return len(self.bands)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def takes_global(self) -> bool:
        """Whether the model is called as ``model(local, global_)``."""
        return self.factor is not None

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def class_table(self) -> list[dict]:
        """The classes as plain ``{"index", "value", "name", "color_hint", "description"}``
        dicts, for STAC and GeoTIFF writers."""
        return [c.model_dump() for c in self.classes]

    def norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, 1, 1)`` float32 mean and std (std floored at 1e-6) for z-scoring."""
        m = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        s = torch.tensor(self.std, dtype=torch.float32).clamp(min=1e-6)[:, None, None]
        return m, s
