"""One area-mapping run on a local two-node Ray cluster (``ray start --head`` plus a second
``ray start --address=...`` with its own resources): its cells run on both nodes."""

from __future__ import annotations

import time

import pytest

from relaymap.catalog import serve_stac
from relaymap.flows.area import map_area

from .area_data import config, make_source


@pytest.mark.slow
def test_aoi_cells_run_on_both_nodes_of_a_two_node_cluster(tmp_path, scenes):
    import ray

    from tests.services import environ, ray_head, ray_worker_node

    ray.shutdown()  # not the tests' local Ray: the cluster's
    col = make_source(str(tmp_path / "source"))
    with (
        serve_stac([col]) as api,
        environ({"RAY_AUTH_MODE": "disabled"}),
        ray_head(num_cpus=1) as head,
        ray_worker_node(head, num_cpus=1, resources={"second_node": 1}),
    ):
        try:
            ray.init(address=head.gcs_address, log_to_driver=False)
            while len([n for n in ray.nodes() if n["Alive"]]) < 2:  # the worker joining
                time.sleep(0.5)
            nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            cfg = config(api, scenes["model"], str(tmp_path / "out"), period="2026-01")
            # two actors of 1 CPU each on two nodes of 1 CPU each: one per node
            result = map_area(cfg, address=head.gcs_address, progress=False)
        finally:
            ray.shutdown()
    assert result.failed == {} and len(result.mapped) == 4
    assert set(result.nodes) == nodes and len(nodes) == 2
    assert sum(result.nodes.values()) == 4
