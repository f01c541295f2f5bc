"""User mistakes through the real CLI: each is one line on stderr naming the input, exit
code 2, and nothing new under the output root (issue 26's table, row by row).

Two rows run the console script in a process of its own (the entry point, a real
process's stderr, a service down); the others run the same command in this process
(:mod:`tests.console`: its stdout, stderr and exit code as the console shows them),
without the seconds of imports per row."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from relaymap.catalog import serve_stac
from relaymap.catalog.server import free_port
from tests.console import Run, relaymap

from .area_data import CELL, area_geojson, make_source, variant


@pytest.fixture(scope="module")
def source(tmp_path_factory, scenes):
    """The test area's source (with one more collection whose first item has an unsafe id)
    on a local STAC API, and a trained model."""
    root = tmp_path_factory.mktemp("exit-codes")
    col = make_source(str(root / "source"), seed=7)
    evil = variant(col, {it.id for it in col.get_items()}, "evil-ids")
    first = min(evil.get_items(), key=lambda it: (it.datetime, it.id))  # one of January's
    first.id = "../../evil"
    with serve_stac([col, evil]) as api:
        yield {"api": api, "collection": col.id, "model": scenes["model"], "root": root}


def _files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


#: The rows run by the console script, in a process of their own.
CONSOLE_SCRIPT = ("ModelError", "cannot reach the STAC API")


def _run(args: list[str], cwd: Path, message: str) -> subprocess.CompletedProcess | Run:
    if message not in CONSOLE_SCRIPT:
        return relaymap(*args, cwd=cwd, env={"COLUMNS": "200"})
    return subprocess.run(
        ["relaymap", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        timeout=600,
    )


def _map(src: dict, out: Path, **change: str) -> list[str]:
    flags = {
        "--area": area_geojson(),
        "--period": "2026-01",
        "--model": src["model"],
        "--source": src["api"],
        "--collection": src["collection"],
        "--out": str(out),
        "--cell-px": str(CELL),
        **change,
    }
    return ["map", *(x for kv in flags.items() for x in kv)]


@pytest.mark.slow
def test_exit_code_2_one_line_nothing_written_for_each_usage_mistake(source, tmp_path):
    out = tmp_path / "out"
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    config = tmp_path / "area.yaml"
    config.write_text(
        json.dumps(
            {
                "area": area_geojson(),
                "period": "2026-01",
                "model": source["model"],
                "source": {"stac_api": source["api"], "collections": [source["collection"]]},
                "out": str(out),
                "grid": {"cell_px": CELL},
                "options": {"tile_pxx": 64},  # a typo
            }
        )
    )
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rows = [
        (_map(source, out, **{"--model": str(tmp_path / "missing.safetensors")}), "ModelError"),
        (["infer", "--model", str(tmp_path / "missing.json"), "--scene", str(out / "s.zarr"),
          "--out", str(out)], "no model item at"),
        (_map(source, out, **{"--area": "200,0,210,10"}), "outside lon/lat"),
        (_map(source, out, **{"--area": "10,95,11,96"}), "outside lon/lat"),
        (_map(source, out, **{"--out": "/proc/relaymap-out"}), "cannot write file:///proc"),
        (_map(source, out, **{"--out": str(afile / "maps")}), "is a file, not a folder"),
        (["ingest", source["api"], "--collection", "evil-ids", "--out", str(out)],
         "'../../evil' is not a safe id"),
        (_map(source, out, **{"--collection": "evil-ids"}), "'../../evil' is not a safe id"),
        (["evaluate", str(tmp_path / "missing.json"), "/missing.tif", "--out", str(out)],
         "no map item at"),
        (["evaluate", str(afile), "/missing.tif", "--out", str(out)], "cannot read the map"),
        (["map", "--config", str(config)], "options.tile_pxx: unknown key"),
        (_map(source, out, **{"--tile-px": "-3"}), "options.tile_px: input should be greater"),
        (_map(source, out, **{"--source": down}), "cannot reach the STAC API"),
        (_map(source, out, **{"--collection": "no-such-collection"}),
         f"no collection 'no-such-collection' on {source['api']}; it has evil-ids, "
         f"{source['collection']}"),
        (["maps", str(tmp_path / "no-catalog")], "no STAC catalog at"),
        (["maps"], "no STAC catalog at relaymap-demo/catalog"),  # run where there is none
        (["search", source["api"], "--collection", source["collection"], "--bbox", "15,43,15"],
         "give W,S,E,N"),
    ]  # fmt: skip
    for args, message in rows:
        run = _run(args, tmp_path, message)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2, (args, run.returncode, run.stderr[-3000:])
        assert len(lines) == 1 and message in lines[0], (args, run.stderr[-3000:])
        assert lines[0].startswith("relaymap: "), lines[0]
        assert _files(out) == [], (args, _files(out))
    assert afile.read_text() == "not a folder"
    assert {m for _, m in rows} >= set(CONSOLE_SCRIPT)
