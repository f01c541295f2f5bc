"""timm compatibility: same features with the same weights; strict checkpoint loading."""

from __future__ import annotations

import re
import socket

import pytest
import torch
from safetensors.torch import save_file

from relay_models import create_model, load_pretrained
from relay_models.weights import adapt_input_conv, read_checkpoint
from tests.relay_models.helpers import perturb_all

PAIRS = [
    ("swinv2_tiny", "swinv2_tiny_window8_256", {}),
    ("vit_small", "vit_small_patch16_224", {"img_size": 256}),
]


def _timm_model(timm, name, **kw):
    torch.manual_seed(0)
    # perturb: timm zero-inits Swin V2's post-norms, which would hide most of the maths
    return perturb_all(timm.create_model(name, **kw)).eval()


def _timm_features(model, x):
    """timm's forward_features as ``(B, C, h, w)`` (ViT: class token dropped)."""
    f = model.forward_features(x)
    if f.ndim == 3:  # ViT: (B, 1 + hw, D)
        side = int((f.shape[1] - 1) ** 0.5)
        f = f[:, 1:].reshape(f.shape[0], side, side, -1)
    return f.permute(0, 3, 1, 2)


@pytest.mark.parametrize(("ours", "theirs", "kw"), PAIRS)
def test_features_equal_timm(timm, ours, theirs, kw):
    ref = _timm_model(timm, theirs, **kw)
    model = create_model(ours, num_classes=2).eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("head")}
    model.backbone.load_state_dict(sd, strict=True)  # same keys, nothing left over
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        diff = (model.backbone.forward_features(x)[-1] - _timm_features(ref, x)).abs().max()
    assert diff < 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_checkpoint_loads_strictly(timm, tmp_path, fmt):
    ref = _timm_model(timm, "swinv2_tiny_window8_256")
    path = tmp_path / f"swinv2_tiny.{fmt}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, path) if fmt == "safetensors" else torch.save({"model": sd}, path)
    model = create_model("swinv2_tiny_relay", num_classes=2, pretrained=str(path)).eval()
    for k, v in model.backbone.state_dict().items():
        if k in sd:
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    # the global branch's patch projection starts as a copy of the local one
    torch.testing.assert_close(
        model.backbone.patch_embed_global.proj.weight, sd["patch_embed.proj.weight"]
    )
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        plain = create_model("swinv2_tiny", num_classes=2, pretrained=str(path)).eval()
        diff = (plain.backbone.forward_features(x)[-1] - _timm_features(ref, x)).abs().max()
    assert diff < 1e-4


def test_load_report_names_new_and_unused_keys(timm, tmp_path):
    ref = _timm_model(timm, "swinv2_tiny_window8_256")
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    report = load_pretrained(create_model("swinv2_tiny_relay", num_classes=2), path)
    new = re.compile(r"^(relay_tokens|patch_embed_global\..*|layers\.\d\.relay_proj\..*)$")
    assert report.initialised and all(new.match(k) for k in report.initialised)
    assert "relay_tokens" in report.initialised
    assert set(report.unused) == {"head.fc.weight", "head.fc.bias"}


def test_vit_checkpoint_at_224_resamples_position_embedding(timm, tmp_path):
    """A 224-px timm ViT checkpoint runs at 256 px as timm itself would run it."""
    ref224 = _timm_model(timm, "vit_small_patch16_224")
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref224.state_dict().items()}, path)
    model = create_model("vit_small_relay", num_classes=2, pretrained=path).eval()
    ref256 = timm.create_model(
        "vit_small_patch16_224",
        img_size=256,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
    ).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        diff = (model.backbone.forward_features(x)[-1] - _timm_features(ref256, x)).abs().max()
    assert diff < 1e-4


def test_original_swin_layout_is_remapped(timm, tmp_path):
    """Microsoft's checkpoints put patch merging at the end of a stage (layers.i -> i+1)."""
    ref = _timm_model(timm, "swinv2_tiny_window8_256")
    sd = {
        re.sub(
            r"^layers\.(\d)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k
        ): v
        for k, v in ref.state_dict().items()
    }
    assert "layers.0.downsample.reduction.weight" in sd
    torch.save(sd, tmp_path / "orig.pth")
    model = create_model("swinv2_tiny", num_classes=2, pretrained=tmp_path / "orig.pth")
    torch.testing.assert_close(
        model.backbone.layers[1].downsample.reduction.weight,
        ref.layers[1].downsample.reduction.weight,
    )


