"""What changed between periods: an area run over Sentinel-2-like items with a known change
(a field built over in the second month), then its change products, stable maps, imagery
and class areas with low confidence, on real stores, COGs, a STAC API and local Ray."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image
from rasterio.transform import from_origin

from relaymap.catalog import StaticCatalog, map_item, serve_stac
from relaymap.catalog.storage import read_bytes
from relaymap.flows.area import AreaConfig, map_area
from relaymap.flows.cli import main
from relaymap.flows.products.change import (
    MAX_CLASSES,
    NO_CHANGE,
    ChangeError,
    code_table,
    pair_code,
    transitions,
)
from relaymap.flows.products.class_areas import plot_class_areas
from relaymap.flows.products.cog import write_class_cog
from relaymap.flows.products.stable import stable_classes
from relaymap.ingest.sample import CLASSES, SyntheticChange, change_mask, s2_area_layout

from .area_data import CELL, DATES, MARGIN, config, expected_clear, make_source
from .models import quick_model

#: The known change: a 128 px field amid fields of the area is urban in the second month.
FIELD = SyntheticChange(
    since=1,
    side_px=128,
    within=(MARGIN, MARGIN, MARGIN + 2 * CELL, MARGIN + 2 * CELL),
    clearance_px=16,
)
#: The synthetic area's seed (its layout has farmland enough for the field).
SEED = 0
#: Training steps of the model that maps it: enough for the edges of a new urban block (at
#: 100 steps the model still maps its outer pixels as the fields around it).
STEPS = 300
NAMES = [c.name for c in CLASSES]
CROPLAND, URBAN = NAMES.index("cropland"), NAMES.index("urban")
PERIODS = ("2026-01", "2026-02")


def _read(url: str) -> np.ndarray:
    with rasterio.open(url.removeprefix("file://")) as src:
        return src.read(1)


def _truth() -> np.ndarray:
    """The field's pixels in the mapped area (2x2 cells)."""
    size = 2 * CELL + 2 * MARGIN
    field = change_mask(s2_area_layout(size, 48, SEED), FIELD)
    return field[MARGIN : MARGIN + 2 * CELL, MARGIN : MARGIN + 2 * CELL]


class TestTransitions:
    @pytest.mark.parametrize("k", [2, 6, MAX_CLASSES])
    def test_change_codes_are_one_per_pair(self, k):
        table = code_table(k)
        codes = table[~np.eye(k, dtype=bool)]
        assert len(set(codes.tolist())) == k * (k - 1) and codes.max() < 255
        assert (np.diag(table) == NO_CHANGE).all() and NO_CHANGE not in codes
        assert table[1, 0] == pair_code(1, 0, k)

    def test_change_too_many_classes(self):
        with pytest.raises(ChangeError, match="at most 16 classes"):
            code_table(MAX_CLASSES + 1)

    def test_change_counts_and_map(self):
        before = np.array([[0, 0, 1], [2, 255, 1]], np.uint8)
        after = np.array([[0, 1, 1], [0, 2, 255]], np.uint8)
        counts, change = transitions(before, after, 3)
        assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
        assert change.tolist() == [
            [NO_CHANGE, pair_code(0, 1, 3), NO_CHANGE],
            [pair_code(2, 0, 3), 255, 255],
        ]


def _square(shape, y, x, h, w) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y : y + h, x : x + w] = True
    return m


