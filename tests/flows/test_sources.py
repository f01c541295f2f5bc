"""``relaymap map`` on sources as catalogs publish them (real item JSON, only hrefs
changed; see :mod:`tests.published`), with no config beyond ``--source``/``--collection``:
Earth Search and Planetary Computer (signed by a local stand-in of its token service) give
the same map of the same land cover; Landsat maps at 30 m with a 30 m model; raw counts
without a scale stop with one line until ``--scale`` is given, and each command's hint
names a flag it has; offline, Planetary Computer items stop with one line naming
``--sign none``, and ``sign: none`` maps without the token service.

The commands run in this process (:mod:`tests.console`): what they print and their exit
codes are the console's, without an interpreter and a Ray start per command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from odc.geo.geom import Geometry, box

from relay_models.geometry import cell_halo
from relaymap.catalog import serve_stac
from relaymap.flows.infer import tile_overlap
from relaymap.ingest import ingest_items, make_sample_scenes
from relaymap.ingest.profiles import ReadOptions
from relaymap.ingest.signing import SIGN_TIMEOUT_ENV
from tests.console import Run, relaymap
from tests.published import (
    BANDS,
    PlanetaryComputerStandIn,
    TokenServiceDown,
    area_geojson,
    cell_inside,
    collection_of,
    item_epsg,
    make_truth,
    published,
    synthesise,
)
from tests.services import environ

from .models import quick_model

pytestmark = pytest.mark.slow

#: The test models' halo: the padded cell a map reads (64 px tiles, factor 4, 3 levels).
HALO = cell_halo(64, tile_overlap(64, None), 4, 3)


@pytest.fixture(autouse=True)
def own_ray():
    """A test's commands share one local Ray, started by the first (the product's own start)
    in the environment of that moment: the stand-ins' addresses reach its workers as they
    reach a fresh process's."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def _layout(name: str, folder: Path, cell_px: int, res: float, stand_in=None, dn=False):
    """One published item with pixels over one cell (and its halo) inside its footprint:
    ``(item, collection, area GeoJSON, grid CRS, period)``."""
    item_json = published(name)
    x0, y1 = cell_inside(item_json, res, cell_px, HALO)
    side, pad = cell_px * res, HALO * res
    truth = make_truth(x0, y1, side)
    bounds = (x0 - pad, y1 - side - pad, x0 + side + pad, y1 + pad)
    href = stand_in.href if stand_in is not None else None
    item = synthesise(item_json, folder, truth, bounds, href=href, dn=dn)
    collection = collection_of(item, f"{name} (published items, synthetic pixels)")
    epsg = item_epsg(item_json)
    return (
        item,
        collection,
        area_geojson(x0, y1, side, epsg),
        f"EPSG:{epsg}",
        f"{item.datetime:%Y-%m}",
    )


def _map(api, collection, area, crs, period, model, out, cell_px, *extra) -> Run:
    return relaymap(
        "map", "--area", area, "--period", period, "--model", model,
        "--source", api, "--collection", collection, "--out", str(out),
        "--cell-px", str(cell_px), "--crs", crs, "--json", *extra, env={"COLUMNS": "200"},
    )  # fmt: skip


def _cell(out: Path) -> tuple[np.ndarray, dict]:
    """The one cell map of a run: its class pixels and its STAC item."""
    (item_path,) = (out / "catalog").rglob("items/*.json")
    item = json.loads(item_path.read_text())
    (cog,) = out.rglob("classes.tif")
    with rasterio.open(cog) as src:
        return src.read(1), item


