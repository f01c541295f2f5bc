"""The commands users reach for, checked by their exact output: search, ingest, maps,
evaluate. The help and search/ingest checks run the console script, a process of its own;
the maps and evaluate check runs the same commands in this process (:mod:`tests.console`:
the process is not what it tests), on the module's local Ray, without seconds of imports
per command."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from relaymap.catalog import serve_stac
from relaymap.ingest import open_scene
from tests import console

from .conftest import BANDS


def relaymap(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(["relaymap", *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    return run


def relaymap_here(*args: str) -> console.Run:
    """``relaymap ARGS`` in this process (:func:`tests.console.relaymap`); it must succeed."""
    run = console.relaymap(*args)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    return run


def test_help_lists_the_commands():
    out = relaymap("--help").stdout
    for name in ("search", "ingest", "maps", "serve", "evaluate", "train", "infer", "demo"):
        assert f"\n  {name} " in out


@pytest.mark.slow
def test_search_then_ingest(sample_local, tmp_path):
    with serve_stac([sample_local]) as api:
        table = relaymap("search", api, "--collection", "relaymap-sample").stdout.splitlines()
        rows = json.loads(
            relaymap("search", api, "--collection", "relaymap-sample", "--json").stdout
        )
        out = relaymap(
            "ingest",
            api,
            "--collection",
            "relaymap-sample",
            "--ids",
            "sample-01",
            "--out",
            str(tmp_path / "scenes"),
            "--label-asset",
            "labels",
            "--json",
        ).stdout
    assert table[0].split() == ["id", "datetime", "cloud", "footprint", "km2"]
    assert [line.split()[0] for line in table[1:]] == ["sample-00", "sample-01", "sample-02"]
    assert [r["id"] for r in rows] == ["sample-00", "sample-01", "sample-02"]
    # 256 px at 10 m: 2.56 km a side, 6.55 km2 (on the ellipsoid, to a few per mille)
    assert all(r["footprint_km2"] == pytest.approx(6.5536, rel=0.01) for r in rows)
    (ingested,) = json.loads(out)
    store = open_scene(ingested["store"])
    assert ingested["id"] == "sample-01" and store.has_labels and store.bands == tuple(BANDS)


@pytest.mark.slow
def test_maps_and_evaluate(ray_local, scenes, tmp_path):
    """A real map of a labelled scene: ``maps`` shows its class areas, ``evaluate`` scores
    it against the scene's own labels, equal to a direct count."""
    import rasterio

    catalog = str(tmp_path / "catalog")
    store_url = scenes["stores"][1]
    relaymap_here(
        "infer",
        "--model",
        scenes["model"],
        "--scene",
        store_url,
        "--out",
        str(tmp_path / "maps"),
        "--catalog",
        catalog,
        "--item-id",
        "m1",
        "--no-quicklook",
    )
    (row,) = json.loads(relaymap_here("maps", catalog, "--json").stdout)
    store = open_scene(store_url)
    valid_km2 = float(store.valid(0).values.sum()) * 100 / 1e6  # 10 m pixels
    assert row["id"] == "m1" and row["period"] == store.attrs.datetime[:10]
    assert sum(row["classes_km2"].values()) == pytest.approx(valid_km2, rel=1e-6)
    table = relaymap_here("maps", catalog).stdout.splitlines()
    assert table[0].split()[:3] == ["map", "model", "period"] and table[1].startswith("m1 ")
    item = f"{catalog}/relaymap-maps/items/m1.json"
    scores = json.loads(
        relaymap_here("evaluate", item, store_url, "--out", str(tmp_path / "ev"), "--json").stdout
    )
    with (
        rasterio.open(str(tmp_path / "maps" / "m1"))
        if False
        else rasterio.open(next((tmp_path / "maps" / "m1").rglob("classes.tif"))) as src
    ):
        pred = src.read(1)
    labels = store.level(0)["label"].values
    both = (pred != 255) & (labels != 255)
    assert scores["pixels"] == int(both.sum())
    assert scores["overall_accuracy"] == pytest.approx(float((pred == labels)[both].mean()))
    assert (tmp_path / "ev" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    summary = relaymap_here("evaluate", item, store_url, "--out", str(tmp_path / "ev")).stdout
    assert summary.splitlines()[0].split() == ["class", "IoU", "F1", "label", "pixels"]
    assert summary.splitlines()[-1].startswith(
        f"overall accuracy {scores['overall_accuracy']:.3f}, mIoU {scores['miou']:.3f}"
    )
    np.testing.assert_array_equal(np.array(scores["confusion_matrix"]).sum(), scores["pixels"])
    # the class COG alone carries the class names too (its .aux.xml, as GDAL and QGIS read it)
    cog = next((tmp_path / "maps" / "m1").rglob("classes.tif"))
    by_cog = json.loads(
        relaymap_here(
            "evaluate", str(cog), store_url, "--out", str(tmp_path / "ev2"), "--json"
        ).stdout
    )
    names = [c["name"] for c in store.attrs.classes]
    assert list(by_cog["classes"]) == list(scores["classes"]) == names
    assert by_cog["confusion_matrix"] == scores["confusion_matrix"]
