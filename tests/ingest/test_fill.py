"""No data in scene stores: one fill value for zarr and CF, chunks that were never written
read as missing, levels that average only valid pixels, and an ingest without warnings
(issue 34, part 5; issue 36, part 2)."""

from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import pystac
import pytest
import xarray as xr
import zarr
from odc.geo.geobox import GeoBox

from relay_models.windows import ArrayPyramid
from relaymap.catalog.storage import exists, join, native
from relaymap.ingest import classes_from_stac, load_labels, load_scene, write_scene
from relaymap.ingest.sample import BANDS
from relaymap.ingest.store import REFLECTANCE_FILL

#: The sample scene is 256 px; the store's grid reaches 128 px further east, where no item
#: has a pixel: with 64 px chunks, chunk columns 4 and 5 hold no data at all.
EAST_PX, CHUNK_PX = 128, 64


@pytest.fixture(scope="module")
def store(sample_local, tmp_path_factory):
    """A scene ingested as int16 counts (and labels) onto a grid wider than its item, with
    RuntimeWarnings turned into errors for the whole ingest (threads included: the filter
    is global), so that a warning fails the fixture."""
    item = next(iter(sample_local.get_items()))
    native_box = load_scene([item], BANDS).odc.geobox
    h, w = native_box.shape
    gbox = GeoBox((h, w + EAST_PX), native_box.transform, native_box.crs)
    url = str(tmp_path_factory.mktemp("fill") / "wide.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        image = load_scene([item], BANDS, geobox=gbox, chunk_px=CHUNK_PX, counts=True)
        assert image.dtype == np.int16  # the counts path
        classes = classes_from_stac(item.assets["labels"].extra_fields["classification:classes"])
        labels = load_labels([item], gbox, classes, chunk_px=CHUNK_PX)
        scene = write_scene(url, image, labels, classes=classes, chunk_px=CHUNK_PX)
    return scene, w


def test_console_ingest_warns_nothing_and_zarr_fill_is_the_cf_fill(store):
    """The ingest above ran with RuntimeWarnings as errors (it printed zarr's "invalid value
    encountered in cast" before: levels of NaN floats cast to int16); every array's zarr
    ``fill_value`` is its CF ``_FillValue``."""
    scene, _ = store
    root = zarr.open_group(native(scene.url), mode="r")
    for level in map(str, range(scene.num_levels + 1)):
        image, label = root[level]["image"], root[level]["label"]
        assert image.dtype == np.int16
        assert image.fill_value == image.attrs["_FillValue"] == REFLECTANCE_FILL
        assert label.fill_value == label.attrs["_FillValue"] == 255


def test_ingest_chunk_never_written_reads_as_missing_through_zarr_xarray_odc_stac(store):
    """Chunks east of the item hold no data, so zarr never writes them; read back they are
    missing through zarr (the fill value, which is CF's no data), xarray (NaN, labels 255)
    and odc-stac (NaN)."""
    from odc.loader._zarr import XrMemReaderDriver
    from odc.stac import load

    scene, item_w = store
    east = slice(item_w, None)
    for level in range(2):  # level 1's chunks (64 px) cover 128 px of level 0: one column
        col = (item_w >> level) // CHUNK_PX
        assert not exists(join(scene.url, f"{level}/image/c/0/0/{col}"))  # never written
        assert not exists(join(scene.url, f"{level}/label/c/0/{col}"))
        assert exists(join(scene.url, f"{level}/image/c/0/0/0"))
    root = zarr.open_group(native(scene.url), mode="r")
    raw = root["0"]["image"][:, :, east]
    assert (raw == root["0"]["image"].attrs["_FillValue"]).all()
    assert (root["0"]["label"][:, east] == 255).all()

    ds = xr.open_zarr(scene.url, group="0", consolidated=False)  # CF decoding
    assert np.isnan(ds["image"][:, :, east].values).all()
    assert np.isfinite(ds["image"][:, :, :item_w].values).any()
    assert (ds["label"][:, east].fillna(255).values == 255).all()  # CF: NaN, or raw 255
    tree = xr.open_datatree(scene.url, engine="zarr", consolidated=False)
    assert np.isnan(tree["1"]["image"][:, :, item_w // 2 :].values).all()

    # odc-stac reads Zarr through odc-loader's "zarr" driver (an xarray dataset per item;
    # GDAL 3.10's Zarr driver cannot read zarr v3's "bytes" codec): a STAC item of the store
    # with a band per asset, loaded onto the store's grid
    bands = ds["image"].to_dataset("band")
    gbox = scene.geobox(0)
    footprint = gbox.footprint("EPSG:4326")
    item = pystac.Item(
        "store", footprint.json, list(footprint.boundingbox), dt.datetime(2024, 6, 1), {}
    )
    for band in BANDS:
        item.add_asset(band, pystac.Asset(scene.url, media_type="application/vnd+zarr"))
    loaded = load([item], bands=list(BANDS), geobox=gbox, driver=XrMemReaderDriver(bands))
    for band in BANDS:
        got = loaded[band].isel(time=0).values
        assert np.isnan(got[:, east]).all()
        np.testing.assert_array_equal(got, ds["image"].sel(band=band).values)


def test_ingest_levels_of_counts_average_only_valid_pixels(store):
    """Levels of an int16 store are the window reader's pyramid of level 0 as stored:
    within a count, no data exactly where a whole cell has none (before: NaN means cast to
    int16 read as reflectance 0.0, and a cell with one missing pixel became no data)."""
    scene, _ = store
    image = scene.level(0)["image"].values
    label = scene.level(0)["label"].values
    assert np.isnan(image).any() and np.isfinite(image).any()
    pyramid = ArrayPyramid(image, label, num_levels=scene.num_levels)
    for level in range(1, scene.num_levels + 1):
        got, expected = scene.level(level)["image"].values, pyramid.levels[level][0]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_allclose(got, expected, atol=1e-4 + 1e-7, rtol=0)
        np.testing.assert_array_equal(scene.level(level)["label"].values, pyramid.levels[level][1])


def test_ingest_store_of_an_older_format_is_refused_then_rewritten(sample_local, tmp_path):
    """A store written before format 3 (its coarser levels held count 0 for missing pixels)
    is never read as it is: opening it is one error saying to ingest again, and the same
    ingest rewrites it (it is relaymap's own store, outdated, whatever it held)."""
    from relaymap.ingest import StoreError, open_scene
    from relaymap.ingest.store import ATTR, FORMAT_VERSION

    item = next(iter(sample_local.get_items()))
    image = load_scene([item], BANDS, counts=True)
    url = str(tmp_path / "old.zarr")
    write_scene(url, image)
    root = zarr.open_group(native(url), mode="r+")
    old = {k: v for k, v in dict(root.attrs)[ATTR].items() if k != "format"}
    old["fingerprint"] = "0" * 16  # what a format-2 writer hashed (its version differed)
    root.attrs[ATTR] = old
    with pytest.raises(StoreError, match=r"older relaymap .*store format 2.*ingest it again"):
        open_scene(url)
    rewritten = write_scene(url, image)
    assert rewritten.attrs.format == FORMAT_VERSION and open_scene(url).attrs.complete
