"""Training on Ray Train: bad input stops before compute; real 2-worker runs with S3
checkpoints, resume, a killed worker, and a two-node cluster losing a node."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from relay_models import RelayLoss, create_model, evaluate
from relaymap.catalog.storage import StorageError
from relaymap.flows.train import TrainConfig, check_inputs, train
from relaymap.ingest import StoreError
from tests.flows.stores import array_store, stripes
from tests.services import environ


def _toy(tmp_path, name="toy", size=128, inverted=False):
    """A learnable toy signal: the class is the sign of band 0 (smooth blobs); ``inverted``:
    the other class (a validation set that scores worse the better a model learns)."""
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(size // 16, size // 16))
    band0 = np.kron(coarse, np.ones((16, 16)))
    labels = ((band0 > 0) != inverted).astype(np.uint8)
    image = np.stack([band0, rng.normal(size=(size, size)) * 0.1]).astype(np.float32)
    return array_store(str(tmp_path / f"{name}.zarr"), image, labels, num_classes=2, chunk_px=64)


def _config(train_urls, storage, **over) -> TrainConfig:
    cfg = {
        "model": {"name": "swinv2_nano_relay", "num_classes": 2, "in_chans": 2},
        "data": {"train": train_urls, "window_px": 32, "p_rescale": 0.0, "p_rotate": 0.0},
        "optim": {"steps": 24, "batch_size": 4, "lr": 2e-3, "warmup_frac": 0.1},
        "run": {
            "name": "toy",
            "storage_url": storage,
            "num_workers": 2,
            "checkpoint_every": 4,
            "val_every": 100,
            "log_every": 4,
            "max_failures": 1,
        },
    }
    for section, values in over.items():
        cfg[section] = {**cfg[section], **values}
    return TrainConfig.model_validate(cfg)


class TestBadInput:
    def test_unlabelled_store(self, tmp_path):
        image, _ = stripes(64, 64)
        store = array_store(str(tmp_path / "nolab.zarr"), image, None)
        with pytest.raises(StoreError, match="has no labels"):
            check_inputs(_config([store.url], str(tmp_path / "runs")))

    def test_bands_do_not_match_the_model(self, tmp_path):
        image, labels = stripes(64, 64, bands=3)
        store = array_store(str(tmp_path / "three.zarr"), image, labels)
        with pytest.raises(StoreError, match=r"in_chans=2 but the stores have 3 bands"):
            check_inputs(_config([store.url], str(tmp_path / "runs")))

    def test_mismatched_stores(self, tmp_path):
        a = array_store(str(tmp_path / "a.zarr"), *stripes(64, 64, bands=2))
        b = array_store(str(tmp_path / "b.zarr"), *stripes(64, 64, bands=3))
        with pytest.raises(StoreError, match="same bands"):
            check_inputs(_config([a.url, b.url], str(tmp_path / "runs")))

    def test_unwritable_storage(self, tmp_path):
        from relaymap.catalog.server import free_port

        store = array_store(str(tmp_path / "a.zarr"), *stripes(64, 64))
        dead = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "AWS_MAX_ATTEMPTS": "1",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
        }
        with environ(dead), pytest.raises(StorageError, match=r"run\.storage_url=s3://bucket"):
            check_inputs(_config([store.url], "s3://bucket/runs"))
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        with pytest.raises(StorageError, match=r"cannot write to run\.storage_url"):
            check_inputs(_config([store.url], str(blocker / "runs")))

    def test_window_must_fit_the_model(self, tmp_path):
        with pytest.raises(ValueError, match="multiple of 32"):
            _config(["x"], "y", data={"window_px": 48})


def _loss(weights: dict, store, steps_seed=0) -> float:
    """Local+global loss of a model with ``weights`` on fixed toy tiles."""
    from relaymap.flows.dataset import TileDataset, data_spec

    spec = data_spec([store], window_px=32, factor=4)
    model = create_model("swinv2_nano_relay", num_classes=2, in_chans=2, spec=spec).eval()
    model.load_state_dict(weights)
    tiles = TileDataset([store.url], spec)
    batch = {k: torch.stack([tiles[i][k] for i in range(len(tiles))]) for k in tiles[0]}
    with torch.no_grad():
        out = model(batch["local"], batch["global"])
        return RelayLoss(factor=4)(out, batch["labels"]).total.item()


def _registered_steps(storage_url: str, run_name: str) -> int:
    """How many checkpoints Ray Train has registered for the run: its controller writes
    ``checkpoint_manager_snapshot.json`` after each one (a checkpoint folder appears before
    it is registered, and only registered ones are resumed from)."""
    from relaymap.catalog.storage import read_bytes

    try:
        snapshot = read_bytes(f"{storage_url}/{run_name}/checkpoint_manager_snapshot.json")
    except FileNotFoundError:
        return 0
    return snapshot.count(b"checkpoint_dir_name")


def _waiter(pid_file):
    """A function that waits for the worker paused at a fault point (its pid in
    ``pid_file``) and a registered checkpoint of the run, and returns the worker's pid."""

    def wait_for_pause(storage_url: str, run_name: str) -> int:
        while True:  # the pid is written just after the file is created
            pid = pid_file.read_text() if pid_file.exists() else ""
            if pid.isdigit() and _registered_steps(storage_url, run_name) >= 1:
                return int(pid)
            time.sleep(0.2)

    return wait_for_pause


