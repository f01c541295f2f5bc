"""``relaymap demo``: the whole pipeline on sample scenes, on this machine, in minutes.

Sample scenes (with context classes) are written to the workdir and served by a local STAC
API (``rustac serve``); :func:`relaymap.flows.pipeline.mapping_pipeline` then runs on Prefect's
ephemeral API and local Ray: ingest -> train ``swinv2_nano_relay`` (2 Ray workers) -> map
the held-out scenes -> COGs, quicklooks and STAC items in a static catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relaymap.catalog import StaticCatalog, serve_stac
from relaymap.catalog.storage import join, normalize_url
from relaymap.ingest import make_sample_scenes

#: Scenes: the first TRAIN are for training, the next for validation, the rest are mapped.
SCENES, TRAIN = 5, 3


@dataclass(frozen=True)
class DemoResult:
    workdir: str
    catalog_url: str
    out_url: str
    pipeline: dict[str, Any]
    maps: list[dict[str, str]]


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
    model and existing maps."""
    from .pipeline import PipelineParams, SceneQuery, TrainSpec, mapping_pipeline

    work = normalize_url(workdir)
    out = normalize_url(out_url) if out_url else join(work, "maps")
    catalog_url = join(work, "catalog")
    sample = make_sample_scenes(
        join(work, "sample"), n_scenes=SCENES, size_px=size_px, feature_px=48, seed=seed
    )
    ids = sorted(it.id for it in sample.get_items())
    with serve_stac([sample]) as api:
        params = PipelineParams(
            query=SceneQuery(stac_api=api, collections=[sample.id]),
            work_url=work,
            out_url=out,
            catalog_url=catalog_url,
            train=TrainSpec(
                train_items=ids[:TRAIN],
                val_items=ids[TRAIN : TRAIN + 1],
                steps=steps,
                run_name=f"demo-nano-relay-{steps}",
            ),
        )
        result = mapping_pipeline(params)
    catalog = StaticCatalog(catalog_url)
    maps = []
    for item in catalog.items("relaymap-maps"):
        maps.append(
            {
                "id": item.id,
                "classes": item.assets["classes"].href,
                "quicklook": item.assets["overview"].href if "overview" in item.assets else "",
                "item": item.get_self_href() or "",
            }
        )
    return DemoResult(work, catalog_url, out, result, maps)
