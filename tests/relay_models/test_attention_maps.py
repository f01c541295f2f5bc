"""Relay attention maps (paper Figure 8)."""

from __future__ import annotations

import pytest
import torch

from relay_models import create_model, relay_attention_maps
from tests.relay_models.helpers import perturb_norms


@pytest.mark.parametrize("name", ["swinv2_nano_relay", "vit_small_relay"])
def test_maps_per_window(name):
    model = perturb_norms(create_model(name, num_classes=3)).eval()
    local, glob = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(local, glob)
    maps = relay_attention_maps(model, local, glob)
    assert set(maps) == {"local", "global"}
    for m in maps.values():
        assert m.shape == (2, 64, 64) and (m >= 0).all() and m.max() > 0
    assert not torch.equal(torch.from_numpy(maps["local"]), torch.from_numpy(maps["global"]))
    # capturing uses an explicit softmax: it must compute what the fused kernel computes
    assert all(getattr(m, "capture", None) is None for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(local, glob).local, plain.local)


def test_explicit_attention_equals_fused_attention():
    model = perturb_norms(create_model("swinv2_nano_relay", num_classes=3)).eval()
    local, glob = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused = model(local, glob).local
        for m in model.modules():
            if hasattr(m, "capture"):
                m.capture = []
        explicit = model(local, glob).local
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)


def test_registers_have_local_maps_only():
    model = create_model("swinv2_nano_registers", num_classes=3).eval()
    maps = relay_attention_maps(model, torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))
    assert set(maps) == {"local"}


def test_plain_model_is_refused():
    with pytest.raises(ValueError, match="relay tokens"):
        relay_attention_maps(
            create_model("swinv2_nano", num_classes=3),
            torch.randn(1, 3, 64, 64),
            torch.randn(1, 3, 64, 64),
        )
