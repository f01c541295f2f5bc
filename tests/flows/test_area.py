"""Mapping an area every period: a real STAC API (rustac) over Sentinel-2-like items on a
real S3 server (SeaweedFS), local Ray, cell COGs, mosaics and class areas in STAC."""

from __future__ import annotations

import csv
import datetime as dt
import io
import shutil
import threading

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from relaymap.catalog import StaticCatalog, serve_stac
from relaymap.catalog.storage import gdal_env, read_bytes
from relaymap.flows.area import AreaConfig, map_area

from .area_data import CELL, DATES, X0, Y1, config, expected_clear, make_source

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def source(s3, scenes):
    """The Sentinel-2-like items on S3, served by a STAC API, and a trained model."""
    col = make_source("s3://relaymap-test/area-source")
    with serve_stac([col]) as api:
        yield {"api": api, "collection": col, "model": scenes["model"]}


@pytest.fixture(scope="module")
def first_run(source):
    cfg = config(source["api"], source["model"], "s3://relaymap-test/area-maps")
    return cfg, map_area(cfg, progress=False)


def _read(url: str, **kw) -> np.ndarray:
    with rasterio.Env(**gdal_env()), rasterio.open(url) as src:
        return src.read(1, **kw)


def test_aoi_maps_cells_per_period_with_clouds_masked_and_registers_them(first_run, source):
    _, result = first_run
    assert result.failed == {} and result.skipped == [] and result.nodata == []
    assert result.cells == 4 and result.periods == ["2026-01", "2026-02"]
    assert len(result.mapped) == 8
    catalog = StaticCatalog("s3://relaymap-test/area-maps/catalog")
    items = {it.id: it for it in catalog.items("relaymap-area")}
    assert sorted(items) == result.mapped
    for item in items.values():
        p = item.properties
        period = p["relaymap:period"]
        start = dt.datetime.fromisoformat(p["start_datetime"])
        assert f"{start:%Y-%m}" == period and p["end_datetime"] > p["start_datetime"]
        assert item.datetime == start
        with rasterio.Env(**gdal_env()), rasterio.open(item.assets["classes"].href) as src:
            assert src.crs.to_epsg() == 32633 and src.shape == (CELL, CELL)
            t = src.transform
            assert t.c % (CELL * 10) == 0 and t.f % (CELL * 10) == 0  # on the fixed grid
            assert src.nodata == 255 and src.colormap(1)[0][:3] == (0xE8, 0xD3, 0x6B)
        sources = {ln.title for ln in item.links if ln.rel == "derived_from"}
        day = f"S2-{DATES[0 if period == '2026-01' else 1]:%Y%m%d}"
        assert {s for s in sources if s.startswith("S2-")} <= {f"{day}-0", f"{day}-1"}
        assert any(s.startswith("model") for s in sources)
        areas = p["relaymap:class_areas_km2"]
        assert sum(areas.values()) == pytest.approx(p["relaymap:observable_km2"], abs=1e-3)
        assert 0 < p["relaymap:valid_fraction"] <= 1
    # clouds and shadows of the cloudy orbit are masked; the clear orbit fills them where
    # it overlaps, and the rest is nodata in the map: the map's data mask is the clear mask
    for period, date in zip(result.periods, DATES, strict=True):
        mosaic = _read(result.mosaics[period])
        assert mosaic.shape == (2 * CELL, 2 * CELL)
        expected = expected_clear(source["collection"], date)
        assert 0.5 < expected.mean() < 1.0  # the test data has clouds and clear views
        assert np.array_equal(mosaic != 255, expected)
        assert len(np.unique(mosaic[mosaic != 255])) >= 3


def test_mosaic_is_one_layer_with_palette_names_and_overviews(first_run):
    _, result = first_run
    catalog = StaticCatalog("s3://relaymap-test/area-maps/catalog")
    for period, url in result.mosaics.items():
        with rasterio.Env(**gdal_env()), rasterio.open(url) as src:
            assert (src.transform.c, src.transform.f) == (X0, Y1)
            assert src.overviews(1) == [2] and src.nodata == 255
            assert src.colormap(1)[3][:3] == (0xC2, 0x47, 0x3B)  # urban
            whole = src.read(1)
            small = src.read(1, out_shape=(CELL, CELL))
        assert (small != 255).mean() == pytest.approx((whole != 255).mean(), abs=0.05)
        text = read_bytes(url).decode()
        assert "<Category>cropland</Category>" in text and "s3://" not in text  # relative
        # the mosaic is exactly its cells
        for item in catalog.items("relaymap-area"):
            if item.properties["relaymap:period"] != period:
                continue
            with rasterio.Env(**gdal_env()), rasterio.open(item.assets["classes"].href) as src:
                r0 = round((Y1 - src.transform.f) / 10)
                c0 = round((src.transform.c - X0) / 10)
                assert np.array_equal(src.read(1), whole[r0 : r0 + CELL, c0 : c0 + CELL])
    col = catalog.get_collection("relaymap-area")
    assert {"mosaic-2026-01", "mosaic-2026-02", "class-areas", "class-areas-plot"} <= set(
        col.assets
    )