class TestMinimumMappingUnit:
    """Regions of one from -> to pair (8-connected) below the unit become no change; the
    matrix is the change map's (a removed pixel keeps its earlier class)."""

    K = 3

    def _maps(self):
        before = np.zeros((60, 60), np.uint8)
        after = before.copy()
        sliver = _square(before.shape, 2, 2, 7, 7)  # 49 px: one short of 0.5 ha at 10 m
        unit = _square(before.shape, 2, 20, 5, 10)  # 50 px: the unit itself
        ring = _square(before.shape, 55, 0, 1, 30)  # a one-pixel edge, 30 px
        diagonal = np.zeros_like(sliver)  # 50 px touching only by their corners
        diagonal[np.arange(50) + 10, np.arange(50) + 10] = True
        after[sliver | unit] = 1
        after[ring | diagonal] = 2
        return before, after, {"sliver": sliver, "unit": unit, "ring": ring, "diag": diagonal}

    def test_change_mmu_removes_slivers_keeps_the_unit(self):
        before, after, parts = self._maps()
        counts, change = transitions(before, after, self.K, min_pixels=50)
        kept = change != NO_CHANGE
        assert not kept[parts["sliver"] | parts["ring"]].any()
        assert (change[parts["unit"]] == pair_code(0, 1, self.K)).all()
        assert (change[parts["diag"]] == pair_code(0, 2, self.K)).all()  # 8-connected
        assert kept.sum() == 100
        # the matrix is the change map's; removed pixels kept their earlier class
        assert counts.tolist() == [[60 * 60 - 100, 50, 50], [0, 0, 0], [0, 0, 0]]
        raw, _ = transitions(before, after, self.K)
        assert raw.tolist() == [[60 * 60 - 179, 99, 80], [0, 0, 0], [0, 0, 0]]
        assert (change == transitions(before, after, self.K, min_pixels=0)[1]).sum() == 3600 - 79

    def test_change_mmu_regions_are_per_pair(self):
        """Two touching regions of different pairs are two regions: 30 px each, below 50;
        together they would pass."""
        before = np.zeros((20, 20), np.uint8)
        after = before.copy()
        after[_square(before.shape, 2, 2, 5, 6)] = 1
        after[_square(before.shape, 7, 2, 5, 6)] = 2
        counts, change = transitions(before, after, self.K, min_pixels=50)
        assert (change == NO_CHANGE).all() and counts[0, 0] == 400
        counts, change = transitions(before, after, self.K, min_pixels=30)
        assert counts[0].tolist() == [340, 30, 30]

    def test_change_mmu_keeps_nodata_and_counts_only_the_cell(self):
        """With a margin, regions are measured over the whole window but only the cell's
        pixels are returned and counted; unobservable pixels stay 255."""
        before, after, _ = self._maps()
        before[0, :] = 255
        counts, change = transitions(before, after, self.K, min_pixels=50, margin=10)
        _, full = transitions(before, after, self.K, min_pixels=50)
        assert change.shape == (40, 40)
        assert np.array_equal(change, full[10:50, 10:50])
        assert counts.sum() == 40 * 40 and counts[0, 2] == 40  # the diagonal's inner part
        assert (full[0] == 255).all()

    def test_change_mmu_config(self, tmp_path):
        """``products.change`` takes the switch it was or a unit; a negative unit is one
        line naming it (exit 2) in a config file and as a flag, before any work."""
        base = {
            "area": "15,43,15.1,43.1",
            "period": "2025-01",
            "model": "none",
            "source": {"stac_api": "http://127.0.0.1:1", "collections": ["none"]},
            "out": str(tmp_path / "maps"),
        }
        for given, unit in ((True, 0.5), ({}, 0.5), ({"min_area_ha": 2}, 2.0), (None, None)):
            cfg = AreaConfig.model_validate({**base, "products": {"change": given}})
            assert (cfg.products.change and cfg.products.change.min_area_ha) == unit
        assert AreaConfig.model_validate(base).products.change.min_area_ha == 0.5
        assert (
            AreaConfig.model_validate({**base, "products": {"change": False}}).products.change
            is None
        )
        path = tmp_path / "area.yaml"
        path.write_text(json.dumps({**base, "products": {"change": {"min_area_ha": -1}}}))
        runner = CliRunner()
        bad = runner.invoke(main, ["map", "--config", str(path)])
        lines = bad.stderr.strip().splitlines()
        assert bad.exit_code == 2 and len(lines) == 1, bad.output
        assert "products.change.min_area_ha" in lines[0]
        bad = runner.invoke(
            main, ["change", str(tmp_path), "--from", "a", "--to", "b", "--min-area-ha", "-1"]
        )
        lines = bad.stderr.strip().splitlines()
        assert bad.exit_code == 2 and len(lines) == 1 and "--min-area-ha" in lines[0], bad.output
        assert not (tmp_path / "maps").exists()