@contextlib.contextmanager
def paused_at_step(tmp_path, step: int):
    """Make the last training rank stop at ``step`` (after reporting its checkpoint) and wait
    there (a fault point in ``relaymap.flows.train``) in the Ray processes started in this
    block; yields a function that waits for the paused worker and a registered checkpoint,
    and returns the worker's pid. Nothing is timed: the fault lands at that step, however
    busy the machine is."""
    from relaymap.catalog.faults import ENV, ONCE_FILE

    pid_file = tmp_path / f"paused-{step}.pid"
    with environ({ENV: f"train:step-{step}=pause", ONCE_FILE: str(pid_file)}):
        yield _waiter(pid_file)


@pytest.fixture(scope="module")
def ray_paused_at_step_8(tmp_path_factory):
    """Local Ray (2 CPUs) for this module's in-process runs, one start for all of them. Its
    processes have the fault point of :func:`paused_at_step` at step 8 in their environment,
    disarmed: the fault fires in the first process that creates its pid file, and the file
    is there until a test removes it (:func:`arm`). Yields the pid file."""
    import ray

    from relaymap.catalog.faults import ENV, ONCE_FILE

    pid_file = tmp_path_factory.mktemp("fault") / "paused.pid"
    pid_file.write_text("disarmed")
    ray.shutdown()  # a cluster of our own, started with the fault point in its environment
    with environ({ENV: "train:step-8=pause", ONCE_FILE: str(pid_file)}):
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield pid_file
    ray.shutdown()


def arm(pid_file):
    """Arm the fault point of :func:`ray_paused_at_step_8`: the last training rank of the
    next run to reach step 8 stops there. Returns the function that waits for it."""
    pid_file.unlink()
    return _waiter(pid_file)


#: Checkpoints at step 8 and at the end (the pause is at step 8).
EVERY_8 = {"checkpoint_every": 8}


@pytest.mark.slow
def test_two_node_cluster_losing_a_node(tmp_path):
    """Two one-CPU nodes on loopback (the head and a second node); the second dies mid-run
    (its processes killed) and a new one joins; training resumes from the last checkpoint
    and finishes on two nodes. ``Cluster.add_node`` must run on the main thread, so
    training runs in a thread."""
    import ray
    from ray.cluster_utils import Cluster

    store = _toy(tmp_path)
    storage = str(tmp_path / "runs")
    ray.shutdown()  # a cluster of our own
    fast_health = {
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 3,
        "health_check_initial_delay_ms": 0,
    }
    with paused_at_step(tmp_path, 8) as wait_for_pause:
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast_health}
        )
        second = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
    out: dict = {}
    try:
        config = _config([store.url], storage, optim={"steps": 12}, run={"max_failures": 2})
        runner = threading.Thread(target=lambda: out.update(result=train(config)), daemon=True)
        runner.start()
        wait_for_pause(storage, "toy")  # a checkpoint is registered, a worker waits at step 8
        cluster.remove_node(second, allow_graceful=False)
        cluster.add_node(num_cpus=1)  # the replacement a cluster autoscaler brings
        runner.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    result = out["result"]
    assert result.metrics["num_nodes"] == 2, "workers were not spread over two nodes"
    assert result.metrics["step"] == 12 and result.metrics["start_step"] > 0


@pytest.mark.slow
def test_two_workers_on_s3_survive_a_killed_worker_and_resume(tmp_path, s3, ray_paused_at_step_8):
    store = _toy(tmp_path)
    storage = "s3://relaymap-test/runs"
    wait_for_pause = arm(ray_paused_at_step_8)
    killed: list[int] = []

    def kill():  # the worker this test paused, by its pid
        pid = wait_for_pause(storage, "toy")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = threading.Thread(target=kill, daemon=True)
    watcher.start()
    # a checkpoint (an upload to S3) at step 8, where the worker is killed, and at the end
    first = train(_config([store.url], storage, optim={"steps": 16}, run=EVERY_8))
    watcher.join()
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert first.metrics["step"] == 16
    assert first.metrics["start_step"] == 8  # the restarted workers resumed a checkpoint
    assert _registered_steps(storage, "toy") >= 1
    # what a worker killed mid-upload leaves: a checkpoint Ray never registered
    from relaymap.catalog.storage import atomic_write, exists

    orphan = f"{storage}/toy/checkpoint_2000-01-01_00-00-00.000000"
    atomic_write(f"{orphan}/state.pt", b"half a checkpoint")
    # a second run of the same name with more steps resumes where the first ended
    second = train(_config([store.url], storage, optim={"steps": 20}, run=EVERY_8))
    # cleaned by the run that came next (SeaweedFS may list the emptied prefix a while)
    assert not exists(f"{orphan}/state.pt")
    assert second.metrics["start_step"] == 16 and second.metrics["step"] == 20
    from safetensors.torch import load_file

    from relaymap.catalog.storage import read_bytes

    (tmp_path / "w.safetensors").write_bytes(read_bytes(second.weights_url))
    trained = load_file(str(tmp_path / "w.safetensors"))
    torch.manual_seed(0)
    initial = create_model("swinv2_nano_relay", num_classes=2, in_chans=2).state_dict()
    assert _loss(trained, store) < 0.8 * _loss(initial, store)
    item = second.model_item
    assert item.properties["mlm:name"] == "swinv2_nano_relay"
    assert item.properties["relaymap:metrics"]["step"] == 20
    # inference loads the exported file back, with its input contract (from S3)
    from relaymap.flows.trained import load_trained

    info, model = load_trained(second.weights_url)
    assert info.spec.bands == store.bands and info.spec.window_px == 32
    assert info.spec.mean == pytest.approx(store.attrs.band_mean)
    assert info.spec.factor == 4
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


