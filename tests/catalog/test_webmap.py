"""The web map: ``relaymap serve`` on a real catalog of class COGs (EPSG:32633), checked over
HTTP and in Debian's Chromium (WebGL through SwiftShader), driven by Playwright.

The catalog holds two scene maps (``relaymap-maps``) and an area collection of two periods
whose imagery, stable maps and change are made by relaymap's own writers
(:func:`relaymap.flows.products.timeline.derive`, its per-cell tasks run in this process),
with its class-area table and plot (relaymap's writers too).

The browser tests share one Chromium and one load of the page (each sets the view it
checks: period, comparison, toggles); their screenshots go to the ``webmap-shots`` folder of
the run's temporary directory."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import morecantile
import numpy as np
import pystac
import pytest
import rasterio
import requests
from click.testing import CliRunner
from PIL import Image
from pyproj import Transformer
from rasterio.transform import from_origin

from relaymap.catalog import StaticCatalog, map_item
from relaymap.catalog.server import free_port, wait_for_http
from relaymap.catalog.webmap import BACKGROUND as BACKGROUND_HEX
from relaymap.catalog.webmap import NODATA_HATCH
from relaymap.flows.products.cog import NODATA, palette, to_cog
from relaymap.flows.serve import serve

CRS = "EPSG:32633"
SIDE_PX, RES_M = 256, 10.0
#: The map's background (``webmap.py``): what hidden maps and the world around show.
BACKGROUND = tuple(bytes.fromhex(BACKGROUND_HEX[1:]))
#: The two greys of the stripes the page draws over nodata inside a map's bounds.
HATCH = [tuple(bytes.fromhex(c[1:])) for c in NODATA_HATCH]
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass(frozen=True)
class MapSpec:
    """A test map: a class raster in blocks, its classes, model and time."""

    item_id: str
    model: str
    when: dt.datetime
    x0_m: float  # left edge, EPSG:32633 metres
    y0_m: float  # top edge
    classes: tuple[dict, ...]
    #: ``(name, row, col)``: the class block centres (pixel of the raster) checked on screen.
    probes: tuple[tuple[str, int, int], ...]

    def raster(self) -> np.ndarray:
        """(H, W) uint8 classes."""
        a = np.full((SIDE_PX, SIDE_PX), NODATA, np.uint8)
        half = SIDE_PX // 2
        if self.model == "relay-v1":  # left half crop, right half water, bottom quarter nodata
            a[:, :half], a[:, half:] = 0, 1
            a[3 * SIDE_PX // 4 :] = NODATA
        else:  # top half forest, bottom half town
            a[:half], a[half:] = 0, 1
        return a

    def lonlat(self, row: float, col: float) -> tuple[float, float]:
        x = self.x0_m + (col + 0.5) * RES_M
        y = self.y0_m - (row + 0.5) * RES_M
        return Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(x, y)

    def colour(self, name: str) -> tuple[int, int, int] | None:
        """The expected RGB of a class (None: nodata), from the COG's palette."""
        if name == "nodata":
            return None
        c = next(c for c in self.classes if c["name"] == name)
        return palette(self.classes)[c["index"]][:3]


MAP_A = MapSpec(
    "scene-a-relay-v1",
    "relay-v1",
    dt.datetime(2024, 6, 15, 10, tzinfo=dt.UTC),
    500_000,
    4_800_000,
    (
        {"index": 0, "name": "crop", "color_hint": "FF0000"},
        {"index": 1, "name": "water", "color_hint": "0000FF"},
    ),
    (("crop", 80, 64), ("water", 80, 192), ("nodata", 224, 128)),
)
MAP_B = MapSpec(
    "scene-b-relay-v2",
    "relay-v2",
    dt.datetime(2024, 7, 15, 10, tzinfo=dt.UTC),
    500_000 + SIDE_PX * RES_M + 1000,  # 1 km east of A
    4_800_000,
    (
        {"index": 0, "name": "forest", "color_hint": "00AA00"},
        {"index": 1, "name": "town", "color_hint": None},  # colour: the COG's palette
    ),
    (("forest", 64, 128), ("town", 192, 128)),
)


def _write_cog(path: Path, spec: MapSpec) -> None:
    """A class COG as relaymap writes them: palette, nodata 255, tiles, mode overviews."""
    _write_raster(path, spec.raster(), spec.x0_m, spec.y0_m, spec.classes)


def _write_raster(path: Path, values: np.ndarray, x0: float, y0: float, classes) -> None:
    scratch = path.with_suffix(".scratch.tif")
    with rasterio.open(
        scratch,
        "w",
        driver="GTiff",
        width=SIDE_PX,
        height=SIDE_PX,
        count=1,
        dtype="uint8",
        crs=CRS,
        transform=from_origin(x0, y0, RES_M, RES_M),
        nodata=NODATA,
    ) as dst:
        dst.write(values[None])
        dst.write_colormap(1, palette(classes))
    to_cog(str(scratch), str(path))
    scratch.unlink()


@dataclass(frozen=True)
class AreaSpec:
    """A test area run: one 256 px cell mapped in two periods with two known changes (a
    crop field built over, a pond drained to crop), cloud strips in each period,
    true-colour composites and a class-area table."""

    collection: str = "area-test"
    periods: tuple[str, str] = ("2024-08", "2024-09")
    x0_m: float = 500_000 + 2 * (SIDE_PX * RES_M + 1000)  # 1 km east of B
    y0_m: float = 4_800_000
    classes: tuple[dict, ...] = (
        {"index": 0, "name": "crop", "color_hint": "E8D36B"},
        {"index": 1, "name": "urban", "color_hint": "C2473B"},
        {"index": 2, "name": "water", "color_hint": "2B6FD3"},
    )
    #: Reflectance (red, green, blue) of each class in the composites.
    rgb: tuple[tuple[float, float, float], ...] = (
        (0.10, 0.09, 0.06),
        (0.16, 0.13, 0.12),
        (0.03, 0.05, 0.09),
    )
    #: ``(row, col)`` of pixels checked on screen: crop that became urban, water that
    #: became crop, crop both times, water both times, crop under the first period's cloud,
    #: urban under the second's.
    probes: tuple[tuple[str, int, int], ...] = (
        ("changed", 80, 168),
        ("water2crop", 170, 40),
        ("crop", 80, 40),
        ("water", 192, 64),
        ("cloud1", 16, 64),
        ("cloud2", 192, 244),
    )
    #: The area mapped with low confidence in the later period (km2 of urban).
    low_confidence_km2: float = 0.05

    def raster(self, period: int) -> np.ndarray:
        """(H, W) uint8 classes of period 0 or 1."""
        a = np.zeros((SIDE_PX, SIDE_PX), np.uint8)  # crop
        a[128:, :128], a[128:, 128:] = 2, 1  # water, urban
        if period == 0:
            a[:32] = NODATA  # a cloud
        else:
            a[48:112, 136:200] = 1  # a field built over: 64 x 64 px, 0.4096 km2
            a[150:190, 20:60] = 0  # a pond drained: 40 x 40 px, 0.16 km2
            a[:, 232:] = NODATA
        return a

    def cell(self, period: int) -> str:
        return f"{self.collection}-model-{self.periods[period]}-c0"

    def pixel(self, name: str) -> tuple[int, int]:
        return next((r, c) for n, r, c in self.probes if n == name)

    def lonlat(self, row: float, col: float) -> tuple[float, float]:
        return MapSpec.lonlat(self, row, col)  # type: ignore[arg-type]

    def colour(self, name: str) -> tuple[int, int, int]:
        c = next(c for c in self.classes if c["name"] == name)
        return tuple(bytes.fromhex(c["color_hint"]))

    def km2(self, period: int) -> dict[str, float]:
        """Each class's area in a period, and the observable area (``None``), in km2."""
        counts = np.bincount(self.raster(period).ravel(), minlength=256)
        areas = {c["name"]: counts[c["index"]] * RES_M**2 / 1e6 for c in self.classes}
        return {**areas, None: sum(areas.values())}

    def stretch(self) -> tuple[float, float]:
        """The imagery stretch the page should use: per period the 2nd and 98th percentiles
        of the stored values (reflectance x 10000) of the three bands together, averaged
        over both periods."""
        lows, highs = [], []
        for i in range(2):
            classes = self.raster(i)
            rgb = np.array(self.rgb, np.float32)[np.minimum(classes, 2)][classes != NODATA]
            lo, hi = np.percentile(np.rint(rgb * 10000), (2, 98))
            lows.append(lo)
            highs.append(hi)
        return float(np.mean(lows)), float(np.mean(highs))


