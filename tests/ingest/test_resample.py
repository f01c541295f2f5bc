"""Going coarser, only valid pixels count: a WorldView-2-like 2 m scene (501 x 500 px, its
nodata declared in ``raster:bands`` only, as commercial GeoTIFFs often do, with an all-zero
first row and last column, a cloud mask asset with a cloudy block, and labels with an
unlabelled block) ingested at 10 m and composited onto 10 m cells equals GDAL's ``average``
with the nodata set (the clouds set to nodata too), and a coarse pixel is nodata exactly
when fewer than half of its fine pixels are valid."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from odc.geo.geobox import GeoBox
from odc.geo.geom import box
from rasterio.warp import Resampling, reproject

from relaymap.ingest import ingest_items, open_scene
from relaymap.ingest.composite import composite
from relaymap.ingest.profiles import MaskRule, ReadOptions
from relaymap.ingest.resample import MIN_VALID_SHARE

BANDS = ("blue", "green", "red", "nir")
CRS = "EPSG:32633"
X0, Y1, H, W = 500_000.0, 4_800_000.0, 501, 500
FINE = Affine(2, 0, X0, 0, -2, Y1)
#: The 10 m lattice of the scene, with a margin of 10 coarse pixels outside it all round.
COARSE = GeoBox((121, 120), Affine(10, 0, X0 - 100, 0, -10, Y1 + 100), CRS)
#: Coarse pixels (of the scene's own 10 m grid) left with 13 and 12 valid fine pixels of
#: 25 by the cloud mask: just above and just below the share.
KEEP, DROP = (60, 60), (60, 62)
READ = ReadOptions(mask=MaskRule(asset="cloud", values=(1,)), scale={"*": 1e-4})


def _boundary(mask: np.ndarray, rc: tuple[int, int], bad: int) -> None:
    """Flag ``bad`` of the 25 fine pixels under coarse pixel ``rc``."""
    block = mask[rc[0] * 5 : rc[0] * 5 + 5, rc[1] * 5 : rc[1] * 5 + 5].reshape(-1)
    block[:bad] = 1
    mask[rc[0] * 5 : rc[0] * 5 + 5, rc[1] * 5 : rc[1] * 5 + 5] = block.reshape(5, 5)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The scene's files and item, and what the test knows of its pixels."""
    root = tmp_path_factory.mktemp("resample")
    rng = np.random.default_rng(35)
    dn = rng.integers(200, 4000, size=(4, H, W)).astype(np.uint16)
    dn[:, 0, :] = 0  # the nodata edges: an all-zero row and column
    dn[:, :, -1] = 0
    cloud = np.zeros((H, W), np.uint8)
    cloud[200:260, 100:160] = 1  # a cloudy block, whole coarse pixels
    cloud[262:267, 300:307] = 1  # and one across coarse pixels' edges
    _boundary(cloud, KEEP, 12)
    _boundary(cloud, DROP, 13)
    labels = rng.choice([1, 2, 3], size=(H, W), p=[0.6, 0.3, 0.1]).astype(np.uint8)
    labels[400:460, 0:60] = 0  # unlabelled (nodata 0)
    _boundary_labels = np.zeros((H, W), np.uint8)
    _boundary(_boundary_labels, KEEP, 12)
    _boundary(_boundary_labels, DROP, 13)
    labels[_boundary_labels == 1] = 0
    files = {}
    for key, data in (("image", dn), ("cloud", cloud[None]), ("labels", labels[None])):
        files[key] = root / f"wv2-{key}.tif"
        with rasterio.open(
            files[key], "w", driver="GTiff", width=W, height=H, count=data.shape[0],
            dtype=data.dtype.name, crs=CRS, transform=FINE,  # no nodata in the header
        ) as dst:  # fmt: skip
            dst.write(data)
    area = box(X0, Y1 - 2 * H, X0 + 2 * W, Y1, CRS).to_crs("EPSG:4326")
    item = pystac.Item(
        "wv2-edges",
        area.json,
        list(area.boundingbox),
        dt.datetime(2024, 6, 1, tzinfo=dt.UTC),
        {"proj:code": CRS, "gsd": 2.0},
    )
    bands = [{"name": n, "common_name": n} for n in BANDS]
    nodata = [{"nodata": 0, "data_type": "uint16"}] * 4
    item.add_asset(
        "image",
        pystac.Asset(
            f"file://{files['image']}", extra_fields={"eo:bands": bands, "raster:bands": nodata}
        ),
    )
    item.add_asset("cloud", pystac.Asset(f"file://{files['cloud']}", roles=["cloud"]))
    classes = [{"value": v, "name": n} for v, n in ((1, "a"), (2, "b"), (3, "c"))]
    item.add_asset(
        "labels",
        pystac.Asset(
            f"file://{files['labels']}",
            extra_fields={
                "classification:classes": classes,
                "raster:bands": [{"nodata": 0, "data_type": "uint8"}],
            },
        ),
    )
    return {"root": root, "item": item, "dn": dn, "cloud": cloud, "labels": labels}


