"""Prefect flows on a real (ephemeral, SQLite) Prefect API: partial failures, retries,
idempotent reruns, parameter validation, and Ray jobs on a real ``ray start`` cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.testing.utilities import prefect_test_harness

from relay_models.config import ModelConfig
from relaymap.catalog import StaticCatalog, serve_stac
from relaymap.catalog.server import free_port
from relaymap.catalog.storage import filesystem
from relaymap.flows.jobs import RayJobError, run_job
from relaymap.flows.options import MapOptions
from relaymap.flows.pipeline import (
    InferParams,
    IngestParams,
    PipelineParams,
    SceneQuery,
    TrainParams,
    TrainSpec,
    infer_flow,
    ingest_flow,
    mapping_pipeline,
    train_config,
    train_flow,
)
from relaymap.flows.train import DataConfig, TrainConfig
from relaymap.flows.trained import read_info
from relaymap.ingest import StacApiError, make_sample_scenes

from .conftest import BANDS


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    """A real Prefect API (the ephemeral server on a temporary SQLite database)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=100,
        )


@pytest.mark.slow
def test_ingest_flow_keeps_going_past_a_corrupt_scene_and_reruns_idempotently(tmp_path):
    col = make_sample_scenes(str(tmp_path / "sample"), n_scenes=3, size_px=128, feature_px=32)
    items = sorted(col.get_items(), key=lambda i: i.id)
    bad = items[1]
    for asset in bad.assets.values():  # a broken upload: every raster of one scene is junk
        if asset.href.endswith(".tif"):
            Path(asset.href.removeprefix("file://")).write_bytes(b"II*\x00 truncated")
    stores = str(tmp_path / "stores")
    with serve_stac([col]) as api:
        params = IngestParams(
            query=SceneQuery(stac_api=api, collections=[col.id], bands=BANDS),
            stores_url=stores,
            label_asset="labels",
        )
        result = ingest_flow(params)
        assert sorted(result["stores"]) == [items[0].id, items[2].id]
        assert list(result["failed"]) == [bad.id]
        assert "CorruptRasterError" in result["failed"][bad.id]
        assert not (tmp_path / "stores" / f"{bad.id}.zarr").exists()  # nothing half-written
        mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "stores").rglob("zarr.json")}
        again = ingest_flow(params)  # rerun: finished stores are kept as they are
    assert again["stores"] == result["stores"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "stores").rglob("zarr.json")} == mtimes


@pytest.mark.slow
def test_an_item_id_from_the_api_never_becomes_a_path_outside_the_stores(tmp_path):
    col = make_sample_scenes(str(tmp_path / "sample"), n_scenes=2, size_px=128, feature_px=32)
    evil = sorted(col.get_items(), key=lambda i: i.id)[0]
    evil.id = "../../evil"
    stores = tmp_path / "work" / "stores"
    with serve_stac([col]) as api:
        params = IngestParams(
            query=SceneQuery(stac_api=api, collections=[col.id], bands=BANDS),
            stores_url=str(stores),
        )
        result = ingest_flow(params)
    assert list(result["failed"]) == ["../../evil"]
    assert "not a safe id" in result["failed"]["../../evil"]
    assert len(result["stores"]) == 1
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["stores"]
    assert not list(tmp_path.glob("evil*"))