def test_extra_bands_start_at_zero_and_keep_pretrained_features(timm, tmp_path):
    ref = _timm_model(timm, "swinv2_tiny_window8_256")
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    rgbn = create_model("swinv2_tiny", num_classes=2, in_chans=4, pretrained=path).eval()
    w = rgbn.backbone.patch_embed.proj.weight
    assert (w[:, 3] == 0).all()
    x = torch.randn(1, 3, 256, 256)
    x4 = torch.cat([x, torch.randn(1, 1, 256, 256)], dim=1)
    with torch.no_grad():
        diff = (rgbn.backbone.forward_features(x4)[-1] - _timm_features(ref, x)).abs().max()
    assert diff < 1e-4


def test_fewer_bands_keep_the_grey_response():
    w = torch.randn(8, 3, 4, 4)
    grey = torch.randn(1, 1, 4, 4)
    for c in (1, 2):
        a = adapt_input_conv(w, c)
        resp = torch.nn.functional.conv2d(grey.expand(1, c, 4, 4), a)
        torch.testing.assert_close(resp, torch.nn.functional.conv2d(grey.expand(1, 3, 4, 4), w))


def test_hf_hub_reference_reads_a_cache_placed_by_hand(timm, tmp_path, monkeypatch):
    """A Hub cache in the layout ``hf download`` writes (``refs/main`` -> a snapshot) is read
    without a request: the Hub here is a loopback port nobody listens on."""
    ref = _timm_model(timm, "swinv2_tiny_window8_256")
    repo = tmp_path / "models--timm--swinv2_tiny_window8_256.ms_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    model = create_model("swinv2_tiny", num_classes=2, pretrained="swinv2_tiny_window8_256.ms_in1k")
    torch.testing.assert_close(model.backbone.norm.weight, ref.norm.weight)
    with pytest.raises(FileNotFoundError, match=r"not_cached: cannot reach .* not in the cache"):
        create_model("swinv2_tiny", num_classes=2, pretrained="hf-hub:timm/not_cached")


class TestBadCheckpoints:
    def test_other_architecture(self, timm, tmp_path):
        vit = _timm_model(timm, "vit_small_patch16_224")
        path = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
        with pytest.raises(
            ValueError,
            match=r"does not fit SwinTransformerV2.*missing backbone "
            r"keys: .*unexpected keys: .*blocks\.0",
        ):
            create_model("swinv2_tiny_relay", num_classes=2, pretrained=path)

    def test_other_size(self, timm, tmp_path):
        tiny = _timm_model(timm, "swinv2_tiny_window8_256")
        path = tmp_path / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
        with pytest.raises(ValueError, match=r"missing backbone keys: layers\.2\.blocks\.1\d"):
            create_model("swinv2_small", num_classes=2, pretrained=path)
        with pytest.raises(ValueError, match=r"shape mismatches .*\(96,\) vs \(128,\)"):
            create_model("swinv2_base", num_classes=2, pretrained=path)

    def test_missing_and_corrupt_files(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="checkpoint not found"):
            read_checkpoint(tmp_path / "nope.safetensors")
        bad = tmp_path / "bad.pth"
        bad.write_bytes(b"this is not a checkpoint")
        with pytest.raises(ValueError, match="not a readable torch checkpoint"):
            read_checkpoint(bad)
        good = tmp_path / "good.pth"
        torch.save({"w": torch.zeros(3)}, good)
        truncated = tmp_path / "truncated.pth"
        truncated.write_bytes(good.read_bytes()[:200])
        with pytest.raises(ValueError, match="not a readable torch checkpoint"):
            read_checkpoint(truncated)
        bad_st = tmp_path / "bad.safetensors"
        bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            read_checkpoint(bad_st)

    def test_pickled_code_is_refused(self, tmp_path):
        path = tmp_path / "evil.pth"
        torch.save({"model": {"w": torch.zeros(1)}, "cfg": object()}, path)
        with pytest.raises(ValueError, match="not a readable torch checkpoint"):
            read_checkpoint(path)
