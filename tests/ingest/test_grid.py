"""The fixed grid, periods and the cell halo: pure functions, no services."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from relay_models.geometry import cell_halo, cell_step
from relaymap.ingest.errors import AreaError, PeriodError
from relaymap.ingest.grid import area_grid, read_area
from relaymap.ingest.periods import parse_periods

BBOX = "15.0,43.3,15.2,43.4"


def test_grid_cell_ids_are_stable_across_runs_crs_and_area_formats(tmp_path):
    a = area_grid(read_area(BBOX), resolution=10, cell_px=512)
    b = area_grid(read_area(BBOX), resolution=10, cell_px=512)
    assert [c.id for c in a.cells] == [c.id for c in b.cells]
    assert str(a.crs) == "EPSG:32633"  # the UTM zone of the area
    assert a.cells[0].id.startswith("32633-10m-512-x")
    # the same area as a GeoJSON file, and projected to web mercator: the same cells
    geo = read_area(BBOX)
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": geo.json, "properties": {}}))
    assert [c.id for c in area_grid(read_area(str(path)), resolution=10, cell_px=512).cells] == [
        c.id for c in a.cells
    ]
    merc = geo.to_crs("EPSG:3857")
    doc = dict(merc.json, crs={"type": "name", "properties": {"name": "EPSG:3857"}})
    ids = {c.id for c in area_grid(read_area(json.dumps(doc)), resolution=10, cell_px=512).cells}
    assert ids == {c.id for c in a.cells}


def test_grid_cells_tile_the_crs_from_its_origin_and_cover_the_area():
    grid = area_grid(read_area(BBOX), resolution=10, cell_px=512)
    side = 512 * 10
    for cell in grid.cells:
        t = cell.geobox.transform
        assert cell.geobox.shape == (512, 512)
        assert t.c % side == 0 and t.f % side == 0  # anchored at the CRS origin
    union = grid.cells[0].geobox.extent
    for cell in grid.cells[1:]:
        union = union.union(cell.geobox.extent)
    assert union.contains(grid.area.to_crs(grid.crs))
    # a cell only touching the area's bbox, not the area, is not in the grid
    tri = {
        "type": "Polygon",
        "coordinates": [[[15.0, 43.3], [15.2, 43.3], [15.0, 43.4], [15.0, 43.3]]],
    }
    assert len(area_grid(read_area(json.dumps(tri)), resolution=10, cell_px=512).cells) < len(
        grid.cells
    )


@pytest.mark.parametrize(
    ("area", "message"),
    [
        ('{"type": "Point", "coordinates": [15, 43]}', "not a Polygon"),
        ("15.2,43.3,15.0,43.4", "is empty"),
        ('{"type": "FeatureCollection", "features": []}', "is empty"),
        ("not-a-file.geojson", "neither a bbox nor readable GeoJSON"),
    ],
)
def test_grid_rejects_areas_that_are_not_polygons(area, message):
    with pytest.raises(AreaError, match=message):
        area_grid(read_area(area), resolution=10, cell_px=512)


def test_grid_refuses_areas_above_the_limit():
    with pytest.raises(AreaError, match=r"covers [\d,]+ km2, more than the limit of 100 km2"):
        area_grid(read_area(BBOX), resolution=10, cell_px=512, max_area_km2=100)


def test_grid_periods_months_weeks_and_the_last_finished_one():
    months = parse_periods("2026-01/2026-06")
    assert [p.id for p in months] == [f"2026-0{i}" for i in range(1, 7)]
    assert months[1].interval() == "2026-02-01T00:00:00Z/2026-02-28T23:59:59.999999Z"
    weeks = parse_periods("2026-01-01/2026-01-14", "week")  # Thursday to Wednesday
    assert [p.id for p in weeks] == ["2026-W01", "2026-W02", "2026-W03"]
    assert weeks[0].start == dt.datetime(2025, 12, 29, tzinfo=dt.UTC)  # ISO weeks: Mondays
    now = dt.datetime(2026, 3, 1, 2, 0, tzinfo=dt.UTC)  # a scheduled run early on March 1st
    assert [p.id for p in parse_periods("last", now=now)] == ["2026-02"]
    assert [p.id for p in parse_periods("last", "day", now=now)] == ["2026-02-28"]
    with pytest.raises(PeriodError, match="ends before it starts"):
        parse_periods("2026-06/2026-01")
    with pytest.raises(PeriodError, match="use YYYY, YYYY-MM or YYYY-MM-DD"):
        parse_periods("June")


def test_grid_halo_reaches_the_context_of_every_tile_touching_the_cell():
    # 64 px tiles, 16 px overlap, a 4x global window: a touching tile reaches 64 px out and
    # its global window 96 px further; rounded up to the 48 px step
    assert cell_step(64, 16, 3) == 48
    assert cell_halo(64, 16, 4, 3) == 192
    assert cell_halo(64, 16, None, 3) == 96  # no global window: just the tile
    assert cell_halo(256, 64, 4, 3) % cell_step(256, 64, 3) == 0
