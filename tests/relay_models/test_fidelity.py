"""Where we differ from the authors' code on purpose (``docs/fidelity.md``): each choice and
its alternative give the maths each side claims."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from relay_models import RelayLoss, RelayOutput, create_model, warmup_cosine
from relay_models.swin_transformer_v2 import WindowAttention
from tests.relay_models.helpers import perturb_norms

R, WS = 4, 4


@pytest.mark.parametrize(("choice", "relay_value"), [("mid", 8.0), ("zero", 0.0)])
def test_relay_bias_choices(choice, relay_value):
    model = create_model("swinv2_nano_relay", num_classes=2, relay_bias=choice)
    attn = next(m for m in model.modules() if isinstance(m, WindowAttention))
    assert attn.relay_bias == choice
    with torch.no_grad():
        bias = attn.position_bias(WS, R)
        plain = attn.position_bias(WS, 0)
    n = WS * WS
    # patch pairs: 16 * sigmoid(cpb), untouched by relays either way
    assert torch.equal(bias[:, :n, :n], plain)
    assert (plain > 0).all() and (plain < 16).all()
    # every pair involving a relay: ours 16 * sigmoid(0) = 8, the authors' 0
    relay_pairs = torch.cat([bias[:, n:, :].flatten(), bias[:, :n, n:].flatten()])
    assert torch.allclose(relay_pairs, torch.full_like(relay_pairs, relay_value))


def test_relay_bias_applies_to_swin_only():
    with pytest.raises(ValueError, match="Swin V2 models only"):
        create_model("vit_small_relay", num_classes=2, relay_bias="zero")


@pytest.mark.parametrize("std", [0.02, 1.0])
@pytest.mark.parametrize("name", ["swinv2_nano_relay", "vit_small_relay"])
def test_relay_init_std(name, std):
    torch.manual_seed(0)
    tokens = create_model(name, num_classes=2, relays=64, relay_init_std=std).backbone.relay_tokens
    # truncated at +-2 absolute: a unit normal loses ~5% of its tails (sd 0.88)
    expected = std if std < 0.5 else 0.88
    assert tokens.std().item() == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize(("detach", "local_gets_grad"), [(True, False), (False, True)])
def test_consistency_target_detached_or_not(detach, local_gets_grad):
    g = torch.Generator().manual_seed(0)
    local = torch.randn(2, 3, 8, 8, generator=g).requires_grad_()
    glob = torch.randn(2, 3, 8, 8, generator=g).requires_grad_()
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    loss = RelayLoss(factor=2, global_weight=0.0, consistency_weight=1.0, detach_consistency=detach)
    terms = loss(RelayOutput(local, glob), labels)
    reference = RelayLoss(factor=2, global_weight=0.0, consistency_weight=1.0)
    assert terms.consistency.item() == pytest.approx(
        reference(RelayOutput(local, glob), labels).consistency.item()
    )  # the same value: only the gradient differs
    terms.consistency.backward()
    assert (local.grad is not None and local.grad.abs().sum() > 0) == local_gets_grad
    assert glob.grad.abs().sum() > 0


def test_parallel_relays_are_order_free_and_sequential_ones_are_not():
    """Eqs. 11-13: both branches read the same relays and the next relays are their mean,
    so swapping the branches changes nothing; sequential runs global first."""
    model = perturb_norms(create_model("swinv2_nano_relay", num_classes=2)).eval()
    g = torch.Generator().manual_seed(1)
    local, glob = torch.randn(1, 3, 64, 64, generator=g), torch.randn(1, 3, 64, 64, generator=g)
    bb = model.backbone
    with torch.no_grad():
        for mode, same in (("parallel", True), ("sequential", False)):
            a = bb.forward_branches({"global": glob, "local": local}, relay_mode=mode)
            b = bb.forward_branches({"local": local, "global": glob}, relay_mode=mode)
            diff = (a["local"][-1] - b["local"][-1]).abs().max().item()
            assert (diff < 1e-5) == same, (mode, diff)


def test_global_branch_in_the_first_blocks_only():
    torch.manual_seed(0)
    full = perturb_norms(create_model("swinv2_nano_relay", num_classes=2)).eval()
    blocks = sum(len(s.blocks) for s in full.backbone.layers)
    short = create_model("swinv2_nano_relay", num_classes=2, relay_blocks=2).eval()
    every = create_model("swinv2_nano_relay", num_classes=2, relay_blocks=blocks).eval()
    short.load_state_dict(full.state_dict())
    every.load_state_dict(full.state_dict())
    g = torch.Generator().manual_seed(2)
    local, glob = torch.randn(1, 3, 64, 64, generator=g), torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        out = short(local, glob)
        assert out.global_ is None  # no global logits: its branch stopped at block 2
        other = short(local, torch.randn(1, 3, 64, 64, generator=g)).local
        assert (out.local - other).abs().max() > 1e-4  # the first blocks still relay context
        assert torch.allclose(every(local, glob).local, full(local, glob).local, atol=1e-6)
        assert (out.local - full(local, glob).local).abs().max() > 1e-4
    # the loss then has the local term only
    terms = RelayLoss(factor=4)(out, torch.zeros(1, 64, 64, dtype=torch.long))
    assert terms.global_.item() == 0 and terms.consistency.item() == 0


def test_warmup_then_cosine():
    steps, lr = 100, 1e-3
    lrs = [warmup_cosine(s, steps, lr, 0.05) for s in range(steps)]
    assert lrs[0] == pytest.approx(lr / 5) and lrs[4] == pytest.approx(lr)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # then only down
    mid = 5 + (steps - 5) // 2
    assert lrs[mid] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (mid - 5) / 95)))
    assert lrs[-1] < 0.01 * lr


def test_zero_init_extra_band_leaves_the_rgb_response_alone():
    """Extra bands (here a 4th) start with zero patch-embedding weights: a model adapted to
    RGB + NIR answers exactly as the RGB model until training uses the new band."""
    from relay_models.weights import adapt_input_conv

    torch.manual_seed(0)
    rgb = torch.randn(8, 3, 4, 4)
    four = adapt_input_conv(rgb, 4)
    assert torch.equal(four[:, :3], rgb) and not four[:, 3].any()
    x = torch.randn(1, 4, 8, 8)
    assert torch.allclose(F.conv2d(x, four, stride=4), F.conv2d(x[:, :3], rgb, stride=4))


@pytest.mark.parametrize(
    ("key", "value"), [("relay_bias", "half"), ("relay_init_std", 0.0), ("relay_blocks", 0)]
)
def test_bad_relay_options_name_the_key(key, value):
    from pydantic import ValidationError

    from relay_models import ModelConfig

    with pytest.raises(ValidationError, match=key):
        ModelConfig(name="swinv2_nano_relay", num_classes=2, **{key: value})