def test_change_mmu_measures_regions_across_cell_borders(tmp_path):
    """2x2 cells of 64 px mapped apart, with a unit of 0.5 ha (50 px at 10 m): a region
    split by a cell border (or by the corner of four cells) is measured whole, so it stays
    when the whole is at least the unit and goes when it is not, in both cells. The cells'
    change maps join to the change map of the whole area made at once, and the registered
    matrix is that map's (per pair, its pixels x 100 m2)."""
    from relaymap.flows.products.change import change_products
    from relaymap.flows.products.timeline import cell_task

    side, k = 64, len(CLASSES)
    shape = (2 * side, 2 * side)
    before = np.full(shape, CROPLAND, np.uint8)
    after = before.copy()
    regions = {  # name: (mask, kept)
        "across": (_square(shape, 10, side - 3, 10, 6), True),  # 30 + 30 px
        "split small": (_square(shape, 40, side - 2, 10, 4), False),  # 20 + 20 px
        "corner": (_square(shape, side - 4, side - 4, 8, 8), True),  # 16 px in each cell
        "sliver": (_square(shape, 100, 10, 7, 7), False),  # 49 px in one cell
        "unit": (_square(shape, 100, 90, 5, 10), True),  # 50 px in one cell
    }
    for mask, _ in regions.values():
        after[mask] = URBAN
    after[_square(shape, 2, 2, 3, 3)] = 255  # unobservable later
    table = [
        {"index": i, "name": c.name, "color_hint": c.color_hint} for i, c in enumerate(CLASSES)
    ]
    periods = {}
    for m, (period, values) in enumerate((("2025-01", before), ("2025-02", after))):
        cells = {}
        for cy in range(2):
            for cx in range(2):
                cell = f"cell-x{cx}-y{cy}"
                url = f"file://{tmp_path}/maps/{period}/{cell}.tif"
                write_class_cog(
                    url,
                    values[cy * side : (cy + 1) * side, cx * side : (cx + 1) * side],
                    crs="EPSG:32633",
                    transform=from_origin(5e5 + cx * side * 10, 5e6 - cy * side * 10, 10, 10),
                    classes=table,
                )
                start = dt.datetime(2025, m + 1, 1, tzinfo=dt.UTC)
                item = map_item(
                    url,
                    item_id=f"{period}-{cell}",
                    collection="cells",
                    classes=table,
                    sources=[],
                    datetime=start,
                )
                item.properties |= {
                    "start_datetime": start.isoformat(),
                    "end_datetime": start.isoformat(),
                    "relaymap:period": period,
                    "relaymap:cell": cell,
                }
                cells[cell] = item
        periods[period] = cells
    catalog_url = str(tmp_path / "catalog")
    StaticCatalog(catalog_url).add_items([it for c in periods.values() for it in c.values()])
    product = change_products(
        catalog_url,
        "cells",
        *periods.items(),
        table,
        str(tmp_path / "out"),
        lambda tasks: [cell_task(t) for t in tasks],
        min_area_ha=0.5,
    )
    change = _read(product.mosaic)
    code = pair_code(CROPLAND, URBAN, k)
    for name, (mask, kept) in regions.items():
        assert (change[mask] == (code if kept else NO_CHANGE)).all(), name
    _, whole = transitions(before, after, k, min_pixels=50)
    assert np.array_equal(change, whole)
    matrix = product.matrix_km2
    for a, name_a in enumerate(NAMES):
        for b, name_b in enumerate(NAMES):
            if a != b:
                pixels = (change == pair_code(a, b, k)).sum()
                assert matrix[name_a][name_b] == pytest.approx(pixels * 1e-4, abs=1e-9)
    observable = sum(sum(row.values()) for row in matrix.values())
    assert observable == pytest.approx((change != 255).sum() * 1e-4)
    assert product.summary()["min_area_ha"] == 0.5
    assert "minimum mapping unit 0.5 ha" in product.item.assets["transitions"].title


class TestStableClasses:
    def test_stable_mode_of_the_last_observations(self):
        a, b, c, x = 0, 1, 2, 255
        stack = np.array(  # most recent first; one column per case
            [
                [b, b, c, x, x, a],
                [a, a, b, b, x, b],
                [a, b, a, x, x, b],
                [x, x, x, a, x, b],
            ],
            np.uint8,
        )[:, None, :]
        got = stable_classes(stack, window=3, num_classes=3)[0].tolist()
        # a month of b among a's; a change seen twice; three classes (a tie: the earliest);
        # cloudy now (the last observations, a tie); never observed; only the last 3 count
        assert got == [a, b, a, a, x, b]


