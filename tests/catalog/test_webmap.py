"""The web map: ``relaymap serve`` on a real catalog of class COGs (EPSG:32633), checked over
HTTP and in Debian's Chromium (WebGL through SwiftShader), driven by Playwright.

The catalog holds two scene maps (``relaymap-maps``) and an area collection of two periods
whose imagery, stable maps and change are made by relaymap's own writers
(:func:`relaymap.flows.timeline.derive`, its per-cell tasks run in this process)."""

from __future__ import annotations

import contextlib
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
from relaymap.flows.cog import NODATA, palette, to_cog
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
    """A test area run: one 256 px cell mapped in two periods with a known change, cloud
    strips in each period, and true-colour composites."""

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
    #: ``(row, col)`` of pixels checked on screen: crop that became urban, crop both times,
    #: water both times, crop under the first period's cloud, urban under the second's.
    probes: tuple[tuple[str, int, int], ...] = (
        ("changed", 80, 168),
        ("crop", 80, 40),
        ("water", 192, 64),
        ("cloud1", 16, 64),
        ("cloud2", 192, 244),
    )

    def raster(self, period: int) -> np.ndarray:
        """(H, W) uint8 classes of period 0 or 1."""
        a = np.zeros((SIDE_PX, SIDE_PX), np.uint8)  # crop
        a[128:, :128], a[128:, 128:] = 2, 1  # water, urban
        if period == 0:
            a[:32] = NODATA  # a cloud
        else:
            a[48:112, 136:200] = 1  # a field built over
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


AREA = AreaSpec()


