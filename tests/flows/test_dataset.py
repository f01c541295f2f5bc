"""Training samples from scene stores: windows read through the window reader with the run's
data spec (centring, alignment under rotation/rescale, padding), skip rule, tiles, spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relay_models.geometry import window_pair
from relay_models.windows import read_pair as read_windows
from relaymap.flows.dataset import Augment, TileDataset, WindowPairDataset, check_stores, data_spec
from relaymap.ingest import StoreError, open_scene
from tests.flows.stores import array_store, stripes


@pytest.fixture(scope="module")
def stripe_store(tmp_path_factory):
    image, labels = stripes()
    return array_store(str(tmp_path_factory.mktemp("s") / "stripes.zarr"), image, labels)


def _spec(store, factor=4, window_px=64):
    return data_spec([store], window_px=window_px, factor=factor)


def read_pair(store, pair, out_px):
    """``(local, global, labels, inside fraction)`` normalised with the store's own spec."""
    s = read_windows(store, pair, out_px, _spec(store).norm(), labels=True)
    return s["local"], s["global"], s["labels"], pair.local.inside_fraction(store.shape(0), out_px)


def _denorm(store, x):
    mean, std = _spec(store).norm()
    return x * std + mean


@pytest.mark.parametrize(
    ("scale", "angle"), [(1.0, 0.0), (1.0, 37.0), (0.5, -90.0), (2.0, 63.0), (1.7, -15.0)]
)
def test_rotation_and_rescale_keep_image_and_labels_aligned(stripe_store, scale, angle):
    pair = window_pair((128.0, 128.0), 64 * scale, factor=2, angle_deg=angle)
    local, glob, labels, inside = read_pair(stripe_store, pair, 64)
    assert inside == 1.0 and glob.shape == local.shape == (2, 64, 64)
    band0 = _denorm(stripe_store, local)[0]  # equals the label, up to interpolation
    agree = ((band0 > 0.5).long() == labels).float().mean()
    assert agree > 0.9
    if angle == 0.0 and scale == 1.0:
        assert agree == 1.0


def test_global_window_comes_from_the_level_and_is_centred(stripe_store):
    """The global window (factor 4) is read from level 2 and equals an area average of the
    level-0 pixels it covers; its centre crop covers the local window."""
    pair = window_pair((128.0, 128.0), 64, factor=4)
    local, glob, _, _ = read_pair(stripe_store, pair, 64)
    full, _ = stripe_store.read_box(pair.global_.pixel_bounds(), level=0)
    pooled = F.avg_pool2d(torch.from_numpy(full)[None], 4)[0]
    mean, std = _spec(stripe_store).norm()
    torch.testing.assert_close(glob, (pooled - mean) / std, atol=1e-5, rtol=0)
    crop = _denorm(stripe_store, glob)[:, 24:40, 24:40]
    local_pooled = F.avg_pool2d(_denorm(stripe_store, local)[None], 4)[0]
    torch.testing.assert_close(crop, local_pooled, atol=1e-5, rtol=0)


def test_outside_the_scene_is_mean_filled_and_ignored(stripe_store):
    pair = window_pair((0.0, 0.0), 64, factor=4)  # centred on the corner
    local, glob, labels, inside = read_pair(stripe_store, pair, 64)
    assert inside == pytest.approx(0.25)
    assert (labels[:32] == 255).all() and (labels[:, :32] == 255).all()
    assert (local[:, :32] == 0).all() and (glob[:, :24] == 0).all()
    assert (labels[32:, 32:] != 255).all()


def test_skip_rule_and_rank_streams(stripe_store):
    def take(rank, n=24):
        ds = WindowPairDataset(
            [stripe_store.url],
            _spec(stripe_store),
            seed=3,
            rank=rank,
            augment=Augment(max_outside=0.5),
        )
        return [s for _, s in zip(range(n), ds, strict=False)]

    a, b, a2 = take(0), take(1), take(0)
    for s in a + b:
        assert (s["labels"] == 255).float().mean() <= 0.5 + 1e-6  # the stripes have no nodata
    assert all(torch.equal(x["local"], y["local"]) for x, y in zip(a, a2, strict=True))
    assert not torch.equal(a[0]["local"], b[0]["local"])


def test_tiles_cover_the_scene_once(stripe_store):
    tiles = TileDataset([stripe_store.url], _spec(stripe_store))
    assert len(tiles) == 16
    seen = torch.zeros(256, 256, dtype=torch.int64)
    for i in range(len(tiles)):
        _, pair = tiles.tiles[i]
        y0, x0, y1, x1 = (int(v) for v in pair.local.pixel_bounds())
        seen[y0:y1, x0:x1] += 1
    assert (seen == 1).all()
    assert tiles[0]["labels"].shape == (64, 64)


class TestBadStores:
    def test_unlabelled_store(self, tmp_path):
        image, _ = stripes(64, 64)
        store = array_store(str(tmp_path / "nolabels.zarr"), image, None)
        with pytest.raises(StoreError, match="has no labels"):
            check_stores([store], need_labels=True)

    def test_band_mismatch(self, tmp_path, stripe_store):
        image, labels = stripes(64, 64, bands=3)
        other = array_store(str(tmp_path / "three.zarr"), image, labels)
        with pytest.raises(StoreError, match=r"has bands \['b0', 'b1', 'b2'\]"):
            check_stores([open_scene(stripe_store.url), other], need_labels=True)

    def test_empty(self):
        with pytest.raises(StoreError, match="no scene store"):
            check_stores([], need_labels=True)


def test_numbers_of_bands_and_dtypes(stripe_store):
    s = next(iter(WindowPairDataset([stripe_store.url], _spec(stripe_store))))
    assert s["local"].dtype == s["global"].dtype == torch.float32
    assert s["labels"].dtype == torch.int64
    assert np.isfinite(s["local"].numpy()).all()


def test_data_spec_pools_statistics_over_the_stores(tmp_path, stripe_store):
    """The run's normalisation is the pixel-weighted mean/std of all its stores, i.e. the
    statistics of their union, not of the first store."""
    image, labels = stripes(64, 256)
    other = array_store(str(tmp_path / "other.zarr"), image * 3 + 1, labels)
    spec = data_spec([stripe_store, other], window_px=64, factor=4)
    big, _ = stripes()
    union = np.concatenate([big.reshape(2, -1), (image * 3 + 1).reshape(2, -1)], axis=1)
    np.testing.assert_allclose(spec.mean, union.mean(1), rtol=1e-5)
    np.testing.assert_allclose(spec.std, union.std(1), rtol=1e-4)
    assert spec.bands == stripe_store.bands and spec.factor == 4 and spec.window_px == 64
    assert spec.class_names == ["class_0", "class_1"]