def test_webmap_class_areas_plot_fits_its_frame(tmp_path):
    """The class-area plot: its legend (long names, the low-confidence and observable
    entries) inside the picture, nothing cut at the edges."""
    rows = [
        {
            "period": p,
            "class": name,
            "area_km2": 1.0 + i,
            "low_confidence_km2": 0.25 * i,
            "observable_km2": 30.0,
            "cells": 4,
        }
        for p in PERIODS
        for i, name in enumerate([*NAMES, "a class with a long name"])
    ]
    plot_class_areas(str(tmp_path / "areas.png"), rows)
    png = np.asarray(Image.open(tmp_path / "areas.png").convert("RGB"))
    for edge in (png[:3], png[-3:], png[:, :3], png[:, -3:]):
        assert (edge == 255).all()  # a white margin all around: the legend is inside


@pytest.fixture(scope="module")
def change_model(scenes, tmp_path_factory) -> str:
    """A model trained long enough to map cropland and urban well."""
    path = tmp_path_factory.mktemp("change-model") / "model.safetensors"
    return quick_model(scenes["stores"][0], str(path), steps=STEPS)


@pytest.fixture(scope="module")
def change_run(ray_local, change_model, tmp_path_factory):
    """The test area with the field built over in the second month, mapped for both."""
    root = tmp_path_factory.mktemp("change-run")
    source = make_source(f"file://{root}/source", seed=SEED, change=FIELD)
    with serve_stac([source]) as api:
        cfg = config(api, change_model, str(root / "maps"))
        result = map_area(cfg, progress=False)
        yield {"config": cfg, "result": result, "source": source, "root": root, "api": api}


def _mismatch(mapped: np.ndarray, clear: np.ndarray) -> dict[str, tuple[int, int]]:
    """Per cell where they differ: (pixels mapped but not clear, clear but not mapped)."""
    out = {}
    for cy in range(2):
        for cx in range(2):
            s = np.s_[cy * CELL : (cy + 1) * CELL, cx * CELL : (cx + 1) * CELL]
            extra, lost = int((mapped[s] & ~clear[s]).sum()), int((clear[s] & ~mapped[s]).sum())
            if extra or lost:
                out[f"cell-x{cx}-y{cy}"] = (extra, lost)
    return out


def _collection(cfg: AreaConfig):
    return StaticCatalog(f"{cfg.out}/catalog").get_collection(cfg.collection)


@pytest.mark.slow
def test_change_finds_the_synthetic_field(change_run):
    """Done when (here on the test area, made by the demo's generator; ``bench/change.py``
    checks the demo itself): the transition matrix finds the field within 2% of its true
    area, and the change map's cropland -> urban pixels overlap it at IoU >= 0.9 (over the
    pixels observable in both months: the sources' clear pixels)."""
    result = change_run["result"]
    assert result.failed == {} and len(result.mapped) == 8
    (change,) = result.derived["changes"]
    assert (change["from"], change["to"], change["cells"]) == (*PERIODS, 4)
    both = expected_clear(change_run["source"], DATES[0])
    both &= expected_clear(change_run["source"], DATES[1])
    truth = _truth() & both
    assert truth.sum() > 0.5 * FIELD.side_px**2  # most of the field is seen in both
    true_km2 = truth.sum() * 1e-4
    found = change["matrix_km2"]["cropland"]["urban"]
    assert found == pytest.approx(true_km2, rel=0.02), (found, true_km2)
    for period, date in zip(PERIODS, DATES, strict=True):  # each month's map: its clear pixels
        seen = _read(result.mosaics[period]) != 255
        assert not _mismatch(seen, expected_clear(change_run["source"], date)), period
    change_map = _read(change["mosaic"])
    assert change_map.shape == truth.shape
    assert not _mismatch(change_map != 255, both)  # nodata where either month is not seen
    built = change_map == pair_code(CROPLAND, URBAN, len(NAMES))
    iou = (built & truth).sum() / (built | truth).sum()
    assert iou >= 0.9, iou


