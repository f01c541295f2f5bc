"""Batch inference: real Ray Data on a local cluster, real stores, real COGs, S3 and STAC."""

from __future__ import annotations

import numpy as np
import pystac_client
import pytest
import rasterio
import torch

from catalog import StaticCatalog, multihash_sha256
from catalog.storage import filesystem, gdal_env
from flows.infer import InferConfig, infer
from flows.stitch import RowStitcher
from flows.trained import ModelError, load_trained
from ingest import StoreError, open_scene
from ingest.sample import CLASSES
from relay_models.geometry import tile_grid
from relay_models.inference import predict_array, predict_tiles, read_tiles

from .stores import array_store

BANDS = ["blue", "green", "red", "nir"]


# ---------------------------------------------------------------- stitching (no Ray)


def _stitch(shape, tile_px, overlap_px, tile_probs):
    out = np.full((2, *shape), np.nan, dtype=np.float32)
    rows_seen = []

    def sink(y0, probs, valid):
        rows_seen.extend(range(y0, y0 + probs.shape[1]))
        out[:, y0 : y0 + probs.shape[1]] = np.where(valid, probs, np.nan)

    st = RowStitcher(shape, 2, tile_px, overlap_px, sink)
    for t in tile_grid(shape, tile_px, overlap_px=overlap_px):
        p = tile_probs(t)
        st.add(t, p, np.ones((tile_px, tile_px), bool) if p is not None else None)
    st.close()
    return out, rows_seen


@pytest.mark.parametrize("shape", [(200, 330), (64, 64), (40, 90)])
def test_constant_tiles_stitch_to_a_constant_map_without_seams(shape):
    const = np.array([0.3, 0.7], dtype=np.float32)[:, None, None]
    out, rows = _stitch(shape, 64, 16, lambda t: np.broadcast_to(const, (2, 64, 64)).copy())
    assert rows == list(range(shape[0]))  # every row once, top to bottom
    np.testing.assert_allclose(out, np.broadcast_to(const, out.shape), atol=1e-6)


def test_stitch_matches_the_in_memory_blend_and_keeps_skipped_tiles_nodata():
    rng = np.random.default_rng(0)
    shape, tile, overlap = (150, 170), 64, 24
    tiles = tile_grid(shape, tile, overlap_px=overlap)
    probs = {t.origin_yx: rng.random((2, tile, tile), dtype=np.float32) for t in tiles}
    skipped = tiles[0].origin_yx
    out, _ = _stitch(
        shape, tile, overlap, lambda t: None if t.origin_yx == skipped else probs[t.origin_yx]
    )
    # reference: accumulate the whole scene at once
    from relay_models.geometry import blend_weights

    acc, norm = np.zeros((2, *shape)), np.zeros(shape)
    wt = blend_weights(tile, overlap)
    for t in tiles:
        if t.origin_yx == skipped:
            continue
        oy, ox = t.origin_yx
        h, w = min(tile, shape[0] - oy), min(tile, shape[1] - ox)
        acc[:, oy : oy + h, ox : ox + w] += probs[t.origin_yx][:, :h, :w] * wt[:h, :w]
        norm[oy : oy + h, ox : ox + w] += wt[:h, :w]
    ref = np.where(norm > 0, acc / np.maximum(norm, 1e-12), np.nan)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.isnan(out[:, :10, :10]).all()  # covered by the skipped tile only


def _read(url):
    with rasterio.Env(**gdal_env()), rasterio.open(url) as src:
        return src.read(), src.profile, src.overviews(1), src.tags(ns="IMAGE_STRUCTURE")


