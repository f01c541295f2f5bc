"""Issue 29: how the windows' relay copies are pooled (Swin V2), each option against a direct
computation, and the option's life in the config (saved, read back, rebuilt)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from relay_models import ModelConfig, create_model, load_saved, read_saved, save_model
from relay_models.swin_transformer_v2 import RELAY_POOLS, WindowAttention, shift_mask
from tests.relay_models.helpers import perturb_all, perturb_norms

B, NW, WS, R, C, HEADS = 2, 4, 4, 3, 16, 2
N = WS * WS


def _attention(pool: str, seed: int = 0) -> WindowAttention:
    torch.manual_seed(seed)
    attn = WindowAttention(C, HEADS)
    perturb_all(attn, seed, scale=0.5)
    attn.relay_pool = pool
    return attn.eval()


def _windows(seed: int = 1) -> torch.Tensor:
    """``(B, nW, N + R, C)``: each window's patches, then the same relay copies."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(B, NW, N, C, generator=g)
    relays = torch.randn(B, 1, R, C, generator=g).expand(-1, NW, -1, -1)
    return torch.cat([patches, relays], dim=2)


def _qkv(attn: WindowAttention, x: torch.Tensor):
    """The module's scaled queries, normalised keys and values, ``(B, nW, nH, T, d)``."""
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias).view(*x.shape[:3], 3, HEADS, -1)
    q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
    scale = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
    return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), v


def _bias(attn: WindowAttention, mask: torch.Tensor | None) -> torch.Tensor:
    """``(nW, nH, T, T)``: position bias plus the shift mask (relay rows/columns unmasked)."""
    bias = attn.position_bias(WS, R).expand(NW, -1, -1, -1)
    if mask is not None:
        bias = bias + F.pad(mask, (0, R, 0, R)).unsqueeze(1)
    return bias


def _per_window_relays(attn, x, mask):
    """Each window's attention output for its relay copy, before the projection."""
    q, k, v = _qkv(attn, x)
    logits = q @ k.transpose(-2, -1) + _bias(attn, mask)
    return (logits.softmax(-1) @ v)[..., N:, :]  # B, nW, nH, R, d


def _project(attn, heads_out: torch.Tensor) -> torch.Tensor:
    """``(B, nH, R, d)`` -> ``(B, R, C)`` through the output projection."""
    return attn.proj(heads_out.transpose(1, 2).reshape(B, R, C))