def test_aoi_class_areas_table_and_plot(first_run):
    catalog = StaticCatalog("s3://relaymap-test/area-maps/catalog")
    col = catalog.get_collection("relaymap-area")
    rows = list(csv.DictReader(io.StringIO(read_bytes(col.assets["class-areas"].href).decode())))
    assert len(rows) == 2 * 6 and rows[0].keys() >= {"period", "class", "area_km2"}
    items = list(catalog.items("relaymap-area"))
    for row in rows:
        total = sum(
            it.properties["relaymap:class_areas_km2"][row["class"]]
            for it in items
            if it.properties["relaymap:period"] == row["period"]
        )
        assert float(row["area_km2"]) == pytest.approx(total, abs=1e-3)
        # the area is 2x2 cells of 1.92 km: what is observable is at most 14.7456 km2
        assert 0 < float(row["observable_km2"]) <= 4 * (CELL * 10 / 1000) ** 2 + 1e-6
    png = Image.open(io.BytesIO(read_bytes(col.assets["class-areas-plot"].href)))
    assert png.size[0] > 200 and png.size[1] > 200


def test_aoi_rerun_maps_only_what_changed(first_run, source):
    cfg, _ = first_run
    # one more month, without any item: the first two are unchanged, the third has no data
    again = map_area(cfg.model_copy(update={"period": "2026-01/2026-03"}), progress=False)
    assert again.mapped == [] and len(again.skipped) == 8
    assert len(again.nodata) == 4 and all("2026-03" in i for i in again.nodata)
    assert all("no source item" in w for w in again.warnings)
    # a changed option is a changed input: that period's cells are mapped again, and the
    # files of the replaced maps are gone
    zstd = cfg.model_copy(
        update={"period": "2026-02", "options": cfg.options.model_copy(update={"compress": "ZSTD"})}
    )
    before = {
        it.id: it.assets["classes"].href
        for it in StaticCatalog(catalog_of(cfg)).items("relaymap-area")
    }
    redo = map_area(zstd, progress=False)
    assert len(redo.mapped) == 4 and all("2026-02" in i for i in redo.mapped)
    catalog = StaticCatalog(catalog_of(cfg))
    for item_id in redo.mapped:
        href = catalog.get_item("relaymap-area", item_id).assets["classes"].href
        assert href != before[item_id]
        with rasterio.Env(**gdal_env()), rasterio.open(href) as src:
            assert src.compression.name == "zstd"
        with pytest.raises(FileNotFoundError):
            read_bytes(before[item_id])


def catalog_of(cfg: AreaConfig) -> str:
    return cfg.catalog or f"{cfg.out}/catalog"


def test_seam_free_cells_equal_one_larger_cell(source, tmp_path, monkeypatch):
    """2x2 cells and the same pixels as one cell of twice the side: the same map."""
    small = map_area(
        config(source["api"], source["model"], str(tmp_path / "small"), period="2026-01"),
        progress=False,
    )
    big = map_area(
        config(
            source["api"],
            source["model"],
            str(tmp_path / "big"),
            period="2026-01",
            grid={"cell_px": 2 * CELL},
        ),
        progress=False,
    )
    assert len(small.mapped) == 4 and len(big.mapped) == 1
    a, b = _read(small.mosaics["2026-01"]), _read(big.mosaics["2026-01"])
    same = float((a == b).mean())
    assert same >= 0.999, same
    # the halo is what makes it seamless: without it, cell edges see less context
    import relaymap.flows.area as area

    monkeypatch.setattr(area, "cell_halo", lambda *a, **k: 0)
    bare = map_area(
        config(source["api"], source["model"], str(tmp_path / "bare"), period="2026-01"),
        progress=False,
    )
    assert float((_read(bare.mosaics["2026-01"]) == b).mean()) < same
    from tests.stac_validate import validate_tree

    assert validate_tree(tmp_path / "small" / "catalog") == []  # the official schemas
    # relocatable: the mosaic still opens, with the same pixels, from a copied folder
    shutil.copytree(tmp_path / "small", tmp_path / "moved")
    moved = small.mosaics["2026-01"].replace(str(tmp_path / "small"), str(tmp_path / "moved"))
    shutil.rmtree(tmp_path / "small")
    assert np.array_equal(_read(moved), a)


