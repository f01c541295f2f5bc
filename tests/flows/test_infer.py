"""Batch inference: real Ray Data on a local cluster, real stores, real COGs, S3 and STAC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pystac_client
import pytest
import rasterio
import torch

from relay_models.inference import plan_tiles, predict_array, predict_tiles, read_tiles
from relay_models.windows import ArrayPyramid
from relaymap.catalog import StaticCatalog, multihash_sha256
from relaymap.catalog.storage import filesystem, gdal_env
from relaymap.flows.infer import InferConfig, MapOptions, infer
from relaymap.flows.trained import ModelError, load_trained
from relaymap.ingest import StoreError, open_scene
from relaymap.ingest.sample import CLASSES
from tests.relay_models.helpers import assert_bf16_agrees

from .stores import array_store

BANDS = ["blue", "green", "red", "nir"]


def _read(url):
    with rasterio.Env(**gdal_env()), rasterio.open(url) as src:
        return src.read(), src.profile, src.overviews(1), src.tags(ns="IMAGE_STRUCTURE")


def _config(scenes, tmp_path, **options):
    return InferConfig(
        model=scenes["model"],
        scene=scenes["stores"][1],
        out=str(tmp_path / "maps"),
        options=MapOptions(**options),
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
        options=MapOptions(tile_px=128, overlap_px=32, workers=2, probabilities=True),
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


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory, scenes):
    """A 192 px scene cut from a sample scene, with a nodata block: ``(image, store)``."""
    image, _ = open_scene(scenes["stores"][1]).read_box((400, 400, 592, 592))
    image[:, 150:, :40] = np.nan
    root = tmp_path_factory.mktemp("small")
    return image, array_store(str(root / "small.zarr"), image, None, bands=list(BANDS))


def _map_small(scenes, small_scene, out, **options):
    """``infer`` of the small scene on Ray: probabilities ``(K, H, W)`` and classes."""
    config = InferConfig(
        model=scenes["model"],
        scene=small_scene[1].url,
        out=str(out),
        item_id="-".join(f"{k}{v}" for k, v in options.items()),
        options=MapOptions(probabilities=True, **options),
    )
    product = infer(config, progress=False)
    return _read(product.probabilities_url)[0] / 254, _read(product.classes_url)[0][0]


@pytest.mark.slow
@pytest.mark.precision
def test_ray_mapping_and_predict_array_are_one_engine(ray_local, tmp_path, scenes, small_scene):
    """Batch inference on a store and ``predict_array`` on the same pixels in memory give the
    same probabilities (one read rule, one blend rule), nodata included, both at fp32; a tile
    as large as the scene gives the model's answer on that one window."""
    info, model = load_trained(scenes["model"])
    image = small_scene[0]
    tol = 0.6 / 254  # probabilities are stored as round(p * 254)
    one, _ = _map_small(scenes, small_scene, tmp_path, tile_px=192, precision="fp32")
    tiles = plan_tiles((192, 192), 192)
    inputs = read_tiles(ArrayPyramid(image, num_levels=2), tiles, info.spec)
    with torch.inference_mode():  # fp32, as the Ray path
        ref = predict_tiles(model, inputs["local"], inputs["global"])[0].numpy()
    valid = np.isfinite(image).all(0)
    np.testing.assert_allclose(one[:, valid], ref[:, valid], atol=tol)
    for overlap in (0, 16):
        probs, classes = _map_small(
            scenes, small_scene, tmp_path, tile_px=64, overlap_px=overlap, precision="fp32"
        )
        ref = predict_array(model, image, tile_px=64, overlap_px=overlap, precision="fp32")
        ref = ref.numpy()
        np.testing.assert_allclose(probs[:, valid], ref[:, valid], atol=tol)
        assert (classes[~valid] == 255).all()
        clear = np.abs(np.diff(np.sort(ref, 0)[-2:], axis=0)[0]) > tol
        assert (classes == ref.argmax(0))[clear & valid].all()


