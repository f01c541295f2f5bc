"""The precision option (issue 27): what ``auto`` resolves to, and that the bf16 paths of
inference and training compute what the fp32 paths compute (no timing here)."""

from __future__ import annotations

import pytest
import torch

from relay_models import RelayLoss, RelayOutput, create_model, evaluate, predict_array, train_step
from relay_models import precision as prec
from relay_models.inference import run_tiles
from tests.relay_models.helpers import BF16_AGREEMENT, assert_bf16_agrees, perturb_norms

pytestmark = pytest.mark.precision

TILE = 32


@pytest.fixture(scope="module")
def relay_model():
    torch.manual_seed(0)
    return perturb_norms(create_model("swinv2_nano_relay", num_classes=4)).eval()


class TestPrecisionOption:
    def test_precision_fixed_values_resolve_to_themselves(self):
        for device in ("cpu", "cuda"):
            assert prec.resolve_precision("fp32", device) == "fp32"
            assert prec.resolve_precision("bf16", device) == "bf16"

    @pytest.mark.parametrize("native", [True, False])
    def test_precision_auto_follows_the_cpu(self, monkeypatch, native):
        monkeypatch.delenv(prec.NATIVE_BF16_ENV, raising=False)
        monkeypatch.setattr(prec, "_cpu_native_bf16", lambda: native)
        assert prec.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
        ctx = prec.autocast("auto", "cpu")
        with ctx:
            dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        assert dtype == (torch.bfloat16 if native else torch.float32)

    @pytest.mark.parametrize("native", [True, False])
    def test_precision_switch_makes_auto_resolve_as_on_the_other_host(self, monkeypatch, native):
        """``RELAYMAP_NATIVE_BF16`` overrides the CPU's flags either way (``.ci/run`` reruns
        the precision tests with it flipped); anything but 0/1 is refused by name."""
        monkeypatch.setattr(prec, "_cpu_native_bf16", lambda: not native)
        monkeypatch.setenv(prec.NATIVE_BF16_ENV, "1" if native else "0")
        assert prec.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
        monkeypatch.setenv(prec.NATIVE_BF16_ENV, "yes")
        with pytest.raises(ValueError, match="RELAYMAP_NATIVE_BF16 must be 0 or 1"):
            prec.resolve_precision("auto", "cpu")

    def test_precision_auto_is_fp32_without_a_gpu(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert prec.resolve_precision("auto", "cuda") == "fp32"

    def test_precision_cpu_detection_reads_the_capability_flags(self, monkeypatch):
        prec._cpu_native_bf16.cache_clear()
        try:
            monkeypatch.setattr(prec.platform, "machine", lambda: "x86_64")
            for flags, want in (
                ({"amx_bf16": True, "avx512_bf16": False}, True),
                ({"amx_bf16": False, "avx512_bf16": True}, True),
                ({"amx_bf16": False, "avx512_bf16": False, "avx512_f": True}, False),
            ):
                monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda f=flags: f)
                prec._cpu_native_bf16.cache_clear()
                assert prec._cpu_native_bf16() is want
        finally:
            prec._cpu_native_bf16.cache_clear()

    def test_precision_rejects_other_values(self):
        with pytest.raises(ValueError, match="auto, fp32, bf16"):
            prec.resolve_precision("fp16", "cpu")


def test_bf16_precision_maps_like_fp32(relay_model):
    """The bf16 map of a scene: float32 probabilities, close to fp32's, nearly the same
    classes (random weights make near-ties common, so the bound is looser than the 99.5%
    a trained model reaches in bench/precision.py)."""
    torch.manual_seed(1)
    scene = torch.randn(3, 56, 48)  # 2 x 2 tiles (bf16 matmuls are emulated on many CPUs)
    fp32 = predict_array(relay_model, scene, tile_px=TILE, overlap_px=4, precision="fp32")
    bf16 = predict_array(relay_model, scene, tile_px=TILE, overlap_px=4, precision="bf16")
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.sum(0), torch.ones(56, 48), atol=1e-5, rtol=0)
    assert (bf16 - fp32).abs().max() < 0.05
    assert (bf16.argmax(0) == fp32.argmax(0)).float().mean() > 0.95


def test_precision_of_run_tiles_is_the_option(relay_model, monkeypatch):
    seen = []
    real = prec.autocast

    def spy(precision, device):
        seen.append(prec.resolve_precision(precision, device))
        return real(precision, device)

    monkeypatch.setattr("relay_models.engines.autocast", spy)
    tiles = {
        "local": torch.randn(2, 3, TILE, TILE),
        "global": torch.randn(2, 3, TILE, TILE),
        "valid": torch.ones(2, TILE, TILE, dtype=torch.bool),
    }
    probs, ran = run_tiles(relay_model, tiles, torch.device("cpu"), precision="bf16")
    assert seen == ["bf16"] and probs.dtype.name == "float32" and ran.all()