@pytest.mark.slow
def test_a_scheduled_run_with_nothing_new_completes_with_nothing_to_do(tmp_path, scenes):
    col = make_sample_scenes(str(tmp_path / "sample"), n_scenes=1, size_px=128, feature_px=32)
    with serve_stac([col]) as api:
        query = SceneQuery(stac_api=api, collections=[col.id], datetime="1990-01-01/1990-02-01")
        ingest = ingest_flow(
            IngestParams(query=query, stores_url=str(tmp_path / "stores")), return_state=True
        )
        assert ingest.is_completed(), ingest.message
        assert ingest.result() == {"stores": {}, "failed": {}}
        params = PipelineParams(
            query=query,
            work_url=str(tmp_path / "work"),
            out_url=str(tmp_path / "maps"),
            catalog_url=str(tmp_path / "catalog"),
            model=scenes["model"],
        )
        state = mapping_pipeline(params, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["mapped"] == {} and not (tmp_path / "maps").exists()


def test_stac_api_down_is_retried_then_fails_with_a_clear_error(tmp_path):
    params = IngestParams(
        query=SceneQuery(stac_api=f"http://127.0.0.1:{free_port()}", collections=["x"]),
        stores_url=str(tmp_path / "stores"),
    )
    state = ingest_flow(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(StacApiError, match=r"cannot reach the STAC API at http://127\.0\.0\.1"):
        state.result()
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.run_count for r in runs] == [4]  # the first try and 3 retries


def test_bad_parameters_fail_at_flow_start_naming_the_field(tmp_path):
    with pytest.raises(ParameterTypeError, match="collections"):
        ingest_flow({"query": {"stac_api": "http://x", "collections": []}, "stores_url": "y"})
    with pytest.raises(ParameterTypeError, match="window_px"):
        train_flow(
            {"config": {"model": {"num_classes": 2}, "data": {"train": ["a"], "window_px": 50}}}
        )


@pytest.mark.slow
def test_s3_down_mid_run_is_retried_and_leaves_no_partial_products(
    ray_local, scenes, s3, monkeypatch
):
    """The S3 endpoint goes away just before the products are uploaded (a real SeaweedFS
    behind a TCP proxy that is cut); the task retries once the endpoint is back."""
    import relaymap.flows.infer
    import relaymap.flows.products.cog
    from tests.services import TcpProxy

    proxy = TcpProxy(int(s3.endpoint_url.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    real_to_cog, real_check, attempts = (
        relaymap.flows.products.cog.to_cog,
        relaymap.flows.infer.check_writable,
        [],
    )

    def check_writable(url):  # each attempt checks its output first, before any compute
        attempts.append(url)
        if len(attempts) > 1:
            proxy.restore()  # the endpoint is back when the retry starts
        return real_check(url)

    def to_cog(*a, **kw):
        if len(attempts) == 1:
            proxy.cut()  # the endpoint dies while the first attempt is still running
        return real_to_cog(*a, **kw)

    monkeypatch.setattr(relaymap.flows.infer, "check_writable", check_writable)
    monkeypatch.setattr(relaymap.flows.products.cog, "to_cog", to_cog)
    out, catalog = "s3://relaymap-test/flaky-maps", "s3://relaymap-test/flaky-catalog"
    params = InferParams(
        model=scenes["model"], stores=[scenes["stores"][1]], out_url=out, catalog_url=catalog
    )
    state = infer_flow(params, return_state=True)
    proxy.cut()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    assert state.is_completed(), state.message
    result = state.result()
    assert list(result["items"].values()) == [_map_id(scenes)]
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.run_count for r in runs] == [2]
    fs, path = filesystem(out)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))
    # no temporary or partial objects
    assert names == ["classes.tif", "classes.tif.aux.xml", "quicklook.png"]
    assert [i.id for i in StaticCatalog(catalog).items("relaymap-maps")] == [_map_id(scenes)]


# ---------------------------------------------------------------- Ray jobs


#: Credentials as a node's own environment holds them (instance role, Kubernetes secret).
NODE_SECRETS = {"AWS_SECRET_ACCESS_KEY": "node-secret-4b1d", "AWS_ACCESS_KEY_ID": "node-id-77c2"}
#: Credentials in the submitter's environment: they must never reach the cluster.
SUBMITTER_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIASUBMITTER0000XYZ",
    "AWS_SECRET_ACCESS_KEY": "submitter-secret-9f8e7d6c",
    "AWS_SESSION_TOKEN": "submitter-session-token-5a4b",
    "GDAL_HTTP_USERPWD": "user:submitter-password-31",
}


@pytest.fixture(scope="module")
def ray_cluster():
    from tests.services import ray_head

    with ray_head(num_cpus=2, env=NODE_SECRETS) as head:
        yield head


