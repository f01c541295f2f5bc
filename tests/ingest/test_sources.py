"""Sources as catalogs publish them: real item JSON of Earth Search, Planetary Computer,
Landsat Collection 2 and NAIP (``tests/data/published/``, only hrefs changed), with pixels
synthesised at the declared grids and data types. Each gives the physical values it should,
masked as its quality asset says; what the metadata leaves out comes from the source
profile; misuse is one clear error."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry, box

from relaymap.ingest import ingest_items, open_scene
from relaymap.ingest.composite import composite
from relaymap.ingest.profiles import (
    AmbiguousBandError,
    ReadOptions,
    choose_profile,
    plan_read,
)
from relaymap.ingest.ranges import OutOfRangeError, check_range
from tests.published import (
    BANDS,
    PlanetaryComputerStandIn,
    cell_inside,
    expected,
    item_epsg,
    make_truth,
    published,
    synthesise,
)

#: Each published layout: its profile, the assets of blue, green, red, nir, the mask asset,
#: and the scale/offset of red.
LAYOUTS = {
    "earth-search-s2-l2a": (
        "earth-search-s2-l2a", ("blue", "green", "red", "nir"), "scl", (1e-4, -0.1)
    ),
    "earth-search-s2-c1-l2a": (
        "earth-search-s2-l2a", ("blue", "green", "red", "nir"), "scl", (1e-4, -0.1)
    ),
    # no raster:bands: the profile's scale, and the offset of processing baseline 05.11
    "pc-s2-l2a": ("planetary-computer-s2-l2a", ("B02", "B03", "B04", "B08"), "SCL", (1e-4, -0.1)),
    "earth-search-landsat-c2-l2": (
        "landsat-c2-l2", ("blue", "green", "red", "nir08"), "qa_pixel", (2.75e-5, -0.2)
    ),
    "pc-landsat-c2-l2": (
        "landsat-c2-l2", ("blue", "green", "red", "nir08"), "qa_pixel", (2.75e-5, -0.2)
    ),
    # one 4-band asset described by eo:bands only; no mask; no scale published
    "pc-naip": ("generic", ("image",) * 4, None, (1.0, 0.0)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_profile_of_each_published_layout(name):
    item = pystac.Item.from_dict(published(name), migrate=False)
    profile, assets, mask, (scale, offset) = LAYOUTS[name]
    plan = plan_read(item, BANDS)
    assert choose_profile(item).name == plan.profile.name == profile
    assert tuple(b.asset for b in plan.bands) == assets
    assert plan.mask_asset == mask
    red = plan.bands[2]
    assert (red.scale, red.offset) == pytest.approx((scale, offset))
    if name == "pc-naip":
        assert [b.index for b in plan.bands] == [2, 1, 0, 3]  # by eo:bands common name


@pytest.mark.parametrize("name", ["earth-search-s2-l2a", "pc-s2-l2a", "pc-landsat-c2-l2"])
def test_profile_survives_a_mirror_that_renames_the_collection(name):
    """A copy of a public catalog under another collection id keeps its profile (by the
    items' ``platform``): its clouds stay masked, its scale applied."""
    item = pystac.Item.from_dict(published(name), migrate=False)
    item.collection_id = "my-mirror"
    assert choose_profile(item).name == LAYOUTS[name][0]
    naip = pystac.Item.from_dict(published("pc-naip"), migrate=False)
    assert choose_profile(naip).name == "generic"


def _uniform(values: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds one value in every band (or NaN throughout):
    where a resampled grid must give exactly the source's value."""
    keep = np.ones(values.shape[1:], bool)
    filled = np.nan_to_num(values, nan=-9.0)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            keep &= (np.roll(filled, (dy, dx), axis=(1, 2)) == filled).all(0)
    keep[[0, -1], :] = keep[:, [0, -1]] = False
    return keep


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_source_composite_equals_the_physical_values_masked_as_declared(name, tmp_path):
    item_json = published(name)
    res = 30.0 if "landsat" in name else 10.0
    cell_px, margin = 64, 8
    x0, y1 = cell_inside(item_json, res, cell_px, margin)
    side = cell_px * res
    bounds = (
        x0 - margin * res,
        y1 - side - margin * res,
        x0 + side + margin * res,
        y1 + margin * res,
    )
    truth = make_truth(x0, y1, side)
    epsg = item_epsg(item_json)
    gbox = GeoBox((cell_px, cell_px), Affine(res, 0, x0, 0, -res, y1), f"EPSG:{epsg}")
    footprint = Geometry(item_json["geometry"], "EPSG:4326").to_crs(gbox.crs)
    assert footprint.contains(box(*gbox.boundingbox, gbox.crs))  # the cell is inside the item
    stand_in = PlanetaryComputerStandIn(tmp_path)
    signed = name.startswith("pc-")
    # NAIP publishes no scale: its counts (here reflectance x 10000) need the user's
    naip = name == "pc-naip"
    read = ReadOptions(scale={"*": 1e-4}) if naip else ReadOptions()
    with stand_in.running():
        href = stand_in.href if signed else None
        item = synthesise(item_json, tmp_path / "blobs", truth, bounds, href=href, dn=naip)
        image, warnings = composite([item], BANDS, gbox, read=read)
        values = image.values
    plan = plan_read(item, BANDS)
    want = expected(truth, item_json, gbox.transform, gbox.shape, plan.mask_asset)
    assert warnings == []
    if name.startswith(("earth-search-s2", "pc-s2")):  # 10 m grids on the cell's lattice
        np.testing.assert_allclose(values, want, atol=1e-6)
    else:  # Landsat's 30 m grid sits 15 m off the lattice; NAIP's 0.6 m is averaged
        keep = _uniform(want)
        assert keep.mean() > 0.3, keep.mean()
        np.testing.assert_allclose(values[:, keep], want[:, keep], atol=1e-4)
    if plan.mask_asset is not None:  # the clouds are gone, and only they
        assert np.isnan(want).any()
        assert (np.isnan(values).all(0) == np.isnan(want).all(0))[_uniform(want)].all()
    if signed:  # every read was signed by the token service, none went out bare
        assert stand_in.requests["token"] >= 1 and stand_in.requests["signed"] > 0
        assert stand_in.requests["unsigned"] == 0
        assert all("sig=" not in a.href for a in item.assets.values())  # no token kept


def _eight_band_item(path, footprint=(500_000, 4_798_998, 501_000, 4_800_000)) -> pystac.Item:
    """A WorldView-2-style 8-band item as Maxar-like providers describe it (constructed
    here; no published 8-band item was found): eo:bands only, NIR1 and NIR2 both ``nir``."""
    names = [("C", "coastal"), ("B", "blue"), ("G", "green"), ("Y", "yellow"), ("R", "red"),
             ("RE", "rededge"), ("NIR1", "nir"), ("NIR2", "nir")]  # fmt: skip
    area = box(*footprint, "EPSG:32633").to_crs("EPSG:4326")
    item = pystac.Item(
        "wv2-8band",
        area.json,
        list(area.boundingbox),
        dt.datetime(2024, 6, 1, tzinfo=dt.UTC),
        {"proj:code": "EPSG:32633", "gsd": 2.0},
    )
    bands = [{"name": n, "common_name": c} for n, c in names]
    item.add_asset("image", pystac.Asset(f"file://{path}", extra_fields={"eo:bands": bands}))
    return item


def test_wild_two_bands_for_one_model_band_is_an_error_listing_them(tmp_path):
    item = _eight_band_item(tmp_path / "x.tif")
    with pytest.raises(AmbiguousBandError) as err:
        plan_read(item, BANDS)
    assert str(err.value) == (
        "item wv2-8band: 2 bands could be the model's 'nir': image:7 (NIR1), image:8 (NIR2); "
        "choose one with --band nir=image:7 (or band_map: {nir: ...} in the config)"
    )
    plan = plan_read(item, BANDS, ReadOptions(band_map={"nir": "image:NIR2"}))
    assert [(b.asset, b.index) for b in plan.bands] == [("image", 1), ("image", 2),
                                                         ("image", 4), ("image", 7)]  # fmt: skip
    with pytest.raises(AmbiguousBandError, match="both read image:7"):
        plan_read(item, BANDS, ReadOptions(band_map={"nir": "image:7", "red": "image:7"}))
    with pytest.raises(Exception, match="asset 'image' has no band 'NIR3'"):
        plan_read(item, BANDS, ReadOptions(band_map={"nir": "image:NIR3"}))


def test_wild_odd_sized_eight_band_2m_tiff_ingests_at_10m_by_area_average(tmp_path):
    """A 501 x 500 px, 8-band, 2 m GeoTIFF of raw counts: ingested at 2 m as it is (odd
    sizes at every level), and at 10 m, each pixel the mean of the 5 x 5 it covers."""
    rng = np.random.default_rng(0)
    dn = rng.integers(200, 4000, size=(8, 501, 500)).astype(np.uint16)
    path = tmp_path / "wv2.tif"
    transform = Affine(2, 0, 500_000, 0, -2, 4_800_000)
    with rasterio.open(path, "w", driver="GTiff", width=500, height=501, count=8,
                       dtype="uint16", crs="EPSG:32633", transform=transform) as dst:  # fmt: skip
        dst.write(dn)
    item = _eight_band_item(path)
    read = ReadOptions(band_map={"nir": "image:7"}, scale={"*": 1e-4})
    native = ingest_items([item], str(tmp_path / "2m.zarr"), BANDS, label_asset=None, read=read)
    assert native.shape(0) == (501, 500) and native.shape(3) == (63, 63)
    img = open_scene(native.url).level(0)["image"].values
    np.testing.assert_allclose(img[3], dn[6] * 1e-4, atol=1.5e-4)  # int16 counts of 1e-4
    coarse = ingest_items(
        [item], str(tmp_path / "10m.zarr"), BANDS, label_asset=None, read=read, resolution=10
    )
    assert coarse.shape(0) == (101, 100)
    got = open_scene(coarse.url).level(0)["image"].values
    means = dn[4, :500].reshape(100, 5, 100, 5).mean(axis=(1, 3)) * 1e-4
    np.testing.assert_allclose(got[2, :100], means, atol=1.5e-4)  # red: the area average


def test_source_raw_counts_are_refused_with_the_option_that_fixes_them():
    rng = np.random.default_rng(1)
    refl = rng.uniform(0.02, 0.4, size=(4, 32, 32)).astype(np.float32)
    mean, std = [0.08, 0.1, 0.09, 0.3], [0.04, 0.05, 0.06, 0.1]
    check_range(refl, BANDS, mean, std, where="scene x")  # reflectance: fine
    snow = np.full((4, 32, 32), 0.9, np.float32)
    check_range(snow, BANDS, mean, std, where="scene x")  # bright, but real
    with pytest.raises(OutOfRangeError) as err:
        check_range(refl * 1e4, BANDS, mean, std, where="source item a")
    message = str(err.value)
    assert message.startswith("source item a: band 'blue' has a median of ")
    assert "raw counts (DN) without their scale" in message and "--scale blue=" in message
    with pytest.raises(OutOfRangeError, match="other units"):
        check_range(refl - 10, BANDS, mean, std, where="x")


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    levels=st.integers(0, 4),
    chunk=st.sampled_from([8, 16, 64]),
)
def test_wild_scene_sizes_ingest_at_every_level_count(
    tmp_path_factory, height, width, levels, chunk
):
    """Any scene size, 1 x N and odd included, at any number of levels: every level is
    the ceiling half of the one above, and holds the valid-pixel mean of its 2 x 2."""
    from tests.flows.stores import array_store

    rng = np.random.default_rng(height * 100 + width)
    image = rng.uniform(0.0, 0.5, size=(2, height, width)).astype(np.float32)
    url = str(tmp_path_factory.mktemp("size") / "s.zarr")
    store = array_store(url, image, None, num_levels=levels, chunk_px=chunk)
    h, w = height, width
    above = open_scene(store.url).level(0)["image"].values
    np.testing.assert_allclose(above, image, atol=1e-6)
    for level in range(1, levels + 1):
        h, w = -(-h // 2), -(-w // 2)
        assert store.shape(level) == (h, w)
        got = store.level(level)["image"].values
        padded = np.full((2, 2 * h, 2 * w), np.nan, np.float32)
        padded[:, : above.shape[1], : above.shape[2]] = above
        want = np.nanmean(padded.reshape(2, h, 2, w, 2), axis=(2, 4))
        np.testing.assert_allclose(got, want, atol=1e-5)
        above = got
