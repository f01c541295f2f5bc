"""Issue 27's options: precision (mapping and training), the default tile overlap and the
default grid cell that goes with it (no timing here)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from relay_models.geometry import cell_step
from relay_models.inference import tile_overlap
from relaymap.flows.area import STORE_LEVELS, GridConfig, default_cell_px
from relaymap.flows.options import MapOptions
from relaymap.flows.raytrain import OPERATIONAL, RunConfig


def test_precision_is_a_map_option_with_its_choices():
    assert MapOptions().precision == "auto"
    assert MapOptions(precision="bf16").precision == "bf16"
    with pytest.raises(ValidationError, match="'auto', 'fp32' or 'bf16'"):
        MapOptions(precision="fp16")


def test_precision_of_training_may_change_on_a_resume():
    assert RunConfig().precision == "auto" and "precision" in OPERATIONAL


@pytest.mark.parametrize(("tile", "cell"), [(32, 1512), (64, 1512), (128, 1568), (256, 1568)])
def test_speed_default_overlap_and_cell_are_on_one_lattice(tile, cell):
    """An eighth of a tile by default, and the default cell: the multiple of the lattice
    step (tile stride and 2**3) nearest 1536 px."""
    assert tile_overlap(tile) == tile // 8
    step = cell_step(tile, tile_overlap(tile), STORE_LEVELS)
    assert default_cell_px(step) == cell and cell % step == 0
    assert GridConfig().cell_px is None  # resolved against the model's tiles in plan()
    assert default_cell_px(step, 200) == max(step, round(200 / step) * step)


@pytest.mark.parametrize(("tile", "batch"), [(32, 64), (64, 32), (128, 8), (256, 8), (512, 8)])
def test_speed_default_batch_follows_the_tile_size(tile, batch):
    from relay_models.inference import default_batch_size

    assert MapOptions().batch_size is None  # resolved by the engine from the tile size
    assert default_batch_size(tile) == batch
