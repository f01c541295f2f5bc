"""Published STAC items as the tests' sources: real item JSON from public catalogs
(``tests/data/published/``, each citing where it was found), with pixels synthesised at the
declared dtypes on the declared grids and only the hrefs changed to point at them.

:func:`synthesise` writes, for one item, the assets a map needs over a window of the
item's own pixel grids (a grid cell and its margin, inside the footprint), from a known
land cover and known clouds, and returns the item with its hrefs changed and what the
composite must equal. :class:`PlanetaryComputerStandIn` is a local stand-in for Planetary
Computer's token service and Azure Blob Storage: unsigned reads are refused (403), as
Azure refuses them.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import json
import math
import os
import socket
import struct
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pystac
import rasterio
from affine import Affine
from odc.geo.geom import Geometry, box

from relaymap.ingest.profiles import ReadOptions, plan_read
from relaymap.ingest.sample import CLASSES
from tests.services import environ

DATA = Path(__file__).with_name("data") / "published"
BANDS = ("blue", "green", "red", "nir")


def collection_of(item: pystac.Item, description: str) -> pystac.Collection:
    """The collection a STAC API serves ``item`` in: its id, extent and footprint."""
    extent = pystac.Extent(
        pystac.SpatialExtent([item.bbox]), pystac.TemporalExtent([[item.datetime, None]])
    )
    return pystac.Collection(item.collection_id, description, extent, license="other")


def published(name: str) -> dict:
    """The item JSON of ``tests/data/published/<name>.json`` (its ``source`` cites it)."""
    doc = json.loads((DATA / f"{name}.json").read_text())
    assert {"repository", "path", "commit"} <= set(doc["source"]), name
    return doc["item"]


def item_epsg(item: dict) -> int:
    props = item["properties"]
    code = props.get("proj:epsg") or int(str(props["proj:code"]).split(":")[1])
    return int(code)


def asset_transform(item: dict, key: str) -> Affine:
    """The declared grid of an asset (its own ``proj:transform``, else the item's)."""
    t = item["assets"][key].get("proj:transform") or item["properties"]["proj:transform"]
    return Affine(*t[:6])


def cell_inside(item: dict, res: float, cell_px: int, margin_px: int) -> tuple[float, float]:
    """Top-left ``(x, y)`` (item CRS) of a grid cell (anchored at the CRS origin, as the
    area job's grid) that lies, with ``margin_px`` around it, inside the item's footprint."""
    crs = f"EPSG:{item_epsg(item)}"
    footprint = Geometry(item["geometry"], "EPSG:4326").to_crs(crs)
    side = cell_px * res
    x, y = footprint.centroid.coords[0]
    pad = margin_px * res
    for r in range(0, 40):  # spiral out from the centroid, a cell at a time
        for dx in range(-r, r + 1):
            for dy in range(-r, r + 1):
                if max(abs(dx), abs(dy)) != r:
                    continue
                x0 = (math.floor(x / side) + dx) * side
                y1 = (math.floor(y / side) + 1 + dy) * side
                padded = box(x0 - pad, y1 - side - pad, x0 + side + pad, y1 + pad, crs)
                if footprint.contains(padded):
                    return x0, y1
    raise AssertionError(f"no {cell_px} px cell with a {margin_px} px margin inside {item['id']}")


def area_geojson(x0: float, y1: float, side_m: float, epsg: int) -> str:
    """The cell as a GeoJSON polygon in its CRS, inset by a metre."""
    a, b, c, d = x0 + 1, y1 - side_m + 1, x0 + side_m - 1, y1 - 1
    crs = {"type": "name", "properties": {"name": f"EPSG:{epsg}"}}
    ring = [[a, b], [c, b], [c, d], [a, d], [a, b]]
    return json.dumps({"type": "Polygon", "coordinates": [ring], "crs": crs})


@dataclass(frozen=True)
class Truth:
    """A known land cover and known clouds, as functions of position (item CRS)."""

    #: Land-cover class index per ``cell_m`` square, tiled from ``origin`` (y, x order).
    layout: np.ndarray
    origin: tuple[float, float]
    cell_m: float
    #: Cloud discs: ``(x, y, radius)`` in CRS units.
    clouds: tuple[tuple[float, float, float], ...]

    def classes_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        ix = np.floor((xs - self.origin[0]) / self.cell_m).astype(int) % self.layout.shape[1]
        iy = np.floor((self.origin[1] - ys) / self.cell_m).astype(int) % self.layout.shape[0]
        return self.layout[iy, ix]

    def cloudy_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), bool)
        for cx, cy, r in self.clouds:
            out |= (xs - cx) ** 2 + (ys - cy) ** 2 < r * r
        return out

    def reflectance(self, band: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Surface reflectance of ``band`` (sample classes' values x 1e-4)."""
        return reflectance_of(band)[self.classes_at(xs, ys)]


def reflectance_of(band: str) -> np.ndarray:
    """Each sample class's surface reflectance in ``band``."""
    i = BANDS.index(band)
    return np.array([c.reflectance[i] * 1e-4 for c in CLASSES])


def make_truth(x0: float, y1: float, side_m: float, seed: int = 0) -> Truth:
    """Blocks of land cover (120 m squares) and two clouds over a cell at ``(x0, y1)``."""
    rng = np.random.default_rng(seed)
    layout = rng.integers(0, len(CLASSES), size=(16, 16))
    clouds = ((x0 + 0.3 * side_m, y1 - 0.35 * side_m, 0.12 * side_m),
              (x0 + 0.75 * side_m, y1 - 0.7 * side_m, 0.08 * side_m))  # fmt: skip
    return Truth(layout, (x0, y1), 120.0, clouds)


def pixel_centres(transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pixel centres of a north-up grid as a row ``(1, W)`` of x and a column ``(H, 1)``
    of y, which broadcast to the grid (a 0.6 m scene is tens of millions of pixels)."""
    xs = transform.c + (np.arange(shape[1])[None, :] + 0.5) * transform.a
    ys = transform.f + (np.arange(shape[0])[:, None] + 0.5) * transform.e
    return xs, ys


def _window(transform: Affine, bounds: Sequence[float]) -> tuple[Affine, tuple[int, int]]:
    """The part of a declared grid that covers ``bounds``: its transform and shape."""
    res = transform.a
    c0 = math.floor((bounds[0] - transform.c) / res)
    c1 = math.ceil((bounds[2] - transform.c) / res)
    r0 = math.floor((transform.f - bounds[3]) / res)
    r1 = math.ceil((transform.f - bounds[1]) / res)
    return transform * Affine.translation(c0, r0), (r1 - r0, c1 - c0)


def _write(path: Path, data: np.ndarray, transform: Affine, epsg: int, dtype: str, nodata) -> None:
    data = data if data.ndim == 3 else data[None]
    with rasterio.open(
        path, "w", driver="COG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=dtype, crs=f"EPSG:{epsg}", transform=transform, nodata=nodata,
        num_threads="all_cpus",
    ) as dst:  # fmt: skip
        dst.write(data.astype(dtype))


def synthesise(
    item_json: dict,
    folder: Path,
    truth: Truth,
    bounds: Sequence[float],
    *,
    href: str | None = None,
    dn: bool = False,
    read: ReadOptions | None = None,
) -> pystac.Item:
    """Write the assets a 4-band map reads from this item (its bands as its profile finds
    them, and its mask) over ``bounds`` (item CRS), at each asset's declared grid and data
    type, from ``truth``; return the item with only those hrefs changed.

    Band values are ``(reflectance - offset) / scale`` with the scale and offset the item's
    profile applies (``dn``: raw counts x 10000 although the metadata says otherwise: a
    source without its scale). Clouds are written into the mask asset as its rule reads
    them. ``href`` (``file://{path}`` by default) turns a file path into the href written.
    """
    item = pystac.Item.from_dict(json.loads(json.dumps(item_json)), migrate=False)
    epsg = item_epsg(item_json)
    plan = plan_read(item, BANDS, read)
    folder.mkdir(parents=True, exist_ok=True)
    by_asset: dict[str, list] = {}
    for b in plan.bands:
        by_asset.setdefault(b.asset, []).append(b)
    for key, reads in by_asset.items():
        transform, shape = _window(asset_transform(item_json, key), bounds)
        classes = truth.classes_at(*pixel_centres(transform, shape))
        meta = (item.assets[key].extra_fields.get("raster:bands") or [{}])[0]
        dtype = meta.get("data_type", "uint16")
        count = max(len(item.assets[key].extra_fields.get("eo:bands") or []), 1)
        data = np.zeros((count, *shape), dtype)
        for b in reads:  # the stored value of each class, then looked up per pixel
            refl = reflectance_of(b.band)
            data[b.index] = np.round(refl * 1e4 if dn else (refl - b.offset) / b.scale)[classes]
        path = folder / f"{item.id}-{key}.tif"
        _write(path, data, transform, epsg, dtype, meta.get("nodata"))
        item.assets[key].href = href(path) if href else f"file://{path}"
    if plan.mask_asset is not None:
        key, rule = plan.mask_asset, plan.mask
        transform, shape = _window(asset_transform(item_json, key), bounds)
        xs, ys = pixel_centres(transform, shape)
        cloudy = truth.cloudy_at(xs, ys)
        # class values: clear vegetation 4, cloud high probability 9; or bit flags: clear
        # (bit 6), or cloud (bit 3) and dilated cloud (bit 1)
        clear, cloud = (4, 9) if rule.values else (1 << 6, (1 << 3) | (1 << 1))
        mask = np.where(cloudy, cloud, clear)
        meta = (item.assets[key].extra_fields.get("raster:bands") or [{}])[0]
        dtype = meta.get("data_type", "uint8")
        path = folder / f"{item.id}-{key}.tif"
        _write(path, mask, transform, epsg, dtype, meta.get("nodata"))
        item.assets[key].href = href(path) if href else f"file://{path}"
    return item


def expected(truth: Truth, item_json: dict, transform: Affine, shape, mask_key: str | None):
    """What the composite on a grid must hold: ``(band, y, x)`` reflectance, NaN under the
    clouds as the mask asset's own pixels carry them (read by the nearest pixel)."""
    xs, ys = pixel_centres(transform, shape)
    values = np.stack([truth.reflectance(b, xs, ys) for b in BANDS]).astype(np.float32)
    if mask_key is not None:
        mt = asset_transform(item_json, mask_key)
        # the centre of the mask pixel each output pixel falls in
        mx = mt.c + (np.floor((xs - mt.c) / mt.a) + 0.5) * mt.a
        my = mt.f + (np.floor((ys - mt.f) / mt.e) + 0.5) * mt.e
        values[:, truth.cloudy_at(mx, my)] = np.nan
    return values


class PlanetaryComputerStandIn:
    """Planetary Computer's SAS token service and Azure Blob Storage, on loopback.

    Tokens come from ``/api/sas/v1/token/<account>/<container>`` (as the real service
    answers); blob reads arrive as HTTP proxy requests for
    ``http://<account>.blob.core.windows.net/<container>/<path>`` (GDAL's
    ``GDAL_HTTP_PROXY``) and are served from ``root`` only when signed with a token this
    service issued (403 otherwise, as Azure does), or, unsigned, from a ``public``
    container (as a public copy or one's own storage would be). ``requests`` counts what
    was asked, ``tokens`` the token requests per ``account/container``.
    """

    SIG = "sig=relaymap-test-signature"

    def __init__(self, root: Path, public: Sequence[str] = ()) -> None:
        self.root = root
        self.public = set(public)
        self.requests = {"token": 0, "signed": 0, "unsigned": 0}
        self.tokens: collections.Counter[str] = collections.Counter()
        self.prefix = "root-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]

    def href(self, path: Path) -> str:
        """The blob URL of a file under ``root`` (account ``teststorage``, a container).

        Its path holds a prefix of ``root`` after the container: stand-ins of two roots never
        serve different files at one URL, so a process's GDAL cache of what an earlier
        one served (an earlier test's) is never read as this one's, and ``requests`` count
        every read."""
        container, _, rest = path.relative_to(self.root).as_posix().partition("/")
        return f"http://teststorage.blob.core.windows.net/{container}/{self.prefix}/{rest}"

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, str]]:
        """Serve; yield the environment a process needs to use it."""
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path.startswith("/api/sas/v1/token/"):
                    stand_in.requests["token"] += 1
                    stand_in.tokens[url.path.removeprefix("/api/sas/v1/token/")] += 1
                    doc = {
                        "msft:expiry": "2099-01-01T00:00:00Z",
                        "token": f"se=2099&{stand_in.SIG}",
                    }
                    return self._send(200, json.dumps(doc).encode(), body)
                signed = stand_in.SIG in url.query
                stand_in.requests["signed" if signed else "unsigned"] += 1
                container, _, rest = url.path.lstrip("/").partition("/")
                prefix, _, rest = rest.partition("/")
                if not signed and container not in stand_in.public:
                    return self._send(403, b"AuthenticationFailed", body)
                path = stand_in.root / container / rest
                if prefix != stand_in.prefix or not path.is_file():
                    return self._send(404, b"BlobNotFound", body)
                rng = self.headers.get("Range")
                with path.open("rb") as f:  # only the bytes asked for: GDAL asks many ranges
                    size = os.fstat(f.fileno()).st_size
                    if not rng:
                        return self._send(200, f.read(), body)
                    a, _, b = rng.removeprefix("bytes=").partition("-")
                    a, b = int(a), min(int(b or size - 1), size - 1)
                    f.seek(a)
                    data = f.read(b - a + 1)
                extra = {"Content-Range": f"bytes {a}-{b}/{size}"}
                return self._send(206, data, body, extra)

            def _send(self, code: int, data: bytes, body: bool, extra=None) -> None:
                self.send_response(code)
                for k, v in {"Content-Length": str(len(data)), "Accept-Ranges": "bytes",
                             **(extra or {})}.items():  # fmt: skip
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

            def log_message(self, *args) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.server_address[1]
        env = {
            "PC_SDK_SAS_URL": f"http://127.0.0.1:{port}/api/sas/v1/token",
            "GDAL_HTTP_PROXY": f"127.0.0.1:{port}",
        }
        try:
            with environ(env):
                _forget_settings()
                yield env
        finally:
            server.shutdown()
            server.server_close()
            _forget_settings()


class TokenServiceDown:
    """A token service that cannot give a token, on loopback: it accepts connections, then
    with ``stall`` never answers (as a dead proxy or a black-holed route), with ``reset``
    closes them at once (as a refused connection), with ``refuse`` answers HTTP 401 (as to
    a bad subscription key). ``connections`` counts the tries that reached it."""

    def __init__(self, behaviour: str = "stall") -> None:
        assert behaviour in ("stall", "reset", "refuse")
        self.behaviour = behaviour
        self.connections = 0

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, str]]:
        """Serve; yield (and set) the environment that points the signer at it."""
        server = socket.create_server(("127.0.0.1", 0))
        held: list[socket.socket] = []
        done = threading.Event()

        def accept() -> None:
            server.settimeout(0.1)
            while not done.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                self.connections += 1
                if self.behaviour == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                elif self.behaviour == "refuse":
                    conn.settimeout(5)
                    conn.recv(65536)  # the request (small: one GET)
                    conn.sendall(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                    conn.close()
                else:
                    held.append(conn)  # open, silent

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        port = server.getsockname()[1]
        env = {"PC_SDK_SAS_URL": f"http://127.0.0.1:{port}/api/sas/v1/token"}
        try:
            with environ(env):
                _forget_settings()
                yield env
        finally:
            done.set()
            thread.join()
            server.close()
            for conn in held:
                conn.close()
            _forget_settings()


def _forget_settings() -> None:
    """planetary-computer reads its settings once per process and caches tokens: this
    process's tests start and stop a token service of their own."""
    import planetary_computer.sas
    import planetary_computer.settings

    planetary_computer.settings.Settings.get.cache_clear()
    planetary_computer.sas.TOKEN_CACHE.clear()