def _make_area(root: Path, catalog_url: str) -> None:
    """The area collection: per period a cell item, its class COG and mosaic, its scene
    store; then imagery, stable maps and the change, derived as an area run does."""
    import xarray as xr
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    from relaymap.flows.area import AreaConfig
    from relaymap.flows.mosaic import write_mosaic
    from relaymap.flows.timeline import cell_task, derive
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
        outside = requests.get(
            f"{server}/maps/{MAP_A.item_id}/class", params={"lon": 0, "lat": 0}, timeout=60
        ).json()
        assert outside["value"] is None and outside["name"] is None

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
    """The colour a reflectance shows with the layer's stretch (titiler's rescale)."""
    return tuple(
        int(np.clip((v * 10000 - lo) / (hi - lo), 0, 1) * 255)
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
        assert [c["name"] for c in change["classes"]] == ["no change", "crop → urban"]
        # one stretch for both periods (they compare), 2nd-98th percentiles of the pixels
        stretches = [layers[("imagery", p)]["rescale"] for p in AREA.periods]
        assert stretches[0] == stretches[1] and len(stretches[0]) == 3
        for (lo, hi), band in zip(stretches[0], zip(*AREA.rgb, strict=True), strict=True):
            assert min(band) * 1e4 - 1 <= lo < hi <= max(band) * 1e4 + 1
        assert {m["kind"] for m in listed["maps"]} == {"classes"}  # the others are overlays

    def test_webmap_imagery_and_change_tiles(self, server):
        layers = _area_layers(server)
        p1 = AREA.periods[1]
        imagery = layers[("imagery", p1)]
        got = _tile_pixel(server, imagery["id"], *AREA.lonlat(*AREA.pixel("crop")))
        assert got[3] == 255 and _near(got, _stretched(imagery["rescale"], AREA.rgb[0]), 2)
        cloud = _tile_pixel(server, imagery["id"], *AREA.lonlat(*AREA.pixel("cloud2")))
        assert cloud[3] == 0  # no composite under the cloud
        change = layers[("change", p1)]
        colours = {c["name"]: c["color"] for c in change["classes"]}
        for probe, name in (("changed", "crop → urban"), ("crop", "no change")):
            got = _tile_pixel(server, change["id"], *AREA.lonlat(*AREA.pixel(probe)))
            assert got == (*bytes.fromhex(colours[name][1:]), 255), probe
        for probe in ("cloud1", "cloud2"):  # unobservable in one of the periods
            got = _tile_pixel(server, change["id"], *AREA.lonlat(*AREA.pixel(probe)))
            assert got[3] == 0, probe
        # the stable map of the later period (window 2: ties go to the most recent class)
        stable = layers[("stable", p1)]
        got = _tile_pixel(server, stable["id"], *AREA.lonlat(*AREA.pixel("cloud2")))
        assert got == (*AREA.colour("urban"), 255)  # cloudy now, urban before


def test_webmap_quicklook_nodata_is_striped_and_named(tmp_path):
    """Quicklooks draw nodata as the grey stripes and name it in their legend (not white
    on white)."""
    from relaymap.flows.cog import NODATA_HATCH as COG_HATCH
    from relaymap.flows.cog import quicklook

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
    """Where a pixel of a test map is on the page, on the left map or the compared one."""
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


@contextlib.contextmanager
def _browser_page(url: str) -> Iterator:
    """The page in headless Chromium, loaded; errors on the page or its console are
    collected in ``page.errors``."""
    from playwright.sync_api import sync_playwright

    from tests.services import ensure_chromium

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(ensure_chromium()), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            _wait(page)
            yield page
        finally:
            browser.close()


def _wait(page) -> None:
    # generous: a busy 2-core machine renders WebGL in software
    page.wait_for_function("window.relaymapReady === true", timeout=180_000)


def _shot(page, path: Path) -> Image.Image:
    page.screenshot(path=str(path))
    return Image.open(path).convert("RGB")


def _fit(page, spec) -> None:
    """Zoom the (left) map to a test map."""
    page.evaluate(
        "(b) => window.relaymapMap.fitBounds(b, {padding: 40, animate: false})",
        [list(spec.lonlat(SIDE_PX, 0)), list(spec.lonlat(0, SIDE_PX))],
    )
    _wait(page)


def _toggle(page, map_id: str, on: bool) -> None:
    box = page.locator(f'input.toggle[data-map="{map_id}"]')
    box.check() if on else box.uncheck()
    _wait(page)


@pytest.mark.slow
def test_webmap_browser_views(server, tmp_path):
    """The page in headless Chromium, each view checked on its screenshot at known pixels:
    one period (the latest) by default; imagery; the change layer and its legend; two
    periods side by side and by swipe; a scene map's period with a click query, opacity
    and toggle. No errors in the console."""
    layers = _area_layers(server)
    p0, p1 = AREA.periods
    ids = {key: m["id"] for key, m in layers.items()}
    with _browser_page(server) as page:
        # one period, the latest: the area's later map over its imagery, nothing else
        assert page.locator("#period").input_value() == p1
        shot = _shot(page, tmp_path / "1-latest.png")
        assert _near(
            shot.getpixel(_screen(page, AREA, *AREA.pixel("changed"))), AREA.colour("urban")
        )
        assert _near(shot.getpixel(_screen(page, AREA, *AREA.pixel("water"))), AREA.colour("water"))
        got = shot.getpixel(_screen(page, AREA, *AREA.pixel("cloud2")))
        assert _is_hatch(got), got  # nodata: grey stripes, not the page
        for spec in (MAP_A, MAP_B):  # other periods are not stacked under it
            _, row, col = spec.probes[0]
            assert _near(shot.getpixel(_screen(page, spec, row, col)), BACKGROUND, 4)
        legend = [t.strip() for t in page.locator("#legend li").all_inner_texts()]
        assert legend == ["crop", "urban", "water"]
        assert page.locator("#legend-change li").count() == 0
        more = page.locator("#legend-more").inner_text()
        assert "no data" in more and "imagery" in more
        note = page.locator("#no-basemap")
        assert note.is_visible() and "No base map" in note.inner_text()

        # imagery: the land cover off, the composite's true colour with the shared stretch
        _toggle(page, ids[("classes", p1)], False)
        shot = _shot(page, tmp_path / "2-imagery.png")
        rescale = layers[("imagery", p1)]["rescale"]
        for probe, cls in (("changed", 1), ("crop", 0), ("water", 2)):
            got = shot.getpixel(_screen(page, AREA, *AREA.pixel(probe)))
            want = _stretched(rescale, AREA.rgb[cls])
            assert _near(got, want, 8), (probe, got, want)
        assert _is_hatch(shot.getpixel(_screen(page, AREA, *AREA.pixel("cloud2"))))

        # change since the period before, over the land cover, with its legend
        _toggle(page, ids[("classes", p1)], True)
        _toggle(page, ids[("change", p1)], True)
        shot = _shot(page, tmp_path / "3-change.png")
        colours = {c["name"]: c["color"] for c in layers[("change", p1)]["classes"]}
        hexrgb = lambda h: tuple(bytes.fromhex(h[1:]))  # noqa: E731
        checks = (
            ("changed", hexrgb(colours["crop → urban"])),
            ("crop", hexrgb(colours["no change"])),
            ("cloud1", AREA.colour("crop")),  # no change value there: the map below shows
        )
        for probe, want in checks:
            got = shot.getpixel(_screen(page, AREA, *AREA.pixel(probe)))
            assert _near(got, want), (probe, got, want)
        change_legend = [t.strip() for t in page.locator("#legend-change li").all_inner_texts()]
        assert change_legend == ["no change", "crop → urban"]
        _toggle(page, ids[("change", p1)], False)

        # two periods side by side: the later on the left, the earlier on the right
        page.select_option("#compare", p0)
        _wait(page)
        assert page.locator("#map-compare").is_visible()
        _fit(page, AREA)  # on the left map; the right one follows
        shot = _shot(page, tmp_path / "4-side.png")
        left = _screen(page, AREA, *AREA.pixel("changed"))
        right = _screen(page, AREA, *AREA.pixel("changed"), which="relaymapCompare")
        assert right[0] > left[0] + 200  # the same place, on the other map
        assert _near(shot.getpixel(left), AREA.colour("urban"))
        assert _near(shot.getpixel(right), AREA.colour("crop"))
        assert _is_hatch(
            shot.getpixel(_screen(page, AREA, *AREA.pixel("cloud1"), "relaymapCompare"))
        )
        badges = page.locator(".badge").all_inner_texts()
        assert badges == [p1, p0]

        # swipe: both maps over each other, the earlier one right of the handle
        page.check('input[name="mode"][value="swipe"]')
        _wait(page)
        _fit(page, AREA)
        shot = _shot(page, tmp_path / "5-swipe.png")
        handle = page.evaluate(
            """() => {
                const r = document.getElementById("map").getBoundingClientRect();
                return r.left + r.width * document.getElementById("swipe").value / 100;
            }"""
        )
        cloud1, changed = (_screen(page, AREA, *AREA.pixel(p)) for p in ("cloud1", "changed"))
        assert cloud1[0] < handle < changed[0]
        assert _near(shot.getpixel(cloud1), AREA.colour("crop"))  # left: the later period
        assert _near(shot.getpixel(changed), AREA.colour("crop"))  # right: the earlier one
        page.evaluate(
            """() => {
                const s = document.getElementById("swipe");
                s.value = 100;
                s.dispatchEvent(new Event("input"));
            }"""
        )
        _wait(page)
        shot = _shot(page, tmp_path / "6-swiped.png")
        assert _near(shot.getpixel(changed), AREA.colour("urban"))  # all the later period

        # back to one period: a scene map's date
        page.select_option("#compare", "")
        page.select_option("#period", "2024-06-15")
        _wait(page)
        assert not page.locator("#map-compare").is_visible()
        _fit(page, MAP_A)
        shot = _shot(page, tmp_path / "7-scene.png")
        for name, row, col in MAP_A.probes:
            got = shot.getpixel(_screen(page, MAP_A, row, col))
            assert _near(got, MAP_A.colour(name)) if name != "nodata" else _is_hatch(got), name
        legend = [t.strip() for t in page.locator("#legend li").all_inner_texts()]
        assert legend == ["crop", "water"]

        # click: the class name and the coordinates
        lon, lat = MAP_A.lonlat(80, 192)
        page.mouse.click(*_screen(page, MAP_A, 80, 192))
        page.wait_for_function("document.getElementById('info').dataset.done === '1'")
        info = page.locator("#info").inner_text()
        assert info.startswith("water (class 1)"), info
        shown = info.splitlines()[1].replace(",", "").split()  # lon X lat Y
        assert abs(float(shown[1]) - lon) < 2e-4 and abs(float(shown[3]) - lat) < 2e-4
        page.evaluate("document.querySelectorAll('.maplibregl-popup').forEach(p => p.remove())")

        # opacity 50%: red over the stripes of the map's footprint
        page.evaluate(
            """(id) => {
                const s = document.querySelector(`input.opacity[data-map="${id}"]`);
                s.value = 50;
                s.dispatchEvent(new Event("input"));
            }""",
            MAP_A.item_id,
        )
        _wait(page)
        got = _shot(page, tmp_path / "8-opacity.png").getpixel(_screen(page, MAP_A, 80, 64))
        halves = [
            tuple(0.5 * r + 0.5 * h for r, h in zip((255, 0, 0), c, strict=True)) for c in HATCH
        ]
        low, high = np.min(halves, axis=0) - 8, np.max(halves, axis=0) + 8  # a stripe or its edge
        assert all(lo <= g <= hi for g, lo, hi in zip(got, low, high, strict=True)), (got, halves)

        # toggle off: the map and its footprint's stripes are gone
        _toggle(page, MAP_A.item_id, False)
        got = _shot(page, tmp_path / "9-off.png").getpixel(_screen(page, MAP_A, 80, 64))
        assert _near(got, BACKGROUND, 4), got
        assert page.errors == []


@pytest.mark.slow
def test_webmap_base_map(catalog, tmp_path):
    """With --basemap (an XYZ URL, here a loopback tile server of one colour) the base map
    shows around the maps, with its attribution; nodata inside a map stays striped."""
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
    try:
        args = ("--basemap", xyz, "--attribution", "Test tiles")
        with (
            _serving(str(catalog), tmp_path / "serve.log", *args) as url,
            _browser_page(url) as page,
        ):
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
    finally:
        tiles.shutdown()