MASKS = {"no shift": None, "shifted": shift_mask(2 * WS, 2 * WS, WS, WS // 2, torch.device("cpu"))}


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_relay_pool_mean_averages_the_window_copies(mask):
    """The authors' code: each window updates its copy; the copies are averaged."""
    attn = _attention("mean")
    x = _windows()
    with torch.no_grad():
        _, relays, _ = attn(x, WS, mask, R)
        per_window = _per_window_relays(attn, x, mask)
        # the mean of the projected copies, as the authors write it
        direct = torch.stack([_project(attn, per_window[:, w]) for w in range(NW)]).mean(0)
    torch.testing.assert_close(relays, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_relay_pool_softmax_is_one_softmax_over_all_windows(mask):
    """``softmax``: a relay attends once over the tokens of every window together (its own
    keys appear in each window, so they count once per window)."""
    attn = _attention("softmax")
    x = _windows()
    with torch.no_grad():
        _, relays, _ = attn(x, WS, mask, R)
        q, k, v = _qkv(attn, x)
        bias = _bias(attn, mask)
        q_relay = q[:, 0, :, N:]  # B, nH, R, d: the same copy in every window
        keys = torch.cat([k[:, w] for w in range(NW)], dim=2)  # B, nH, nW*T, d
        values = torch.cat([v[:, w] for w in range(NW)], dim=2)
        rows = torch.cat([bias[w, :, N:, :] for w in range(NW)], dim=-1)  # nH, R, nW*T
        direct = _project(attn, (q_relay @ keys.transpose(-2, -1) + rows).softmax(-1) @ values)
    torch.testing.assert_close(relays, direct, atol=1e-5, rtol=1e-5)


def test_relay_pool_max_takes_the_largest_copy_per_channel():
    attn = _attention("max")
    x = _windows()
    with torch.no_grad():
        _, relays, _ = attn(x, WS, None, R)
        direct = _project(attn, _per_window_relays(attn, x, None).amax(1))
    torch.testing.assert_close(relays, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", RELAY_POOLS)
def test_relay_pool_leaves_patches_alone_and_agrees_on_one_window(pool):
    """Pooling touches only the relays; with one window every pool is that window's copy."""
    x = _windows()
    mean, other = _attention("mean"), _attention(pool)
    with torch.no_grad():
        p_mean, r_mean, _ = mean(x, WS, None, R)
        p_other, r_other, _ = other(x, WS, None, R)
        torch.testing.assert_close(p_other, p_mean)
        one = x[:, :1]
        torch.testing.assert_close(other(one, WS, None, R)[1], mean(one, WS, None, R)[1])
    assert (pool == "mean") == torch.allclose(r_other, r_mean)


def test_relay_pool_softmax_follows_the_evidence():
    """Sparse evidence: only window 2 holds tokens that match the relay's query. ``mean``
    gives that window's update 1/nW of the weight; ``softmax`` nearly all of it."""
    g = torch.Generator().manual_seed(3)
    d = 8
    q = F.normalize(torch.randn(1, 1, 1, 1, d, generator=g), dim=-1).expand(1, NW, 1, 1, d)
    k = F.normalize(torch.randn(1, NW, 1, N, d, generator=g), dim=-1)
    k[:, 2, :, : N // 2] = q[0, 0, 0, 0]  # half of window 2's keys match the query
    out = torch.randn(1, NW, 1, 1, d, generator=g)
    bias = torch.zeros(1, 1, N)
    pooled = {}
    for pool in ("mean", "softmax"):
        attn = _attention(pool)
        pooled[pool] = attn.pool_relays(10 * q, k, out, bias)  # cosine logits scaled by 10
    torch.testing.assert_close(pooled["mean"], out.mean(1))
    z = torch.logsumexp(10 * q @ k.transpose(-2, -1), -1)  # 1, nW, 1, 1: log mass per window
    torch.testing.assert_close(pooled["softmax"], (z.softmax(1).unsqueeze(-1) * out).sum(1))
    assert z.softmax(1)[0, 2].item() > 0.99
    torch.testing.assert_close(pooled["softmax"], out[:, 2], atol=0.05, rtol=0)


@pytest.mark.parametrize("pool", RELAY_POOLS)
def test_relay_pool_model_runs_and_backpropagates(pool):
    model = perturb_norms(create_model("swinv2_nano_relay", num_classes=3, relay_pool=pool))
    local, glob = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    out = model(local, glob)
    (out.local.mean() + out.global_.mean()).backward()
    assert model.backbone.relay_tokens.grad.abs().sum() > 0
    assert all(m.relay_pool == pool for m in model.modules() if isinstance(m, WindowAttention))


def test_relay_pool_is_saved_and_rebuilt(tmp_path):
    torch.manual_seed(0)
    model = perturb_norms(
        create_model("swinv2_nano_relay", num_classes=2, relay_pool="softmax")
    ).eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    with open(path, "rb") as f:
        assert read_saved(f).config.relay_pool == "softmax"
    loaded = load_saved(path.read_bytes())
    assert all(
        m.relay_pool == "softmax" for m in loaded.modules() if isinstance(m, WindowAttention)
    )
    x, g = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, g).local, model(x, g).local)
        # the same weights pooled by the mean answer differently: the option is not a no-op
        mean = create_model("swinv2_nano_relay", num_classes=2, relay_pool="mean").eval()
        mean.load_state_dict(model.state_dict())
        assert (mean(x, g).local - model(x, g).local).abs().max() > 1e-5


def test_relay_pool_bad_values_name_the_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="relay_pool"):
        ModelConfig(name="swinv2_nano_relay", num_classes=2, relay_pool="sum")
    with pytest.raises(ValueError, match="Swin V2 models only"):
        create_model("vit_small_relay", num_classes=2, relay_pool="softmax")


def _first_block_relays(model, local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """The relays after the first block's global step (sequential mode)."""
    seen: list[torch.Tensor] = []
    blk = model.backbone.layers[0].blocks[0]
    hook = blk.register_forward_hook(lambda _m, _i, out: seen.append(out[1]))
    try:
        with torch.no_grad():
            model(local, glob)
    finally:
        hook.remove()
    return seen[0]  # the global step runs first


@pytest.mark.parametrize("relay_norm", ["shared", "own"])
def test_relay_context_norm_update_against_a_direct_computation(relay_norm):
    """``relays + norm(attention update)`` then the block's MLP step: ``shared`` normalises
    with the block's ``norm1`` (zero at init: the relays come out unchanged), ``own`` with
    their own LayerNorm (ones at init: the update arrives whole)."""
    torch.manual_seed(0)
    model = create_model("swinv2_nano_relay", num_classes=2, relay_norm=relay_norm).eval()
    blk = model.backbone.layers[0].blocks[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 8, 32, generator=g)
    relays = torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        _, r_out = blk(x, relays)
        _, attn_r = blk._attn(x, relays)
        norm = blk.relay_norm1 if relay_norm == "own" else blk.norm1
        r1 = relays + F.layer_norm(attn_r, (32,), norm.weight, norm.bias)
        tokens = torch.cat([x.reshape(2, 64, 32), r1], dim=1)
        direct = (tokens + blk.norm2(blk.mlp(tokens)))[:, 64:]
    torch.testing.assert_close(r_out, direct)
    if relay_norm == "shared":
        torch.testing.assert_close(r_out, relays)  # zero-initialised res-post-norms
    else:
        assert (r_out - relays).abs().mean() > 0.5


@pytest.mark.parametrize(("relay_norm", "carries"), [("shared", False), ("own", True)])
def test_relay_context_own_norm_carries_the_global_window_from_init(relay_norm, carries):
    """At initialisation the relays leaving the first global step depend on the global
    window only with their own norm."""
    torch.manual_seed(0)
    model = create_model("swinv2_nano_relay", num_classes=2, relay_norm=relay_norm).eval()
    g = torch.Generator().manual_seed(5)
    local = torch.randn(1, 3, 32, 32, generator=g)
    a = _first_block_relays(model, local, torch.randn(1, 3, 32, 32, generator=g))
    b = _first_block_relays(model, local, torch.randn(1, 3, 32, 32, generator=g))
    assert ((a - b).abs().max() > 1e-3) == carries


def test_relay_context_norm_is_saved_and_rebuilt(tmp_path):
    torch.manual_seed(0)
    model = perturb_norms(create_model("swinv2_nano_relay", num_classes=2, relay_norm="own"))
    path = tmp_path / "m.safetensors"
    save_model(model.eval(), path)
    with open(path, "rb") as f:
        assert read_saved(f).config.relay_norm == "own"
    loaded = load_saved(path.read_bytes())
    assert loaded.backbone.layers[0].blocks[0].relay_norm1 is not None
    x, g = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, g).local, model(x, g).local)
    with pytest.raises(ValueError, match="Swin V2 models only"):
        create_model("vit_small_relay", num_classes=2, relay_norm="own")


def test_relay_context_fusion_hybrid_is_relay_plus_decision_fusion():
    """``_relayfusion``: the relay model's own local logits averaged with its upsampled
    global logits over the local window (a named hybrid, not the paper's relay model)."""
    from relay_models.geometry import global_crop

    torch.manual_seed(0)
    hybrid = perturb_norms(create_model("swinv2_nano_relayfusion", num_classes=3)).eval()
    relay = create_model("swinv2_nano_relay", num_classes=3).eval()
    relay.load_state_dict(hybrid.state_dict())
    local, glob = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, plain = hybrid(local, glob), relay(local, glob)
        rows, cols = global_crop(64, 4)
        up = F.interpolate(plain.global_[..., rows, cols], size=(64, 64), mode="bilinear")
        torch.testing.assert_close(out.local, (plain.local + up) / 2)
        torch.testing.assert_close(out.global_, plain.global_)
        torch.testing.assert_close(hybrid.predict_local(local, glob), out.local)
    with pytest.raises(ValueError, match="relay_blocks"):
        create_model("swinv2_nano_relayfusion", num_classes=3, relay_blocks=2)


@pytest.mark.parametrize("value", [0.0, 0.1])
def test_relay_context_post_norm_init(value):
    """Every residual post-norm starts at ``post_norm_init`` (timm's 0: each block an
    identity, so at 0 the local output does not depend on the global window at all)."""
    from relay_models.swin_transformer_v2 import SwinTransformerV2Block

    torch.manual_seed(0)
    model = create_model("swinv2_nano_relay", num_classes=2, post_norm_init=value).eval()
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerV2Block)]
    for blk in blocks:
        for norm in (blk.norm1, blk.norm2):
            assert torch.equal(norm.weight, torch.full_like(norm.weight, value))
            assert not norm.bias.any()
    g = torch.Generator().manual_seed(6)
    local = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        a = model(local, torch.randn(1, 3, 32, 32, generator=g)).local
        b = model(local, torch.randn(1, 3, 32, 32, generator=g)).local
    assert ((a - b).abs().max() > 1e-6) == (value > 0)
    assert ModelConfig.model_validate(model.config.model_dump()).post_norm_init == value
    with pytest.raises(ValueError, match="Swin V2 models only"):
        create_model("vit_small_relay", num_classes=2, post_norm_init=value + 0.5)