def _valid_count(valid: np.ndarray) -> np.ndarray:
    """Valid fine pixels per pixel of :data:`COARSE` (counted, 25 per pixel)."""
    padded = np.zeros((COARSE.shape[0] * 5, COARSE.shape[1] * 5), bool)
    padded[50 : 50 + H, 50 : 50 + W] = valid
    return padded.reshape(COARSE.shape[0], 5, COARSE.shape[1], 5).sum(axis=(1, 3))


@pytest.fixture(scope="module")
def gdal(scene):
    """GDAL's ``average`` with nodata 0 (the clouds set to 0) onto :data:`COARSE`, in DN,
    NaN where fewer than half of a pixel's 25 fine pixels are valid."""
    dn = np.where(scene["cloud"] == 1, 0, scene["dn"])
    out = np.full((4, *COARSE.shape), np.nan, np.float32)
    for i in range(4):
        reproject(
            dn[i], out[i], src_transform=FINE, src_crs=CRS, src_nodata=0,
            dst_transform=COARSE.transform, dst_crs=CRS, dst_nodata=np.nan,
            resampling=Resampling.average,
        )  # fmt: skip
    count = _valid_count((dn != 0).all(0))
    out[:, count < 25 * MIN_VALID_SHARE] = np.nan
    return out, count


def test_resample_ingest_at_10m_equals_gdal_average_with_nodata_and_the_share(scene, gdal):
    """``ingest_items(resolution=10)`` stores GDAL's nodata-aware average (within the
    store's rounding to counts of 1e-4): the edge row over the all-zero row holds its valid
    pixels' average, never one pulled down by the zeros; clouds do not enter it."""
    want, count = gdal
    store = ingest_items(
        [scene["item"]], str(scene["root"] / "10m.zarr"), BANDS,
        label_asset=None, read=READ, resolution=10,
    )  # fmt: skip
    assert store.shape(0) == (101, 100)
    got = open_scene(store.url).level(0)["image"].values / 1e-4
    want = want[:, 10:111, 10:110]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, atol=0.5 + 1e-3)  # counts are whole DN
    # the edge row: rows 1..4 of its 5 are valid (the zero row is not)
    dn = scene["dn"].astype(float)
    valid_mean = dn[:, 1:5, :495].reshape(4, 4, 99, 5).mean(axis=(1, 3))
    np.testing.assert_allclose(got[:, 0, :99], valid_mean, atol=0.5 + 1e-3)
    # the last row covers one fine row of five: nodata; the cloud block is nodata
    assert np.isnan(got[:, 100]).all() and np.isnan(got[:, 40:52, 20:32]).all()
    # the share, at its boundary: 13 of 25 valid keeps a value, 12 of 25 does not
    assert count[10 + KEEP[0], 10 + KEEP[1]] == 13 and np.isfinite(got[:, KEEP[0], KEEP[1]]).all()
    assert count[10 + DROP[0], 10 + DROP[1]] == 12 and np.isnan(got[:, DROP[0], DROP[1]]).all()


def test_resample_composite_on_cells_equals_gdal_average_with_nodata(scene, gdal):
    """The area path (``composite`` onto a grid cell that reaches past the scene's edges)
    gives the same: GDAL's nodata-aware average, nodata below the share and outside."""
    want, _ = gdal
    for rows, cols in ((slice(0, 40), slice(0, 48)), (slice(80, 121), slice(72, 120))):
        cell = COARSE[rows, cols]
        image, warnings = composite([scene["item"]], BANDS, cell, read=READ, chunk_px=32)
        assert warnings == []
        got = image.values / np.float32(1e-4)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want[:, rows, cols]))
        np.testing.assert_allclose(got, want[:, rows, cols], atol=0.05)


