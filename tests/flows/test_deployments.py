"""Deployments as users run them: a real ``prefect server``, ``prefect deploy`` of
prefect.yaml, a process worker, a triggered run; and the demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio

from relaymap.catalog import StaticCatalog, serve_stac
from relaymap.flows.demo import CELL_PX

ROOT = Path(__file__).resolve().parents[2]


def _prefect(args, env, cwd=ROOT, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        env={**os.environ, **env, "COLUMNS": "250"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_deploy_prefect_yaml_and_run_a_flow_on_a_process_worker(tmp_path, sample_local):
    from tests.services import _stop, prefect_server

    home = tmp_path / "prefect"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    with prefect_server(home) as env:
        env = {**env, "RELAYMAP_WORKDIR": str(work)}
        made = _prefect(["work-pool", "create", "relaymap-process", "--type", "process"], env)
        assert made.returncode == 0, made.stdout + made.stderr
        deployed = _prefect(["--no-prompt", "deploy", "--all"], env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        listed = _prefect(["deployment", "ls"], env).stdout
        for name in (
            "ingest/ingest",
            "train/train",
            "infer/infer",
            "mapping-pipeline/monthly",
            "map-area/monthly-area",
        ):
            assert name in listed, listed
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "relaymap-process"],
            # it asks for scheduled runs every second, not every 10 s: the run starts sooner
            env={**os.environ, **env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            cwd=work,
            start_new_session=True,
            stdout=open(tmp_path / "worker.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        try:
            with serve_stac([sample_local]) as api:
                params = {
                    "params": {
                        "query": {"stac_api": api, "collections": [sample_local.id]},
                        "stores_url": str(tmp_path / "stores"),
                    }
                }
                run = _prefect(
                    [
                        "deployment",
                        "run",
                        "ingest/ingest",
                        "--params",
                        json.dumps(params),
                        "--watch",
                        "--watch-interval",
                        "1",
                        "--watch-timeout",
                        "240",
                    ],
                    env,
                    timeout=300,
                )
            log = (tmp_path / "worker.log").read_text()
            assert run.returncode == 0, run.stdout + run.stderr + log
            assert "Completed" in run.stdout
        finally:
            _stop(worker)
    stores = sorted(p.name for p in (tmp_path / "stores").iterdir())
    assert stores == [
        f"{it.id}.zarr" for it in sorted(sample_local.get_items(), key=lambda i: i.id)
    ]


@pytest.mark.slow
def test_demo_end_to_end_with_every_network_listener_on_loopback(tmp_path):
    """``relaymap demo`` in a fresh process (Prefect's ephemeral API, local Ray, a local
    STAC API). While its first cell is mapped (held there by a fault point), every TCP
    socket its process tree listens on is a loopback one: nothing it starts can be reached
    from the network."""
    from relaymap.catalog.faults import ENV, ONCE_FILE
    from tests.listeners import exposed, listeners, process_tree

    t0 = time.perf_counter()
    hold = tmp_path / "hold"
    demo = subprocess.Popen(
        ["relaymap", "demo", "--workdir", str(tmp_path / "demo"), "--steps", "20"],
        env={
            **os.environ,
            "PREFECT_HOME": str(tmp_path / "prefect"),
            ENV: "area:cell-uploaded=hold",
            ONCE_FILE: str(hold),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        while not (hold.exists() and hold.read_text()) and demo.poll() is None:
            # until a worker holds a cell (the file written with its pid)
            time.sleep(0.2)
        tree = process_tree(demo.pid)
        seen, outside = listeners(tree), exposed(tree)
    finally:
        hold.write_text("go")  # the worker goes on; the file stays: no later hold
    stdout, stderr = (b.decode() for b in demo.communicate(timeout=900))
    assert demo.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert outside == [], outside
    # Ray (GCS, raylet, workers, agents), Prefect's API and the STAC API were all up
    assert len(tree) >= 6 and len(seen) >= 8, (tree, seen)
    assert "relaymap demo done" in stdout and "validation mIoU" in stdout
    # a quiet console: a line per stage, progress bars (redrawn in place with \r), the
    # results; no Ray or Prefect internals
    console = stdout + stderr
    assert console.count("\n") <= 40, console
    # no core worker line either: the model actors take their arguments inline
    # (relaymap.flows.pool), so Ray's "constructor arguments in the object store and
    # max_restarts > 0" (ray-project/ray#53727) has no cause to be printed
    for internal in ("Reporting training result", "core_worker", "dashboard", "Token auth"):
        assert internal not in console, internal
    assert (
        stdout.rstrip()
        .splitlines()[-1]
        .strip()
        .startswith(f"relaymap serve {tmp_path / 'demo' / 'catalog'}")
    )
    catalog = StaticCatalog(str(tmp_path / "demo" / "catalog"))
    cells = catalog.search(collections=["demo-area-monthly"])
    assert len(cells) == 8  # the held-out area: 2x2 cells, two months
    for item in cells:
        with rasterio.open(item.assets["classes"].href) as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert src.shape == (CELL_PX, CELL_PX)
        png = Path(item.assets["overview"].href.removeprefix("file://"))
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert any(ln.rel == "derived_from" and "model" in (ln.title or "") for ln in item.links)
        assert 0.5 < item.properties["relaymap:valid_fraction"] <= 1
    area = catalog.get_collection("demo-area-monthly")
    mosaics = {k: a for k, a in area.assets.items() if "mosaic" in a.roles}
    assert sorted(mosaics) == ["mosaic-2024-07", "mosaic-2024-08"]
    # the class-area table the demo printed is the collection's table
    table = Path(area.assets["class-areas"].href.removeprefix("file://")).read_text()
    assert table.count("\n") == 1 + 2 * 6 and "2024-08,urban," in table
    _outputs_open_anywhere(tmp_path / "demo", tmp_path / "moved")
    (model,) = catalog.search(collections=["relaymap-models"])
    # the training report on the model item: scores and pictures
    assert 0 <= model.properties["relaymap:validation"]["miou"] <= 1
    for key in ("learning_curve", "validation_iou", "validation_confusion"):
        png = Path(model.assets[key].href.removeprefix("file://"))
        assert png.read_bytes()[:4] == b"\x89PNG", key
    # the printed command serves the demo's maps on a web map
    import requests

    from relaymap.catalog.server import free_port, wait_for_http

    port = free_port()
    serve = subprocess.Popen(
        ["relaymap", "serve", str(tmp_path / "demo" / "catalog"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/maps.json", timeout_s=60, proc=serve)
        listed = requests.get(f"http://127.0.0.1:{port}/maps.json", timeout=30).json()
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=30).text
    finally:
        serve.kill()
        serve.wait()
    assert sorted(m["id"] for m in listed["maps"]) == [f"demo-area-monthly.{k}" for k in mosaics]
    assert "maplibre-gl.js" in page
    print(f"demo took {time.perf_counter() - t0:.0f} s")
    _look_at_the_demo_maps(str(tmp_path / "demo" / "catalog"), mosaics, tmp_path)


def _outputs_open_anywhere(demo: Path, moved: Path) -> None:
    """The demo's whole output folder as an outside user checks it: every STAC document
    valid against the official schemas (offline), the folder relocatable with every link
    and asset resolving (the demo's STAC API is gone by now), every store opening with
    ``xr.open_datatree``, every map item loading with odc-stac without grid arguments."""
    import shutil

    import odc.stac
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    from tests.stac_validate import validate_tree

    assert validate_tree(demo) == []
    shutil.copytree(demo, moved)
    catalog = StaticCatalog(str(moved / "catalog"))
    items = [it for c in catalog.collection_ids() for it in catalog.items(c)]
    assert len(items) >= 8 + 4 + 1  # cell maps, the copied source items, the model
    for item in items:
        for key, asset in item.assets.items():
            href = asset.get_absolute_href()
            assert href.startswith(f"file://{moved}/"), (item.id, key, href)
            assert Path(href.removeprefix("file://")).exists(), (item.id, key, href)
        for link in item.links:
            href = link.get_absolute_href()
            assert href.startswith(f"file://{moved}/"), (item.id, link.rel, href)
            assert Path(href.removeprefix("file://")).exists(), (item.id, link.rel, href)
    stores = sorted(moved.rglob("*.zarr"))
    assert len(stores) >= 4 + 8  # training scenes and cell composites
    for store in stores:
        tree = xr.open_datatree(store, engine="zarr", consolidated=False)
        for level in tree.children.values():
            assert level.to_dataset()["image"].rio.crs is not None
    for item in catalog.items("demo-area-monthly"):
        ds = odc.stac.load([item], bands=["classes"])  # the grid from proj:* alone
        assert ds.odc.geobox.shape == (CELL_PX, CELL_PX) and ds.odc.geobox.crs.epsg == 32633


def _look_at_the_demo_maps(catalog: str, mosaics: dict, tmp_path: Path) -> None:
    """The demo's period mosaics in headless Chromium, as a user sees them after
    `relaymap serve`: with a period selected, the pixel under a uniform patch has its class
    colour; the legend names the classes. Screenshots: ``tmp_path / "demo-<period>.png"``."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import sync_playwright
    from pyproj import Transformer

    from relaymap.catalog.server import free_port, wait_for_http
    from tests.catalog.test_webmap import CHROMIUM_ARGS
    from tests.services import ensure_chromium

    port = free_port()
    serve = subprocess.Popen(
        ["relaymap", "serve", catalog, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/maps.json", timeout_s=60, proc=serve)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(ensure_chromium()), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 700})
                page.goto(url + "/")
                page.wait_for_function("window.relaymapReady === true", timeout=180_000)
                for key, asset in sorted(mosaics.items()):
                    period = asset.extra_fields["relaymap:period"]
                    page.select_option("#period", period)
                    page.wait_for_function("window.relaymapReady === true", timeout=180_000)
                    shot_path = tmp_path / f"demo-{period}.png"
                    page.screenshot(path=str(shot_path))
                    shot = Image.open(shot_path).convert("RGB")
                    legend = [t.strip() for t in page.locator("#legend li").all_inner_texts()]
                    classes = asset.extra_fields["classification:classes"]
                    assert sorted(legend) == sorted(c["name"] for c in classes)
                    with rasterio.open(asset.href) as src:
                        data = src.read(1)
                        # a pixel inside a uniform 9 x 9 patch, so resampling cannot blur it
                        h, w = data.shape
                        rows, cols = np.mgrid[8 : h - 8 : 16, 8 : w - 8 : 16]
                        ok = [
                            (r, c)
                            for r, c in zip(rows.ravel(), cols.ravel(), strict=True)
                            if data[r, c] != 255
                            and (data[r - 4 : r + 5, c - 4 : c + 5] == data[r, c]).all()
                        ]
                        to_lonlat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
                        samples = [ok[len(ok) // 4], ok[len(ok) // 2], ok[3 * len(ok) // 4]]
                        points = [
                            (data[r, c], to_lonlat.transform(*src.xy(r, c))) for r, c in samples
                        ]
                    for value, (lon, lat) in points:
                        hint = next(k["color_hint"] for k in classes if k["value"] == value)
                        sx, sy = page.evaluate(
                            """([lon, lat]) => {
                                const m = window.relaymapMap;
                                const b = m.getContainer().getBoundingClientRect();
                                const p = m.project([lon, lat]);
                                return [Math.round(b.left + p.x), Math.round(b.top + p.y)];
                            }""",
                            [lon, lat],
                        )
                        got, want = shot.getpixel((sx, sy)), tuple(bytes.fromhex(hint))
                        assert all(abs(g - v) <= 6 for g, v in zip(got, want, strict=True)), (
                            key,
                            got,
                            want,
                        )
            finally:
                browser.close()
    finally:
        serve.kill()
        serve.wait()
