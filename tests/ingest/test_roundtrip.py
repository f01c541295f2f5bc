"""Search -> load -> write -> open through the real STAC API (rustac) and real S3."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rasterio
import xarray as xr

from relaymap.ingest import (
    classes_from_stac,
    load_labels,
    load_scene,
    open_scene,
    search,
    write_scene,
)
from relaymap.ingest.load import rio_env
from relaymap.ingest.sample import BANDS, CLASSES

pytestmark = pytest.mark.slow


def _read(href):
    with rio_env(), rasterio.open(href) as src:
        return src.read(1), src.crs, src.transform


@pytest.fixture(scope="module")
def store(stac_api):
    items = search(
        stac_api,
        collections=["relaymap-sample"],
        bbox=(14, 43, 16, 44),
        datetime="2024-06-02/2024-06-02",
        require_assets=BANDS,
    )
    assert [it.id for it in items] == ["sample-01"]
    image = load_scene(items, BANDS)
    classes = classes_from_stac(items[0].assets["labels"].extra_fields["classification:classes"])
    labels = load_labels(items, image.odc.geobox, classes)
    return items[0], write_scene(
        "s3://relaymap-test/stores/rt.zarr", image, labels, classes=classes, chunk_px=128
    )


def test_pixels_crs_transform_nodata_match_the_source(store):
    item, scene = store
    ds = scene.level(0)
    for band in BANDS:
        raw, crs, transform = _read(item.assets[band].href)
        got = ds["image"].sel(band=band).values
        expected = np.where(raw == 0, np.nan, raw * 1e-4)
        np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)
    assert np.isnan(got).any()  # the sample's nodata corner stays no data
    np.testing.assert_array_equal(scene.valid(0).values, raw != 0)
    assert ds["image"].odc.crs == crs
    assert tuple(scene.geobox().transform)[:6] == tuple(transform)[:6]


def test_labels_are_aligned_and_mapped(store):
    item, scene = store
    raw, _, _ = _read(item.assets["labels"].href)
    codes = {c.code: i for i, c in enumerate(CLASSES)}
    expected = np.vectorize(lambda v: codes.get(int(v), 255))(raw).astype(np.uint8)
    np.testing.assert_array_equal(scene.level(0)["label"].values, expected)
    assert [c["name"] for c in scene.attrs.classes] == [c.name for c in CLASSES]


def test_levels_average_imagery_and_take_majority_labels(store):
    _, scene = store
    l0, l1 = scene.level(0), scene.level(1)
    img0 = l0["image"].values
    cells = img0.reshape(len(BANDS), 128, 2, 128, 2)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells in the nodata corner
        expected = np.nanmean(cells, axis=(2, 4))
    # stored as counts of 1e-4 like level 0: within a count of the exact mean
    np.testing.assert_allclose(l1["image"].values, expected, atol=1e-4 + 1e-7, equal_nan=True)
    lab1 = l1["label"].values
    lab0 = l0["label"].values
    y, x = 60, 70
    block = lab0[2 * y : 2 * y + 2, 2 * x : 2 * x + 2].ravel()
    block = block[block != 255]
    if block.size:
        assert lab1[y, x] in block
    t0, t3 = scene.geobox(0).transform, scene.geobox(3).transform
    assert (t3.a, t3.c, t3.f) == (8 * t0.a, t0.c, t0.f)
    assert scene.level(3)["image"].shape == (len(BANDS), 32, 32)


def test_a_store_written_in_tiles_equals_one_written_at_once(store, monkeypatch, tmp_path):
    """Pixels are written a tile at a time (memory bounded by two tiles): tiles of 96 px
    (chunks of 128 split across tiles, 64 px read chunks) change no pixel."""
    import relaymap.ingest.store as store_module

    item, scene = store
    monkeypatch.setattr(store_module, "tile_px", lambda chunk_px, num_levels, source_px: 96)
    image = load_scene([item], BANDS, chunk_px=64)
    classes = classes_from_stac(item.assets["labels"].extra_fields["classification:classes"])
    labels = load_labels([item], image.odc.geobox, classes, chunk_px=64)
    strips = write_scene(
        str(tmp_path / "strips.zarr"), image, labels, classes=classes, chunk_px=128
    )
    for level in range(scene.num_levels + 1):
        for var in ("image", "label"):
            np.testing.assert_array_equal(
                strips.level(level)[var].values, scene.level(level)[var].values
            )
    assert strips.attrs.band_mean == pytest.approx(scene.attrs.band_mean, rel=1e-9)
    assert strips.attrs.band_std == pytest.approx(scene.attrs.band_std, rel=1e-9)


def test_plain_xarray_and_rioxarray_read_the_store(store):
    """GeoZarr multiscales: ``xr.open_datatree`` opens every level with its CRS and
    transform; reflectance is int16 on disk with CF scale/fill, floats once decoded."""
    import rioxarray  # noqa: F401  (registers .rio)
    import zarr

    _, scene = store
    tree = xr.open_datatree(scene.url, engine="zarr", consolidated=False)
    assert sorted(tree.children) == ["0", "1", "2", "3"]
    layout = tree.attrs["multiscales"]["layout"]
    assert [(x["asset"], x["transform"]["scale"][0]) for x in layout] == [
        ("0", 1.0), ("1", 2.0), ("2", 4.0), ("3", 8.0)
    ]  # fmt: skip
    for level in range(4):
        ds = tree[str(level)].to_dataset()
        assert ds["image"].rio.crs.to_epsg() == 32633
        assert ds["image"].rio.transform() == scene.geobox(level).transform
        assert ds["image"].dtype.kind == "f"
        assert ds["label"].dtype.kind in "fu"  # CF: 255 is the label's fill
    decoded = tree["0"]["image"].values
    np.testing.assert_allclose(decoded, scene.level(0)["image"].values, equal_nan=True)
    root = zarr.open_group(scene.url.removeprefix("file://"), mode="r")
    for level in "0123":  # every level: half the bytes of float32
        raw = root[level]["image"]
        assert raw.dtype == np.int16 and raw.attrs["scale_factor"] == 1e-4
        assert raw.attrs["_FillValue"] == -32768
    assert scene.attrs.band_mean and all(m > 0 for m in scene.attrs.band_mean)


def test_rerun_is_a_no_op(store, stac_api):
    item, scene = store
    image = load_scene([item], BANDS)
    classes = classes_from_stac(item.assets["labels"].extra_fields["classification:classes"])
    labels = load_labels([item], image.odc.geobox, classes)
    again = write_scene(scene.url, image, labels, classes=classes, chunk_px=128)
    assert again.attrs == scene.attrs  # same creation time: nothing was rewritten


def test_reopened_store_reads_boxes(store):
    _, scene = store
    reopened = open_scene(scene.url)
    image, label = reopened.read_box((-22, -22, 42, 42), level=0)
    assert image.shape == (4, 64, 64) and label.shape == (64, 64)
    assert np.isnan(image[:, :22]).all() and (label[:22] == 255).all()
    np.testing.assert_array_equal(
        image[:, 22:, 22:], reopened.level(0)["image"].values[:, :42, :42]
    )


def test_a_store_and_an_array_pyramid_hold_the_same_levels(store):
    """The store's levels are the window reader's pyramid of level 0, within a count
    (1e-4: level 0 and each level are rounded to counts); labels exactly."""
    from relay_models.windows import ArrayPyramid

    _, scene = store
    image = scene.level(0)["image"].values
    label = scene.level(0)["label"].values
    pyr = ArrayPyramid(image, label, num_levels=scene.num_levels)
    for level in range(scene.num_levels + 1):
        ds = scene.level(level)
        expected = pyr.levels[level][0]
        np.testing.assert_allclose(ds["image"].values, expected, atol=1e-4 + 1e-7, rtol=0)
        assert np.array_equal(np.isnan(ds["image"].values), np.isnan(expected))
        np.testing.assert_array_equal(ds["label"].values, pyr.levels[level][1])


def test_ingest_never_deletes_a_folder_it_did_not_write(store, tmp_path):
    """A folder at the store URL without relaymap's marker is refused, left as it was."""
    from relaymap.ingest import StoreError, write_scene

    _, scene = store
    image = scene.level(0)["image"]
    folder = tmp_path / "precious.zarr"
    folder.mkdir()
    (folder / "thesis.txt").write_text("five years of work")
    with pytest.raises(StoreError, match="is not a relaymap scene store"):
        write_scene(str(folder), image)
    assert (folder / "thesis.txt").read_text() == "five years of work"
