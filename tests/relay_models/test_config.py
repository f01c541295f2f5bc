"""ModelConfig: YAML in, model out, bad keys named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from relay_models import ModelConfig, create_model


def test_yaml_round_trip_builds_the_model(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("name: vit_small_relay\nnum_classes: 7\nin_chans: 4\nrelay_mode: parallel\n")
    cfg = ModelConfig.from_yaml(path)
    model = create_model(**cfg.model_dump())
    assert model.relay_mode == "parallel"
    assert model.backbone.in_chans == 4 and model.num_classes == 7


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: swinv2_nano\nnum_classes: 3\nrelays_count: 4\n", "relays_count"),
        ("name: swinv2_giant\nnum_classes: 3\n", "valid models"),
        ("name: swinv2_nano\nnum_classes: 0\n", "num_classes"),
        ("name: swinv2_nano\nnum_classes: 3\nhead: unet\n", "head"),
    ],
)
def test_bad_yaml_names_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError, match=match):
        ModelConfig.from_yaml(path)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- swinv2_nano\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        ModelConfig.from_yaml(path)