@pytest.mark.slow
@pytest.mark.precision
def test_ray_mapping_at_bf16_precision_agrees_with_fp32(ray_local, tmp_path, scenes, small_scene):
    """The Ray path at bf16 against the fp32 engine on the same pixels: within the stated
    bf16 tolerance (``tests/relay_models/helpers.py``), nodata kept."""
    _, model = load_trained(scenes["model"])
    image = small_scene[0]
    bf16, classes = _map_small(
        scenes, small_scene, tmp_path, tile_px=64, overlap_px=16, precision="bf16"
    )
    ref = predict_array(model, image, tile_px=64, overlap_px=16, precision="fp32")
    valid = np.isfinite(image).all(0)
    assert_bf16_agrees(bf16, ref, valid)
    assert (classes[~valid] == 255).all()


@pytest.mark.slow
def test_an_interrupted_run_leaves_no_partial_cog_and_keeps_the_old_one(
    ray_local, tmp_path, scenes, monkeypatch
):
    import relaymap.flows.products.cog

    cfg = _config(scenes, tmp_path, tile_px=128, overlap_px=0, quicklook=False, probabilities=True)
    product = infer(cfg, progress=False)
    before = _read(product.classes_url)[0]

    def crash(src, dst, **kw):  # GDAL dies half-way through writing the COG
        with open(dst, "wb") as f:
            f.write(b"II*\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(relaymap.flows.products.cog, "to_cog", crash)
    with pytest.raises(OSError, match="disk full"):
        infer(cfg, progress=False)
    np.testing.assert_array_equal(_read(product.classes_url)[0], before)
    leftovers = [p for p in (tmp_path / "maps").rglob("*") if p.is_file()]
    assert sorted(p.name for p in leftovers) == [
        "classes.tif",
        "classes.tif.aux.xml",
        "probabilities.tif",
    ]


@pytest.mark.slow
def test_a_crash_before_the_item_flips_keeps_item_and_files_consistent(
    ray_local, tmp_path, scenes, monkeypatch
):
    """New products go to new keys; the item flips to them last; older generations go only
    after the flip. A crash between upload and flip leaves the old item, its files and their
    checksum intact; the next run cleans up what the crashed one left."""
    from relaymap.catalog import StaticCatalog, multihash_sha256
    from relaymap.catalog.backends import StaticCatalog as Backend

    catalog = str(tmp_path / "catalog")
    cfg = InferConfig(
        model=scenes["model"],
        scene=scenes["stores"][1],
        out=str(tmp_path / "maps"),
        catalog=catalog,
        options=MapOptions(tile_px=128, overlap_px=0, quicklook=False),
    )
    first = infer(cfg, progress=False)

    def crash(self, items):
        raise OSError("killed before the catalog update")

    with monkeypatch.context() as m:
        m.setattr(Backend, "add_items", crash)
        with pytest.raises(OSError, match="killed before"):
            infer(cfg, progress=False)
    item = StaticCatalog(catalog).get_item("relaymap-maps", first.item.id)
    href = item.assets["classes"].href
    assert href == first.classes_url
    assert item.assets["classes"].extra_fields["file:checksum"] == multihash_sha256(href)[1]
    generations = sorted(p.parent.name for p in (tmp_path / "maps").rglob("classes.tif"))
    assert len(generations) == 2  # the crashed run's files: written, never pointed at
    third = infer(cfg, progress=False)
    assert [p.parent for p in (tmp_path / "maps").rglob("classes.tif")] == [
        Path(third.classes_url.removeprefix("file://")).parent
    ]
    assert (
        StaticCatalog(catalog).get_item("relaymap-maps", first.item.id).assets["classes"].href
        == third.classes_url
    )


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
    coarse = array_store(str(tmp_path / "coarse.zarr"), image, None, bands=BANDS, res=20.0)
    with pytest.raises(ModelError, match=r"has 20 m pixels but model .* was trained on 10 m"):
        run(coarse.url)
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
    from relaymap.catalog import model_item

    info, model = load_trained(scenes["model"])
    item = model_item(
        scenes["model"],
        item_id="quick",
        collection="relaymap-models",
        spec=info.spec,
        model_name=info.config.name,
        architecture="SwinTransformerV2 + relay tokens",
        total_parameters=1,
    )
    catalog = StaticCatalog(str(tmp_path / "catalog"))
    catalog.add_items([item])
    via_info, via_model = load_trained(item.get_self_href())
    assert via_info.item.id == "quick" and via_info.name == "quick"
    assert via_info.weights_url == info.weights_url and via_info.spec == info.spec
    ours, theirs = via_model.state_dict(), model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_cli_infer(ray_local, tmp_path, scenes):
    from click.testing import CliRunner

    from relaymap.flows.cli import main

    out = tmp_path / "cli"
    args = ["infer", "--model", scenes["model"], "--scene", scenes["stores"][1], "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--catalog", str(tmp_path / "cat"), "--tile-px", "128"])
    assert res.exit_code == 0, res.output
    assert "classes: file://" in res.output and "quicklook: " in res.output
    assert (tmp_path / "cat" / "relaymap-maps" / "items").is_dir()
    bad = CliRunner().invoke(main, [*args, "--batch-size", "0"])
    assert bad.exit_code == 2 and "batch_size" in bad.output