@pytest.mark.slow
def test_change_products_are_registered_with_lineage(change_run):
    cfg, result = change_run["config"], change_run["result"]
    (change,) = result.derived["changes"]
    pid = "_".join(PERIODS)
    col = _collection(cfg)
    assert {f"change-{pid}", f"transitions-{pid}", f"transitions-plot-{pid}"} <= set(col.assets)
    asset = col.assets[f"change-{pid}"]
    assert "change" in asset.roles and asset.extra_fields["relaymap:from"] == PERIODS[0]
    names = [c["name"] for c in asset.extra_fields["classification:classes"]]
    assert names[0] == "no change" and "cropland → urban" in names
    # only the pairs that occurred, each with its count in the matrix
    matrix = change["matrix_km2"]
    assert all(matrix[a][b] > 0 for a, b in (n.split(" → ") for n in names[1:]))
    vrt = read_bytes(change["mosaic"]).decode()
    assert "<Category>cropland → urban</Category>" in vrt and "file://" not in vrt
    # the matrix as CSV: rows from, columns to, km2, and the totals
    rows = list(csv.reader(io.StringIO(read_bytes(change["table"]).decode())))
    assert rows[0] == ["from", *NAMES, "total"] and rows[-1][0] == "total"
    for row in rows[1:-1]:
        assert [float(v) for v in row[1:-1]] == pytest.approx(
            [matrix[row[0]][b] for b in NAMES], abs=1e-5
        )
    observable = sum(float(v) for v in rows[-1][1:-1])
    assert observable == pytest.approx(change_run_observable(change_run), rel=1e-6)
    assert Image.open(io.BytesIO(read_bytes(change["plot"]))).size[0] > 200
    # the item: its files, and derived_from every cell map of both months
    assert change["item_collection"] == f"{cfg.collection}-changes"
    item = StaticCatalog(f"{cfg.out}/catalog").get_item(change["item_collection"], change["item"])
    assert set(item.assets) == {"change", "transitions", "transitions-plot"}
    sources = {ln.title.split(" map ")[1] for ln in item.links if ln.rel == "derived_from"}
    assert sources == set(result.mapped)
    assert item.properties["relaymap:transitions_km2"] == matrix
    from tests.stac_validate import validate_tree

    assert validate_tree(change_run["root"] / "maps" / "catalog") == []


@pytest.mark.slow
def test_change_matrix_is_the_change_map_of_the_run(change_run):
    """The area run's change (the default unit, 0.5 ha): every changed region of the
    change map is at least 50 pixels, and each off-diagonal entry of the matrix is its
    pair's pixels in the change map; the titles say the unit."""
    from scipy import ndimage

    cfg, result = change_run["config"], change_run["result"]
    (change,) = result.derived["changes"]
    assert change["min_area_ha"] == 0.5
    change_map = _read(change["mosaic"])
    k = len(NAMES)
    for a, name_a in enumerate(NAMES):
        for b, name_b in enumerate(NAMES):
            if a == b:
                continue
            mine = change_map == pair_code(a, b, k)
            assert change["matrix_km2"][name_a][name_b] == pytest.approx(mine.sum() * 1e-4)
            labels, n = ndimage.label(mine, structure=np.ones((3, 3)))
            assert n == 0 or np.bincount(labels.ravel())[1:].min() >= 50, (name_a, name_b)
    pid = "_".join(PERIODS)
    col = _collection(cfg)
    for key in (f"change-{pid}", f"transitions-{pid}", f"transitions-plot-{pid}"):
        assert "minimum mapping unit 0.5 ha" in col.assets[key].title, key


def change_run_observable(change_run) -> float:
    """km2 observable in both months, from the sources' masks."""
    both = expected_clear(change_run["source"], DATES[0])
    return float((both & expected_clear(change_run["source"], DATES[1])).sum()) * 1e-4


@pytest.mark.slow
def test_change_imagery_and_low_confidence_of_the_run(change_run):
    """The run's other products: a true-colour mosaic per month from the composites, and
    per class the area mapped with low confidence, in the items and the class-area table."""
    cfg, result = change_run["config"], change_run["result"]
    col = _collection(cfg)
    for period, date in zip(PERIODS, DATES, strict=True):
        url = result.derived["imagery"][period]
        assert col.assets[f"imagery-{period}"].href.endswith(f"{period}/imagery.vrt")
        with rasterio.open(url.removeprefix("file://")) as src:
            rgb = src.read()
            assert src.count == 3 and src.nodata == 0
        assert np.array_equal((rgb > 0).all(0), expected_clear(change_run["source"], date))
        assert 300 < np.median(rgb[0][rgb[0] > 0]) < 3000  # reflectance x 10000
    rows = list(csv.DictReader(io.StringIO(read_bytes(col.assets["class-areas"].href).decode())))
    items = list(StaticCatalog(f"{cfg.out}/catalog").items(cfg.collection))
    for row in rows:
        low = float(row["low_confidence_km2"])
        assert 0 <= low <= float(row["area_km2"]) + 1e-6
        total = sum(
            it.properties["relaymap:low_confidence_km2"][row["class"]]
            for it in items
            if it.properties.get("relaymap:period") == row["period"]
        )
        assert low == pytest.approx(total, abs=1e-3)
    assert sum(float(r["low_confidence_km2"]) for r in rows) > 0  # a few steps of training


