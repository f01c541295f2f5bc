"""The model data contract: on every model, saved with the weights, read back from the header
alone (without building the network)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import relay_models.factory
from relay_models import ClassSpec, DataSpec, create_model, load_saved, read_saved, save_model
from relay_models.saved import SavedModelError

SPEC = DataSpec(
    bands=("red", "nir"),
    mean=(0.1, 0.3),
    std=(0.05, 0.1),
    classes=(ClassSpec(index=0, value=10, name="water"), ClassSpec(index=1, value=20, name="land")),
    window_px=64,
    factor=4,
)


class TestDataSpec:
    @pytest.mark.parametrize(
        ("name", "factor"),
        [("swinv2_nano", None), ("swinv2_nano_relay", 4), ("swinv2_nano_registers", 4)],
    )
    def test_every_model_carries_one(self, name, factor):
        model = create_model(name, num_classes=3, in_chans=2)
        spec = model.spec
        assert spec.factor == factor and spec.takes_global == model.takes_global
        assert spec.bands == ("b0", "b1") and spec.class_names == ["class_0", "class_1", "class_2"]
        with pytest.raises(ValidationError):
            spec.window_px = 3  # immutable

    def test_a_spec_that_does_not_fit_is_refused(self):
        with pytest.raises(ValueError, match="does not fit the model"):
            create_model("swinv2_nano_relay", num_classes=3, in_chans=2, spec=SPEC)
        with pytest.raises(ValueError, match="does not fit the model"):
            create_model("swinv2_nano", num_classes=2, in_chans=2, spec=SPEC)  # no global

    def test_bad_specs(self):
        with pytest.raises(ValidationError, match="one value per band"):
            DataSpec(bands=("a", "b"), mean=(0,), std=(1, 1), classes=SPEC.classes)
        with pytest.raises(ValidationError, match=r"0\.\.K-1"):
            DataSpec(bands=("a",), mean=(0,), std=(1,), classes=SPEC.classes[::-1])


def test_saved_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("swinv2_nano_relay", num_classes=2, in_chans=2, spec=SPEC).eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path, step="7")
    with open(path, "rb") as f:
        saved = read_saved(f)
    assert saved.spec == SPEC and saved.config == model.config and saved.extra == {"step": "7"}
    loaded = load_saved(path.read_bytes())
    x = torch.randn(1, 2, 64, 64)
    torch.testing.assert_close(loaded(x, x).local, model(x, x).local)
    assert loaded.spec == SPEC and not loaded.training


def test_the_header_alone_tells_what_the_model_is(tmp_path, monkeypatch):
    """No network is built and no weight byte is read: the file is cut after its header and
    building a model raises."""
    path = tmp_path / "m.safetensors"
    save_model(create_model("swinv2_nano_relay", num_classes=2, in_chans=2, spec=SPEC), path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    (tmp_path / "head.safetensors").write_bytes(data[: 8 + n])

    def no_build(*a, **kw):
        raise AssertionError("built a network")

    monkeypatch.setattr(relay_models.factory, "build_model", no_build)
    with open(tmp_path / "head.safetensors", "rb") as f:
        assert read_saved(f).spec == SPEC


def test_unreadable_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with (
        open(tmp_path / "plain.safetensors", "rb") as f,
        pytest.raises(SavedModelError, match="no relaymap metadata"),
    ):
        read_saved(f, "plain")
    with pytest.raises(SavedModelError, match="not a readable safetensors"):
        load_saved(b"junk junk junk", "junk")
