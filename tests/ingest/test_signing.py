"""Signing that fails fast: Planetary Computer items (real item JSON, pixels synthesised, see
:mod:`tests.published`) with a local stand-in of its token service and blob storage. Only
the assets a run reads are signed; a token service that stalls or refuses stops the run
after its time budget, with one line naming ``--sign none``; ``--sign none`` reads the
hrefs as they are."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from affine import Affine
from odc.geo.geobox import GeoBox

from relaymap.catalog import serve_stac
from relaymap.ingest.composite import composite
from relaymap.ingest.profiles import ReadOptions
from relaymap.ingest.signing import SIGN_TIMEOUT_ENV, SigningError
from tests.published import (
    BANDS,
    PlanetaryComputerStandIn,
    TokenServiceDown,
    cell_inside,
    collection_of,
    item_epsg,
    make_truth,
    published,
    synthesise,
)
from tests.services import environ

CELL_PX, RES = 32, 10.0
#: The container the read assets are in (their hrefs, as the stand-in serves them).
READ_CONTAINER = "teststorage/sentinel2-l2"


@pytest.fixture(scope="module")
def pc(tmp_path_factory):
    """A Planetary Computer Sentinel-2 item whose band and SCL assets are synthesised into
    the stand-in's ``sentinel2-l2`` container; its other assets (AOT, WVP, visual, ...)
    keep their published hrefs on Planetary Computer's own account; a STAC API serving it."""
    root = tmp_path_factory.mktemp("signing")
    item_json = published("pc-s2-l2a")
    x0, y1 = cell_inside(item_json, RES, CELL_PX, 4)
    side, pad = CELL_PX * RES, 4 * RES
    bounds = (x0 - pad, y1 - side - pad, x0 + side + pad, y1 + pad)
    href = PlanetaryComputerStandIn(root).href
    item = synthesise(item_json, root / "sentinel2-l2", make_truth(x0, y1, side), bounds, href=href)
    gbox = GeoBox(
        (CELL_PX, CELL_PX), Affine(RES, 0, x0, 0, -RES, y1), f"EPSG:{item_epsg(item_json)}"
    )
    collection = collection_of(item, "pc-s2-l2a (published item, synthetic pixels)")
    with serve_stac([collection], [item]) as api:
        yield {
            "root": root,
            "item": item,
            "gbox": gbox,
            "api": api,
            "collection": item.collection_id,
        }


def _ingest(pc: dict, out: Path, *flags: str, env: dict | None = None):
    return subprocess.run(
        ["relaymap", "ingest", pc["api"], "--collection", pc["collection"], "--out", str(out),
         "--json", *flags],
        capture_output=True, text=True, timeout=60,  # a guard: the budget here is 2 s
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_signing_only_the_assets_read(pc):
    """A composite asks the token service once, for the container of the assets it reads
    (4 bands and SCL), never for the item's other assets (AOT, WVP, visual, metadata)."""
    stand_in = PlanetaryComputerStandIn(pc["root"])
    with stand_in.running():
        image, _ = composite([pc["item"]], BANDS, pc["gbox"])
        assert image.notnull().any()
    assert stand_in.tokens == Counter({READ_CONTAINER: 1})
    assert stand_in.requests["signed"] > 0 and stand_in.requests["unsigned"] == 0
    assert all("sig=" not in a.href for a in pc["item"].assets.values())  # no token kept


def test_signing_none_reads_the_hrefs_unsigned(pc, tmp_path):
    """``relaymap ingest --sign none`` (a public copy, one's own storage): no token is
    asked for, every read goes out as the item gives it."""
    stand_in = PlanetaryComputerStandIn(pc["root"], public=["sentinel2-l2"])
    with stand_in.running():
        run = _ingest(pc, tmp_path / "out", "--sign", "none")
    assert run.returncode == 0, run.stderr[-3000:]
    assert stand_in.tokens == Counter() and stand_in.requests["signed"] == 0
    assert stand_in.requests["unsigned"] > 0
    assert any(p.name == "zarr.json" for p in _files(tmp_path / "out"))


def test_signing_offline_stops_after_the_budget_naming_sign_none(pc, tmp_path):
    """A token service that accepts and never answers (offline behind a proxy): ``relaymap
    ingest`` stops after its budget (``RELAYMAP_SIGN_TIMEOUT_S=2``: one try that waits it
    out, not ten with minutes of back-off), with one line naming the way out; exit 2,
    nothing written."""
    down = TokenServiceDown("stall")
    out = tmp_path / "out"
    with down.running():
        t0 = time.perf_counter()
        run = _ingest(pc, out, env={SIGN_TIMEOUT_ENV: "2"})
        elapsed = time.perf_counter() - t0
    print(f"offline ingest ended after {elapsed:.1f} s")  # reported, never asserted
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"relaymap: SigningError: cannot sign the hrefs of item {pc['item'].id}")
    assert "gave no token within 2 s for container teststorage/sentinel2-l2 (1 try;" in line
    assert "--sign none" in line and "PC_SDK_SAS_URL" in line
    assert "PC_SDK_SUBSCRIPTION_KEY" in line
    assert down.connections == 1
    assert _files(out) == []


@pytest.mark.parametrize("behaviour", ["reset", "refuse"])
def test_signing_retries_within_the_budget_or_stops_at_a_refusal(pc, behaviour):
    """Connections reset: tried again after a short wait while the budget (the config's
    ``sign_timeout_s``) lasts, then one error naming the tries. An HTTP refusal (a bad
    subscription key): no retry."""
    down = TokenServiceDown(behaviour)
    read = ReadOptions(sign_timeout_s=2)
    with down.running(), pytest.raises(SigningError) as err:
        composite([pc["item"]], BANDS, pc["gbox"], read=read)
    message = str(err.value)
    assert "--sign none" in message and "\n" not in message
    if behaviour == "reset":
        assert down.connections >= 2
        assert f"within 2 s for container {READ_CONTAINER} ({down.connections} tries;" in message
    else:
        assert down.connections == 1
        assert f"refused a token for container {READ_CONTAINER} (1 try; last: HTTP 401" in message


def test_signing_budget_from_the_environment_must_be_seconds(pc):
    with environ({SIGN_TIMEOUT_ENV: "soon"}), pytest.raises(SigningError, match=SIGN_TIMEOUT_ENV):
        composite([pc["item"]], BANDS, pc["gbox"])