@pytest.mark.slow
def test_cli_infer_console_has_no_ray_core_worker_line_engine_onnxruntime(
    tmp_path, scenes, small_scene
):
    """``relaymap infer`` as a user runs it (a process of its own, its own local Ray), on
    ONNX Runtime: the console has our lines and no Ray core worker line (the actors take
    their arguments inline, ``relaymap.flows.pool``), and the map is the model's at fp32."""
    import subprocess

    out = tmp_path / "console"
    args = ["relaymap", "infer", "--model", scenes["model"], "--scene", small_scene[1].url]
    args += ["--out", str(out), "--tile-px", "64", "--engine", "onnxruntime", "--probabilities"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for internal in ("core_worker", "Traceback", "WARNING", "ERROR"):
        assert internal not in run.stdout + run.stderr, run.stderr
    (probabilities,) = out.rglob("probabilities.tif")
    (classes,) = out.rglob("classes.tif")
    probs, labels = _read(str(probabilities))[0] / 254, _read(str(classes))[0][0]
    _, model = load_trained(scenes["model"])
    image = small_scene[0]
    ref = predict_array(model, image, tile_px=64, precision="fp32").numpy()
    valid = np.isfinite(image).all(0)
    np.testing.assert_allclose(probs[:, valid], ref[:, valid], atol=0.6 / 254)
    assert (labels[~valid] == 255).all()
    clear = np.abs(np.diff(np.sort(ref, 0)[-2:], axis=0)[0]) > 1 / 254
    assert (labels == ref.argmax(0))[clear & valid].all()


def test_two_models_of_one_architecture_make_different_map_ids(tmp_path, scenes):
    """The map id carries the model's identity (weights digest, or its MLM item id), so a
    second model never skips or overwrites the first one's map."""
    from relaymap.flows.infer import map_item_id
    from relaymap.flows.trained import read_info

    from .models import quick_model

    other = quick_model(scenes["stores"][0], str(tmp_path / "other.safetensors"), steps=1, seed=5)
    a, b = read_info(scenes["model"]), read_info(other)
    assert a.config.name == b.config.name and a.digest != b.digest
    store = scenes["stores"][1]
    assert map_item_id(store, a.name) != map_item_id(store, b.name)
    assert map_item_id(store, a.name) == map_item_id(store, read_info(scenes["model"]).name)


@pytest.mark.slow
def test_validation_and_mapping_of_one_scene_give_the_same_classes(ray_local, tmp_path, scenes):
    """One normalisation rule (the model's spec) for validation and for maps: the classes
    validation scores on a scene are the classes its map holds (tiles on the same grid)."""
    from relaymap.flows.dataset import TileDataset

    info, model = load_trained(scenes["model"])
    store = scenes["stores"][1]
    tiles = TileDataset([store], info.spec)
    shape = open_scene(store).shape(0)
    expected = np.full(shape, 255, dtype=np.uint8)
    with torch.no_grad():
        for i in range(len(tiles)):
            sample, (_, pair) = tiles[i], tiles.tiles[i]
            out = model(sample["local"][None], sample["global"][None]).local[0]
            y0, x0, y1, x1 = pair.local.pixel_bounds()
            h, w = min(y1, shape[0]) - y0, min(x1, shape[1]) - x0
            expected[y0 : y0 + h, x0 : x0 + w] = out.argmax(0).numpy()[:h, :w]
    product = infer(_config(scenes, tmp_path, tile_px=64, overlap_px=0), progress=False)
    mapped = _read(product.classes_url)[0][0]
    valid = open_scene(store).valid(0).values
    assert (mapped[valid] == expected[valid]).mean() > 0.999  # up to bf16/threading ties
