"""A stable map per period: per pixel, the most frequent class of its last few observable
periods, so that one month of haze or a model flicker does not flip a pixel.

For period t, a pixel's observations are its classes in t, t-1, ... (at most
:attr:`StableConfig.lookback` periods back), skipping the periods where it was unobservable;
the stable class is the mode of the most recent :attr:`StableConfig.window` of them, ties
going to the class seen earliest: a new class must outnumber the old one, so a single month
never flips a pixel, even with only two observations. A pixel unobservable in t keeps the
mode of its earlier observations; one never observed in the lookback is nodata. A true
change shows in the stable map once it is the majority of the window (one period later for
a window of 2 or 3).

Computed per cell on a Ray worker (:func:`stable_cell`) from the cell's class COGs; the
driver writes one VRT mosaic per period beside the raw one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from relay_models.config import FrozenConfig

from .change import INPUTS_TAG, read_classes, read_tags
from .cog import NODATA, write_class_cog


class StableConfig(FrozenConfig):
    """The stable map of an area run (``products.stable``)."""

    #: Observations per pixel: the stable class is the mode of a pixel's last ``window``
    #: observable periods (ties: the tied class seen earliest).
    window: int = Field(default=3, ge=2, le=24)
    #: How many periods (this one included) to look back for those observations.
    lookback: int = Field(default=6, ge=2, le=48)

    @model_validator(mode="after")
    def _lookback_holds_window(self) -> StableConfig:
        if self.lookback < self.window:
            raise ValueError(
                f"lookback={self.lookback} must be at least window={self.window} periods"
            )
        return self


def stable_classes(stack: np.ndarray, window: int, num_classes: int) -> np.ndarray:
    """The stable class of every pixel.

    Args:
        stack: ``(L, H, W)`` uint8 class maps, the most recent first, 255 = unobservable.
        window: observations per pixel (the most recent observable ones).
        num_classes: K.

    Returns:
        ``(H, W)`` uint8: the mode of each pixel's last ``window`` observations, ties to the
        tied class seen earliest; 255 where it was never observed.
    """
    n = len(stack)
    valid = stack < num_classes
    use = valid & (np.cumsum(valid, axis=0) <= window)  # (L, H, W)
    best = np.zeros(stack.shape[1:], dtype=np.int32)
    out = np.full(stack.shape[1:], NODATA, dtype=np.uint8)
    for k in range(num_classes):
        hit = use & (stack == k)
        count = hit.sum(0, dtype=np.int32)
        # age: 1 + index of the earliest hit (stack is most recent first), 0 when none
        age = np.where(hit.any(0), n - hit[::-1].argmax(0), 0).astype(np.int32)
        score = count * (n + 1) + age
        better = (count > 0) & (score > best)
        out[better], best[better] = k, score[better]
    return out


def stable_cell(task: Mapping[str, Any]) -> dict[str, Any]:
    """One cell's stable map for one period (a worker's task; small result).

    ``task``: ``cell``, ``period``, ``maps`` (the cell's class COG URLs, this period first,
    then earlier ones; None for a period without a map), ``inputs`` (their checksums),
    ``window``, ``classes`` (the map's class table), ``url`` (the COG to write).
    """
    result = {"cell": task["cell"], "period": task["period"], "url": task["url"]}
    if read_tags(task["url"]).get(INPUTS_TAG) == task["inputs"]:
        return {**result, "reused": True}
    layers, grid = [], None
    for url in task["maps"]:
        if url is None:
            continue
        values, g = read_classes(url)
        if grid is not None and (g != grid or values.shape != layers[0].shape):
            raise ValueError(f"{url} is not on the grid of {task['maps'][0]}")
        grid = grid or g
        layers.append(values)
    if grid is None:
        return {**result, "url": None}
    stable = stable_classes(np.stack(layers), task["window"], len(task["classes"]))
    write_class_cog(
        task["url"],
        stable,
        crs=grid["crs"],
        transform=grid["transform"],
        classes=task["classes"],
        tags={INPUTS_TAG: task["inputs"]},
    )
    return {**result, "reused": False}


def stable_tasks(
    by_period: Mapping[str, Mapping[str, Any]],
    periods: Sequence[str],
    config: StableConfig,
    classes: Sequence[Mapping[str, Any]],
    folder_of: Any,
) -> list[dict[str, Any]]:
    """The stable-map tasks of ``periods`` (ids, from the collection's ``by_period``:
    ``{period: {cell: cell item}}``); ``folder_of(period)`` is where its stable COGs go."""
    from relaymap.catalog.storage import check_id, join

    order = sorted(by_period)
    tasks = []
    for period in periods:
        i = order.index(period)
        back = order[max(0, i - config.lookback + 1) : i + 1][::-1]  # this period first
        cells = sorted({c for p in back for c in by_period[p]})
        for cell in cells:
            assets = [
                by_period[p][cell].assets["classes"] if cell in by_period[p] else None for p in back
            ]
            maps = [a.get_absolute_href() if a is not None else None for a in assets]
            inputs = ":".join(
                str(a.extra_fields.get("file:checksum") or a.get_absolute_href()) if a else "-"
                for a in assets
            )
            tasks.append(
                {
                    "kind": "stable",
                    "cell": cell,
                    "period": period,
                    "maps": maps,
                    "inputs": f"w{config.window}:{inputs}",
                    "window": config.window,
                    "classes": list(classes),
                    "url": join(folder_of(period), f"{check_id(cell, 'cell id')}.tif"),
                }
            )
    return tasks