AREA = AreaSpec()


def _make_area(root: Path, catalog_url: str) -> None:
    """The area collection: per period a cell item, its class COG and mosaic, its scene
    store; then imagery, stable maps and the change, derived as an area run does."""
    import xarray as xr
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    from relaymap.flows.area import AreaConfig
    from relaymap.flows.products.class_areas import class_area_rows, plot_class_areas, write_table
    from relaymap.flows.products.mosaic import write_mosaic
    from relaymap.flows.products.timeline import cell_task, derive
    from relaymap.ingest import write_scene

    gbox = GeoBox((SIDE_PX, SIDE_PX), from_origin(AREA.x0_m, AREA.y0_m, RES_M, RES_M), CRS)
    config = AreaConfig.model_validate(
        {
            "area": "15,43,15.1,43.1",
            "period": "/".join(AREA.periods),
            "model": "model.safetensors",
            "source": {"stac_api": "http://127.0.0.1:1", "collections": ["s2"]},
            "out": str(root / "maps"),
            "collection": AREA.collection,
            "products": {"stable": {"window": 2, "lookback": 2}},
        }
    )
    items, collection = (
        [],
        pystac.Collection(
            AREA.collection,
            "test area",
            pystac.Extent(
                pystac.SpatialExtent([[14.9, 43.2, 15.2, 43.4]]),
                pystac.TemporalExtent([[dt.datetime(2024, 8, 1, tzinfo=dt.UTC), None]]),
            ),
            license="CC0-1.0",
        ),
    )
    collection.extra_fields["relaymap:model"] = "model"
    names = [c["name"] for c in AREA.classes]
    for i, period in enumerate(AREA.periods):
        classes = AREA.raster(i)
        cog = root / "maps" / AREA.collection / period / AREA.cell(i) / "classes.tif"
        cog.parent.mkdir(parents=True)
        _write_raster(cog, classes, AREA.x0_m, AREA.y0_m, AREA.classes)
        start = dt.datetime(2024, 8 + i, 1, tzinfo=dt.UTC)
        item = map_item(
            str(cog),
            item_id=AREA.cell(i),
            collection=AREA.collection,
            classes=AREA.classes,
            sources=[],
            datetime=start,
        )
        end = dt.datetime(2024, 9 + i, 1, tzinfo=dt.UTC)
        item.properties.update(
            {
                "start_datetime": start.isoformat().replace("+00:00", "Z"),
                "end_datetime": end.isoformat().replace("+00:00", "Z"),
                "relaymap:period": period,
                "relaymap:cell": "c0",
                "relaymap:model": "model",
                "relaymap:inputs": f"inputs-{period}",
                "relaymap:class_areas_km2": {n: AREA.km2(i)[n] for n in names},
                "relaymap:observable_km2": AREA.km2(i)[None],
                "relaymap:low_confidence_km2": {"urban": AREA.low_confidence_km2 * i},
            }
        )
        items.append(item)
        rgb = np.array(AREA.rgb, dtype=np.float32)[np.minimum(classes, 2)].transpose(2, 0, 1)
        rgb[:, classes == NODATA] = np.nan
        image = xr.DataArray(
            rgb,
            dims=("band", "y", "x"),
            coords={"band": ["red", "green", "blue"], **xr_coords(gbox)},
        ).chunk()
        image.attrs["reflectance"] = True
        write_scene(str(root / "maps" / AREA.collection / "composites" / period / "c0.zarr"), image)
        mosaic = write_mosaic(
            f"file://{root}/maps/{AREA.collection}/{period}/mosaic.vrt",
            [f"file://{cog}"],
            AREA.classes,
        )
        collection.add_asset(
            f"mosaic-{period}",
            pystac.Asset(
                mosaic,
                roles=["data", "mosaic"],
                extra_fields={
                    "relaymap:period": period,
                    "start_datetime": item.properties["start_datetime"],
                    "classification:classes": [
                        {"value": c["index"], "name": c["name"], "color_hint": c["color_hint"]}
                        for c in AREA.classes
                    ],
                },
            ),
        )
    rows = class_area_rows(AREA.periods, names, items)  # as an area run writes them
    out = root / "maps" / AREA.collection
    for key, url, title, media_type in (
        ("class-areas", write_table(f"file://{out}/class-areas.csv", rows), "", "text/csv"),
        (
            "class-areas-plot",
            plot_class_areas(f"file://{out}/class-areas.png", rows),
            "",
            "image/png",
        ),
    ):
        collection.add_asset(key, pystac.Asset(url, title=title or key, media_type=media_type))
    catalog = StaticCatalog(catalog_url)
    catalog.add_collection(collection)
    catalog.add_items(items)
    stored = list(catalog.items(AREA.collection))
    done = derive(
        config,
        AREA.classes,
        list(AREA.periods),
        stored,
        catalog_url=catalog_url,
        run=lambda tasks: [cell_task(t) for t in tasks],
    )
    assert done.warnings == [] and len(done.changes) == 1, done
    secret = root / "maps" / AREA.collection / "secret.csv"  # beside the tables, never registered
    secret.write_text("period,class\n")


def _make_catalog(root: Path) -> Path:
    """A static catalog with MAP_A and MAP_B (and a COG that is not in it, ``secret.tif``),
    and the area collection :data:`AREA`."""
    items = []
    for spec in (MAP_A, MAP_B):
        cog = root / "maps" / f"{spec.item_id}.tif"
        cog.parent.mkdir(parents=True, exist_ok=True)
        _write_cog(cog, spec)
        model = pystac.Item(spec.model, None, None, spec.when, {}, collection="relaymap-models")
        items.append(
            map_item(
                str(cog),
                item_id=spec.item_id,
                collection="relaymap-maps",
                classes=spec.classes,
                sources=[],
                model_item=model,
                datetime=spec.when,
            )
        )
    StaticCatalog(str(root / "catalog")).add_items(items)
    _write_cog(root / "secret.tif", MAP_A)  # on disk, readable, never registered
    _make_area(root, str(root / "catalog"))
    return root / "catalog"


