"""Inference engines (``relay_models.engines``): every model family's ONNX export run by ONNX
Runtime maps like the model in PyTorch at fp32, through the tiled engine; the ``auto``
rule; what an export refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relay_models import create_model, predict_array
from relay_models import precision as prec
from relay_models.engines import (
    ExportError,
    OnnxEngine,
    TorchEngine,
    export_onnx,
    resolve_engine,
)
from tests.relay_models.helpers import perturb_norms

TILE = 64
#: The stated agreement of ONNX Runtime with PyTorch, both fp32: the same classes on all but
#: one pixel in 10,000, and probabilities within 1e-4 (kernels differ only in summation
#: order; measured ~1e-7).
ENGINE_AGREEMENT, ENGINE_PROB_ERROR = 0.9999, 1e-4


@pytest.fixture(scope="module")
def scene():
    g = torch.Generator().manual_seed(7)
    image = torch.randn(3, 120, 136, generator=g)
    image[:, 100:, :30] = float("nan")  # a nodata corner: tiles without data are skipped
    return image


@pytest.mark.parametrize(
    "suffix", ["", "_relay", "_fusion", "_downsample", "_registers", "_relayfusion"]
)
def test_engine_onnxruntime_maps_every_family_like_torch_fp32(suffix, scene):
    """Each family (sliding window: one input; the others: two) exports with a dynamic
    batch; the tiled engine with the export in ONNX Runtime gives the classes and
    probabilities of the model in PyTorch at fp32 (LayerNorms perturbed: a fresh Swin V2
    is nearly an identity per block, which would hide errors)."""
    torch.manual_seed(0)
    model = perturb_norms(create_model(f"swinv2_nano{suffix}", num_classes=5), seed=1).eval()
    engine = OnnxEngine(export_onnx(model, TILE), model.spec, threads=1)
    # one input per window the model reads: the downsampling baseline reads only the global
    # window, the registers baseline only the local one
    reads = {"": ["local"], "_downsample": ["global"], "_registers": ["local"]}
    assert engine.inputs == reads.get(suffix, ["local", "global"])
    kw = {"tile_px": TILE, "overlap_px": 8, "batch_size": 3}  # batches of 3, then a rest
    ours = predict_array(engine, scene, **kw)
    ref = predict_array(model, scene, precision="fp32", **kw)
    valid = torch.isfinite(scene).all(0)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert float((ours - ref).abs().max()) <= ENGINE_PROB_ERROR
    agree = float((ours.argmax(0) == ref.argmax(0))[valid].float().mean())
    assert agree >= ENGINE_AGREEMENT
    assert (ref.sum(0)[valid] > 0.99).all()  # every valid pixel was mapped, by both
    assert torch.equal(ours.sum(0) == 0, ref.sum(0) == 0)


def test_engine_export_is_checked_and_runs_only_its_tile_size():
    model = perturb_norms(create_model("swinv2_nano", num_classes=3)).eval()
    engine = OnnxEngine(export_onnx(model, TILE), model.spec, threads=1)
    assert not any(m.training for m in model.modules())  # the model is left in eval mode
    with pytest.raises(ValueError, match="64 px tiles, got 32 px"):
        engine(torch.zeros(1, 3, 32, 32))

    class Broken(torch.nn.Module):  # an export that does not compute the model
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.spec, self.config = model, model.spec, model.config

        def predict_local(self, local, global_=None):  # the trace keeps batch 2's branch
            return self.inner.predict_local(local) * (2 if local.shape[0] == 2 else 1)

    with pytest.raises(ExportError, match="differs from the model"):
        export_onnx(Broken(), TILE)


def test_engine_auto_rule(monkeypatch):
    """``auto``: ONNX Runtime fp32 on a CPU, with or without native bf16 (it measured faster
    than PyTorch in bf16 there too), unless bf16 is asked for; torch on CUDA."""
    for native in (True, False):
        monkeypatch.setattr(prec, "native_bf16", lambda device, native=native: native)
        assert resolve_engine("auto", "auto", "cpu") == "onnxruntime"
    assert resolve_engine("auto", "fp32", "cpu") == "onnxruntime"
    assert resolve_engine("auto", "bf16", "cpu") == "torch"
    assert resolve_engine("auto", "auto", "cuda") == "torch"
    assert resolve_engine("torch", "fp32", "cpu") == "torch"
    assert resolve_engine("onnxruntime", "auto", "cpu") == "onnxruntime"
    with pytest.raises(ValueError, match="runs fp32"):
        resolve_engine("onnxruntime", "bf16", "cpu")
    with pytest.raises(ValueError, match="runs on CPUs"):
        resolve_engine("onnxruntime", "fp32", "cuda")
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("tensorrt", "fp32", "cpu")


def test_engine_torch_is_the_model_at_its_precision():
    model = perturb_norms(create_model("swinv2_nano_relay", num_classes=3)).eval()
    x = torch.randn(2, 3, TILE, TILE)
    ours = TorchEngine(model, precision="fp32")(x, x)
    with torch.inference_mode():
        ref = model.predict_local(x, x).softmax(1)
    assert TorchEngine(model, precision="fp32").name == "torch fp32"
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())