class _TinyRelay(torch.nn.Module):
    """A two-window model small enough for bf16 steps on a CPU that emulates bf16."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.local = torch.nn.Conv2d(3, classes, 3, padding=1)
        self.global_ = torch.nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> RelayOutput:
        return RelayOutput(self.local(local), self.global_(global_))


def test_bf16_precision_training_keeps_fp32_weights_and_learns():
    """A bf16-autocast train step runs the forward pass in bf16 while the weights, their
    gradients and the optimiser state stay float32, and the loss (on float32 logits)
    falls over repeated steps on one batch."""
    torch.manual_seed(0)
    model = _TinyRelay().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batch = {
        "local": torch.randn(4, 3, TILE, TILE),
        "global": torch.randn(4, 3, TILE, TILE),
        "labels": torch.randint(0, 3, (4, TILE, TILE)),
    }
    seen = []
    model.local.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss_fn = RelayLoss(factor=4)
    losses = [
        train_step(model, batch, loss_fn, opt, autocast=prec.autocast("bf16", "cpu")).total
        for _ in range(8)
    ]
    assert seen[0] == torch.bfloat16 and losses[0].dtype == torch.float32
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    state = [s for group in opt.state.values() for s in group.values() if torch.is_tensor(s)]
    assert all(s.dtype == torch.float32 for s in state if s.is_floating_point())


def test_precision_evaluate_in_inference_mode_then_train():
    """Validation runs under inference_mode in the middle of training: nothing it leaves
    behind may break the next backward pass."""
    torch.manual_seed(0)
    model = create_model("swinv2_nano_relay", num_classes=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = {
        "local": torch.randn(2, 3, TILE, TILE),
        "global": torch.randn(2, 3, TILE, TILE),
        "labels": torch.randint(0, 3, (2, TILE, TILE)),
    }
    cm = evaluate(model, [batch], 3)
    assert int(cm.counts.sum()) == 2 * TILE * TILE and model.training
    train_step(model, batch, RelayLoss(factor=4), opt)


@pytest.fixture(scope="module")
def trained_ish():
    """A nano relay model with non-trivial norms and a fixed batch of 32 px windows."""
    torch.manual_seed(3)
    model = perturb_norms(create_model("swinv2_nano_relay", num_classes=4), seed=3)
    batch = {
        "local": torch.randn(4, 3, TILE, TILE),
        "global": torch.randn(4, 3, TILE, TILE),
        "labels": torch.randint(0, 4, (4, TILE, TILE)),
    }
    return model, batch


def test_bf16_precision_training_step_agrees_with_fp32(trained_ish):
    """One training step from the same weights on the same batch: the bf16 step's loss is
    within 1% of fp32's and its update points the same way (cosine > 0.99 over all
    parameters): bf16 autocast trains what fp32 trains."""
    import copy

    model, batch = trained_ish
    updates, losses = [], []
    for precision in ("fp32", "bf16"):
        net = copy.deepcopy(model).train()
        before = torch.cat([p.detach().flatten() for p in net.parameters()])
        opt = torch.optim.SGD(net.parameters(), lr=1e-2)
        torch.manual_seed(0)  # the same stochastic depth in both steps
        terms = train_step(
            net, batch, RelayLoss(factor=4), opt, autocast=prec.autocast(precision, "cpu")
        )
        after = torch.cat([p.detach().flatten() for p in net.parameters()])
        updates.append(after - before)
        losses.append(terms.total.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.01)
    cos = torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0).item()
    assert cos > 0.99, cos


def test_bf16_precision_evaluation_agrees_with_fp32(trained_ish):
    """``evaluate`` at bf16 counts nearly the same confusion matrix as at fp32: the share of
    pixels it moves between cells is within the stated bf16 class tolerance."""
    model, batch = trained_ish
    cms = {p: evaluate(model, [batch], 4, precision=p).counts for p in ("fp32", "bf16")}
    assert cms["bf16"].sum() == cms["fp32"].sum()
    moved = (cms["bf16"] - cms["fp32"]).abs().sum().item() / 2 / cms["fp32"].sum().item()
    assert moved <= 1 - BF16_AGREEMENT, moved


def test_bf16_precision_of_an_exported_model(tmp_path, trained_ish):
    """Export keeps float32 weights whatever precision trained them, and the exported model
    loaded back predicts at bf16 within the stated tolerance of its fp32 prediction."""
    from relay_models import load_saved, save_model

    model, batch = trained_ish
    net = create_model("swinv2_nano_relay", num_classes=4)
    net.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    train_step(net.train(), batch, RelayLoss(factor=4), opt, autocast=prec.autocast("bf16", "cpu"))
    save_model(net, tmp_path / "m.safetensors")
    loaded = load_saved((tmp_path / "m.safetensors").read_bytes())
    assert all(
        p.dtype == torch.float32 for p in loaded.state_dict().values() if p.is_floating_point()
    )
    scene = torch.randn(3, 48, 56)
    fp32 = predict_array(loaded, scene, tile_px=TILE, overlap_px=4, precision="fp32")
    bf16 = predict_array(loaded, scene, tile_px=TILE, overlap_px=4, precision="bf16")
    assert_bf16_agrees(bf16, fp32)
