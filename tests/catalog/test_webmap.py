"""The web map: ``relaymap serve`` on a real catalog of class COGs (EPSG:32633), checked over
HTTP and in Debian's Chromium (WebGL through SwiftShader), driven by Playwright."""

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
from relaymap.flows.cog import NODATA, palette, to_cog
from relaymap.flows.serve import serve

CRS = "EPSG:32633"
SIDE_PX, RES_M = 256, 10.0
#: The page's background (``webmap.js``): what nodata and hidden maps show.
BACKGROUND = (0xE8, 0xE8, 0xE8)
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
        transform=from_origin(spec.x0_m, spec.y0_m, RES_M, RES_M),
        nodata=NODATA,
    ) as dst:
        dst.write(spec.raster()[None])
        dst.write_colormap(1, palette(spec.classes))
    to_cog(str(scratch), str(path))
    scratch.unlink()


def _make_catalog(root: Path) -> Path:
    """A static catalog with MAP_A and MAP_B (and a COG that is not in it, ``secret.tif``)."""
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
def _serving(catalog: str, log_path: Path) -> Iterator[str]:
    """``relaymap serve CATALOG --port P`` as a subprocess; yields its URL."""
    port = free_port()
    log = open(log_path, "wb")  # noqa: SIM115  (kept open while it runs)
    proc = subprocess.Popen(
        [*_serve_command(), catalog, "--port", str(port)], stdout=log, stderr=log
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
        assert [m["id"] for m in maps] == [MAP_A.item_id, MAP_B.item_id]
        assert _tile_pixel(url, MAP_A.item_id, *MAP_A.lonlat(80, 64)) == (255, 0, 0, 255)


@pytest.mark.slow
def test_browser(server, tmp_path):
    """The page in headless Chromium: tiles drawn in the class colours at the right places,
    legend, click query, period selector, opacity and toggle."""
    from playwright.sync_api import sync_playwright

    from tests.services import ensure_chromium

    timeout_ms = 180_000  # generous: a busy 2-core machine renders WebGL in software
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(ensure_chromium()), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server + "/")
            ready = "window.relaymapReady === true"
            page.wait_for_function(ready, timeout=timeout_ms)

            def screen_xy(spec: MapSpec, row: int, col: int) -> tuple[int, int]:
                lon, lat = spec.lonlat(row, col)
                return tuple(
                    page.evaluate(
                        """([lon, lat]) => {
                            const m = window.relaymapMap;
                            const r = m.getContainer().getBoundingClientRect();
                            const p = m.project([lon, lat]);
                            return [Math.round(r.left + p.x), Math.round(r.top + p.y)];
                        }""",
                        [lon, lat],
                    )
                )

            def pixels(name: str) -> Image.Image:
                path = tmp_path / f"{name}.png"
                page.screenshot(path=str(path))
                return Image.open(path).convert("RGB")

            def near(got: tuple, want: tuple, tol: int = 4) -> bool:
                return all(abs(g - w) <= tol for g, w in zip(got, want, strict=True))

            shot = pixels("webmap")
            for spec in (MAP_A, MAP_B):
                for name, row, col in spec.probes:
                    got = shot.getpixel(screen_xy(spec, row, col))
                    want = spec.colour(name) or BACKGROUND
                    assert near(got, want), (spec.item_id, name, got, want)
            legend = page.locator("#legend li").all_inner_texts()
            assert [t.strip() for t in legend] == ["crop", "water", "forest", "town"]

            # click: the class name and the coordinates
            lon, lat = MAP_A.lonlat(80, 192)
            page.mouse.click(*screen_xy(MAP_A, 80, 192))
            page.wait_for_function("document.getElementById('info').dataset.done === '1'")
            info = page.locator("#info").inner_text()
            assert info.startswith("water (class 1)"), info
            shown = info.splitlines()[1].replace(",", "").split()  # lon X lat Y
            assert abs(float(shown[1]) - lon) < 2e-4 and abs(float(shown[3]) - lat) < 2e-4
            page.evaluate("document.querySelectorAll('.maplibregl-popup').forEach(p => p.remove())")

            # period selector: only A's period, so B is hidden and off the legend
            page.select_option("#period", "2024-06-15")
            page.wait_for_function(ready, timeout=timeout_ms)
            shot = pixels("period")
            assert near(shot.getpixel(screen_xy(MAP_B, 64, 128)), BACKGROUND)
            assert near(shot.getpixel(screen_xy(MAP_A, 80, 64)), (255, 0, 0))
            legend = page.locator("#legend li").all_inner_texts()
            assert [t.strip() for t in legend] == ["crop", "water"]
            assert page.locator(".model-group:not([hidden])").count() == 1

            # opacity 50%: red over the background
            page.evaluate(
                """(id) => {
                    const s = document.querySelector(`input.opacity[data-map="${id}"]`);
                    s.value = 50;
                    s.dispatchEvent(new Event("input"));
                }""",
                MAP_A.item_id,
            )
            page.wait_for_function(ready, timeout=timeout_ms)
            half = tuple(0.5 * c + 0.5 * bg for c, bg in zip((255, 0, 0), BACKGROUND, strict=True))
            got = pixels("opacity").getpixel(screen_xy(MAP_A, 80, 64))
            assert near(got, half, tol=8), (got, half)

            # toggle off: the background shows
            page.locator(f'input.toggle[data-map="{MAP_A.item_id}"]').uncheck()
            page.wait_for_function(ready, timeout=timeout_ms)
            assert near(pixels("toggle").getpixel(screen_xy(MAP_A, 80, 64)), BACKGROUND)
            assert errors == []
        finally:
            browser.close()