def test_a_rerun_with_other_settings_or_data_is_refused(tmp_path):
    """A run name is claimed by its settings and data; a resume may only go on longer."""
    from relaymap.flows.train import claim_run

    store = _toy(tmp_path)
    runs = str(tmp_path / "runs")
    config = _config([store.url], runs)
    spec = check_inputs(config)
    claim_run(config, spec)
    claim_run(_config([store.url], runs, optim={"steps": 40}), spec)  # longer: the same run
    claim_run(_config([store.url], runs, run={"num_workers": 1}), spec)  # executes elsewhere
    with pytest.raises(ValueError, match=r"run 'toy' .* was started with other optim"):
        claim_run(_config([store.url], runs, optim={"lr": 1e-3}), spec)
    other = _toy(tmp_path, name="other")
    other_config = _config([other.url], runs)
    with pytest.raises(ValueError, match="other data, stores"):
        claim_run(other_config, check_inputs(other_config))


@pytest.mark.precision
def test_the_exported_model_is_the_best_validation_check(tmp_path, ray_paused_at_step_8):
    """A run whose validation mIoU falls as it learns (validation labels inverted): the
    exported weights are the best check's, the model item says so with its per-class IoU,
    and the validation curve is saved with the run. ``export: last`` gives the last step's
    weights."""
    from relaymap.catalog.storage import read_bytes
    from relaymap.flows.dataset import TileDataset
    from relaymap.flows.train import read_best
    from relaymap.flows.trained import load_trained

    store = _toy(tmp_path)
    val = _toy(tmp_path, name="inverted", inverted=True)
    storage = str(tmp_path / "runs")
    # validation during the run and the check below score at one stated precision
    run = {"val_every": 4, "checkpoint_every": 8, "precision": "fp32"}
    steps = 12  # three checks: steps 4, 8 and 12
    config = _config([store.url], storage, data={"val": [val.url]}, optim={"steps": steps}, run=run)
    result = train(config)
    history = json.loads(read_bytes(f"{storage}/toy/history.json"))
    checks = {h["step"]: h["val_miou"] for h in history if "val_miou" in h}
    assert sorted(checks) == [4, 8, 12]
    best_step = max(checks, key=checks.get)
    assert best_step < steps, f"precondition: the score must fall as the model learns: {checks}"
    record = result.model_item.properties["relaymap:checkpoint"]
    assert record == {
        "exported": "best",
        "step": best_step,
        "val_miou": checks[best_step],
        "last_step": steps,
        "last_val_miou": checks[steps],
    }
    # the exported weights score what the record says, on the validation tiles
    info, model = load_trained(result.weights_url)
    tiles = TileDataset([val.url], info.spec)
    cm = evaluate(model, torch.utils.data.DataLoader(tiles, batch_size=8), 2, precision="fp32")
    assert cm.miou() == pytest.approx(checks[best_step], abs=1e-6)
    validation = result.model_item.properties["relaymap:validation"]
    assert validation["miou"] == pytest.approx(checks[best_step])
    assert set(validation["classes"]) == set(info.spec.class_names)
    curve = read_bytes(result.model_item.assets["validation_curve"].href).decode().splitlines()
    assert curve[0].startswith("step,val_miou,iou_") and len(curve) == 1 + len(checks)
    # export: last -> the last step's weights, and the record says so
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from relaymap.flows.train import export

    ray_result = SimpleNamespace(  # what export reads of Ray's Result: the last checkpoint
        checkpoint=Checkpoint(result.checkpoint_path), metrics=result.metrics
    )
    output = config.output.model_copy(update={"export": "last"})
    last = export(config.model_copy(update={"output": output}), info.spec, ray_result, history)
    assert last.model_item.properties["relaymap:checkpoint"]["exported"] == "last"
    _, last_model = load_trained(last.weights_url)
    best_state = read_best(f"{storage}/toy")["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best_state.items())
    assert any(not torch.equal(last_model.state_dict()[k], v) for k, v in best_state.items())
