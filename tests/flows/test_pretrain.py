"""``relaymap pretrain``: SimMIM on unlabelled stores with Ray Train, resumed exactly after a
killed worker; its checkpoint loads strictly into every twin of its backbone and its MLM
item is what ``train`` takes as ``pretrained:``."""

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
from click.testing import CliRunner
from safetensors.torch import load as load_safetensors

from relay_models import create_model
from relay_models.pretraining import BACKBONE_KEY, MaskedImageModel, pretrain_step
from relaymap.catalog.storage import read_bytes
from relaymap.flows.cli import main
from relaymap.flows.pretrain import PretrainConfig, check_inputs, pretrain
from relaymap.ingest import StoreError
from tests.flows.stores import array_store
from tests.services import environ
from tests.stac_validate import errors

TWINS = ("", "_relay", "_registers", "_fusion", "_downsample", "_relayfusion")


def _unlabelled(tmp_path, name: str, seed: int):
    """A 128 px two-band store of smooth blobs, without labels."""
    rng = np.random.default_rng(seed)
    blobs = np.kron(rng.normal(size=(8, 8)), np.ones((16, 16)))
    image = np.stack([blobs, np.roll(blobs, 5, axis=1) * 0.5]).astype(np.float32)
    return array_store(str(tmp_path / f"{name}.zarr"), image, None, chunk_px=64)


def _config(stores, storage, **over) -> PretrainConfig:
    cfg = {
        "model": {"name": "swinv2_nano_relay"},
        "data": {"stores": stores, "window_px": 32},
        "optim": {"steps": 4, "batch_size": 4},
        "run": {
            "name": "mim",
            "storage_url": storage,
            "num_workers": 2,
            "checkpoint_every": 2,
            "log_every": 2,
            "max_failures": 1,
            # both runs compare weights: one stated precision (bf16 would be emulated, and
            # slow, on CPUs without bf16 matmuls)
            "precision": "fp32",
        },
        "output": {},
    }
    for section, values in over.items():
        cfg[section] = {**cfg[section], **values}
    return PretrainConfig.model_validate(cfg)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return [_unlabelled(root, f"u{i}", i).url for i in range(2)]


