"""Area mapping with inputs as they come: one-line errors before any compute, and the
documented outcomes for sources in another CRS, without a cloud mask, or all cloud."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import rasterio

from relaymap.catalog import serve_stac
from relaymap.flows.area import map_area
from relaymap.flows.trained import ModelError
from relaymap.ingest import AreaError, GridError, MissingAssetError

from .area_data import (
    CELL,
    DATES,
    area_geojson,
    config,
    expected_clear,
    make_source,
    replace_band,
    to_crs,
    variant,
)


@pytest.fixture(scope="module")
def local_source(tmp_path_factory, scenes):
    root = tmp_path_factory.mktemp("area-inputs")
    col = make_source(str(root / "source"), seed=7)
    return {"root": root, "collection": col, "model": scenes["model"]}


def _files(folder) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_aoi_bad_input_fails_before_any_compute_and_writes_nothing(local_source, tmp_path):
    col, model = local_source["collection"], local_source["model"]
    no_nir = variant(col, {it.id for it in col.get_items()}, "no-nir")
    for it in no_nir.get_items():
        del it.assets["nir"]
    out = tmp_path / "out"
    with serve_stac([col, no_nir]) as api:
        cases = [
            (
                dict(area='{"type": "Point", "coordinates": [15.2, 43.3]}'),
                AreaError,
                "not a Polygon",
            ),
            (dict(area="15.3,43.3,15.2,43.4"), AreaError, "is empty"),
            (dict(grid={"cell_px": 200}), GridError, "must be a multiple of 56.*use 224"),
            (dict(grid={"cell_px": CELL, "resolution": 20}), ModelError, "trained on 10 m"),
            (
                dict(source={"stac_api": api, "collections": ["no-nir"]}),
                MissingAssetError,
                "has no band 'nir'",
            ),
            (dict(grid={"cell_px": CELL, "max_area_km2": 1}), AreaError, "more than the limit"),
        ]
        for kw, error, message in cases:
            with pytest.raises(error, match=message):
                map_area(config(api, model, str(out), **kw), progress=False)
        assert _files(out) == []
        # the command line: one line naming the problem, exit code 2
        run = subprocess.run(
            ["relaymap", "map", "--area", '{"type": "Point", "coordinates": [15.2, 43.3]}',
             "--period", "2026-01", "--model", model, "--source", api, "--collection",
             "sentinel-2-l2a-sample", "--out", str(out)],
            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert run.returncode == 2
        assert run.stderr.strip().splitlines() == [
            'relaymap: AreaError: area \'{"type": "Point", "coordinates": [15.2, 43.3]}\' '
            "is a Point, not a Polygon or MultiPolygon (or a Feature/FeatureCollection of them)"
        ]
        assert _files(out) == []


def _map(col, model, out):
    with serve_stac([col]) as api:
        return map_area(config(api, model, str(out), col.id, period="2026-01"), progress=False)


def _mosaic(result) -> np.ndarray:
    with rasterio.open(result.mosaics["2026-01"]) as src:
        return src.read(1)


@pytest.mark.usefixtures("ray_local")
def test_aoi_items_in_another_crs_are_reprojected_onto_the_grid(local_source, tmp_path):
    col = local_source["collection"]
    day = f"S2-{DATES[0]:%Y%m%d}"
    odd = variant(col, {f"{day}-0", f"{day}-1"}, "other-crs")
    clear_item = odd.get_item(f"{day}-1")
    to_crs(clear_item, f"file://{tmp_path}", "EPSG:32632")  # the neighbouring UTM zone
    result = _map(odd, local_source["model"], tmp_path / "out")
    assert result.failed == {} and len(result.mapped) == 4
    mosaic = _mosaic(result)
    expected = expected_clear(col, DATES[0])
    agree = float(((mosaic != 255) == expected).mean())
    assert agree > 0.98, agree  # nearest-neighbour resampling moves edges by a pixel


@pytest.mark.usefixtures("ray_local")
def test_aoi_items_without_mask_are_mapped_unmasked_with_a_warning(local_source, tmp_path):
    col = local_source["collection"]
    day = f"S2-{DATES[0]:%Y%m%d}"
    odd = variant(col, {f"{day}-0", f"{day}-1"}, "no-scl")
    del odd.get_item(f"{day}-0").assets["scl"]
    result = _map(odd, local_source["model"], tmp_path / "out")
    assert len(result.mapped) == 4
    assert any(
        f"items {day}-0 have no 'scl' asset: loaded without a cloud mask" in w
        for w in result.warnings
    )
    masked = expected_clear(col, DATES[0])
    mosaic = _mosaic(result)
    assert (mosaic != 255).mean() > masked.mean()  # the clouds are mapped as land now
    assert (mosaic != 255).all()


@pytest.mark.usefixtures("ray_local")
def test_aoi_all_cloud_cells_are_nodata_with_a_warning_and_no_files(local_source, tmp_path):
    col = local_source["collection"]
    day = f"S2-{DATES[0]:%Y%m%d}"
    cloudy = variant(col, {f"{day}-0"}, "all-cloud")
    replace_band(cloudy.get_item(f"{day}-0"), "scl", f"file://{tmp_path}", 9)
    out = tmp_path / "out"
    result = _map(cloudy, local_source["model"], out)
    assert result.mapped == [] and result.failed == {} and len(result.nodata) == 4
    assert all("no clear pixel" in w or "no source item" in w for w in result.warnings)
    assert not [f for f in _files(out) if f.endswith(".tif")]  # no COG, not even a partial one
    # products only from what was mapped: no empty table, plot, mosaic or collection
    assert result.mosaics == {} and result.rows == [] and result.collection is None
    products = [f for f in _files(out) if ".zarr/" not in f]  # cell composites are work files
    assert products == []


def _cli_map(api: str, collection: str, model: str, out, period: str = "2026-01"):
    return subprocess.run(
        ["relaymap", "map", "--area", area_geojson(), "--period", period, "--model", model,
         "--source", api, "--collection", collection, "--out", str(out), "--cell-px", str(CELL)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=900,
    )  # fmt: skip


def test_aoi_exit_3_when_no_cell_has_imagery_in_any_period_and_nothing_written(
    local_source, tmp_path
):
    out = tmp_path / "out"
    with serve_stac([local_source["collection"]]) as api:
        run = _cli_map(api, local_source["collection"].id, local_source["model"], out, "2025-06")
    assert run.returncode == 3, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"relaymap: NoImageryError: no item of {local_source['collection'].id} on {api} touches "
        "the area in 2025-06 (every month); nothing to map"
    ]
    assert run.stdout == "" and _files(out) == []


@pytest.mark.slow
def test_aoi_exit_1_when_every_cell_fails_and_no_products_are_written(local_source, tmp_path):
    col = local_source["collection"]
    day = f"S2-{DATES[0]:%Y%m%d}"
    broken = variant(col, {f"{day}-0", f"{day}-1"}, "broken")
    junk = tmp_path / "junk.tif"
    junk.write_text("not a GeoTIFF")
    # the cloudy orbit touches every cell: each cell fails in its composite. (The pre-flight
    # range check reads the least cloudy item, the clear orbit, which stays readable: a
    # corrupt item that the pre-flight reads is a bad input, exit 2, before any cell.)
    for item in broken.get_items():
        if item.id == f"{day}-0":
            item.assets["red"].href = f"file://{junk}"
    out = tmp_path / "out"
    with serve_stac([broken]) as api:
        run = _cli_map(api, "broken", local_source["model"], out)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "0 mapped" in run.stdout and "4 failed" in run.stdout
    assert run.stdout.count("FAILED ") == 4 and "CorruptRasterError" in run.stdout
    assert [f for f in _files(out) if ".zarr/" not in f] == []


@pytest.mark.usefixtures("ray_local")
def test_aoi_prefect_flow_maps_the_last_finished_month(scenes, tmp_path):
    """The scheduled deployment's parameters (``period: last``) on Prefect: the month that
    just ended is mapped; a backfill range that includes it skips it."""
    import datetime as dt

    from relaymap.flows.pipeline import area_flow

    today = dt.datetime.now(dt.UTC)
    last_month = (today.replace(day=1) - dt.timedelta(days=1)).replace(day=10, hour=10)
    col = make_source(str(tmp_path / "source"), dates=(last_month,))
    with serve_stac([col]) as api:
        cfg = config(api, scenes["model"], str(tmp_path / "out"), period="last")
        summary = area_flow(cfg)
        assert summary["periods"] == [f"{last_month:%Y-%m}"]
        assert len(summary["mapped"]) == 4 and summary["failed"] == {}
        backfill = cfg.model_copy(update={"period": f"{last_month:%Y-%m}/{today:%Y-%m}"})
        again = area_flow(backfill)
    assert again["mapped"] == [] and sorted(again["skipped"]) == sorted(summary["mapped"])
    assert len(again["nodata"]) == 4  # this month: no item yet