@pytest.mark.slow
def test_a_ray_job_runs_relaymap_and_streams_its_logs(ray_cluster):
    lines: list[str] = []
    job_id = run_job(ray_cluster.url, ["models", "swinv2_nano*"], log=lines.append)
    assert job_id.startswith("raysubmit_")
    assert any(line.startswith("swinv2_nano_relay") for line in lines), lines


@pytest.mark.slow
def test_credentials_never_leave_the_submitting_process(ray_cluster, monkeypatch):
    """A job submitted with credentials in the submitter's environment: its runtime env, the
    Jobs API, ``ray job list`` and the head's logs hold none of them; non-secret settings are
    forwarded; a job process gets credentials from its node's own environment."""
    import subprocess
    import urllib.request

    from ray.job_submission import JobSubmissionClient

    for k, v in SUBMITTER_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_REGION", "eu-central-1")  # a setting, not a secret: forwarded
    job_id = run_job(ray_cluster.url, ["models", "swinv2_nano"], log=lambda line: None)
    client = JobSubmissionClient(ray_cluster.url)
    env = client.get_job_info(job_id).runtime_env["env_vars"]
    assert env.get("AWS_REGION") == "eu-central-1"
    assert not set(env) & set(SUBMITTER_SECRETS)
    api = urllib.request.urlopen(f"{ray_cluster.url}/api/jobs/").read().decode()
    listed = subprocess.run(
        ["ray", "job", "list", "--address", ray_cluster.url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert job_id in api and job_id in listed
    logs = "".join(
        p.read_text(errors="replace") for p in Path(ray_cluster.temp_dir).rglob("*") if p.is_file()
    )
    for secret in SUBMITTER_SECRETS.values():
        for where, text in (("Jobs API", api), ("ray job list", listed), ("head logs", logs)):
            assert secret not in text, f"{where} holds a submitter credential"
    # what a job process sees: its node's credentials (raw Ray, no relaymap in between)
    probe = client.submit_job(
        entrypoint="python -c \"import os; print('key=' + os.environ['AWS_SECRET_ACCESS_KEY'])\""
    )
    while client.get_job_status(probe) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(0.5)
    assert f"key={NODE_SECRETS['AWS_SECRET_ACCESS_KEY']}" in client.get_job_logs(probe)


@pytest.mark.slow
def test_a_failed_ray_job_fails_the_prefect_task_with_the_jobs_error(ray_cluster, tmp_path):
    config = TrainConfig(
        model=ModelConfig(num_classes=2, in_chans=4),
        data=DataConfig(train=[str(tmp_path / "missing.zarr")]),
    )
    state = train_flow(TrainParams(config=config, address=ray_cluster.url), return_state=True)
    assert state.is_failed()
    with pytest.raises(RayJobError, match=r"no scene store at .*missing\.zarr"):
        state.result()
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.run_count for r in runs] == [1]  # bad input is not retried


def test_cluster_address_picks_the_jobs_api_only(monkeypatch):
    from relaymap.flows.jobs import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None
    assert cluster_address("http://head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address: Ray Client, not Jobs
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.org")
    assert cluster_address(None) == "https://ray.example.org"


def _map_id(scenes) -> str:
    """The map item id of the second sample scene with the test model: scene + the model's
    identity (architecture and weights digest)."""
    name = read_info(scenes["model"]).name
    assert name.startswith("swinv2_nano_relay-") and len(name) == len("swinv2_nano_relay-") + 8
    return f"sample-01-{name}"


# ---------------------------------------------------------------- inference options, every path

#: Every inference option at a value other than its default.
NON_DEFAULT = MapOptions(
    tile_px=128,
    overlap_px=8,
    batch_size=3,
    precision="fp32",
    engine="torch",
    workers=1,
    use_gpu=False,
    probabilities=True,
    quicklook=False,
    compress="ZSTD",
)


def test_the_option_set_covers_every_option():
    for name, field in MapOptions.model_fields.items():
        assert getattr(NON_DEFAULT, name) != field.default, f"{name} is at its default"


def _the_worker_saw_every_option(catalog_url: str, item_id: str) -> None:
    """The map item records the options the mapping process ran with, and the products
    show the ones that change them."""
    import rasterio

    from relaymap.catalog.storage import gdal_env

    item = StaticCatalog(catalog_url).get_item("relaymap-maps", item_id)
    assert item.properties["relaymap:options"] == NON_DEFAULT.model_dump(mode="json")
    assert "probabilities" in item.assets and "overview" not in item.assets
    with rasterio.Env(**gdal_env()), rasterio.open(item.assets["classes"].href) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "ZSTD"


def _flags(options: MapOptions) -> list[str]:
    args = []
    for name, value in options.model_dump().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, str(value)]
    return args


@pytest.mark.slow
def test_every_option_reaches_the_worker_from_the_cli(ray_local, scenes, tmp_path):
    from click.testing import CliRunner

    from relaymap.flows.cli import main

    catalog = str(tmp_path / "catalog")
    args = ["infer", "--model", scenes["model"], "--scene", scenes["stores"][1]]
    args += ["--out", str(tmp_path / "maps"), "--catalog", catalog, "--item-id", "cli"]
    res = CliRunner().invoke(main, [*args, *_flags(NON_DEFAULT)])
    assert res.exit_code == 0, res.output
    _the_worker_saw_every_option(catalog, "cli")


@pytest.mark.slow
def test_every_option_reaches_the_worker_from_a_prefect_flow(ray_local, scenes, tmp_path):
    catalog = str(tmp_path / "catalog")
    params = InferParams(
        model=scenes["model"],
        stores=[scenes["stores"][1]],
        out_url=str(tmp_path / "maps"),
        catalog_url=catalog,
        options=NON_DEFAULT,
    )
    (item_id,) = infer_flow(params)["items"].values()
    _the_worker_saw_every_option(catalog, item_id)


@pytest.mark.slow
def test_every_option_reaches_the_worker_of_a_ray_job(ray_cluster, scenes, tmp_path):
    catalog = str(tmp_path / "catalog")
    params = InferParams(
        model=scenes["model"],
        stores=[scenes["stores"][1]],
        out_url=str(tmp_path / "maps"),
        catalog_url=catalog,
        options=NON_DEFAULT,
        address=ray_cluster.url,
    )
    result = infer_flow(params)
    assert result == {
        "items": {scenes["stores"][1]: _map_id(scenes)},
        "failed": {},
    }
    _the_worker_saw_every_option(catalog, _map_id(scenes))


def test_every_model_option_is_set_the_same_way_in_the_pipeline(tmp_path):
    """The pipeline's training spec takes a training config's model keys (less the sizes the
    data gives); a name alone still works."""
    import numpy as np

    from tests.flows.stores import array_store

    store = array_store(
        str(tmp_path / "a.zarr"),
        np.zeros((3, 64, 64), np.float32),
        np.zeros((64, 64), np.uint8),
        num_classes=5,
    )
    options = {
        "name": "swinv2_nano_relay",
        "factor": 8,
        "relays": 2,
        "relay_mode": "parallel",
        "relay_bias": "zero",
        "relay_init_std": 1.0,
        "relay_blocks": 3,
        "head": "fpn",
        "separate_patch_embed": False,
        "drop_path_rate": 0.2,
    }
    spec = TrainSpec.model_validate({"train_items": ["a"], "model": options})
    config = train_config(str(tmp_path), None, spec, {"a": store.url})
    assert config.model == ModelConfig(**options, num_classes=5, in_chans=3)
    by_name = TrainSpec.model_validate({"train_items": ["a"], "model": "swinv2_nano_fusion"})
    assert by_name.model.name == "swinv2_nano_fusion" and by_name.model.factor == 4
    with pytest.raises(ValueError, match="num_classes"):
        TrainSpec.model_validate({"train_items": ["a"], "model": {**options, "num_classes": 5}})
