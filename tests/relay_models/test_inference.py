"""Tiled inference on in-memory scenes against independent references.

Every map here is computed at ``precision="fp32"``, the precision of the direct calls it
is compared with (``auto`` would be bf16 on CPUs with native bf16 matmuls); bf16 against
fp32 is ``tests/relay_models/test_precision.py``'s."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relay_models import create_model, predict_array, predict_tiles, to_classes
from tests.relay_models.helpers import perturb_norms

pytestmark = pytest.mark.precision  # references computed at fp32: checked on both host kinds

TILE = 64


@pytest.fixture(scope="module")
def relay_model():
    torch.manual_seed(0)
    return perturb_norms(create_model("swinv2_nano_relay", num_classes=4)).eval()


def _global_window(scene, centre_yx, factor=4):
    """Reference global window: the scene area-averaged by ``factor`` and zero-padded, cut
    around ``centre_yx`` (written out by hand, independent of relay_models.geometry)."""
    coarse = F.avg_pool2d(scene.unsqueeze(0), factor)[0]
    pad = TILE
    padded = F.pad(coarse, (pad, pad, pad, pad))
    cy, cx = int(centre_yx[0] // factor) + pad, int(centre_yx[1] // factor) + pad
    return padded[:, cy - TILE // 2 : cy + TILE // 2, cx - TILE // 2 : cx + TILE // 2]


def _direct(model, local, glob):
    with torch.no_grad():
        return model(local.unsqueeze(0), glob.unsqueeze(0)).local.softmax(1)[0]


def test_one_window_scene_equals_direct_call(relay_model):
    scene = torch.randn(3, TILE, TILE)
    probs = predict_array(relay_model, scene, tile_px=TILE, overlap_px=16, precision="fp32")
    ref = _direct(relay_model, scene, _global_window(scene, (32, 32)))
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=0)


def test_disjoint_tiles_equal_tile_by_tile(relay_model):
    scene = torch.randn(3, 2 * TILE, 2 * TILE)
    probs = predict_array(
        relay_model, scene, tile_px=TILE, overlap_px=0, batch_size=3, precision="fp32"
    )
    for oy in (0, TILE):
        for ox in (0, TILE):
            local = scene[:, oy : oy + TILE, ox : ox + TILE]
            ref = _direct(relay_model, local, _global_window(scene, (oy + TILE / 2, ox + TILE / 2)))
            torch.testing.assert_close(
                probs[:, oy : oy + TILE, ox : ox + TILE], ref, atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("blend", ["cosine", "center"])
def test_overlapping_tiles_blend_to_distributions(relay_model, blend):
    scene = torch.randn(3, 150, 130)
    probs = predict_array(
        relay_model, scene, tile_px=TILE, overlap_px=24, blend=blend, precision="fp32"
    )
    assert probs.shape == (4, 150, 130)
    torch.testing.assert_close(probs.sum(0), torch.ones(150, 130), atol=1e-5, rtol=0)


def test_center_blend_keeps_each_tiles_own_prediction(relay_model):
    scene = torch.randn(3, TILE, 112)  # tiles at x = 0 and 48; the cut is at x = 56
    probs = predict_array(
        relay_model, scene, tile_px=TILE, overlap_px=16, blend="center", precision="fp32"
    )
    right = _direct(relay_model, scene[:, :, 48:112], _global_window(scene, (32, 80)))
    torch.testing.assert_close(probs[:, :, 56:], right[:, :, 8:], atol=1e-5, rtol=0)


def test_scene_smaller_than_a_tile_is_padded(relay_model):
    probs = predict_array(
        relay_model, torch.randn(3, 40, 50), tile_px=TILE, overlap_px=16, precision="fp32"
    )
    assert probs.shape == (4, 40, 50)
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 50), atol=1e-5, rtol=0)


def test_nodata_tiles_are_skipped_and_marked(relay_model):
    scene = torch.randn(3, TILE, 4 * TILE)
    valid = torch.zeros(TILE, 4 * TILE, dtype=torch.bool)
    valid[:, : TILE + 10] = True
    probs = predict_array(
        relay_model, scene, tile_px=TILE, overlap_px=0, valid=valid, precision="fp32"
    )
    assert (probs[:, :, 2 * TILE :] == 0).all()  # tiles 3 and 4 never ran
    classes = to_classes(probs, valid)
    assert classes.dtype == torch.uint8
    assert (classes[:, TILE + 10 :] == 255).all()
    assert (classes[:, : TILE + 10] < 4).all()


def test_sliding_window_model_needs_no_global_window():
    model = create_model("swinv2_nano", num_classes=3).eval()
    scene = torch.randn(3, TILE, TILE)
    with torch.no_grad():
        ref = model(scene.unsqueeze(0)).softmax(1)[0]
    torch.testing.assert_close(
        predict_array(model, scene, tile_px=TILE, overlap_px=0, precision="fp32"), ref
    )
    assert predict_tiles(model, scene.unsqueeze(0)).shape == (1, 3, TILE, TILE)


class TestBadInput:
    def test_all_nodata(self, relay_model):
        with pytest.raises(ValueError, match="all nodata"):
            predict_array(
                relay_model,
                torch.randn(3, 64, 64),
                tile_px=TILE,
                valid=torch.zeros(64, 64, dtype=torch.bool),
            )

    def test_not_an_image(self, relay_model):
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            predict_array(relay_model, torch.randn(64, 64), tile_px=TILE)

    def test_wrong_band_count(self, relay_model):
        with pytest.raises(
            ValueError, match=r"5 bands but the model expects 3 \(\[.b0., .b1., .b2.\]\)"
        ):
            predict_array(relay_model, torch.randn(5, 64, 64), tile_px=TILE)