def test_source_earth_search_and_planetary_computer_give_the_same_map(scenes, tmp_path):
    cell_px = 168
    runs = {}
    stand_in = PlanetaryComputerStandIn(tmp_path / "azure")
    with stand_in.running():
        for name in ("earth-search-s2-l2a", "pc-s2-l2a"):
            pc = name.startswith("pc-")
            folder = (tmp_path / "azure" / "sentinel2-l2") if pc else tmp_path / name
            item, col, area, crs, period = _layout(
                name, folder, cell_px, 10.0, stand_in if pc else None
            )
            with serve_stac([col], [item]) as api:
                run = _map(
                    api, col.id, area, crs, period, scenes["model"], tmp_path / name, cell_px
                )
            assert run.returncode == 0, run.stderr[-3000:]
            runs[name] = (json.loads(run.stdout), *_cell(tmp_path / name), item)
    assert stand_in.requests["signed"] > 0 and stand_in.requests["unsigned"] == 0
    (es, es_map, es_item, es_src), (pc, pc_map, pc_item, pc_src) = runs.values()
    areas = [{r["class"]: r["area_km2"] for r in s["class_areas"]} for s in (es, pc)]
    for cls, km2 in areas[0].items():
        assert km2 == pytest.approx(areas[1][cls], rel=0.01, abs=1e-6), cls
    # the same land cover in, the same map out: pixel for pixel
    assert (es_map == pc_map).mean() > 0.999
    assert 0.5 < (es_map != 255).mean() < 0.95  # the clouds are masked, the rest mapped
    for item, src in ((es_item, es_src), (pc_item, pc_src)):  # the item's own UTM zone, inside
        assert item["properties"]["proj:code"] == f"EPSG:{item_epsg(published_of(src))}"
        footprint = Geometry(src.geometry, "EPSG:4326")
        assert footprint.contains(box(*item["bbox"], "EPSG:4326"))
        assert any(ln["rel"] == "derived_from" and src.id in ln["href"] for ln in item["links"])


def published_of(item: pystac.Item) -> dict:
    return next(
        published(n)
        for n in ("earth-search-s2-l2a", "pc-s2-l2a", "earth-search-landsat-c2-l2", "pc-naip")
        if published(n)["id"] == item.id
    )


@pytest.fixture(scope="module")
def model_30m(tmp_path_factory) -> str:
    """A model trained on a sample scene ingested at 30 m (area-averaged)."""
    root = tmp_path_factory.mktemp("model-30m")
    col = make_sample_scenes(str(root / "sample"), n_scenes=1, size_px=640, feature_px=48, seed=3)
    store = ingest_items(list(col.get_items()), str(root / "s30.zarr"), BANDS, resolution=30.0)
    assert abs(store.geobox(0).resolution.x) == 30
    return quick_model(store.url, str(root / "model30.safetensors"), steps=4)


def test_source_landsat_maps_at_30m_with_a_30m_model(model_30m, tmp_path):
    cell_px = 112
    item, col, area, crs, period = _layout(
        "earth-search-landsat-c2-l2", tmp_path / "landsat", cell_px, 30.0
    )
    with serve_stac([col], [item]) as api:
        run = _map(api, col.id, area, crs, period, model_30m, tmp_path / "out", cell_px)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert len(summary["mapped"]) == 1 and summary["failed"] == {}
    classes, map_item = _cell(tmp_path / "out")
    assert classes.shape == (cell_px, cell_px) and (classes != 255).mean() > 0.5
    assert map_item["properties"]["proj:code"] == crs
    assert abs(map_item["properties"]["proj:transform"][0]) == 30.0


def test_source_raw_counts_without_scale_stop_until_scale_is_given(scenes, tmp_path):
    """NAIP as Planetary Computer publishes it: one 4-band asset, eo:bands only, no scale;
    its counts here are reflectance x 10000. The run stops before any compute with one line
    naming the cause and the option; with ``--scale 0.0001`` it maps."""
    cell_px = 112
    stand_in = PlanetaryComputerStandIn(tmp_path / "azure")
    with stand_in.running():
        item, col, area, crs, period = _layout(
            "pc-naip", tmp_path / "azure" / "naip", cell_px, 10.0, stand_in, dn=True
        )
        with serve_stac([col], [item]) as api:
            out = tmp_path / "out"
            refused = _map(api, col.id, area, crs, period, scenes["model"], out, cell_px)
            assert refused.returncode == 2, refused.stderr[-3000:]
            (line,) = refused.stderr.strip().splitlines()
            assert line.startswith(f"relaymap: OutOfRangeError: source item {item.id} of {api}")
            assert "raw counts (DN) without their scale" in line and "--scale blue=" in line
            assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
            mapped = _map(
                api, col.id, area, crs, period, scenes["model"], out, cell_px, "--scale", "0.0001"
            )
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    assert len(json.loads(mapped.stdout)["mapped"]) == 1


