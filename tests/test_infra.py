"""Deploy files agree with the package: images, entrypoints, resources, versions."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import click
import pytest
import yaml

from relaymap.flows.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _yaml(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _image() -> str:
    """The image the Dockerfile's build command tags."""
    m = re.search(r"docker build .* -t (\S+) \.", (INFRA / "Dockerfile").read_text())
    assert m, "infra/Dockerfile must say how it is built and tagged"
    return m.group(1)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _cli_command(argv: list[str]) -> click.Command:
    """The click command ``relaymap ARGV`` runs (fails if it does not exist)."""
    assert argv[0] == "relaymap", argv
    name = argv[1]
    assert name in cli.commands, f"relaymap has no command {name!r}"
    return cli.commands[name]


def test_dockerfile_installs_the_package_with_the_pinned_torch():
    text = (INFRA / "Dockerfile").read_text()
    pinned = (ROOT / "constraints.txt").read_text()
    torch_pin = re.search(r"torch==[\d.]+", pinned).group(0)
    assert f'"{torch_pin}"' in text
    for package in ("relay_models", "ingest", "catalog", "flows"):
        assert f"COPY {package} ./{package}" in text
    assert "nvidia/cuda" in text.splitlines()[2]
    assert "pip install ." in text and "relaymap --version" in text


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_use_our_image_ray_version_and_gpus(name):
    doc = _yaml(name)
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == version("ray")
    head = _containers(spec["headGroupSpec"]["template"])
    workers = [c for g in spec["workerGroupSpecs"] for c in _containers(g["template"])]
    for c in head + workers:
        assert c["image"] == _image()
        assert {"secretRef": {"name": "relaymap-s3"}} in c["envFrom"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # Jobs API
    for group in spec["workerGroupSpecs"]:
        c = _containers(group["template"])[0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    if doc["kind"] == "RayJob":
        argv = doc["spec"]["entrypoint"].split()
        assert _cli_command(argv).name == "train"
        mount = _containers(spec["headGroupSpec"]["template"])[0]["volumeMounts"][0]
        assert argv[2].startswith(mount["mountPath"])


def test_the_secret_example_names_the_variables_storage_reads():
    doc = _yaml("s3-credentials.example.yaml")
    assert doc["metadata"]["name"] == "relaymap-s3"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(doc["stringData"])


def test_cluster_launcher_runs_our_image_with_gpu_workers():
    doc = _yaml("ray-cluster-aws.yaml")
    assert doc["docker"]["image"] == _image()
    gpu = doc["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] >= 1
    assert doc["available_node_types"][doc["head_node_type"]]["resources"]["CPU"] == 0


def test_prefect_k8s_work_pool_template_points_flows_at_the_ray_jobs_api():
    doc = json.loads((INFRA / "prefect-k8s-work-pool.json").read_text())
    props = doc["variables"]["properties"]
    assert props["image"]["default"] == _image()
    head_svc = _yaml("raycluster.yaml")["metadata"]["name"] + "-head-svc"
    assert props["ray_address"]["default"] == f"http://{head_svc}:8265"
    container = doc["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][
        0
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RAY_ADDRESS"] == "{{ ray_address }}"  # relaymap.flows.jobs.cluster_address reads it
    assert container["image"] == "{{ image }}"


def test_prefect_yaml_deploys_every_flow_from_the_package():
    from prefect.flows import Flow
    from prefect.utilities.importtools import import_object

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in doc["deployments"]}
    assert {"ingest", "train", "infer"} <= set(by_name)
    flows = set()
    for d in doc["deployments"]:
        flow = import_object(d["entrypoint"])
        assert isinstance(flow, Flow)
        flows.add(flow.name)
        assert d["work_pool"]["name"] == "relaymap-process"
    assert flows == {"ingest", "train", "infer", "mapping-pipeline", "map-area"}
    scheduled = [d for d in doc["deployments"] if d.get("schedules")]
    assert scheduled and all(s["cron"] for d in scheduled for s in d["schedules"])
    for d in scheduled:  # the example parameters validate against the flow's model
        from relaymap.flows.area import AreaConfig
        from relaymap.flows.pipeline import PipelineParams

        if d["entrypoint"].endswith(":area_flow"):
            assert AreaConfig.model_validate(d["parameters"]["config"]).period == "last"
        else:
            PipelineParams.model_validate(d["parameters"]["params"])


def _readme_yaml(first_line: str) -> dict:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return yaml.safe_load(block)


def test_the_readme_configs_validate():
    from relaymap.flows.area import AreaConfig
    from relaymap.flows.pipeline import PipelineParams
    from relaymap.flows.train import TrainConfig

    PipelineParams.model_validate(_readme_yaml("# my-aoi.yaml"))
    TrainConfig.model_validate(_readme_yaml("# run.yaml"))
    area = AreaConfig.model_validate(_readme_yaml("# area.yaml"))
    assert area.source.mask == "auto" and area.source.composite.method == "best"