def _serve_command() -> list[str]:
    """``relaymap serve``, or the same click command run as a module while the main CLI
    (flows/cli.py) does not register it yet."""
    from relaymap.flows.cli import main

    exe = shutil.which("relaymap")
    if "serve" in main.commands and exe:
        return [exe, "serve"]
    return [sys.executable, "-m", "relaymap.flows.serve"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return _make_catalog(tmp_path_factory.mktemp("webmap"))


@contextlib.contextmanager
def _serving(catalog: str, log_path: Path, *args: str) -> Iterator[str]:
    """``relaymap serve CATALOG --port P [ARGS]`` as a subprocess; yields its URL."""
    port = free_port()
    log = open(log_path, "wb")  # noqa: SIM115  (kept open while it runs)
    proc = subprocess.Popen(
        [*_serve_command(), catalog, "--port", str(port), *args], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/maps.json", timeout_s=120, proc=proc)
        assert f"{url}/" in log_path.read_text()  # it printed its URL
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(catalog) -> Iterator[str]:
    with _serving(str(catalog), catalog.parent / "serve.log") as url:
        yield url


def _tile_pixel(server: str, map_id: str, lon: float, lat: float, z: int = 14) -> tuple:
    """The RGBA at lon/lat in the map's WebMercatorQuad tile at zoom ``z``."""
    tms = morecantile.tms.get("WebMercatorQuad")
    tile = tms.tile(lon, lat, z)
    resp = requests.get(
        f"{server}/maps/{map_id}/tiles/WebMercatorQuad/{z}/{tile.x}/{tile.y}.png", timeout=60
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(resp.content))
    assert img.mode == "RGBA" and img.size == (256, 256)
    b = tms.xy_bounds(tile)
    x, y = tms.xy(lon, lat)
    col = int((x - b.left) / (b.right - b.left) * 256)
    row = int((b.top - y) / (b.top - b.bottom) * 256)
    return img.getpixel((col, row))


class TestServeCommand:
    def test_help_has_an_example(self):
        result = CliRunner().invoke(serve, ["--help"])
        assert result.exit_code == 0
        assert "relaymap serve relaymap-demo/catalog --port 8000" in result.output

    def test_missing_catalog_is_one_line_naming_it(self, tmp_path):
        missing = tmp_path / "nowhere"
        result = CliRunner().invoke(serve, [str(missing)])
        assert result.exit_code == 2
        assert f"no STAC catalog at {missing}" in result.output

    def test_catalog_without_maps(self, tmp_path):
        root = tmp_path / "catalog"
        StaticCatalog(str(root)).add_collection(
            pystac.Collection(
                "relaymap-models",
                "models only",
                pystac.Extent(
                    pystac.SpatialExtent([[-180, -90, 180, 90]]),
                    pystac.TemporalExtent([[None, None]]),
                ),
            )
        )
        result = CliRunner().invoke(serve, [str(root)])
        assert result.exit_code == 2
        assert f"the catalog at {root} has no maps" in result.output


class TestHttp:
    def test_maps_json(self, server):
        maps = requests.get(f"{server}/maps.json", timeout=60).json()["maps"]
        maps = [m for m in maps if m["source"] == "relaymap-maps"]
        assert [m["id"] for m in maps] == [MAP_A.item_id, MAP_B.item_id]
        a, b = maps
        assert (a["model"], a["period"], b["model"], b["period"]) == (
            "relay-v1",
            "2024-06-15",
            "relay-v2",
            "2024-07-15",
        )
        assert a["datetime"].startswith("2024-06-15T10:00:00")
        west, south, east, north = a["bounds"]
        assert west < MAP_A.lonlat(0, 0)[0] < east and south < MAP_A.lonlat(0, 0)[1] < north
        assert 14.9 < west < east < 15.1 and 43.2 < south < north < 43.4
        assert a["classes"] == [
            {"value": 0, "name": "crop", "color": "#ff0000"},
            {"value": 1, "name": "water", "color": "#0000ff"},
        ]
        town = "#" + bytes(MAP_B.colour("town")).hex()
        assert [c["color"] for c in b["classes"]] == ["#00aa00", town]  # palette fallback
        assert a["tiles"] == f"maps/{MAP_A.item_id}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}.png"
        assert "href" not in a  # the page never sees a file path

    @pytest.mark.parametrize("spec", [MAP_A, MAP_B], ids=["a", "b"])
    def test_tiles_have_the_class_colours(self, server, spec):
        for name, row, col in spec.probes:
            rgba = _tile_pixel(server, spec.item_id, *spec.lonlat(row, col))
            colour = spec.colour(name)
            assert rgba == ((*colour, 255) if colour else (0, 0, 0, 0)), name

    def test_only_catalog_cogs_are_read(self, server, catalog):
        secret = catalog.parent / "secret.tif"
        tile = morecantile.tms.get("WebMercatorQuad").tile(*MAP_A.lonlat(80, 64), 14)
        zxy = f"{tile.z}/{tile.x}/{tile.y}.png"
        for path in (
            f"/maps/not-a-map/tiles/WebMercatorQuad/{zxy}",
            f"/maps/secret.tif/tiles/WebMercatorQuad/{zxy}",
            f"/maps/..%2Fsecret.tif/tiles/WebMercatorQuad/{zxy}",
            f"/maps/{requests.utils.quote(str(secret), safe='')}/tiles/WebMercatorQuad/{zxy}",
            f"/tiles/WebMercatorQuad/{zxy}?url=file://{secret}",
            f"/cog/tiles/WebMercatorQuad/{zxy}?url=file://{secret}",
            "/maps/not-a-map/class?lon=15&lat=43.3",
            "/maps/not-a-map/info",
        ):
            resp = requests.get(server + path, timeout=60)
            assert 400 <= resp.status_code < 500, path
        # a url parameter is ignored: the tile is the catalog map's
        own = requests.get(f"{server}/maps/{MAP_A.item_id}/tiles/WebMercatorQuad/{zxy}", timeout=60)
        other = requests.get(
            f"{server}/maps/{MAP_A.item_id}/tiles/WebMercatorQuad/{zxy}",
            params={"url": f"file://{secret}"},
            timeout=60,
        )
        assert own.status_code == other.status_code == 200 and own.content == other.content

    def test_class_at_a_point(self, server):
        for spec in (MAP_A, MAP_B):
            for name, row, col in spec.probes:
                lon, lat = spec.lonlat(row, col)
                got = requests.get(
                    f"{server}/maps/{spec.item_id}/class",
                    params={"lon": lon, "lat": lat},
                    timeout=60,
                ).json()
                assert got["map"] == spec.item_id and (got["lon"], got["lat"]) == (lon, lat)
                assert got["name"] == (None if name == "nodata" else name)
                assert got["inside"] is True  # nodata inside the map, not outside it
        outside = requests.get(
            f"{server}/maps/{MAP_A.item_id}/class", params={"lon": 0, "lat": 0}, timeout=60
        ).json()
        assert outside["value"] is None and outside["name"] is None
        assert outside["inside"] is False

    def test_webmap_tables_served_only_if_registered(self, server, catalog):
        """The class-area and transition tables (JSON and CSV) and their plots (PNG) of an
        area collection, as its assets say; nothing else of the collection's folder, and no
        other asset (a mosaic VRT)."""
        listed = requests.get(f"{server}/maps.json", timeout=60).json()
        p0, p1 = AREA.periods
        c = AREA.collection
        change_id = f"{c}.change-{p0}_{p1}"
        assert listed["tables"] == {
            c: {
                "class_areas": {
                    "table": f"tables/{c}/class-areas",
                    "csv": f"assets/{c}/class-areas",
                    "plot": f"assets/{c}/class-areas-plot",
                },
                "transitions": {
                    change_id: {
                        "table": f"tables/{c}/transitions-{p0}_{p1}",
                        "csv": f"assets/{c}/transitions-{p0}_{p1}",
                        "plot": f"assets/{c}/transitions-plot-{p0}_{p1}",
                    }
                },
            }
        }
        col = pystac.Collection.from_file(str(catalog / c / "collection.json"))
        urls = listed["tables"][c]
        for key, url in (
            ("class-areas", urls["class_areas"]["csv"]),
            ("class-areas-plot", urls["class_areas"]["plot"]),
            (f"transitions-{p0}_{p1}", urls["transitions"][change_id]["csv"]),
            (f"transitions-plot-{p0}_{p1}", urls["transitions"][change_id]["plot"]),
        ):
            resp = requests.get(f"{server}/{url}", timeout=60)
            asset = col.assets[key]
            assert resp.status_code == 200 and resp.headers["content-type"].startswith(
                asset.media_type
            )
            assert (
                resp.content == Path(asset.get_absolute_href().removeprefix("file://")).read_bytes()
            )
        table = requests.get(f"{server}/{urls['class_areas']['table']}", timeout=60).json()
        assert table["header"] == [
            "period",
            "class",
            "area_km2",
            "low_confidence_km2",
            "observable_km2",
            "cells",
        ]
        urban = next(r for r in table["rows"] if r[:2] == [p1, "urban"])
        assert float(urban[2]) == pytest.approx(AREA.km2(1)["urban"], abs=1e-4)
        for path in (
            f"/assets/{c}/secret.csv",  # in the folder, not an asset
            f"/assets/{c}/..%2Fsecret.csv",
            f"/assets/{c}/mosaic-{p0}",  # an asset, but not a table or a plot
            f"/tables/{c}/class-areas-plot",  # a plot is not a table
            "/assets/relaymap-maps/class-areas",
            "/assets/not-a-collection/class-areas",
            f"/assets/{c}/class-areas.csv",
        ):
            resp = requests.get(server + path, timeout=60)
            assert resp.status_code == 404, path

    def test_page_and_offline_assets(self, server):
        page = requests.get(server + "/", timeout=60)
        assert page.status_code == 200 and "static/maplibre-gl.js" in page.text
        assert "http" not in page.text.split("<body>", 1)[1]  # nothing from a CDN
        for name in ("maplibre-gl.js", "maplibre-gl.css", "webmap.js", "webmap.css"):
            assert requests.get(f"{server}/static/{name}", timeout=60).status_code == 200


def test_stac_api_catalog(catalog, tmp_path):
    """The maps of a STAC API (here the catalog served by ``rustac serve``)."""
    with StaticCatalog(str(catalog)).serve() as api, _serving(api, tmp_path / "log") as url:
        maps = requests.get(f"{url}/maps.json", timeout=60).json()["maps"]
        maps = [m for m in maps if m["source"] == "relaymap-maps"]
        assert [m["id"] for m in maps] == [MAP_A.item_id, MAP_B.item_id]
        assert _tile_pixel(url, MAP_A.item_id, *MAP_A.lonlat(80, 64)) == (255, 0, 0, 255)


def _area_layers(server: str) -> dict[str, dict]:
    """The area's layers in ``/maps.json`` by kind and period (change: by its later one)."""
    listed = requests.get(f"{server}/maps.json", timeout=60).json()
    layers = [m for m in listed["maps"] + listed["overlays"] if m["source"] == AREA.collection]
    return {(m["kind"], m["period"]): m for m in layers}


def _stretched(rescale: list, rgb: tuple[float, ...]) -> tuple[int, ...]:
    """The colour a reflectance shows with the layer's stretch (titiler's rescale; ``rgb``
    stored as the imagery writer stores it)."""
    return tuple(
        int(np.clip((np.rint(np.float32(v) * 10000) - lo) / (hi - lo), 0, 1) * 255)
        for v, (lo, hi) in zip(rgb, rescale, strict=True)
    )


def _near(got: tuple, want: tuple, tol: int = 6) -> bool:
    return all(abs(g - w) <= tol for g, w in zip(got[:3], want[:3], strict=True))


def _is_hatch(rgb: tuple) -> bool:
    """One of the two stripe greys (or a blend of them, at a stripe's edge)."""
    lo, hi = HATCH[0][0], HATCH[1][0]
    return max(rgb[:3]) - min(rgb[:3]) <= 14 and lo - 6 <= rgb[1] <= hi + 6


class TestWebmapAreaLayers:
    def test_webmap_lists_area_layers(self, server):
        listed = requests.get(f"{server}/maps.json", timeout=60).json()
        assert listed["basemap"] is None  # none unless configured: works offline
        layers = _area_layers(server)
        p0, p1 = AREA.periods
        assert set(layers) == {
            ("classes", p0),
            ("classes", p1),
            ("imagery", p0),
            ("imagery", p1),
            ("stable", p0),
            ("stable", p1),
            ("change", p1),
        }
        change = layers[("change", p1)]
        assert change["before"] == p0 and change["id"] == f"{AREA.collection}.change-{p0}_{p1}"
        names = [c["name"] for c in change["classes"]]
        assert names == ["no change", "crop → urban", "water → crop"]
        assert {m["kind"] for m in listed["maps"]} == {"classes"}  # the others are overlays

    def test_webmap_imagery_one_stretch_for_the_three_bands(self, server):
        """The true-colour stretch is one for red, green and blue (a per-band one turns
        vegetation near black) and for both periods: the 2nd-98th percentiles of the
        three bands' values together, averaged over the periods."""
        layers = _area_layers(server)
        stretches = [layers[("imagery", p)]["rescale"] for p in AREA.periods]
        assert stretches[0] == stretches[1] and len(stretches[0]) == 3
        assert stretches[0][0] == stretches[0][1] == stretches[0][2]
        lo, hi = AREA.stretch()
        assert abs(stretches[0][0][0] - lo) <= 1 and abs(stretches[0][0][1] - hi) <= 1

    def test_webmap_imagery_and_change_tiles(self, server):
        from relaymap.catalog.webmap import NO_CHANGE
        from relaymap.flows.products.change import NO_CHANGE as WRITTEN

        assert NO_CHANGE == WRITTEN  # the value the page draws transparent
        layers = _area_layers(server)
        p1 = AREA.periods[1]
        imagery = layers[("imagery", p1)]
        got = _tile_pixel(server, imagery["id"], *AREA.lonlat(*AREA.pixel("crop")))
        assert got[3] == 255 and _near(got, _stretched(imagery["rescale"], AREA.rgb[0]), 2)
        assert got[0] > got[1] > got[2]  # one stretch: the bands keep their order (crop)
        cloud = _tile_pixel(server, imagery["id"], *AREA.lonlat(*AREA.pixel("cloud2")))
        assert cloud[3] == 0  # no composite under the cloud
        change = layers[("change", p1)]
        colours = {c["name"]: c["color"] for c in change["classes"]}
        for probe, name in (("changed", "crop → urban"), ("water2crop", "water → crop")):
            got = _tile_pixel(server, change["id"], *AREA.lonlat(*AREA.pixel(probe)))
            assert got == (*bytes.fromhex(colours[name][1:]), 255), probe
        # no change, and unobservable in one of the periods: transparent (the map beneath)
        for probe in ("crop", "cloud1", "cloud2"):
            got = _tile_pixel(server, change["id"], *AREA.lonlat(*AREA.pixel(probe)))
            assert got[3] == 0, probe
        # the stable map of the later period (window 2: ties go to the most recent class)
        stable = layers[("stable", p1)]
        got = _tile_pixel(server, stable["id"], *AREA.lonlat(*AREA.pixel("cloud2")))
        assert got == (*AREA.colour("urban"), 255)  # cloudy now, urban before


def test_webmap_quicklook_nodata_is_striped_and_named(tmp_path):
    """Quicklooks draw nodata as the grey stripes and name it in their legend (not white
    on white)."""
    from relaymap.flows.products.cog import NODATA_HATCH as COG_HATCH
    from relaymap.flows.products.cog import quicklook

    assert [bytes(c).hex() for c in COG_HATCH] == [c[1:] for c in NODATA_HATCH]
    cog = tmp_path / "a.tif"
    _write_cog(cog, MAP_A)
    quicklook(str(cog), str(tmp_path / "a.png"), MAP_A.classes)
    png = Image.open(tmp_path / "a.png").convert("RGB")
    assert png.size[1] == SIDE_PX + 6 + 16 * 3 + 6  # the picture, then three legend lines
    stripes = {png.getpixel((c, r)) for r in range(200, 250) for c in range(0, 50)}
    assert stripes == set(HATCH)  # the bottom quarter of MAP_A is nodata
    assert png.getpixel((64, 80)) == (255, 0, 0)


def _screen(page, spec, row: float, col: float, which: str = "relaymapMap") -> tuple[int, int]:
    """Where a pixel of a test map is on the page, on the left map or the right one."""
    lon, lat = spec.lonlat(row, col)
    return tuple(
        page.evaluate(
            """([lon, lat, which]) => {
                const m = window[which];
                const r = m.getContainer().getBoundingClientRect();
                const p = m.project([lon, lat]);
                return [Math.round(r.left + p.x), Math.round(r.top + p.y)];
            }""",
            [lon, lat, which],
        )
    )


def _open(browser, url: str):
    """A new page of ``url`` in the shared browser, loaded; errors on the page or its console
    are collected in ``page.errors``."""
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    _wait(page)
    return page


def _wait(page) -> None:
    # generous: a busy 2-core machine renders WebGL in software
    page.wait_for_function("window.relaymapReady === true", timeout=180_000)


def _shot(page, path: Path) -> Image.Image:
    page.screenshot(path=str(path))
    return Image.open(path).convert("RGB")


def _fit(page, spec) -> None:
    """Zoom the (left) map to a test map (the right one follows)."""
    page.evaluate(
        "(b) => window.relaymapMap.fitBounds(b, {padding: 40, animate: false})",
        [list(spec.lonlat(SIDE_PX, 0)), list(spec.lonlat(0, SIDE_PX))],
    )
    _wait(page)


def _view(page, period: str, compare: str = "", mode: str = "side") -> None:
    """Show ``period``, compared with ``compare`` (side by side or by swipe) if given."""
    page.select_option("#period", period)
    page.select_option("#compare", compare)
    if compare:
        page.check(f'input[name="mode"][value="{mode}"]')
    _wait(page)


def _show(page, side: str, **on: bool) -> None:
    """Set the toggles of the area's layers of one side (``main``: the period chosen,
    ``compare``: the one compared), e.g. ``_show(page, "main", imagery=False)``."""
    for kind, want in on.items():
        sel = (
            f'input.toggle[data-side="{side}"][data-kind="{kind}"][data-map^="{AREA.collection}."]'
        )
        box = page.locator(sel)
        if box.count():
            box.check() if want else box.uncheck()
    _wait(page)


def _hex(colour: str) -> tuple[int, ...]:
    return tuple(bytes.fromhex(colour.lstrip("#")))


def _km2(v: float) -> str:
    """An area as the page writes it."""
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}" if v >= 1 else f"{v:.2g}"


def _rect(page, selector: str) -> dict:
    return page.evaluate(
        "(s) => { const r = document.querySelector(s).getBoundingClientRect();"
        " return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; }",
        selector,
    )


def _click(page, xy: tuple[int, int]) -> list[str]:
    """Click the page there; the popup's lines once it has read the point."""
    page.evaluate("document.getElementById('popup').dataset.done = '0'")
    page.mouse.click(*xy)
    page.wait_for_function("document.getElementById('popup').dataset.done === '1'")
    return page.locator("#popup .line").all_inner_texts()


def _popups(page) -> int:
    """How many popups are on the page (the page's own, and MapLibre's)."""
    return page.evaluate(
        "document.querySelectorAll('#popup:not([hidden]), .maplibregl-popup').length"
    )


def _split(page) -> dict:
    """The swipe's split (page x, from the right map's clip), the centres of the line and
    its handle."""
    return page.evaluate(
        """() => {
            const view = document.getElementById("view").getBoundingClientRect();
            const clip = getComputedStyle(document.getElementById("map-compare")).clipPath;
            const inset = Number(clip.match(/([\\d.]+)px\\)$/)[1]);
            const centre = (r) => [r.left + r.width / 2, r.top + r.height / 2];
            const d = document.getElementById("divider").getBoundingClientRect();
            const k = document.querySelector("#divider .knob").getBoundingClientRect();
            return {split: view.left + inset, line: centre(d)[0], knob: centre(k)};
        }"""
    )


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's browser tests."""
    from playwright.sync_api import sync_playwright

    from tests.services import ensure_chromium

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(ensure_chromium()), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the browser tests keep their screenshots."""
    return tmp_path_factory.mktemp("webmap-shots")


@pytest.fixture(scope="module")
def page(browser, server, shots):
    """The page of the test catalog, loaded once for the browser tests (each test sets the
    view it checks); what it showed when it opened is kept in ``page.first``."""
    page = _open(browser, server)
    at = {name: _screen(page, AREA, r, c) for name, r, c in AREA.probes}
    at.update({s.item_id: _screen(page, s, *s.probes[0][1:]) for s in (MAP_A, MAP_B)})
    page.first = {
        "shot": _shot(page, shots / "0-first.png"),
        "at": at,
        "period": page.locator("#period").input_value(),
        "compare": page.locator("#compare").input_value(),
        "legend": [t.strip() for t in page.locator("#legend li").all_inner_texts()],
        "change legend": page.locator("#legend-change").inner_text(),
        "more": page.locator("#legend-more").inner_text(),
        "note": page.locator("#no-basemap").inner_text(),
        "note visible": page.locator("#no-basemap").is_visible(),
    }
    yield page
    page.close()


@pytest.mark.slow
def test_webmap_opens_on_the_latest_period(page):
    """The latest period, its land cover over its imagery, nothing of other periods; nodata
    striped; the legend names the classes and the stripes; no base map, said so."""
    first = page.first
    shot, at = first["shot"], first["at"]
    assert (first["period"], first["compare"]) == (AREA.periods[1], "")
    assert _near(shot.getpixel(at["changed"]), AREA.colour("urban"))
    assert _near(shot.getpixel(at["water"]), AREA.colour("water"))
    assert _is_hatch(shot.getpixel(at["cloud2"])), shot.getpixel(at["cloud2"])
    for spec in (MAP_A, MAP_B):  # other periods are not stacked under it
        assert _near(shot.getpixel(at[spec.item_id]), BACKGROUND, 4)
    assert first["legend"] == ["crop", "urban", "water"]
    assert first["change legend"] == ""
    assert "no data (cloud / not observed)" in first["more"] and "imagery" in first["more"]
    assert first["note visible"] and "No base map" in first["note"]
    assert page.errors == []


@pytest.mark.slow
def test_webmap_imagery_one_stretch_on_screen(page, server, shots):
    """The imagery alone: each class's pixels in the colour of one common stretch of the
    three bands (the bands keep their order: crop reddish, water bluish)."""
    p1 = AREA.periods[1]
    _view(page, p1)
    _show(page, "main", imagery=True, classes=False, stable=False, change=False)
    _fit(page, AREA)
    shot = _shot(page, shots / "1-imagery.png")
    rescale = _area_layers(server)[("imagery", p1)]["rescale"]
    for probe, cls in (("changed", 1), ("crop", 0), ("water", 2)):
        got = shot.getpixel(_screen(page, AREA, *AREA.pixel(probe)))
        want = _stretched(rescale, AREA.rgb[cls])
        assert _near(got, want, 8), (probe, got, want)
        order = np.argsort(AREA.rgb[cls])
        assert got[order[2]] > got[order[0]], (probe, got)
    assert _is_hatch(shot.getpixel(_screen(page, AREA, *AREA.pixel("cloud2"))))
    assert page.errors == []


@pytest.mark.slow
def test_webmap_change_is_transparent_where_nothing_changed(page, server, catalog, shots):
    """The change layer over the land cover: the changes in their colours, the land cover
    where nothing changed or a period was not observed; alone, the background there (not
    grey, not stripes). The legend lists the transitions that occurred, grouped by the
    class they came from, with their areas from the transition table."""
    p0, p1 = AREA.periods
    change = _area_layers(server)[("change", p1)]
    colours = {c["name"]: _hex(c["color"]) for c in change["classes"]}
    _view(page, p1)
    _show(page, "main", imagery=False, classes=True, stable=False, change=True)
    _fit(page, AREA)
    shot = _shot(page, shots / "2-change.png")
    for probe, want in (
        ("changed", colours["crop → urban"]),
        ("water2crop", colours["water → crop"]),
        ("crop", AREA.colour("crop")),  # no change: the land cover beneath
        ("cloud1", AREA.colour("crop")),  # not observed before: the land cover beneath
    ):
        got = shot.getpixel(_screen(page, AREA, *AREA.pixel(probe)))
        assert _near(got, want), (probe, got, want)
    groups = page.evaluate(
        """() => [...document.querySelectorAll("#legend-change .change-group")].map((g) => [
            g.dataset.from,
            [...g.querySelectorAll("li")].map((li) => [
                li.querySelector("span:not(.swatch):not(.km2)").textContent,
                li.querySelector(".km2").textContent,
            ]),
        ])"""
    )
    # the transition table the catalog registers, and what the rasters say
    table = catalog / AREA.collection / "collection.json"
    href = pystac.Collection.from_file(str(table)).assets[f"transitions-{p0}_{p1}"]
    with open(href.get_absolute_href().removeprefix("file://")) as f:
        rows = list(csv.reader(f))
    from_table = [
        [row[0], [[f"→ {to}", f"{_km2(float(v))} km²"]]]
        for row in rows[1:-1]
        for to, v in zip(rows[0][1:-1], row[1:-1], strict=True)
        if to != row[0] and float(v) > 0
    ]
    assert (
        groups
        == from_table
        == [
            ["crop", [["→ urban", f"{_km2(64 * 64 * RES_M**2 / 1e6)} km²"]]],
            ["water", [["→ crop", f"{_km2(40 * 40 * RES_M**2 / 1e6)} km²"]]],
        ]
    )
    title = page.locator("#legend-change .change-title").inner_text()
    assert title == f"change {p0} → {p1}"
    # the change alone: where nothing changed, what is beneath (here the background)
    _show(page, "main", classes=False)
    shot = _shot(page, shots / "3-change-alone.png")
    assert _near(shot.getpixel(_screen(page, AREA, *AREA.pixel("crop"))), BACKGROUND, 4)
    got = shot.getpixel(_screen(page, AREA, *AREA.pixel("changed")))
    assert _near(got, colours["crop → urban"])
    assert page.errors == []


@pytest.mark.slow
def test_webmap_tables_of_the_periods_shown(page, shots):
    """The panel shows the class areas of the period shown and the transitions into it,
    from the catalog's tables, with their plots; comparing, those of both periods."""
    p0, p1 = AREA.periods
    _view(page, p1)
    page.wait_for_function(
        "[...document.querySelectorAll('#tables img')].every(i => i.complete && i.naturalWidth)"
    )
    page.locator("#tables").scroll_into_view_if_needed()
    _shot(page, shots / "4-tables.png")

    def table(selector: str) -> list[list[str]]:
        return page.evaluate(
            """(s) => [...document.querySelectorAll(s + " tr")].map(
                (tr) => [...tr.children].map((c) => c.textContent))""",
            selector,
        )

    want = AREA.km2(1)
    low = {"urban": AREA.low_confidence_km2}
    assert table(f'#tables table.class-areas[data-period="{p1}"]') == [
        ["class", "area", "low confidence"],
        *([n, _km2(want[n]), _km2(low.get(n, 0))] for n in ("crop", "urban", "water")),
    ]
    caption = page.locator("#tables table.class-areas caption").inner_text()
    assert f"observable {_km2(want[None])}" in caption
    crop_urban, water_crop = (_km2(n * n * RES_M**2 / 1e6) for n in (64, 40))
    matrix = table("#tables table.transitions")
    assert matrix[0] == ["from \\ to", "crop", "urban", "water", "total"]
    assert matrix[1][2] == crop_urban and matrix[3][1] == water_crop
    assert [r[0] for r in matrix[1:]] == ["crop", "urban", "water", "total"]
    unchanged = page.locator("#tables table.transitions td.same").all_inner_texts()
    assert unchanged == [matrix[1][1], matrix[2][2], matrix[3][3]]  # the diagonal, in grey
    images = page.evaluate("[...document.querySelectorAll('#tables img')].map(i => i.src)")
    assert [i.rsplit("/", 1)[1] for i in images] == [
        f"transitions-plot-{p0}_{p1}",
        "class-areas-plot",
    ]
    # comparing: both periods' class areas
    _view(page, p1, p0)
    periods = page.evaluate(
        "[...document.querySelectorAll('#tables table.class-areas')].map(t => t.dataset.period)"
    )
    assert periods == [p0, p1]
    assert page.locator("#tables table.transitions").count() == 1  # into p1; none into p0
    assert page.errors == []


@pytest.mark.slow
def test_webmap_popups(page, shots):
    """A click reads the point into one popup (a second click, on either map, replaces it),
    in lines: the class, what and when, the coordinates; no internal ids; nodata and an
    unknown change in words; inside the view at its edges, over both maps."""
    p0, p1 = AREA.periods
    _view(page, p1)
    _show(page, "main", imagery=True, classes=True, stable=False, change=True)
    _fit(page, AREA)
    lines = _click(page, _screen(page, AREA, *AREA.pixel("changed")))
    lon, lat = AREA.lonlat(*AREA.pixel("changed"))
    assert lines[:3] == ["crop → urban", f"change {p0} → {p1}", "land cover: urban"]
    shown = lines[-1].replace(",", "").split()  # lon X lat Y
    assert shown[0] == "lon" and abs(float(shown[1]) - lon) < 2e-4
    assert shown[2] == "lat" and abs(float(shown[3]) - lat) < 2e-4
    text = "\n".join(lines)
    for internal in (AREA.collection, "mosaic", "class 1", "change-"):
        assert internal not in text
    _shot(page, shots / "5-popup.png")
    # not observed in the earlier period: an unknown change, not a class
    lines = _click(page, _screen(page, AREA, *AREA.pixel("cloud1")))
    assert lines[:3] == ["unknown change", f"change {p0} → {p1}", f"no data in {p0}"]
    assert _click(page, _screen(page, AREA, *AREA.pixel("cloud1"))) == lines  # twice
    assert _popups(page) == 1
    # the change off: nodata in words
    _show(page, "main", change=False)
    lines = _click(page, _screen(page, AREA, *AREA.pixel("cloud2")))
    assert lines[:2] == ["no data (cloud / not observed)", f"land cover, {p1}"]
    # two maps: a click on each, one popup (the last), each side read as itself
    _view(page, p1, p0)
    _show(page, "compare", imagery=True, classes=True, stable=False)
    lines = _click(page, _screen(page, AREA, *AREA.pixel("changed")))
    assert lines[:2] == ["crop", f"land cover, {p0}"]
    lines = _click(page, _screen(page, AREA, *AREA.pixel("changed"), "relaymapCompare"))
    assert lines[:2] == ["urban", f"land cover, {p1}"]
    assert _popups(page) == 1
    # at the view's edges (the far corner of the right map, the top left of the left one)
    view = _rect(page, "#view")
    for xy in ((view["right"] - 4, view["bottom"] - 4), (view["left"] + 4, view["top"] + 4)):
        _click(page, (int(xy[0]), int(xy[1])))
        box = _rect(page, "#popup")
        assert view["left"] <= box["left"] and box["right"] <= view["right"], (xy, box)
        assert view["top"] <= box["top"] and box["bottom"] <= view["bottom"], (xy, box)
    # swipe: a popup across the split is whole, over both maps
    _view(page, p1, p0, "swipe")
    split = _split(page)["split"]
    _click(page, (int(split) + 14, int((view["top"] + view["bottom"]) / 2) + 60))
    _shot(page, shots / "6-popup-swipe.png")
    box = _rect(page, "#popup")
    assert box["left"] < split < box["right"]
    on_top = page.evaluate(
        """(b) => [[b.left + 2, b.top + 2], [b.right - 2, b.top + 2], [b.left + 2, b.bottom - 2],
            [b.right - 2, b.bottom - 2]].every(([x, y]) =>
            document.getElementById("popup").contains(document.elementFromPoint(x, y)))""",
        box,
    )
    assert on_top and _popups(page) == 1
    page.locator("#popup .close").click()
    assert _popups(page) == 0
    assert page.errors == []


@pytest.mark.slow
def test_webmap_side_by_side(page, shots):
    """Two periods side by side: the earlier on the left whichever is chosen first, both
    refitted to what the single map showed; the compared side has its own toggles."""
    p0, p1 = AREA.periods
    _view(page, p1)
    _fit(page, AREA)
    _view(page, p1, p0)
    assert page.locator(".badge").all_inner_texts() == [p0, p1]
    headings = page.locator("#maps h4").all_inner_texts()
    assert headings == [f"left map: {p0}", f"right map: {p1}"]
    # refitted: the whole area on both maps, at the same place in each
    corners = [(0, 0), (SIDE_PX, SIDE_PX)]
    for which, box in (("relaymapMap", "#map"), ("relaymapCompare", "#map-compare")):
        r = _rect(page, box)
        for corner in corners:
            x, y = _screen(page, AREA, *corner, which)
            assert r["left"] <= x <= r["right"] and r["top"] <= y <= r["bottom"], which
    left, right = (_rect(page, b) for b in ("#map", "#map-compare"))
    a = _screen(page, AREA, *AREA.pixel("changed"))
    b = _screen(page, AREA, *AREA.pixel("changed"), "relaymapCompare")
    assert abs((a[0] - left["left"]) - (b[0] - right["left"])) <= 1 and abs(a[1] - b[1]) <= 1
    # land cover on both sides: the earlier period left
    _show(page, "main", imagery=True, classes=True, stable=False, change=False)
    _show(page, "compare", imagery=True, classes=True, stable=False, change=False)
    shot = _shot(page, shots / "7-side.png")
    assert _near(shot.getpixel(a), AREA.colour("crop"))
    assert _near(shot.getpixel(b), AREA.colour("urban"))
    assert _is_hatch(shot.getpixel(_screen(page, AREA, *AREA.pixel("cloud1"))))
    # the compared side's own toggles: its land cover off (its imagery shows), and the
    # chosen side's change on
    _show(page, "compare", classes=False)
    _show(page, "main", change=True)
    shot = _shot(page, shots / "8-side-toggles.png")
    got = shot.getpixel(a)
    assert not _near(got, AREA.colour("crop"), 20) and got[0] > got[1] > got[2], got  # imagery
    change = page.locator('input.toggle[data-side="main"][data-kind="change"]')
    assert change.is_checked()
    assert not _near(shot.getpixel(b), AREA.colour("urban"), 20)  # the change's colour
    # the earlier period chosen, the later compared: still the earlier on the left
    _view(page, p0, p1)
    assert page.locator(".badge").all_inner_texts() == [p0, p1]
    assert page.locator("#maps h4").all_inner_texts() == [f"left map: {p0}", f"right map: {p1}"]
    assert page.errors == []


@pytest.mark.slow
def test_webmap_swipe_split_is_dragged(page, shots):
    """Swipe: the earlier period left of the split, the later right; the line and its
    handle sit exactly at the split; a mouse drag on the handle moves the split there
    (arrow keys too)."""
    p0, p1 = AREA.periods
    _view(page, p1, p0, "swipe")
    _show(page, "main", imagery=False, classes=True, stable=False, change=False)
    _show(page, "compare", imagery=False, classes=True, stable=False, change=False)
    _fit(page, AREA)
    at = _split(page)
    assert abs(at["line"] - at["split"]) <= 0.5 and abs(at["knob"][0] - at["split"]) <= 0.5
    shot = _shot(page, shots / "9-swipe.png")
    view = _rect(page, "#view")
    for x in (int(at["split"]) - 1, int(at["split"])):  # the line: white, full height
        for y in (int(view["top"]) + 60, int(view["bottom"]) - 60):
            assert min(shot.getpixel((x, y))) >= 230, (x, y, shot.getpixel((x, y)))
    # drag the handle onto the built-over field: crop left of the split, urban right
    target = _screen(page, AREA, *AREA.pixel("changed"))
    page.mouse.move(*at["knob"])
    page.mouse.down()
    page.mouse.move(target[0], at["knob"][1], steps=5)
    page.mouse.up()
    _wait(page)
    moved = _split(page)
    assert abs(moved["split"] - target[0]) <= 1, (moved, target)
    assert abs(moved["knob"][0] - moved["split"]) <= 0.5
    shot = _shot(page, shots / "10-swipe-dragged.png")
    y = target[1]
    assert _near(shot.getpixel((int(moved["split"]) - 8, y)), AREA.colour("crop"))
    assert _near(shot.getpixel((int(moved["split"]) + 8, y)), AREA.colour("urban"))
    page.focus("#divider")
    page.keyboard.press("ArrowLeft")
    width = view["right"] - view["left"]
    assert abs(_split(page)["split"] - (moved["split"] - 0.02 * width)) <= 1
    assert page.errors == []


@pytest.mark.slow
def test_webmap_scene_map_read_fade_and_hide(page, shots):
    """A scene map's date: its classes and nodata on screen, its legend, a click naming the
    class (not the map's id); opacity 50% blends it over the stripes; off, it is gone."""
    period = MAP_A.when.date().isoformat()
    _view(page, period)
    _fit(page, MAP_A)
    shot = _shot(page, shots / "11-scene.png")
    for name, row, col in MAP_A.probes:
        got = shot.getpixel(_screen(page, MAP_A, row, col))
        assert _near(got, MAP_A.colour(name)) if name != "nodata" else _is_hatch(got), name
    assert [t.strip() for t in page.locator("#legend li").all_inner_texts()] == ["crop", "water"]
    lines = _click(page, _screen(page, MAP_A, 80, 192))
    assert lines[:2] == ["water", f"land cover, {period}"]
    assert MAP_A.item_id not in "\n".join(lines)
    page.locator("#popup .close").click()
    page.evaluate(
        """(id) => {
            const s = document.querySelector(`input.opacity[data-map="${id}"][data-side="main"]`);
            s.value = 50;
            s.dispatchEvent(new Event("input"));
        }""",
        MAP_A.item_id,
    )
    _wait(page)
    got = _shot(page, shots / "12-opacity.png").getpixel(_screen(page, MAP_A, 80, 64))
    halves = [tuple(0.5 * r + 0.5 * h for r, h in zip((255, 0, 0), c, strict=True)) for c in HATCH]
    low, high = np.min(halves, axis=0) - 8, np.max(halves, axis=0) + 8  # a stripe or its edge
    assert all(lo <= g <= hi for g, lo, hi in zip(got, low, high, strict=True)), (got, halves)
    page.locator(f'input.toggle[data-map="{MAP_A.item_id}"][data-side="main"]').uncheck()
    _wait(page)
    got = _shot(page, shots / "13-off.png").getpixel(_screen(page, MAP_A, 80, 64))
    assert _near(got, BACKGROUND, 4), got
    assert page.errors == []


@pytest.mark.slow
def test_webmap_base_map(catalog, browser, tmp_path):
    """With --basemap (an XYZ URL, here a loopback tile server of one colour) the base map
    shows around the maps, with its attribution; nodata inside a map stays striped. When
    the tile server goes away, the page says the base map is unreachable; so it does when a
    style URL cannot be read, and shows the maps without it."""
    import http.server
    import threading

    tile = io.BytesIO()
    Image.new("RGB", (256, 256), (20, 120, 60)).save(tile, format="PNG")

    class Tiles(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(tile.getvalue())

        def log_message(self, *args) -> None:
            pass

    tiles = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Tiles)
    threading.Thread(target=tiles.serve_forever, daemon=True).start()
    xyz = f"http://127.0.0.1:{tiles.server_address[1]}/{{z}}/{{x}}/{{y}}.png"
    args = ("--basemap", xyz, "--attribution", "Test tiles")
    with _serving(str(catalog), tmp_path / "serve.log", *args) as url:
        page = _open(browser, url)
        try:
            assert requests.get(f"{url}/maps.json", timeout=60).json()["basemap"] == {
                "url": xyz,
                "attribution": "Test tiles",
                "kind": "xyz",
            }
            shot = _shot(page, tmp_path / "basemap.png")
            _, row, col = MAP_A.probes[0]  # another period's map: not drawn, the base map is
            assert _near(shot.getpixel(_screen(page, MAP_A, row, col)), (20, 120, 60), 4)
            assert _is_hatch(shot.getpixel(_screen(page, AREA, *AREA.pixel("cloud2"))))
            assert "Test tiles" in page.locator(".maplibregl-ctrl-attrib").inner_text()
            assert not page.locator("#no-basemap").is_visible()
            assert page.errors == []
            # the tile server gone (its port closed): new tiles fail, and the page says so
            tiles.shutdown()
            tiles.server_close()
            page.evaluate("window.relaymapMap.zoomTo(window.relaymapMap.getZoom() + 2)")
            note = page.locator("#no-basemap")
            note.wait_for(state="visible", timeout=60_000)
            assert note.inner_text().startswith(f"Base map unreachable ({xyz})")
            _shot(page, tmp_path / "basemap-unreachable.png")
        finally:
            page.close()
    style = f"http://127.0.0.1:{free_port()}/style.json"  # nothing listens there
    with _serving(str(catalog), tmp_path / "serve-style.log", "--basemap", style) as url:
        page = _open(browser, url)  # loads all the same
        try:
            note = page.locator("#no-basemap")
            assert note.is_visible()
            assert note.inner_text().startswith(f"Base map unreachable ({style})")
            shot = _shot(page, tmp_path / "basemap-style-unreachable.png")
            assert _is_hatch(shot.getpixel(_screen(page, AREA, *AREA.pixel("cloud2"))))
            assert [e for e in page.errors if "ERR_CONNECTION_REFUSED" not in e] == []
        finally:
            page.close()
