"""One area-mapping run on a local two-node Ray cluster (``ray start --head`` plus a second
``ray start --address=...`` with its own resources): its cells run on both nodes."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import requests
import yaml

from relaymap.catalog import serve_stac

from .area_data import config, make_source


def _alive_nodes(dashboard: str) -> set[str]:
    nodes = requests.get(f"{dashboard}/api/v0/nodes", timeout=30).json()["data"]["result"]
    return {n["node_id"] for n in nodes["result"] if n["state"] == "ALIVE"}


@pytest.mark.slow
def test_aoi_cells_run_on_both_nodes_of_a_two_node_cluster(tmp_path, scenes):
    from tests.services import ray_head, ray_worker_node

    col = make_source(str(tmp_path / "source"))
    with (
        serve_stac([col]) as api,
        ray_head(num_cpus=1) as head,
        ray_worker_node(head, num_cpus=1, resources={"second_node": 1}),
    ):
        while len(_alive_nodes(head.url)) < 2:  # the second node joining
            time.sleep(0.5)
        nodes = _alive_nodes(head.url)
        cfg = config(api, scenes["model"], str(tmp_path / "out"), period="2026-01")
        (tmp_path / "area.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        # the driver as users run it against a cluster; two actors of 1 CPU each on two
        # nodes of 1 CPU each: one actor per node
        args = ["--config", str(tmp_path / "area.yaml"), "--address", head.gcs_address]
        run = subprocess.run(
            ["relaymap", "map", *args, "--json"],
            # Ray Data dispatches once both actors are up (else, on a busy machine, the
            # first actor can finish every cell before the second has imported torch)
            env={
                **os.environ,
                "RAY_AUTH_MODE": "disabled",
                "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600",
            },
            capture_output=True,
            text=True,
        )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["failed"] == {} and len(result["mapped"]) == 4
    assert set(result["nodes"]) == nodes and len(nodes) == 2
    assert sum(result["nodes"].values()) == 4