def _config(scenes, tmp_path, **kw):
    return InferConfig(
        model=scenes["model"], scene=scenes["stores"][1], out=str(tmp_path / "maps"), **kw
    )


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_scene_to_cog_on_s3_registered_in_a_searchable_catalog(ray_local, scenes, s3):
    catalog_url = "s3://relaymap-test/infer-catalog"
    cfg = InferConfig(
        model=scenes["model"],
        scene=scenes["stores"][1],
        out="s3://relaymap-test/maps",
        catalog=catalog_url,
        tile_px=128,
        overlap_px=32,
        workers=2,
        probabilities=True,
    )
    product = infer(cfg, progress=False)
    data, profile, overviews, tags = _read(product.classes_url)
    store = open_scene(scenes["stores"][1])
    gbox = store.geobox(0)
    assert tags["LAYOUT"] == "COG" and overviews == [2]  # 640 px with 512 px tiles
    assert (profile["blockxsize"], profile["blockysize"]) == (512, 512)
    assert profile["crs"] == rasterio.CRS.from_wkt(gbox.crs.to_wkt())
    assert profile["transform"].almost_equals(gbox.transform)
    assert profile["nodata"] == 255
    valid = store.valid(0).values
    assert (data[0][~valid] == 255).all() and (~valid).any()  # the nodata corner
    assert (data[0][valid] < 6).all()
    with rasterio.Env(**gdal_env()), rasterio.open(product.classes_url) as src:
        assert src.colormap(1)[1][:3] == tuple(bytes.fromhex(CLASSES[1].color_hint))
    probs, _pprof, _, ptags = _read(product.probabilities_url)
    assert ptags["LAYOUT"] == "COG" and probs.shape == (6, 640, 640)
    # classes are the argmax of the stored probabilities (up to ties from rounding)
    agree = (probs.argmax(0) == data[0])[valid].mean()
    assert agree > 0.98
    fs, path = filesystem(product.quicklook_url)
    assert fs.cat_file(path)[:8] == b"\x89PNG\r\n\x1a\n"
    # registered: searchable through a STAC API over the catalog, checksum matches the file
    catalog = StaticCatalog(catalog_url)
    with catalog.serve() as api:
        found = list(
            pystac_client.Client.open(api)
            .search(collections=["relaymap-maps"], bbox=list(product.item.bbox))
            .items()
        )
    assert [i.id for i in found] == [product.item.id]
    asset = found[0].assets["classes"]
    assert asset.extra_fields["file:checksum"] == multihash_sha256(product.classes_url)[1]
    stored = catalog.get_item("relaymap-maps", product.item.id)  # rustac rewrites links
    derived = [ln.title for ln in stored.links if ln.rel == "derived_from"]
    assert derived == [scenes["items"][1].id]
    # a rerun replaces the products in place and does not duplicate the item
    again = infer(cfg, progress=False)
    assert again.item.id == product.item.id
    assert [i.id for i in catalog.items("relaymap-maps")] == [product.item.id]
    fs, path = filesystem(cfg.out)
    assert not [p for p in fs.find(path) if ".tmp-" in p]


@pytest.mark.slow
def test_tiled_output_equals_the_model_on_windows(ray_local, tmp_path, scenes):
    trained = load_trained(scenes["model"])
    model = trained.model
    # a 192 px scene cut from a sample scene, away from its nodata corner
    image, _ = open_scene(scenes["stores"][1]).read_box((400, 400, 592, 592))
    assert np.isfinite(image).all()
    small = array_store(str(tmp_path / "small.zarr"), image, None, bands=list(BANDS))
    mean = torch.tensor(trained.inputs.band_mean)[:, None, None]
    std = torch.tensor(trained.inputs.band_std)[:, None, None]
    norm = (torch.from_numpy(image) - mean) / std  # the model's statistics, not the store's
    cfg = dict(
        model=scenes["model"], scene=small.url, out=str(tmp_path / "maps"), probabilities=True
    )
    tol = 0.6 / 254  # probabilities are stored as round(p * 254)

    # one window: tiles as large as the scene give the model's answer on the whole window
    one = infer(InferConfig(**cfg, tile_px=192, item_id="one"), progress=False)
    glob = read_tiles(norm, tile_grid((192, 192), 192), factor=trained.factor)[1]
    ref = predict_tiles(model, norm[None], glob)[0].numpy()
    np.testing.assert_allclose(_read(one.probabilities_url)[0] / 254, ref, atol=tol)
    # disjoint tiles (overlap 0): each tile is exactly the model on that tile
    # overlapping tiles: the in-memory cosine blend of the same tiles
    for overlap in (0, 16):
        got = infer(
            InferConfig(**cfg, tile_px=64, overlap_px=overlap, item_id=f"o{overlap}"),
            progress=False,
        )
        ref = predict_array(model, norm, tile_px=64, overlap_px=overlap).numpy()
        probs = _read(got.probabilities_url)[0] / 254
        np.testing.assert_allclose(probs, ref, atol=tol)
        classes = _read(got.classes_url)[0][0]
        assert (classes == ref.argmax(0))[
            np.abs(np.diff(np.sort(ref, 0)[-2:], axis=0)[0]) > tol
        ].all()


