"""The engine of a mapping job (``relaymap.flows.engine``): the ONNX export made once beside
the weights and loaded as it is; an export that fails maps with torch, said in one line."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from relay_models import predict_array
from relay_models.engines import OnnxEngine
from relaymap.flows import engine as flows_engine
from relaymap.flows.engine import load_engine, onnx_url, plan_engine
from relaymap.flows.options import MapOptions
from relaymap.flows.trained import load_trained, read_info

TILE = 64


@pytest.fixture
def fresh_model(tmp_path, scenes):
    """The trained test model at a fresh path: no export beside it yet."""
    path = tmp_path / "model.safetensors"
    shutil.copy(scenes["model"], path)
    return str(path)


def test_engine_export_is_made_once_beside_the_weights_and_loaded(fresh_model, scenes, monkeypatch):
    info = read_info(fresh_model)
    opts = MapOptions(engine="onnxruntime")
    engine, url = plan_engine(info, opts, TILE, use_gpu=False)
    assert engine == "onnxruntime" and url == onnx_url(info, TILE)
    assert url.startswith(info.weights_url + ".") and url.endswith(f".{TILE}px.onnx")
    folder = fresh_model.rsplit("/", 1)[0]
    assert sorted(p.name for p in Path(folder).iterdir()) == [
        "model.safetensors",
        url.rsplit("/", 1)[-1],
    ]  # one file beside the weights, no temporary left
    # a second job finds it: nothing is exported again
    monkeypatch.setattr(flows_engine, "export_onnx", _no_export)
    assert plan_engine(info, opts, TILE, use_gpu=False) == ("onnxruntime", url)
    # another tile size is another graph; other weights another key
    assert onnx_url(info, 128) != url
    assert onnx_url(read_info(scenes["model"]), TILE) == url.replace(fresh_model, scenes["model"])
    # what an actor loads maps like the model in torch at fp32
    loaded_info, ort = load_engine(
        fresh_model, "onnxruntime", url, device=torch.device("cpu"), threads=1
    )
    assert isinstance(ort, OnnxEngine) and loaded_info.spec == info.spec
    _, model = load_trained(fresh_model)
    image = torch.randn(len(info.spec.bands), 100, 90, generator=torch.Generator().manual_seed(0))
    ours = predict_array(ort, image, tile_px=TILE)
    ref = predict_array(model, image, tile_px=TILE, precision="fp32")
    assert float((ours - ref).abs().max()) <= 1e-4
    assert float((ours.argmax(0) == ref.argmax(0)).float().mean()) >= 0.9999


def _no_export(*a, **k):
    raise AssertionError("exported again")


def test_engine_export_failure_falls_back_to_torch_with_one_line(fresh_model, monkeypatch, caplog):
    """The failure is injected at the exporter (``torch.onnx.export`` raises, as it does on
    an operator it cannot translate): the job runs in torch, one warning line says why, and
    nothing is written beside the weights."""

    def fail(*a, **k):
        raise RuntimeError("Exporting the operator 'aten::fancy' is not supported\ndetails")

    monkeypatch.setattr(torch.onnx, "export", fail)
    info = read_info(fresh_model)
    with caplog.at_level(logging.WARNING, logger="relaymap"):
        got = plan_engine(info, MapOptions(engine="onnxruntime"), TILE, use_gpu=False)
    assert got == ("torch", None)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("relaymap")]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "ONNX export of swinv2_nano_relay failed: RuntimeError" in lines[0]
    assert lines[0].endswith("mapping with torch instead")
    folder = Path(fresh_model).parent
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]


def test_engine_torch_and_bad_combinations_export_nothing(fresh_model):
    info = read_info(fresh_model)
    assert plan_engine(info, MapOptions(engine="torch"), TILE, use_gpu=False) == ("torch", None)
    assert plan_engine(info, MapOptions(engine="auto"), TILE, use_gpu=True) == ("torch", None)
    with pytest.raises(ValueError, match="runs on CPUs"):
        plan_engine(info, MapOptions(engine="onnxruntime"), TILE, use_gpu=True)
    with pytest.raises(ValueError, match="runs fp32"):
        MapOptions(engine="onnxruntime", precision="bf16")
    assert not list(Path(fresh_model).parent.glob("*.onnx"))


@pytest.mark.slow
def test_engine_onnxruntime_maps_an_area_cell_like_torch(fresh_model, tmp_path):
    """One cell of an area run (``map_cell``, as a ``CellMapper`` actor runs it) with the
    export in ONNX Runtime and with the model in torch at fp32: the same class COG."""
    import numpy as np
    import rasterio

    from relaymap.catalog import serve_stac
    from relaymap.flows.area import plan
    from relaymap.flows.cells import map_cell

    from .area_data import config, make_source

    col = make_source(str(tmp_path / "source"))
    with serve_stac([col]) as api:
        out = str(tmp_path / "out")
        cfg = config(api, fresh_model, out, period="2026-01", options={"precision": "fp32"})
        task = plan(cfg).tasks[0]
    info = read_info(fresh_model)
    engine, url = plan_engine(info, MapOptions(engine="onnxruntime"), TILE, use_gpu=False)
    cpu = torch.device("cpu")
    _, ort = load_engine(fresh_model, engine, url, device=cpu, threads=1)
    maps = []
    for model in (ort, load_trained(fresh_model)[1]):
        result = map_cell(model, info, task, cpu)
        assert result["status"] == "mapped", result
        with rasterio.open(result["item"]["assets"]["classes"]["href"]) as src:
            maps.append(src.read(1))
    ours, ref = maps
    assert (ours == 255).sum() == (ref == 255).sum() > 0  # the same nodata (clouds)
    assert (ours == ref).mean() >= 0.9999
    assert len(np.unique(ref[ref != 255])) > 1
