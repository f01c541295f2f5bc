"""Map and model items; static catalogs (file and S3) and a STAC API (pgstac)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pystac_client
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from safetensors.torch import save_file

from relay_models import ClassSpec, DataSpec
from relaymap.catalog import ItemNotFound, StacApiCatalog, StaticCatalog, map_item, model_item
from relaymap.catalog.storage import atomic_upload, read_bytes
from relaymap.ingest.load import rio_env

CLASSES = [
    {"index": i, "name": n, "color_hint": c}
    for i, (n, c) in enumerate([("water", "2B6FD3"), ("trees", "1F6F2B"), ("town", None)])
]


def _write_map(url: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 3, (1, 300, 300), dtype=np.uint8)
    data[:, :10] = 255
    prof = dict(
        driver="COG",
        width=300,
        height=300,
        count=1,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500000, 4800000, 10, 10),
        nodata=255,
    )
    with atomic_upload(url, suffix=".tif") as tmp, rasterio.open(tmp, "w", **prof) as dst:
        dst.write(data)


#: ``(role, store URL, source item ids, self hrefs)``: a store whose sources are known, one
#: that knows one of two, and one from before stores recorded hrefs.
TRAINING_DATA = [
    ("training", "s3://bucket/scenes/a.zarr", ["S2A_1"]),
    ("training", "s3://bucket/scenes/b.zarr", ["S2A_1", "S2B_2"]),
    ("training", "s3://bucket/scenes/a.zarr", ["S2A_1"]),  # listed twice, linked once
    ("validation", "s3://bucket/scenes/c.zarr", ["S2A_3"]),
]


def _model(tmp_path, hyperparameters=None):
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(4.0)}, weights)
    return model_item(
        str(weights),
        item_id="relay-v1",
        collection="relaymap-models",
        model_name="swinv2_nano_relay",
        architecture="Swin V2 + relay tokens",
        spec=DataSpec(
            bands=("blue", "green", "red", "nir"),
            mean=(0.1, 0.1, 0.1, 0.3),
            std=(0.02, 0.03, 0.04, 0.1),
            classes=tuple(ClassSpec(value=c["index"], **c) for c in CLASSES),
            window_px=64,
            factor=4,
        ),
        total_parameters=4_969_896,
        hyperparameters=hyperparameters or {"lr": 1e-4},
        metrics={"val_miou": 0.61},
        training_data=TRAINING_DATA,
    )


@pytest.fixture
def model(tmp_path):
    return _model(tmp_path)


def _map(url, sample, model, item_id="map-sample-00"):
    _write_map(url)
    return map_item(
        url,
        item_id=item_id,
        collection="relaymap-maps",
        classes=CLASSES,
        sources=[(it.id, it.get_self_href()) for it in list(sample.get_items())[:1]],
        model_item=model,
        datetime=next(sample.get_items()).datetime,
    )


class TestItems:
    def test_map_item_fields(self, tmp_path, sample_local, model):
        url = str(tmp_path / "map.tif")
        item = _map(url, sample_local, model)
        p = item.properties
        assert p["proj:code"] == "EPSG:32633" and p["proj:shape"] == [300, 300]
        assert p["proj:transform"] == [10.0, 0.0, 500000.0, 0.0, -10.0, 4800000.0]
        assert p["proj:bbox"] == [500000.0, 4797000.0, 503000.0, 4800000.0]
        assert p["processing:level"] == "L4" and "relaymap" in p["processing:software"]
        asset = item.assets["classes"].to_dict()
        assert asset["raster:bands"] == [
            {"nodata": 255.0, "data_type": "uint8", "spatial_resolution": 10.0}
        ]
        assert [c["name"] for c in asset["classification:classes"]] == ["water", "trees", "town"]
        blob = Path(url).read_bytes()
        assert asset["file:size"] == len(blob)
        assert asset["file:checksum"] == "1220" + hashlib.sha256(blob).hexdigest()
        derived = [ln.target for ln in item.links if ln.rel == "derived_from"]
        src = next(iter(sample_local.get_items()))
        assert derived == [src.get_self_href(), model.id]
        lon, lat = item.bbox[0], item.bbox[1]
        assert 14.9 < lon < 15.1 and 43.2 < lat < 43.4  # UTM 33N near 500 km E, 4800 km N

    def test_model_item_follows_mlm(self, model):
        p = model.properties
        assert p["mlm:name"] == "swinv2_nano_relay"
        assert p["mlm:tasks"] == ["semantic-segmentation"]
        assert [i["name"] for i in p["mlm:input"]] == ["local", "global"]
        assert p["mlm:input"][0]["input"]["shape"] == [-1, 4, 64, 64]
        assert [v["stddev"] for v in p["mlm:input"][0]["value_scaling"]] == [0.02, 0.03, 0.04, 0.1]
        assert [c["name"] for c in p["mlm:output"][0]["classification:classes"]] == [
            "water",
            "trees",
            "town",
        ]
        assert p["mlm:input"][1]["description"].startswith("256 px window")
        out = p["mlm:output"][0]
        assert out["result"]["shape"] == [-1, 3, 64, 64] and out["description"]
        assert out["classification:classes"][0] == {
            "value": 0,
            "name": "water",
            "description": "water",
            "color_hint": "2B6FD3",
        }
        assert p["mlm:framework"] == "pytorch" and p["mlm:framework_version"]
        assert p["mlm:accelerator"] is None and p["mlm:accelerator_constrained"] is False
        assert p["mlm:total_parameters"] == 4_969_896
        assert p["mlm:hyperparameters"] == {"lr": 1e-4}
        assert p["mlm:pretrained"] is False and p["mlm:pretrained_source"] is None
        assert p["relaymap:metrics"] == {"val_miou": 0.61}
        weights = model.assets["weights"].to_dict()
        assert "mlm:model" in weights["roles"] and weights["file:checksum"].startswith("1220")
        assert weights["mlm:artifact_type"] == "safetensors.torch.save_file"
        assert [b["name"] for b in weights["eo:bands"]] == ["blue", "green", "red", "nir"]
        assert "https://stac-extensions.github.io/mlm/v1.5.2/schema.json" in model.stac_extensions

    def test_model_item_links_its_training_data(self, model):
        """The scene stores it learnt from (lasting as the run does), each once, with their
        source items named."""
        links = [(ln.target, ln.media_type, ln.title) for ln in model.links]
        assert all(ln.rel == "derived_from" for ln in model.links)
        assert links == [
            (
                "s3://bucket/scenes/a.zarr",
                "application/vnd+zarr",
                "training data: scene store of S2A_1",
            ),
            (
                "s3://bucket/scenes/b.zarr",
                "application/vnd+zarr",
                "training data: scene store of S2A_1, S2B_2",
            ),
            (
                "s3://bucket/scenes/c.zarr",
                "application/vnd+zarr",
                "validation data: scene store of S2A_3",
            ),
        ]

    @pytest.mark.parametrize("pretrained", [False, True])
    def test_model_item_is_valid_mlm(self, tmp_path, pretrained):
        """The item, as a static catalog stores it, validates against MLM 1.5.2 (and core,
        eo, file, processing), offline."""
        from tests.stac_validate import validate_tree

        model = _model(tmp_path, hyperparameters={"lr": 1e-4, "pretrained": pretrained})
        p = model.properties
        assert p["mlm:pretrained"] is pretrained
        # from scratch: an explicit null source; pretrained: the source may be omitted
        assert ("mlm:pretrained_source" in p) is not pretrained
        StaticCatalog(str(tmp_path / "catalog")).add_items([model])
        assert validate_tree(tmp_path / "catalog") == []
        del model.assets["weights"].extra_fields["eo:bands"]  # the schema is really checked
        StaticCatalog(str(tmp_path / "bad")).add_items([model])
        assert any("mlm" in e for e in validate_tree(tmp_path / "bad"))


@pytest.mark.parametrize("where", ["file", "s3"])
class TestStaticCatalog:
    def test_upsert_get_search_and_serve(self, where, tmp_path, sample_local, model, s3):
        root = str(tmp_path / "catalog") if where == "file" else "s3://relaymap-test/catalog"
        cog = (
            str(tmp_path / "maps" / "m.tif") if where == "file" else "s3://relaymap-test/maps/m.tif"
        )
        cat = StaticCatalog(root)
        item = _map(cog, sample_local, model)
        cat.add_items([model, item])
        cat.add_items([item])  # rerun: replaced, not duplicated
        assert cat.collection_ids() == ["relaymap-maps", "relaymap-models"]
        assert [i.id for i in cat.search(collections=["relaymap-maps"])] == [item.id]
        got = cat.get_item("relaymap-maps", item.id)
        assert (
            got.assets["classes"].extra_fields["file:checksum"]
            == item.assets["classes"].extra_fields["file:checksum"]
        )
        assert cat.search(collections=["relaymap-maps"], bbox=[0, 0, 1, 1]) == []
        assert [
            i.id
            for i in cat.search(datetime="2024-06-01/2024-06-30", collections=["relaymap-maps"])
        ] == [item.id]
        with pytest.raises(ItemNotFound):
            cat.get_item("relaymap-maps", "nope")
        col = json.loads(read_bytes(f"{root}/relaymap-maps/collection.json"))
        assert [ln["href"].rsplit("/", 1)[-1] for ln in col["links"] if ln["rel"] == "item"] == [
            f"{item.id}.json"
        ]
        with cat.serve() as api:
            found = list(
                pystac_client.Client.open(api)
                .search(collections=["relaymap-maps"], bbox=item.bbox)
                .items()
            )
        assert [f.id for f in found] == [item.id]
        with rio_env(), rasterio.open(found[0].assets["classes"].href) as src:
            assert src.crs.to_epsg() == 32633 and src.nodata == 255
            assert src.read(1)[:, :10].max() == 255


@pytest.mark.slow
def test_stac_api_with_transactions(tmp_path, sample_local, model):
    """stac-fastapi-pgstac on a real PostgreSQL/PostGIS, installed by the test setup."""
    from tests.services import pgstac_api

    venv = Path(__file__).resolve().parents[2] / ".cache" / "pgstac-venv"
    with pgstac_api(venv) as url:
        cat = StacApiCatalog(url)
        item = _map(str(tmp_path / "m.tif"), sample_local, model)
        cat.add_items([model, item])
        cat.add_items([item])
        assert [i.id for i in cat.search(collections=["relaymap-maps"])] == [item.id]
        assert (
            cat.get_item("relaymap-models", model.id).properties["mlm:name"] == "swinv2_nano_relay"
        )
        with pytest.raises(ItemNotFound):
            cat.get_item("relaymap-maps", "missing")
        found = list(
            pystac_client.Client.open(url)
            .search(collections=["relaymap-maps"], bbox=item.bbox)
            .items()
        )
        assert [f.id for f in found] == [item.id]


@pytest.mark.parametrize("where", ["file", "s3"])
def test_concurrent_writers_lose_no_link(tmp_path, where, request, monkeypatch):
    """Two writers add items to one collection at once, 40 times, with latency injected
    into every write and listing (0-20 ms on files, where those take well under 1 ms;
    0-100 ms on S3): every item keeps its link, every collection its child link. (The
    latency only widens the races; the check holds for any interleaving.)"""
    import random
    import threading

    import pystac

    import relaymap.catalog.backends as backends

    if where == "s3":
        request.getfixturevalue("s3")
    rng = random.Random(0)
    lock = threading.Lock()
    latency = 0.02 if where == "file" else 0.1

    def delay():
        with lock:
            d = rng.uniform(0, latency)
        time.sleep(d)

    real_write, real_ids = backends.atomic_write, backends.StaticCatalog._item_ids

    def slow_write(url, data):
        delay()
        real_write(url, data)

    def slow_ids(self, collection):
        delay()
        return real_ids(self, collection)

    monkeypatch.setattr(backends, "atomic_write", slow_write)
    monkeypatch.setattr(backends.StaticCatalog, "_item_ids", slow_ids)
    trials = 40 if where == "file" else 10
    for trial in range(trials):
        root = str(tmp_path / f"c{trial}") if where == "file" else f"s3://relaymap-test/cc{trial}"
        catalog = StaticCatalog(root)

        def add(i, cid="maps", trial=trial, root=root):
            item = pystac.Item(
                f"item-{i}",
                {"type": "Point", "coordinates": [15.0, 43.0]},
                [15.0, 43.0, 15.0, 43.0],
                dt.datetime(2024, 1, 1),
                {},
                collection=f"{cid}-{i % 2}" if trial % 2 else cid,
            )
            StaticCatalog(root).add_items([item])

        writers = [threading.Thread(target=add, args=(i,)) for i in range(2)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        cols = catalog.collection_ids()
        root_doc = json.loads(read_bytes(f"{root}/catalog.json"))
        children = {
            ln["href"].rsplit("/", 2)[-2] for ln in root_doc["links"] if ln["rel"] == "child"
        }
        assert children == set(cols), f"trial {trial}: lost a child link"
        for cid in cols:
            doc = json.loads(read_bytes(catalog._collection_url(cid)))
            linked = {ln["href"].rsplit("/", 1)[-1] for ln in doc["links"] if ln["rel"] == "item"}
            assert linked == {f"{i}.json" for i in catalog._item_ids(cid)}, f"trial {trial}"
        assert sum(len(catalog._item_ids(c)) for c in cols) == 2


class _FlakyGateway:
    """A loopback HTTP gateway in front of a real STAC API that answers the first
    ``failures`` requests with 503 (as an overloaded load balancer does), then forwards.
    The fault injector: a real STAC API cannot be told to fail on demand."""

    def __init__(self, upstream: str, failures: int, status: int = 503) -> None:
        import http.server
        import threading

        import requests

        gateway = self
        self.seen: list[int] = []  # the status of every answer
        self.failed = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if gateway.failed < failures:
                    gateway.failed += 1
                    gateway.seen.append(status)
                    self.send_response(status)
                    self.end_headers()
                    return
                up = requests.get(upstream + self.path, timeout=30)
                gateway.seen.append(up.status_code)
                self.send_response(up.status_code)
                self.send_header("Content-Type", up.headers.get("Content-Type", "text/plain"))
                self.end_headers()
                self.wfile.write(up.content)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_transient_stac_api_errors_are_retried_permanent_ones_not(stac_api, monkeypatch):
    import relaymap.catalog.backends as backends

    monkeypatch.setattr(backends, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    flaky = _FlakyGateway(stac_api, failures=2)
    try:
        item = StacApiCatalog(flaky.url).get_item("relaymap-sample", "sample-01")
        assert item.id == "sample-01" and flaky.seen == [503, 503, 200]
        flaky.seen.clear()
        with pytest.raises(ItemNotFound):
            StacApiCatalog(flaky.url).get_item("relaymap-sample", "no-such-item")
        assert flaky.seen == [404]  # a permanent answer: asked once
    finally:
        flaky.close()
    down = _FlakyGateway(stac_api, failures=10)
    try:
        with pytest.raises(backends.CatalogError, match="HTTP 503"):
            backends.StacApiCatalog(down.url)._check(
                StacApiCatalog(down.url)._request("GET", "/collections/relaymap-sample"), "read"
            )
        assert down.seen == [503] * 4  # the first try and three retries
    finally:
        down.close()