class _RecordingLock:
    """A lock of ``CellMapper`` (``what``: model or composite), logging who asks for, holds
    and returns it. Its first holder waits (inside) until the other cell asks for it: both
    cells are in flight at a defined point."""

    def __init__(self, log: list, what: str) -> None:
        self.lock, self.log, self.what = threading.Lock(), log, what
        self.held, self.second_ask = threading.Event(), threading.Event()

    def _log(self, event: str) -> None:
        self.log.append((f"{event} {self.what}", threading.current_thread().name))

    def __enter__(self) -> None:
        self._log("ask")
        if self.held.is_set():
            self.second_ask.set()
        self.lock.acquire()
        self._log("hold")
        if not self.held.is_set():
            self.held.set()
            # a bound only a broken map_cell reaches (it no longer asks for the lock)
            assert self.second_ask.wait(600), f"the second cell never asked for the {self.what}"

    def __exit__(self, *exc) -> None:
        self._log("return")
        self.lock.release()


def test_aoi_cells_in_flight_composite_while_the_other_runs_the_model(source, monkeypatch):
    """Two cells in one actor at once (Ray Data runs CellMapper's calls in threads): the
    second composites while the first holds the model; the model never runs for both, and
    the two never composite at once (the first cell reaches the model sooner)."""
    from relaymap.flows import cells
    from relaymap.flows.area import plan
    from relaymap.flows.trained import load_trained

    cfg = config(source["api"], source["model"], "s3://relaymap-test/area-inflight")
    tasks = [t for t in plan(cfg).tasks if t["period"] == "2026-01"][:2]
    info, model = load_trained(cfg.model)
    log: list[tuple[str, str]] = []
    model_lock, composite_lock = _RecordingLock(log, "model"), _RecordingLock(log, "composite")
    real = cells.composite

    def composite(*a, **k):
        if threading.current_thread().name == "cell1":  # starts once cell0 has the model
            assert model_lock.held.wait(600), "cell0 never got the model"
        log.append(("composite", threading.current_thread().name))
        out = real(*a, **k)
        log.append(("composited", threading.current_thread().name))
        return out

    monkeypatch.setattr(cells, "composite", composite)
    results: dict[str, dict] = {}

    def run(task):
        results[threading.current_thread().name] = cells.map_cell(
            model,
            info,
            task,
            torch.device("cpu"),
            model_lock=model_lock,
            composite_lock=composite_lock,
        )

    threads = [
        threading.Thread(target=run, args=(t,), name=f"cell{i}") for i, t in enumerate(tasks)
    ]
    threads[0].start()  # cell1 comes second: once cell0 holds the composite lock
    assert composite_lock.held.wait(600), "cell0 never asked to composite"
    threads[1].start()
    for t in threads:
        t.join()
    statuses = [results.get(f"cell{i}", {}).get("status") for i in range(2)]
    assert statuses == ["mapped", "mapped"], results
    for what in ("model", "composite"):  # each lock: held by one cell at a time
        holds = [(e, who) for e, who in log if e in (f"hold {what}", f"return {what}")]
        expected = [(f"{e} {what}", f"cell{i}") for i in range(2) for e in ("hold", "return")]
        assert holds == expected, log
    # cell1 composited (and then asked for the model) while cell0 held the model
    order = [("hold model", "cell0"), ("composite", "cell1"), ("composited", "cell1")]
    order += [("ask model", "cell1"), ("return model", "cell0")]
    assert sorted(order, key=log.index) == order, log
    # cell1 asked to composite before cell0 did, and waited until cell0 was done
    order = [("ask composite", "cell1"), ("composite", "cell0"), ("composited", "cell0")]
    order += [("return composite", "cell0"), ("composite", "cell1")]
    assert sorted(order, key=log.index) == order, log


@pytest.mark.precision
def test_area_cell_at_bf16_precision_agrees_with_fp32(source):
    """One cell mapped on a worker (``map_cell``, in this process) at fp32 and at bf16: the
    bf16 cell's probabilities and classes agree with fp32's within the stated bf16 tolerance
    (``tests/relay_models/helpers.py``), and its nodata is the same."""
    from relaymap.flows import cells
    from relaymap.flows.area import plan
    from relaymap.flows.trained import load_trained
    from tests.relay_models.helpers import assert_bf16_agrees

    cfg = config(source["api"], source["model"], "s3://relaymap-test/area-precision")
    task = next(t for t in plan(cfg).tasks if t["period"] == "2026-01")
    info, model = load_trained(cfg.model)
    probs = {}
    for precision in ("fp32", "bf16"):
        options = {**task["options"], "precision": precision, "probabilities": True}
        result = cells.map_cell(model, info, {**task, "options": options}, torch.device("cpu"))
        assert result["status"] == "mapped", result
        href = result["item"]["assets"]["probabilities"]["href"]
        with rasterio.Env(**gdal_env()), rasterio.open(href) as src:
            probs[precision] = src.read()
    valid = probs["fp32"][0] != 255
    assert np.array_equal(valid, probs["bf16"][0] != 255)
    assert_bf16_agrees(probs["bf16"] / 254, probs["fp32"] / 254, valid)
