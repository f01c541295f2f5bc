"""The sample-scene generator: deterministic, georeferenced, context classes present."""

from __future__ import annotations

import numpy as np
import rasterio

from relaymap.ingest.sample import BANDS, CLASSES, CONTEXT_PAIRS, make_layout, make_sample_scenes


def _read(href):
    with rasterio.open(href) as src:
        return src.read(1), src


def test_deterministic_by_seed(tmp_path):
    a = make_sample_scenes(str(tmp_path / "a"), n_scenes=1, size_px=128, feature_px=16, seed=7)
    b = make_sample_scenes(str(tmp_path / "b"), n_scenes=1, size_px=128, feature_px=16, seed=7)
    c = make_sample_scenes(str(tmp_path / "c"), n_scenes=1, size_px=128, feature_px=16, seed=8)
    ia, ib, ic = (next(iter(x.get_items())) for x in (a, b, c))
    for key in (*BANDS, "labels"):
        ra, rb, rc = (_read(i.assets[key].href)[0] for i in (ia, ib, ic))
        assert np.array_equal(ra, rb) and not np.array_equal(ra, rc)
    assert ia.properties == ib.properties


def test_cogs_are_georeferenced_uint16_with_nodata(sample_local):
    item = list(sample_local.get_items())[1]  # odd scenes have a nodata corner
    red, src = _read(item.assets["red"].href)
    assert src.crs.to_epsg() == 32633 and src.res == (10.0, 10.0)
    assert red.dtype == np.uint16 and src.nodata == 0 and (red == 0).any()
    labels, lsrc = _read(item.assets["labels"].href)
    assert lsrc.transform == src.transform
    assert lsrc.nodata == 255 and ((labels == 255) == (red == 0)).all()
    assert item.properties["proj:transform"] == list(src.transform)[:6]


def test_context_pairs_look_alike_and_differ_by_surroundings():
    rng = np.random.default_rng(3)
    names = [c.name for c in CLASSES]
    for a, b in CONTEXT_PAIRS:
        ca, cb = CLASSES[names.index(a)], CLASSES[names.index(b)]
        assert ca.reflectance == cb.reflectance  # the same up close
    layout = make_layout(512, 48, rng)
    present = set(np.unique(layout))
    assert present == set(range(len(CLASSES)))
    park, urban, forest = names.index("park"), names.index("urban"), names.index("forest")

    # parks border towns, forests do not: the difference is in the surroundings
    def neighbours(cls):
        mask = layout == cls
        ring = np.zeros_like(mask)
        ring[1:] |= mask[:-1]
        ring[:-1] |= mask[1:]
        ring[:, 1:] |= mask[:, :-1]
        ring[:, :-1] |= mask[:, 1:]
        return np.bincount(layout[ring & ~mask], minlength=len(CLASSES))

    assert neighbours(park)[urban] > neighbours(park).sum() / 2
    assert neighbours(forest)[urban] == 0