@pytest.mark.slow
def test_change_rerun_reuses_cells_and_adds_stable_maps(change_run):
    """A rerun with a stable map maps nothing again (same inputs), reuses each cell's change,
    and writes a stable mosaic per month beside the raw one: with a window of 3 and two
    months, the earlier month where it was seen (one month does not flip a pixel), else the
    later."""
    stable = {"stable": {"window": 3, "lookback": 3}}
    cfg = AreaConfig.model_validate({**change_run["config"].model_dump(), "products": stable})
    again = map_area(cfg, progress=False)
    assert again.mapped == [] and len(again.skipped) == 8
    (change,) = again.derived["changes"]
    assert change["cells_reused"] == 4
    col = _collection(cfg)
    raw = [_read(again.mosaics[p]) for p in PERIODS]
    for period in PERIODS:
        assert col.assets[f"stable-{period}"].roles == ["data", "stable"]
    stable = [_read(again.derived["stable"][p]) for p in PERIODS]
    assert np.array_equal(stable[0], raw[0])
    assert np.array_equal(stable[1], np.where(raw[0] != 255, raw[0], raw[1]))


@pytest.mark.slow
def test_change_command(change_run, tmp_path):
    """``relaymap change``: the same products for two periods; bad input is one line on
    stderr, exit code 2, and nothing written."""
    cfg = change_run["config"]
    catalog = f"{cfg.out}/catalog"
    out = tmp_path / "changes"
    runner = CliRunner()
    ok = runner.invoke(
        main,
        ["change", catalog, "--from", PERIODS[0], "--to", PERIODS[1], "--out", str(out), "--json"],
    )
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    (auto,) = change_run["result"].derived["changes"]
    assert summary["matrix_km2"] == auto["matrix_km2"]
    assert summary["mosaic"] == f"file://{out}/changes/{'_'.join(PERIODS)}/change.vrt"
    table = runner.invoke(main, ["change", catalog, "--from", PERIODS[0], "--to", PERIODS[1]])
    assert table.exit_code == 0 and "cropland" in table.stdout and "change map:" in table.stdout
    assert "minimum mapping unit 0.5 ha" in table.stdout
    every = runner.invoke(
        main,
        [
            *("change", catalog, "--from", PERIODS[0], "--to", PERIODS[1]),
            *("--min-area-ha", "0", "--out", str(tmp_path / "every-pixel"), "--json"),
        ],
    )
    assert every.exit_code == 0, every.output
    raw = json.loads(every.stdout)
    assert raw["min_area_ha"] == 0 and raw["changed_km2"] > summary["changed_km2"]
    # the same pixels observable in both: a removed pixel counts as unchanged
    totals = [sum(sum(r.values()) for r in x["matrix_km2"].values()) for x in (raw, summary)]
    assert totals[0] == pytest.approx(totals[1], abs=1e-5)

    def files() -> list[str]:
        return sorted(str(p) for p in Path(cfg.out).rglob("*") if p.is_file())

    before = files()
    for args, says in (
        (["--from", "2025-12", "--to", PERIODS[1]], "no cell maps for period '2025-12'"),
        (["--from", PERIODS[0], "--to", PERIODS[0]], "the same period"),
        (["--from", PERIODS[0], "--to", PERIODS[1], "--collection", "nope"], "nope"),
    ):
        bad = runner.invoke(main, ["change", catalog, *args])
        assert bad.exit_code == 2, (args, bad.output)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, bad.stderr)
    missing = runner.invoke(main, ["change", str(tmp_path / "none"), "--from", "a", "--to", "b"])
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert files() == before


