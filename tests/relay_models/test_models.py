"""Registry-wide checks, relay behaviour and bad input for every model family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relay_models import RelayOutput, create_model, list_models, model_stats
from tests.relay_models.helpers import perturb_norms

SIDE = 64  # the smallest side all families accept quickly (Swin: multiple of 32)


def _inputs(model, batch=2, side=SIDE, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.backbone.in_chans
    return (
        torch.randn(batch, c, side, side, generator=g),
        torch.randn(batch, c, side, side, generator=g),
    )


def _run(model, local, global_):
    return model(local, global_) if model.takes_global else model(local)


class TestRegistry:
    def test_names(self):
        names = list_models()
        for base in (
            "swinv2_nano",
            "swinv2_tiny",
            "swinv2_small",
            "swinv2_base",
            "vit_small",
            "vit_base",
        ):
            for suffix in ("", "_relay", "_registers", "_fusion", "_downsample"):
                assert base + suffix in names
        assert list_models("vit_*_relay") == ["vit_base_relay", "vit_small_relay"]

    @pytest.mark.parametrize("name", list_models())
    def test_forward_backward(self, name):
        torch.manual_seed(0)
        model = create_model(name, num_classes=3, in_chans=4)
        local, global_ = _inputs(model)
        out = _run(model, local, global_)
        if model.takes_global:
            assert isinstance(out, RelayOutput)
            logits = [out.local] + ([out.global_] if out.global_ is not None else [])
        else:
            assert isinstance(out, torch.Tensor)
            logits = [out]
        for t in logits:
            assert t.shape == (2, 3, SIDE, SIDE) and t.dtype == torch.float32
            assert torch.isfinite(t).all()
        sum(t.square().mean() for t in logits).backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert not unused, f"parameters without gradient (DDP would fail): {unused[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    def test_fpn_head(self):
        model = create_model("swinv2_nano_relay", num_classes=5, head="fpn")
        out = model(*_inputs(model))
        assert out.local.shape == out.global_.shape == (2, 5, SIDE, SIDE)

    @pytest.mark.parametrize("name", ["swinv2_nano_relay", "vit_small_relay"])
    def test_convt_head_is_its_transposed_convolution(self, name):
        """The head computes its ``ConvTranspose2d`` as a matmul: same outputs, same
        gradients, same state-dict keys."""
        torch.manual_seed(0)
        head = create_model(name, num_classes=5, in_chans=4).decode_head
        conv = head.proj
        assert {k for k, _ in head.named_parameters()} == {"proj.weight", "proj.bias"}
        x = torch.randn(3, conv.in_channels, 2, 3, requires_grad=True)
        fast, slow = head([x]), conv(x)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(slow)
        grads = [
            torch.autograd.grad((y * g).sum(), (x, conv.weight, conv.bias)) for y in (fast, slow)
        ]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    def test_other_side_lengths(self):
        model = create_model("vit_small_relay", num_classes=2).eval()
        with torch.no_grad():
            out = model(*_inputs(model, batch=1, side=96))
        assert out.local.shape == (1, 2, 96, 96)


class TestRelayOverhead:
    @pytest.mark.parametrize("base", ["swinv2_small", "vit_small"])
    def test_params_and_flops(self, base):
        plain, relay = model_stats(base), model_stats(base + "_relay")
        assert relay.params / plain.params - 1 < 0.02
        assert 1.9 <= relay.gflops / plain.gflops <= 2.2


@pytest.mark.parametrize("name", ["swinv2_nano_relay", "vit_small_relay"])
class TestRelaysMatter:
    @pytest.mark.parametrize("mode", ["sequential", "parallel"])
    def test_global_input_changes_local_output(self, name, mode):
        torch.manual_seed(0)
        model = perturb_norms(create_model(name, num_classes=3, relay_mode=mode)).eval()
        local, global_ = _inputs(model)
        with torch.no_grad():
            a = model(local, global_).local
            b = model(local, torch.randn_like(global_)).local
        assert (a - b).abs().max() > 1e-3

    def test_registers_ignore_global_input(self, name):
        model = perturb_norms(create_model(name.replace("_relay", "_registers"), num_classes=3))
        local, global_ = _inputs(model)
        with torch.no_grad():
            a = model.eval()(local, global_).local
            b = model(local, torch.randn_like(global_)).local
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_local_loss_alone_reaches_relays_and_global_branch(self, name):
        model = perturb_norms(create_model(name, num_classes=3))
        local, global_ = _inputs(model)
        labels = torch.randint(0, 3, (2, SIDE, SIDE))
        F.cross_entropy(model(local, global_).local, labels).backward()
        bb = model.backbone
        assert bb.relay_tokens.grad.abs().sum() > 0
        # the global window reaches the local loss only through the relays
        assert bb.patch_embed_global.proj.weight.grad.abs().sum() > 0
        projections = [m.relay_proj for m in getattr(bb, "layers", []) if m.relay_proj is not None]
        for proj in projections:
            assert proj.weight.grad.abs().sum() > 0

    def test_sequential_and_parallel_differ(self, name):
        seq = perturb_norms(create_model(name, num_classes=3)).eval()
        par = create_model(name, num_classes=3, relay_mode="parallel").eval()
        par.load_state_dict(seq.state_dict())
        local, global_ = _inputs(seq)
        with torch.no_grad():
            assert (seq(local, global_).local - par(local, global_).local).abs().max() > 1e-4


def test_context_baselines_use_the_global_crop():
    """Decision fusion averages local logits with the upsampled global crop; downsampling
    is the upsampled global crop alone (checked through a shared plain model)."""
    fusion = perturb_norms(create_model("swinv2_nano_fusion", num_classes=3)).eval()
    down = create_model("swinv2_nano_downsample", num_classes=3).eval()
    plain = create_model("swinv2_nano", num_classes=3).eval()
    down.load_state_dict(fusion.state_dict())
    plain.load_state_dict(fusion.state_dict())
    local, global_ = _inputs(plain, side=128)
    with torch.no_grad():
        g = plain(global_)
        crop = F.interpolate(g[..., 48:80, 48:80], size=(128, 128), mode="bilinear")
        torch.testing.assert_close(down(local, global_).local, crop)
        torch.testing.assert_close(fusion(local, global_).local, (plain(local) + crop) / 2)


class TestBadInput:
    def test_unknown_name_lists_choices(self):
        with pytest.raises(ValueError, match=r"valid models: .*swinv2_nano_relay"):
            create_model("swinv2_huge_relay", num_classes=2)

    def test_unknown_head_and_mode(self):
        with pytest.raises(ValueError, match="valid heads: convt, fpn"):
            create_model("swinv2_nano", num_classes=2, head="unet")
        with pytest.raises(ValueError, match="relay_mode must be one of"):
            create_model("swinv2_nano_relay", num_classes=2, relay_mode="interleaved")
        with pytest.raises(ValueError, match="fpn"):
            create_model("vit_small", num_classes=2, head="fpn")

    def test_mismatched_windows(self):
        model = create_model("swinv2_nano_relay", num_classes=2)
        with pytest.raises(ValueError, match="same shape"):
            model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 128, 128))

    def test_wrong_channel_count(self):
        model = create_model("swinv2_nano_relay", num_classes=2, in_chans=4)
        with pytest.raises(ValueError, match="3 channels but the model expects in_chans=4"):
            model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))

    @pytest.mark.parametrize(
        ("name", "side", "multiple"), [("swinv2_nano", 100, 32), ("vit_small", 72, 16)]
    )
    def test_side_not_a_multiple(self, name, side, multiple):
        model = create_model(name, num_classes=2)
        with pytest.raises(ValueError, match=f"not a multiple of {multiple} px"):
            model(torch.randn(1, 3, side, side))

    def test_side_without_centred_crop(self):
        model = create_model("vit_small_relay", num_classes=2, factor=3)
        with pytest.raises(ValueError, match="centred whole-pixel crop"):
            model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    "name", ["swinv2_nano", "swinv2_nano_relay", "swinv2_nano_fusion", "swinv2_nano_registers"]
)
def test_predict_local_is_the_local_output_of_forward(name):
    """The tiled engine's call: the same local logits, the relay model without decoding
    its global branch."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=4).eval()
    local, global_ = torch.randn(2, 4, 64, 64), torch.randn(2, 4, 64, 64)
    with torch.inference_mode():
        out = model(local, global_) if model.takes_global else model(local)
        want = out.local if isinstance(out, RelayOutput) else out
        got = model.predict_local(local, global_)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
