"""Ingest without a float detour (issue 27): integer sources are read as integers and
written to the int16 store as counts; the store must hold what the float path stores."""

from __future__ import annotations

import numpy as np
import pystac
import pytest
import zarr

from relaymap.catalog.storage import native
from relaymap.ingest import load_scene, write_scene
from relaymap.ingest.load import count_encoding, plan_read, read_headers
from relaymap.ingest.sample import make_s2_area
from relaymap.ingest.store import REFLECTANCE_FILL

BANDS = ["blue", "green", "red", "nir"]


def _raw_levels(url: str, levels: int) -> list[tuple[np.ndarray, dict]]:
    out = []
    for level in range(levels + 1):
        arr = zarr.open_group(native(url), path=str(level), mode="r")["image"]
        out.append((arr[:], dict(arr.attrs)))
    return out


def _both(tmp_path, items, name, **kw):
    """The store of ``items`` written from the float path and from the counts path."""
    stores = {}
    for counts in (False, True):
        image = load_scene(items, BANDS, chunk_px=96, counts=counts, **kw)
        assert image.dtype == (np.int16 if counts else np.float32)
        url = str(tmp_path / f"{name}-{counts}.zarr")
        stores[counts] = write_scene(url, image, num_levels=2, chunk_px=64)
    return stores


@pytest.fixture(scope="module")
def s2_area(tmp_path_factory):
    """Sentinel-2 L2A-like items (offset -0.1, SCL masks, two orbits per date)."""
    root = tmp_path_factory.mktemp("s2")
    return make_s2_area(
        str(root), origin=(500_000.0, 4_800_000.0), size_px=150, dates=[_date()], seed=3
    )


def _date():
    import datetime as dt

    return dt.datetime(2026, 1, 10, 10, tzinfo=dt.UTC)


@pytest.mark.parametrize("source", ["sample", "s2-best"])
def test_speed_int16_ingest_stores_the_float_paths_values(source, sample_local, s2_area, tmp_path):
    """Same counts at level 0 (the float path's, bit for bit), the same CF attributes,
    decoded values and band statistics; levels within one count (rounding of exact
    halves)."""
    if source == "sample":
        items, kw = [next(iter(sample_local.get_items()))], {}
    else:  # both orbits composited, least cloudy first, through their SCL masks
        items, kw = list(s2_area.get_items()), {"composite": "best"}
    stores = _both(tmp_path, items, source, **kw)
    floats, counts = (_raw_levels(stores[c].url, 2) for c in (False, True))
    (f0, fa), (c0, ca) = floats[0], counts[0]
    assert c0.dtype == np.int16 and (c0 != REFLECTANCE_FILL).any()
    np.testing.assert_array_equal(c0, f0)
    assert ca["scale_factor"] == fa["scale_factor"] == 1e-4 and ca["add_offset"] == 0.0
    for (f, _), (c, _) in zip(floats[1:], counts[1:], strict=True):
        assert ((f == REFLECTANCE_FILL) == (c == REFLECTANCE_FILL)).all()
        assert np.abs(f.astype(int) - c.astype(int)).max() <= 1
    a, b = stores[False], stores[True]
    np.testing.assert_array_equal(
        a.read_box((0, 0, *a.shape(0)))[0], b.read_box((0, 0, *b.shape(0)))[0]
    )
    np.testing.assert_allclose(a.attrs.band_mean, b.attrs.band_mean, rtol=1e-6)
    np.testing.assert_allclose(a.attrs.band_std, b.attrs.band_std, rtol=1e-5)


def test_speed_int16_ingest_folds_other_scales_into_the_cf_attributes(sample_local, tmp_path):
    """A source whose scale is not the store's 1e-4 (Landsat's 2.75e-5, offset -0.2):
    its DN go to the store as ``DN - 32768`` (every uint16 fits; DN 0, no data, is the
    fill value) with the scale and offset folded into the CF attributes; decoded, the same
    reflectance as the float path's (which rounds to 1e-4 counts)."""
    item = next(iter(sample_local.get_items())).clone()
    for band in BANDS:
        item.assets[band].extra_fields["raster:bands"][0] |= {"scale": 2.75e-5, "offset": -0.2}
    stores = _both(tmp_path, [item], "landsat")
    raw, attrs = _raw_levels(stores[True].url, 2)[0]
    assert attrs["scale_factor"] == pytest.approx(2.75e-5)
    assert attrs["add_offset"] == pytest.approx(-0.2 + 32768 * 2.75e-5)
    a, b = stores[False], stores[True]
    fa, fb = (s.read_box((0, 0, *s.shape(0)))[0] for s in (a, b))
    assert (np.isnan(fa) == np.isnan(fb)).all()
    ok = ~np.isnan(fa)
    np.testing.assert_allclose(fb[ok], fa[ok], atol=0.51e-4)  # the float path's rounding
    with rasterio_open(item.assets["red"].href) as src:
        dn = src.read(1)
    np.testing.assert_array_equal(raw[2][dn > 0], (dn[dn > 0].astype(np.int32) - 32768))


def rasterio_open(href: str):
    import rasterio

    return rasterio.open(href)


def test_speed_int16_ingest_keeps_floats_where_counts_cannot_hold_them(sample_local):
    """Float or no-nodata assets and mixed scales keep the float path."""
    item = next(iter(sample_local.get_items())).clone()
    plans = [plan_read(item, BANDS)]
    assert count_encoding(plans, read_headers(plans)) is not None
    mixed = item.clone()
    mixed.assets["nir"].extra_fields["raster:bands"][0]["scale"] = 2e-4
    plans = [plan_read(mixed, BANDS)]
    assert count_encoding(plans, read_headers(plans)) is None
    image = load_scene([mixed], BANDS, counts=True)
    assert image.dtype == np.float32 and "encoding" not in image.attrs
    assert isinstance(item, pystac.Item)