def test_resample_composite_in_another_crs_averages_valid_pixels(scene):
    """A cell in the neighbouring UTM zone: GDAL's nodata-aware average reprojected, where
    a pixel is clearly valid or clearly not (the share is GDAL's area weighting there)."""
    crs = "EPSG:32634"
    cell = GeoBox.from_bbox(
        box(X0 + 100, Y1 - 900, X0 + 1100, Y1 + 100, CRS).to_crs(crs).boundingbox,
        crs=crs,
        resolution=10,
    )
    dn = np.where(scene["cloud"] == 1, 0, scene["dn"]).astype(np.float32)
    dn[dn == 0] = np.nan
    want = np.full((4, *cell.shape), np.nan, np.float32)
    share = np.zeros(cell.shape, np.float32)
    for i in range(4):
        reproject(
            dn[i], want[i], src_transform=FINE, src_crs=CRS, src_nodata=np.nan,
            dst_transform=cell.transform, dst_crs=crs, dst_nodata=np.nan,
            resampling=Resampling.average,
        )  # fmt: skip
    reproject(
        np.isfinite(dn).all(0).astype(np.float32), share, src_transform=FINE, src_crs=CRS,
        dst_transform=cell.transform, dst_crs=crs, resampling=Resampling.average,
    )  # fmt: skip
    image, _ = composite([scene["item"]], BANDS, cell, read=READ, chunk_px=64)
    got = image.values / np.float32(1e-4)
    clear, dark = share > 0.6, share < 0.4
    assert clear.mean() > 0.5 and dark.any()
    # GDAL's approximate transformer (0.125 px error) over another source window: within
    # half a DN of values of about 2000
    np.testing.assert_allclose(got[:, clear], want[:, clear], atol=0.5)
    assert np.isnan(got[:, dark]).all()


def test_resample_labels_take_the_majority_of_the_labelled_pixels(scene, gdal):
    """Labels at 10 m: per pixel the most frequent label among its labelled fine pixels,
    255 where fewer than half of them are labelled (the unlabelled block, the last row,
    the share's boundary)."""
    store = ingest_items(
        [scene["item"]], str(scene["root"] / "labels.zarr"), BANDS,
        label_asset="labels", read=READ, resolution=10,
    )  # fmt: skip
    got = open_scene(store.url).level(0)["label"].values
    labels = np.zeros((505, 500), np.uint8)
    labels[:H] = scene["labels"]
    blocks = labels.reshape(101, 5, 100, 5).transpose(0, 2, 1, 3).reshape(101, 100, 25)
    checked = 0
    for r in range(101):
        for c in range(100):
            counts = Counter(int(v) for v in blocks[r, c] if v != 0)
            if sum(counts.values()) < 25 * MIN_VALID_SHARE:
                assert got[r, c] == 255, (r, c)
                continue
            (top, n), *rest = [*counts.most_common(), (None, 0)]
            if rest[0][1] == n:  # a tie: either is the majority
                continue
            assert got[r, c] == top - 1, (r, c)  # class index = value - 1
            checked += 1
    assert checked > 9000
    assert (got[80:92, 0:12] == 255).all() and (got[100] == 255).all()
    assert got[KEEP] != 255 and got[DROP] == 255


@pytest.mark.parametrize(
    ("src_m", "dst_m", "offset_m"),
    [(0.6, 10.0, 0.0), (0.6, 10.0, 3.3), (2.5, 7.3, 1.1), (20.0, 30.0, 4.0)],
)
def test_resample_average_on_one_crs_equals_gdals_warper(src_m, dst_m, offset_m):
    """Grids on one CRS average by matrix products (no GDAL call, see ``_area_weights``):
    the values and the no-data pattern GDAL's ``average`` gives, with holes of NaN; another
    CRS still goes through GDAL."""
    from relaymap.ingest import resample

    rng = np.random.default_rng(0)
    n = 400
    src = GeoBox((n, n), Affine(src_m, 0, 5e5, 0, -src_m, 5e6), "EPSG:32633")
    m = int((n * src_m - 2 * offset_m) / dst_m)
    dst = GeoBox((m, m), Affine(dst_m, 0, 5e5 + offset_m, 0, -dst_m, 5e6 - offset_m), "EPSG:32633")
    values = rng.random((n, n)).astype(np.float32)
    values[rng.random((n, n)) < 0.3] = np.nan  # scattered
    values[np.kron(rng.random((n // 16, n // 16)) < 0.3, np.ones((16, 16), bool))] = np.nan
    assert resample._area_weights(src, dst) is not None
    got = resample.average_valid(values, src, dst)
    valid = np.isfinite(values)
    want = resample._warp(values, src, dst, Resampling.average, np.nan, np.float32)
    share = resample._warp(valid.astype(np.float32), src, dst, Resampling.average, None, np.float32)
    want[share < MIN_VALID_SHARE - 1e-6] = np.nan
    np.testing.assert_allclose(resample.valid_share(valid, src, dst), share, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert 0 < np.isnan(got).mean() < 1
    np.testing.assert_allclose(got, want, atol=1e-6, equal_nan=True)
    other = GeoBox(dst.shape, dst.transform, "EPSG:32634")
    assert resample._area_weights(src, other) is None