def test_relay_context_own_norm_loads_a_plain_checkpoint(tmp_path):
    """A timm-format backbone checkpoint has no relay norms: they are new keys, like the
    relay tokens, and start at their init."""
    from safetensors.torch import save_file

    plain = perturb_norms(create_model("swinv2_nano", num_classes=2))
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in plain.backbone.state_dict().items()}, path)
    model = create_model("swinv2_nano_relay", num_classes=2, relay_norm="own", pretrained=path)
    blk = model.backbone.layers[0].blocks[0]
    torch.testing.assert_close(blk.norm1.weight, plain.backbone.layers[0].blocks[0].norm1.weight)
    assert torch.equal(blk.relay_norm1.weight, torch.ones_like(blk.relay_norm1.weight))


@pytest.mark.parametrize(
    "name", ["swinv2_nano_relay", "vit_small_relay", "swinv2_nano_relayfusion"]
)
def test_relay_context_default_init_is_the_authors_unit_normal(name):
    """Since issue 29 the exported relay models draw their relay tokens as the authors' code
    does (a unit normal; ours truncated at +-2, sd 0.88); 0.02 (timm's) stays one key away."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, relays=64)
    assert model.config.relay_init_std == 1.0
    assert model.backbone.relay_tokens.std().item() == pytest.approx(0.88, rel=0.1)
    assert model.backbone.relay_tokens.abs().max().item() <= 2.0
