"""Crash tests: a process SIGKILLed at a defined point (``relaymap.catalog.faults``) during
ingest, while mapping writes its products, and during a catalog update. Each rerun
completes, nothing half-written is visible, and the next run cleans what the dead one left.
(Training killed after a checkpoint: ``test_train.py``.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from relaymap.catalog import StaticCatalog, multihash_sha256
from relaymap.catalog.faults import ENV
from relaymap.catalog.storage import read_bytes, remove_stale_temporaries
from relaymap.ingest import StoreError, open_scene
from tests.console import relaymap

from .conftest import BANDS


def _killed_at(
    point: str, args: list[str], env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    """Run ``args`` with the fault point armed (and ``env`` added); it must die there by
    SIGKILL."""
    env = {**os.environ, **(env or {}), ENV: f"{point}=kill"}
    run = subprocess.run(args, env=env, capture_output=True, text=True, **kw)
    assert run.returncode == -signal.SIGKILL, run.stdout[-2000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_ingest_killed_mid_write_leaves_no_usable_half_store_and_reruns(scenes, tmp_path):
    item = scenes["items"][1]
    (tmp_path / "item.json").write_text(json.dumps(item.to_dict()))
    url = str(tmp_path / "killed.zarr")
    code = (
        "import json, pystac, sys; from relaymap.ingest import ingest_items; "
        f"it = pystac.Item.from_dict(json.load(open({str(tmp_path / 'item.json')!r}))); "
        f"ingest_items([it], {url!r}, {BANDS!r}, chunk_px=128)"
    )
    _killed_at("ingest:pixels-written", [sys.executable, "-c", code])
    with pytest.raises(StoreError, match="unfinished store"):
        open_scene(url)  # what the dead process wrote is not visible as a scene
    from relaymap.ingest import ingest_items

    store = ingest_items([item], url, BANDS, chunk_px=128)
    assert store.attrs.complete
    reference = open_scene(scenes["stores"][1])
    assert store.attrs.band_mean == pytest.approx(reference.attrs.band_mean)


@pytest.mark.slow
def test_mapping_killed_after_its_upload_keeps_the_old_map_and_the_rerun_cleans_up(
    ray_local, scenes, tmp_path
):
    """The killed run is the console script in a process of its own, on this test's local
    Ray (``RAY_ADDRESS``); the first run and the rerun run the same command in this process
    (:mod:`tests.console`), where no process is killed."""
    import ray

    catalog_url, out = str(tmp_path / "catalog"), str(tmp_path / "maps")
    args = ["infer", "--model", scenes["model"], "--scene", scenes["stores"][1], "--out", out]
    args += ["--catalog", catalog_url, "--tile-px", "128", "--overlap-px", "0", "--workers", "1"]
    first = relaymap(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    (item,) = StaticCatalog(catalog_url).items("relaymap-maps")
    before = item.assets["classes"].href
    cluster = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    _killed_at("infer:products-written", ["relaymap", *args], env=cluster)
    (item,) = StaticCatalog(catalog_url).items("relaymap-maps")
    assert item.assets["classes"].href == before  # the item never saw the new files
    checksum = item.assets["classes"].extra_fields["file:checksum"]
    assert checksum == multihash_sha256(before)[1]
    assert len(list(Path(out).rglob("classes.tif"))) == 2  # the dead run's generation
    # a scratch folder of a run killed while stitching (kill -9 skips TemporaryDirectory's
    # clean-up), and one of a live run (another process, alive until the rerun is done)
    # that must stay
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    tmp = Path(tempfile.gettempdir())
    live_code = "import sys; sys.stdin.read()"  # alive until its input ends (the with's end)
    with subprocess.Popen([sys.executable, "-c", live_code], stdin=subprocess.PIPE) as live:
        dead_dir = tmp / f"relaymap-infer-{int(dead.stdout)}-abc123"
        live_dir = tmp / f"relaymap-infer-{live.pid}-def456"
        for d in (dead_dir, live_dir):
            (d / "classes.tif").parent.mkdir()
            (d / "classes.tif").write_bytes(b"II*\x00")
        again = relaymap(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    (item,) = StaticCatalog(catalog_url).items("relaymap-maps")
    (only,) = Path(out).rglob("classes.tif")
    assert item.assets["classes"].href == f"file://{only}"
    assert not dead_dir.exists() and live_dir.exists()
    (live_dir / "classes.tif").unlink()
    live_dir.rmdir()


def test_a_catalog_update_killed_midway_is_repaired_by_the_next_writer(tmp_path):
    root = str(tmp_path / "catalog")
    code = (
        "import datetime as dt, pystac, sys; from relaymap.catalog import StaticCatalog; "
        "it = pystac.Item(sys.argv[1], {'type': 'Point', 'coordinates': [15, 43]}, "
        "[15, 43, 15, 43], dt.datetime(2024, 1, 1), {}, collection='maps'); "
        f"StaticCatalog({root!r}).add_items([it])"
    )
    done = subprocess.run([sys.executable, "-c", code, "a"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _killed_at("catalog:items-written", [sys.executable, "-c", code, "b"])
    catalog = StaticCatalog(root)

    def linked() -> set[str]:
        doc = json.loads(read_bytes(f"{root}/maps/collection.json"))
        return {ln["href"].rsplit("/", 1)[-1] for ln in doc["links"] if ln["rel"] == "item"}

    assert linked() == {"a.json"}  # b's file is there, its link is not yet
    # a killed writer's temporary file, an hour old, and a live writer's, fresh
    stale, fresh = tmp_path / "catalog/maps/items/.c.json.tmp-0123456789ab", None
    stale.write_text("{")
    os.utime(stale, (stale.stat().st_atime - 7200, stale.stat().st_mtime - 7200))
    fresh = tmp_path / "catalog/maps/items/.d.json.tmp-ba9876543210"
    fresh.write_text("{")
    again = subprocess.run([sys.executable, "-c", code, "c"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert linked() == {"a.json", "b.json", "c.json"}
    assert [i.id for i in catalog.items("maps")] == ["a", "b", "c"]
    assert not stale.exists() and fresh.exists()
    assert remove_stale_temporaries(str(tmp_path / "catalog/maps/items")) == []


@pytest.mark.slow
def test_aoi_cli_survives_a_worker_killed_after_its_upload(scenes, tmp_path):
    """``relaymap map`` with one Ray worker SIGKILLed after it uploaded a cell's COG and
    before the driver registered it: Ray restarts the actor and reruns the cell, the run
    ends normally, and only the COGs the items point at are left. Its console output is
    checked line by line."""
    import yaml

    from relaymap.catalog import serve_stac
    from relaymap.catalog.faults import ONCE_FILE

    from .area_data import config, make_source

    col = make_source(str(tmp_path / "source"))
    out = tmp_path / "out"
    with serve_stac([col]) as api:
        # one model actor (the one killed, then restarted) and no imagery products (Ray
        # tasks of their own after the cells; none of their files or lines is checked here)
        cfg = config(
            api,
            scenes["model"],
            str(out),
            period="2026-01",
            options={"workers": 1},
            products={"imagery": False},
        )
        (tmp_path / "area.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env = {
            **os.environ,
            ENV: "area:cell-uploaded=kill",
            ONCE_FILE: str(tmp_path / "fault.pid"),
            "COLUMNS": "200",
        }
        run = subprocess.run(
            ["relaymap", "map", "--config", str(tmp_path / "area.yaml")],
            env=env,
            capture_output=True,
            text=True,
        )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (tmp_path / "fault.pid").exists()  # a worker did die at the fault point
    # Ray may report the killed worker and the retried task on the console (its own
    # lines, anywhere); relaymap's lines come in this order
    lines = run.stdout.splitlines()
    head = "4 cells x 1 periods: 4 mapped, 0 unchanged, 0 without clear pixels, 0 failed ("
    (start,) = [i for i, ln in enumerate(lines) if ln.startswith(head)]
    assert lines[start].endswith(" s)")
    mosaic = f"file://{out}/relaymap-area/2026-01/mosaic.vrt"
    ours = [ln for ln in lines[start + 1 :] if "(raylet)" not in ln and "CellMapper" not in ln]
    assert ours[:3] == [
        f"mosaic 2026-01: {mosaic}",
        f"collection: file://{out}/catalog/relaymap-area/collection.json",
        "",
    ]
    assert ours[3].split() == [
        "period",
        "class",
        "area",
        "km2",
        "low-confidence",
        "km2",
        "observable",
        "km2",
    ]
    table = [ln.split() for ln in ours[4:] if ln.startswith("2026-01")]
    catalog = StaticCatalog(str(out / "catalog"))
    items = list(catalog.items("relaymap-area"))
    assert [row[:2] for row in table] == [["2026-01", c.name] for c in _classes()]
    for _, name, km2, _low, observable in table:
        total = sum(it.properties["relaymap:class_areas_km2"][name] for it in items)
        assert km2 == f"{total:.2f}"
        assert observable == f"{sum(it.properties['relaymap:observable_km2'] for it in items):.2f}"
    # one COG per cell: the killed attempt's upload was removed once the retry registered
    cogs = sorted(str(p) for p in out.rglob("classes.tif"))
    assert cogs == sorted(it.assets["classes"].href.removeprefix("file://") for it in items)


def _classes():
    from relaymap.ingest.sample import CLASSES

    return CLASSES
