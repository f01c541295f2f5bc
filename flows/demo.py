"""``relaymap demo``: the main job on this machine, in minutes, on embedded defaults.

Sample scenes with labels (with context classes) and a held-out area of Sentinel-2 L2A-like
items (two periods; per period two overlapping orbits, one of them cloudy, with an ``scl``
mask; a field built over in the second, :data:`AREA_CHANGE`) are written to the workdir and
served by a local STAC API (``rustac serve``). Then, on Prefect's ephemeral API and local
Ray, :func:`demo_flow` ingests the labelled scenes, trains ``swinv2_nano_relay`` (2 Ray
workers) and maps the area as 2x2 grid cells for both periods
(:func:`relaymap.flows.pipeline.area_flow`): cloud-free composites, seamless cell COGs, a
mosaic per period, the class areas, the imagery and the change between the months, all in a
static STAC catalog.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from prefect import flow

from relaymap.catalog import serve_stac
from relaymap.catalog.storage import join, normalize_url
from relaymap.ingest import make_sample_scenes
from relaymap.ingest.sample import SyntheticChange, make_s2_area

#: Labelled sample scenes: the first TRAIN train, the rest validate.
SCENES, TRAIN = 4, 3
#: The held-out area: 2x2 cells of CELL_PX (a multiple of the 56 px tile stride and of 8),
#: its top-left corner on the grid, with MARGIN_PX of imagery around it (> the 168 px halo).
CELL_PX, MARGIN_PX = 280, 200
AREA_ORIGIN = (2800.0 * 184, 2800.0 * 1715)  # EPSG:32633, multiples of the cell side
PERIODS = "2024-07/2024-08"
AREA_DATES = (
    dt.datetime(2024, 7, 9, 10, tzinfo=dt.UTC),
    dt.datetime(2024, 8, 13, 10, tzinfo=dt.UTC),
)
COLLECTION = "demo-area-monthly"
#: The demo's known change: in the second month a field of the eastern cells (seen by the
#: clear orbit) is built over; the area run's change products find it.
AREA_CHANGE = SyntheticChange(
    since=1,
    side_px=112,
    within=(MARGIN_PX, MARGIN_PX + CELL_PX, MARGIN_PX + 2 * CELL_PX, MARGIN_PX + 2 * CELL_PX),
    clearance_px=24,
)


@dataclass(frozen=True)
class DemoResult:
    workdir: str
    catalog_url: str
    out_url: str
    summary: dict[str, Any]


def area_geojson() -> str:
    """The held-out area: a polygon in EPSG:32633 (inset by a metre, so it touches only
    its 2x2 cells)."""
    import json

    (x0, y1), side = AREA_ORIGIN, 2 * CELL_PX * 10
    ring = [[x0 + 1, y1 - side + 1], [x0 + side - 1, y1 - side + 1], [x0 + side - 1, y1 - 1]]
    ring += [[x0 + 1, y1 - 1], ring[0]]
    crs = {"type": "name", "properties": {"name": "EPSG:32633"}}
    return json.dumps({"type": "Polygon", "coordinates": [ring], "crs": crs})


@flow(name="demo", log_prints=True)
def demo_flow(
    api: str,
    sample_collection: str,
    area_collection: str,
    work_url: str,
    out_url: str,
    catalog_url: str,
    steps: int,
    train_ids: list[str],
    val_ids: list[str],
) -> dict[str, Any]:
    """Ingest the labelled scenes, train a relay model, map the held-out area monthly."""
    from .area import AreaConfig
    from .pipeline import (
        IngestParams,
        SceneQuery,
        TrainSpec,
        area_flow,
        ingest_flow,
        train_config,
        train_task,
    )

    labelled = ingest_flow(
        IngestParams(
            query=SceneQuery(stac_api=api, collections=[sample_collection]),
            stores_url=join(work_url, "scenes"),
            label_asset="labels",
        )
    )
    spec = TrainSpec(
        train_items=train_ids, val_items=val_ids, steps=steps, run_name=f"demo-nano-relay-{steps}"
    )
    trained = train_task(train_config(work_url, catalog_url, spec, labelled["stores"]))
    config = AreaConfig.model_validate(
        {
            "area": area_geojson(),
            "period": PERIODS,
            "model": trained["item"] or trained["weights"],
            # the demo's STAC API ends with the demo: keep the source items in the catalog
            "source": {"stac_api": api, "collections": [area_collection], "copy_items": True},
            "out": out_url,
            "catalog": catalog_url,
            "collection": COLLECTION,
            "grid": {"cell_px": CELL_PX},
        }
    )
    return {"model": config.model, "metrics": trained["metrics"], **area_flow(config)}


def run_demo(
    workdir: str = "relaymap-demo",
    *,
    out_url: str | None = None,
    steps: int = 300,
    size_px: int = 640,
    seed: int = 0,
) -> DemoResult:
    """Run the demo; products go to ``out_url`` (default ``<workdir>/maps``), items to the
    static catalog ``<workdir>/catalog``. Rerunning reuses finished stores, the trained
    model and the maps whose inputs did not change."""
    work = normalize_url(workdir)
    out = normalize_url(out_url) if out_url else join(work, "maps")
    catalog_url = join(work, "catalog")
    sample = make_sample_scenes(
        join(work, "sample"), n_scenes=SCENES, size_px=size_px, feature_px=48, seed=seed
    )
    x0, y1 = AREA_ORIGIN
    area = make_s2_area(
        join(work, "area-source"),
        origin=(x0 - MARGIN_PX * 10, y1 + MARGIN_PX * 10),
        size_px=2 * CELL_PX + 2 * MARGIN_PX,
        dates=AREA_DATES,
        seed=seed + 100,
        change=AREA_CHANGE,
    )
    ids = sorted(it.id for it in sample.get_items())
    with serve_stac([sample, area]) as api:
        summary = demo_flow(
            api,
            sample.id,
            area.id,
            work,
            out,
            catalog_url,
            steps,
            ids[:TRAIN],
            ids[TRAIN:],
        )
    return DemoResult(work, catalog_url, out, summary)