def test_pretrain_step_learns_to_fill_the_hidden_blocks(stores):
    """The plain-PyTorch step a worker runs: the reconstruction loss on hidden blocks
    falls, and only hidden pixels count (a perfect guess there is a zero loss)."""
    from relay_models.pretraining import reconstruction_loss
    from relaymap.flows.dataset import UNLABELLED, IndexedWindowPairs, data_spec
    from relaymap.ingest import open_scene

    spec = data_spec([open_scene(u) for u in stores], window_px=32, factor=4, classes=UNLABELLED)
    torch.manual_seed(0)
    model = create_model("swinv2_nano_relay", num_classes=1, in_chans=2, spec=spec)
    mim = MaskedImageModel(model)
    data = IndexedWindowPairs(stores, spec, length=64)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]}
    assert set(batch) == {"local", "valid", "global", "global_valid"}
    opt = torch.optim.AdamW(mim.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = [pretrain_step(mim, batch, opt, generator=gen).total.item() for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0], losses
    target = batch["local"]
    hidden = torch.zeros(8, 8, 8, dtype=torch.bool)
    hidden[:, :2, :2] = True
    wrong_outside = target.clone()
    wrong_outside[..., 8:, 8:] += 5.0  # off only where nothing is hidden
    assert reconstruction_loss(wrong_outside, target, hidden, None).item() == 0.0


def test_pretrain_bad_input_stops_before_compute(tmp_path, stores):
    other = array_store(
        str(tmp_path / "three.zarr"), np.zeros((3, 64, 64), np.float32), None, chunk_px=64
    )
    with pytest.raises(StoreError, match="same bands"):
        check_inputs(_config([*stores, other.url], str(tmp_path / "runs")))
    with pytest.raises(ValueError, match="multiple of 32"):
        _config(stores, "x", data={"window_px": 48})
    result = CliRunner().invoke(main, ["pretrain", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "missing.yaml" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {stores: [a]}\nmask: {ratio: 1.5}\n")
    result = CliRunner().invoke(main, ["pretrain", str(bad)])
    assert result.exit_code == 2
    assert "mask.ratio" in result.output and "Traceback" not in result.output


@contextlib.contextmanager
def _paused_at(tmp_path, point: str):
    """The first worker reaching ``point`` stops there (after its checkpoint report) and
    writes its pid; yields a function that waits for it and a registered checkpoint."""
    from relaymap.catalog.faults import ENV, ONCE_FILE
    from relaymap.catalog.storage import read_bytes

    pid_file = tmp_path / "paused.pid"

    def registered(url: str) -> bool:
        try:
            return b"checkpoint_dir_name" in read_bytes(f"{url}/checkpoint_manager_snapshot.json")
        except FileNotFoundError:
            return False

    def wait(run_url: str) -> int:
        while True:  # the pid is written just after the file is created
            pid = pid_file.read_text() if pid_file.exists() else ""
            if pid.isdigit() and registered(run_url):
                return int(pid)
            time.sleep(0.2)

    with environ({ENV: f"{point}=pause", ONCE_FILE: str(pid_file)}):
        yield wait


@pytest.mark.slow
def test_pretrain_resumes_exactly_and_loads_into_every_twin(tmp_path, stores):
    """A 2-worker run whose worker is killed after its step-2 checkpoint resumes from it and
    ends with exactly the weights of a run never stopped; the checkpoint loads strictly into
    every twin of its backbone (relay keys used by relay models, reported unused by the
    others); its MLM item validates and ``train`` takes it as ``pretrained:``."""
    import ray

    storage = str(tmp_path / "runs")
    ray.shutdown()  # a cluster of our own, with the fault point in its environment
    with _paused_at(tmp_path, "pretrain:step-2") as wait_for_pause:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        killed: list[int] = []

        def kill() -> None:
            pid = wait_for_pause(f"{storage}/killed")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        watcher = threading.Thread(target=kill, daemon=True)
        watcher.start()
        catalog = str(tmp_path / "catalog")
        pattern = stores[0].rsplit("/", 1)[0] + "/u*.zarr"  # a glob: the same two stores
        resumed = pretrain(
            _config([pattern], storage, run={"name": "killed"}, output={"catalog_url": catalog})
        )
        watcher.join()
        straight = pretrain(_config(stores, storage, run={"name": "straight"}))
    finally:
        ray.shutdown()
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert resumed.metrics["start_step"] == 2 and resumed.metrics["step"] == 4
    assert straight.metrics["start_step"] == 0
    a, b = (load_safetensors(read_bytes(r.weights_url)) for r in (resumed, straight))
    assert a.keys() == b.keys() and "relay_tokens" in a
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run is not the same run"
    torch.manual_seed(0)
    fresh = create_model("swinv2_nano_relay", num_classes=1, in_chans=2).backbone.state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a), "nothing was learnt"

    # the checkpoint's header says what it is
    blob = read_bytes(resumed.weights_url)
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    about = json.loads(header["__metadata__"][BACKBONE_KEY])
    assert about["method"] == "simmim" and about["spec"]["bands"] == ["b0", "b1"]

    # every twin of the backbone takes it, strictly
    for suffix in TWINS:
        name = f"swinv2_nano{suffix}"
        model = create_model(name, num_classes=3, in_chans=2, pretrained=resumed.weights_url)
        own = model.backbone.state_dict()
        assert torch.equal(own["patch_embed.proj.weight"], a["patch_embed.proj.weight"])
        if "relay_tokens" in own:
            assert torch.equal(own["relay_tokens"], a["relay_tokens"])

    # the MLM item: valid, registered, and what train takes as pretrained
    item = resumed.item
    doc = item.to_dict()
    assert list(errors(doc)) == []
    assert doc["properties"]["mlm:pretrained"] is True
    assert "SimMIM" in doc["properties"]["mlm:pretrained_source"]
    href = item.get_self_href()
    assert href and href.endswith(".json")
    model = create_model("swinv2_nano_fusion", num_classes=3, in_chans=2, pretrained=href)
    key = "layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(model.backbone.state_dict()[key], a[key])


def test_pretrain_and_train_configs_make_relative_paths_absolute(tmp_path, monkeypatch):
    """Ray workers run in a working directory of their own: a relative store path or
    ``pretrained`` path (weights or an MLM item) in a config means the folder the config
    was read in, so it is made absolute there; Hub names and URLs stay as written."""
    from relaymap.flows.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    here = f"file://{tmp_path}"
    pre = PretrainConfig.model_validate(
        {"model": {"name": "swinv2_nano_relay", "pretrained": "w.safetensors"},
         "data": {"stores": ["a.zarr", "maps/*/*.zarr", "s3://bucket/b.zarr"]}}
    )  # fmt: skip
    assert pre.data.stores == [f"{here}/a.zarr", f"{here}/maps/*/*.zarr", "s3://bucket/b.zarr"]
    assert pre.model.pretrained == str(tmp_path / "w.safetensors")
    for ref, kept in (
        ("catalog/backbones/items/b.json", False),
        ("swinv2_tiny_window8_256.ms_in1k", True),
        ("hf-hub:org/name@v1", True),
        ("s3://bucket/b.safetensors", True),
    ):
        cfg = TrainConfig.model_validate(
            {"model": {"name": "swinv2_nano_relay", "num_classes": 3, "pretrained": ref},
             "data": {"train": ["scenes/a.zarr"], "val": ["/abs/v.zarr"]}}
        )  # fmt: skip
        assert cfg.model.pretrained == (ref if kept else str(tmp_path / ref))
        assert cfg.data.train == [f"{here}/scenes/a.zarr"]
        assert cfg.data.val == ["file:///abs/v.zarr"]