def test_stable_cuts_spurious_changes_by_half(ray_local, tmp_path):
    """Model noise on the maps of six months (random flips, hazy patches turned into the
    confusable class, clouds) with a field built over from month 3: the stable maps
    (window 3) change in at most half as many pixels, besides the true change, as the raw
    maps (over the pixels observable in both raw maps), and show the same true change."""
    from bench.stable import noisy
    from relaymap.flows.jobs import run_cell_tasks
    from relaymap.flows.products.timeline import derive

    rng = np.random.default_rng(0)
    side, months, since = 160, 6, 3
    layout = s2_area_layout(side, 32, 7)
    field = change_mask(layout, SyntheticChange(since=since, side_px=48))
    after = layout.copy()
    after[field] = URBAN
    maps = [
        noisy(layout if m < since else after, rng, flip=0.04, haze=3, clouds=2, names=NAMES)
        for m in range(months)
    ]
    table = [
        {"index": i, "name": c.name, "color_hint": c.color_hint} for i, c in enumerate(CLASSES)
    ]
    periods, items = [f"2025-{m + 1:02d}" for m in range(months)], []
    for m, (period, values) in enumerate(zip(periods, maps, strict=True)):
        url = f"file://{tmp_path}/maps/noisy/{period}/cell/classes.tif"
        write_class_cog(
            url, values, crs="EPSG:32633", transform=from_origin(5e5, 5e6, 10, 10), classes=table
        )
        start, end = (
            dt.datetime(2025, m + 1, 1, tzinfo=dt.UTC),
            dt.datetime(2025, m + 2, 1, tzinfo=dt.UTC),
        )
        item = map_item(
            url,
            item_id=f"noisy-{period}",
            collection="noisy",
            classes=table,
            sources=[],
            datetime=start,
        )
        item.properties |= {
            "start_datetime": start.isoformat().replace("+00:00", "Z"),
            "end_datetime": end.isoformat().replace("+00:00", "Z"),
            "relaymap:period": period,
            "relaymap:cell": "cell",
        }
        items.append(item)
    catalog = StaticCatalog(str(tmp_path / "catalog"))
    catalog.add_items(items)
    cfg = AreaConfig.model_validate(
        {
            "area": "15,43,15.1,43.1",
            "period": f"{periods[0]}/{periods[-1]}",
            "model": "none",
            "source": {"stac_api": "http://127.0.0.1:1", "collections": ["none"]},
            "out": str(tmp_path / "maps"),
            "collection": "noisy",
            # raw change products without a unit: they count every changed pixel
            "products": {
                "imagery": False,
                "stable": {"window": 3, "lookback": 6},
                "change": {"min_area_ha": 0},
            },
        }
    )
    done = derive(
        cfg,
        table,
        periods,
        list(catalog.items("noisy")),
        catalog_url=str(tmp_path / "catalog"),
        run=run_cell_tasks,
    )
    assert done.warnings == [] and len(done.changes) == months - 1
    stable = [_read(done.stable[p]) for p in periods]
    counts = {}
    for name, series in (("raw", maps), ("stable", stable)):
        true = spurious = 0
        for m in range(1, months):
            a, b = series[m - 1], series[m]
            changed = (maps[m - 1] != 255) & (maps[m] != 255) & (a != b)
            hit = changed & field & (a == CROPLAND) & (b == URBAN) & (m >= since)
            true, spurious = true + hit.sum(), spurious + (changed & ~hit).sum()
        counts[name] = (int(true), int(spurious))
    (_, raw_spurious), (_, stable_spurious) = counts["raw"], counts["stable"]
    assert stable_spurious <= 0.5 * raw_spurious, counts
    # the same true change, shown a month later (once it is the majority of the window);
    # every other month, the stable map is closer to the truth than the raw one
    assert (stable[-1][field] == URBAN).mean() >= 0.9
    for m in range(months):
        seen = maps[m] != 255
        truth = layout if m < since else after
        raw_ok, stable_ok = (((x == truth) & seen).sum() for x in (maps[m], stable[m]))
        assert stable_ok >= raw_ok or m == since, (m, raw_ok, stable_ok)
    # the raw change products count the same changes as the raw maps
    for change, m in zip(done.changes, range(1, months), strict=True):
        both = (maps[m - 1] != 255) & (maps[m] != 255)
        changed_px = (both & (maps[m - 1] != maps[m])).sum()
        assert change.changed_km2 == pytest.approx(changed_px * 1e-4, abs=1e-6)
