"""Bad input to ingest: a typed error naming the input, and nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pystac
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject

from relaymap.catalog.storage import exists, filesystem, read_bytes
from relaymap.ingest import (
    CorruptRasterError,
    GridError,
    MissingAssetError,
    NoItemsFound,
    StacApiError,
    StoreError,
    classes_from_stac,
    classes_from_table,
    load_labels,
    load_scene,
    open_scene,
    search,
    write_scene,
)
from relaymap.ingest.sample import BANDS, CLASSES

CODES = {c.code: i for i, c in enumerate(CLASSES)}


def _item(sample, i=0) -> pystac.Item:
    return pystac.Item.from_dict(list(sample.get_items())[i].to_dict())


def _classes(item):
    return classes_from_stac(item.assets["labels"].extra_fields["classification:classes"])


def _expected_labels(item):
    with rasterio.open(item.assets["labels"].href) as src:
        raw = src.read(1)
    return np.vectorize(lambda v: CODES.get(int(v), 255))(raw).astype(np.uint8)


class TestSearch:
    def test_bbox_with_no_items(self, stac_api):
        with pytest.raises(NoItemsFound, match=r"no STAC item .* bbox=\(0, 0, 1, 1\)"):
            search(stac_api, collections=["relaymap-sample"], bbox=(0, 0, 1, 1))

    def test_unreachable_api(self):
        from relaymap.catalog.server import free_port

        url = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(StacApiError, match=f"cannot reach the STAC API at {url}"):
            search(url, collections=["x"])

    def test_missing_asset_named(self, stac_api):
        with pytest.raises(MissingAssetError, match="has no asset swir16"):
            search(stac_api, collections=["relaymap-sample"], require_assets=("red", "swir16"))

    def test_cloud_cover_filter(self, stac_api, sample_s3):
        clouds = {it.id: it.properties["eo:cloud_cover"] for it in sample_s3.get_items()}
        limit = sorted(clouds.values())[1]
        got = search(stac_api, collections=["relaymap-sample"], max_cloud_cover=limit)
        assert {it.id for it in got} == {k for k, v in clouds.items() if v <= limit}


class TestLoad:
    def test_missing_band_asset(self, sample_local):
        item = _item(sample_local)
        del item.assets["nir"]
        with pytest.raises(MissingAssetError, match=f"item {item.id} has no band 'nir'"):
            load_scene([item], BANDS)

    def test_corrupt_header(self, sample_local, tmp_path):
        item = _item(sample_local)
        bad = tmp_path / "red.tif"
        bad.write_bytes(b"II*\x00 definitely not a tiff")
        item.assets["red"].href = str(bad)
        with pytest.raises(CorruptRasterError, match=r"asset 'red' at .*red.tif"):
            load_scene([item], BANDS)

    def test_corrupt_tiles_leave_no_store(self, sample_local, tmp_path):
        item = _item(sample_local)
        good = read_bytes(item.assets["red"].href)
        bad = tmp_path / "red.tif"
        bad.write_bytes(good[: len(good) * 2 // 3])  # header fine, tiles truncated
        item.assets["red"].href = str(bad)
        image = load_scene([item], BANDS, chunk_px=64)
        url = str(tmp_path / "broken.zarr")
        with pytest.raises(CorruptRasterError, match="no store was left behind"):
            write_scene(url, image, chunk_px=64)
        assert not exists(url)

    def test_target_grid_needs_crs_and_resolution(self, sample_local):
        with pytest.raises(GridError, match="crs and resolution together"):
            load_scene([_item(sample_local)], BANDS, crs="EPSG:32633")

    def test_median_composite(self, sample_local):
        a, b = _item(sample_local, 0), _item(sample_local, 0)
        b.id = "copy"
        img = load_scene([a, b], BANDS, composite="median").values
        np.testing.assert_allclose(img, load_scene([a], BANDS).values, equal_nan=True)


class TestLabels:
    def test_label_raster_in_another_crs_is_reprojected(self, sample_local, tmp_path):
        item = _item(sample_local)
        src_path = item.assets["labels"].href
        dst_path = tmp_path / "labels_3857.tif"
        with rasterio.open(src_path) as src:
            t, w, h = calculate_default_transform(
                src.crs, "EPSG:3857", src.width, src.height, *src.bounds
            )
            with rasterio.open(
                dst_path,
                "w",
                **(
                    src.profile
                    | dict(driver="GTiff", crs="EPSG:3857", transform=t, width=w, height=h)
                ),
            ) as dst:
                reproject(
                    rasterio.band(src, 1), rasterio.band(dst, 1), resampling=Resampling.nearest
                )
        image = load_scene([item], BANDS)
        got = load_labels(str(dst_path), image.odc.geobox, _classes(item)).values
        assert (got == _expected_labels(item)).mean() > 0.995

    def test_vector_labels_are_rasterised(self, sample_local, tmp_path):
        item = _item(sample_local)
        image = load_scene([item], BANDS)
        gbox = image.odc.geobox
        # a square in UTM over pixel rows/cols 10..50, written in EPSG:4326
        from pyproj import Transformer

        t = gbox.transform
        to_ll = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
        xs = [t.c + 10 * t.a, t.c + 50 * t.a]
        ys = [t.f + 10 * t.e, t.f + 50 * t.e]
        ring = [
            list(to_ll.transform(x, y))
            for x, y in [
                (xs[0], ys[0]),
                (xs[1], ys[0]),
                (xs[1], ys[1]),
                (xs[0], ys[1]),
                (xs[0], ys[0]),
            ]
        ]
        path = tmp_path / "fields.geojson"
        path.write_text(
            json.dumps(
                {
                    "type": "FeatureCollection",
                    "features": [
                        {
                            "type": "Feature",
                            "properties": {"class": 40},
                            "geometry": {"type": "Polygon", "coordinates": [ring]},
                        }
                    ],
                }
            )
        )
        got = load_labels(str(path), gbox, _classes(item), chunk_px=32).values
        assert (got[12:48, 12:48] == CODES[40]).all()
        assert (got[60:, 60:] == 255).all()

    def test_unknown_values_are_ignored(self):
        from relaymap.ingest.labels import map_values

        classes = classes_from_table({10: 0, 20: 1})
        out = map_values(np.array([[10, 20, 30, 0]]), classes, nodata=0)
        np.testing.assert_array_equal(out, [[0, 1, 255, 255]])

    def test_bad_class_table(self):
        with pytest.raises(ValueError, match=r"0\.\.K-1"):
            classes_from_table({10: 0, 20: 2})


class TestStore:
    def _write(self, sample, url, **kw):
        item = _item(sample)
        image = load_scene([item], BANDS, chunk_px=64)
        labels = load_labels([item], image.odc.geobox, _classes(item), chunk_px=64)
        return write_scene(url, image, labels, classes=_classes(item), chunk_px=64, **kw)

    def test_interrupted_store_is_refused_then_finished(self, sample_local, tmp_path):
        url = str(tmp_path / "s.zarr")
        scene = self._write(sample_local, url)
        # simulate a crash after level 1: attributes say so, levels 2-3 are gone
        from relaymap.ingest.store import SceneAttrs, _replace

        _replace(scene.attrs, complete=False, levels_done=(0, 1)).write(url)
        fs, path = filesystem(url)
        fs.rm(f"{path}/2", recursive=True)
        fs.rm(f"{path}/3", recursive=True)
        level0 = fs.info(f"{path}/0/image/zarr.json")["mtime"]
        with pytest.raises(StoreError, match="unfinished store"):
            open_scene(url)
        finished = self._write(sample_local, url)
        assert finished.attrs.complete and finished.attrs.levels_done == (0, 1, 2, 3)
        assert fs.info(f"{path}/0/image/zarr.json")["mtime"] == level0  # level 0 kept
        assert finished.level(3)["label"].shape == (32, 32)
        assert SceneAttrs.read(url).created == scene.attrs.created

    def test_other_inputs_need_overwrite(self, sample_local, tmp_path):
        url = str(tmp_path / "s.zarr")
        self._write(sample_local, url)
        other = _item(sample_local, 2)
        image = load_scene([other], BANDS)
        with pytest.raises(StoreError, match="already holds a scene of other inputs"):
            write_scene(url, image)
        replaced = write_scene(url, image, overwrite=True)
        assert replaced.attrs.source_items == (other.id,) and not replaced.has_labels

    def test_a_store_of_the_format_before_geozarr_levels_is_named(self, sample_local, tmp_path):
        import shutil

        url = str(tmp_path / "old.zarr")
        self._write(sample_local, url)
        shutil.move(tmp_path / "old.zarr" / "0", tmp_path / "old.zarr" / "levels-0")
        with pytest.raises(StoreError, match=r"written by an older relaymap .* overwrite=True"):
            open_scene(url)

    def test_not_a_store(self, tmp_path):
        with pytest.raises(StoreError, match="no scene store at"):
            open_scene(str(tmp_path / "nothing.zarr"))
        import zarr

        zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
        with pytest.raises(StoreError, match="not a relaymap scene store"):
            open_scene(str(tmp_path / "plain.zarr"))

    def test_scene_smaller_than_a_window_reads_padded(self, sample_local, tmp_path):
        import torch

        from relay_models.geometry import window_pair
        from relay_models.windows import read_pair

        item = _item(sample_local)
        t = load_scene([item], BANDS).odc.geobox.transform
        small = load_scene(
            [item],
            BANDS,
            crs="EPSG:32633",
            resolution=10,
            bounds=(t.c, t.f - 1000, t.c + 1000, t.f),
        )  # 100 x 100 px
        scene = write_scene(str(tmp_path / "small.zarr"), small, num_levels=2, chunk_px=64)
        pair = window_pair((64.0, 64.0), 256, factor=4)
        assert pair.local.pixel_bounds() == (-64, -64, 192, 192)
        local, _ = scene.read_box(pair.local.pixel_bounds(), level=0)
        assert local.shape == (4, 256, 256)
        assert np.isfinite(local[:, 64:164, 64:164]).all()
        assert np.isnan(local[:, :64]).all() and np.isnan(local[:, 164:]).all()
        # read through the window reader: data where the scene is, 0 (the mean) elsewhere
        norm = (torch.zeros(4, 1, 1), torch.ones(4, 1, 1))
        pair_ = read_pair(scene, pair, 256, norm)
        assert pair_["valid"][64:164, 64:164].all() and pair_["valid"].sum() == 100 * 100
        assert (pair_["local"][:, ~pair_["valid"]] == 0).all()
        assert pair_["global"].shape == (4, 256, 256)


def test_ingest_items_in_one_call(sample_local, tmp_path):
    from relaymap.ingest import ingest_items

    item = _item(sample_local)
    store = ingest_items([item], str(tmp_path / "one.zarr"), BANDS, num_levels=1, chunk_px=64)
    np.testing.assert_array_equal(store.level(0)["label"].values, _expected_labels(item))
    assert store.attrs.source_items == (item.id,) and store.attrs.num_levels == 1


def test_a_label_asset_without_classes_is_named_in_one_line(sample_local, tmp_path):
    from relaymap.ingest import ingest_items

    item = _item(sample_local)
    del item.assets["labels"].extra_fields["classification:classes"]
    url = str(tmp_path / "noclasses.zarr")
    with pytest.raises(MissingAssetError) as err:
        ingest_items([item], url, BANDS)
    assert str(err.value) == (
        f"item {item.id}: label asset 'labels' has no 'classification:classes' (value and "
        "name per class); add them to the asset, name the values 0..K-1 "
        "(class_names=[...]), or ingest without labels (label_asset=None)"
    )
    assert not exists(url)
    named = ingest_items([item], url, BANDS, class_names=[f"c{i}" for i in range(61)])
    assert [c["name"] for c in named.attrs.classes][:2] == ["c0", "c1"]


def test_ingest_items_without_the_label_asset(sample_local, tmp_path):
    from relaymap.ingest import ingest_items

    item = _item(sample_local)
    del item.assets["labels"]
    url = str(tmp_path / "none.zarr")
    with pytest.raises(MissingAssetError, match="has no label asset 'labels'"):
        ingest_items([item], url, BANDS)
    assert not exists(url)
    store = ingest_items([item], url, BANDS, label_asset=None, num_levels=1)
    assert not store.has_labels