@pytest.mark.slow
def test_an_interrupted_run_leaves_no_partial_cog_and_keeps_the_old_one(
    ray_local, tmp_path, scenes, monkeypatch
):
    import flows.cog

    cfg = _config(scenes, tmp_path, tile_px=128, overlap_px=0, quicklook=False, probabilities=True)
    product = infer(cfg, progress=False)
    before = _read(product.classes_url)[0]

    def crash(src, dst, **kw):  # GDAL dies half-way through writing the COG
        with open(dst, "wb") as f:
            f.write(b"II*\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(flows.cog, "to_cog", crash)
    with pytest.raises(OSError, match="disk full"):
        infer(cfg, progress=False)
    np.testing.assert_array_equal(_read(product.classes_url)[0], before)
    leftovers = [p for p in (tmp_path / "maps").rglob("*") if p.is_file()]
    assert sorted(p.name for p in leftovers) == ["classes.tif", "probabilities.tif"]


def test_bad_models_and_scenes_fail_before_any_compute(tmp_path, scenes):
    rng = np.random.default_rng(0)
    image = rng.random((4, 96, 96), dtype=np.float32)
    model = scenes["model"]

    def run(scene, model=model):
        return infer(InferConfig(model=model, scene=scene, out=str(tmp_path / "o")))

    three = array_store(str(tmp_path / "three.zarr"), image[:3], None, bands=BANDS[:3])
    with pytest.raises(ModelError, match=r"expects bands \['blue', 'green', 'red', 'nir'\]"):
        run(three.url)
    labels = rng.integers(0, 2, (96, 96), dtype=np.uint8)
    other = array_store(str(tmp_path / "other.zarr"), image, labels, bands=BANDS)
    with pytest.raises(ModelError, match="classes"):
        run(other.url)
    empty = array_store(
        str(tmp_path / "empty.zarr"), np.full_like(image, np.nan), None, bands=BANDS
    )
    with pytest.raises(StoreError, match="empty"):
        run(empty.url)
    with pytest.raises(StoreError, match="no scene store"):
        run(str(tmp_path / "missing.zarr"))
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelError, match="no relaymap metadata"):
        run(other.url, model=str(plain))
    with pytest.raises(ModelError, match="no model file at"):
        run(other.url, model=str(tmp_path / "gone.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        run(other.url, model=str(tmp_path / "junk.safetensors"))
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.slow
def test_a_scene_smaller_than_a_tile_is_padded_and_mapped(ray_local, tmp_path, scenes):
    image, _ = open_scene(scenes["stores"][1]).read_box((300, 300, 340, 350))
    image[:, :5] = np.nan  # a nodata strip
    small = array_store(str(tmp_path / "tiny.zarr"), image, None, bands=BANDS, num_levels=1)
    product = infer(
        InferConfig(model=scenes["model"], scene=small.url, out=str(tmp_path / "m")),
        progress=False,
    )
    data, profile, _, tags = _read(product.classes_url)
    assert data.shape == (1, 40, 50) and tags["LAYOUT"] == "COG"
    assert profile["transform"].almost_equals(small.geobox(0).transform)
    assert (data[0, :5] == 255).all() and (data[0, 5:] < 6).all()
    assert product.tiles == 1 and product.skipped == 0


def test_a_model_loads_from_its_mlm_item(tmp_path, scenes):
    from catalog import model_item

    trained = load_trained(scenes["model"])
    inputs = trained.inputs
    item = model_item(
        scenes["model"],
        item_id="quick",
        collection="relaymap-models",
        model_name=trained.config.name,
        architecture="SwinTransformerV2 + relay tokens",
        bands=inputs.bands,
        band_mean=inputs.band_mean,
        band_std=inputs.band_std,
        classes=inputs.classes,
        window_px=inputs.window_px,
        factor=trained.factor,
        total_parameters=1,
    )
    catalog = StaticCatalog(str(tmp_path / "catalog"))
    catalog.add_items([item])
    via_item = load_trained(item.get_self_href())
    assert via_item.item.id == "quick" and via_item.name == "quick"
    assert via_item.weights_url == trained.weights_url
    ours, theirs = via_item.model.state_dict(), trained.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_cli_infer(ray_local, tmp_path, scenes):
    from click.testing import CliRunner

    from flows.cli import main

    out = tmp_path / "cli"
    args = ["infer", "--model", scenes["model"], "--scene", scenes["stores"][1], "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--catalog", str(tmp_path / "cat"), "--tile-px", "128"])
    assert res.exit_code == 0, res.output
    assert "classes: file://" in res.output and "quicklook: " in res.output
    assert (tmp_path / "cat" / "relaymap-maps" / "items").is_dir()
    bad = CliRunner().invoke(main, [*args, "--batch-size", "0"])
    assert bad.exit_code == 2 and "batch_size" in bad.output