def test_signing_map_offline_stops_naming_sign_none_and_maps_with_sign_none(scenes, tmp_path):
    """Planetary Computer items while its token service cannot be reached (it accepts and
    never answers): ``relaymap map`` stops after the budget with one line naming ``--sign
    none``, exit 2, nothing written; with ``sign: none`` in the area config (the hrefs
    readable as they are) it maps, and asks the token service nothing."""
    cell_px = 112
    azure = tmp_path / "azure"
    stand_in = PlanetaryComputerStandIn(azure, public=["sentinel2-l2"])
    down = TokenServiceDown("stall")
    item, col, area, crs, period = _layout(
        "pc-s2-l2a", azure / "sentinel2-l2", cell_px, 10.0, stand_in
    )
    config = tmp_path / "area.yaml"
    config.write_text("source:\n  sign: none\n")
    out = tmp_path / "out"
    with serve_stac([col], [item]) as api, stand_in.running(), down.running():
        with environ({SIGN_TIMEOUT_ENV: "2"}):
            refused = _map(api, col.id, area, crs, period, scenes["model"], out, cell_px)
        assert refused.returncode == 2, refused.stderr[-3000:]
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith(f"relaymap: SigningError: cannot sign the hrefs of item {item.id}")
        assert "within 2 s" in line and "--sign none" in line and "PC_SDK_SAS_URL" in line
        assert down.connections == 1
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
        mapped = _map(
            api, col.id, area, crs, period, scenes["model"], out, cell_px, "--config", str(config)
        )
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    assert len(json.loads(mapped.stdout)["mapped"]) == 1
    assert down.connections == 1 and stand_in.tokens == {}  # no token asked for
    assert stand_in.requests["unsigned"] > 0 and stand_in.requests["signed"] == 0


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


def _help(command: str) -> set[str]:
    return _flags(relaymap(command, "--help").stdout)


def test_signing_dn_hint_of_each_command_names_a_flag_it_has(scenes, tmp_path):
    """Raw counts (a scale of 1) refused by ``relaymap ingest --model`` before a store is
    written, hinting at its own ``--scale``; a store of raw counts refused by ``relaymap
    infer``, which has no ``--scale``: its hint says to ingest again (``relaymap map`` is
    checked by the test above)."""
    item = scenes["items"][0]
    col = collection_of(item, "sample")
    with serve_stac([col], [item]) as api:
        out = tmp_path / "scenes"
        run = relaymap(
            "ingest", api, "--collection", col.id, "--ids", item.id, "--out", str(out),
            "--model", scenes["model"], "--scale", "1",
        )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"relaymap: OutOfRangeError: source item {item.id} of {api}")
    assert "--scale blue=" in line and _flags(line) <= _help("ingest")
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]

    store = ingest_items([item], str(tmp_path / "dn.zarr"), BANDS, read=ReadOptions(scale={"*": 1}))
    run = relaymap(
        "infer", "--model", scenes["model"], "--scene", store.url, "--out", str(tmp_path / "maps")
    )
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"relaymap: OutOfRangeError: scene {store.url}")
    here, _, there = line.partition("relaymap ingest ")
    assert "--scale blue=" in there and _flags(there) <= _help("ingest")
    assert _flags(here) <= _help("infer") and "--scale" not in _help("infer")
